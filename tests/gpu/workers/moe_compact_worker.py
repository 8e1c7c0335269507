"""EPAllToAll (compact expert-major layout) on every rank, against moecomm.reference.

Every rank builds every rank's inputs from a shared seed, computes the reference of the
whole exchange and checks its own part, bit for bit: the exact combine against
``ep_combine_compact``, the local combine against the two-level sum built from it (each
rank's slots summed and rounded, then the ranks summed in order). Outputs and buffers are
poisoned first (``EPAllToAll.poison()``: all-0xFF bytes), while no peer uses them (between
barriers); the spare row past the capacity (``overrun_guard()``) must stay poisoned. The
cases of one layer run in sequence on it. Ranks may share a GPU.
"""

import cupy
import numpy as np
import pytest

import moecomm
from moecomm import reference as ref
from moecomm.errors import PeerTimeoutError
from moecomm.moe import CapacityError, EPAll2AllLayer, EPAllToAll
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import all_bytes, bits, host_dtype, main, raw, zeros
from tests.mpi import case, dtype_of

EPR = 3  # experts per rank
TOP_K = 6  # not a multiple of 4: 24-byte id rows (MoeAlltoAll word path)
H = 128
MAX_T = 40
NAN = {np.dtype(np.uint16): 0x7FC1, np.dtype(np.float16): np.float16(np.nan),
       np.dtype(np.float32): np.float32(np.nan)}
POISON = {1: 0xA5, 2: 0x7FC1, 4: 0x7FC00001}  # bit patterns: NaN in bf16, fp16 and fp32


# ---------------------------------------------------------------- inputs and reference
class Exchange:
    """Every rank's tokens, routing and weights for ``ep`` ranks (``EPR * ep`` experts).

    mode: random | zero (rank 0 has no tokens) | none (no rank has tokens) | one_expert
    (every valid id is the last expert) | dup (slots 1 and 3 repeat slots 0 and 2) |
    all_invalid (one rank routes nowhere) | full (MAX_T tokens everywhere).
    weights: all | none | mixed (even ranks only).
    """

    def __init__(self, ctx, seed, ep=None, mode="random", weights="all", x_dtype=np.uint16,
                 T=None, top_k=TOP_K):
        self.ctx = ctx
        ep = ctx.group.local_size if ep is None else ep
        self.ep, self.E = ep, EPR * ep
        rng = np.random.default_rng(seed)
        if T is None:
            T = [int(rng.integers(1, MAX_T + 1)) for _ in range(ep)]
        T = list(T)
        if mode == "zero":
            T[0] = 0
        if mode == "none":
            T = [0] * ep
        if mode == "full":
            T = [MAX_T] * ep
        self.T = T
        self.ids, self.x, self.w, self.w_given = [], [], [], []
        for s in range(ep):
            t = T[s]
            ids = rng.integers(0, self.E, (t, top_k)).astype(np.int32)
            if mode == "one_expert":
                ids[:] = self.E - 1
            if mode == "dup":
                ids[:, 1], ids[:, 3] = ids[:, 0], ids[:, 2]
            bad = rng.random((t, top_k)) < 0.12
            ids[bad] = rng.choice(np.array([-1, -100, self.E, self.E + 7], np.int32), bad.sum())
            if mode == "all_invalid" and s == min(1, ep - 1):
                ids[:] = -1
            x32 = rng.standard_normal((t, H)).astype(np.float32)
            x = ref.cast_from_float32(x32, x_dtype)
            w = rng.standard_normal((t, top_k)).astype(np.float32)
            given = weights == "all" or (weights == "mixed" and s % 2 == 0)
            self.ids.append(ids)
            self.x.append(x)
            self.w.append(w if given else np.ones_like(w))
            self.w_given.append(given)
        # weights=None means weight 1.0: the reference gets ones for those ranks
        self.xr, self.wr, self.lay = ref.ep_dispatch_compact(self.x, self.ids, self.w, self.E, ep)

    def inputs(self, r):
        ids, x = self.ctx.device(self.ids[r]), self.ctx.device(self.x[r])
        w = self.ctx.device(self.w[r]) if self.w_given[r] else None
        return x, ids, w

    def outputs(self, dtype, cap):
        """Expert outputs per rank: (device-side [cap, H] with NaN rows past what is held,
        reference-side [R, H] with the dropped rows zeroed, i.e. contributing nothing)."""
        dtype = host_dtype(dtype)
        dev, refs = [], []
        for r in range(self.ep):
            R = self.xr[r].shape[0]
            S = min(R, cap)
            ge = (self.lay.local_expert[r] + r * EPR).astype(np.float32)[:, None]
            slot = self.lay.src[r][:, 2:3].astype(np.float32)
            y32 = ref.to_float32(self.xr[r]) * (np.float32(0.75) + np.float32(0.125) * ge)
            y32 = y32 + np.float32(0.01) * slot
            y = ref.cast_from_float32(y32, dtype)
            full = np.full((cap, H), NAN[dtype], dtype)
            full[:S] = y[:S]
            y[S:] = 0
            dev.append(full)
            refs.append(y)
        return dev, refs

    def combine_ref(self, ys, apply, local):
        if not local:
            return ref.ep_combine_compact(ys, self.lay, apply_weights=apply)
        outs = []
        for s in range(self.ep):
            acc = np.zeros((self.T[s], H), np.float32)
            for r in range(self.ep):  # rank r's slots alone, rounded: its partial
                masked = [y if q == r else np.zeros_like(y) for q, y in enumerate(ys)]
                part = ref.ep_combine_compact(masked, self.lay, apply_weights=apply)[s]
                acc = acc + ref.to_float32(part)
            outs.append(ref.cast_from_float32(acc, ys[0].dtype))
        return outs


