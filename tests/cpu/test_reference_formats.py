"""Number formats of the reference (bf16, e4m3fn, e2m1, UE8M0) against ml_dtypes."""

import math

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402
from tests.cpu.reference_helpers import bits32, f32_from_bits, random_f32  # noqa: E402

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ bf16

def test_bf16_encode_matches_ml_dtypes():
    x = np.concatenate([
        random_f32(RNG, 20000),
        RNG.standard_normal(5000).astype(np.float32),
        # exact ties: low 16 bits 0x8000 with even and odd kept lsb
        f32_from_bits((RNG.integers(0, 0x7F7F, 2000, dtype=np.uint32) << 16) | 0x8000),
        f32_from_bits((RNG.integers(0x8000, 0xFF7F, 2000, dtype=np.uint32) << 16) | 0x8000),
        # fp32 subnormals and values near the bf16 subnormal boundary
        f32_from_bits(RNG.integers(1, 0x00800000, 2000, dtype=np.uint32)),
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
    nans = f32_from_bits(np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], np.uint32))
    out = ref.to_bf16_bits(nans)
    assert np.all(np.isnan(ref.from_bf16_bits(out)))
    assert list(out >> 15) == [0, 1, 0, 0]
    allbits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = ref.from_bf16_bits(allbits)
    theirs = allbits.view(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    ok = ~np.isnan(ours)
    np.testing.assert_array_equal(bits32(ours[ok]), bits32(theirs[ok]))
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
    np.testing.assert_array_equal(bits32(ours[ok]), bits32(theirs[ok]))
    # encode(decode(c)) == c for every non-NaN code
    np.testing.assert_array_equal(ref.fp8_e4m3_encode(ours[ok]), codes[ok])


def test_e4m3_encode_matches_ml_dtypes():
    vals = ref.fp8_e4m3_decode(np.arange(0x7F, dtype=np.uint8))  # 0 .. 448 positive codes
    mids = ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)  # exact ties
    x = np.concatenate([
        random_f32(RNG, 20000, -20, 10),
        RNG.standard_normal(5000).astype(np.float32) * 100,
        mids, -mids,
        np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0)),
        f32_from_bits(RNG.integers(1, 0x00800000, 500, dtype=np.uint32)),
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
    np.testing.assert_array_equal(bits32(ours), bits32(theirs))
    np.testing.assert_array_equal(ref.fp4_e2m1_encode(ours), codes)


def test_e2m1_encode_ties_random_saturation():
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    expected = [0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    np.testing.assert_array_equal(ref.fp4_e2m1_decode(ref.fp4_e2m1_encode(ties)), expected)
    np.testing.assert_array_equal(ref.fp4_e2m1_decode(ref.fp4_e2m1_encode(-ties)), -np.array(expected))
    x = np.concatenate([ties, -ties, RNG.uniform(-8, 8, 20000).astype(np.float32),
                        random_f32(RNG, 5000, -12, 4),
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
    x = f32_from_bits(bits)
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
    v = np.concatenate([random_f32(RNG, 5000, -126, 127), np.ldexp(np.float32(1), np.arange(-126, 128)).astype(np.float32)])
    v = np.abs(v)
    got = ref.ue8m0_encode_ceil(v).astype(int)
    want = np.array([math.frexp(float(a))[1] - 1 + (0 if math.frexp(float(a))[0] == 0.5 else 1) + 127 for a in v])
    np.testing.assert_array_equal(got, np.minimum(want, 254))
    assert 2.0 ** (int(ref.ue8m0_encode_ceil(np.float32(1e-10))) - 127) == 2.0 ** -33
    assert list(ref.ue8m0_encode_ceil(np.array([0, -1, np.inf, np.nan], np.float32))) == [0, 0, 254, 255]
