"""MoE prepare/finalize (both paths, no-DP, NVFP4 / FP8 / unquantized) end to end across
real ranks, against moecomm.reference (ranks may share a GPU; NCCL cases need one each).

The MoE layer is checkable exactly: expert e multiplies its input by ``expert_scale[e]``
(a power of two), top-k weights are powers of two and activations bf16 (or their NVFP4
dequantization with a power-of-two global scale), so every product and sum is exact in
fp32: the layer's output through either path equals ``reference.moe_layer`` computed in
one process, and each path's own steps equal their references bit for bit. The expert
computation runs on the host between prepare and finalize; outputs and the kept buffers
are poisoned first, padding rows of the expert output are NaN (never read).
"""

import re

import cupy
import numpy as np
import pytest

import moecomm
from moecomm import reference as ref
from moecomm.moe import (FlashInferAllGatherMoEPrepareAndFinalize,
                         FlashInferAllToAllMoEPrepareAndFinalize, FusedMoEQuantConfig,
                         create_prepare_finalize)
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, main, raw, zeros
from tests.mpi import case

EPR = 4
TOP_K = 4
H = 128
MAX_T = 40
GS = np.float32(64.0)  # NVFP4 global scale: a power of two, so dequantization is exact
FP8_SCALE = np.float32(0.0625)
FP8_GROUP = 64


# ---------------------------------------------------------------- inputs and reference
class Layer:
    """Every rank's tokens, routing and the expert scales; ``world`` ranks, EPR experts
    each."""

    def __init__(self, seed, world, mode=None, T=None, top_k=TOP_K):
        rng = np.random.default_rng(seed)
        self.world, self.E, self.top_k = world, EPR * world, top_k
        self.T = list(T) if T is not None else [int(rng.integers(1, MAX_T + 1)) for _ in range(world)]
        if mode == "zero":
            self.T[0] = 0
        self.ids, self.w, self.x = [], [], []
        for t in self.T:
            ids = rng.integers(0, self.E, (t, top_k)).astype(np.int32)
            if mode == "one_rank":
                ids = ((world - 1) * EPR + rng.integers(0, EPR, (t, top_k))).astype(np.int32)
            bad = rng.random((t, top_k)) < 0.1
            ids[bad] = rng.choice(np.array([-1, self.E, self.E + 3], np.int32), bad.sum())
            self.ids.append(ids)
            self.w.append((np.float32(2.0) ** rng.integers(-3, 2, (t, top_k))).astype(np.float32))
            self.x.append(ref.to_bf16_bits(rng.standard_normal((t, H)).astype(np.float32)))
        self.scale = (np.float32(2.0) ** rng.integers(-2, 3, self.E)).astype(np.float32)

    def owned(self, r):
        return np.arange(self.E) // EPR == r

    def quantized(self, quant, s):
        """(a1q, the per-token scales that travel with it or None, fp32 values the experts
        see) of rank s."""
        x = self.x[s]
        if quant is None:
            return x, None, ref.to_float32(x)
        if quant == "nvfp4":
            q, sf = ref.quant_nvfp4(x, GS, layout="linear")
            return q, sf, ref.dequant_nvfp4(q, sf, GS, self.T[s], H, layout="linear")
        if quant == "fp8":
            q = ref.quant_fp8(x, FP8_SCALE)
            return q, None, ref.dequant_fp8(q, FP8_SCALE)
        if quant == "fp8tok":
            q, sc = ref.quant_fp8_dynamic_per_token(x)
            return q, sc.reshape(-1, 1), ref.dequant_fp8_dynamic_per_token(q, sc)
        q, sc = ref.quant_fp8_per_token_group_fp32(x, FP8_GROUP)
        return q, sc, ref.dequant_fp8_per_token_group_fp32(q, sc, FP8_GROUP)

    def layer(self, quant, dtype=np.float32):
        vals = [self.quantized(quant, s)[2] for s in range(self.world)]
        return ref.moe_layer(vals, self.ids, self.w, self.scale, dtype)