def check_dispatch(ctx, layer, exchange, out, what):
    """recv_x, weights, src, tokens_per_expert, offsets, counts and the guard row."""
    r, cap, stream = layer.ep_rank, layer.capacity, ctx.stream
    recv_x, recv_w, lay = out
    R = exchange.xr[r].shape[0]
    S = min(R, cap)
    assert lay.num_rows_host(stream) == S, (what, lay.num_rows_host(stream), S)
    assert (int(ctx.host(lay.num_needed)[0]), int(ctx.host(lay.num_dropped)[0])) == (R, R - S), \
        what
    assert recv_x.shape == (cap, H) and recv_w.shape == (cap,), what
    assert np.array_equal(bits(ctx.host(recv_x)[:S]), bits(exchange.xr[r][:S])), f"{what}: recv_x"
    assert np.array_equal(bits(ctx.host(recv_w)[:S]), bits(exchange.wr[r][:S])), \
        f"{what}: weights"
    assert np.array_equal(ctx.host(lay.src)[:S], exchange.lay.src[r][:S]), f"{what}: src"
    tpe = np.bincount(exchange.lay.local_expert[r][:S], minlength=EPR).astype(np.int32)
    assert np.array_equal(lay.tokens_per_expert_host(stream), tpe), (what, tpe)
    assert np.array_equal(ctx.host(out.tokens_per_expert), tpe), what
    assert np.array_equal(ctx.host(lay.expert_offsets), np.concatenate([[0], np.cumsum(tpe)])), \
        what
    row, src, weight = layer.overrun_guard()
    assert row.shape == (1, H) and src.shape == (1, 3) and weight.shape == (1,), what
    assert all_bytes(ctx.host(row), 0xFF), f"{what}: row past the capacity written"
    assert all_bytes(ctx.host(src), 0xFF), f"{what}: src past the capacity written"
    assert all_bytes(ctx.host(weight), 0xFF), f"{what}: weight past the capacity written"


