"""Decode CP all-to-all and LSE combine on every rank against the NumPy reference; strided
views of symmetric buffers.

The exchange is compared bit for bit (outputs poisoned first, -0.0 / inf / NaN among the
inputs), the combine within about one ulp of the output dtype. In sequence on one
workspace: shapes x dtypes (also in place), ragged batches over many calls, both dtypes
on one workspace, graph replay, the combine in every stats format, bad input (then a
good call, proving nothing was launched), torch tensors, a Mapping's cp group. In jobs of
their own: a rank that skips a call (the others time out naming it), and MOECOMM_DEBUG=1
catching shapes that differ across ranks.
"""

import cupy
import numpy as np
import pytest

from moecomm import reference
from moecomm.constants import StatsFormat
from moecomm.dcp import DcpAlltoAll, decode_cp_a2a_alltoall, lse_combine
from moecomm.errors import PeerTimeoutError
from moecomm.mapping import Mapping
from moecomm.strided import common_stride
from moecomm.symmetric import SymmetricBuffer
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, cuda_torch, dtype_label, host_dtype, main, zeros
from tests.mpi import case

DTYPES = ("bf16", "fp16")
MAX_ROWS = 4096  # rows of head_dim 128, stats 2 per call


def workspace(ctx):
    """The job's workspace: its cases run in sequence on this one object."""
    return ctx.shared("dcp", lambda: DcpAlltoAll(ctx.group, max_rows=MAX_ROWS, head_dim=128,
                                                 stats_dim=2, dtype=bfloat16))


def fresh_inputs(ctx, lead, d, s, dtype, specials=True):
    """Every rank's (partial_o [*lead, cp, d], softmax_stats [*lead, cp, s]) as host arrays
    (bf16 as uint16 bits), the same lists on every rank; with -0.0, inf and NaN."""
    cp = ctx.world
    os_, sts = [], []
    for rng in ctx.rank_rngs():
        o = rng.standard_normal((*lead, cp, d)).astype(np.float32) * 4
        st = rng.standard_normal((*lead, cp, s)).astype(np.float32) * 10
        if specials and o.size > 8:
            o.reshape(-1)[::13] = -0.0
            o.reshape(-1)[5::97] = np.inf
            st.reshape(-1)[::7] = -0.0
            st.reshape(-1)[3::11] = -np.inf
            st.reshape(-1)[4::29] = np.nan
        os_.append(reference.cast_from_float32(o, dtype))
        sts.append(st)
    return os_, sts


def device_pair(ctx, o, st):
    return ctx.device(o), ctx.device(st)


def raw(a: cupy.ndarray) -> cupy.ndarray:
    return cupy.ndarray(a.shape, {2: np.uint16, 4: np.uint32}[a.itemsize], a.data)


def poison(a: cupy.ndarray) -> cupy.ndarray:
    """Fill with a NaN pattern (0x7FFF halves or 0x7FFF7FFF words), in place."""
    raw(a).fill(0x7FFF7FFF if a.itemsize == 4 else 0x7FFF)
    return a


def poisoned(shape, dtype):
    return poison(zeros(shape, dtype))


def upload(dst: cupy.ndarray, host: np.ndarray) -> None:
    """Host bits (bf16 as uint16) into an existing device array of the same itemsize."""
    raw(dst).set(np.ascontiguousarray(host).view(raw(dst).dtype))


def check_exchange(ctx, got, os_, sts, what):
    """(o_out, stats_out) equal the reference bit for bit on this rank."""
    want_o, want_st = reference.dcp_alltoall(os_, sts)
    go, gs = bits(ctx.host(got[0])), bits(ctx.host(got[1]))
    wo, ws = bits(want_o[ctx.rank]), bits(want_st[ctx.rank])
    assert go.shape == wo.shape and gs.shape == ws.shape, (what, go.shape, wo.shape)
    bad = np.flatnonzero(go.reshape(-1) != wo.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} of {go.size} output elements differ, first {bad[:5]}"
    bad = np.flatnonzero(gs.reshape(-1) != ws.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} of {gs.size} stats differ, first {bad[:5]}"


