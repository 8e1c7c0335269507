"""allreduce_fusion on every rank against moecomm.reference.

allreduce_out and residual_out must match bit for bit; norm_out within one unit in the last
place, in at most one element in 1000 (the GPU sums squares in another order,
``check_norm``); the quantized bytes and scales
must equal the reference quantizer applied to the kernel's own norm_out, and a pattern
without norm_out must give the same bytes as its Out variant. Patterns are named, never
numbered; what each computes comes from ``moecomm.constants.PATTERNS``.
"""

import time

import cupy
import numpy as np
import pytest

from moecomm import reference
from moecomm.allreduce import AllReduceConfig
from moecomm.constants import PATTERNS, Quant, Source
from moecomm.constants import AllReduceFusionPattern as _Named
from moecomm.fusion import (AllReduceFusionOptions, AllReduceFusionOutputs,
                            AllReduceFusionPattern as P, QuantizationSFLayout,
                            allreduce_fusion, create_allreduce_fusion_workspace,
                            moe_allreduce_fusion, moe_finalize_allreduce_fusion, rmsnorm_fusion)
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, dtype_label, main
from tests.mpi import case, dtype_of

MAX_TOKENS = 130
SWIZZLED = QuantizationSFLayout.SWIZZLED_128x4


def spec(pattern):
    """What ``pattern`` computes (looked up by name)."""
    return PATTERNS[_Named[pattern.name]]


# The patterns of allreduce_fusion itself (the MoE ones have their own entry points).
PLAIN = [p for p in P if spec(p).source == Source.INPUT]
OUT_OF = {P.kARResidualRMSNormFP8Quant: P.kARResidualRMSNormOutFP8Quant,
          P.kARResidualRMSNormFP4Quant: P.kARResidualRMSNormOutFP4Quant,
          P.kARResidualRMSNormPerTokenGroupFP8PackedQuant:
              P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant,
          P.kARResidualRMSNormDynamicFP8Quant: P.kARResidualRMSNormOutDynamicFP8Quant}


