"""Quantizers of the fused epilogues and the FP8 dispatch, with their dequantizers.

Static per-tensor FP8, NVFP4 (e2m1 in 16-element blocks with e4m3 block scales),
per-token-group FP8 with UE8M0 scales, dynamic per-token FP8. Each docstring states the
operation order; every operation is fp32 and rounded (see ``moecomm.reference``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..constants import (DYNAMIC_FP8_MIN_SCALE, FP8_E4M3_MAX, GROUP_FP8_MIN_SCALE, NVFP4_BLOCK,
                         QuantizationSFLayout)
from .formats import (_as_2d_f32, _scalar_f32, fp4_e2m1_decode, fp4_e2m1_encode,
                      fp8_e4m3_decode, fp8_e4m3_encode, to_float32, ue8m0_decode,
                      ue8m0_encode_ceil)
from .layouts import pack_fp4, pack_ue8m0, swizzle_sf, unpack_fp4, unpack_ue8m0, unswizzle_sf

__all__ = [
    "fp8_static_inverse_scale", "quant_fp8", "dequant_fp8",
    "nvfp4_block_scale", "quant_nvfp4", "dequant_nvfp4",
    "GROUP_FP8_MIN_SCALE", "quant_fp8_per_token_group", "dequant_fp8_per_token_group",
    "quant_fp8_per_token_group_fp32", "dequant_fp8_per_token_group_fp32",
    "DYNAMIC_FP8_MIN_SCALE", "quant_fp8_dynamic_per_token", "dequant_fp8_dynamic_per_token",
]

# --------------------------------------------------------------------------------------
# static FP8 and NVFP4
# --------------------------------------------------------------------------------------

def fp8_static_inverse_scale(scale_factor: Any) -> np.float32:
    """``fp32(1 / fp32(scale_factor))``: the reciprocal a static FP8 quantizer multiplies
    by, correctly rounded, taken once per call. ``scale_factor`` must be finite and > 0,
    with a finite fp32 reciprocal; otherwise ValueError."""
    s = _scalar_f32(scale_factor, "scale_factor")
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"scale_factor must be finite and > 0, got {scale_factor}")
    with np.errstate(over="ignore"):
        inv = np.float32(1.0) / s
    if not np.isfinite(inv):
        raise ValueError(f"scale_factor={scale_factor}: 1/scale_factor overflows fp32")
    return inv


def quant_fp8(x: Any, scale_factor: Any) -> np.ndarray:
    """Static per-tensor FP8 -> uint8 e4m3 codes of x's shape.

    ``scale_factor`` is the DEQUANTIZATION scale ``s`` that serving engines keep per
    tensor (``x ~ decode(q) * s``; vLLM, TensorRT-LLM and FlashInfer divide by it), a
    number or a one-element array (a device scalar copied to host). In fp32:

    * ``inv = fp32(1 / s)``, correctly rounded, once (:func:`fp8_static_inverse_scale`);
    * each element ``q = e4m3_rne_satfinite(fp32(x) * inv)``: one fp32 product, then RNE
      to e4m3, ``|.| > 448`` saturating to +-448.

    Multiplying by the rounded reciprocal is not the same as dividing by ``s``: where
    ``x / s`` lies next to an e4m3 rounding boundary the two can pick neighbouring codes.
    """
    return fp8_e4m3_encode(to_float32(x) * fp8_static_inverse_scale(scale_factor))


def dequant_fp8(q: Any, scale_factor: Any) -> np.ndarray:
    """Inverse of :func:`quant_fp8` up to rounding: ``decode(q) * fp32(scale_factor)``
    (one fp32 product) -> fp32."""
    return fp8_e4m3_decode(q) * _scalar_f32(scale_factor, "scale_factor")


_SF_LAYOUTS = {QuantizationSFLayout.SWIZZLED_128x4: "swizzled",
               QuantizationSFLayout.LINEAR: "linear"}


def _sf_layout(layout: Any) -> str:
    """"swizzled" or "linear", from that string or a ``QuantizationSFLayout`` member (of
    ``moecomm.constants`` or, by name, of another enum)."""
    if layout in ("swizzled", "linear"):
        return layout
    name = getattr(layout, "name", None)
    if name in QuantizationSFLayout.__members__:
        return _SF_LAYOUTS[QuantizationSFLayout[name]]
    raise ValueError(f"layout must be 'swizzled', 'linear' or a QuantizationSFLayout, "
                     f"got {layout!r}")


_ONE_SIXTH = np.float32(1.0 / 6.0)  # fp32(1/6), 0x3E2AAAAB: amax is multiplied by it


def nvfp4_block_scale(amax: Any, global_scale: Any) -> tuple[np.ndarray, np.ndarray]:
    """Block scales of NVFP4 from the blocks' ``amax`` (fp32 array), in this order:

    ``sf = e4m3_rne_satfinite(global_scale * (amax * fp32(1/6)))`` (two fp32 products);
    ``out_scale = global_scale / float(sf)`` (IEEE fp32 division by the DECODED scale;
    0 where ``sf`` decodes to 0). Returns ``(sf codes uint8, out_scale fp32)``, amax's shape.
    """
    gs = _scalar_f32(global_scale, "global_scale")
    amax = np.asarray(amax, dtype=np.float32)
    sf_code = fp8_e4m3_encode(gs * (amax * _ONE_SIXTH))
    sf_val = fp8_e4m3_decode(sf_code)
    zero = sf_val == 0
    out_scale = np.where(zero, np.float32(0.0), gs / np.where(zero, np.float32(1.0), sf_val))
    return sf_code, out_scale.astype(np.float32)


def quant_nvfp4(x: Any, global_scale: Any, layout: Any = "swizzled"):
    """NVFP4 quantization of x [M, N] (N % 16 == 0).

    Per 16-element block along a row, fp32 throughout, each operation rounded, in the
    operation order of TensorRT-LLM's and FlashInfer's quantizer
    (:func:`nvfp4_block_scale`):

    * ``amax = max |v|``; ``sf = e4m3_rne_satfinite(global_scale * (amax * fp32(1/6)))``
      (``amax`` times the fp32 constant 1/6, then times ``global_scale``; > 448
      saturates to 448);
    * ``out_scale = global_scale / float(sf)``: IEEE fp32 division by the DECODED e4m3
      value; ``out_scale = 0`` when ``sf`` decodes to 0 (all-zero block, or
      ``global_scale * amax / 6 <= 2**-10``), so such a block's codes are +-0 (the sign
      of ``v`` kept, as the hardware conversion keeps it);
    * each element ``code = e2m1_rne_satfinite(v * out_scale)`` (one fp32 product).

    Those libraries form ``out_scale`` as ``rcp(float(sf) * rcp(global_scale))`` with the
    approximate reciprocal instruction; the correctly rounded quotient used here is the
    reproducible value of the same expression.

    Returns ``(packed, sf)``: ``packed`` uint8 [M, N//2] with the even element in the low
    nibble; ``sf`` uint8 e4m3 codes, either ``layout="swizzled"`` (or
    ``QuantizationSFLayout.SWIZZLED_128x4``): flat
    [compute_fp4_swizzled_layout_sf_size(M, N//16)] in the 128x4 layout
    (:func:`swizzled_sf_offset`), padding bytes 0; or ``layout="linear"``
    (``QuantizationSFLayout.LINEAR``): [M, N//16] row-major. ``global_scale`` must be
    finite and > 0 (usually 448 * 6 / amax(tensor)).
    """
    x32 = _as_2d_f32(x, "x")
    m, n = x32.shape
    if n % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs N % 16 == 0, got N={n}")
    layout = _sf_layout(layout)
    gs = _scalar_f32(global_scale, "global_scale")
    if not (np.isfinite(gs) and gs > 0):
        raise ValueError(f"global_scale must be finite and > 0, got {global_scale}")
    blocks = x32.reshape(m, n // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = np.max(np.abs(blocks), axis=-1) if n else np.zeros((m, 0), np.float32)
    sf_code, out_scale = nvfp4_block_scale(amax, gs)
    packed = pack_fp4(fp4_e2m1_encode(blocks * out_scale[..., None]).reshape(m, n))
    sf = swizzle_sf(sf_code, n) if layout == "swizzled" else sf_code
    return packed, sf


def dequant_nvfp4(packed: Any, sf: Any, global_scale: float, num_rows: int, num_cols: int,
                  layout: Any = "swizzled") -> np.ndarray:
    """Dequantize NVFP4: ``e2m1(code) * float(sf) / global_scale`` -> fp32 [M, N]."""
    codes = unpack_fp4(packed).reshape(num_rows, num_cols)
    swizzled = _sf_layout(layout) == "swizzled"
    sf2 = unswizzle_sf(sf, num_rows, num_cols) if swizzled else np.asarray(sf, np.uint8)
    sfv = np.repeat(fp8_e4m3_decode(sf2), NVFP4_BLOCK, axis=1)
    return (fp4_e2m1_decode(codes) * sfv) / _scalar_f32(global_scale, "global_scale")


# --------------------------------------------------------------------------------------
# per-token-group FP8 with UE8M0 scales
# --------------------------------------------------------------------------------------
# GROUP_FP8_MIN_SCALE (moecomm.constants): lower clamp of amax/448 before the power-of-two
# ceiling (as DeepGEMM/FlashInfer): an all-zero group gets scale 2**-33 (UE8M0 byte 94).

def _group_amax(x: Any, group_size: Any, name: str):
    """``(M, N, blocks [M, N/g, g] fp32, amax [M, N/g])`` of the groups of ``g`` consecutive
    elements of each row of ``x`` [M, N] (ValueError unless ``g > 0`` divides N)."""
    x32 = _as_2d_f32(x, "x")
    m, n = x32.shape
    g = int(group_size)
    if g <= 0 or n % g:
        raise ValueError(f"{name}={group_size} must be > 0 and divide N={n}")
    blocks = x32.reshape(m, n // g, g)
    amax = np.max(np.abs(blocks), axis=-1) if n else np.zeros((m, 0), np.float32)
    return m, n, blocks, amax


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
    m, n, blocks, amax = _group_amax(x, group_size, "block_quant_group_size")
    v = np.maximum(amax / np.float32(FP8_E4M3_MAX), np.float32(GROUP_FP8_MIN_SCALE))
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


def quant_fp8_per_token_group_fp32(x: Any, group_size: int):
    """Per-token-group FP8 with fp32 scales, x [M, N], N % g == 0: the "fp32" format of
    the MoE FP8 dispatch (DeepEP's), and of ``moecomm.quant.quantize`` with
    ``ScaleFormat.FP32``. For each group of ``g`` consecutive elements of a row (fp32):

    * ``amax = max |v|``; ``s = max(fp32(amax / 448), 1e-10f)`` (correctly rounded
      division; an all-zero group gets 1e-10);
    * ``q = e4m3_rne_satfinite(v * fp32(1 / s))``: the reciprocal correctly rounded once
      per group, then one fp32 product per element (not a division: the two can differ in
      the last fp32 bit before the e4m3 rounding).

    Returns ``(q uint8 [M, N], scale fp32 [M, N // g])``; dequantize as
    ``decode(q) * scale``.
    """
    m, n, blocks, amax = _group_amax(x, group_size, "group_size")
    s = np.maximum(amax / np.float32(FP8_E4M3_MAX),
                   np.float32(GROUP_FP8_MIN_SCALE)).astype(np.float32)
    inv = (np.float32(1.0) / s).astype(np.float32)
    q = fp8_e4m3_encode(blocks * inv[..., None]).reshape(m, n)
    return q, s


def dequant_fp8_per_token_group_fp32(q: Any, scale: Any, group_size: int) -> np.ndarray:
    """``decode(q) * scale`` per group -> fp32 [M, N]."""
    scale = np.asarray(scale, np.float32)
    return fp8_e4m3_decode(q) * np.repeat(scale, group_size, axis=1)


# --------------------------------------------------------------------------------------
# dynamic per-token FP8
# --------------------------------------------------------------------------------------
# DYNAMIC_FP8_MIN_SCALE (moecomm.constants): lower clamp of the dynamic per-token scale,
# 2**-9 / 448 (e4m3 smallest subnormal over its max), as vLLM and FlashInfer use; an
# all-zero row gets this scale and q = 0.

def _dynamic_fp8_rows(x32: np.ndarray, amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dynamic per-token FP8 formula, and its only home: rows ``x32`` [M, N] fp32 with
    their ``amax`` [M] fp32 -> ``(q uint8 [M, N], scale fp32 [M])``::

        scale = max(fp32(amax / 448), fp32(2**-9 / 448))    # correctly rounded division
        q     = e4m3_rne_satfinite(fp32(v / scale))          # division, not a reciprocal

    Which scale is right: this one, the correctly rounded value of the formula every
    engine states. FlashInfer 0.7.2 compiles its fused kernels with fast math, so its
    ``amax / 448`` is ``div.approx`` (a reciprocal approximation, up to 2 ulp off): about
    half of its per-token scales differ from this value by an ulp (measured on 2 x H200:
    0.49-0.75 of the tokens at 8-2048 tokens), while the codes agree, since the
    difference is far below an e4m3 step. An approximation cannot be reproduced exactly
    here (it is the hardware's reciprocal unit), so moecomm keeps the exact value.
    """
    scale = np.maximum(amax / np.float32(FP8_E4M3_MAX),
                       np.float32(DYNAMIC_FP8_MIN_SCALE)).astype(np.float32)
    return fp8_e4m3_encode(x32 / scale[:, None]), scale


def quant_fp8_dynamic_per_token(x: Any):
    """Dynamic per-token FP8 of x [M, N]: per row ``scale = max(fp32(amax / 448),
    2**-9/448)``; ``q = e4m3_sat(v / scale)`` (correctly rounded fp32 division, NOT a
    multiplication by a reciprocal). Returns ``(q uint8 [M, N], scale fp32 [M])`` (device:
    [M] or [M, 1]). The formula lives in one place, ``_dynamic_fp8_rows``."""
    x32 = _as_2d_f32(x, "x")
    amax = np.max(np.abs(x32), axis=-1) if x32.shape[1] else np.zeros(x32.shape[0], np.float32)
    return _dynamic_fp8_rows(x32, amax)


def dequant_fp8_dynamic_per_token(q: Any, scale: Any) -> np.ndarray:
    """``decode(q) * scale[:, None]`` -> fp32."""
    return fp8_e4m3_decode(q) * np.asarray(scale, np.float32).reshape(-1, 1)