def check_combine(ctx, out, lse, o, st, fmt, dtype, what):
    """The GPU combine within one ulp (and a little) of the reference."""
    want, want_lse = reference.lse_combine(o, st, fmt, dtype)
    got = reference.to_float32(ctx.host(out).view(host_dtype(dtype)))
    want = reference.to_float32(want)
    ulp = 2.0 ** (-7 if dtype == bfloat16 else -10)
    tol = ulp * np.abs(want) + 1e-6
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = np.flatnonzero(~(np.abs(got - want) <= tol).reshape(-1))
    assert bad.size == 0, (f"{what}: {bad.size} outputs differ, first {bad[:5]}: "
                           f"{got.reshape(-1)[bad[:3]]} vs {want.reshape(-1)[bad[:3]]}")
    if lse is not None:
        got_lse = ctx.host(lse)
        same_inf = np.isinf(want_lse) & (got_lse == want_lse)
        close = np.abs(got_lse - want_lse) <= 1e-5 * np.abs(want_lse) + 1e-5
        assert np.all(same_inf | close), f"{what}: lse {got_lse[~(same_inf | close)][:3]}"


# ------------------------------------------------------------------------ the exchange
SHAPES = {  # leading dims, D, S
    "decode": ((4, 32), 128, 2),
    "one_row": ((), 128, 2),
    "odd": ((3, 5), 64, 6),
    "narrow": ((7,), 8, 4),
    "wide_stats": ((2, 3), 256, 8),
    "full": ((32, 128), 128, 2),  # MAX_ROWS rows
}


@case(dtypes=DTYPES)
def exact(ctx, dtype):
    """Every shape, fresh inputs, poisoned outputs; out= given and not; in place; the
    inputs are left as they were."""
    with ctx.stream:  # inputs and poisoned outputs made on the op's stream
        ws = workspace(ctx)
        for tag, (lead, d, s) in SHAPES.items():
            os_, sts = fresh_inputs(ctx, lead, d, s, dtype)
            o, st = device_pair(ctx, os_[ctx.rank], sts[ctx.rank])
            out = (poisoned(o.shape, o.dtype), poisoned(st.shape, np.float32))
            got = ws.alltoall(o, st, out=out, stream=ctx.stream)
            assert got[0] is out[0] and got[1] is out[1]
            check_exchange(ctx, got, os_, sts, f"{dtype_label(dtype)} {tag}")
            got = decode_cp_a2a_alltoall(o, st, ws, stream=ctx.stream)
            check_exchange(ctx, got, os_, sts, f"{dtype_label(dtype)} {tag} new outputs")
            assert np.array_equal(bits(ctx.host(o)), bits(os_[ctx.rank])), f"{tag}: input modified"
            ws.alltoall(o, st, out=(o, st), stream=ctx.stream)
            check_exchange(ctx, (o, st), os_, sts, f"{dtype_label(dtype)} {tag} in place")
        ws.check(ctx.stream)


@case
def ragged_batches(ctx):
    """Many calls in a row on one workspace: batch sizes up and down (1 to 256 x 8 heads),
    both dtypes alternating, fresh data each call."""
    with ctx.stream:  # inputs and poisoned outputs made on the op's stream
        ws = workspace(ctx)
        for i, batch in enumerate((1, 256, 3, 17, 255, 1, 64, 2, 129, 5, 31)):
            dtype = (bfloat16, np.dtype(np.float16))[i % 2]
            os_, sts = fresh_inputs(ctx, (batch, 8), 128, 2, dtype)
            o, st = device_pair(ctx, os_[ctx.rank], sts[ctx.rank])
            out = (poisoned(o.shape, o.dtype), poisoned(st.shape, np.float32))
            ws.alltoall(o, st, out=out, stream=ctx.stream)
            check_exchange(ctx, out, os_, sts, f"call {i} batch {batch} {dtype_label(dtype)}")
        ws.check(ctx.stream)


