"""all_reduce on every rank against the NumPy reference, bit for bit.

Per dtype, in sequence on one workspace: sizes x algorithms (poisoned outputs, in place),
the one-shot split into pushing and reducing SMs and the copy-engine two-shot (workspaces
of their own), rotation over many calls, graph replay, bad input, the NCCL algorithm (one
rank per GPU only), closing. Then a group spanning declared nodes (NCCL, one-shot
refused). In jobs of their own: a rank that skips a call (the others time out naming it),
and MOECOMM_DEBUG=1 catching arguments that differ across ranks.
"""

import re
import time

import cupy
import numpy as np
import pytest

import moecomm
from moecomm import reference
from moecomm.allreduce import Algorithm, AllReduceConfig, all_reduce, create_allreduce_workspace
from moecomm.errors import PeerTimeoutError
from tests.gpu.workers.common import bits, dtype_label, main, reduce_inputs
from tests.mpi import case

DTYPES = ("bf16", "fp16", "fp32")
ONESHOT_MAX = 64 << 10  # the workspaces' max_oneshot_bytes


def workspace(ctx, dtype):
    """The dtype's workspace: its cases run in sequence on this one object."""
    return ctx.shared(("ws", dtype.name), lambda: create_allreduce_workspace(
        ctx.group, max_bytes=(1 << 20) + 4096, dtype=dtype, max_oneshot_bytes=ONESHOT_MAX))



def check_exact(ctx, out, xs, what):
    """``out`` equals the reference bit for bit, and every rank holds the same bytes."""
    want = bits(reference.all_reduce(xs))
    got = bits(out)
    agree = ctx.ranks_agree([got])  # collective: before any assertion
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} elements differ, first at {bad[:5]}"
    assert agree, f"{what}: ranks disagree"


def poisoned(shape, dtype):
    return cupy.full(shape, np.nan, dtype)


def oneshot_calls(ctx, ws, dtype, sizes, what, calls=3):
    """``calls`` one-shot calls per size on fresh inputs (the Lamport buffers rotate), each
    checked against the reference on a poisoned output."""
    for n in sizes:
        for call in range(calls):
            xs = reduce_inputs(ctx, (n,), dtype)
            out = poisoned((n,), dtype)
            all_reduce(cupy.asarray(xs[ctx.rank]), ws, out=out, algorithm=Algorithm.ONESHOT)
            check_exact(ctx, out, xs, f"{what} n={n} call {call}")


def graph_replays(ctx, ws, dtype, sizes, algorithm, stream, what, replays=2):
    """One call per size captured in a graph on ``stream``, replayed ``replays`` times on
    fresh inputs into poisoned outputs, each checked against the reference."""
    ins = [cupy.empty((n,), dtype) for n in sizes]
    outs = [cupy.empty((n,), dtype) for n in sizes]
    with stream:
        stream.begin_capture()
        for x, out in zip(ins, outs):
            all_reduce(x, ws, out=out, algorithm=algorithm, stream=stream)
        graph = stream.end_capture()
    for replay in range(replays):
        data = [reduce_inputs(ctx, (n,), dtype) for n in sizes]
        for x, out, d in zip(ins, outs, data):
            x.set(d[ctx.rank])
            out.fill(np.nan)
        cupy.cuda.runtime.deviceSynchronize()
        graph.launch(stream)
        stream.synchronize()
        for out, d, n in zip(outs, data, sizes):
            check_exact(ctx, out, d, f"{what} graph replay {replay} n={n}")