OUT_DTYPES = {"fp32": np.float32, "bf16": np.uint16}


def config(ctx, quant):
    """The FusedMoEQuantConfig of a flow: None, nvfp4, fp8 (static per-tensor), fp8tok
    (dynamic per-token), fp8grp (per-token groups of FP8_GROUP)."""
    if quant is None:
        return FusedMoEQuantConfig(None)
    if quant == "fp8tok":
        return FusedMoEQuantConfig("fp8", per_act_token_quant=True)
    if quant == "fp8grp":
        return FusedMoEQuantConfig("fp8", block_shape=(1, FP8_GROUP))
    scale = GS if quant == "nvfp4" else FP8_SCALE
    return FusedMoEQuantConfig(quant, a1_gscale=ctx.device(np.array([scale], np.float32)))


def device_inputs(ctx, layer):
    r = ctx.rank
    return ctx.device(layer.x[r]), ctx.device(layer.w[r]), ctx.device(layer.ids[r])


def poisoned_output(ctx, rows, dtype):
    out = zeros((rows, H), bfloat16 if dtype == np.uint16 else dtype)
    with ctx.stream:
        raw(out).fill(0x7FC1 if dtype == np.uint16 else 0x7FC00001)
    return out


def as_out(values32, dtype):
    return ref.cast_from_float32(values32, dtype)


def warm_and_poison(ctx, pf, prepare, tokens, out_dtype, w, ids):
    """One prepare / finalize of the checked call's shapes first, so that every buffer the
    checked call uses exists, then every buffer poisoned (``poison`` fills the kept
    buffers only: a new shape would otherwise get fresh, unpoisoned memory)."""
    res = prepare()
    dt = bfloat16 if out_dtype == np.uint16 else out_dtype
    pf.finalize(zeros((tokens, H), dt), zeros((res.a1q.shape[0], H), dt), w, ids, False,
                stream=ctx.stream)
    ctx.poison(pf)


# ---------------------------------------------------------------- the all-gather path
def run_allgather(ctx, pf, layer, quant, out_dtype, *, check_layer=True):
    r, sizes, n = ctx.rank, layer.T, layer.world
    a1, w, ids = device_inputs(ctx, layer)

    def prepare():
        return pf.prepare(a1, w, ids, layer.E, None, False, config(ctx, quant), sizes=sizes,
                          stream=ctx.stream)

    warm_and_poison(ctx, pf, prepare, sizes[r], out_dtype, w, ids)
    res = prepare()
    per = [layer.quantized(quant, s) for s in range(n)]
    tensors = [[layer.w[s], layer.ids[s], per[s][0]] + ([per[s][1]] if per[s][1] is not None
                                                         else []) for s in range(n)]
    g = ref.all_gatherv(tensors, sizes)
    assert np.array_equal(ctx.host(res.topk_weights), g[0])
    assert np.array_equal(ctx.host(res.topk_ids), g[1])
    assert np.array_equal(ctx.host(res.a1q), g[2]), "gathered a1q"
    if quant == "nvfp4":
        assert np.array_equal(ctx.host(res.a1q_scale), ref.swizzle_sf(g[3], H)), "swizzled scales"
    elif quant == "fp8":
        assert np.array_equal(ctx.host(res.a1q_scale).reshape(-1), [FP8_SCALE]), "static scale"
    elif quant is not None:
        got = ctx.host(res.a1q_scale)
        assert np.array_equal(got.reshape(g[3].shape), g[3]), "gathered FP8 scales"
    else:
        assert res.a1q_scale is None
    assert res.expert_tokens_meta is None
    values = np.concatenate([p[2] for p in per], axis=0)
    partial = [as_out(ref.scaled_experts(values, g[1], g[0], layer.scale, layer.owned(q)),
                      out_dtype) for q in range(n)]
    fused = ctx.device(partial[r])
    out = poisoned_output(ctx, sizes[r], out_dtype)
    assert pf.finalize(out, fused, w, ids, False, stream=ctx.stream) is None
    got = ctx.host(out)
    assert np.array_equal(bits(got), bits(ref.reduce_scatterv(partial, sizes)[r])), "finalize"
    if check_layer and out_dtype == np.float32:
        assert np.array_equal(got, layer.layer(quant)[r]), "not the MoE layer's output"
    return res, got


