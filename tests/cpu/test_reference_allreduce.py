"""All-reduce, residual + RMSNorm, allreduce_fusion and the MoE reductions of the reference."""

import enum

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402
from moecomm.constants import PATTERNS, Quant, Source  # noqa: E402
from moecomm.constants import AllReduceFusionPattern as P  # noqa: E402

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ all-reduce, RMSNorm

def test_all_reduce_order_and_rounding():
    a = np.array([1e8, 1.0, -1e8], np.float32)
    inputs = [a[[0]], a[[1]], a[[2]]]
    # ((1e8 + 1) + -1e8) in fp32 == 0, not 1
    assert ref.all_reduce(inputs)[0] == 0.0
    assert ref.all_reduce([a[[0]], a[[2]], a[[1]]])[0] == 1.0
    xs = [RNG.standard_normal((4, 32)).astype(np.float32) for _ in range(3)]
    bf = [ref.to_bf16_bits(x) for x in xs]
    out = ref.all_reduce(bf)
    assert out.dtype == np.uint16
    f = [ref.from_bf16_bits(b) for b in bf]
    np.testing.assert_array_equal(out, ref.to_bf16_bits((f[0] + f[1]) + f[2]))
    fp16 = ref.all_reduce([x.astype(np.float16) for x in xs])
    assert fp16.dtype == np.float16
    z = ref.all_reduce([np.array([-0.0], np.float32)] * 3)
    assert z.view(np.uint32)[0] == 0  # +0.0


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("weight_bias", [0.0, 1.0])
def test_residual_rmsnorm_vs_float64(dtype, weight_bias):
    t, h = 7, 256
    x = ref.cast_from_float32(RNG.standard_normal((t, h)).astype(np.float32) * 3, dtype)
    res = ref.cast_from_float32(RNG.standard_normal((t, h)).astype(np.float32), dtype)
    gamma = ref.cast_from_float32(RNG.standard_normal(h).astype(np.float32), dtype)
    eps = 1e-5
    res_out, norm = ref.residual_rmsnorm(x, res, gamma, eps, weight_bias)
    assert res_out.dtype == x.dtype and norm.dtype == x.dtype
    # residual_out is exactly the I/O rounding of the fp32 sum
    np.testing.assert_array_equal(res_out, ref.cast_from_float32(ref.to_float32(x) + ref.to_float32(res), dtype))
    r = ref.to_float32(res_out).astype(np.float64)
    g = ref.to_float32(gamma).astype(np.float64) + weight_bias
    want = r / np.sqrt(np.mean(r * r, axis=1, keepdims=True) + eps) * g
    got = ref.to_float32(norm).astype(np.float64)
    # half an ulp of the I/O dtype (fp32: a few ulp of fp32 arithmetic), plus half the
    # fp16 subnormal spacing
    rel = {"bf16": 2 ** -8, "fp16": 2 ** -11, "fp32": 2 ** -22}[dtype]
    atol = {"bf16": 1e-38, "fp16": 2 ** -25, "fp32": 1e-38}[dtype]
    assert np.all(np.abs(got - want) <= np.abs(want) * rel * 1.001 + atol)


# ------------------------------------------------------------------ allreduce_fusion

PLAIN_PATTERNS = [p for p, spec in PATTERNS.items() if spec.source == Source.INPUT]
MOE_PATTERNS = [P.kMoEReductionARResidualRMSNorm, P.kMoEFinalizeARResidualRMSNorm]


@pytest.mark.parametrize("pattern", PLAIN_PATTERNS, ids=lambda p: p.name)
def test_allreduce_fusion_is_composition(pattern):
    t, h, world = 5, 128, 3
    xs = [ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32)) for _ in range(world)]
    res = ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32))
    gamma = ref.to_bf16_bits(RNG.standard_normal(h).astype(np.float32))
    kw = dict(residual=res, rms_gamma=gamma, rms_eps=1e-6, weight_bias=0.0,
              scale_factor=2.0, layout="swizzled", block_quant_group_size=64)
    out = ref.allreduce_fusion(xs, pattern, **kw)
    assert set(out) == {"allreduce_out", *ref.pattern_outputs(pattern)}
    # the int value and the name pick the same pattern
    for alias in (int(pattern), pattern.name):
        again = ref.allreduce_fusion(xs, alias, **kw)
        assert again.keys() == out.keys()
        for key in out:
            np.testing.assert_array_equal(again[key], out[key])
    ar = ref.all_reduce(xs)
    np.testing.assert_array_equal(out["allreduce_out"], ar)
    if pattern == P.kAllReduce:
        return
    r_out, n_out = ref.residual_rmsnorm(ar, res, gamma, 1e-6, 0.0)
    np.testing.assert_array_equal(out["residual_out"], r_out)
    if "norm_out" in out:
        np.testing.assert_array_equal(out["norm_out"], n_out)
    y = ref.from_bf16_bits(n_out)
    quant = PATTERNS[pattern].quant
    if quant == Quant.FP8:
        np.testing.assert_array_equal(out["quant_out"], ref.quant_fp8(y, 2.0))
        assert "scale_out" not in out
    elif quant == Quant.NVFP4:
        q, s = ref.quant_nvfp4(y, 2.0, "swizzled")
        np.testing.assert_array_equal(out["quant_out"], q)
        np.testing.assert_array_equal(out["scale_out"], s)
    elif quant == Quant.GROUP_FP8:
        q, s = ref.quant_fp8_per_token_group(y, 64)
        np.testing.assert_array_equal(out["quant_out"], q)
        np.testing.assert_array_equal(out["scale_out"], s)
    elif quant == Quant.DYNAMIC_FP8:
        q, s = ref.quant_fp8_dynamic_per_token(y)
        np.testing.assert_array_equal(out["quant_out"], q)
        np.testing.assert_array_equal(out["scale_out"], s)
    else:
        assert quant == Quant.NONE and "quant_out" not in out


