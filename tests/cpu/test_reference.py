"""The NumPy reference (moecomm.reference) against ml_dtypes, float64 and hand-worked cases."""

import math

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402

RNG = np.random.default_rng(1234)


def _bits32(x):
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def _f32_from_bits(b):
    return np.asarray(b, np.uint32).view(np.float32)


def _random_f32(n, lo_exp=-140, hi_exp=128):
    """Random fp32 over many binades, both signs."""
    mant = RNG.uniform(1.0, 2.0, n)
    exp = RNG.integers(lo_exp, hi_exp, n)
    sign = RNG.choice([-1.0, 1.0], n)
    with np.errstate(over="ignore"):
        return (sign * np.ldexp(mant, exp)).astype(np.float32)


# ------------------------------------------------------------------ bf16

def test_bf16_encode_matches_ml_dtypes():
    x = np.concatenate([
        _random_f32(20000),
        RNG.standard_normal(5000).astype(np.float32),
        # exact ties: low 16 bits 0x8000 with even and odd kept lsb
        _f32_from_bits((RNG.integers(0, 0x7F7F, 2000, dtype=np.uint32) << 16) | 0x8000),
        _f32_from_bits((RNG.integers(0x8000, 0xFF7F, 2000, dtype=np.uint32) << 16) | 0x8000),
        # fp32 subnormals and values near the bf16 subnormal boundary
        _f32_from_bits(RNG.integers(1, 0x00800000, 2000, dtype=np.uint32)),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38,
                  np.float32(1.0) + np.float32(2 ** -8), 1.0 + 3 * 2 ** -9], np.float32),
    ])
    ours = ref.to_bf16_bits(x)
    theirs = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    # round-to-nearest-even on exact ties
    assert ref.to_bf16_bits(np.float32(1.0 + 2 ** -8)) == 0x3F80       # tie, keep even
    assert ref.to_bf16_bits(np.float32(1.0 + 3 * 2 ** -8)) == 0x3F82   # tie, round up to even
    assert ref.to_bf16_bits(np.float32(3.4028235e38)) == 0x7F80        # overflow -> inf


def test_bf16_nan_and_decode_all_patterns():
    nans = _f32_from_bits(np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], np.uint32))
    out = ref.to_bf16_bits(nans)
    assert np.all(np.isnan(ref.from_bf16_bits(out)))
    assert list(out >> 15) == [0, 1, 0, 0]
    allbits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = ref.from_bf16_bits(allbits)
    theirs = allbits.view(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    ok = ~np.isnan(ours)
    np.testing.assert_array_equal(_bits32(ours[ok]), _bits32(theirs[ok]))
    # exact round trip for every non-NaN pattern
    np.testing.assert_array_equal(ref.to_bf16_bits(ours[ok]), allbits[ok])


def test_dtype_helpers():
    x = RNG.standard_normal((3, 5)).astype(np.float32)
    b = ref.cast_from_float32(x, "bf16")
    assert b.dtype == np.uint16
    np.testing.assert_array_equal(ref.to_float32(b), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(ref.to_float32(x.astype(ml_dtypes.bfloat16)), ref.to_float32(b))
    assert ref.cast_from_float32(x, np.float16).dtype == np.float16
    assert ref.io_dtype_name(np.uint16) == "bf16"
    with pytest.raises(TypeError):
        ref.io_dtype_name(np.int32)


# ------------------------------------------------------------------ e4m3

def test_e4m3_decode_all_codes():
    codes = np.arange(256, dtype=np.uint8)
    ours = ref.fp8_e4m3_decode(codes)
    theirs = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    assert set(np.nonzero(np.isnan(ours))[0]) == {0x7F, 0xFF}
    ok = ~np.isnan(ours)
    np.testing.assert_array_equal(_bits32(ours[ok]), _bits32(theirs[ok]))
    # encode(decode(c)) == c for every non-NaN code
    np.testing.assert_array_equal(ref.fp8_e4m3_encode(ours[ok]), codes[ok])


def test_e4m3_encode_matches_ml_dtypes():
    vals = ref.fp8_e4m3_decode(np.arange(0x7F, dtype=np.uint8))  # 0 .. 448 positive codes
    mids = ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)  # exact ties
    x = np.concatenate([
        _random_f32(20000, -20, 10),
        RNG.standard_normal(5000).astype(np.float32) * 100,
        mids, -mids,
        np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0)),
        _f32_from_bits(RNG.integers(1, 0x00800000, 500, dtype=np.uint32)),
        np.array([0.0, -0.0, 2 ** -10, -2 ** -10, 2 ** -9, 1.5 * 2 ** -10, 448.0, -448.0], np.float32),
    ])
    ours = ref.fp8_e4m3_encode(x)
    clipped = np.clip(x, -448, 448)
    theirs = clipped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(ours, theirs)


