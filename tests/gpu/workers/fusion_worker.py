"""allreduce_fusion on every rank against moecomm.reference.

allreduce_out and residual_out must match bit for bit; norm_out within one or two units in
the last place (the GPU sums squares in another order); the quantized bytes and scales
must equal the reference quantizer applied to the kernel's own norm_out, and a pattern
without norm_out must give the same bytes as its Out variant.
"""

import hashlib

import cupy
import numpy as np

import moecomm
from moecomm import reference
from moecomm.fusion import (AllReduceFusionOptions, AllReduceFusionOutputs,
                            AllReduceFusionPattern as P, QuantizationSFLayout,
                            allreduce_fusion, create_allreduce_fusion_workspace,
                            moe_allreduce_fusion, moe_finalize_allreduce_fusion, rmsnorm_fusion)
from moecomm.tensors import bfloat16
from tests.mpi import expect_raises, report_pass

group = moecomm.init()
rank, world = group.rank, group.size
MAX_TOKENS = 130
OUT_OF = {P.kARResidualRMSNormFP8Quant: P.kARResidualRMSNormOutFP8Quant,
          P.kARResidualRMSNormFP4Quant: P.kARResidualRMSNormOutFP4Quant,
          P.kARResidualRMSNormPerTokenGroupFP8PackedQuant:
              P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant,
          P.kARResidualRMSNormDynamicFP8Quant: P.kARResidualRMSNormOutDynamicFP8Quant}