@case
def empty_batch(ctx):
    """Zero rows: nothing to exchange, no launch; the next call is still in step."""
    ws = workspace(ctx)
    o = zeros((0, 8, ctx.world, 128), bfloat16)
    st = zeros((0, 8, ctx.world, 2), np.float32)
    got = ws.alltoall(o, st, stream=ctx.stream)
    assert got[0].shape == o.shape and got[1].shape == st.shape
    os_, sts = fresh_inputs(ctx, (2, 8), 128, 2, bfloat16)
    got = ws.alltoall(*device_pair(ctx, os_[ctx.rank], sts[ctx.rank]), stream=ctx.stream)
    check_exchange(ctx, got, os_, sts, "after an empty call")


@case(dtypes=DTYPES)
def graph_replay(ctx, dtype):
    """Six exchanges (ragged shapes) and a combine after each, captured once, replayed three
    times on fresh inputs with poisoned outputs."""
    ws = workspace(ctx)
    shapes = [(1, 32), (9, 32), (64, 16), (2, 128), (5, 3), (256, 8)]
    cp = ctx.world
    ins = [(zeros((*s, cp, 128), dtype), zeros((*s, cp, 2), np.float32)) for s in shapes]
    outs = [(zeros((*s, cp, 128), dtype), zeros((*s, cp, 2), np.float32)) for s in shapes]
    comb = [(zeros((*s, 128), dtype), zeros(s, np.float32)) for s in shapes]
    stream = ctx.stream
    with stream:
        stream.begin_capture()
        for i in range(len(shapes)):
            ws.alltoall(*ins[i], out=outs[i], stream=stream)
            lse_combine(*outs[i], StatsFormat.LSE, out=comb[i][0], lse_out=comb[i][1],
                        stream=stream)
        graph = stream.end_capture()
    for replay in range(3):
        data = [fresh_inputs(ctx, s, 128, 2, dtype, specials=False) for s in shapes]
        for i in range(len(shapes)):
            upload(ins[i][0], data[i][0][ctx.rank])
            upload(ins[i][1], data[i][1][ctx.rank])
            for a in (*outs[i], *comb[i]):
                poison(a)
        cupy.cuda.runtime.deviceSynchronize()
        graph.launch(stream)
        stream.synchronize()
        for i, s in enumerate(shapes):
            os_, sts = data[i]
            check_exchange(ctx, outs[i], os_, sts, f"replay {replay} call {i} {s}")
            want_o, want_st = reference.dcp_alltoall(os_, sts)
            check_combine(ctx, comb[i][0], comb[i][1], want_o[ctx.rank], want_st[ctx.rank],
                          StatsFormat.LSE, dtype, f"replay {replay} combine {i}")
    ws.check(stream)


# ------------------------------------------------------------------------ the combine
@case(variants={f"{f.name.lower()}-{d}": (f, d) for f in StatsFormat for d in DTYPES})
def combine(ctx, variant):
    """The exchange, then the combine, in every stats format: shards with no keys (-inf,
    a zero sum; their partials NaN), a row where no shard has keys, large and small LSE
    spreads."""
    fmt, dname = variant
    dtype = bfloat16 if dname == "bf16" else np.dtype(np.float16)
    ws = workspace(ctx)
    lead, d, s = (6, 16), 128, 4
    cp = ctx.world
    os_, sts = [], []
    for rng in ctx.rank_rngs():
        o = rng.standard_normal((*lead, cp, d)).astype(np.float32)
        st = np.full((*lead, cp, s), np.nan, np.float32)  # entries past the format's: ignored
        spread = rng.choice([0.1, 3.0, 40.0], (*lead, 1))
        first = (rng.standard_normal((*lead, cp)) * spread).astype(np.float32)
        empty = rng.random((*lead, cp)) < 0.2
        empty[0, 0] = True  # row (0, 0): no shard has keys, on every rank
        if fmt == StatsFormat.MAX_SUMEXP:
            st[..., 0] = first
            st[..., 1] = np.where(empty, 0.0, rng.uniform(0.5, 50.0, (*lead, cp)))
        else:
            st[..., 0] = np.where(empty, -np.inf, first)
        o[empty] = np.nan  # a partial without weight never reaches the output
        os_.append(reference.cast_from_float32(o, dtype))
        sts.append(st)
    o, st = device_pair(ctx, os_[ctx.rank], sts[ctx.rank])
    o_out, st_out = ws.alltoall(o, st, stream=ctx.stream)
    check_exchange(ctx, (o_out, st_out), os_, sts, f"{fmt.name} exchange")
    want_o, want_st = reference.dcp_alltoall(os_, sts)
    with ctx.stream:  # poisoned on the op's stream, not the unordered default one
        out = poisoned((*lead, d), dtype)
    got, lse = lse_combine(o_out, st_out, fmt, out=out, return_lse=True, stream=ctx.stream)
    assert got is out
    check_combine(ctx, got, lse, want_o[ctx.rank], want_st[ctx.rank], fmt, dtype, fmt.name)
    only = lse_combine(o_out, st_out, int(fmt), stream=ctx.stream)
    assert isinstance(only, cupy.ndarray) and only.shape == (*lead, d)
    check_combine(ctx, only, None, want_o[ctx.rank], want_st[ctx.rank], fmt, dtype,
                  f"{fmt.name} no lse")