def allgather(ctx, key="ag", group=None):
    g = ctx.group if group is None else group
    return ctx.shared(key, lambda: FlashInferAllGatherMoEPrepareAndFinalize(
        True, group=g, max_num_tokens=MAX_T, top_k=TOP_K, hidden_size=H))


FLOWS = {"none_fp32": (None, "fp32"), "none_bf16": (None, "bf16"),
         "nvfp4_fp32": ("nvfp4", "fp32"), "nvfp4_bf16": ("nvfp4", "bf16"),
         "fp8_fp32": ("fp8", "fp32"), "fp8tok_fp32": ("fp8tok", "fp32"),
         "fp8grp_bf16": ("fp8grp", "bf16")}


@case(variants=FLOWS)
def allgather_layer(ctx, flow):
    """Ragged token counts, then an empty rank, then all tokens to one rank's experts."""
    quant, out = flow
    pf = allgather(ctx)
    for mode in (None, "zero", "one_rank"):
        run_allgather(ctx, pf, Layer(ctx.new_seed(), ctx.world, mode), quant, OUT_DTYPES[out])


# ---------------------------------------------------------------- the all-to-all-v path
def run_alltoall(ctx, pf, layer, quant, out_dtype, *, expert_map=False, check_layer=True):
    r, n = ctx.rank, layer.world
    a1, w, ids = device_inputs(ctx, layer)
    maps = [np.where(layer.owned(q), np.arange(layer.E) - q * EPR, -1).astype(np.int32)
            for q in range(n)] if expert_map else None
    d_map = ctx.device(maps[r]) if maps else None

    def prepare():
        return pf.prepare(a1, w, ids, layer.E, d_map, False, config(ctx, quant),
                          sizes=layer.T, stream=ctx.stream)

    warm_and_poison(ctx, pf, prepare, layer.T[r], out_dtype, w, ids)
    res = prepare()
    per = [layer.quantized(quant, s) for s in range(n)]
    payloads = [[p[0]] + ([p[1]] if quant == "nvfp4" else []) for p in per]
    plan, recv = ref.a2a_prepare(layer.ids, layer.w, payloads, layer.E, expert_maps=maps)
    rmax, rows = plan.runtime_max, n * plan.runtime_max
    valid = np.concatenate([np.arange(s * rmax, s * rmax + plan.recv_counts[r][s])
                            for s in range(n)]).astype(np.int64)
    want = recv[r]
    got_q = ctx.host(res.a1q)
    assert got_q.shape == want[0].shape and np.array_equal(got_q[valid], want[0][valid]), "a1q"
    assert np.array_equal(ctx.host(res.topk_ids), want[-2]), "received ids (padding included)"
    assert np.array_equal(ctx.host(res.topk_weights)[valid], want[-1][valid]), "weights"
    if quant == "nvfp4":
        sf = ref.unswizzle_sf(ctx.host(res.a1q_scale), rows, H)
        assert np.array_equal(sf[valid], want[1][valid]), "received scales"
    else:
        assert res.a1q_scale is None
    # each rank's expert rows from the reference's received rows; padding rows NaN
    expert_rows = []
    for q in range(n):
        qv = recv[q]
        vals = (ref.dequant_nvfp4(qv[0], qv[1], GS, rows, H, layout="linear")
                if quant == "nvfp4" else ref.to_float32(qv[0]))
        if expert_map:
            y = ref.scaled_experts(vals, qv[-2], qv[-1], layer.scale[q * EPR:(q + 1) * EPR],
                                   np.ones(EPR, bool))
        else:
            y = ref.scaled_experts(vals, qv[-2], qv[-1], layer.scale, layer.owned(q))
        y = as_out(y, out_dtype)
        for s in range(n):
            pad = slice(s * rmax + plan.recv_counts[q][s], (s + 1) * rmax)
            y[pad] = 0x7FC1 if out_dtype == np.uint16 else np.nan
        expert_rows.append(y)
    out = poisoned_output(ctx, layer.T[r], out_dtype)
    pf.finalize(out, ctx.device(expert_rows[r]), w, ids, False, stream=ctx.stream)
    got = ctx.host(out)
    assert np.array_equal(bits(got), bits(ref.a2a_finalize(expert_rows, plan)[r])), "finalize"
    if check_layer and out_dtype == np.float32:
        assert np.array_equal(got, layer.layer(quant)[r]), "not the MoE layer's output"
    return res, got, valid