# ---------------------------------------------------------------- one dispatch + combine
def run_pair(ctx, layer, exchange, *, apply=False, zero_copy=False, use_out=False,
             between=None, rmax=None):
    r, cap, stream = layer.ep_rank, layer.capacity, ctx.stream
    what = (f"T={exchange.T} local={layer.local_combine} apply={apply} zero_copy={zero_copy} "
            f"cap={cap}")
    ctx.poison(layer)
    x, ids, w = exchange.inputs(r)
    out = layer.dispatch(x, ids, w, stream=stream, runtime_max_tokens_per_rank=rmax)
    lay = out.layout
    check_dispatch(ctx, layer, exchange, out, what)
    if between is not None:
        between(ctx, layer, out)

    ys_dev, ys_ref = exchange.outputs(layer.combine_dtype, cap)
    want = exchange.combine_ref(ys_ref, apply, layer.local_combine)[r]
    if zero_copy:
        y = layer.get_combine_input_tensor_in_workspace()
        with stream:
            raw(y)[...] = cupy.asarray(bits(ys_dev[r]))
    else:
        y = ctx.device(ys_dev[r], bf16=layer.combine_dtype == bfloat16)
    dst = None
    if use_out:
        dst = zeros((exchange.T[r], H), layer.combine_dtype)
        raw(dst).fill(POISON[dst.itemsize])
    got = layer.combine(y, lay, apply_weights=apply, stream=stream, out=dst)
    if dst is not None:
        assert got.data.ptr == dst.data.ptr, what
    got = ctx.host(got)
    assert got.shape == (exchange.T[r], H) and got.dtype == want.dtype, (what, got.shape, got.dtype)
    diff = np.argwhere(bits(got) != bits(want))
    assert diff.size == 0, f"combine {what}: {diff.shape[0]} differ, first {diff[:4].tolist()}"
    layer.check_error(stream, synchronize=True)
    return lay


def bad_calls_between(ctx, layer, out):
    """Wrong calls between a dispatch and its combine: clear errors, nothing launched."""
    lay, cap = out.layout, layer.capacity
    x, ids = zeros((1, H), layer.dtype), cupy.zeros((1, TOP_K), np.int32)
    yd = layer.combine_dtype
    ok = cupy.zeros((cap, H), np.float32 if yd != np.float32 else np.float16)
    with ctx.stream:
        with pytest.raises(RuntimeError, match="twice without combine"):
            layer.dispatch(x, ids)
        with pytest.raises(ValueError, match="y: shape"):
            layer.combine(zeros((cap + 1, H), yd), lay)
        with pytest.raises(ValueError, match="y: shape"):
            layer.combine(zeros((cap, H + 8), yd), lay)
        with pytest.raises(TypeError, match="y: dtype"):
            layer.combine(ok, lay)
        with pytest.raises(TypeError, match="apply_weights must be a bool"):
            layer.combine(layer.recv_x, lay, apply_weights=1)
        with pytest.raises(TypeError, match="EPLayout"):
            layer.combine(layer.recv_x, None)
        with pytest.raises(ValueError, match="out: shape"):
            layer.combine(layer.get_combine_input_tensor_in_workspace(), lay,
                          out=zeros((lay.num_tokens + 1, H), yd))
        big = zeros((cap + 1, H), yd)  # views 8 bytes into it are misaligned
        with pytest.raises(ValueError, match="y: address .* not 16-byte aligned"):
            layer.combine(cupy.ndarray((cap, H), yd, big.data + 8), lay)
        with pytest.raises(ValueError, match="out: address .* not 16-byte aligned"):
            layer.combine(layer.get_combine_input_tensor_in_workspace(), lay,
                          out=cupy.ndarray((lay.num_tokens, H), yd, big.data + 8))
        if not layer.local_combine:  # a view 16 bytes into the exchange buffer
            part = layer.get_combine_input_tensor_in_workspace()
            shifted = cupy.ndarray((cap, H), yd, part.data + 16)
            with pytest.raises(ValueError, match="overlaps"):
                layer.combine(shifted, lay)


def graph_replay(ctx, layer, zero_copy):
    """dispatch + round-trip combine captured once, replayed with new routings."""
    r, stream, seed = layer.ep_rank, ctx.stream, ctx.new_seed()
    base = Exchange(ctx, seed)
    x, ids, w = (ctx.device(a) for a in (base.x[r], base.ids[r], base.w[r]))
    out = ctx.device(np.zeros((base.T[r], H), np.uint16))
    y_ws = layer.get_combine_input_tensor_in_workspace()
    with stream:  # compile CuPy's copy kernel outside the capture (peers may read y_ws)
        a = cupy.zeros(4, np.uint16)
        a[...] = cupy.ones(4, np.uint16)
    ctx.poison(layer)
    with stream:
        stream.begin_capture()
        res = layer.dispatch(x, ids, w, stream=stream)
        y = res.recv_x
        if zero_copy:
            raw(y_ws)[...] = raw(res.recv_x)
            y = y_ws
        got = layer.combine(y, res.layout, apply_weights=True, stream=stream, out=out)
        graph = stream.end_capture()
    assert got.data.ptr == out.data.ptr
    for i in range(3 if not layer.local_combine else 2):
        exchange = Exchange(ctx, seed + 100 + i, T=base.T)  # same token counts, new everything else
        ctx.poison(layer)
        with stream:
            for d, h in zip((x, ids, w), (exchange.x[r], exchange.ids[r], exchange.w[r])):
                raw(d)[...] = cupy.asarray(bits(h))
            raw(out).fill(POISON[2])
        graph.launch(stream)
        check_dispatch(ctx, layer, exchange, res, f"graph replay {i}")
        ys = exchange.xr  # the round trip: y is recv_x itself
        want = exchange.combine_ref(ys, True, layer.local_combine)[r]
        assert np.array_equal(ctx.host(out), want), f"graph replay {i}: combine"