def test_e4m3_saturation_and_nan():
    x = np.array([449, 463.9, 464, 465, 480, 1e30, np.inf, -464, -1e30, -np.inf, np.nan, -np.nan],
                 np.float32)
    out = ref.fp8_e4m3_encode(x)
    assert list(out) == [0x7E] * 7 + [0xFE] * 3 + [0x7F, 0x7F]
    assert ref.fp8_e4m3_encode(np.float32(-1e-10)) == 0x80
    assert ref.fp8_e4m3_encode(np.float32(2 ** -10)) == 0x00          # tie -> even (0)
    assert ref.fp8_e4m3_encode(np.float32(3 * 2 ** -10)) == 0x02      # tie 1.5 units -> 2
    assert ref.fp8_e4m3_encode(np.float32(15 * 2 ** -10)) == 0x08     # 7.5 units -> min normal


# ------------------------------------------------------------------ e2m1

def test_e2m1_decode_all_codes():
    codes = np.arange(16, dtype=np.uint8)
    ours = ref.fp4_e2m1_decode(codes)
    theirs = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(_bits32(ours), _bits32(theirs))
    np.testing.assert_array_equal(ref.fp4_e2m1_encode(ours), codes)


def test_e2m1_encode_ties_random_saturation():
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    expected = [0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    np.testing.assert_array_equal(ref.fp4_e2m1_decode(ref.fp4_e2m1_encode(ties)), expected)
    np.testing.assert_array_equal(ref.fp4_e2m1_decode(ref.fp4_e2m1_encode(-ties)), -np.array(expected))
    x = np.concatenate([ties, -ties, RNG.uniform(-8, 8, 20000).astype(np.float32),
                        _random_f32(5000, -12, 4),
                        np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(0))])
    ours = ref.fp4_e2m1_encode(x)
    theirs = np.clip(x, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    np.testing.assert_array_equal(ours, theirs)
    sat = ref.fp4_e2m1_encode(np.array([6.5, 7, 1e9, np.inf, -7, -np.inf, np.nan], np.float32))
    assert list(sat) == [7, 7, 7, 7, 15, 15, 7]
    assert ref.fp4_e2m1_encode(np.float32(-0.0)) == 8


# ------------------------------------------------------------------ dense sweep

def test_encoders_dense_sweep_of_fp32_bit_patterns():
    """~1M fp32 bit patterns spread over the whole range (prime stride, so low mantissa
    bits vary): bf16, e4m3 and e2m1 encoders against ml_dtypes."""
    bits = np.arange(0, 2 ** 32, 4099, dtype=np.uint64).astype(np.uint32)
    x = _f32_from_bits(bits)
    x = x[~np.isnan(x)]
    np.testing.assert_array_equal(ref.to_bf16_bits(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(ref.fp8_e4m3_encode(x),
                                  np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    np.testing.assert_array_equal(ref.fp4_e2m1_encode(x),
                                  np.clip(x, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF)


# ------------------------------------------------------------------ UE8M0

def test_ue8m0():
    e = np.arange(255, dtype=np.uint8)
    np.testing.assert_array_equal(ref.ue8m0_decode(e), np.array([2.0 ** (i - 127) for i in range(255)], np.float32))
    assert np.isnan(ref.ue8m0_decode(np.uint8(255)))
    v = np.concatenate([_random_f32(5000, -126, 127), np.ldexp(np.float32(1), np.arange(-126, 128)).astype(np.float32)])
    v = np.abs(v)
    got = ref.ue8m0_encode_ceil(v).astype(int)
    want = np.array([math.frexp(float(a))[1] - 1 + (0 if math.frexp(float(a))[0] == 0.5 else 1) + 127 for a in v])
    np.testing.assert_array_equal(got, np.minimum(want, 254))
    assert 2.0 ** (int(ref.ue8m0_encode_ceil(np.float32(1e-10))) - 127) == 2.0 ** -33
    assert list(ref.ue8m0_encode_ceil(np.array([0, -1, np.inf, np.nan], np.float32))) == [0, 0, 254, 255]


# ------------------------------------------------------------------ NVFP4

def test_compute_fp4_swizzled_layout_sf_size():
    f = ref.compute_fp4_swizzled_layout_sf_size
    assert f(1, 4) == 512
    assert f(1, 1) == 512
    assert f(128, 448) == 128 * 448
    assert f(129, 7) == 256 * 8
    assert f(0, 0) == 0
    assert f(9, 5, row_size=8) == 16 * 8


@pytest.mark.parametrize("m,n", [(1, 16), (5, 64), (128, 80), (130, 256), (257, 48)])
def test_swizzle_offset_bijection(m, n):
    k = n // 16
    size = ref.compute_fp4_swizzled_layout_sf_size(m, k)
    mp, kp = -(-m // 128) * 128, -(-k // 4) * 4
    mm, kk = np.meshgrid(np.arange(mp), np.arange(kp), indexing="ij")
    off = ref.swizzled_sf_offset(mm, kk, n)
    assert off.size == size
    np.testing.assert_array_equal(np.sort(off.reshape(-1)), np.arange(size))


def test_swizzle_offset_formula_small():
    o = ref.swizzled_sf_offset
    n = 256  # Kt = 4
    assert o(0, 0, n) == 0
    assert o(0, 1, n) == 1
    assert o(0, 3, n) == 3
    assert o(0, 4, n) == 512
    assert o(1, 0, n) == 16
    assert o(31, 0, n) == 31 * 16
    assert o(32, 0, n) == 4
    assert o(96, 2, n) == 12 + 2
    assert o(128, 0, n) == 4 * 512
    assert o(129, 5, n) == 4 * 512 + 512 + 16 + 1
    # vectorised and broadcasting
    np.testing.assert_array_equal(o(np.array([0, 1, 32]), 0, n), [0, 16, 4])


def _nvfp4_reference_slow(x, gs):
    """Straight-line float32 recomputation: nearest e2m1 grid point by brute force."""
    m, n = x.shape
    b = x.reshape(m, n // 16, 16).astype(np.float32)
    amax = np.abs(b).max(-1)
    sf = ((np.float32(gs) * amax) / np.float32(6)).astype(np.float32)
    sf = np.clip(sf, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(sf[..., None] == 0, 0, (b * np.float32(gs)) / sf[..., None]).astype(np.float32)
    s = np.clip(s, -6, 6)
    return s.astype(ml_dtypes.float4_e2m1fn).astype(np.float32).reshape(m, n), sf


@pytest.mark.parametrize("m,n", [(3, 32), (130, 96)])
def test_nvfp4_quant(m, n):
    x = (RNG.standard_normal((m, n)) * np.exp(RNG.uniform(-3, 3, (m, 1)))).astype(np.float32)
    x[0, :16] = 0.0            # an all-zero block -> sf 0, codes 0
    x[1, 16:32] = 1e-30        # sf rounds to 0 -> codes 0
    gs = np.float32(448 * 6 / np.abs(x).max())
    packed, sf_sw = ref.quant_nvfp4(x, gs, "swizzled")
    packed_lin, sf_lin = ref.quant_nvfp4(x, gs, "linear")
    assert packed.shape == (m, n // 2) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, packed_lin)
    assert sf_lin.shape == (m, n // 16)
    assert sf_sw.shape == (ref.compute_fp4_swizzled_layout_sf_size(m, n // 16),)
    np.testing.assert_array_equal(ref.unswizzle_sf(sf_sw, m, n), sf_lin)
    # padding bytes are zero
    mask = np.ones(sf_sw.size, bool)
    mm, kk = np.meshgrid(np.arange(m), np.arange(n // 16), indexing="ij")
    mask[ref.swizzled_sf_offset(mm, kk, n).reshape(-1)] = False
    assert not sf_sw[mask].any()
    # nibble order: even element in the low nibble
    codes = ref.unpack_fp4(packed)
    np.testing.assert_array_equal(packed[:, 0] & 0xF, codes[:, 0])
    np.testing.assert_array_equal(packed[:, 0] >> 4, codes[:, 1])
    # the same thing computed independently with ml_dtypes
    want_vals, want_sf = _nvfp4_reference_slow(x, gs)
    np.testing.assert_array_equal(ref.fp8_e4m3_decode(sf_lin), want_sf)
    np.testing.assert_array_equal(ref.fp4_e2m1_decode(codes), want_vals)
    assert not codes[0, :16].any() and not codes[1, 16:32].any()
    assert sf_lin[0, 0] == 0 and sf_lin[1, 1] == 0
    # decoded back within the format's error: <= one e2m1 unit (1.0) of the block scale
    deq = ref.dequant_nvfp4(packed, sf_sw, gs, m, n, "swizzled")
    unit = np.repeat(ref.fp8_e4m3_decode(sf_lin), 16, axis=1) / gs
    assert np.all(np.abs(deq - x) <= unit * 1.0 + 1e-30)
    np.testing.assert_allclose(deq, x, rtol=0.5, atol=np.abs(x).max() * 0.1)


def test_nvfp4_rejects_bad_args():
    with pytest.raises(ValueError):
        ref.quant_nvfp4(np.zeros((2, 24), np.float32), 1.0)
    with pytest.raises(ValueError):
        ref.quant_nvfp4(np.zeros((2, 32), np.float32), 0.0)


# ------------------------------------------------------------------ FP8 quantizers

def test_quant_fp8_static():
    x = RNG.standard_normal((4, 64)).astype(np.float32) * 10
    q = ref.quant_fp8(x, 3.0)
    np.testing.assert_array_equal(q, np.clip(x * np.float32(3.0), -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert ref.quant_fp8(np.float32(1000.0), 1.0) == 0x7E
    # a device scalar copied to host (one-element array) works as the scale
    np.testing.assert_array_equal(ref.quant_fp8(x, np.array([3.0], np.float32)), q)
    with pytest.raises(ValueError):
        ref.quant_fp8(x, np.array([1.0, 2.0]))


def test_ue8m0_packing():
    e = np.array([[1, 2, 3, 4, 5, 6], [250, 0, 127, 128, 9, 10]], np.uint8)
    p = ref.pack_ue8m0(e)
    assert p.shape == (2, 2) and p.dtype == np.int32
    assert p[0, 0] == 0x04030201 and p[0, 1] == 0x00000605
    assert int(p[1, 0]) & 0xFF == 250
    np.testing.assert_array_equal(ref.unpack_ue8m0(p, 6), e)
    # MN-major TMA-aligned storage: M=2 -> align 4; size = 2 + 1*4
    st = ref.ue8m0_to_mn_major_storage(p)
    assert ref.ue8m0_mn_major_storage_size(2, 6) == st.size == 6
    assert list(st) == [p[0, 0], p[1, 0], 0, 0, p[0, 1], p[1, 1]]
    np.testing.assert_array_equal(ref.ue8m0_from_mn_major_storage(st, 2, 6), p)
    assert ref.ue8m0_mn_major_storage_size(3, 4) == 3
    assert ref.ue8m0_mn_major_storage_size(5, 12) == 5 + 2 * 8


@pytest.mark.parametrize("n,g", [(512, 128), (640, 128), (192, 64)])
def test_quant_fp8_per_token_group(n, g):
    m = 5
    x = (RNG.standard_normal((m, n)) * np.exp(RNG.uniform(-8, 8, (m, n // g))).repeat(g, 1)).astype(np.float32)
    x[0, :g] = 0.0
    q, packed = ref.quant_fp8_per_token_group(x, g)
    G = n // g
    assert q.shape == (m, n) and packed.shape == (m, -(-G // 4)) and packed.dtype == np.int32
    e = ref.unpack_ue8m0(packed, G)
    # exponent = ceil(log2(max(amax/448, 1e-10))), checked in float64 via frexp
    amax = np.abs(x.reshape(m, G, g)).max(-1)
    v = np.maximum(amax / np.float32(448), np.float32(1e-10)).astype(np.float32)
    for (i, j), val in np.ndenumerate(v):
        fr, ex = math.frexp(float(val))
        assert e[i, j] == (ex - 1 if fr == 0.5 else ex) + 127
    assert e[0, 0] == 94  # all-zero group -> 2**-33
    # q is the e4m3 of x / scale, never saturating
    scale = np.repeat(ref.ue8m0_decode(e), g, axis=1)
    np.testing.assert_array_equal(q, (x / scale).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert np.all(np.abs(x / scale) <= 448 * (1 + 2 ** -23))
    deq = ref.dequant_fp8_per_token_group(q, packed, g)
    assert np.all(np.abs(deq - x) <= np.abs(x) * 2 ** -4 + scale * 2 ** -10)
    # unused bytes of the last int32 are zero
    if G % 4:
        b = packed.view(np.uint8).reshape(m, -1)
        assert not b[:, G:].any()
    with pytest.raises(ValueError):
        ref.quant_fp8_per_token_group(x, 100)


def test_quant_fp8_dynamic_per_token():
    x = (RNG.standard_normal((6, 96)) * np.array([1e-3, 1, 10, 1e3, 1e-12, 0])[:, None]).astype(np.float32)
    q, s = ref.quant_fp8_dynamic_per_token(x)
    assert s.dtype == np.float32 and s.shape == (6,)
    amax = np.abs(x).max(1)
    np.testing.assert_array_equal(s[:4], (amax[:4] / np.float32(448)).astype(np.float32))
    assert s[5] == ref.DYNAMIC_FP8_MIN_SCALE == np.float32(2 ** -9 / 448)
    assert s[4] == ref.DYNAMIC_FP8_MIN_SCALE
    assert not ref.fp8_e4m3_decode(q[5]).any()
    np.testing.assert_array_equal(q, np.clip(x / s[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    # the row maximum lands on +-448
    for i in range(4):
        j = np.argmax(np.abs(x[i]))
        assert ref.fp8_e4m3_decode(q[i, j]) in (448.0, -448.0)
    deq = ref.dequant_fp8_dynamic_per_token(q, s)
    assert np.all(np.abs(deq - x) <= np.abs(x) * 2 ** -4 + s[:, None] * 2 ** -10)


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
    assert _bits32(z)[0] == 0  # +0.0


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

ALL_PATTERNS = sorted(ref.ALLREDUCE_FUSION_PATTERNS)


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_allreduce_fusion_is_composition(pattern):
    t, h, world = 5, 128, 3
    xs = [ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32)) for _ in range(world)]
    res = ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32))
    gamma = ref.to_bf16_bits(RNG.standard_normal(h).astype(np.float32))
    kw = dict(residual=res, rms_gamma=gamma, rms_eps=1e-6, weight_bias=0.0,
              scale_factor=2.0, layout="swizzled", block_quant_group_size=64)
    out = ref.allreduce_fusion(xs, pattern, **kw)
    assert set(out) == {"allreduce_out", *ref.pattern_outputs(pattern)}
    ar = ref.all_reduce(xs)
    np.testing.assert_array_equal(out["allreduce_out"], ar)
    if pattern == "kAllReduce":
        return
    r_out, n_out = ref.residual_rmsnorm(ar, res, gamma, 1e-6, 0.0)
    np.testing.assert_array_equal(out["residual_out"], r_out)
    if "norm_out" in out:
        np.testing.assert_array_equal(out["norm_out"], n_out)
    y = ref.from_bf16_bits(n_out)
    quant = ref.ALLREDUCE_FUSION_PATTERNS[pattern][1]
    if quant == "fp8":
        np.testing.assert_array_equal(out["quant_out"], ref.quant_fp8(y, 2.0))
        assert "scale_out" not in out
    elif quant == "fp4":
        q, s = ref.quant_nvfp4(y, 2.0, "swizzled")
        np.testing.assert_array_equal(out["quant_out"], q)
        np.testing.assert_array_equal(out["scale_out"], s)
    elif quant == "group_fp8":
        q, s = ref.quant_fp8_per_token_group(y, 64)
        np.testing.assert_array_equal(out["quant_out"], q)
        np.testing.assert_array_equal(out["scale_out"], s)
    elif quant == "dynamic_fp8":
        q, s = ref.quant_fp8_dynamic_per_token(y)
        np.testing.assert_array_equal(out["quant_out"], q)
        np.testing.assert_array_equal(out["scale_out"], s)


def test_allreduce_fusion_errors():
    xs = [np.zeros((2, 32), np.float32)] * 2
    with pytest.raises(ValueError):
        ref.allreduce_fusion(xs, "kARResidualRMSNorm", rms_gamma=np.ones(32, np.float32))
    with pytest.raises(ValueError):
        ref.allreduce_fusion(xs, "kARResidualRMSNormFP8Quant", residual=xs[0], rms_gamma=np.ones(32, np.float32))
    with pytest.raises(ValueError):
        ref.allreduce_fusion(xs, "kNoSuchPattern")

    class FakeEnum:
        name = "kAllReduce"
    assert set(ref.allreduce_fusion(xs, FakeEnum())) == {"allreduce_out"}


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


# ------------------------------------------------------------------ MoE all-to-all (static)

def _hand_routing():
    # ep_size 3, 6 experts -> 2 per rank
    ids = [np.array([[0, 1], [2, 5], [1, -1], [7, 3]], np.int32),   # rank 0
           np.zeros((0, 2), np.int32),                                # rank 1: no tokens
           np.array([[4, 4], [0, 5]], np.int32)]                      # rank 2
    x = [np.arange(len(i) * 2, dtype=np.float32).reshape(-1, 2) + 10 * (s + 1) for s, i in enumerate(ids)]
    return ids, x


def test_a2a_dispatch_hand_example():
    ids, x = _hand_routing()
    recv, counts, routing = ref.moe_a2a_dispatch(ids, [[x[s], ids[s]] for s in range(3)], 6, 3, 4,
                                                 invalid_token_expert_id=-1, expert_id_payload_index=1)
    np.testing.assert_array_equal(counts[0], [2, 0, 1])   # rank0 <- s0 tokens 0,2 ; s2 token 1
    np.testing.assert_array_equal(counts[1], [2, 0, 0])   # rank1 <- s0 tokens 1,3
    np.testing.assert_array_equal(counts[2], [1, 0, 2])   # rank2 <- s0 token 1 ; s2 tokens 0,1
    assert recv[0][0].shape == (3, 4, 2) and recv[0][1].shape == (3, 4, 2)
    np.testing.assert_array_equal(recv[0][0][0, :2], x[0][[0, 2]])
    np.testing.assert_array_equal(recv[0][0][2, :1], x[2][[1]])
    np.testing.assert_array_equal(recv[1][0][0, :2], x[0][[1, 3]])
    np.testing.assert_array_equal(recv[2][0][2, :2], x[2][[0, 1]])
    assert not recv[0][0][0, 2:].any()                     # padding rows
    # sanitized ids: only ids owned by the receiving rank survive, padding is invalid
    np.testing.assert_array_equal(recv[0][1][0, :2], [[0, 1], [1, -1]])
    np.testing.assert_array_equal(recv[1][1][0, :2], [[2, -1], [-1, 3]])
    np.testing.assert_array_equal(recv[2][1][2, :2], [[4, 4], [-1, 5]])
    assert np.all(recv[1][1][1] == -1) and np.all(recv[0][1][0, 2:] == -1)
    np.testing.assert_array_equal(routing.send_slot[0], [[0, -1, -1], [-1, 0, 0], [1, -1, -1], [-1, 1, -1]])
    assert routing.send_slot[1].shape == (0, 3)


def test_a2a_combine_hand_example_and_errors():
    ids, x = _hand_routing()
    recv, counts, routing = ref.moe_a2a_dispatch(ids, [[x[s]] for s in range(3)], 6, 3, 4)
    # rank r returns its received rows times (r + 1)
    payload = [recv[r][0] * np.float32(r + 1) for r in range(3)]
    out = ref.moe_a2a_combine(payload, routing)
    np.testing.assert_array_equal(out[0], [x[0][0] * 1, x[0][1] * (2 + 3), x[0][2] * 1, x[0][3] * 2])
    assert out[1].shape == (0, 2)
    np.testing.assert_array_equal(out[2], [x[2][0] * 3, x[2][1] * (1 + 3)])
    # a token with only invalid experts gets 0
    ids2 = [np.array([[-1, 9]], np.int32)] * 3
    r2, _, rt2 = ref.moe_a2a_dispatch(ids2, [[np.ones((1, 2), np.float32)]] * 3, 6, 3, 1)
    assert not any(o.any() for o in ref.moe_a2a_combine([r[0] for r in r2], rt2))
    with pytest.raises(ValueError):
        ref.moe_a2a_dispatch(ids, [[x[s]] for s in range(3)], 6, 3, 3)   # rank 0 has 4 tokens


def test_a2a_all_to_one_rank_and_round_trip_bf16():
    n, e, t, h = 4, 8, 5, 16
    ids = [np.full((t, 2), 6, np.int32) for _ in range(n)]          # everything to rank 3
    ids[1][:, 1] = 7                                                  # same rank twice
    x = [ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32)) for _ in range(n)]
    recv, counts, routing = ref.moe_a2a_dispatch(ids, [[a] for a in x], e, n, t)
    for r in range(3):
        assert not counts[r].any()
    np.testing.assert_array_equal(counts[3], [t] * n)
    out = ref.moe_a2a_combine([rv[0] for rv in recv], routing)
    for s in range(n):
        np.testing.assert_array_equal(out[s], x[s])                   # one target: identity
    # random routing: combine(dispatch(x)) == x * number of distinct target ranks
    ids = [RNG.integers(-1, e + 1, (RNG.integers(0, 7), 3)).astype(np.int32) for _ in range(n)]
    x = [ref.to_bf16_bits(RNG.standard_normal((len(i), h)).astype(np.float32)) for i in ids]
    recv, counts, routing = ref.moe_a2a_dispatch(ids, [[a] for a in x], e, n, 6)
    out = ref.moe_a2a_combine([rv[0] for rv in recv], routing)
    for s in range(n):
        cnt = ref.moe_a2a_target_ranks(ids[s], e, n).sum(1).astype(np.float32)
        np.testing.assert_array_equal(out[s], ref.to_bf16_bits(ref.from_bf16_bits(x[s]) * cnt[:, None]))


def test_sanitize_expert_ids():
    ids = np.array([[0, 3, 5], [2, -1, 8]], np.int32)
    np.testing.assert_array_equal(ref.sanitize_expert_ids(ids, 1, 2, -7), [[-7, 3, -7], [2, -7, -7]])
    assert ref.moe_a2a_sanitize_expert_ids is ref.sanitize_expert_ids


# ------------------------------------------------------------------ compact expert-major

def test_compact_dispatch_order_and_combine():
    n, e = 2, 4                                   # experts 0,1 on rank 0; 2,3 on rank 1
    ids = [np.array([[3, 0], [1, 1]], np.int32),  # rank 0: token 1 picks expert 1 twice
           np.array([[0, 2], [-1, 3], [5, 1]], np.int32)]
    w = [np.array([[0.1, 0.2], [0.3, 0.4]], np.float32), np.array([[1, 2], [3, 4], [5, 6]], np.float32)]
    x = [np.array([[1.0], [2.0]], np.float32), np.array([[10.0], [20.0], [30.0]], np.float32)]
    xr, wr, lay = ref.ep_dispatch_compact(x, ids, w, e, n)
    # rank 0: expert 0 <- (0,0,1), (1,0,0); expert 1 <- (0,1,0), (0,1,1), (1,2,1)
    np.testing.assert_array_equal(lay.src[0], [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 2, 1]])
    np.testing.assert_array_equal(lay.tokens_per_expert[0], [2, 3])
    np.testing.assert_array_equal(lay.local_expert[0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(xr[0][:, 0], [1, 10, 2, 2, 30])
    np.testing.assert_allclose(wr[0], [0.2, 1, 0.3, 0.4, 6])
    # rank 1: expert 2 <- (1,0,1); expert 3 <- (0,0,0), (1,1,1)
    np.testing.assert_array_equal(lay.src[1], [[1, 0, 1], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(lay.tokens_per_expert[1], [1, 2])
    # combine: expert "computes" y = x * (global expert id + 1)
    ys = [xr[r] * (lay.local_expert[r][:, None] + r * 2 + 1).astype(np.float32) for r in range(n)]
    out = ref.ep_combine_compact(ys, lay, apply_weights=False)
    np.testing.assert_array_equal(out[0][:, 0], [1 * 4 + 1 * 1, 2 * 2 + 2 * 2])
    np.testing.assert_array_equal(out[1][:, 0], [10 * 1 + 10 * 3, 20 * 4, 30 * 2])
    outw = ref.ep_combine_compact(ys, lay, apply_weights=True)
    want0 = np.float32(np.float32(4.0) * np.float32(0.1)) + np.float32(np.float32(1.0) * np.float32(0.2))
    assert outw[0][0, 0] == want0
    np.testing.assert_array_equal(outw[1][:, 0], [10 * 1 + 30 * 2, 80 * 4, 60 * 6])
    # round trip without weights: y = x gives x * number of valid slots
    back = ref.ep_combine_compact(xr, lay)
    np.testing.assert_array_equal(back[1][:, 0], [20, 20, 30])
    with pytest.raises(ValueError):
        _, _, lay2 = ref.ep_dispatch_compact(x, ids, None, e, n)
        ref.ep_combine_compact(xr, lay2, apply_weights=True)


def test_reference_imports_only_numpy():
    import ast
    import pathlib
    src = pathlib.Path(ref.__file__).read_text()
    mods = set()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    assert mods <= {"__future__", "dataclasses", "typing", "numpy", "math"}, mods