class Inputs:
    """Fresh random inputs of one shape (the same on every rank) and the reference."""

    def __init__(self, ctx, tokens, hidden, dtype, weight_bias):
        xs = []
        for rng in ctx.rank_rngs():
            x = rng.standard_normal((tokens, hidden)).astype(np.float32)
            x.reshape(-1)[::97] *= 40.0  # outliers
            xs.append(x.astype(dtype))
        common = np.random.default_rng(ctx.new_seed())
        self.residual = common.standard_normal((tokens, hidden)).astype(dtype)
        self.gamma = (1 + 0.2 * common.standard_normal(hidden)).astype(dtype)
        self.xs, self.dtype, self.weight_bias = xs, dtype, weight_bias
        self.tokens, self.hidden = tokens, hidden
        self.fp8_scale, self.fp4_scale = 2.5, 448 * 6 / 12.0
        self.d_x = cupy.asarray(xs[ctx.rank])
        self.d_res = cupy.asarray(self.residual)
        self.d_gamma = cupy.asarray(self.gamma)
        self.d_scale = {Quant.FP8: cupy.asarray([self.fp8_scale], np.float32),
                        Quant.NVFP4: cupy.asarray([self.fp4_scale], np.float32)}
        self.ref = reference.allreduce_fusion(
            xs, "kARResidualRMSNorm", residual=self.residual, rms_gamma=self.gamma,
            rms_eps=1e-5, weight_bias=weight_bias, dtype=dtype)

    def prepare(self, pattern, oneshot, layout=SWIZZLED, group_size=128):
        """Poisoned outputs and the options of one call."""
        t, h = self.tokens, self.hidden
        quant, needed = spec(pattern).quant, spec(pattern).outputs
        outs = AllReduceFusionOutputs(allreduce_out=cupy.full((t, h), np.nan, self.dtype))
        if "residual_out" in needed:
            outs.residual_out = cupy.full((t, h), np.nan, self.dtype)
        if "norm_out" in needed:
            outs.norm_out = cupy.full((t, h), np.nan, self.dtype)
        if quant in (Quant.FP8, Quant.GROUP_FP8, Quant.DYNAMIC_FP8):
            outs.quant_out = cupy.full((t, h), 0xA5, np.uint8)
        if quant == Quant.NVFP4:
            outs.quant_out = cupy.full((t, h // 2), 0xA5, np.uint8)
            n = (reference.compute_fp4_swizzled_layout_sf_size(t, h // 16)
                 if layout == SWIZZLED else t * (h // 16))
            outs.scale_out = cupy.full(n, 0xA5, np.uint8)
        if quant == Quant.GROUP_FP8:
            outs.scale_out = cupy.full(reference.ue8m0_mn_major_storage_size(t, h // group_size),
                                       -1, np.int32)
        if quant == Quant.DYNAMIC_FP8:
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

    def check(self, pattern, outs, what, layout=SWIZZLED, group_size=128, out_variant=None):
        ref = self.ref
        assert np.array_equal(bits(outs.allreduce_out), bits(ref["allreduce_out"])), \
            f"{what}: allreduce_out"
        if pattern == P.kAllReduce:
            return
        assert np.array_equal(bits(outs.residual_out), bits(ref["residual_out"])), \
            f"{what}: residual_out"
        quant = spec(pattern).quant
        if outs.norm_out is not None:
            check_norm(outs.norm_out, ref["norm_out"], what)
        if quant == Quant.NONE:
            return
        if out_variant is not None:  # same bytes as the Out variant on the same inputs
            assert np.array_equal(cupy.asnumpy(outs.quant_out),
                                  cupy.asnumpy(out_variant.quant_out)), \
                f"{what}: quant_out differs from the Out variant"
            if outs.scale_out is not None:
                assert np.array_equal(cupy.asnumpy(outs.scale_out).view(np.uint8),
                                      cupy.asnumpy(out_variant.scale_out).view(np.uint8)), \
                    f"{what}: scale_out differs from the Out variant"
            return
        norm32 = reference.to_float32(cupy.asnumpy(outs.norm_out))
        q = cupy.asnumpy(outs.quant_out)
        if quant == Quant.FP8:
            assert np.array_equal(q, reference.quant_fp8(norm32, self.fp8_scale)), f"{what}: fp8"
        elif quant == Quant.NVFP4:
            lay = "swizzled" if layout == SWIZZLED else "linear"
            wq, wsf = reference.quant_nvfp4(norm32, self.fp4_scale, lay)
            assert np.array_equal(q, wq), f"{what}: nvfp4 codes"
            assert np.array_equal(cupy.asnumpy(outs.scale_out).reshape(-1), wsf.reshape(-1)), \
                f"{what}: nvfp4 scales"
        elif quant == Quant.GROUP_FP8:
            wq, wsf = reference.quant_fp8_per_token_group(norm32, group_size)
            assert np.array_equal(q, wq), f"{what}: group fp8 codes"
            # the whole storage: its padding (missing groups of a row's last word, rows up
            # to a multiple of 4) is written 0, as the reference writes it
            assert np.array_equal(cupy.asnumpy(outs.scale_out),
                                  reference.ue8m0_to_mn_major_storage(wsf)), \
                f"{what}: group fp8 scales"
        else:
            wq, wsf = reference.quant_fp8_dynamic_per_token(norm32)
            assert np.array_equal(q, wq), f"{what}: dynamic fp8 codes"
            assert np.array_equal(cupy.asnumpy(outs.scale_out), wsf), f"{what}: dynamic scales"


def check_norm(got, want, what):
    """norm_out against the reference: every element within one unit in the last place
    (the GPU sums a row's squares in another order, so its rstd may differ by an fp32
    ulp), and only a few elements differ at all."""
    g, w = _ordered(bits(got)), _ordered(bits(want))
    diff = np.abs(g - w)
    assert g.shape == w.shape and diff.max(initial=0) <= 1, \
        f"{what}: norm_out off by {diff.max(initial=0)} units in the last place"
    assert np.count_nonzero(diff) <= max(4, diff.size // 1000), \
        f"{what}: norm_out differs in {np.count_nonzero(diff)} of {diff.size} elements"


def _ordered(b: np.ndarray) -> np.ndarray:
    """16-bit float bit patterns as integers in the order of their values (-0 = +0)."""
    i = b.astype(np.int64)
    return np.where(i & 0x8000, -(i & 0x7FFF), i)


def written(outs):
    return [getattr(outs, f) for f in ("allreduce_out", "residual_out", "norm_out", "quant_out",
                                       "scale_out") if getattr(outs, f) is not None]


# ---------------------------------------------------------------- every pattern, eager
# (dtype, hidden, weight_bias): standard RMSNorm at 1024, Gemma/Qwen style at 5120.
SHAPES = {f"{d}-h{h}": (d, h, wb) for d in ("bf16", "fp16")
          for h, wb in ((1024, 0.0), (5120, 1.0))}


@case(variants=SHAPES)
def patterns(ctx, shape):
    """Every pattern at 1, 7 and MAX_TOKENS tokens, one-shot (where it fits) and two-shot;
    the NVFP4 linear layout and group size 64 too; every rank holds the same bytes."""
    name, hidden, weight_bias = shape
    dtype = dtype_of(name)
    ws = create_allreduce_fusion_workspace(ctx.group, MAX_TOKENS, hidden, dtype)
    for tokens in (1, 7, MAX_TOKENS):
        inputs = Inputs(ctx, tokens, hidden, dtype, weight_bias)
        for oneshot in (True, False):
            if oneshot and tokens * hidden * dtype.itemsize > ws.allreduce.max_oneshot_bytes:
                continue
            done = {}
            # Out variants first: the others are compared with them.
            for pattern in sorted(PLAIN, key=lambda p: p not in OUT_OF.values()):
                what = f"{name} {tokens}x{hidden} {pattern.name} oneshot={oneshot}"
                outs = inputs.run(ws, pattern, oneshot)
                agree = ctx.ranks_agree(written(outs))  # collective: before any assertion
                inputs.check(pattern, outs, what, out_variant=done.get(OUT_OF.get(pattern)))
                assert agree, f"{what}: ranks differ"
                done[pattern] = outs
            lin = inputs.run(ws, P.kARResidualRMSNormOutFP4Quant, oneshot,
                             layout=QuantizationSFLayout.LINEAR)
            inputs.check(P.kARResidualRMSNormOutFP4Quant, lin, "linear sf",
                         layout=QuantizationSFLayout.LINEAR)
            g64 = inputs.run(ws, P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant, oneshot,
                             group_size=64)
            inputs.check(P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant, g64, "group 64",
                         group_size=64)
    ws.check()
    ws.close()


@case
def group_fp8_padding(ctx):
    """Per-token-group FP8 where a row's groups do not fill its last UE8M0 word (hidden
    2880: 45 groups of 64, 90 of 32) and the token count is not a multiple of 4: the
    storage's padding bytes, poisoned first, come out 0, one-shot and two-shot."""
    hidden = 2880
    ws = create_allreduce_fusion_workspace(ctx.group, MAX_TOKENS, hidden, bfloat16)
    for tokens in (1, 7, MAX_TOKENS):
        inputs = Inputs(ctx, tokens, hidden, bfloat16, 0.0)
        for oneshot in (True, False):
            if oneshot and tokens * hidden * 2 > ws.allreduce.max_oneshot_bytes:
                continue
            for group_size in (64, 32):
                done = None  # the Out variant first: the other is compared with it
                for pattern in (P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant,
                                P.kARResidualRMSNormPerTokenGroupFP8PackedQuant):
                    what = f"{tokens}x{hidden} g{group_size} {pattern.name} oneshot={oneshot}"
                    outs = inputs.run(ws, pattern, oneshot, group_size=group_size)
                    agree = ctx.ranks_agree(written(outs))
                    inputs.check(pattern, outs, what, group_size=group_size, out_variant=done)
                    assert agree, f"{what}: ranks differ"
                    done = outs
    ws.check()
    ws.close()


@case(variants={"h1024": 1024, "h5120": 5120})
def oneshot_split(ctx, hidden):
    """The one-shot with its SMs split into pushers and reducers (forced from 0 bytes):
    every plain pattern at 1, 7 and MAX_TOKENS tokens, twice each (the Lamport buffers
    rotate), with the default split and with 3 pushers; the MoE reduction source too; in
    place as vLLM calls it (norm_out = input, residual_out = residual), where reducers
    would overwrite rows the pushers had yet to send (the unsplit kernel serves those)."""
    for config in (AllReduceConfig(split_min_bytes=0),
                   AllReduceConfig(split_min_bytes=0, split_push_sms=3)):
        ws = create_allreduce_fusion_workspace(ctx.group, MAX_TOKENS, hidden, bfloat16,
                                               oneshot_max_bytes=8 << 20, config=config)
        for tokens in (1, 7, MAX_TOKENS):
            for call in range(2):
                inputs = Inputs(ctx, tokens, hidden, bfloat16, weight_bias=0.0)
                done = {}
                for pattern in sorted(PLAIN, key=lambda p: p not in OUT_OF.values()):
                    what = (f"split {config.split_push_sms} {tokens}x{hidden} {pattern.name} "
                            f"call {call}")
                    outs = inputs.run(ws, pattern, True)
                    agree = ctx.ranks_agree(written(outs))  # collective: before any assertion
                    inputs.check(pattern, outs, what, out_variant=done.get(OUT_OF.get(pattern)))
                    assert agree, f"{what}: ranks differ"
                    done[pattern] = outs
        inputs = Inputs(ctx, 7, hidden, bfloat16, weight_bias=0.0)
        rng = ctx.rank_rngs()
        active = [r.standard_normal((E, 7, hidden)).astype(bfloat16) for r in rng]
        scales = [r.random((E, 7)).astype(np.float32) for r in rng]
        tokens_in = [r.standard_normal((7, hidden)).astype(bfloat16) for r in rng]
        inputs.ref = reference.moe_allreduce_fusion(active, scales, tokens_in,
                                                    "kARResidualRMSNorm",
                                                    **moe_reference_kw(inputs))
        outs, opts = inputs.prepare(P.kARResidualRMSNorm, True)
        moe_allreduce_fusion(cupy.asarray(active[ctx.rank]), cupy.asarray(scales[ctx.rank]),
                             cupy.asarray(tokens_in[ctx.rank]), ws, P.kARResidualRMSNorm,
                             opts, outs)
        inputs.check(P.kARResidualRMSNorm, outs, f"split moe_allreduce_fusion {hidden}")
        for tokens in (7, MAX_TOKENS):
            inputs = Inputs(ctx, tokens, hidden, bfloat16, weight_bias=0.0)
            x, res = inputs.d_x.copy(), inputs.d_res.copy()
            outs = AllReduceFusionOutputs(residual_out=res, norm_out=x)
            allreduce_fusion(x, ws, P.kARResidualRMSNorm,
                             AllReduceFusionOptions(residual=res, rms_gamma=inputs.d_gamma,
                                                    rms_eps=1e-5, use_oneshot=True), outs)
            what = f"split in place {tokens}x{hidden}"
            assert np.array_equal(bits(res), bits(inputs.ref["residual_out"])), \
                f"{what}: residual_out"
            check_norm(x, inputs.ref["norm_out"], what)
        ws.check()
        ws.close()


@case
def auto_rule(ctx):
    """auto's measured rule (moecomm.tuning) around its boundaries, at hidden 3072 (384
    vectors: split from SMs + 1 rows, two-shot past 1536) and 2560 (320 vectors: split from
    5 x SMs + 1, two-shot past 1024): the plain one-shot, then the split one-shot, then
    two-shot, every call equal to the reference (and so to the others), FP8 too."""
    from moecomm.allreduce import Algorithm

    for hidden, per_sm, most in ((3072, 1, 1536), (2560, 5, 1024)):
        ws = create_allreduce_fusion_workspace(ctx.group, most + 1, hidden, bfloat16)
        first = per_sm * ws.allreduce.sms + 1
        expect = {first - 1: (Algorithm.ONESHOT, False), first: (Algorithm.ONESHOT, True),
                  most + 1: (Algorithm.TWOSHOT, False)}
        for tokens, (algo, split) in expect.items():
            what = f"auto {tokens}x{hidden}"
            if ctx.world == 2:  # the measured world size (others: the byte model, no split)
                assert ws.choose(tokens) == algo, f"{what}: {ws.choose(tokens)}, want {algo}"
                pushers = ws.launcher(algo, Quant.NONE, tokens)[4]
                assert (pushers > 0) == split, f"{what}: {pushers} pushing blocks"
            inputs = Inputs(ctx, tokens, hidden, bfloat16, weight_bias=0.0)
            for pattern in (P.kARResidualRMSNorm, P.kARResidualRMSNormOutFP8Quant):
                outs = inputs.run(ws, pattern, None)
                inputs.check(pattern, outs, f"{what} {pattern.name}")
        ws.check()
        ws.close()


@case
def twoshot_past_flag_slots(ctx):
    """Two-shot over more rows a rank than it has flag slots (1024 blocks): at hidden 1024
    a 128-thread block, several a SM, so the resident grid passes 1024; the grid stops
    there and its blocks loop. Twice (the next call's flags), then one-shot calls (the
    Lamport buffers, which a block past the slots used to write its flags into)."""
    from moecomm.allreduce import Algorithm
    from moecomm.op import device_facts

    hidden, tokens = 1024, ctx.world * 1025
    ws = create_allreduce_fusion_workspace(ctx.group, tokens, hidden, bfloat16)
    launcher, grid, block = ws.launcher(Algorithm.TWOSHOT, Quant.NONE, tokens)[:3]
    resident = device_facts().blocks_per_sm(launcher.kernel, block) * ws.allreduce.sms
    if resident <= 1024:
        pytest.skip(f"{resident} resident blocks of {block} threads: no grid past the slots")
    assert grid == 1024, grid
    for call in range(2):
        inputs = Inputs(ctx, tokens, hidden, bfloat16, weight_bias=0.0)
        for pattern in (P.kAllReduce, P.kARResidualRMSNorm):
            what = f"two-shot {tokens}x{hidden} {pattern.name} call {call}"
            outs = inputs.run(ws, pattern, False)
            agree = ctx.ranks_agree(written(outs))  # collective: before any assertion
            inputs.check(pattern, outs, what)
            assert agree, f"{what}: ranks differ"
    for call in range(3):
        inputs = Inputs(ctx, 7, hidden, bfloat16, weight_bias=0.0)
        outs = inputs.run(ws, P.kARResidualRMSNorm, True)
        inputs.check(P.kARResidualRMSNorm, outs, f"one-shot 7x{hidden} after, call {call}")
    ws.check()
    ws.close()


@case(dtypes=("bf16", "fp16"))
def rmsnorm_epilogue(ctx, dtype):
    """The epilogue alone (rmsnorm_fusion) on rows that are already reduced."""
    inputs = Inputs(ctx, 33, 3072, dtype, weight_bias=0.0)
    reduced = cupy.asarray(inputs.ref["allreduce_out"].view(dtype))
    for pattern in (P.kARResidualRMSNorm, *OUT_OF.values()):
        outs, opts = inputs.prepare(pattern, None)
        assert rmsnorm_fusion(reduced, pattern, opts, outs) is outs
        inputs.check(pattern, outs, f"rmsnorm_fusion {dtype_label(dtype)} {pattern.name}")


# ---------------------------------------------------------------- the MoE fusions
MOE_EPILOGUES = (P.kARResidualRMSNorm, P.kARResidualRMSNormOutFP4Quant)
E, K, PERM = 3, 4, 11  # active experts, top-k slots, permuted rows


def moe_workspace(ctx):
    """One workspace for the MoE cases, used in sequence by all of them."""
    return ctx.shared("moe_ws", lambda: create_allreduce_fusion_workspace(
        ctx.group, 16, 1024, bfloat16))


def moe_reference_kw(inputs):
    return dict(residual=inputs.residual, rms_gamma=inputs.gamma, rms_eps=1e-5,
                weight_bias=0.0, dtype=bfloat16)


@case
def moe_reduction(ctx):
    """moe_allreduce_fusion: each rank's weighted sum of its experts' rows plus the token
    input, computed in the kernel, then all-reduced (twice, on fresh inputs)."""
    ws = moe_workspace(ctx)
    for draw in range(2):
        inputs = Inputs(ctx, 7, 1024, bfloat16, weight_bias=0.0)
        rng = ctx.rank_rngs()
        active = [r.standard_normal((E, 7, 1024)).astype(bfloat16) for r in rng]
        scales = [r.random((E, 7)).astype(np.float32) for r in rng]
        tokens_in = [r.standard_normal((7, 1024)).astype(bfloat16) for r in rng]
        inputs.ref = reference.moe_allreduce_fusion(active, scales, tokens_in,
                                                    "kARResidualRMSNorm",
                                                    **moe_reference_kw(inputs))
        for pattern in MOE_EPILOGUES:
            for oneshot in (True, False):
                outs, opts = inputs.prepare(pattern, oneshot)
                moe_allreduce_fusion(cupy.asarray(active[ctx.rank]), cupy.asarray(scales[ctx.rank]),
                                     cupy.asarray(tokens_in[ctx.rank]), ws, pattern, opts, outs)
                inputs.check(pattern, outs, f"moe_allreduce_fusion {pattern.name} "
                                            f"oneshot={oneshot} draw {draw}")


@case(dtypes=("fp32", "bf16"))
def moe_finalize(ctx, esf_dtype):
    """moe_finalize_allreduce_fusion: un-permute the top-k rows (some slots empty), scale
    by expert_scale_factor of this dtype and routed_scaling_factor; with bf16 scales a
    shared expert's output is added too."""
    ws = moe_workspace(ctx)
    inputs = Inputs(ctx, 7, 1024, bfloat16, weight_bias=0.0)
    rng = ctx.rank_rngs()
    permuted = [r.standard_normal((PERM, 1024)).astype(bfloat16) for r in rng]
    index = [np.where(r.random((7, K)) < 0.25, -1, r.integers(0, PERM, (7, K))).astype(np.int32)
             for r in rng]
    esf = [r.random((7, K)).astype(esf_dtype) for r in rng]
    shared = ([r.standard_normal((7, 1024)).astype(bfloat16) for r in rng]
              if esf_dtype == bfloat16 else None)
    inputs.ref = reference.moe_finalize_allreduce_fusion(
        permuted, index, esf, shared, 0.75, "kARResidualRMSNorm", **moe_reference_kw(inputs))
    for pattern in MOE_EPILOGUES:
        for oneshot in (True, False):
            outs, opts = inputs.prepare(pattern, oneshot)
            moe_finalize_allreduce_fusion(
                cupy.asarray(permuted[ctx.rank]), cupy.asarray(index[ctx.rank]), ws, pattern,
                opts, outs, expert_scale_factor=cupy.asarray(esf[ctx.rank]),
                shared_expert_output=None if shared is None else cupy.asarray(shared[ctx.rank]),
                routed_scaling_factor=0.75)
            inputs.check(pattern, outs, f"moe_finalize_allreduce_fusion {pattern.name} "
                                        f"oneshot={oneshot} esf={dtype_label(esf_dtype)}")


@case
def moe_bad_input(ctx):
    ws = moe_workspace(ctx)
    with pytest.raises(ValueError, match="scale_input"):
        moe_allreduce_fusion(cupy.zeros((3, 7, 1024), bfloat16), cupy.zeros((2, 7), np.float32),
                             cupy.zeros((7, 1024), bfloat16), ws)
    with pytest.raises(TypeError, match="expanded_idx_to_permuted_idx"):
        moe_finalize_allreduce_fusion(cupy.zeros((5, 1024), bfloat16),
                                      cupy.zeros((7, 4), np.int64), ws)
    # an output over allreduce_in: every token may read any of its rows
    rows = cupy.zeros((28, 1024), bfloat16)
    outs = AllReduceFusionOutputs(residual_out=cupy.zeros((7, 1024), bfloat16),
                                  norm_out=rows[7:14])
    opts = AllReduceFusionOptions(residual=cupy.zeros((7, 1024), bfloat16),
                                  rms_gamma=cupy.ones(1024, bfloat16))
    with pytest.raises(ValueError, match="outputs.norm_out: overlaps allreduce_in"):
        moe_finalize_allreduce_fusion(rows, cupy.zeros((7, 4), np.int32), ws,
                                      P.kARResidualRMSNorm, opts, outs)


# ---------------------------------------------------------------- graphs, bad input
def workspace_2048(ctx):
    return ctx.shared("ws_2048", lambda: create_allreduce_fusion_workspace(
        ctx.group, 16, 2048, bfloat16))


@case
def graph_replay(ctx):
    """Every pattern (alternating one-shot and two-shot) captured in one graph, replayed
    twice on fresh inputs."""
    ws = workspace_2048(ctx)
    stream = cupy.cuda.Stream(non_blocking=True)
    inputs = Inputs(ctx, 9, 2048, bfloat16, 0.0)
    plan = [(p, i % 2 == 0) for i, p in enumerate(PLAIN)]
    prepared = [inputs.prepare(p, one) for p, one in plan]
    cupy.cuda.runtime.deviceSynchronize()
    with stream:
        stream.begin_capture()
        for (p, _), (outs, opts) in zip(plan, prepared):
            allreduce_fusion(inputs.d_x, ws, p, opts, outs, stream=stream)
        graph = stream.end_capture()
    captured = [outs for outs, _ in prepared]
    by_pattern = {p: outs for (p, _), outs in zip(plan, captured)}
    for replay in range(2):
        fresh = Inputs(ctx, 9, 2048, bfloat16, 0.0)
        for name in ("d_x", "d_res", "d_gamma"):
            getattr(inputs, name)[...] = getattr(fresh, name)
        inputs.xs, inputs.ref = fresh.xs, fresh.ref
        for outs in captured:
            for f in ("allreduce_out", "residual_out", "norm_out"):
                if getattr(outs, f) is not None:
                    getattr(outs, f).fill(np.nan)
        cupy.cuda.runtime.deviceSynchronize()
        graph.launch(stream)
        stream.synchronize()
        for (p, _), outs in zip(plan, captured):
            inputs.check(p, outs, f"graph replay {replay} {p.name}",
                         out_variant=by_pattern.get(OUT_OF.get(p)))
    ws.check(stream)


@case
def late_rank_burst(ctx):
    """A long burst of one-shot FP8 calls at exactly the Lamport slot size (128 x 4096
    bf16 = 1 MiB, 128 spinning blocks) while one rank launches late every third call:
    each call may cost the delay, never a stall on top of it. Waiters that read the
    host-mapped error word while spinning once turned such a delay into ~1 ms per call
    for the calls that followed. Timed only where every rank has a GPU of its own."""
    if not ctx.exclusive:
        pytest.skip("ranks share a GPU: waits cost time slices, not a bounded delay")
    tokens, hidden, calls, delay_s = 128, 4096, 90, 300e-6
    with create_allreduce_fusion_workspace(ctx.group, tokens, hidden, bfloat16) as ws:
        assert ws.allreduce.max_oneshot_bytes == tokens * hidden * 2, "not at the slot size"
        inputs = Inputs(ctx, tokens, hidden, bfloat16, 0.0)
        pattern = P.kARResidualRMSNormOutFP8Quant  # writes norm_out: the check needs it
        outs, opts = inputs.prepare(pattern, True)
        cupy.cuda.runtime.deviceSynchronize()  # inputs and poison are on the null stream
        stream = ctx.stream
        for _ in range(5):
            allreduce_fusion(inputs.d_x, ws, pattern, opts, outs, stream=stream)
        stream.synchronize()
        ctx.barrier()
        start = time.perf_counter()
        for i in range(calls):
            if ctx.rank == 1 and i % 3 == 0:
                stream.synchronize()
                time.sleep(delay_s)
            allreduce_fusion(inputs.d_x, ws, pattern, opts, outs, stream=stream)
        stream.synchronize()
        elapsed = time.perf_counter() - start
        ws.check(stream)
        inputs.check(pattern, outs, "after the burst")
    slowest = max(ctx.allgather(elapsed))
    # the delays alone: calls / 3 x (delay + a host sync); allow 0.25 ms per call on top
    bound = calls / 3 * (delay_s + 200e-6) + calls * 250e-6
    assert slowest <= bound, f"{calls} calls took {slowest * 1e3:.1f} ms (bound {bound * 1e3:.1f})"


@case
def bad_input(ctx):
    """Clear errors before any launch."""
    ws = workspace_2048(ctx)
    x = cupy.zeros((17, 2048), bfloat16)
    opts = AllReduceFusionOptions(residual=cupy.zeros((17, 2048), bfloat16),
                                  rms_gamma=cupy.ones(2048, bfloat16))
    outs = AllReduceFusionOutputs(residual_out=cupy.zeros((17, 2048), bfloat16))
    with pytest.raises(ValueError, match="exceeds the workspace's max_token_num 16"):
        allreduce_fusion(x, ws, P.kARResidualRMSNorm, opts, outs)
    x = cupy.zeros((4, 1024), bfloat16)
    with pytest.raises(ValueError, match="hidden_dim 2048"):
        allreduce_fusion(x, ws, P.kARResidualRMSNorm)
    x = cupy.zeros((4, 2048), bfloat16)
    opts = AllReduceFusionOptions(residual=cupy.zeros((4, 2048), bfloat16),
                                  rms_gamma=cupy.ones(2048, bfloat16))
    with pytest.raises(ValueError, match=r"writes outputs\.residual_out"):
        allreduce_fusion(x, ws, P.kARResidualRMSNorm, opts, AllReduceFusionOutputs())
    outs = AllReduceFusionOutputs(residual_out=cupy.zeros((4, 2048), bfloat16),
                                  norm_out=cupy.zeros((4, 2048), bfloat16),
                                  quant_out=cupy.zeros((4, 2048), np.uint8))
    with pytest.raises(ValueError, match="use the Out variant"):
        allreduce_fusion(x, ws, P.kARResidualRMSNormFP8Quant, opts, outs)
    outs.norm_out = None
    with pytest.raises(ValueError, match=r"needs options\.scale_factor"):
        allreduce_fusion(x, ws, P.kARResidualRMSNormFP8Quant, opts, outs)
    opts.block_quant_group_size = 48
    outs.scale_out = cupy.zeros(64, np.int32)
    with pytest.raises(ValueError, match="block_quant_group_size=48"):
        allreduce_fusion(x, ws, P.kARResidualRMSNormPerTokenGroupFP8PackedQuant, opts, outs)
    with pytest.raises(TypeError, match="does not match the workspace"):
        allreduce_fusion(x.astype(np.float16), ws, P.kAllReduce)
    with pytest.raises(ValueError, match="residual"):
        allreduce_fusion(x, ws, P.kARResidualRMSNorm,
                         AllReduceFusionOptions(rms_gamma=opts.rms_gamma),
                         AllReduceFusionOutputs(residual_out=cupy.zeros((4, 2048), bfloat16),
                                                norm_out=cupy.zeros((4, 2048), bfloat16)))


if __name__ == "__main__":
    main()