# ---------------------------------------------------------------- the cases
@case
def constructor_errors(ctx):
    n = ctx.group.local_size
    with pytest.raises(ValueError, match="not a multiple of the ep size"):
        EPAllToAll(ctx.group, MAX_T, TOP_K, EPR * n + 1, H)
    with pytest.raises(ValueError, match="experts per rank exceed"):
        EPAllToAll(ctx.group, MAX_T, TOP_K, 1025 * n, H)
    split = moecomm.ProcessGroup(gpus_per_node=1)  # every rank its own declared node
    split.device_id = ctx.group.device_id
    try:
        with pytest.raises(ValueError, match="spans"):
            EPAllToAll(split, MAX_T, TOP_K, EPR * n, H)
    finally:
        split.close()


def exact_layer(ctx):
    """Exact combine, bf16 in and out, worst-case capacity: the exact_* cases share it."""
    n = ctx.group.local_size
    return ctx.shared("exact", lambda: EPAll2AllLayer(ctx.group, MAX_T, TOP_K, EPR * n, H))


@case
def exact_bad_dispatches(ctx):
    """Attributes, and argument errors before any launch."""
    layer, n = exact_layer(ctx), ctx.group.local_size
    assert isinstance(layer, EPAllToAll) and layer.capacity == n * MAX_T * TOP_K
    assert (layer.ep_rank, layer.ep_size, layer.experts_per_rank) == (ctx.group.local_rank, n,
                                                                        EPR)
    dt = layer.dtype
    ids = cupy.zeros((4, TOP_K), np.int32)
    x = zeros((4, H), dt)
    other = np.float32 if dt != np.float32 else np.float16
    with ctx.stream:
        with pytest.raises(TypeError, match="x: dtype"):
            layer.dispatch(zeros((4, H), other), ids)
        with pytest.raises(ValueError, match="x: shape"):
            layer.dispatch(zeros((4, H + 8), dt), ids)
        with pytest.raises(ValueError, match="x: shape"):
            layer.dispatch(zeros((5, H), dt), ids)
        with pytest.raises(ValueError, match="exceed max_num_tokens"):
            layer.dispatch(zeros((MAX_T + 1, H), dt), cupy.zeros((MAX_T + 1, TOP_K), np.int32))
        with pytest.raises(TypeError, match="topk_ids: dtype int64"):
            layer.dispatch(x, ids.astype(np.int64))
        with pytest.raises(ValueError, match=f"top_k={TOP_K}"):
            layer.dispatch(x, cupy.zeros((4, TOP_K - 1), np.int32))
        with pytest.raises(ValueError, match="weights: shape"):
            layer.dispatch(x, ids, cupy.zeros((4, TOP_K + 1), np.float32))
        with pytest.raises(TypeError, match="weights: dtype float16"):
            layer.dispatch(x, ids, cupy.zeros((4, TOP_K), np.float16))
        with pytest.raises(ValueError, match="exceed runtime_max_tokens_per_rank"):
            layer.dispatch(x, ids, runtime_max_tokens_per_rank=3)
        with pytest.raises(ValueError, match="exceeds max_num_tokens"):
            layer.dispatch(x, ids, runtime_max_tokens_per_rank=MAX_T + 1)
        with pytest.raises(ValueError, match="array is on cpu"):
            layer.dispatch(x, np.zeros((4, TOP_K), np.int32))
        xb = zeros((5, H), dt)
        with pytest.raises(ValueError, match="x: address .* not 4-byte aligned"):
            layer.dispatch(cupy.ndarray((4, H), dt, xb.data + 2), ids)
        with pytest.raises(TypeError, match="EPLayout"):
            layer.combine(layer.recv_x, "layout")


