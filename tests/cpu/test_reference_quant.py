"""The reference quantizers against ml_dtypes and independent fp32/float64 recomputation."""

import math

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402
from moecomm.constants import QuantizationSFLayout  # noqa: E402

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ NVFP4

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
    with pytest.raises(ValueError):
        ref.quant_nvfp4(np.zeros((2, 32), np.float32), 1.0, "row-major")


def test_nvfp4_layout_takes_the_runtime_enum():
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    for name, member in (("swizzled", QuantizationSFLayout.SWIZZLED_128x4),
                         ("linear", QuantizationSFLayout.LINEAR)):
        q, sf = ref.quant_nvfp4(x, 100.0, name)
        q2, sf2 = ref.quant_nvfp4(x, 100.0, member)
        np.testing.assert_array_equal(q, q2)
        np.testing.assert_array_equal(sf, sf2)
        np.testing.assert_array_equal(ref.dequant_nvfp4(q, sf, 100.0, 3, 64, member),
                                      ref.dequant_nvfp4(q, sf, 100.0, 3, 64, name))


# ------------------------------------------------------------------ FP8 quantizers

def _e4m3_codes(v):
    """ml_dtypes' RNE e4m3fn codes of fp32 values, saturating at +-448."""
    return np.clip(np.asarray(v, np.float32), -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def _fp8_static_independent(x, s):
    """q = e4m3_satfinite(fp32(x) * fp32(1/s)) from float64 arithmetic: the reciprocal of
    the fp32 scale in float64, rounded once to fp32; the product of two fp32 values is
    exact in float64, so rounding it to fp32 is the fp32 product."""
    inv = np.float32(1.0 / float(np.float32(s)))
    return _e4m3_codes((np.asarray(x, np.float32).astype(np.float64) * float(inv)).astype(np.float32))


@pytest.mark.parametrize("s", [3.0, 0.1, 7.0, 1 / 448, 2.5e3, 0.0123, 1.0])
def test_quant_fp8_static_multiplies_by_the_reciprocal(s):
    x = np.concatenate([RNG.standard_normal(4096) * 10, RNG.standard_normal(4096) * 1e3 * s,
                        [0.0, -0.0, 1e30, -1e30]]).astype(np.float32)
    q = ref.quant_fp8(x, s)
    np.testing.assert_array_equal(q, _fp8_static_independent(x, s))
    assert ref.fp8_static_inverse_scale(s) == np.float32(1.0 / float(np.float32(s)))
    # dequantization multiplies by the scale; error within half an e4m3 step (plus the
    # reciprocal's rounding) where not saturated
    deq = ref.dequant_fp8(q, s)
    np.testing.assert_array_equal(deq, ref.fp8_e4m3_decode(q) * np.float32(s))
    ok = np.abs(x) <= 448 * np.float32(s)
    assert np.all(np.abs(deq[ok] - x[ok]) <= np.abs(x[ok]) * (2 ** -4 + 2 ** -20) + np.float32(s) * 2 ** -10)


def test_quant_fp8_static_is_not_a_division():
    """Near an e4m3 rounding boundary fp32(x * fp32(1/s)) and fp32(x / s) can pick
    neighbouring codes; the reciprocal product is the one implemented."""
    x = np.float32(float.fromhex("0x1.c7fffep-5"))  # just below 57 * 2**-10 = 3 * (19 * 2**-10)
    assert x / np.float32(3) < 19 * 2 ** -10                    # x / 3: below the tie -> 0x09
    assert x * np.float32(1 / 3) == 19 * 2 ** -10                # x * fp32(1/3): on the tie -> even
    assert ref.quant_fp8(x, 3.0) == 0x0A
    assert _e4m3_codes(x / np.float32(3)) == 0x09
    # the same over every e4m3 tie scaled by a few scales, and its neighbours
    vals = ref.fp8_e4m3_decode(np.arange(0x7F, dtype=np.uint8)).astype(np.float64)
    ties = (vals[:-1] + vals[1:]) / 2
    differ = 0
    for s in (3.0, 7.0, 0.1, 1.7):
        t = (ties * float(np.float32(s))).astype(np.float32)
        x = np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(0))])
        q = ref.quant_fp8(x, s)
        np.testing.assert_array_equal(q, _fp8_static_independent(x, s))
        differ += int(np.count_nonzero(q != _e4m3_codes(x / np.float32(s))))
    assert differ > 0


def test_quant_fp8_static_scale_argument():
    x = RNG.standard_normal((4, 64)).astype(np.float32) * 10
    q = ref.quant_fp8(x, 3.0)
    assert ref.quant_fp8(np.float32(448.0), 2.0) == ref.fp8_e4m3_encode(np.float32(224.0))
    assert ref.quant_fp8(np.float32(1000.0), 1.0) == 0x7E
    # a device scalar copied to host (one-element array) works as the scale
    np.testing.assert_array_equal(ref.quant_fp8(x, np.array([3.0], np.float32)), q)
    with pytest.raises(ValueError):
        ref.quant_fp8(x, np.array([1.0, 2.0]))
    for bad in (0.0, -1.0, np.inf, np.nan, 1e-39):  # 1/1e-39 overflows fp32
        with pytest.raises(ValueError, match="scale_factor"):
            ref.quant_fp8(x, bad)


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