def alltoall(ctx, key="a2a", group=None):
    g = ctx.group if group is None else group
    return ctx.shared(key, lambda: FlashInferAllToAllMoEPrepareAndFinalize(
        True, group=g, max_num_tokens=MAX_T, top_k=TOP_K, num_experts=EPR * g.size,
        hidden_size=H))


A2A_FLOWS = {"none_fp32": (None, "fp32"), "none_bf16": (None, "bf16"),
             "nvfp4_fp32": ("nvfp4", "fp32"), "nvfp4_bf16": ("nvfp4", "bf16")}


@case(variants=A2A_FLOWS)
def alltoall_layer(ctx, flow):
    """Ragged token counts, an empty rank, all tokens to one rank; global then local ids."""
    quant, out = flow
    pf = alltoall(ctx)
    for mode in (None, "zero", "one_rank"):
        for emap in (False, True):
            run_alltoall(ctx, pf, Layer(ctx.new_seed(), ctx.world, mode), quant,
                         OUT_DTYPES[out], expert_map=emap)


@case
def alltoall_any_tensors(ctx):
    """dispatch / combine on their own: tensors of other dtypes and row sizes (fp32 12 B,
    int8 12 B, bf16 16 B) along the plan, local ids through an expert_map, fp32 rows back
    (padding rows NaN: never read)."""
    pf, n, r = alltoall(ctx), ctx.world, ctx.rank
    for mode in (None, "zero", "one_rank"):
        layer = Layer(ctx.new_seed(), n, mode)
        rng = np.random.default_rng(ctx.new_seed())  # the same on every rank
        extra = [[rng.standard_normal((t, 3)).astype(np.float32),
                  rng.integers(-100, 100, (t, 12)).astype(np.int8),
                  ref.to_bf16_bits(rng.standard_normal((t, 8)).astype(np.float32))]
                 for t in layer.T]
        maps = [np.where(layer.owned(q), np.arange(layer.E) - q * EPR, -1).astype(np.int32)
                for q in range(n)]
        ctx.poison(pf)
        recv, ids = pf.dispatch(ctx.device(layer.ids[r]), [ctx.device(a) for a in extra[r]],
                                sizes=layer.T, expert_map=ctx.device(maps[r]), stream=ctx.stream)
        plan, want = ref.a2a_prepare(layer.ids, layer.w, extra, layer.E, expert_maps=maps)
        rmax = plan.runtime_max
        valid = np.concatenate([np.arange(s * rmax, s * rmax + plan.recv_counts[r][s])
                                for s in range(n)]).astype(np.int64)
        assert len(recv) == 3
        for i, (got, exp) in enumerate(zip(recv, want[r][:3])):
            got = ctx.host(got)
            assert got.shape == exp.shape and np.array_equal(got[valid], exp[valid]), i
        assert np.array_equal(ctx.host(ids), want[r][3]), "received ids"
        rows = [rng.standard_normal((n * rmax, H)).astype(np.float32) for _ in range(n)]
        for q in range(n):
            for s in range(n):
                rows[q][s * rmax + plan.recv_counts[q][s]:(s + 1) * rmax] = np.nan
        got = pf.combine(ctx.device(rows[r]), stream=ctx.stream)
        assert np.array_equal(bits(ctx.host(got)), bits(ref.a2a_finalize(rows, plan)[r]))