def test_as_fusion_pattern():
    f = ref.as_fusion_pattern
    for p in P:
        assert f(p) is p and f(int(p)) is p and f(p.name) is p and f(np.int32(int(p))) is p
    assert f(6) is P.kMoEReductionARResidualRMSNorm and f(11) is P.kARResidualRMSNormOutDynamicFP8Quant

    class Other(enum.IntEnum):  # another numbering of the same names: matched by name
        kARResidualRMSNormPerTokenGroupFP8PackedQuant = 6
    assert f(Other.kARResidualRMSNormPerTokenGroupFP8PackedQuant) is P.kARResidualRMSNormPerTokenGroupFP8PackedQuant

    class FakeEnum:
        name = "kAllReduce"
    assert f(FakeEnum()) is P.kAllReduce
    for bad in ("kNoSuchPattern", 12, -1):
        with pytest.raises(ValueError):
            f(bad)
    for bad in (True, 1.0, None):
        with pytest.raises(TypeError):
            f(bad)


def test_pattern_outputs_are_the_constants_table():
    assert not hasattr(ref, "ALLREDUCE_FUSION_PATTERNS")
    for p, spec in PATTERNS.items():
        assert ref.pattern_outputs(p) == ref.pattern_outputs(int(p)) == ref.pattern_outputs(p.name) \
            == spec.outputs
    assert ref.pattern_outputs(P.kARResidualRMSNormFP8Quant) == ("residual_out", "quant_out")
    assert ref.pattern_outputs(P.kARResidualRMSNormOutFP4Quant) == (
        "residual_out", "norm_out", "quant_out", "scale_out")
    assert ref.pattern_outputs(P.kMoEFinalizeARResidualRMSNorm) == ("residual_out", "norm_out")


def test_allreduce_fusion_errors():
    xs = [np.zeros((2, 32), np.float32)] * 2
    g = np.ones(32, np.float32)
    with pytest.raises(ValueError):
        ref.allreduce_fusion(xs, "kARResidualRMSNorm", rms_gamma=g)
    with pytest.raises(ValueError):
        ref.allreduce_fusion(xs, "kARResidualRMSNormFP8Quant", residual=xs[0], rms_gamma=g)
    with pytest.raises(ValueError):
        ref.allreduce_fusion(xs, "kNoSuchPattern")
    for size in (None, 4, 12):  # not one of constants.GROUP_FP8_SIZES
        with pytest.raises(ValueError, match="block_quant_group_size"):
            ref.allreduce_fusion(xs, P.kARResidualRMSNormPerTokenGroupFP8PackedQuant,
                                 residual=xs[0], rms_gamma=g, block_quant_group_size=size)


@pytest.mark.parametrize("pattern,entry", [(P.kMoEReductionARResidualRMSNorm, "moe_allreduce_fusion"),
                                           (P.kMoEFinalizeARResidualRMSNorm,
                                            "moe_finalize_allreduce_fusion")])
def test_allreduce_fusion_refuses_moe_patterns(pattern, entry):
    xs = [np.zeros((2, 32), np.float32)] * 2
    for alias in (pattern, int(pattern), pattern.name):
        with pytest.raises(ValueError, match=entry):
            ref.allreduce_fusion(xs, alias, residual=xs[0], rms_gamma=np.ones(32, np.float32))


# ------------------------------------------------------------------ MoE reductions

def test_moe_reduction():
    e, t, h = 3, 4, 16
    act = RNG.standard_normal((e, t, h)).astype(np.float32)
    sc = RNG.standard_normal((e, t)).astype(np.float32)
    tok = RNG.standard_normal((t, h)).astype(np.float32)
    out = ref.moe_reduction(act, sc, tok)
    want = np.zeros((t, h), np.float32)
    for i in range(e):
        want = want + act[i] * sc[i][:, None]
    np.testing.assert_array_equal(out, want + tok)
    out_bf = ref.moe_reduction(ref.to_bf16_bits(act), sc, ref.to_bf16_bits(tok))
    assert out_bf.dtype == np.uint16
    np.testing.assert_allclose(ref.from_bf16_bits(out_bf),
                               (act.astype(np.float64) * sc[..., None]).sum(0) + tok, rtol=0.02, atol=0.05)