@case
def exact_random_weighted(ctx):
    """Wrong calls between dispatch and combine; the combine consumes the layout."""
    layer = exact_layer(ctx)
    lay = run_pair(ctx, layer, Exchange(ctx, ctx.new_seed()), apply=True,
                   between=bad_calls_between)
    with pytest.raises(RuntimeError, match="dispatch just before"):
        layer.combine(layer.recv_x, lay)  # the layout is not accepted twice


# (Exchange options, run_pair options) per scenario on the exact layer; an ``rmax``
# option is a function of the token counts (runtime_max_tokens_per_rank).
EXACT = {
    "mixed_weights-zero_copy-out": (dict(weights="mixed"),
                                    dict(apply=True, zero_copy=True, use_out=True)),
    "rank0_no_tokens-unweighted": (dict(mode="zero", weights="none"), dict(apply=True)),
    "one_expert-zero_copy": (dict(mode="one_expert"), dict(apply=False, zero_copy=True)),
    "duplicate_slots-out": (dict(mode="dup"), dict(apply=True, use_out=True)),
    "one_rank_all_invalid-rmax": (dict(mode="all_invalid", weights="mixed"),
                                  dict(apply=False, rmax=lambda T: min(max(T) + 3, MAX_T))),
    "full-zero_copy": (dict(mode="full"), dict(apply=True, zero_copy=True)),
}


def with_rmax(pair_kw, exchange):
    """run_pair's options, ``rmax`` evaluated on the exchange's token counts."""
    if "rmax" in pair_kw:
        return dict(pair_kw, rmax=pair_kw["rmax"](exchange.T))
    return pair_kw


@case(variants=EXACT)
def exact(ctx, scenario):
    exchange_kw, pair_kw = scenario
    layer = exact_layer(ctx)
    exchange = Exchange(ctx, ctx.new_seed(), **exchange_kw)
    run_pair(ctx, layer, exchange, **with_rmax(pair_kw, exchange))


@case
def exact_no_tokens_then_graph_replay(ctx):
    """No rank has tokens; then a captured dispatch + combine replayed with new routings
    (zero-copy combine input); the layout of the first pair is stale after it."""
    layer = exact_layer(ctx)
    stale = run_pair(ctx, layer, Exchange(ctx, ctx.new_seed(), mode="none"), apply=True,
                     use_out=True)
    graph_replay(ctx, layer, zero_copy=True)
    with pytest.raises(RuntimeError, match="stale"):
        stale.tokens_per_expert
    layer.check_capacity(ctx.stream)  # nothing dropped
    layer.check_error(ctx.stream, synchronize=True)


@case
def exact_wide_top_k(ctx):
    """top_k 40 and 72: the pull reads a token's slots 32 at a time, 8 loads per round,
    the last round partial; experts repeat within a token (3 per rank). At 72 a source's
    ids (up to 40 x 72) take the expand's count two batches of loads."""
    n = ctx.group.local_size
    for k in (40, 72):
        with EPAllToAll(ctx.group, MAX_T, k, EPR * n, H) as layer:
            seed = ctx.new_seed()
            for i, mode in enumerate(("random", "zero")):
                run_pair(ctx, layer, Exchange(ctx, seed + i, mode=mode, top_k=k), apply=i == 0,
                         zero_copy=i == 1)


@case(own_job=True)
def exact_missing_peer_at_combine_times_out(ctx):
    """Every rank dispatches; the last never combines: the others' exact combine (its own
    handshake) raises PeerTimeoutError naming it."""
    n = ctx.group.local_size
    missing = n - 1  # local rank == group rank: the group is one host's COMM_WORLD
    with EPAllToAll(ctx.group, MAX_T, TOP_K, EPR * n, H, timeout_s=1.0) as layer:
        x, ids, w = Exchange(ctx, ctx.new_seed()).inputs(layer.ep_rank)
        _, _, lay = layer.dispatch(x, ids, w, stream=ctx.stream)
        layer.check_error(ctx.stream, synchronize=True)
        ctx.quiesce()
        if layer.ep_rank != missing:
            layer.combine(layer.get_combine_input_tensor_in_workspace(), lay, stream=ctx.stream)
            with pytest.raises(PeerTimeoutError, match=f"EPAllToAll.combine.*rank {missing} "
                               "never arrived") as info:
                layer.check_error(ctx.stream, synchronize=True)
            assert info.value.rank == missing, info.value.rank