# ------------------------------------------------------------------------ errors
@case
def bad_input(ctx):
    """Clear errors before any launch; afterwards the ranks are still in step."""
    ws = workspace(ctx)
    cp = ctx.world
    o = zeros((4, cp, 128), bfloat16)
    st = zeros((4, cp, 2), np.float32)
    with pytest.raises(ValueError, match=f"cp_size={cp}"):
        ws.alltoall(zeros((4, cp + 1, 128), bfloat16), zeros((4, cp + 1, 2), np.float32))
    with pytest.raises(ValueError, match="S=3 must be even"):
        ws.alltoall(o, zeros((4, cp, 3), np.float32))
    with pytest.raises(ValueError, match="D=4 x 2 bytes"):
        ws.alltoall(zeros((4, cp, 4), bfloat16), st)
    with pytest.raises(TypeError, match="partial_o: dtype float32"):
        ws.alltoall(zeros((4, cp, 128), np.float32), st)
    with pytest.raises(TypeError, match="softmax_stats: dtype float16"):
        ws.alltoall(o, zeros((4, cp, 2), np.float16))
    with pytest.raises(ValueError, match="softmax_stats: shape"):
        ws.alltoall(o, zeros((5, cp, 2), np.float32))
    with pytest.raises(ValueError, match="exceed the workspace"):
        ws.alltoall(zeros((MAX_ROWS + 1, cp, 128), bfloat16),
                    zeros((MAX_ROWS + 1, cp, 2), np.float32))
    with pytest.raises(ValueError, match="16-byte aligned"):
        ws.alltoall(zeros(4 * cp * 128 + 4, bfloat16)[4:].reshape(4, cp, 128), st)
    with pytest.raises(ValueError, match="out\\[0\\]"):
        ws.alltoall(o, st, out=(zeros((3, cp, 128), bfloat16), st))
    with pytest.raises(TypeError, match="out: expected a pair"):
        ws.alltoall(o, st, out=o)
    with pytest.raises(ValueError, match="must be C-contiguous"):
        ws.alltoall(zeros((cp, 4, 128), bfloat16).transpose(1, 0, 2), st)
    with pytest.raises(ValueError, match="stats_format"):
        lse_combine(o, st, 7)
    with pytest.raises(ValueError, match="out"):
        lse_combine(o, st, out=zeros((4, 64), bfloat16))
    with pytest.raises(ValueError, match="lse_out"):
        lse_combine(o, st, lse_out=zeros((5,), np.float32))
    # outputs overlapping the inputs other than in place (one row off), and a combine
    # writing over what it reads
    buf = zeros((5, cp, 128), bfloat16)
    with pytest.raises(ValueError, match=r"out\[0\] \(o_out\): overlaps the inputs"):
        ws.alltoall(buf[:4], st, out=(buf[1:], zeros((4, cp, 2), np.float32)))
    with pytest.raises(ValueError, match=r"out\[1\] \(stats_out\): overlaps the inputs"):
        over_o = o.reshape(-1).view(np.float32)[:4 * cp * 2].reshape(4, cp, 2)
        ws.alltoall(o, st, out=(zeros((4, cp, 128), bfloat16), over_o))
    with pytest.raises(ValueError, match="out: overlaps partial_o"):
        lse_combine(o, st, out=o.reshape(-1)[:4 * 128].reshape(4, 128))
    with pytest.raises(TypeError, match="config"):
        lse_combine(o, st, config=object())
    os_, sts = fresh_inputs(ctx, (4,), 128, 2, bfloat16)
    got = ws.alltoall(*device_pair(ctx, os_[ctx.rank], sts[ctx.rank]), stream=ctx.stream)
    check_exchange(ctx, got, os_, sts, "after refused calls")