# ---------------------------------------------------------------- shared behaviour
@case(variants={"allgather": "ag", "alltoall": "a2a"})
def router_weight_on_input(ctx, path):
    """top-1 with apply_router_weight_on_input: a1 *= bf16(w) in place before the exchange."""
    layer = Layer(ctx.new_seed(), ctx.world, top_k=1)
    pf = FlashInferAllGatherMoEPrepareAndFinalize(
        True, group=ctx.group, max_num_tokens=MAX_T, top_k=1, hidden_size=H) if path == "ag" \
        else FlashInferAllToAllMoEPrepareAndFinalize(
            True, group=ctx.group, max_num_tokens=MAX_T, top_k=1, num_experts=layer.E,
            hidden_size=H)
    with pf:
        a1, w, ids = device_inputs(ctx, layer)
        res = pf.prepare(a1, w, ids, layer.E, None, True, FusedMoEQuantConfig(None),
                         sizes=layer.T, stream=ctx.stream)
        scaled = [ref.apply_router_weight_on_input(layer.x[s], layer.w[s]) for s in range(ctx.world)]
        assert np.array_equal(ctx.host(a1), scaled[ctx.rank]), "a1 scaled in place"
        if path == "ag":
            assert np.array_equal(ctx.host(res.a1q), np.concatenate(scaled)), "gathered"
        else:
            _, recv = ref.a2a_prepare(layer.ids, layer.w, [[x] for x in scaled], layer.E)
            got = ctx.host(res.a1q)
            want_ids = recv[ctx.rank][-2]
            assert np.array_equal(ctx.host(res.topk_ids), want_ids), "received ids"
            ok = want_ids[:, 0] >= 0  # the received rows, from the reference
            assert np.array_equal(got[ok], recv[ctx.rank][0][ok]), "received scaled rows"
            pf.finalize(zeros((layer.T[ctx.rank], H), bfloat16),
                        zeros((got.shape[0], H), bfloat16), w, ids, True, stream=ctx.stream)
        with pytest.raises(ValueError, match="top_k == 1"):
            pf.prepare(a1, cupy.zeros((layer.T[ctx.rank], 2), np.float32),
                       cupy.zeros((layer.T[ctx.rank], 2), np.int32), layer.E, None, True,
                       FusedMoEQuantConfig(None), sizes=layer.T)
        ctx.stream.synchronize()


@case(variants={"none": None, "nvfp4": "nvfp4", "fp8": "fp8"})
def no_dp(ctx, quant):
    """use_dp=False: quantize only (NVFP4 scales swizzled), finalize copies."""
    layer = Layer(ctx.new_seed(), ctx.world)
    r = ctx.rank
    for enable in (False, True):
        with create_prepare_finalize(False, use_nvfp4=quant == "nvfp4",
                                     enable_alltoallv=enable) as pf:
            a1, w, ids = device_inputs(ctx, layer)
            res = pf.prepare(a1, w, ids, layer.E, None, False, config(ctx, quant),
                             stream=ctx.stream)
            q, sf, _ = layer.quantized(quant, r)
            assert np.array_equal(ctx.host(res.a1q), q)
            if quant == "nvfp4":
                assert np.array_equal(ctx.host(res.a1q_scale), ref.swizzle_sf(sf, H))
            assert np.array_equal(ctx.host(res.topk_ids), layer.ids[r])
            assert np.array_equal(ctx.host(res.topk_weights), layer.w[r])
            y = ctx.device(np.arange(layer.T[r] * H, dtype=np.float32).reshape(-1, H))
            out = poisoned_output(ctx, layer.T[r], np.float32)
            pf.finalize(out, y, w, ids, False, stream=ctx.stream)
            assert np.array_equal(ctx.host(out), ctx.host(y))