def test_moe_finalize_hand_example():
    rows = np.array([[1, 2], [10, 20], [100, 200], [1000, 2000]], np.float32)
    idx = np.array([[0, 2], [-1, 3], [1, -1]], np.int32)
    scale = np.array([[0.5, 2.0], [9.0, 1.0], [3.0, 7.0]], np.float32)
    shared = np.array([[1, 1], [2, 2], [3, 3]], np.float32)
    out = ref.moe_finalize(rows, idx, scale, shared, routed_scaling_factor=2.5)
    want = np.array([[(0.5 * 1 + 2 * 100) * 2.5 + 1, (0.5 * 2 + 2 * 200) * 2.5 + 1],
                     [1000 * 2.5 + 2, 2000 * 2.5 + 2],
                     [30 * 2.5 + 3, 60 * 2.5 + 3]], np.float32)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(ref.moe_finalize(rows, idx), [[101, 202], [1000, 2000], [10, 20]])
    with pytest.raises(ValueError):
        ref.moe_finalize(rows, np.array([[4]]))


def test_moe_fusions_compose():
    world, t, h, k = 2, 3, 32, 2
    rows = [ref.to_bf16_bits(RNG.standard_normal((t * k, h)).astype(np.float32)) for _ in range(world)]
    idx = [RNG.permutation(t * k).reshape(t, k).astype(np.int32) for _ in range(world)]
    scale = [RNG.random((t, k)).astype(np.float32) for _ in range(world)]
    shared = [ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32)) for _ in range(world)]
    res = ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32))
    gamma = ref.to_bf16_bits(np.ones(h, np.float32))
    out = ref.moe_finalize_allreduce_fusion(rows, idx, scale, shared, 2.5, "kARResidualRMSNorm",
                                            residual=res, rms_gamma=gamma)
    contrib = [ref.moe_finalize(rows[r], idx[r], scale[r], shared[r], 2.5) for r in range(world)]
    want = ref.allreduce_fusion(contrib, "kARResidualRMSNorm", residual=res, rms_gamma=gamma)
    for key in want:
        np.testing.assert_array_equal(out[key], want[key])
    act = [RNG.standard_normal((2, t, h)).astype(np.float32) for _ in range(world)]
    sc = [RNG.standard_normal((2, t)).astype(np.float32) for _ in range(world)]
    tok = [RNG.standard_normal((t, h)).astype(np.float32) for _ in range(world)]
    o2 = ref.moe_allreduce_fusion(act, sc, tok, "kAllReduce")
    np.testing.assert_array_equal(o2["allreduce_out"],
                                  ref.all_reduce([ref.moe_reduction(*z) for z in zip(act, sc, tok)]))


def test_moe_fusions_take_their_moe_pattern():
    world, t, h, k, e = 2, 3, 32, 2, 2
    res = ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32))
    kw = dict(residual=res, rms_gamma=ref.to_bf16_bits(RNG.standard_normal(h).astype(np.float32)))
    act = [ref.to_bf16_bits(RNG.standard_normal((e, t, h)).astype(np.float32)) for _ in range(world)]
    sc = [RNG.standard_normal((e, t)).astype(np.float32) for _ in range(world)]
    tok = [ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32)) for _ in range(world)]
    rows = [ref.to_bf16_bits(RNG.standard_normal((t * k, h)).astype(np.float32)) for _ in range(world)]
    idx = [RNG.permutation(t * k).reshape(t, k).astype(np.int32) for _ in range(world)]
    red, fin = P.kMoEReductionARResidualRMSNorm, P.kMoEFinalizeARResidualRMSNorm
    # default (kARResidualRMSNorm) == the MoE pattern, given as member, int or name
    want = ref.moe_allreduce_fusion(act, sc, tok, **kw)
    assert set(want) == {"allreduce_out", *ref.pattern_outputs(red)}
    for alias in (red, int(red), red.name):
        got = ref.moe_allreduce_fusion(act, sc, tok, alias, **kw)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    want = ref.moe_finalize_allreduce_fusion(rows, idx, **kw)
    for alias in (fin, int(fin), fin.name):
        got = ref.moe_finalize_allreduce_fusion(rows, idx, pattern=alias, **kw)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # each entry point refuses the other's pattern
    with pytest.raises(ValueError, match="moe_finalize_allreduce_fusion"):
        ref.moe_allreduce_fusion(act, sc, tok, fin, **kw)
    with pytest.raises(ValueError, match="moe_allreduce_fusion"):
        ref.moe_finalize_allreduce_fusion(rows, idx, pattern=int(red), **kw)
    # a plain quantizing pattern after the MoE reduction
    q = ref.moe_allreduce_fusion(act, sc, tok, P.kARResidualRMSNormOutFP8Quant, scale_factor=0.5, **kw)
    assert set(q) == {"allreduce_out", "residual_out", "norm_out", "quant_out"}
