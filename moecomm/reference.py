"""NumPy reference of every moecomm op and quantization format: the spec in code.

Every GPU kernel in ``kernels_cu/`` is tested against these functions, so each function
states exactly where it rounds. Only NumPy and the standard library are used; the
low-precision formats are implemented here with integer/bit arithmetic (vectorised, no
per-element Python loops) and checked against ``ml_dtypes`` by the CPU tests.

Conventions
-----------
* I/O dtypes are bf16, fp16 and fp32. A bf16 array is a ``np.uint16`` array of bf16 bit
  patterns (an ``ml_dtypes.bfloat16`` array is accepted as input and read through a
  uint16 view); fp16 is ``np.float16``; fp32 is ``np.float32``. Outputs in bf16 are
  always ``np.uint16`` bit patterns. ``dtype`` arguments take ``"bf16"``, ``"fp16"``,
  ``"fp32"`` or a NumPy dtype (``np.uint16`` means bf16).
* All arithmetic is fp32 (IEEE, round-to-nearest-even, no FTZ, correctly rounded
  division) unless a docstring says float64. Conversions to narrower types are RNE.
* FP8 is e4m3fn (bias 7, max 448, no inf, NaN = 0x7F/0xFF), stored as uint8 codes.
  FP4 is e2m1 (grid 0, 0.5, 1, 1.5, 2, 3, 4, 6; sign bit 0x8), one code per uint8, or two
  per byte with the LOW nibble holding the even element. UE8M0 is an exponent byte ``e``
  with value ``2**(e - 127)`` (255 = NaN).
* Reductions over ranks, experts and top-k slots run in a fixed ascending order in fp32
  and round once to the output dtype at the end.

Rounding points of the fused all-reduce (the GPU kernels follow these)
----------------------------------------------------------------------
1. Each rank's contribution is in the I/O dtype (for the MoE fusions: the MoE reduction is
   computed in fp32 and rounded once to the I/O dtype; that rounded value is what is
   exchanged).
2. ``allreduce_out = io(sum_r fp32(x_r))``, ranks in order 0, 1, ...; an input -0.0 is
   read as +0.0 (the Lamport sentinel rule), so a zero sum is +0.0.
3. ``residual_out = io(fp32(allreduce_out) + fp32(residual))`` - the ROUNDED all-reduce
   value is used, so the fused op equals all-reduce followed by the unfused ops.
4. The norm reads the ROUNDED ``residual_out``: ``r = fp32(residual_out)``;
   ``ms = fp32(mean(r**2))`` (sum in float64 here; a GPU tree sum differs in the last
   bits), ``rstd = fp32(1/sqrt(ms + fp32(eps)))`` (``ms + eps`` in fp32, rsqrt correctly
   rounded), ``norm32 = (r * rstd) * (gamma + weight_bias)`` in fp32,
   ``norm_out = io(norm32)``.
5. Every quantizer reads the ROUNDED ``norm_out`` (decoded to fp32), also in the patterns
   that do not write ``norm_out``. A GPU ``norm_out`` may differ from this reference by
   one ulp of the I/O dtype (step 4), so GPU tests compare norm/quant outputs with a
   tolerance of one quantization step where the norm is not bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    # dtype helpers
    "io_dtype_name", "to_float32", "cast_from_float32", "round_to_dtype",
    # formats
    "to_bf16_bits", "from_bf16_bits",
    "fp8_e4m3_encode", "fp8_e4m3_decode", "FP8_E4M3_MAX",
    "fp4_e2m1_encode", "fp4_e2m1_decode", "FP4_E2M1_MAX", "FP4_E2M1_GRID",
    "ue8m0_encode_ceil", "ue8m0_decode",
    # NVFP4 layout
    "NVFP4_BLOCK", "compute_fp4_swizzled_layout_sf_size", "swizzled_sf_offset",
    "swizzle_sf", "unswizzle_sf", "pack_fp4", "unpack_fp4",
    # quantizers
    "quant_fp8", "dequant_fp8",
    "quant_nvfp4", "dequant_nvfp4",
    "GROUP_FP8_MIN_SCALE", "quant_fp8_per_token_group", "dequant_fp8_per_token_group",
    "pack_ue8m0", "unpack_ue8m0", "ue8m0_mn_major_storage_size", "ue8m0_to_mn_major_storage",
    "ue8m0_from_mn_major_storage",
    "DYNAMIC_FP8_MIN_SCALE", "quant_fp8_dynamic_per_token", "dequant_fp8_dynamic_per_token",
    # ops
    "all_reduce", "residual_rmsnorm",
    "ALLREDUCE_FUSION_PATTERNS", "pattern_outputs", "allreduce_fusion",
    "moe_reduction", "moe_finalize", "moe_allreduce_fusion", "moe_finalize_allreduce_fusion",
    "A2ARouting", "moe_a2a_target_ranks", "moe_a2a_dispatch", "moe_a2a_combine",
    "sanitize_expert_ids", "moe_a2a_sanitize_expert_ids",
    "CompactLayout", "ep_dispatch_compact", "ep_combine_compact",
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


FP8_E4M3_MAX = 448.0
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


# --------------------------------------------------------------------------------------
# NVFP4 layout
# --------------------------------------------------------------------------------------

NVFP4_BLOCK = 16


def _pad_up(x: int, y: int) -> int:
    return (x + y - 1) // y * y


def compute_fp4_swizzled_layout_sf_size(total_row: int, total_column: int,
                                        row_size: int = 128) -> int:
    """Bytes of the swizzled FP4 scale-factor array: rows padded to ``row_size`` (128 for
    the 128x4 layout) times scale columns padded to 4.

    ``total_column`` is the number of SCALE columns (hidden // 16), as in FlashInfer's
    ``compute_fp4_swizzled_layout_sf_size(token_num, hidden // SF_VEC_SIZE)``.
    """
    if total_row < 0 or total_column < 0 or row_size < 1:
        raise ValueError("total_row, total_column must be >= 0 and row_size >= 1")
    return _pad_up(total_row, row_size) * _pad_up(total_column, 4)


def swizzled_sf_offset(m: Any, k: Any, num_cols: int) -> np.ndarray:
    """Byte offset of scale factor (row m, scale column k) in the 128x4 swizzled layout.

    ``num_cols`` is the number of DATA columns per row (hidden size N, FlashInfer's
    ``numCols``); Kt = ceil(N / 64) 512-byte tiles per 128-row band::

        (m // 128) * (Kt * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4

    Vectorised over ``m`` and ``k`` (broadcast); returns int64.
    """
    m = np.asarray(m, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    kt = (int(num_cols) + 63) // 64
    return ((m // 128) * (kt * 512) + (k // 4) * 512 + (m % 32) * 16
            + ((m % 128) // 32) * 4 + k % 4)


def swizzle_sf(sf: Any, num_cols: int) -> np.ndarray:
    """Row-major scale factors [M, N//16] (uint8) -> flat swizzled array (uint8) of
    ``compute_fp4_swizzled_layout_sf_size(M, N//16)`` bytes; padding bytes are 0."""
    sf = np.asarray(sf, dtype=np.uint8)
    rows, kcols = sf.shape
    if kcols * NVFP4_BLOCK != num_cols:
        raise ValueError(f"sf has {kcols} columns; num_cols={num_cols} needs {num_cols // NVFP4_BLOCK}")
    out = np.zeros(compute_fp4_swizzled_layout_sf_size(rows, kcols), dtype=np.uint8)
    mm, kk = np.meshgrid(np.arange(rows), np.arange(kcols), indexing="ij")
    out[swizzled_sf_offset(mm, kk, num_cols)] = sf
    return out


def unswizzle_sf(flat: Any, num_rows: int, num_cols: int) -> np.ndarray:
    """Inverse of :func:`swizzle_sf`: flat swizzled bytes -> [num_rows, num_cols//16]."""
    flat = np.asarray(flat, dtype=np.uint8).reshape(-1)
    kcols = num_cols // NVFP4_BLOCK
    need = compute_fp4_swizzled_layout_sf_size(num_rows, kcols)
    if flat.size < need:
        raise ValueError(f"swizzled sf has {flat.size} bytes, needs {need}")
    mm, kk = np.meshgrid(np.arange(num_rows), np.arange(kcols), indexing="ij")
    return flat[swizzled_sf_offset(mm, kk, num_cols)]


def pack_fp4(codes: Any) -> np.ndarray:
    """e2m1 codes [..., N] (N even) -> bytes [..., N//2]; element 2i in the LOW nibble."""
    c = np.asarray(codes, dtype=np.uint8) & 0xF
    if c.shape[-1] % 2:
        raise ValueError("pack_fp4 needs an even number of elements in the last axis")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_fp4(packed: Any) -> np.ndarray:
    """bytes [..., N//2] -> e2m1 codes [..., N] (low nibble first)."""
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = p >> 4
    return out


# --------------------------------------------------------------------------------------
# quantizers
# --------------------------------------------------------------------------------------

def _as_2d_f32(x: Any, name: str) -> np.ndarray:
    x32 = to_float32(x)
    if x32.ndim != 2:
        raise ValueError(f"{name} must be 2-D [M, N], got shape {x32.shape}")
    return x32


def quant_fp8(x: Any, scale_factor: float) -> np.ndarray:
    """Static FP8: ``q = e4m3_sat(fp32(x) * fp32(scale_factor))`` -> uint8 codes, x's shape.

    ``scale_factor`` multiplies (it is the reciprocal of the dequantization scale).
    """
    return fp8_e4m3_encode(to_float32(x) * _scalar_f32(scale_factor, "scale_factor"))


def dequant_fp8(q: Any, scale_factor: float) -> np.ndarray:
    """Inverse of :func:`quant_fp8` up to rounding: ``decode(q) / scale_factor`` (fp32)."""
    return fp8_e4m3_decode(q) / _scalar_f32(scale_factor, "scale_factor")


def quant_nvfp4(x: Any, global_scale: float, layout: str = "swizzled"):
    """NVFP4 quantization of x [M, N] (N % 16 == 0).

    Per 16-element block along a row (fp32 throughout, each operation rounded):

    * ``amax = max |v|``; ``sf = e4m3_sat((global_scale * amax) / 6)`` (multiply, then
      divide by 6.0f, then RNE to e4m3; >448 saturates to 448).
    * each element ``code = e2m1_rne((v * global_scale) / float(sf))`` where
      ``float(sf)`` is the DECODED e4m3 value. If the block's ``sf`` decodes to 0 (all-zero
      block, or ``global_scale * amax / 6 < 2**-10``), every code of the block is 0 (+0):
      the division by zero is never performed.

    Returns ``(packed, sf)``: ``packed`` uint8 [M, N//2] with the even element in the low
    nibble; ``sf`` uint8 e4m3 codes, either ``layout="swizzled"``: flat
    [compute_fp4_swizzled_layout_sf_size(M, N//16)] in the 128x4 layout
    (:func:`swizzled_sf_offset`), padding bytes 0; or ``layout="linear"``: [M, N//16]
    row-major. ``global_scale`` must be finite and > 0 (usually 448 * 6 / amax(tensor)).
    """
    x32 = _as_2d_f32(x, "x")
    m, n = x32.shape
    if n % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs N % 16 == 0, got N={n}")
    if layout not in ("swizzled", "linear"):
        raise ValueError(f"layout must be 'swizzled' or 'linear', got {layout!r}")
    gs = _scalar_f32(global_scale, "global_scale")
    if not (np.isfinite(gs) and gs > 0):
        raise ValueError(f"global_scale must be finite and > 0, got {global_scale}")
    blocks = x32.reshape(m, n // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = np.max(np.abs(blocks), axis=-1) if n else np.zeros((m, 0), np.float32)
    sf_code = fp8_e4m3_encode((gs * amax) / np.float32(6.0))
    sf_val = fp8_e4m3_decode(sf_code)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = (blocks * gs) / sf_val
    scaled = np.where(sf_val == 0, np.float32(0.0), scaled).astype(np.float32)
    packed = pack_fp4(fp4_e2m1_encode(scaled).reshape(m, n))
    sf = swizzle_sf(sf_code, n) if layout == "swizzled" else sf_code
    return packed, sf


def dequant_nvfp4(packed: Any, sf: Any, global_scale: float, num_rows: int, num_cols: int,
                  layout: str = "swizzled") -> np.ndarray:
    """Dequantize NVFP4: ``e2m1(code) * float(sf) / global_scale`` -> fp32 [M, N]."""
    codes = unpack_fp4(packed).reshape(num_rows, num_cols)
    sf2 = unswizzle_sf(sf, num_rows, num_cols) if layout == "swizzled" else np.asarray(sf, np.uint8)
    sfv = np.repeat(fp8_e4m3_decode(sf2), NVFP4_BLOCK, axis=1)
    return (fp4_e2m1_decode(codes) * sfv) / _scalar_f32(global_scale, "global_scale")


# per-token-group FP8 with UE8M0 scales ------------------------------------------------

GROUP_FP8_MIN_SCALE = np.float32(1e-10)
"""Lower clamp of amax/448 before the power-of-two ceiling (as DeepGEMM/FlashInfer):
an all-zero group gets scale 2**-33 (UE8M0 byte 94)."""


def pack_ue8m0(exps: Any) -> np.ndarray:
    """UE8M0 bytes [M, G] -> int32 [M, ceil(G/4)]: group 4j+i in byte i (little-endian,
    group 4j in the low byte); missing groups of the last word are 0 bytes."""
    e = np.asarray(exps, dtype=np.uint8)
    m, g = e.shape
    k4 = (g + 3) // 4
    buf = np.zeros((m, k4 * 4), dtype=np.uint8)
    buf[:, :g] = e
    return buf.view("<u4").astype(np.uint32).view(np.int32).reshape(m, k4)


def unpack_ue8m0(packed: Any, num_groups: int) -> np.ndarray:
    """Inverse of :func:`pack_ue8m0`: int32 [M, K4] -> UE8M0 bytes [M, num_groups]."""
    p = _contig(packed, np.int32)
    m = p.shape[0]
    b = p.astype("<i4").view(np.uint8).reshape(m, -1)
    return b[:, :num_groups].copy()


def ue8m0_mn_major_storage_size(num_rows: int, num_groups: int) -> int:
    """int32 elements of the TMA-aligned MN-major storage of packed UE8M0 scales
    (DeepGEMM / FlashInfer ``kARResidualRMSNorm*PerTokenGroupFP8PackedQuant``):
    ``M + (K4 - 1) * align4(M)`` with ``K4 = ceil(G/4)``, ``align4(M) = ceil(M/4)*4``."""
    k4 = (num_groups + 3) // 4
    return num_rows + (k4 - 1) * _pad_up(num_rows, 4) if k4 else 0


def ue8m0_to_mn_major_storage(packed: Any) -> np.ndarray:
    """Logical packed scales int32 [M, K4] -> flat int32 storage in the MN-major,
    TMA-aligned layout: element (t, j) at ``j * align4(M) + t`` (i.e. a strided
    [M, K4] view with strides (1, align4(M)) elements). Gap elements are 0."""
    p = np.asarray(packed, dtype=np.int32)
    m, k4 = p.shape
    out = np.zeros(ue8m0_mn_major_storage_size(m, 4 * k4), dtype=np.int32)
    mn = _pad_up(m, 4)
    t, j = np.meshgrid(np.arange(m), np.arange(k4), indexing="ij")
    out[j * mn + t] = p
    return out


def ue8m0_from_mn_major_storage(storage: Any, num_rows: int, num_groups: int) -> np.ndarray:
    """Inverse of :func:`ue8m0_to_mn_major_storage` -> int32 [M, ceil(G/4)]."""
    s = np.asarray(storage, dtype=np.int32).reshape(-1)
    k4 = (num_groups + 3) // 4
    mn = _pad_up(num_rows, 4)
    t, j = np.meshgrid(np.arange(num_rows), np.arange(k4), indexing="ij")
    return s[j * mn + t]


def quant_fp8_per_token_group(x: Any, group_size: int):
    """Per-token-group FP8 with packed UE8M0 scales (DeepSeek style), x [M, N], N % g == 0.

    For each group of ``g`` consecutive elements of a row (fp32):

    * ``amax = max |v|``; ``v = max(fp32(amax / 448), 1e-10f)`` (correctly rounded
      division); ``e = ue8m0_encode_ceil(v)`` - the smallest power of two >= v, computed
      exactly from the bits; ``scale = 2**(e - 127)``. An all-zero group gets 2**-33
      (e = 94).
    * ``q = e4m3_sat(v_elem / scale)`` (exact division by a power of two). Since
      ``scale >= fp32(amax / 448)``, ``|v / scale| <= 448 * (1 + 2**-23)``, which rounds to
      448: a finite group never saturates.

    Returns ``(q uint8 [M, N], scale int32 [M, ceil(N/g/4)])``: the logical packed scale
    array, four exponent bytes per int32, group 4j+i in byte i (little-endian). Device
    outputs store it MN-major / TMA-aligned: see :func:`ue8m0_to_mn_major_storage`.
    """
    x32 = _as_2d_f32(x, "x")
    m, n = x32.shape
    g = int(group_size)
    if g <= 0 or n % g:
        raise ValueError(f"block_quant_group_size={group_size} must be > 0 and divide N={n}")
    blocks = x32.reshape(m, n // g, g)
    amax = np.max(np.abs(blocks), axis=-1) if n else np.zeros((m, 0), np.float32)
    v = np.maximum(amax / np.float32(FP8_E4M3_MAX), GROUP_FP8_MIN_SCALE)
    e = ue8m0_encode_ceil(v)
    scale = ue8m0_decode(e)[..., None]
    q = fp8_e4m3_encode(blocks / scale).reshape(m, n)
    return q, pack_ue8m0(e)


def dequant_fp8_per_token_group(q: Any, packed_scale: Any, group_size: int) -> np.ndarray:
    """``decode(q) * 2**(e - 127)`` per group -> fp32 [M, N]."""
    q = np.asarray(q, dtype=np.uint8)
    m, n = q.shape
    e = unpack_ue8m0(packed_scale, n // group_size)
    return fp8_e4m3_decode(q) * np.repeat(ue8m0_decode(e), group_size, axis=1)


# dynamic per-token FP8 -----------------------------------------------------------------

DYNAMIC_FP8_MIN_SCALE = np.float32(1.0 / (FP8_E4M3_MAX * 512.0))
"""Lower clamp of the dynamic per-token scale: 2**-9 / 448 (e4m3 smallest subnormal over
its max), as vLLM and FlashInfer use; an all-zero row gets this scale and q = 0."""


def quant_fp8_dynamic_per_token(x: Any):
    """Dynamic per-token FP8: per row ``scale = max(fp32(amax / 448), 2**-9/448)``;
    ``q = e4m3_sat(v / scale)`` (correctly rounded fp32 division, NOT a multiplication by
    a reciprocal). Returns ``(q uint8 [M, N], scale fp32 [M])`` (device: [M] or [M, 1])."""
    x32 = _as_2d_f32(x, "x")
    amax = np.max(np.abs(x32), axis=-1) if x32.shape[1] else np.zeros(x32.shape[0], np.float32)
    scale = np.maximum(amax / np.float32(FP8_E4M3_MAX), DYNAMIC_FP8_MIN_SCALE).astype(np.float32)
    return fp8_e4m3_encode(x32 / scale[:, None]), scale


def dequant_fp8_dynamic_per_token(q: Any, scale: Any) -> np.ndarray:
    """``decode(q) * scale[:, None]`` -> fp32."""
    return fp8_e4m3_decode(q) * np.asarray(scale, np.float32).reshape(-1, 1)


# --------------------------------------------------------------------------------------
# all-reduce and residual + RMSNorm
# --------------------------------------------------------------------------------------

def _check_same(arrays: Sequence[np.ndarray], what: str) -> None:
    if len(arrays) == 0:
        raise ValueError(f"{what}: need at least one rank")
    a0 = np.asarray(arrays[0])
    for r, a in enumerate(arrays):
        a = np.asarray(a)
        if a.shape != a0.shape or a.dtype != a0.dtype:
            raise ValueError(f"{what}: rank {r} has {a.shape}/{a.dtype}, rank 0 {a0.shape}/{a0.dtype}")


def all_reduce(inputs: Sequence[Any], dtype: Any = None) -> np.ndarray:
    """Sum over ranks: ``io(((x_0 + x_1) + x_2) + ...)`` in fp32, rank 0 first.

    ``inputs``: one array per rank, same shape and dtype (bf16 bits / fp16 / fp32).
    Input -0.0 is read as +0.0 (Lamport sentinel rule), so an all-zero sum is +0.0.
    Returns the result in ``dtype`` (default: the inputs' dtype); every rank gets it.
    """
    _check_same(inputs, "all_reduce")
    dtype = np.asarray(inputs[0]).dtype if dtype is None else dtype
    acc = to_float32(inputs[0]) + np.float32(0.0)       # -0 -> +0
    for x in inputs[1:]:
        acc = acc + to_float32(x)
    return cast_from_float32(acc, dtype)


def residual_rmsnorm(x: Any, residual: Any, gamma: Any, eps: float = 1e-6,
                     weight_bias: float = 0.0, dtype: Any = None):
    """Residual add + RMSNorm, rounding as the fused kernel does (module docstring 3-4).

    x, residual: [T, H] in the I/O dtype; gamma: [H] (any float dtype, read as fp32).
    ``residual=None`` means no residual add (residual_out = x).
    ``residual_out = io(fp32(x) + fp32(residual))``; with ``r = fp32(residual_out)``:
    ``norm_out = io((r * rstd) * (gamma + weight_bias))``,
    ``rstd = fp32(1 / sqrt(fp32(mean(r**2)) + fp32(eps)))`` (mean of squares summed in
    float64, rounded to fp32; ``+ eps`` in fp32; rsqrt correctly rounded).
    ``weight_bias`` 0.0 or None: standard RMSNorm; 1.0: Gemma/Qwen ``(1 + gamma)``.
    Returns ``(residual_out, norm_out)`` in ``dtype`` (default: x's dtype).
    """
    dtype = np.asarray(x).dtype if dtype is None else dtype
    weight_bias = 0.0 if weight_bias is None else weight_bias
    r32 = to_float32(x)
    if residual is not None:
        r32 = r32 + to_float32(residual)
    residual_out = cast_from_float32(r32, dtype)
    r = to_float32(residual_out)
    if r.ndim != 2:
        raise ValueError(f"x must be [T, H], got {r.shape}")
    g = to_float32(gamma).reshape(-1)
    if g.shape[0] != r.shape[1]:
        raise ValueError(f"gamma has {g.shape[0]} elements, hidden size is {r.shape[1]}")
    ms = np.mean(np.square(r.astype(np.float64)), axis=-1).astype(np.float32)
    denom = (ms + np.float32(eps)).astype(np.float64)
    rstd = (1.0 / np.sqrt(denom)).astype(np.float32)
    w = g + np.float32(weight_bias)
    norm32 = (r * rstd[:, None]) * w[None, :]
    return residual_out, cast_from_float32(norm32, dtype)


# --------------------------------------------------------------------------------------
# allreduce_fusion
# --------------------------------------------------------------------------------------

# pattern -> (does residual+RMSNorm, quant kind or None, writes norm_out)
ALLREDUCE_FUSION_PATTERNS = {
    "kAllReduce": (False, None, False),
    "kARResidualRMSNorm": (True, None, True),
    "kARResidualRMSNormFP8Quant": (True, "fp8", False),
    "kARResidualRMSNormFP4Quant": (True, "fp4", False),
    "kARResidualRMSNormOutFP8Quant": (True, "fp8", True),
    "kARResidualRMSNormOutFP4Quant": (True, "fp4", True),
    "kARResidualRMSNormPerTokenGroupFP8PackedQuant": (True, "group_fp8", False),
    "kARResidualRMSNormOutPerTokenGroupFP8PackedQuant": (True, "group_fp8", True),
    "kARResidualRMSNormDynamicFP8Quant": (True, "dynamic_fp8", False),
    "kARResidualRMSNormOutDynamicFP8Quant": (True, "dynamic_fp8", True),
}


def _pattern_name(pattern: Any) -> str:
    name = pattern if isinstance(pattern, str) else getattr(pattern, "name", None)
    if name not in ALLREDUCE_FUSION_PATTERNS:
        raise ValueError(f"unknown allreduce_fusion pattern {pattern!r}; "
                         f"known: {sorted(ALLREDUCE_FUSION_PATTERNS)}")
    return name


def pattern_outputs(pattern: Any) -> tuple:
    """Outputs a pattern must write (the caller must pass them; ``allreduce_out`` is
    optional for every other pattern). FP8 static quant has no ``scale_out``."""
    norm, quant, norm_out = ALLREDUCE_FUSION_PATTERNS[_pattern_name(pattern)]
    if not norm:
        return ("allreduce_out",)
    outs = ["residual_out"]
    if norm_out:
        outs.append("norm_out")
    if quant is not None:
        outs.append("quant_out")
        if quant != "fp8":
            outs.append("scale_out")
    return tuple(outs)


def allreduce_fusion(inputs: Sequence[Any], pattern: Any, *, residual: Any = None,
                     rms_gamma: Any = None, rms_eps: float = 1e-6, weight_bias: float = 0.0,
                     scale_factor: float | None = None, layout: str = "swizzled",
                     block_quant_group_size: int | None = None, dtype: Any = None) -> dict:
    """Fused all-reduce reference. ``inputs``: per-rank [T, H] arrays in the I/O dtype.

    ``pattern`` is a name of :data:`ALLREDUCE_FUSION_PATTERNS` (or an enum member with that
    ``.name``). ``residual`` [T, H] is this rank's residual input (call once per rank if
    ranks' residuals differ); ``rms_gamma`` [H]. ``scale_factor``: FP8 static quant
    multiplier, or the NVFP4 ``global_scale`` (FP4 patterns). ``layout``: NVFP4 scale
    layout ("swizzled" | "linear"). ``block_quant_group_size``: group size for the
    per-token-group patterns.

    Returns a dict with ``allreduce_out`` always, plus the pattern's outputs
    (:func:`pattern_outputs`): ``residual_out``, ``norm_out`` (I/O dtype), ``quant_out``
    (uint8 codes: e4m3 [T, H], or packed e2m1 [T, H//2]) and ``scale_out`` (NVFP4: uint8
    e4m3 per :func:`quant_nvfp4`; group FP8: int32 [T, ceil(H/g/4)] logical packed UE8M0;
    dynamic FP8: fp32 [T]). Rounding points: module docstring.
    """
    name = _pattern_name(pattern)
    do_norm, quant, _ = ALLREDUCE_FUSION_PATTERNS[name]
    _check_same(inputs, "allreduce_fusion")
    dtype = np.asarray(inputs[0]).dtype if dtype is None else dtype
    ar = all_reduce(inputs, dtype)
    out = {"allreduce_out": ar}
    if not do_norm:
        return out
    if residual is None:
        raise ValueError(f"pattern {name} needs residual")
    if rms_gamma is None:
        raise ValueError(f"pattern {name} needs rms_gamma")
    if np.asarray(residual).shape != np.asarray(ar).shape:
        raise ValueError(f"residual shape {np.asarray(residual).shape} != input shape {ar.shape}")
    residual_out, norm_out = residual_rmsnorm(ar, residual, rms_gamma, rms_eps, weight_bias, dtype)
    out["residual_out"] = residual_out
    if "norm_out" in pattern_outputs(name):
        out["norm_out"] = norm_out
    if quant is None:
        return out
    y = to_float32(norm_out)
    if quant == "fp8":
        if scale_factor is None:
            raise ValueError(f"pattern {name} needs scale_factor")
        out["quant_out"] = quant_fp8(y, scale_factor)
    elif quant == "fp4":
        if scale_factor is None:
            raise ValueError(f"pattern {name} needs scale_factor (the NVFP4 global scale)")
        out["quant_out"], out["scale_out"] = quant_nvfp4(y, scale_factor, layout)
    elif quant == "group_fp8":
        if block_quant_group_size is None:
            raise ValueError(f"pattern {name} needs block_quant_group_size")
        out["quant_out"], out["scale_out"] = quant_fp8_per_token_group(y, block_quant_group_size)
    else:  # dynamic_fp8
        out["quant_out"], out["scale_out"] = quant_fp8_dynamic_per_token(y)
    return out


# --------------------------------------------------------------------------------------
# MoE reductions fused before the all-reduce
# --------------------------------------------------------------------------------------

def moe_reduction(active_experts_token_input: Any, scale_input: Any, token_input: Any,
                  dtype: Any = None) -> np.ndarray:
    """This rank's MoE reduction (``trtllm_moe_allreduce_fusion``), before the all-reduce.

    active_experts_token_input [E, T, H] (I/O dtype), scale_input [E, T] (fp32, expert
    major: expert e's weight for token t at e*T + t), token_input [T, H] (I/O dtype).
    ``acc = sum_e fp32(a[e]) * s[e]`` (e ascending, fp32 products and adds, starting from
    +0), then ``acc + fp32(token_input)``; rounded once to ``dtype`` (default: token_input's).
    """
    a = to_float32(active_experts_token_input)
    s = to_float32(scale_input)
    tok = to_float32(token_input)
    if a.ndim != 3 or tok.ndim != 2 or a.shape[1:] != tok.shape:
        raise ValueError(f"expected active [E, T, H] and token_input [T, H]; got {a.shape}, {tok.shape}")
    if s.shape != a.shape[:2]:
        raise ValueError(f"scale_input must be [E, T] = {a.shape[:2]}, got {s.shape}")
    dtype = np.asarray(token_input).dtype if dtype is None else dtype
    acc = np.zeros(tok.shape, np.float32)
    for e in range(a.shape[0]):
        acc = acc + a[e] * s[e][:, None]
    return cast_from_float32(acc + tok, dtype)


def moe_finalize(allreduce_in: Any, expanded_idx_to_permuted_idx: Any,
                 expert_scale_factor: Any = None, shared_expert_output: Any = None,
                 routed_scaling_factor: float = 1.0, dtype: Any = None) -> np.ndarray:
    """This rank's MoE finalize (un-permute) (``trtllm_moe_finalize_allreduce_fusion``).

    allreduce_in [P, H]: expert outputs in permuted order (I/O dtype);
    expanded_idx_to_permuted_idx [T, k] int: row of token t's k-th expert, or < 0 when
    that expert is not on this rank (contributes nothing); expert_scale_factor [T, k]
    (any float dtype; None = 1); shared_expert_output [T, H] or None.
    In fp32: ``acc = sum_{k ascending, p >= 0} fp32(allreduce_in[p]) * fp32(scale[t, k])``;
    ``acc = acc * fp32(routed_scaling_factor)`` (routed terms only);
    ``acc = acc + fp32(shared_expert_output)``; rounded once to ``dtype`` (default:
    allreduce_in's). Indices >= P raise ValueError.
    """
    a = to_float32(allreduce_in)
    idx = np.asarray(expanded_idx_to_permuted_idx).astype(np.int64)
    if a.ndim != 2 or idx.ndim != 2:
        raise ValueError(f"expected allreduce_in [P, H] and index [T, k]; got {a.shape}, {idx.shape}")
    if idx.size and idx.max() >= a.shape[0]:
        raise ValueError(f"expanded_idx_to_permuted_idx has {idx.max()} >= {a.shape[0]} rows")
    t, k = idx.shape
    w = None if expert_scale_factor is None else to_float32(expert_scale_factor)
    if w is not None and w.shape != idx.shape:
        raise ValueError(f"expert_scale_factor must be {idx.shape}, got {w.shape}")
    dtype = np.asarray(allreduce_in).dtype if dtype is None else dtype
    acc = np.zeros((t, a.shape[1]), np.float32)
    for j in range(k):
        p = idx[:, j]
        valid = p >= 0
        rows = a[np.where(valid, p, 0)] if a.shape[0] else np.zeros((t, a.shape[1]), np.float32)
        term = rows if w is None else rows * w[:, j][:, None]
        acc = acc + np.where(valid[:, None], term, np.float32(0.0))
    acc = acc * np.float32(routed_scaling_factor)
    if shared_expert_output is not None:
        sh = to_float32(shared_expert_output)
        if sh.shape != acc.shape:
            raise ValueError(f"shared_expert_output must be {acc.shape}, got {sh.shape}")
        acc = acc + sh
    return cast_from_float32(acc, dtype)


def moe_allreduce_fusion(active_experts_token_input: Sequence[Any], scale_input: Sequence[Any],
                         token_input: Sequence[Any], pattern: Any = "kARResidualRMSNorm",
                         **kwargs) -> dict:
    """Per-rank :func:`moe_reduction`, then :func:`allreduce_fusion` (same keyword args)."""
    contrib = [moe_reduction(a, s, t, kwargs.get("dtype"))
               for a, s, t in zip(active_experts_token_input, scale_input, token_input)]
    return allreduce_fusion(contrib, pattern, **kwargs)


def moe_finalize_allreduce_fusion(allreduce_in: Sequence[Any], expanded_idx_to_permuted_idx: Sequence[Any],
                                  expert_scale_factor: Sequence[Any] | None = None,
                                  shared_expert_output: Sequence[Any] | None = None,
                                  routed_scaling_factor: float = 1.0,
                                  pattern: Any = "kARResidualRMSNorm", **kwargs) -> dict:
    """Per-rank :func:`moe_finalize`, then :func:`allreduce_fusion` (same keyword args)."""
    n = len(allreduce_in)
    esf = expert_scale_factor if expert_scale_factor is not None else [None] * n
    seo = shared_expert_output if shared_expert_output is not None else [None] * n
    contrib = [moe_finalize(allreduce_in[r], expanded_idx_to_permuted_idx[r], esf[r], seo[r],
                            routed_scaling_factor, kwargs.get("dtype")) for r in range(n)]
    return allreduce_fusion(contrib, pattern, **kwargs)


# --------------------------------------------------------------------------------------
# MoE all-to-all, static layout (MoeAlltoAll)
# --------------------------------------------------------------------------------------

def _experts_per_rank(num_experts: int, ep_size: int) -> int:
    if ep_size < 1 or num_experts < 1 or num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} must be a positive multiple of ep_size={ep_size}")
    return num_experts // ep_size


def moe_a2a_target_ranks(token_selected_experts: Any, num_experts: int, ep_size: int) -> np.ndarray:
    """bool [T, ep_size]: does token t go to rank r. ``rank = expert // (num_experts //
    ep_size)``; ids < 0 or >= num_experts route nowhere; duplicates count once."""
    ids = np.asarray(token_selected_experts)
    if ids.ndim != 2:
        raise ValueError(f"token_selected_experts must be [T, top_k], got {ids.shape}")
    epr = _experts_per_rank(num_experts, ep_size)
    ids = ids.astype(np.int64)
    valid = (ids >= 0) & (ids < num_experts)
    rank = np.where(valid, ids // epr, -1)
    return (rank[:, :, None] == np.arange(ep_size)[None, None, :]).any(axis=1)


@dataclass
class A2ARouting:
    """What combine needs from dispatch (static layout).

    send_slot[s]: int32 [T_s, ep_size], the row of source rank s's token t inside block s
    of rank r's receive tensors, or -1 when t does not go to r.
    recv_counts[r]: int32 [ep_size], the valid rows of each block on rank r.
    """
    ep_size: int
    num_experts: int
    runtime_max_tokens_per_rank: int
    num_tokens: list
    send_slot: list
    recv_counts: list


def moe_a2a_dispatch(token_selected_experts: Sequence[Any], payloads: Sequence[Sequence[Any]],
                     num_experts: int, ep_size: int, runtime_max_tokens_per_rank: int,
                     invalid_token_expert_id: int | None = None,
                     expert_id_payload_index: int | None = None):
    """MoeAlltoAll dispatch over all ranks at once.

    token_selected_experts[s]: int [T_s, top_k] of rank s (T_s <= runtime_max, may be 0);
    payloads[s]: list of per-token arrays [T_s, ...] (any dtype; the same count, dtypes
    and trailing shapes on every rank).

    Each token goes once to every DISTINCT rank owning one of its valid experts. On rank r,
    payload p arrives as ``[ep_size, runtime_max, ...]``: block s holds, compacted and in
    source token order, the tokens of rank s routed to r; rows past ``recv_counts[r][s]``
    are padding (0 here; on device unspecified except expert ids, see below).
    With ``invalid_token_expert_id`` set, payload ``expert_id_payload_index`` (the ids) is
    sanitized on each receiving rank (:func:`sanitize_expert_ids`, padding rows included).

    Returns ``(recv, recv_counts, routing)``: recv[r][p] arrays, recv_counts[r] int32
    [ep_size], and an :class:`A2ARouting` for :func:`moe_a2a_combine`.
    """
    n = ep_size
    if len(token_selected_experts) != n or len(payloads) != n:
        raise ValueError(f"need token_selected_experts and payloads for all {n} ranks")
    rmax = int(runtime_max_tokens_per_rank)
    masks, num_tokens = [], []
    for s in range(n):
        ids = np.asarray(token_selected_experts[s])
        if ids.shape[0] > rmax:
            raise ValueError(f"rank {s} has {ids.shape[0]} tokens > runtime_max_tokens_per_rank={rmax}")
        masks.append(moe_a2a_target_ranks(ids, num_experts, n))
        num_tokens.append(ids.shape[0])
    npay = len(payloads[0])
    for s in range(n):
        if len(payloads[s]) != npay:
            raise ValueError(f"rank {s} has {len(payloads[s])} payloads, rank 0 has {npay}")
        for p in range(npay):
            a, a0 = np.asarray(payloads[s][p]), np.asarray(payloads[0][p])
            if a.shape[0] != num_tokens[s] or a.shape[1:] != a0.shape[1:] or a.dtype != a0.dtype:
                raise ValueError(f"payload {p} of rank {s}: shape {a.shape}/{a.dtype} does not "
                                 f"match [T={num_tokens[s]}, {a0.shape[1:]}]/{a0.dtype}")
    send_slot = []
    for s in range(n):
        c = np.cumsum(masks[s], axis=0) - 1
        send_slot.append(np.where(masks[s], c, -1).astype(np.int32))
    recv_counts = [np.array([masks[s][:, r].sum() for s in range(n)], dtype=np.int32) for r in range(n)]
    recv = []
    for r in range(n):
        per_payload = []
        for p in range(npay):
            a0 = np.asarray(payloads[0][p])
            buf = np.zeros((n, rmax) + a0.shape[1:], dtype=a0.dtype)
            for s in range(n):
                rows = np.nonzero(masks[s][:, r])[0]
                buf[s, :rows.size] = np.asarray(payloads[s][p])[rows]
            per_payload.append(buf)
        if invalid_token_expert_id is not None:
            if expert_id_payload_index is None:
                raise ValueError("invalid_token_expert_id needs expert_id_payload_index")
            i = expert_id_payload_index
            per_payload[i] = sanitize_expert_ids(per_payload[i], r, num_experts // n,
                                                 invalid_token_expert_id, recv_counts[r])
        recv.append(per_payload)
    routing = A2ARouting(n, num_experts, rmax, num_tokens, send_slot, recv_counts)
    return recv, recv_counts, routing


def moe_a2a_combine(payloads: Sequence[Any], routing: A2ARouting, dtype: Any = None) -> list:
    """MoeAlltoAll combine over all ranks at once.

    payloads[r]: [ep_size, runtime_max, ...] on rank r (bf16 bits / fp16 / fp32), row
    (s, i) being rank r's result for the i-th token it received from rank s.
    Returns, per source rank s, [T_s, ...]: for each token the sum over its distinct
    target ranks r = 0, 1, ... (ascending) of ``fp32(payloads[r][s, slot])``, in fp32
    starting from +0, rounded once to ``dtype`` (default: the payload dtype). A token with
    no valid expert gets +0.
    """
    n = routing.ep_size
    if len(payloads) != n:
        raise ValueError(f"need payloads of all {n} ranks")
    _check_same(payloads, "moe_a2a_combine")
    p0 = np.asarray(payloads[0])
    if p0.ndim < 2 or p0.shape[:2] != (n, routing.runtime_max_tokens_per_rank):
        raise ValueError(f"payload must be [ep_size={n}, runtime_max="
                         f"{routing.runtime_max_tokens_per_rank}, ...], got {p0.shape}")
    dtype = p0.dtype if dtype is None else dtype
    f32 = [to_float32(p) for p in payloads]
    outs = []
    for s in range(n):
        acc = np.zeros((routing.num_tokens[s],) + p0.shape[2:], np.float32)
        for r in range(n):
            slot = routing.send_slot[s][:, r].astype(np.int64)
            valid = (slot >= 0).reshape((-1,) + (1,) * (acc.ndim - 1))
            rows = f32[r][s][np.maximum(slot, 0)]
            acc = acc + np.where(valid, rows, np.float32(0.0))
        outs.append(cast_from_float32(acc, dtype))
    return outs


def sanitize_expert_ids(ids: Any, ep_rank: int, experts_per_rank: int, invalid_id: int,
                        recv_counts: Any = None) -> np.ndarray:
    """Rewrite expert ids not owned by ``ep_rank`` (outside
    [ep_rank*experts_per_rank, (ep_rank+1)*experts_per_rank)) to ``invalid_id``.

    With ``recv_counts`` [ep_size], ``ids`` is a receive tensor [ep_size, runtime_max, ...]
    and padding rows (index >= recv_counts[s] in block s) are set to ``invalid_id`` too.
    Returns a new array of ids' dtype.
    """
    a = np.asarray(ids)
    lo = ep_rank * experts_per_rank
    own = (a >= lo) & (a < lo + experts_per_rank)
    out = np.where(own, a, invalid_id).astype(a.dtype)
    if recv_counts is not None:
        rc = np.asarray(recv_counts).reshape(-1)
        if a.ndim < 2 or a.shape[0] != rc.size:
            raise ValueError(f"ids must be [ep_size={rc.size}, runtime_max, ...], got {a.shape}")
        pad = np.arange(a.shape[1])[None, :] >= rc[:, None]
        out[pad] = invalid_id
    return out


moe_a2a_sanitize_expert_ids = sanitize_expert_ids


# --------------------------------------------------------------------------------------
# compact expert-major EP all-to-all
# --------------------------------------------------------------------------------------

@dataclass
class CompactLayout:
    """Routing metadata of the compact expert-major layout.

    Per receiving rank r (lists indexed by r):
      src[r]: int32 [R_r, 3] - (src_rank, token, k_slot) of each received row;
      local_expert[r]: int32 [R_r] - local expert index (global id - r*experts_per_rank);
      tokens_per_expert[r]: int32 [experts_per_rank] - rows per local expert.
    weights[r]: fp32 [R_r] received routing weights, or None when dispatch had none.
    num_tokens[s], top_k: source-side shapes for combine.
    """
    ep_size: int
    num_experts: int
    experts_per_rank: int
    top_k: int
    num_tokens: list
    src: list
    local_expert: list
    tokens_per_expert: list
    weights: list | None = field(default=None)


def ep_dispatch_compact(x: Sequence[Any], topk_ids: Sequence[Any], weights: Sequence[Any] | None,
                        num_experts: int, ep_size: int):
    """Compact expert-major dispatch over all ranks at once.

    x[s] [T_s, H] (any dtype), topk_ids[s] int [T_s, k], weights[s] [T_s, k] (read as fp32)
    or None. Every (token, k-slot) whose expert id is valid (0 <= id < num_experts) gives
    one row on the owning rank r = id // experts_per_rank - a token choosing the same
    expert in two slots gives two rows. Rows on rank r are grouped by local expert
    (ascending); within an expert they are ordered by (source rank, token index, k slot).

    Returns ``(x_recv, w_recv, layout)``: x_recv[r] [R_r, H] (x's dtype), w_recv[r] fp32
    [R_r] or None, and a :class:`CompactLayout` (tokens_per_expert, src, ...).
    """
    n = ep_size
    epr = _experts_per_rank(num_experts, n)
    if len(x) != n or len(topk_ids) != n or (weights is not None and len(weights) != n):
        raise ValueError(f"need x, topk_ids (and weights) for all {n} ranks")
    ids = [np.asarray(t).astype(np.int64) for t in topk_ids]
    k = ids[0].shape[1] if ids[0].ndim == 2 else -1
    xs = [np.asarray(a) for a in x]
    for s in range(n):
        if ids[s].ndim != 2 or ids[s].shape[1] != k or xs[s].shape[0] != ids[s].shape[0]:
            raise ValueError(f"rank {s}: topk_ids {ids[s].shape} / x {xs[s].shape} do not match [T, k={k}]")
    for s in range(1, n):
        if xs[s].dtype != xs[0].dtype or xs[s].shape[1:] != xs[0].shape[1:]:
            raise ValueError(f"x of rank {s} is {xs[s].shape}/{xs[s].dtype}, rank 0 {xs[0].shape}/{xs[0].dtype}")
    ws = None if weights is None else [to_float32(w) for w in weights]
    if ws is not None:
        for s in range(n):
            if ws[s].shape != ids[s].shape:
                raise ValueError(f"weights of rank {s} must be {ids[s].shape}, got {ws[s].shape}")
    # flatten every (s, t, k) slot of every rank
    S = np.concatenate([np.full(ids[s].size, s, np.int64) for s in range(n)])
    T = np.concatenate([np.repeat(np.arange(ids[s].shape[0]), k) for s in range(n)])
    K = np.concatenate([np.tile(np.arange(k), ids[s].shape[0]) for s in range(n)])
    E = np.concatenate([ids[s].reshape(-1) for s in range(n)])
    W = None if ws is None else np.concatenate([ws[s].reshape(-1) for s in range(n)])
    offs = np.cumsum([0] + [xs[s].shape[0] for s in range(n)])
    X = np.concatenate(xs, axis=0)
    valid = (E >= 0) & (E < num_experts)
    x_recv, w_recv, src, local, tpe = [], [], [], [], []
    for r in range(n):
        sel = valid & (E // epr == r)
        le = E[sel] - r * epr
        order = np.lexsort((K[sel], T[sel], S[sel], le))
        s_, t_, k_, le = S[sel][order], T[sel][order], K[sel][order], le[order]
        x_recv.append(X[offs[s_] + t_])
        w_recv.append(None if W is None else W[sel][order].astype(np.float32))
        src.append(np.stack([s_, t_, k_], axis=1).astype(np.int32).reshape(-1, 3))
        local.append(le.astype(np.int32))
        tpe.append(np.bincount(le, minlength=epr).astype(np.int32))
    layout = CompactLayout(n, num_experts, epr, k, [a.shape[0] for a in xs], src, local, tpe,
                           None if ws is None else w_recv)
    return x_recv, (None if ws is None else w_recv), layout


def ep_combine_compact(y: Sequence[Any], layout: CompactLayout, apply_weights: bool = False,
                       dtype: Any = None) -> list:
    """Compact expert-major combine over all ranks at once.

    y[r]: [R_r, H] expert outputs in rank r's received row order (bf16 bits / fp16 /
    fp32). Returns per source rank s, [T_s, H]: for each token, the sum over its k slots
    in ascending slot order of the row produced for that slot (slots with an invalid
    expert contribute nothing), times ``fp32(weight)`` when ``apply_weights`` (needs
    dispatch weights), in fp32 from +0, rounded once to ``dtype`` (default: y's dtype).
    """
    n = layout.ep_size
    if len(y) != n:
        raise ValueError(f"need y of all {n} ranks")
    if apply_weights and layout.weights is None:
        raise ValueError("apply_weights=True but dispatch had no weights")
    ys = [np.asarray(a) for a in y]
    for r in range(n):
        if ys[r].shape[0] != layout.src[r].shape[0]:
            raise ValueError(f"y[{r}] has {ys[r].shape[0]} rows, rank {r} received {layout.src[r].shape[0]}")
    dtype = ys[0].dtype if dtype is None else dtype
    Y = np.concatenate([to_float32(a) for a in ys], axis=0)
    src = np.concatenate(layout.src, axis=0).astype(np.int64)
    Wt = np.concatenate(layout.weights) if apply_weights else None
    k = layout.top_k
    outs = []
    for s in range(n):
        t_n = layout.num_tokens[s]
        loc = np.full((t_n, max(k, 0)), -1, np.int64)
        mine = np.nonzero(src[:, 0] == s)[0]
        loc[src[mine, 1], src[mine, 2]] = mine
        acc = np.zeros((t_n,) + Y.shape[1:], np.float32)
        for j in range(k):
            g = loc[:, j]
            valid = (g >= 0)[:, None]
            rows = Y[np.maximum(g, 0)] if Y.shape[0] else np.zeros_like(acc)
            if Wt is not None:
                rows = rows * (Wt[np.maximum(g, 0)] if Wt.size else np.zeros(t_n, np.float32))[:, None]
            acc = acc + np.where(valid, rows, np.float32(0.0))
        outs.append(cast_from_float32(acc, dtype))
    return outs