@case
def factory(ctx):
    """create_prepare_finalize: NVFP4 + alltoallv -> all-to-all-v, else all-gather."""
    kw = dict(group=ctx.group, max_num_tokens=8, top_k=2, num_experts=EPR * ctx.world,
              hidden_size=64)
    for nvfp4, a2a, cls in ((True, True, FlashInferAllToAllMoEPrepareAndFinalize),
                            (True, False, FlashInferAllGatherMoEPrepareAndFinalize),
                            (False, True, FlashInferAllGatherMoEPrepareAndFinalize)):
        with create_prepare_finalize(True, use_nvfp4=nvfp4, enable_alltoallv=a2a, **kw) as pf:
            assert type(pf) is cls
            assert pf.num_dispatchers() == 1 and pf.activation_format == "standard"


@case(variants={"allgather": "ag", "alltoall": "a2a"})
def graph_replay(ctx, path):
    """prepare and finalize captured once each (fixed sizes), replayed on new routings and
    activations; the experts run on the host in between."""
    quant = "nvfp4"
    stream, r = ctx.stream, ctx.rank
    base = Layer(ctx.new_seed(), ctx.world)
    pf = allgather(ctx) if path == "ag" else alltoall(ctx)
    qc = config(ctx, quant)
    a1, w, ids = device_inputs(ctx, base)
    rows = sum(base.T) if path == "ag" else ctx.world * max(base.T)
    fused = zeros((rows, H), np.float32)
    out = zeros((base.T[r], H), np.float32)

    def prepare():
        return pf.prepare(a1, w, ids, base.E, None, False, qc, sizes=base.T, stream=stream)

    def finalize():
        pf.finalize(out, fused, w, ids, False, stream=stream)

    prepare()  # warm up: kernels loaded, buffers kept
    finalize()
    stream.synchronize()
    with stream:
        stream.begin_capture()
        res = prepare()
        g_prepare = stream.end_capture()
        stream.begin_capture()
        finalize()
        g_finalize = stream.end_capture()
    for i in range(3):
        layer = Layer(ctx.new_seed(), ctx.world, T=base.T)
        ctx.poison(pf)
        with stream:
            for d, h in zip((a1, w, ids), (layer.x[r], layer.w[r], layer.ids[r])):
                raw(d)[...] = cupy.asarray(h).view(raw(d).dtype)
            out.fill(np.nan)
        g_prepare.launch(stream)
        if path == "ag":
            per = [layer.quantized(quant, s) for s in range(ctx.world)]
            vals = np.concatenate([p[2] for p in per])
            gids = np.concatenate(layer.ids)
            assert np.array_equal(ctx.host(res.topk_ids), gids), f"replay {i}: ids"
            assert np.array_equal(ctx.host(res.a1q), np.concatenate([p[0] for p in per]))
            assert np.array_equal(ctx.host(res.topk_weights), np.concatenate(layer.w)), \
                f"replay {i}: gathered weights"
            assert np.array_equal(ctx.host(res.a1q_scale),
                                  ref.swizzle_sf(np.concatenate([p[1] for p in per]), H)), \
                f"replay {i}: gathered scales"
            y = ref.scaled_experts(vals, gids, np.concatenate(layer.w), layer.scale,
                                   layer.owned(r))
        else:
            got_ids = ctx.host(res.topk_ids)
            q = ctx.host(res.a1q)
            vals = (ref.dequant_nvfp4(q, ctx.host(res.a1q_scale), GS, rows, H)
                    if quant == "nvfp4" else ref.to_float32(q))
            vals[got_ids.max(axis=1) < 0] = 0  # padding rows: unspecified bytes, no experts
            y = ref.scaled_experts(vals, got_ids, ctx.host(res.topk_weights), layer.scale,
                                   layer.owned(r))
        with stream:
            fused[...] = cupy.asarray(y)
        g_finalize.launch(stream)
        assert np.array_equal(ctx.host(out), layer.layer(quant)[r]), f"replay {i}: layer"


