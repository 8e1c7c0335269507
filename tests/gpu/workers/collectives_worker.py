"""all_gatherv / reduce_scatterv across real ranks against moecomm.reference (ranks may share
a GPU; the NCCL cases need one GPU per rank).

Every rank builds every rank's inputs from a shared seed and checks its own part. Outputs
are poisoned first; row counts are ragged, include 0 for some ranks, change from call to
call on one workspace; rows of every byte size take every copy path (16-byte vectors,
4-byte words, bytes). Both kernels are covered: the Lamport path of small calls and the
pipelined one (forced by ``lamport_max_bytes``, and by default on either side of the
crossover), with payload words equal to the Lamport sentinel 0x80000000 in every dtype.
"""

import re
import time

import cupy
import numpy as np
import pytest

import moecomm
from moecomm import reference as ref
from moecomm.collectives import (VCollectiveConfig, VCollectiveWorkspace,
                                 create_vcollective_workspace, lamport_crossover, received_bytes)
from moecomm.errors import PeerTimeoutError
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, main, raw, zeros
from tests.mpi import case

MAX_T = 40
H = 64           # bf16 / fp32 rows for reduce_scatterv (128 / 256 bytes)
TOP_K = 8
# (dtype, row shape): fp32 weights and int32 ids (32 B rows), NVFP4-like codes (100 B: the
# word path), scale bytes (7 B: the byte path), bf16 hidden (128 B: the vector path)
PAYLOADS = [(np.float32, (TOP_K,)), (np.int32, (TOP_K,)), (np.uint8, (100,)),
            (np.uint8, (7,)), (np.uint16, (H,))]
SIZES = {"ragged": None, "zero_rank": "zero", "all_zero": "all_zero", "even": "even",
         "one_row": "one"}


# lamport_max_bytes per path: the byte model, never, every call that fits
PATHS = {"auto": None, "pipelined": 0, "lamport": 1 << 30}


def workspace(ctx, group=None, key="vc", path="auto"):
    g = ctx.group if group is None else group
    config = VCollectiveConfig(lamport_max_bytes=PATHS[path])
    return ctx.shared(key if path == "auto" else f"{key}_{path}",
                      lambda: create_vcollective_workspace(
                          g, max_tokens_per_rank=MAX_T, config=config,
                          bytes_per_token=[4 * H] + [np.dtype(d).itemsize * int(np.prod(s))
                                                     for d, s in PAYLOADS]))


def expect_path(ws, path, got):
    """The forced paths take their kernel (``auto``: small calls, Lamport too)."""
    want = {"pipelined": "pipelined", "lamport": "lamport", "auto": "lamport"}[path]
    assert got == want, (path, got)


