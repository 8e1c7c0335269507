"""The reference quantizers against ml_dtypes and independent fp32/float64 recomputation."""

import math

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402
from moecomm.constants import QuantizationSFLayout  # noqa: E402

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ NVFP4

def _f32(v):
    """One rounding of float64 values to fp32 (RNE)."""
    return np.asarray(v, np.float64).astype(np.float32)


def _nvfp4_independent(x, gs, order="new"):
    """NVFP4 codes [M, N] and e4m3 scale codes [M, N//16] from float64 arithmetic and
    ml_dtypes casts. A product of two fp32 values is exact in float64 and a float64
    quotient of two fp32 values rounds to the correctly rounded fp32 quotient, so each
    ``_f32(...)`` is one fp32 operation.

    order "new": sf = e4m3(gs * fp32(amax * fp32(1/6))); out = fp32(gs / sf); code = e2m1(v * out).
    order "old": sf = e4m3(fp32(gs * amax) / 6); code = e2m1(fp32(v * gs) / sf).
    """
    m, n = x.shape
    b = x.reshape(m, n // 16, 16).astype(np.float64)
    g = float(np.float32(gs))
    amax = np.abs(b).max(-1)
    if order == "new":
        pre = _f32(g * _f32(amax * float(np.float32(1 / 6))).astype(np.float64))
    else:
        pre = _f32(_f32(g * amax).astype(np.float64) / 6.0)
    sf = np.clip(pre, 0, 448).astype(ml_dtypes.float8_e4m3fn)
    sv = sf.astype(np.float64)[..., None]
    safe = np.where(sv == 0, 1.0, sv)
    if order == "new":
        out = _f32(np.where(sv == 0, 0.0, g / safe)).astype(np.float64)
        scaled = _f32(b * out)
    else:
        scaled = _f32(np.where(sv == 0, 0.0, _f32(b * g).astype(np.float64) / safe))
    codes = np.clip(scaled, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    return codes.reshape(m, n), sf.view(np.uint8)


@pytest.mark.parametrize("m,n", [(3, 32), (130, 96)])
def test_nvfp4_quant(m, n):
    x = (RNG.standard_normal((m, n)) * np.exp(RNG.uniform(-3, 3, (m, 1)))).astype(np.float32)
    x[0, :16] = 0.0            # an all-zero block -> sf 0, codes 0
    x[1, 16:32] = 1e-30        # sf rounds to 0 -> out_scale 0, codes +0
    x[2, :16] = -1e-30         # ... and -0 (0x8) for negative elements
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
    # the same codes computed independently with float64 and ml_dtypes
    want_codes, want_sf = _nvfp4_independent(x, gs)
    np.testing.assert_array_equal(sf_lin, want_sf)
    np.testing.assert_array_equal(codes, want_codes)
    assert not codes[0, :16].any() and not codes[1, 16:32].any()
    assert np.all(codes[2, :16] == 0x8)
    assert sf_lin[0, 0] == 0 and sf_lin[1, 1] == 0 and sf_lin[2, 0] == 0
    # decoded back within the format's error: <= one e2m1 unit (1.0) of the block scale
    deq = ref.dequant_nvfp4(packed, sf_sw, gs, m, n, "swizzled")
    unit = np.repeat(ref.fp8_e4m3_decode(sf_lin), 16, axis=1) / gs
    assert np.all(np.abs(deq - x) <= unit * 1.0 + 1e-30)
    np.testing.assert_allclose(deq, x, rtol=0.5, atol=np.abs(x).max() * 0.1)


def _block(*vals):
    b = np.zeros((1, 16), np.float32)
    b[0, :len(vals)] = vals
    return b


def test_nvfp4_operation_order_hand_made_blocks():
    """Blocks where the order of operations decides the result."""
    # amax * fp32(1/6) lands on the e4m3 tie 1.1875 (-> even: 1.25); amax / 6 lies just
    # below it (-> 1.125).
    amax = np.float32(float.fromhex("0x1.c7fffep+2"))   # 7.1249995
    assert amax * np.float32(1 / 6) == np.float32(1.1875)
    assert amax / np.float32(6) < np.float32(1.1875)
    _, sf = ref.quant_nvfp4(_block(amax), 1.0, "linear")
    assert ref.fp8_e4m3_decode(sf)[0, 0] == 1.25
    assert _nvfp4_independent(_block(amax), 1.0, "old")[1][0, 0] == ref.fp8_e4m3_encode(np.float32(1.125))
    # sf = e4m3(5.5 / 6) = 0.9375; 1.171875 / 0.9375 is the e2m1 tie 1.25 (-> 1.0), but
    # out_scale = fp32(1 / 0.9375) is rounded up, so 1.171875 * out_scale > 1.25 (-> 1.5).
    x = _block(5.5, 1.171875, -1.171875)
    packed, sf = ref.quant_nvfp4(x, 1.0, "linear")
    assert ref.fp8_e4m3_decode(sf)[0, 0] == 0.9375
    codes = ref.unpack_fp4(packed)
    np.testing.assert_array_equal(ref.fp4_e2m1_decode(codes[0, :3]), [6.0, 1.5, -1.5])
    old_codes = _nvfp4_independent(x, 1.0, "old")[0]
    np.testing.assert_array_equal(ref.fp4_e2m1_decode(old_codes[0, :3]), [6.0, 1.0, -1.0])


def test_nvfp4_new_order_is_the_implemented_one():
    """A small search over values next to the e4m3 and e2m1 rounding boundaries: the
    implementation equals the new order everywhere and differs from the old one in some
    blocks, both in scale factors and in element codes."""
    vals = ref.fp8_e4m3_decode(np.arange(1, 0x7E, dtype=np.uint8)).astype(np.float64)
    e4m3_ties = (vals[:-1] + vals[1:]) / 2
    e2m1_ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])

    def around(v):
        v = np.asarray(v, np.float32)
        up, down = np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(0))
        return np.concatenate([v, up, down, np.nextafter(up, np.float32(np.inf)),
                               np.nextafter(down, np.float32(0))])

    sf_differ = code_differ = 0
    for gs in (1.0, 3.0, 7.0, 100.0, 448 * 6 / 3.7):
        g = np.float32(gs)
        # scale factors: amax next to 6 * tie / gs
        amax = around(6 * e4m3_ties / float(g))
        amax = amax[np.isfinite(amax) & (amax > 0)]
        x = np.zeros((amax.size, 16), np.float32)
        x[:, 0] = amax
        x[:, 1] = -amax / np.float32(3)
        _, sf = ref.quant_nvfp4(x, g, "linear")
        np.testing.assert_array_equal(sf, _nvfp4_independent(x, g)[1])
        sf_differ += int(np.count_nonzero(sf != _nvfp4_independent(x, g, "old")[1]))
        # element codes: v next to tie * sf / gs, for a few block maxima
        for amax in (5.5, 18.0, 0.37, 123.0):
            code, _ = ref.nvfp4_block_scale(np.float32(amax), g)
            sv = float(ref.fp8_e4m3_decode(code))
            v = around(e2m1_ties * sv / float(g))
            v = v[np.abs(v) < amax]
            x = np.zeros((v.size, 16), np.float32)
            x[:, 0] = amax
            x[:, 1] = v
            x[:, 2] = -v
            packed, sf = ref.quant_nvfp4(x, g, "linear")
            new_codes, new_sf = _nvfp4_independent(x, g)
            np.testing.assert_array_equal(ref.unpack_fp4(packed), new_codes)
            np.testing.assert_array_equal(sf, new_sf)
            code_differ += int(np.count_nonzero(ref.unpack_fp4(packed) != _nvfp4_independent(x, g, "old")[0]))
    assert sf_differ > 0 and code_differ > 0