@case
def torch_tensors(ctx):
    """PyTorch tensors in, PyTorch out= (poisoned) back as themselves, for the exchange
    and the combine; both against the reference."""
    torch = cuda_torch()
    ws = workspace(ctx)
    dev = f"cuda:{cupy.cuda.runtime.getDevice()}"
    os_, sts = fresh_inputs(ctx, (3, 8), 128, 2, np.float16, specials=False)
    o = torch.from_numpy(os_[ctx.rank]).to(dev)
    st = torch.from_numpy(sts[ctx.rank]).to(dev)
    out = (torch.full_like(o, float("nan")), torch.full_like(st, float("nan")))
    torch.cuda.synchronize()
    got = ws.alltoall(o, st, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    torch.cuda.synchronize()
    check_exchange(ctx, (cupy.from_dlpack(out[0]), cupy.from_dlpack(out[1])), os_, sts, "torch")
    comb_out = torch.full((3, 8, 128), float("nan"), dtype=torch.float16, device=dev)
    assert lse_combine(out[0], out[1], out=comb_out) is comb_out
    torch.cuda.synchronize()
    want_o, want_st = reference.dcp_alltoall(os_, sts)
    check_combine(ctx, cupy.from_dlpack(comb_out), None, want_o[ctx.rank], want_st[ctx.rank],
                  StatsFormat.LSE, np.float16, "torch combine")


@case
def mapping_group(ctx):
    """A Mapping's cp group: the whole job as one CP group."""
    mapping = Mapping(world_size=ctx.world, rank=ctx.rank, gpus_per_node=ctx.world,
                      cp_size=ctx.world)
    with DcpAlltoAll(mapping, max_rows=64, head_dim=64, stats_dim=2,
                     dtype=np.float16) as ws:
        assert ws.cp_size == ctx.world and ws.cp_rank == ctx.rank
        os_, sts = fresh_inputs(ctx, (16,), 64, 2, np.float16)
        got = ws.alltoall(*device_pair(ctx, os_[ctx.rank], sts[ctx.rank]), stream=ctx.stream)
        check_exchange(ctx, got, os_, sts, "mapping group")
        ws.check(ctx.stream)


@case
def closed(ctx):
    """A closed workspace refuses calls."""
    ws = workspace(ctx)
    ctx.drop("dcp")
    ws.close()
    with pytest.raises(RuntimeError, match="closed"):
        ws.alltoall(zeros((1, ctx.world, 128), bfloat16),
                    zeros((1, ctx.world, 2), np.float32))
    ws.close()  # twice is harmless


@case(own_job=True, ranks=(2, 3))
def missing_peer_times_out(ctx):
    """Rank 1 skips one call: the other ranks' kernels give up and name rank 1."""
    ws = DcpAlltoAll(ctx.group, max_rows=64, head_dim=128, timeout_s=0.5)
    o = cupy.ones((8, ctx.world, 128), bfloat16)
    st = cupy.ones((8, ctx.world, 2), np.float32)
    ws.alltoall(o, st)
    ws.check()
    if ctx.rank != 1:
        ws.alltoall(o, st)
        with pytest.raises(PeerTimeoutError, match="rank 1 never arrived") as info:
            ws.check()
        assert info.value.rank == 1
        with pytest.raises(PeerTimeoutError, match="rank 1"):
            ws.alltoall(o, st)
    ctx.group.barrier()
    ws.close()


@case(own_job=True, ranks=(2,), env={"MOECOMM_DEBUG": "1"})
def debug_mode_catches_mismatched_shapes(ctx):
    """MOECOMM_DEBUG=1: shapes that differ across ranks raise on every rank, before any
    launch; the workspace stays usable."""
    import moecomm

    assert moecomm.group.DEBUG
    with DcpAlltoAll(ctx.group, max_rows=64, head_dim=128) as ws:
        rows = 4 + ctx.rank
        with pytest.raises(ValueError, match="differ across ranks"):
            ws.alltoall(cupy.ones((rows, ctx.world, 128), bfloat16),
                        cupy.ones((rows, ctx.world, 2), np.float32))
        os_, sts = fresh_inputs(ctx, (4,), 128, 2, bfloat16)
        got = ws.alltoall(*device_pair(ctx, os_[ctx.rank], sts[ctx.rank]), stream=ctx.stream)
        check_exchange(ctx, got, os_, sts, "after a refused call")


# ------------------------------------------------------------------------ strided views
@case
def strided_views(ctx):
    """strided_view over one rank's buffer against plain views of the same bytes; a round
    trip through DLPack (CuPy, and torch when importable) keeps address and strides;
    writes through the torch view land in the buffer. peer_view: every rank's data when
    the mappings are equally strided, else the documented refusal."""
    group, rank, n = ctx.group, ctx.group.local_rank, ctx.group.local_size
    seg, stride, count = 48, 128, 5  # bytes: 12 fp32 per segment
    with SymmetricBuffer(group, 4096) as buf:
        data = [np.random.default_rng([ctx.seed, r]).standard_normal(1024).astype(np.float32)
                for r in range(n)]
        buf.view(np.float32, (1024,))[...] = cupy.asarray(data[rank])
        cupy.cuda.runtime.deviceSynchronize()
        group.local_barrier()
        for r in range(n):
            v = buf.strided_view(np.float32, seg, stride, count, offset=256, rank=r)
            assert v.shape == (count, seg // 4) and v.strides == (stride, 4)
            assert v.data.ptr == buf.ptrs[r] + 256
            want = np.stack([data[r][64 + i * 32: 64 + i * 32 + 12] for i in range(count)])
            assert np.array_equal(v.get(), want), f"strided view of rank {r}"
            if r == rank:  # a peer's mapping may report the peer's device through DLPack
                back = cupy.from_dlpack(v)
                assert back.data.ptr == v.data.ptr and back.strides == v.strides
                assert np.array_equal(back.get(), want)
        with pytest.raises(ValueError, match="exceeds"):
            buf.strided_view(np.float32, seg, stride, count, offset=4096 - 512)
        with pytest.raises(ValueError, match="overlap"):
            buf.strided_view(np.float32, 64, 32, 2)
        torch = cuda_torch()  # the view through DLPack into torch, written there
        v = buf.strided_view(np.float32, seg, stride, count)
        t = torch.from_dlpack(v)
        assert t.data_ptr() == buf.ptr and t.stride() == (stride // 4, 1)
        assert np.array_equal(t.cpu().numpy(), v.get())
        t.fill_(float(rank + 7))
        torch.cuda.synchronize()
        own = buf.view(np.float32, (1024,)).get()
        for i in range(count):
            assert np.all(own[i * 32: i * 32 + 12] == rank + 7)
            assert np.array_equal(own[i * 32 + 12: (i + 1) * 32], data[rank][i * 32 + 12: (i + 1) * 32])
        cupy.cuda.runtime.deviceSynchronize()
        group.local_barrier()
        buf.view(np.float32, (1024,))[...] = cupy.asarray(data[rank])
        cupy.cuda.runtime.deviceSynchronize()
        group.local_barrier()
        if n > 1 and common_stride(buf.ptrs) is None:  # refused exactly when uneven
            with pytest.raises(ValueError, match="not at equal strides"):
                buf.peer_view(np.float32, (4, 8), offset=64)
        else:
            pv = buf.peer_view(np.float32, (4, 8), offset=64)
            assert pv.shape == (n, 4, 8)
            got = pv.get()
            for r in range(n):
                assert np.array_equal(got[r].reshape(-1), data[r][16:48]), f"peer_view rank {r}"
        cupy.cuda.runtime.deviceSynchronize()
        group.local_barrier()


if __name__ == "__main__":
    main()