def bits(a):
    a = np.asarray(cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


class Case:
    """Fresh random inputs of one shape (same seed on every rank) and the reference."""

    def __init__(self, tokens, hidden, dtype, weight_bias):
        seed = group.bcast(int(np.random.SeedSequence().entropy % (1 << 63)))
        rng = [np.random.default_rng([seed, r]) for r in range(world)]
        xs = []
        for r in range(world):
            x = rng[r].standard_normal((tokens, hidden)).astype(np.float32)
            x.reshape(-1)[::97] *= 40.0  # outliers
            xs.append(x.astype(dtype))
        common = np.random.default_rng([seed, 999])
        self.residual = common.standard_normal((tokens, hidden)).astype(dtype)
        self.gamma = (1 + 0.2 * common.standard_normal(hidden)).astype(dtype)
        self.xs, self.dtype, self.weight_bias = xs, dtype, weight_bias
        self.tokens, self.hidden = tokens, hidden
        self.fp8_scale, self.fp4_scale = 2.5, 448 * 6 / 12.0
        self.d_x = cupy.asarray(xs[rank])
        self.d_res = cupy.asarray(self.residual)
        self.d_gamma = cupy.asarray(self.gamma)
        self.d_scale = {"fp8": cupy.asarray([self.fp8_scale], np.float32),
                        "fp4": cupy.asarray([self.fp4_scale], np.float32)}
        self.ref = reference.allreduce_fusion(
            xs, "kARResidualRMSNorm", residual=self.residual, rms_gamma=self.gamma,
            rms_eps=1e-5, weight_bias=weight_bias, dtype=dtype)

    def prepare(self, pattern, oneshot, layout=QuantizationSFLayout.SWIZZLED_128x4, group_size=128):
        """Poisoned outputs and the options of one call."""
        t, h = self.tokens, self.hidden
        _, quant, _ = reference.ALLREDUCE_FUSION_PATTERNS[pattern.name]
        outs = AllReduceFusionOutputs(allreduce_out=cupy.full((t, h), np.nan, self.dtype))
        needed = reference.pattern_outputs(pattern.name)
        if "residual_out" in needed:
            outs.residual_out = cupy.full((t, h), np.nan, self.dtype)
        if "norm_out" in needed:
            outs.norm_out = cupy.full((t, h), np.nan, self.dtype)
        if quant in ("fp8", "group_fp8", "dynamic_fp8"):
            outs.quant_out = cupy.full((t, h), 0xA5, np.uint8)
        if quant == "fp4":
            outs.quant_out = cupy.full((t, h // 2), 0xA5, np.uint8)
            n = (reference.compute_fp4_swizzled_layout_sf_size(t, h // 16)
                 if layout == QuantizationSFLayout.SWIZZLED_128x4 else t * (h // 16))
            outs.scale_out = cupy.full(n, 0xA5, np.uint8)
        if quant == "group_fp8":
            outs.scale_out = cupy.full(reference.ue8m0_mn_major_storage_size(t, h // group_size),
                                       -1, np.int32)
        if quant == "dynamic_fp8":
            outs.scale_out = cupy.full(t, np.nan, np.float32)
        opts = AllReduceFusionOptions(
            residual=self.d_res, rms_gamma=self.d_gamma, rms_eps=1e-5,
            weight_bias=self.weight_bias, scale_factor=self.d_scale.get(quant),
            block_quant_group_size=group_size, layout=layout, use_oneshot=oneshot)
        return outs, opts

    def run(self, ws, pattern, oneshot, **kw):
        outs, opts = self.prepare(pattern, oneshot, **kw)
        assert allreduce_fusion(self.d_x, ws, pattern, opts, outs) is outs
        return outs

    def check(self, pattern, outs, what, layout=QuantizationSFLayout.SWIZZLED_128x4, group_size=128,
              out_variant=None):
        ref = self.ref
        assert np.array_equal(bits(outs.allreduce_out), bits(ref["allreduce_out"])), \
            f"{what}: allreduce_out"
        if pattern == P.kAllReduce:
            return
        assert np.array_equal(bits(outs.residual_out), bits(ref["residual_out"])), \
            f"{what}: residual_out"
        _, quant, _ = reference.ALLREDUCE_FUSION_PATTERNS[pattern.name]
        if outs.norm_out is not None:
            got = reference.to_float32(cupy.asnumpy(outs.norm_out))
            want = reference.to_float32(ref["norm_out"])
            ulp = 2.0 ** (-7 if self.dtype == bfloat16 else -10)
            err = np.abs(got - want) / np.maximum(np.abs(want), 1e-3)
            assert np.all(err <= 2 * ulp), f"{what}: norm_out off by {err.max()}"
        if quant is None:
            return
        if out_variant is not None:  # same bytes as the Out variant on the same inputs
            assert np.array_equal(cupy.asnumpy(outs.quant_out), cupy.asnumpy(out_variant.quant_out)), \
                f"{what}: quant_out differs from the Out variant"
            if outs.scale_out is not None:
                assert np.array_equal(cupy.asnumpy(outs.scale_out).view(np.uint8),
                                      cupy.asnumpy(out_variant.scale_out).view(np.uint8)), \
                    f"{what}: scale_out differs from the Out variant"
            return
        norm32 = reference.to_float32(cupy.asnumpy(outs.norm_out))
        q = cupy.asnumpy(outs.quant_out)
        if quant == "fp8":
            assert np.array_equal(q, reference.quant_fp8(norm32, self.fp8_scale)), f"{what}: fp8"
        elif quant == "fp4":
            lay = "swizzled" if layout == QuantizationSFLayout.SWIZZLED_128x4 else "linear"
            wq, wsf = reference.quant_nvfp4(norm32, self.fp4_scale, lay)
            assert np.array_equal(q, wq), f"{what}: nvfp4 codes"
            assert np.array_equal(cupy.asnumpy(outs.scale_out).reshape(-1), wsf.reshape(-1)), \
                f"{what}: nvfp4 scales"
        elif quant == "group_fp8":
            wq, wsf = reference.quant_fp8_per_token_group(norm32, group_size)
            assert np.array_equal(q, wq), f"{what}: group fp8 codes"
            got = reference.ue8m0_from_mn_major_storage(cupy.asnumpy(outs.scale_out), self.tokens,
                                                        self.hidden // group_size)
            assert np.array_equal(got, wsf), f"{what}: group fp8 scales"
        else:
            wq, wsf = reference.quant_fp8_dynamic_per_token(norm32)
            assert np.array_equal(q, wq), f"{what}: dynamic fp8 codes"
            assert np.array_equal(cupy.asnumpy(outs.scale_out), wsf), f"{what}: dynamic scales"


def same_on_all_ranks(outs, what):
    blobs = b"".join(cupy.asnumpy(getattr(outs, f)).tobytes() for f in
                     ("allreduce_out", "residual_out", "norm_out", "quant_out", "scale_out")
                     if getattr(outs, f) is not None)
    assert len(set(group.allgather(hashlib.sha256(blobs).hexdigest()))) == 1, f"{what}: ranks differ"


checked = 0
for dtype in (bfloat16, np.float16):
    for hidden in (1024, 5120):
        ws = create_allreduce_fusion_workspace(group, MAX_TOKENS, hidden, dtype)
        for tokens in (1, 7, MAX_TOKENS):
            case = Case(tokens, hidden, dtype, weight_bias=1.0 if hidden == 5120 else 0.0)
            for oneshot in (True, False):
                if oneshot and tokens * hidden * np.dtype(dtype).itemsize > ws.allreduce.max_oneshot_bytes:
                    continue
                done = {}
                for pattern in sorted(P, key=lambda p: p.name not in (q.name for q in OUT_OF.values())):
                    what = f"{np.dtype(dtype).name} {tokens}x{hidden} {pattern.name} oneshot={oneshot}"
                    outs = case.run(ws, pattern, oneshot)
                    case.check(pattern, outs, what, out_variant=done.get(OUT_OF.get(pattern)))
                    same_on_all_ranks(outs, what)
                    done[pattern] = outs
                    checked += 1
                # NVFP4 linear layout and another group size
                lin = case.run(ws, P.kARResidualRMSNormOutFP4Quant, oneshot, layout=QuantizationSFLayout.LINEAR)
                case.check(P.kARResidualRMSNormOutFP4Quant, lin, "linear sf", layout=QuantizationSFLayout.LINEAR)
                g64 = case.run(ws, P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant, oneshot, group_size=64)
                case.check(P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant, g64, "group 64", group_size=64)
        ws.check()
        ws.close()

# The epilogue alone (rmsnorm_fusion) on rows that are already reduced.
for dtype in (bfloat16, np.float16):
    case = Case(33, 3072, dtype, weight_bias=0.0)
    reduced = cupy.asarray(case.ref["allreduce_out"].view(np.dtype(dtype)))
    for pattern in (P.kARResidualRMSNorm, *OUT_OF.values()):
        outs, opts = case.prepare(pattern, None)
        assert rmsnorm_fusion(reduced, pattern, opts, outs) is outs
        case.check(pattern, outs, f"rmsnorm_fusion {np.dtype(dtype).name} {pattern.name}")

# The MoE fusions: each rank's contribution is computed in the kernel, then all-reduced.
ws = create_allreduce_fusion_workspace(group, 16, 1024, bfloat16)
for dtype_case in range(2):
    case = Case(7, 1024, bfloat16, weight_bias=0.0)
    seed = group.bcast(int(np.random.SeedSequence().entropy % (1 << 63)))
    rng = [np.random.default_rng([seed, r]) for r in range(world)]
    E, K, PERM = 3, 4, 11
    active = [r.standard_normal((E, 7, 1024)).astype(bfloat16) for r in rng]
    scales = [r.random((E, 7)).astype(np.float32) for r in rng]
    tokens_in = [r.standard_normal((7, 1024)).astype(bfloat16) for r in rng]
    permuted = [r.standard_normal((PERM, 1024)).astype(bfloat16) for r in rng]
    index = [np.where(r.random((7, K)) < 0.25, -1, r.integers(0, PERM, (7, K))).astype(np.int32)
             for r in rng]
    esf_dtype = np.float32 if dtype_case == 0 else bfloat16
    esf = [r.random((7, K)).astype(esf_dtype) for r in rng]
    shared = [r.standard_normal((7, 1024)).astype(bfloat16) for r in rng] if dtype_case else None
    kw = dict(residual=case.residual, rms_gamma=case.gamma, rms_eps=1e-5, weight_bias=0.0,
              dtype=bfloat16)
    for pattern in (P.kARResidualRMSNorm, P.kARResidualRMSNormOutFP4Quant):
        for oneshot in (True, False):
            outs, opts = case.prepare(pattern, oneshot)
            case.ref = reference.moe_allreduce_fusion(active, scales, tokens_in, "kARResidualRMSNorm", **kw)
            moe_allreduce_fusion(cupy.asarray(active[rank]), cupy.asarray(scales[rank]),
                                 cupy.asarray(tokens_in[rank]), ws, pattern, opts, outs)
            case.check(pattern, outs, f"moe_allreduce_fusion {pattern.name} oneshot={oneshot}")
            outs, opts = case.prepare(pattern, oneshot)
            case.ref = reference.moe_finalize_allreduce_fusion(
                permuted, index, esf, shared, 0.75, "kARResidualRMSNorm", **kw)
            moe_finalize_allreduce_fusion(
                cupy.asarray(permuted[rank]), cupy.asarray(index[rank]), ws, pattern, opts, outs,
                expert_scale_factor=cupy.asarray(esf[rank]),
                shared_expert_output=None if shared is None else cupy.asarray(shared[rank]),
                routed_scaling_factor=0.75)
            case.check(pattern, outs, f"moe_finalize_allreduce_fusion {pattern.name} "
                                      f"oneshot={oneshot} esf={np.dtype(esf_dtype).name}")
expect_raises(ValueError, "scale_input", lambda: moe_allreduce_fusion(
    cupy.zeros((3, 7, 1024), bfloat16), cupy.zeros((2, 7), np.float32),
    cupy.zeros((7, 1024), bfloat16), ws))
expect_raises(TypeError, "expanded_idx_to_permuted_idx", lambda: moe_finalize_allreduce_fusion(
    cupy.zeros((5, 1024), bfloat16), cupy.zeros((7, 4), np.int64), ws))
ws.close()

# Graph capture and replay of every pattern (both algorithms) with fresh inputs.
ws = create_allreduce_fusion_workspace(group, 16, 2048, bfloat16)
stream = cupy.cuda.Stream(non_blocking=True)
case = Case(9, 2048, bfloat16, 0.0)
plan = [(p, i % 2 == 0) for i, p in enumerate(P)]
prepared = [case.prepare(p, one) for p, one in plan]
cupy.cuda.runtime.deviceSynchronize()
with stream:
    stream.begin_capture()
    for (p, _), (outs, opts) in zip(plan, prepared):
        allreduce_fusion(case.d_x, ws, p, opts, outs, stream=stream)
    graph = stream.end_capture()
captured = [outs for outs, _ in prepared]
by_pattern = {p: outs for (p, _), outs in zip(plan, captured)}
for replay in range(2):
    fresh = Case(9, 2048, bfloat16, 0.0)
    for name in ("d_x", "d_res", "d_gamma"):
        getattr(case, name)[...] = getattr(fresh, name)
    case.xs, case.ref = fresh.xs, fresh.ref
    for outs in captured:
        for f in ("allreduce_out", "residual_out", "norm_out"):
            if getattr(outs, f) is not None:
                getattr(outs, f).fill(np.nan)
    cupy.cuda.runtime.deviceSynchronize()
    graph.launch(stream)
    stream.synchronize()
    for (p, _), outs in zip(plan, captured):
        case.check(p, outs, f"graph replay {replay} {p.name}",
                   out_variant=by_pattern.get(OUT_OF.get(p)))
ws.check(stream)

# Bad input: clear errors before any launch.
x = cupy.zeros((17, 2048), bfloat16)
opts = AllReduceFusionOptions(residual=cupy.zeros((17, 2048), bfloat16),
                              rms_gamma=cupy.ones(2048, bfloat16))
outs = AllReduceFusionOutputs(residual_out=cupy.zeros((17, 2048), bfloat16))
expect_raises(ValueError, "exceeds the workspace's max_token_num 16",
              lambda: allreduce_fusion(x, ws, P.kARResidualRMSNorm, opts, outs))
x = cupy.zeros((4, 1024), bfloat16)
expect_raises(ValueError, "hidden_dim 2048", lambda: allreduce_fusion(x, ws, P.kARResidualRMSNorm))
x = cupy.zeros((4, 2048), bfloat16)
opts = AllReduceFusionOptions(residual=cupy.zeros((4, 2048), bfloat16), rms_gamma=cupy.ones(2048, bfloat16))
expect_raises(ValueError, "writes outputs.residual_out",
              lambda: allreduce_fusion(x, ws, P.kARResidualRMSNorm, opts, AllReduceFusionOutputs()))
outs = AllReduceFusionOutputs(residual_out=cupy.zeros((4, 2048), bfloat16),
                              norm_out=cupy.zeros((4, 2048), bfloat16),
                              quant_out=cupy.zeros((4, 2048), np.uint8))
expect_raises(ValueError, "use the Out variant",
              lambda: allreduce_fusion(x, ws, P.kARResidualRMSNormFP8Quant, opts, outs))
outs.norm_out = None
expect_raises(ValueError, "needs options.scale_factor",
              lambda: allreduce_fusion(x, ws, P.kARResidualRMSNormFP8Quant, opts, outs))
opts.block_quant_group_size = 48
outs.scale_out = cupy.zeros(64, np.int32)
expect_raises(ValueError, "block_quant_group_size=48",
              lambda: allreduce_fusion(x, ws, P.kARResidualRMSNormPerTokenGroupFP8PackedQuant, opts, outs))
expect_raises(TypeError, "does not match the workspace",
              lambda: allreduce_fusion(x.astype(np.float16), ws, P.kAllReduce))
expect_raises(ValueError, "residual",
              lambda: allreduce_fusion(x, ws, P.kARResidualRMSNorm,
                                       AllReduceFusionOptions(rms_gamma=opts.rms_gamma),
                                       AllReduceFusionOutputs(residual_out=cupy.zeros((4, 2048), bfloat16),
                                                              norm_out=cupy.zeros((4, 2048), bfloat16))))
ws.close()
if rank == 0:
    print(f"fusion cases checked: {checked}")
report_pass(rank)