def test_nvfp4_block_scale():
    amax = np.array([0.0, 1e-30, 6.0, 1e6, 7.0], np.float32)
    code, out = ref.nvfp4_block_scale(amax, 1.0)
    np.testing.assert_array_equal(ref.fp8_e4m3_decode(code), [0, 0, 1.0, 448, 1.125])
    np.testing.assert_array_equal(out, np.float32(1.0) / np.array([1, 1, 1.0, 448, 1.125], np.float32)
                                  * np.array([0, 0, 1, 1, 1], np.float32))
    assert out.dtype == np.float32


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


def test_quant_fp8_dynamic_per_token_divides():
    """The dynamic formula divides each element by the row scale (float64 recomputation);
    near e4m3 rounding boundaries that differs from multiplying by fp32(1 / scale)."""
    rows = []
    for amax in (3.0, 7.0, 0.1, 1000.0):
        scale = np.float32(float(np.float32(amax)) / 448.0)
        vals = ref.fp8_e4m3_decode(np.arange(0x7F, dtype=np.uint8)).astype(np.float64)
        ties = (vals[:-1] + vals[1:]) / 2
        t = (ties * float(scale)).astype(np.float32)
        v = np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(0))])
        row = np.zeros(v.size + 1, np.float32)
        row[0], row[1:] = amax, np.minimum(v, np.float32(amax))
        rows.append(row)
    x = np.stack(rows)
    q, s = ref.quant_fp8_dynamic_per_token(x)
    np.testing.assert_array_equal(s, (np.abs(x).max(1).astype(np.float64) / 448.0).astype(np.float32))
    by_division = (x.astype(np.float64) / s[:, None].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(q, np.clip(by_division, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    by_reciprocal = x * (np.float32(1) / s)[:, None]
    assert np.any(q != np.clip(by_reciprocal, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
