"""Number formats of the reference: I/O dtypes, bf16 bits, e4m3fn, e2m1 and UE8M0.

Every low-precision codec is integer/bit arithmetic on NumPy arrays (no per-element
Python loops) and is checked against ``ml_dtypes`` by the CPU tests. Conventions: see
``moecomm.reference``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..constants import FP8_E4M3_MAX

__all__ = [
    "io_dtype_name", "to_float32", "cast_from_float32", "round_to_dtype",
    "to_bf16_bits", "from_bf16_bits",
    "fp8_e4m3_encode", "fp8_e4m3_decode", "FP8_E4M3_MAX",
    "fp4_e2m1_encode", "fp4_e2m1_decode", "FP4_E2M1_MAX", "FP4_E2M1_GRID",
    "ue8m0_encode_ceil", "ue8m0_decode",
]

# --------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------

_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}


def io_dtype_name(dtype: Any) -> str:
    """Name ("bf16" | "fp16" | "fp32") of an I/O dtype given as a string or NumPy dtype.

    ``np.uint16`` and ``ml_dtypes.bfloat16`` mean bf16. Anything else raises TypeError.
    """
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower())
        if name is None:
            raise TypeError(f"unsupported I/O dtype {dtype!r}; use bf16, fp16 or fp32")
        return name
    dt = np.dtype(dtype)
    if dt == np.uint16 or dt.name == "bfloat16":
        return "bf16"
    if dt == np.float16:
        return "fp16"
    if dt == np.float32:
        return "fp32"
    raise TypeError(f"unsupported I/O dtype {dt}; use bf16 (uint16 bits), float16 or float32")


def to_float32(x: Any) -> np.ndarray:
    """Exact widening of an I/O array to fp32 (uint16 / ml_dtypes bfloat16 read as bf16).

    Python scalars and float64 arrays are rounded to fp32 (RNE).
    """
    a = np.asarray(x)
    if a.dtype == np.uint16 or a.dtype.name == "bfloat16":
        return from_bf16_bits(a.view(np.uint16) if a.dtype != np.uint16 else a)
    if a.dtype.kind == "f":
        return a.astype(np.float32)
    if a.dtype.kind in "iub" and a.ndim == 0:
        return a.astype(np.float32)
    raise TypeError(f"expected a floating-point (or bf16-bits uint16) array, got {a.dtype}")


def cast_from_float32(x32: Any, dtype: Any) -> np.ndarray:
    """Round an fp32 array to the I/O representation of ``dtype`` (RNE).

    bf16 -> ``np.uint16`` bits, fp16 -> ``np.float16``, fp32 -> ``np.float32`` (copy).
    """
    name = io_dtype_name(dtype)
    x32 = np.asarray(x32, dtype=np.float32)
    if name == "bf16":
        return to_bf16_bits(x32)
    if name == "fp16":
        return x32.astype(np.float16)
    return x32.copy()


def round_to_dtype(x32: Any, dtype: Any) -> np.ndarray:
    """fp32 value of ``x32`` after rounding to ``dtype`` (RNE): to_float32(cast(x32))."""
    return to_float32(cast_from_float32(x32, dtype))


def _scalar_f32(v: Any, name: str) -> np.float32:
    """A Python number or a one-element array (a device scalar copied to host) -> fp32."""
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"{name} must be a scalar or a one-element array, got shape {a.shape}")
    return np.float32(to_float32(a.reshape(())))


def _contig(x: Any, dtype: Any) -> np.ndarray:
    """C-contiguous array of ``dtype`` with x's shape (0-d stays 0-d)."""
    a = np.asarray(x, dtype=dtype)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _as_2d_f32(x: Any, name: str) -> np.ndarray:
    x32 = to_float32(x)
    if x32.ndim != 2:
        raise ValueError(f"{name} must be 2-D [M, N], got shape {x32.shape}")
    return x32