def _nccl_group(ctx):
    if not ctx.exclusive:
        pytest.skip("NCCL needs one GPU per rank")
    return moecomm.ProcessGroup(gpus_per_node=1)


@case(variants={"none": None, "nvfp4": "nvfp4"})
def nccl_matches_ipc(ctx, quant):
    """A group cut into one-rank nodes runs both paths through NCCL, with the same bits as
    the IPC paths on the same inputs."""
    group = _nccl_group(ctx)
    try:
        for path in ("ag", "a2a"):
            make = allgather if path == "ag" else alltoall
            run = run_allgather if path == "ag" else run_alltoall
            npf = make(ctx, key=f"nccl_{path}", group=group)
            assert (npf.workspace is not None and npf.workspace.path == "nccl")
            for mode in (None, "zero"):
                layer = Layer(ctx.new_seed(), ctx.world, mode)
                a = run(ctx, make(ctx), layer, quant, np.uint16)
                b = run(ctx, npf, layer, quant, np.uint16)
                assert np.array_equal(bits(a[1]), bits(b[1])), f"{path}: finalize differs"
                ra, rb = a[0], b[0]
                if path == "ag":
                    for x, y in zip(ra, rb):
                        if x is not None:
                            assert np.array_equal(ctx.host(x), ctx.host(y)), "prepare differs"
                else:
                    valid = a[2]
                    assert np.array_equal(ctx.host(ra.topk_ids), ctx.host(rb.topk_ids))
                    for x, y in ((ra.a1q, rb.a1q), (ra.topk_weights, rb.topk_weights)):
                        assert np.array_equal(ctx.host(x)[valid], ctx.host(y)[valid])
            ctx.drop(f"nccl_{path}").close()
    finally:
        group.close()


@case
def bad_input(ctx):
    """Clear errors before any launch."""
    n, r = ctx.world, ctx.rank
    layer = Layer(ctx.new_seed(), n, T=[4] * n)
    a1, w, ids = device_inputs(ctx, layer)
    none = FusedMoEQuantConfig(None)
    gs = ctx.device(np.array([GS], np.float32))
    for pf in (allgather(ctx), alltoall(ctx)):
        with pytest.raises(ValueError, match=re.escape(f"sizes[{r}]=5, but a1 has 4")):
            pf.prepare(a1, w, ids, layer.E, None, False, none, sizes=[5] * n)
        with pytest.raises(ValueError, match=f"{n + 1} row counts"):
            pf.prepare(a1, w, ids, layer.E, None, False, none, sizes=[4] * (n + 1))
        with pytest.raises(TypeError, match="topk_ids: dtype int64"):
            pf.prepare(a1, w, ids.astype(np.int64), layer.E, None, False, none, sizes=[4] * n)
        with pytest.raises(TypeError, match="topk_weights: dtype float16"):
            pf.prepare(a1, w.astype(np.float16), ids, layer.E, None, False, none, sizes=[4] * n)
        with pytest.raises(TypeError, match="a1: dtype int32"):
            pf.prepare(ids, w, ids, layer.E, None, False, none, sizes=[4] * n)
        with pytest.raises(ValueError, match="topk_weights: shape"):
            pf.prepare(a1, w[:, :2], ids, layer.E, None, False, none, sizes=[4] * n)
        with pytest.raises(ValueError, match="top_k == 1"):
            pf.prepare(a1, w, ids, layer.E, None, True, none, sizes=[4] * n)
        with pytest.raises(ValueError, match="expert_map: shape"):
            pf.prepare(a1, w, ids, layer.E, cupy.zeros(3, np.int32), False, none, sizes=[4] * n)
        with pytest.raises(ValueError, match="not a multiple of 16"):
            pf.prepare(zeros((4, 72), bfloat16), w, ids, layer.E, None, False,
                       FusedMoEQuantConfig("nvfp4", a1_gscale=gs), sizes=[4] * n)
        with pytest.raises(TypeError, match="FusedMoEQuantConfig"):
            pf.prepare(a1, w, ids, layer.E, None, False, "nvfp4", sizes=[4] * n)
        with pytest.raises(ValueError, match="weighted and reduced"):
            pf.finalize(a1, a1, w, ids, False, "contiguous")
    with FlashInferAllGatherMoEPrepareAndFinalize(True, group=ctx.group, max_num_tokens=4,
                                                  top_k=TOP_K, hidden_size=H) as fresh:
        with pytest.raises(RuntimeError, match="needs a prepare first"):
            fresh.finalize(zeros((4, H), np.float32), zeros((4 * n, H), np.float32), w, ids,
                           False)
    a2a = alltoall(ctx)
    with pytest.raises(ValueError, match="FP8 takes the all-gather path"):
        a2a.prepare(a1, w, ids, layer.E, None, False,
                    FusedMoEQuantConfig("fp8", a1_gscale=gs), sizes=[4] * n)
    with pytest.raises(ValueError, match="exchange was made for"):
        a2a.prepare(a1, w, ids, layer.E + n, None, False, none, sizes=[4] * n)
    with pytest.raises(ValueError, match="multiple of 64"):
        a2a.prepare(zeros((4, 80), bfloat16), w, ids, layer.E, None, False,
                    FusedMoEQuantConfig("nvfp4", a1_gscale=gs), sizes=[4] * n)
    ag = allgather(ctx)
    run_allgather(ctx, ag, layer, None, np.float32)  # usable after the refused calls
    with pytest.raises(ValueError, match=re.escape(f"expected sum(sizes)={4 * n} rows")):
        ag.finalize(zeros((4, H), np.float32), zeros((4 * n + 1, H), np.float32), w, ids, False)
    with pytest.raises(ValueError, match="out: shape"):
        ag.finalize(zeros((5, H), np.float32), zeros((4 * n, H), np.float32), w, ids, False)
    run_alltoall(ctx, a2a, layer, None, np.float32)
    with pytest.raises(ValueError, match="fused_expert_output: shape"):
        a2a.finalize(zeros((4, H), np.float32), zeros((4 * n + 1, H), np.float32), w, ids, False)