@case
def exact_closed(ctx):
    layer = exact_layer(ctx)
    ctx.drop("exact")
    layer.close()
    with pytest.raises(RuntimeError, match="closed"):
        layer.dispatch(None, None)
    layer.close()  # closing twice is harmless


def local_layer(ctx):
    """local_combine: two-level sum, bf16 in and out; the local_* cases share it."""
    n = ctx.group.local_size
    return ctx.shared("local", lambda: EPAllToAll(ctx.group, MAX_T, TOP_K, EPR * n, H,
                                                  local_combine=True))


# The same for the local-combine layer.
LOCAL = {
    "random-weighted": ({}, dict(apply=True, between=bad_calls_between)),
    "duplicate_slots-mixed_weights-out": (dict(mode="dup", weights="mixed"),
                                          dict(apply=True, use_out=True)),
    "rank0_no_tokens-zero_copy-rmax": (dict(mode="zero"),
                                       dict(apply=False, zero_copy=True, rmax=max)),
    "one_expert-unweighted": (dict(mode="one_expert", weights="none"), dict(apply=True)),
}


@case(variants=LOCAL)
def local(ctx, scenario):
    exchange_kw, pair_kw = scenario
    exchange = Exchange(ctx, ctx.new_seed(), **exchange_kw)
    run_pair(ctx, local_layer(ctx), exchange, **with_rmax(pair_kw, exchange))


@case
def local_graph_replay(ctx):
    graph_replay(ctx, local_layer(ctx), zero_copy=False)


@case(variants={"exact-fp32-fp16": (False, "fp32", "fp16"),
                "local-bf16-fp32": (True, "bf16", "fp32")})
def overflow(ctx, variant):
    """A small capacity: the tail is dropped, counted, raised on request; combine skips it."""
    local, x_name, y_name = variant
    x_dtype, y_dtype = dtype_of(x_name), dtype_of(y_name)
    n, cap = ctx.group.local_size, MAX_T * TOP_K // 2
    with EPAllToAll(ctx.group, MAX_T, TOP_K, EPR * n, H, x_dtype, max_recv_rows=cap,
                    combine_dtype=y_dtype, local_combine=local) as layer:
        assert layer.capacity == cap
        r, hx = layer.ep_rank, host_dtype(x_dtype)
        seed = ctx.new_seed()
        for i, (mode, T) in enumerate((("one_expert", None), ("full", None),
                                        ("random", [2] * n))):  # the last one fits
            exchange = Exchange(ctx, seed + i, mode=mode, x_dtype=hx, T=T)
            lay = run_pair(ctx, layer, exchange, apply=i != 1, zero_copy=not local and i == 0,
                           use_out=i == 1)
            R = exchange.xr[r].shape[0]
            if R > cap:
                with pytest.raises(CapacityError, match=f"the capacity is {cap}") as info:
                    lay.check_capacity(ctx.stream)
                assert (info.value.needed, info.value.capacity) == (R, cap), info.value.needed
                with pytest.raises(CapacityError, match="were dropped"):
                    layer.check_capacity(ctx.stream)
            else:
                lay.check_capacity(ctx.stream)
            layer.check_capacity(ctx.stream)  # nothing since the last check (record reset)


@case
def mapping_groups(ctx):
    """A Mapping's moe_ep groups (two of 2 ranks with 4 ranks) side by side."""
    n = ctx.group.local_size
    ep = n // 2 if n % 4 == 0 else n
    mapping = moecomm.Mapping.from_group(ctx.group, moe_ep_size=ep)
    with EPAllToAll(mapping, MAX_T, TOP_K, EPR * ep, H) as layer:
        assert (layer.ep_rank, layer.ep_size) == (mapping.moe_ep_rank, ep)
        seed = ctx.new_seed() + mapping.moe_ep_group[0]
        run_pair(ctx, layer, Exchange(ctx, seed, ep=ep, mode="dup"), apply=True)


if __name__ == "__main__":
    main()