def _check_same(arrays: Sequence[Any], what: str) -> None:
    """Per-rank arrays must agree in shape and dtype."""
    if len(arrays) == 0:
        raise ValueError(f"{what}: need at least one rank")
    a0 = np.asarray(arrays[0])
    for r, a in enumerate(arrays):
        a = np.asarray(a)
        if a.shape != a0.shape or a.dtype != a0.dtype:
            raise ValueError(f"{what}: rank {r} has {a.shape}/{a.dtype}, rank 0 {a0.shape}/{a0.dtype}")


# --------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------

def to_bf16_bits(x: Any) -> np.ndarray:
    """fp32 -> bf16 bit patterns (``np.uint16``), round-to-nearest-even.

    Finite values that round past the largest bf16 become +-inf; inf stays inf;
    subnormals are rounded, not flushed. NaN keeps its sign and top payload bits and is
    made quiet (bit 0x0040 set).
    """
    x = _contig(x, np.float32)
    b = x.view(np.uint32)
    lsb = (b >> np.uint32(16)) & np.uint32(1)
    rounded = ((b + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    quiet_nan = ((b >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return np.where(np.isnan(x), quiet_nan, rounded)


def from_bf16_bits(bits: Any) -> np.ndarray:
    """bf16 bit patterns (``np.uint16``) -> fp32 (exact)."""
    b = _contig(bits, np.uint16)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------------------
# small floats (e4m3fn, e2m1) by integer arithmetic
# --------------------------------------------------------------------------------------

def _minifloat_magnitude_code(x32: np.ndarray, mbits: int, bias: int, max_code: int):
    """RNE magnitude code of |x| in a format with ``mbits`` mantissa bits and ``bias``.

    Returns (sign [0/1], code int64 saturated at ``max_code``, isnan). Codes are the
    format's bit patterns without the sign: ``(biased_exponent << mbits) | mantissa``.
    """
    b = _contig(x32, np.float32).view(np.uint32).astype(np.int64)
    sign = b >> 31
    a = b & 0x7FFFFFFF
    isnan = a > 0x7F800000
    exp_field = a >> 23
    e = exp_field - 127                                   # unbiased fp32 exponent
    mant = (a & 0x7FFFFF) | np.where(exp_field > 0, 0x800000, 0)
    emin = 1 - bias                                       # smallest normal exponent
    # Normal target: rebias the fp32 bits and round away the low (23 - mbits) bits.
    shift = 23 - mbits
    an = a - ((127 - bias) << 23)
    code_n = (an + ((1 << (shift - 1)) - 1) + ((an >> shift) & 1)) >> shift
    # Subnormal target: count units of 2**(emin - mbits); value = mant * 2**(e - 23).
    s = np.clip((23 + emin - mbits) - e, 1, 62)
    q = mant >> s
    rem = mant & ((np.int64(1) << s) - 1)
    half = np.int64(1) << (s - 1)
    code_s = q + ((rem > half) | ((rem == half) & ((q & 1) == 1)))
    code = np.where(e >= emin, code_n, code_s)
    code = np.minimum(code, max_code)                     # satfinite (inf included)
    return sign, code, isnan


_E4M3_MAX_CODE = 0x7E
_E4M3_NAN = 0x7F


def fp8_e4m3_encode(x: Any) -> np.ndarray:
    """fp32 -> FP8 e4m3fn codes (``np.uint8``): RNE, saturating.

    * ``|x| > 448`` (including inf) saturates to +-448 (0x7E / 0xFE); values up to the
      tie at 464 round to 448 as RNE would anyway.
    * NaN -> 0x7F (always the positive NaN code).
    * Zero and values rounding to zero keep their sign (-0 -> 0x80).
    * Subnormals (spacing 2**-9) are rounded, not flushed.

    Input is read with :func:`to_float32` (uint16 = bf16 bits; float64 is first rounded
    to fp32, so pass fp32 to test single rounding).
    """
    sign, code, isnan = _minifloat_magnitude_code(to_float32(x), 3, 7, _E4M3_MAX_CODE)
    out = (sign << 7) | code
    return np.where(isnan, _E4M3_NAN, out).astype(np.uint8)


def _build_e4m3_lut() -> np.ndarray:
    c = np.arange(256, dtype=np.uint32)
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (((e + 120) << 23) | (m << 20)).astype(np.uint32).view(np.float32)
    sub = m.astype(np.float32) * np.float32(2.0 ** -9)
    mag = np.where(e == 0, sub, normal).astype(np.float32)
    val = np.where((c >> 7) == 1, -mag, mag).astype(np.float32)
    return np.where((c & 0x7F) == 0x7F, np.float32(np.nan), val).astype(np.float32)


_E4M3_LUT = _build_e4m3_lut()


def fp8_e4m3_decode(codes: Any) -> np.ndarray:
    """FP8 e4m3fn codes (``np.uint8``) -> fp32 (exact; 0x7F/0xFF -> NaN)."""
    return _E4M3_LUT[np.asarray(codes, dtype=np.uint8)]


FP4_E2M1_MAX = 6.0
FP4_E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
_E2M1_MAX_CODE = 0x7


def fp4_e2m1_encode(x: Any) -> np.ndarray:
    """fp32 -> e2m1 codes 0..15 (``np.uint8``, one code per byte), RNE, saturating.

    RNE on the grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}: ties go to the even mantissa, e.g.
    0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    ``|x| > 6`` (and inf) saturates to +-6. Sign bit is 0x8 (-0 -> 0x8, a tiny negative
    value -> 0x8). NaN -> 0x7 (+6): e2m1 has no NaN; this is the reference's choice and
    the software conversion in the kernels does the same (NaN inputs are outside every
    quantizer's contract).
    """
    sign, code, isnan = _minifloat_magnitude_code(to_float32(x), 1, 1, _E2M1_MAX_CODE)
    out = (sign << 3) | code
    return np.where(isnan, _E2M1_MAX_CODE, out).astype(np.uint8)


_E2M1_LUT = np.concatenate([FP4_E2M1_GRID, -FP4_E2M1_GRID]).astype(np.float32)


def fp4_e2m1_decode(codes: Any) -> np.ndarray:
    """e2m1 codes (low 4 bits of each ``np.uint8``; higher bits ignored) -> fp32 (exact)."""
    return _E2M1_LUT[np.asarray(codes, dtype=np.uint8) & 0xF]


def ue8m0_decode(e: Any) -> np.ndarray:
    """UE8M0 exponent bytes -> fp32 ``2**(e - 127)`` (e = 0 gives the fp32 subnormal
    2**-127 exactly); e = 255 -> NaN."""
    e = np.asarray(e, dtype=np.uint8)
    v = np.ldexp(np.float32(1.0), np.minimum(e, 254).astype(np.int32) - 127).astype(np.float32)
    return np.where(e == 255, np.float32(np.nan), v).astype(np.float32)


def ue8m0_encode_ceil(v: Any) -> np.ndarray:
    """Smallest power of two >= v, as a UE8M0 byte (``np.uint8``); exact, from the bits.

    For a normal fp32 ``v`` with exponent field E and mantissa bits M:
    ``e = E + (M != 0)``, capped at 254 (2**127). ``v <= 2**-127`` (including 0, negative
    values and subnormals up to 2**-127) -> 0; other subnormals -> 1 (2**-126);
    +inf -> 254; NaN -> 255.
    """
    x = _contig(v, np.float32)
    b = x.view(np.uint32).astype(np.int64)
    neg = (b >> 31) == 1
    a = b & 0x7FFFFFFF
    E = a >> 23
    M = a & 0x7FFFFF
    e = np.where(E > 0, E + (M != 0), np.where(a <= 0x00400000, 0, 1))
    e = np.minimum(e, 254)
    e = np.where(neg, 0, e)
    e = np.where(np.isnan(x), 255, e)
    return e.astype(np.uint8)