@case(own_job=True, ranks=(2,), env={"MOECOMM_DEBUG": "1"})
def debug_mode_catches_mismatched_sizes(ctx):
    """MOECOMM_DEBUG=1: sizes that differ across ranks raise on every rank."""
    assert moecomm.group.DEBUG
    layer = Layer(ctx.new_seed(), ctx.world, T=[3, 3])
    a1, w, ids = device_inputs(ctx, layer)
    with allgather(ctx) as pf:
        sizes = [3, 3 + ctx.rank] if ctx.rank == 0 else [3 + ctx.rank, 3]
        with pytest.raises(ValueError, match="differ across ranks"):
            pf.prepare(a1, w, ids, layer.E, None, False, FusedMoEQuantConfig(None), sizes=sizes)
        run_allgather(ctx, pf, layer, None, np.float32)
        ctx.drop("ag")


@case(own_job=True, ranks=(2,), env={"MOECOMM_GPUS_PER_NODE": "1"})
def across_nodes(ctx):
    """MOECOMM_GPUS_PER_NODE=1: both paths through NCCL, checked against the reference
    (which the IPC cases match bit for bit)."""
    if not ctx.exclusive:
        pytest.skip("NCCL needs one GPU per rank")
    assert ctx.group.spans_nodes
    ag, a2a = allgather(ctx), alltoall(ctx)
    assert ag.workspace.path == "nccl" and a2a.all2all_manager is None
    quants = [None, "nvfp4"]
    for quant in quants:
        for mode in (None, "zero", "one_rank"):
            run_allgather(ctx, ag, Layer(ctx.new_seed(), ctx.world, mode), quant, np.float32)
            run_alltoall(ctx, a2a, Layer(ctx.new_seed(), ctx.world, mode), quant, np.uint16,
                         expert_map=mode == "zero")


if __name__ == "__main__":
    main()