def make_sizes(rng, world, mode=None):
    if mode == "even":
        return [MAX_T // 2] * world
    if mode == "all_zero":
        return [0] * world
    if mode == "one":
        return [1] + [0] * (world - 1)
    sizes = [int(rng.integers(0, MAX_T + 1)) for _ in range(world)]
    if mode == "zero":
        sizes[-1] = 0
    return sizes


SENTINEL = 0x80000000
# every dtype all_gatherv may carry, with a row shape (odd byte counts included)
ALL_DTYPES = [(np.bool_, (13,)), (np.int8, (5,)), (np.uint8, (7,)), (np.uint8, (100,)),
              (np.int16, (3,)), (np.uint16, (64,)), (np.float16, (9,)), (np.int32, (8,)),
              (np.uint32, (5,)), (np.float32, (8,)), (np.int64, (3,)), (np.uint64, (2,)),
              (np.float64, (5,)), (np.complex64, (3,))]


def sentinel_rich(rng, rows, dtype, shape):
    """Random ``[rows, *shape]`` of ``dtype`` whose bytes are mostly 0x00 / 0x80 (so the
    32-bit word 0x80000000 occurs at every alignment), whole rows of it, -0.0 floats."""
    dtype = np.dtype(dtype)
    nbytes = rows * int(np.prod(shape)) * dtype.itemsize
    b = rng.choice(np.array([0x00, 0x80, 0x00, 0x00, 0x80, 0x7F, 0xFF], np.uint8), nbytes)
    if dtype == np.bool_:   # valid bools only (a bool array never holds 0x80000000)
        b = (b & 1).astype(np.uint8)
    else:                   # a quarter of the (4-byte aligned) words: the sentinel
        words = b[:nbytes // 4 * 4].view(np.uint32)
        words[rng.random(words.size) < 0.25] = SENTINEL
    x = b.view(dtype).reshape(rows, *shape)
    if rows and dtype.itemsize % 4 == 0 and dtype != np.bool_:
        x[::3].view(np.uint32)[...] = SENTINEL       # rows of sentinel words only
    return x


def gather_inputs(ctx, mode=None, sizes=None):
    """Fresh random row counts (or ``sizes``) and each rank's payloads."""
    rngs = ctx.rank_rngs()
    sizes = make_sizes(rngs[0], ctx.world, mode) if sizes is None else sizes
    xs = [[sentinel_rich(rngs[r], sizes[r], dt, shape) for dt, shape in PAYLOADS]
          for r in range(ctx.world)]
    return sizes, xs


def same_bytes(got: np.ndarray, want: np.ndarray) -> bool:
    """Same shape, dtype and bytes (NaN payloads and -0.0 included)."""
    return (got.shape == want.shape and got.dtype == want.dtype and np.array_equal(
        np.ascontiguousarray(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8)))


def poisoned(shape, dtype) -> cupy.ndarray:
    """A device array of ``shape`` filled with 0xA5 bytes, whatever the dtype (the value
    0xA5 itself does not fit int8 or bool)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return cupy.full(n, 0xA5, np.uint8).view(dtype).reshape(shape)


def check_gather(ctx, ws, sizes, xs, *, outs=True):
    r = ctx.rank
    device = [ctx.device(x, bf16=False) for x in xs[r]]
    want = ref.all_gatherv(xs, sizes)
    if outs:
        with ctx.stream:
            out = [poisoned((sum(sizes), *x.shape[1:]), x.dtype) for x in xs[r]]
        got = ws.all_gatherv(device, sizes, outs=out, stream=ctx.stream)
        assert all(g is o for g, o in zip(got, out))
    else:
        got = ws.all_gatherv(device, sizes, stream=ctx.stream)
    for i, (g, w) in enumerate(zip(got, want)):
        assert same_bytes(ctx.host(g), w), (i, sizes, w.dtype)
    ws.check(ctx.stream)


@case(variants=SIZES)
def all_gatherv_exact(ctx, mode):
    """Five tensors of every row size in one call, poisoned outputs, three calls, on each
    path (the Lamport buffers rotate over three calls: four calls reuse one)."""
    for path in PATHS:
        ws = workspace(ctx, path=path)
        for _ in range(4):
            sizes, xs = gather_inputs(ctx, mode)
            expect_path(ws, path, ws.gather_path(
                sizes, [x.itemsize * int(np.prod(x.shape[1:])) for x in xs[0]]))
            check_gather(ctx, ws, sizes, xs)


def dtype_inputs(ctx, sizes, payloads):
    rngs = ctx.rank_rngs()
    return [[sentinel_rich(rngs[r], sizes[r], dt, shape) for dt, shape in payloads]
            for r in range(ctx.world)]


@case
def all_gatherv_sentinel_words(ctx):
    """Words equal to the Lamport sentinel (0x80000000, fp32 -0.0, 16-bit -0.0 halves) in
    every dtype and alignment arrive bitwise on every path; streams end on and around a
    31-vector line boundary."""
    rngs = ctx.rank_rngs()
    for path in PATHS:
        ws = workspace(ctx, path=path)
        for mode in (None, "zero", "even", "one"):
            for group in (ALL_DTYPES[:7], ALL_DTYPES[7:]):
                sizes = make_sizes(rngs[0], ctx.world, mode)
                xs = dtype_inputs(ctx, sizes, group)
                expect_path(ws, path, ws.gather_path(
                    sizes, [np.dtype(d).itemsize * int(np.prod(s)) for d, s in group]))
                check_gather(ctx, ws, sizes, xs)
        # one tensor of 16-byte rows: 31 rows fill a line exactly, 30 / 32 around it; then
        # every word the sentinel (mask words 0x7FFFFFFF, payload words all sent as 0)
        for only_sentinel in (False, True):
            for rows in (30, 31, 32, 62):
                sizes = [rows] * ctx.world
                xs = dtype_inputs(ctx, sizes, [(np.uint32, (4,))])
                if only_sentinel:
                    for x in xs:
                        x[0][...] = SENTINEL
                check_gather(ctx, ws, sizes, xs)


@case
def lamport_receiver_of_nothing_waits(ctx):
    """A rank that receives nothing (reduce_scatterv: no rows of its own; all_gatherv: no
    rows from any peer) issues three Lamport calls back to back while its peers start late:
    it must not run two calls ahead and write a peer's buffer that peer is still refilling
    (on the old protocol the peers' third call timed out or summed stale rows)."""
    ws = workspace(ctx, path="lamport")
    runner = 0
    rngs = ctx.rank_rngs()
    for op in ("reduce_scatterv", "all_gatherv"):
        # reduce_scatterv: rank 0 has no rows; all_gatherv: only rank 0 has rows, so every
        # other rank receives from rank 0 alone and rank 0 receives nothing
        sizes = [0] + [5] * (ctx.world - 1) if op == "reduce_scatterv" else [5] + [0] * (ctx.world - 1)
        calls = []
        for _ in range(3):
            if op == "reduce_scatterv":
                xs = [ref.cast_from_float32(rngs[r].standard_normal((sum(sizes), H)).astype(
                    np.float32), bfloat16) for r in range(ctx.world)]
            else:
                xs = [[rngs[r].integers(0, 256, (sizes[r], 48), dtype=np.uint8)]
                      for r in range(ctx.world)]
            calls.append(xs)
        path = (ws.scatter_path(sizes, 2 * H) if op == "reduce_scatterv"
                else ws.gather_path(sizes, [48]))
        assert path == "lamport", path
        ctx.stream.synchronize()
        ctx.group.barrier()
        if ctx.rank != runner:
            time.sleep(0.3)  # the runner's three calls are all issued by now
        outs = []
        for xs in calls:
            if op == "reduce_scatterv":
                outs.append(ws.reduce_scatterv(ctx.device(xs[ctx.rank]), sizes, stream=ctx.stream))
            else:
                outs.append(ws.all_gatherv([ctx.device(xs[ctx.rank][0], bf16=False)], sizes,
                                           stream=ctx.stream)[0])
        ctx.stream.synchronize()
        for i, (xs, got) in enumerate(zip(calls, outs)):
            if op == "reduce_scatterv":
                want = ref.reduce_scatterv(xs, sizes)[ctx.rank]
                assert np.array_equal(bits(ctx.host(got)), bits(want)), (op, i)
            else:
                want = ref.all_gatherv(xs, sizes)[0]
                assert same_bytes(ctx.host(got), want), (op, i)
        ws.check(ctx.stream)


@case
def all_gatherv_new_outputs(ctx):
    """Without outs=: new arrays; one tensor; sizes changing every call."""
    ws = workspace(ctx)
    for _ in range(3):
        sizes, xs = gather_inputs(ctx)
        check_gather(ctx, ws, sizes, [[x[2]] for x in xs], outs=False)


def scatter_inputs(ctx, dtype, mode=None):
    rngs = ctx.rank_rngs()
    sizes = make_sizes(rngs[0], ctx.world, mode)
    x32 = [rngs[r].standard_normal((sum(sizes), H)).astype(np.float32) for r in range(ctx.world)]
    for x in x32:  # -0.0 inputs read as +0 in the sum
        x[::7, ::5] = -0.0
        x[::11] = -0.0   # rows of -0.0 on every rank: +0 (sent as +0 by the Lamport path)
    return sizes, [ref.cast_from_float32(x, dtype) for x in x32]


def check_scatter(ctx, ws, sizes, xs, dtype):
    r = ctx.rank
    want = ref.reduce_scatterv(xs, sizes)[r]
    x = ctx.device(xs[r])
    out = zeros((sizes[r], *x.shape[1:]), x.dtype)
    with ctx.stream:
        raw(out).fill(0xFFFF if x.itemsize == 2 else 0x7FC00001)
    got = ws.reduce_scatterv(x, sizes, out=out, stream=ctx.stream)
    assert got is out
    assert np.array_equal(bits(ctx.host(got)), bits(want)), (sizes, dtype)
    ws.check(ctx.stream)


@case(dtypes=("bf16", "fp16", "fp32"))
def reduce_scatterv_exact(ctx, dtype):
    """Rank-order fp32 sums from +0, ragged sizes with empty ranks, repeated calls, on
    each path."""
    for path in PATHS:
        ws = workspace(ctx, path=path)
        for mode in (None, "zero", "even", "one", "all_zero", None):
            sizes, xs = scatter_inputs(ctx, dtype, mode)
            expect_path(ws, path, ws.scatter_path(sizes, xs[0].itemsize * H))
            check_scatter(ctx, ws, sizes, xs, dtype)


def crossover_rows(world: int, row_bytes: int) -> int:
    """Rows per rank of the largest even call the byte model still sends down the Lamport
    path (one more row crosses over)."""
    n = 0
    while received_bytes(world * (n + 1) * row_bytes, world) <= lamport_crossover():
        n += 1
    return n


@case(dtypes=("bf16", "fp16", "fp32"))
def crossover_default_config(ctx, dtype):
    """Default config: calls just below and just above the byte model's crossover take the
    Lamport and the pipelined kernel, both exact (all_gatherv of sentinel-rich 1 KiB rows,
    reduce_scatterv of 1 KiB rows); then a burst of both kinds on both paths, issued
    without synchronising, checked at the end."""
    if ctx.world == 1:
        pytest.skip("one rank receives nothing: every call fits the Lamport path")
    row = 1024
    n = crossover_rows(ctx.world, row)
    ws = ctx.shared("vc_cross", lambda: create_vcollective_workspace(
        ctx.group, max_tokens_per_rank=n + 8, bytes_per_token=row))
    hs = row // np.dtype(dtype).itemsize
    rngs = ctx.rank_rngs()
    for k, rows in enumerate((n, n + 1, n, n + 1, max(0, n - 3), n + 8)):
        sizes = [rows] * ctx.world
        if k % 2 == 0 and ctx.world > 1:   # ragged, same total
            sizes[0], sizes[-1] = rows + 1, rows - 1
        want = "lamport" if received_bytes(sum(sizes) * row, ctx.world) <= lamport_crossover() \
            else "pipelined"
        assert ws.gather_path(sizes, [row]) == want and ws.scatter_path(sizes, row) == want
        xs = dtype_inputs(ctx, sizes, [(np.uint8, (row,))])
        check_gather(ctx, ws, sizes, xs)
        x32 = [rngs[r].standard_normal((sum(sizes), hs)).astype(np.float32)
               for r in range(ctx.world)]
        for x in x32:
            x[::5] = -0.0
        check_scatter(ctx, ws, sizes, [ref.cast_from_float32(x, dtype) for x in x32], dtype)
    r, pending = ctx.rank, []
    for rows in (n, n + 1, n - 1, n + 8, 1, n + 1):
        sizes = [rows] * ctx.world
        xs = dtype_inputs(ctx, sizes, [(np.uint8, (row,))])
        got = ws.all_gatherv([ctx.device(xs[r][0])], sizes, stream=ctx.stream)[0]
        pending.append((got, ref.all_gatherv(xs, sizes)[0]))
        x32 = [rngs[q].standard_normal((sum(sizes), hs)).astype(np.float32)
               for q in range(ctx.world)]
        ys = [ref.cast_from_float32(x, dtype) for x in x32]
        got = ws.reduce_scatterv(ctx.device(ys[r]), sizes, stream=ctx.stream)
        pending.append((got, ref.reduce_scatterv(ys, sizes)[r]))
    for i, (got, want) in enumerate(pending):
        assert np.array_equal(bits(ctx.host(got)), bits(want)), (i, dtype)
    ws.check(ctx.stream)


@case(variants={p: p for p in PATHS})
def alternating_calls(ctx, path):
    """all_gatherv and reduce_scatterv interleaved on one workspace (shared buffers and
    flags, or Lamport buffers and call counter), without synchronising between them."""
    ws = workspace(ctx, path=path)
    for i in range(8):
        if i % 2:
            sizes, xs = scatter_inputs(ctx, "bf16")
            check_scatter(ctx, ws, sizes, xs, "bf16")
        else:
            sizes, xs = gather_inputs(ctx)
            check_gather(ctx, ws, sizes, xs)


@case
def pipelined_after_many_calls(ctx):
    """The pipelined path after the call counter moved on by 2^15 and more: flag slots of
    blocks past the recent grids (or never written) must not pass for the new call's. The
    counter is set as that many calls would leave it (same on every rank); each call is
    checked. Rank 0 starts each call late, so a wait passed early reads stale data."""
    ws = workspace(ctx, key="vc_counter", path="pipelined")  # its own counter
    sizes, xs = gather_inputs(ctx)
    check_gather(ctx, ws, sizes, xs)
    for jump in ((1 << 15) + 3, (1 << 16) - 7, 3 << 15):
        ctx.stream.synchronize()
        cupy.cuda.runtime.deviceSynchronize()
        ws.state[0] = int(ws.state[0]) + jump  # kStateCall (kernels_cu/collectives.cu)
        cupy.cuda.runtime.deviceSynchronize()
        ctx.group.barrier()
        for mode in ("even", None):
            sizes, xs = gather_inputs(ctx, mode)
            if ctx.rank == 0:
                time.sleep(0.05)
            check_gather(ctx, ws, sizes, xs)
    # Exactly 2^16 calls after the last one, the same sizes: every flag slot that call
    # wrote would equal the new call's value if the flags held the call in 16 bits.
    for _ in range(2):
        ctx.stream.synchronize()
        cupy.cuda.runtime.deviceSynchronize()
        ws.state[0] = int(ws.state[0]) - 1 + (1 << 16)
        cupy.cuda.runtime.deviceSynchronize()
        ctx.group.barrier()
        sizes, xs = gather_inputs(ctx, sizes=sizes)  # new data, the last call's grid
        if ctx.rank == 0:
            time.sleep(0.05)
        check_gather(ctx, ws, sizes, xs)


@case(variants={p: p for p in PATHS})
def graph_replay(ctx, path):
    """all_gatherv + reduce_scatterv captured once with fixed sizes, replayed on new data
    (five replays: the Lamport buffers rotate over three calls)."""
    ws, stream, r = workspace(ctx, path=path), ctx.stream, ctx.rank
    sizes, xs = gather_inputs(ctx, "zero")
    ys = [np.zeros((sum(sizes), H), np.float32) for _ in range(ctx.world)]
    dx = [ctx.device(x, bf16=False) for x in xs[r]]
    dy = ctx.device(ys[r])
    outs = [cupy.zeros((sum(sizes), *x.shape[1:]), x.dtype) for x in xs[r]]
    out = cupy.zeros((sizes[r], H), np.float32)
    ws.all_gatherv(dx, sizes, outs=outs, stream=stream)  # prepare the launches outside
    ws.reduce_scatterv(dy, sizes, out=out, stream=stream)
    stream.synchronize()
    with stream:
        stream.begin_capture()
        ws.all_gatherv(dx, sizes, outs=outs, stream=stream)
        ws.reduce_scatterv(dy, sizes, out=out, stream=stream)
        graph = stream.end_capture()
    for i in range(5):
        rngs = ctx.rank_rngs()
        new_x = [[sentinel_rich(rngs[q], x.shape[0], x.dtype, x.shape[1:]) for x in xs[q]]
                 for q in range(ctx.world)]
        new_y = [rngs[q].standard_normal(ys[q].shape).astype(np.float32) for q in range(ctx.world)]
        with stream:
            for d, h in zip(dx, new_x[r]):
                d[...] = cupy.asarray(h)
            dy[...] = cupy.asarray(new_y[r])
            for o in outs:
                raw(o).fill(0x55)
            out.fill(np.nan)
        graph.launch(stream)
        for g, w in zip(outs, ref.all_gatherv(new_x, sizes)):
            assert same_bytes(ctx.host(g), w), f"replay {i}: all_gatherv"
        assert np.array_equal(bits(ctx.host(out)), bits(ref.reduce_scatterv(new_y, sizes)[r])), \
            f"replay {i}: reduce_scatterv"
    ws.check(stream)


def _nccl_group(ctx):
    if not ctx.exclusive:
        pytest.skip("NCCL needs one GPU per rank")
    return moecomm.ProcessGroup(gpus_per_node=1)


@case
def nccl_path_matches_ipc(ctx):
    """A group cut into nodes of one rank takes NCCL: the same bits as the IPC path."""
    group = _nccl_group(ctx)
    try:
        with create_vcollective_workspace(group, max_tokens_per_rank=MAX_T,
                                          bytes_per_token=[4 * H, 100]) as nws:
            assert nws.path == "nccl"
            ws = workspace(ctx)
            assert ws.path == "ipc"
            for mode in (None, "zero", "one"):
                sizes, xs = gather_inputs(ctx, mode)
                check_gather(ctx, nws, sizes, xs)
                check_gather(ctx, ws, sizes, xs)
                for dtype in ("bf16", "fp32"):
                    sizes, ys = scatter_inputs(ctx, dtype, mode)
                    check_scatter(ctx, nws, sizes, ys, dtype)
                    check_scatter(ctx, ws, sizes, ys, dtype)
    finally:
        group.close()


@case
def bad_input(ctx):
    """Clear errors before any launch; the workspace stays usable."""
    ws, n, r = workspace(ctx), ctx.world, ctx.rank
    sizes = [3] * n
    x = cupy.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match=f"{n + 1} row counts for a group of {n}"):
        ws.all_gatherv([x], sizes + [1])
    with pytest.raises(ValueError, match=re.escape(f"sizes[{r}]=3")):
        ws.all_gatherv([x[:2]], sizes)
    with pytest.raises(ValueError, match="is negative"):
        ws.all_gatherv([x], [3] + [-1] * (n - 1))
    with pytest.raises(TypeError, match="expected an int"):
        ws.all_gatherv([x], [3.0] * n)
    with pytest.raises(TypeError, match="expected a list"):
        ws.all_gatherv(x, sizes)
    with pytest.raises(ValueError, match="expected 1 to 8"):
        ws.all_gatherv([x] * 9, sizes)
    with pytest.raises(ValueError, match=r"outs\[0\]: shape"):
        ws.all_gatherv([x], sizes, outs=[cupy.zeros((3 * n - 1, 8), np.float32)])
    with pytest.raises(TypeError, match=r"outs\[0\]: dtype"):
        ws.all_gatherv([x], sizes, outs=[cupy.zeros((3 * n, 8), np.int32)])
    with pytest.raises(ValueError, match="exceeds the workspace's max_bytes"):
        ws.all_gatherv([cupy.zeros((3, 1 << 16), np.float32)], sizes)
    y = cupy.zeros((3 * n, 8), np.float32)
    with pytest.raises(ValueError, match=re.escape(f"expected sum(sizes)={3 * n + 1} rows")):
        ws.reduce_scatterv(y, [4] + [3] * (n - 1))
    with pytest.raises(TypeError, match="dtype int32 is not supported"):
        ws.reduce_scatterv(y.astype(np.int32), sizes)
    with pytest.raises(ValueError, match="multiple of 16"):
        ws.reduce_scatterv(cupy.zeros((3 * n, 3), np.float32), sizes)
    with pytest.raises(ValueError, match="out: shape"):
        ws.reduce_scatterv(y, sizes, out=cupy.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="max_bytes"):
        ws.reduce_scatterv(cupy.zeros((3 * n, 1 << 16), np.float32), sizes)
    with pytest.raises(ValueError, match="cpu"):
        ws.all_gatherv([np.zeros((3, 8), np.float32)], sizes)
    check_gather(ctx, ws, *gather_inputs(ctx))


@case
def closed(ctx):
    ws = workspace(ctx)
    ctx.drop("vc")
    ws.close()
    with pytest.raises(RuntimeError, match="closed"):
        ws.all_gatherv([cupy.zeros((1, 4), np.float32)], [1] * ctx.world)
    ws.close()


@case(own_job=True, ranks=(2,), env={"MOECOMM_DEBUG": "1"})
def debug_mode_catches_mismatched_sizes(ctx):
    """MOECOMM_DEBUG=1: sizes or dtypes differing across ranks raise on every rank."""
    assert moecomm.group.DEBUG
    with VCollectiveWorkspace(ctx.group, 1 << 16) as ws:
        sizes = [2, 2 + ctx.rank]
        x = cupy.zeros((sizes[ctx.rank], 4), np.float32)
        with pytest.raises(ValueError, match="differ across ranks"):
            ws.all_gatherv([x], sizes)
        with pytest.raises(ValueError, match="differ across ranks"):
            ws.reduce_scatterv(cupy.zeros((sum(sizes), 4), np.float32), sizes)
        with pytest.raises(ValueError, match="differ across ranks"):
            ws.all_gatherv([cupy.zeros((2, 4), np.float32 if ctx.rank else np.int32)], [2, 2])
        got = ws.all_gatherv([cupy.full((2, 4), ctx.rank, np.int32)], [2, 2])[0]
        assert np.array_equal(got.get(), np.repeat([0, 1], 2)[:, None].repeat(4, 1))


@case(own_job=True, ranks=(2, 3), variants={"lamport": None, "pipelined": 0})
def missing_peer_times_out(ctx, limit):
    """The last rank skips a call: the others raise PeerTimeoutError naming it (small calls:
    the Lamport path by default, the pipelined one when forced)."""
    missing = ctx.world - 1
    config = VCollectiveConfig(lamport_max_bytes=limit)
    with VCollectiveWorkspace(ctx.group, 1 << 16, timeout_s=0.5, config=config) as ws:
        assert ws.scatter_path([2] * ctx.world, 16) == ("pipelined" if limit == 0 else "lamport")
        x = cupy.ones((2, 4), np.float32)
        ws.all_gatherv([x], [2] * ctx.world)
        ws.check()
        if ctx.rank != missing:
            ws.reduce_scatterv(cupy.ones((2 * ctx.world, 4), np.float32), [2] * ctx.world)
            with pytest.raises(PeerTimeoutError, match=f"rank {missing} never arrived") as info:
                ws.check()
            assert info.value.rank == missing
            with pytest.raises(PeerTimeoutError):
                ws.all_gatherv([x], [2] * ctx.world)
        ctx.group.barrier()


if __name__ == "__main__":
    main()