@case(dtypes=DTYPES)
def exact(ctx, dtype):
    """Odd sizes, one past the one-shot limit, the largest; every algorithm; in place."""
    ws = workspace(ctx, dtype)
    item = dtype.itemsize
    lamport_elems = ONESHOT_MAX // item
    for shape in ((1,), (127,), (8, 16), (3, 1001), (lamport_elems + 40,), (1 << 20) // item):
        xs = reduce_inputs(ctx, shape, dtype)
        mine = cupy.asarray(xs[ctx.rank])
        size = int(np.prod(shape)) * item
        algos = [Algorithm.AUTO, Algorithm.TWOSHOT]
        if size <= ONESHOT_MAX:
            algos.append(Algorithm.ONESHOT)
        for algo in algos:
            out = poisoned(shape, dtype)
            assert all_reduce(mine, ws, out=out, algorithm=algo) is not None
            check_exact(ctx, out, xs, f"{dtype_label(dtype)} {shape} {algo.value}")
        inplace = mine.copy()
        all_reduce(inplace, ws, out=inplace)
        check_exact(ctx, inplace, xs, f"in place {shape}")
        # bit for bit: an op rewriting the input's -0.0 as +0.0 would pass an == compare
        assert np.array_equal(bits(mine), bits(xs[ctx.rank])), "input was modified"


@case
def twoshot_after_many_calls(ctx):
    """Two-shot after the call counter moved on by 2^19 and more (a decode loop of one-shot
    calls between prefills): flag slots written long ago, or never (blocks past the earlier
    grids), must not pass for the new call's; a ">=" compare of 32-bit values took them
    for values ahead, and 32-bit values with 20 bits of call number equalled them at
    exactly 2^20 calls. The counter is set as that many calls would leave it (same on every
    rank); a small grid first, then a large one, each checked. Rank 0 starts each call
    late, so a wait passed early reads stale data."""
    ws = create_allreduce_workspace(ctx.group, max_bytes=1 << 20, dtype=np.float32)

    def set_counter(value):  # kStateCall (kernels_cu/allreduce.cuh), the same on every rank
        ctx.stream.synchronize()
        cupy.cuda.runtime.deviceSynchronize()
        ws.state[4] = value
        cupy.cuda.runtime.deviceSynchronize()
        ctx.group.barrier()

    def late_twoshot(n, what):  # rank 0 starts late: a wait passed early reads stale data
        xs = reduce_inputs(ctx, (n,), np.float32)
        out = poisoned((n,), np.float32)
        x = cupy.asarray(xs[ctx.rank])
        cupy.cuda.runtime.deviceSynchronize()
        if ctx.rank == 0:
            time.sleep(0.05)
        all_reduce(x, ws, out=out, algorithm="twoshot")
        check_exact(ctx, out, xs, what)

    late_twoshot(4096, "two-shot before")
    for start in ((1 << 19) + 3, (1 << 20) - 1, 3 << 19):
        set_counter(start)
        for n in (4096, (1 << 20) // 4):
            late_twoshot(n, f"two-shot of {n} after call {start}")
    # Exactly 2^20 calls after the last one: every flag slot that call wrote would equal
    # the new call's value if the flags held the call in 20 bits.
    for _ in range(2):
        set_counter(int(ws.state[4]) - 1 + (1 << 20))
        late_twoshot((1 << 20) // 4, "two-shot 2^20 calls after the last")
    ws.check()
    ws.close()


@case(dtypes=DTYPES)
def oneshot_more_vectors_than_threads(ctx, dtype):
    """One-shot messages with more 16-byte vectors than the grid has threads (half of each
    block pushes, half reduces): a small grid, the default one and one whose blocks cannot
    split (96 threads); ragged sizes, three calls each (the Lamport buffers rotate)."""
    item = dtype.itemsize
    configs = (AllReduceConfig(oneshot_threads=64, oneshot_blocks_per_sm=1),
               AllReduceConfig(), AllReduceConfig(oneshot_threads=96, oneshot_blocks_per_sm=1))
    for config in configs:
        with create_allreduce_workspace(ctx.group, max_bytes=4 << 20, dtype=dtype,
                                        max_oneshot_bytes=4 << 20, config=config) as ws:
            oneshot_calls(ctx, ws, dtype, ((4 << 20) // item, 300_001, (1 << 18) + 3, 1000),
                          f"{config}")
            ws.check()


@case(dtypes=DTYPES)
def oneshot_split(ctx, dtype):
    """The one-shot with its SMs split into pushers and reducers (forced from 0 bytes): the
    default split, and 3 pushers of 64 threads (many vectors per thread, every unrolled
    tail); ragged sizes, three calls each, then a graph of four calls replayed on new
    inputs; then in place (where a reducer would overwrite inputs the pushers had yet to
    send: the unsplit kernel serves those calls)."""
    item = dtype.itemsize
    configs = (AllReduceConfig(split_min_bytes=0),
               AllReduceConfig(split_min_bytes=0, split_push_sms=3, split_threads=64))
    sizes = ((4 << 20) // item, 300_001, (1 << 18) + 3, 3 * 1001, 127, 1)
    stream = cupy.cuda.Stream(non_blocking=True)
    for config in configs:
        with create_allreduce_workspace(ctx.group, max_bytes=4 << 20, dtype=dtype,
                                        max_oneshot_bytes=4 << 20, config=config) as ws:
            oneshot_calls(ctx, ws, dtype, sizes, f"split {config}")
            graph_replays(ctx, ws, dtype, sizes[:4], Algorithm.ONESHOT, stream, "split")
            for n in sizes[:3]:
                xs = reduce_inputs(ctx, (n,), dtype)
                inplace = cupy.asarray(xs[ctx.rank])
                all_reduce(inplace, ws, out=inplace, algorithm=Algorithm.ONESHOT)
                check_exact(ctx, inplace, xs, f"split {config} in place n={n}")
            ws.check(stream)


@case(dtypes=DTYPES)
def twoshot_copy_engine(ctx, dtype):
    """Two-shot with the copy engines moving the shares (forced with every SM, and the
    default under num_sms): ragged sizes (a last segment short or empty), three calls each
    alternating with one-shot, in place, then a graph of four calls replayed on new inputs;
    bit for bit against the reference."""
    item = dtype.itemsize
    sizes = ((4 << 20) // item, 300_001, (1 << 18) + 3, 3 * 1001, 127, 1)
    stream = cupy.cuda.Stream(non_blocking=True)
    for config in (AllReduceConfig(twoshot_copy_engine=True), AllReduceConfig(num_sms=8)):
        with create_allreduce_workspace(ctx.group, max_bytes=4 << 20, dtype=dtype,
                                        max_oneshot_bytes=64 << 10, config=config) as ws:
            assert ws.copy_engine, config
            for n in sizes:
                for call in range(3):
                    xs = reduce_inputs(ctx, (n,), dtype)
                    out = poisoned((n,), dtype)
                    all_reduce(cupy.asarray(xs[ctx.rank]), ws, out=out,
                               algorithm=Algorithm.TWOSHOT)
                    check_exact(ctx, out, xs, f"copy engine {config} n={n} call {call}")
                    if n * item <= 64 << 10:  # the inboxes' users alternate
                        out = all_reduce(cupy.asarray(xs[ctx.rank]), ws,
                                         algorithm=Algorithm.ONESHOT)
                        check_exact(ctx, out, xs, f"one-shot between, n={n}")
                inplace = cupy.asarray(xs[ctx.rank])
                all_reduce(inplace, ws, out=inplace, algorithm=Algorithm.TWOSHOT)
                check_exact(ctx, inplace, xs, f"copy engine in place n={n}")
            graph_replays(ctx, ws, dtype, sizes[:4], Algorithm.TWOSHOT, stream, "copy engine")
            ws.check(stream)


@case(dtypes=DTYPES)
def rotation(ctx, dtype):
    """Many calls in a row, alternating algorithms, fresh data each time."""
    ws = workspace(ctx, dtype)
    for i in range(7):
        shape = (97 + 31 * i,)
        xs = reduce_inputs(ctx, shape, dtype)
        algo = (Algorithm.ONESHOT, Algorithm.TWOSHOT, Algorithm.ONESHOT)[i % 3]
        out = all_reduce(cupy.asarray(xs[ctx.rank]), ws, algorithm=algo)
        check_exact(ctx, out, xs, f"rotation {i} {algo.value}")


@case(dtypes=DTYPES)
def graph_replay(ctx, dtype):
    """10 calls (both algorithms) captured once, replayed 3 times on new inputs."""
    ws = workspace(ctx, dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    shapes = [(33 + 100 * i,) if i % 2 else (5000 + i,) for i in range(10)]
    ins = [cupy.empty(s, dtype) for s in shapes]
    outs = [cupy.empty(s, dtype) for s in shapes]
    with stream:
        stream.begin_capture()
        for i in range(10):
            all_reduce(ins[i], ws, out=outs[i],
                       algorithm=Algorithm.ONESHOT if i % 2 else Algorithm.TWOSHOT,
                       stream=stream)
        graph = stream.end_capture()
    for replay in range(3):
        data = [reduce_inputs(ctx, s, dtype) for s in shapes]
        for i in range(10):
            ins[i].set(data[i][ctx.rank])
            outs[i].fill(np.nan)
        cupy.cuda.runtime.deviceSynchronize()
        graph.launch(stream)
        stream.synchronize()
        for i in range(10):
            check_exact(ctx, outs[i], data[i], f"graph replay {replay} call {i}")
    ws.check(stream)


@case(dtypes=DTYPES)
def bad_input(ctx, dtype):
    """Clear errors before any launch."""
    ws = workspace(ctx, dtype)
    item = dtype.itemsize
    x = cupy.ones(16, dtype)
    other = np.float32 if dtype != np.float32 else np.float16
    with pytest.raises(TypeError, match="does not match the workspace"):
        all_reduce(x.astype(other), ws)
    with pytest.raises(ValueError, match="exceeds the workspace's max_bytes"):
        all_reduce(cupy.ones((2 << 20) // item, dtype), ws)
    with pytest.raises(ValueError, match="max_oneshot_bytes"):
        all_reduce(cupy.ones((128 << 10) // item, dtype), ws, algorithm="oneshot")
    with pytest.raises(ValueError, match="16-byte aligned"):
        all_reduce(cupy.ones(64, dtype)[1:], ws)
    with pytest.raises(ValueError, match="does not match"):
        all_reduce(x, ws, out=cupy.ones(15, dtype))
    with pytest.raises(ValueError, match="'fastest' is not a valid Algorithm"):
        all_reduce(x, ws, algorithm="fastest")
    # a two-shot inbox smaller than a peer's segment of max_bytes (raised on every rank)
    need = -(-(1 << 20) // ctx.world // 16) * 16
    with pytest.raises(ValueError, match=f"segment_bytes must be >= {need}, got 4096"):
        create_allreduce_workspace(ctx.group, 1 << 20, dtype, segment_bytes=4096)


@case(dtypes=DTYPES)
def nccl_algorithm(ctx, dtype):
    """algorithm="nccl" on the same workspace, close to the reference."""
    if not ctx.exclusive:
        pytest.skip("ranks share a GPU: NCCL needs one rank per GPU")
    ws = workspace(ctx, dtype)
    xs = reduce_inputs(ctx, (4099,), dtype)
    got = cupy.asnumpy(all_reduce(cupy.asarray(xs[ctx.rank]), ws, algorithm="nccl"))
    want = reference.to_float32(reference.all_reduce(xs))
    tol = 1e-5 if dtype == np.float32 else 2e-2
    assert np.allclose(reference.to_float32(got), want, rtol=tol, atol=tol), "nccl"


@case(dtypes=DTYPES)
def closed(ctx, dtype):
    """A closed workspace refuses calls."""
    ws = workspace(ctx, dtype)
    ctx.drop(("ws", dtype.name))
    ws.close()
    with pytest.raises(RuntimeError, match="closed"):
        all_reduce(cupy.ones(16, dtype), ws)


@case
def spanning_group_uses_nccl(ctx):
    """A group spanning (declared) nodes goes through NCCL; one-shot is refused."""
    if ctx.world == 1:
        pytest.skip("one rank spans no nodes")
    split = moecomm.ProcessGroup(gpus_per_node=1)
    try:
        with create_allreduce_workspace(split, max_bytes=1 << 16, dtype=np.float32) as ws:
            assert not ws.ipc and ws.choose(1024) == Algorithm.NCCL
            with pytest.raises(ValueError, match="needs CUDA IPC"):
                ws.choose(1024, "oneshot")
            if ctx.exclusive:
                xs = reduce_inputs(ctx, (1000,), np.float32)
                got = all_reduce(cupy.asarray(xs[ctx.rank]), ws).get()
                assert np.allclose(got, reference.all_reduce(xs), rtol=1e-5, atol=1e-5)
    finally:
        split.close()


@case(own_job=True, ranks=(2, 3))
def missing_peer_times_out(ctx):
    """Rank 1 skips one call: the other ranks' kernels give up and name rank 1 (the
    one-shot also with its SMs split by role)."""
    for algo, config in (("oneshot", None), ("twoshot", None),
                         ("oneshot", AllReduceConfig(split_min_bytes=0))):
        ws = create_allreduce_workspace(ctx.group, max_bytes=1 << 16, dtype=np.float32,
                                        timeout_s=0.5, config=config)
        x = cupy.ones(1000, np.float32)
        all_reduce(x, ws, algorithm=algo)
        ws.check()
        if ctx.rank != 1:
            all_reduce(x, ws, algorithm=algo)
            with pytest.raises(PeerTimeoutError, match="rank 1 never arrived") as info:
                ws.check()
            assert info.value.rank == 1, (algo, info.value.rank)
            with pytest.raises(PeerTimeoutError, match="rank 1"):
                all_reduce(x, ws, algorithm=algo)
        ctx.group.barrier()
        ws.close()


@case(own_job=True, ranks=(2,), env={"MOECOMM_DEBUG": "1"})
def debug_mode_catches_mismatched_arguments(ctx):
    """MOECOMM_DEBUG=1: arguments that differ across ranks raise on every rank."""
    assert moecomm.group.DEBUG
    with create_allreduce_workspace(ctx.group, max_bytes=1 << 16, dtype=np.float32) as ws:
        out = all_reduce(cupy.ones(100, np.float32), ws)
        assert cupy.all(out == ctx.world)
        with pytest.raises(ValueError, match="differ across ranks"):
            all_reduce(cupy.ones(100 + ctx.rank, np.float32), ws)
        with pytest.raises(ValueError, match=re.escape("rank 1: ((101,)")):
            all_reduce(cupy.ones(100 + ctx.rank, np.float32), ws)
        out = all_reduce(cupy.ones(64, np.float32), ws, algorithm="twoshot")
        assert cupy.all(out == ctx.world), "the workspace is usable after a refused call"


if __name__ == "__main__":
    main()
