"""How quantized data lies in memory: NVFP4 nibble packing and the 128x4 swizzled scale
layout, UE8M0 packing and its MN-major TMA-aligned storage.

The sizes and offset formulas are the runtime's (``moecomm.layouts``); this module applies
them to whole NumPy index arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import layouts as _layouts
from ..constants import NVFP4_BLOCK
from ..layouts import compute_fp4_swizzled_layout_sf_size, ue8m0_mn_major_storage_size
from .formats import _contig

__all__ = [
    "NVFP4_BLOCK", "compute_fp4_swizzled_layout_sf_size", "swizzled_sf_offset",
    "swizzle_sf", "unswizzle_sf", "nvfp4_block_scale_interleave", "pack_fp4", "unpack_fp4",
    "pack_ue8m0", "unpack_ue8m0", "ue8m0_mn_major_storage_size", "ue8m0_to_mn_major_storage",
    "ue8m0_from_mn_major_storage",
]

# --------------------------------------------------------------------------------------
# NVFP4: e2m1 nibbles and the 128x4 swizzled scale layout
# --------------------------------------------------------------------------------------


def swizzled_sf_offset(m: Any, k: Any, num_cols: int) -> np.ndarray:
    """Byte offset of scale factor (row m, scale column k) in the 128x4 swizzled layout,
    vectorised over ``m`` and ``k`` (broadcast); int64.

    ``num_cols`` is the number of DATA columns per row (hidden size N); the formula is
    :func:`moecomm.layouts.swizzled_sf_offset`::

        (m // 128) * (Kt * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4

    with ``Kt = ceil(N / 64)``.
    """
    m = np.asarray(m, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    return np.asarray(_layouts.swizzled_sf_offset(m, k, int(num_cols)), dtype=np.int64)


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


def nvfp4_block_scale_interleave(sf_linear: Any) -> np.ndarray:
    """Linear NVFP4 scale factors [M, C] (uint8 e4m3 codes, C = K // 16) -> the flat
    128x4 swizzled array of ``compute_fp4_swizzled_layout_sf_size(M, C)`` bytes, padding
    0: ``swizzle_sf(sf_linear, 16 * C)`` (vLLM's ``nvfp4_block_scale_interleave``)."""
    sf = np.asarray(sf_linear)
    if sf.ndim != 2:
        raise ValueError(f"sf_linear must be 2-D [M, K // 16], got shape {sf.shape}")
    if sf.dtype.itemsize != 1:
        raise ValueError(f"sf_linear must hold one byte per scale, got dtype {sf.dtype}")
    return swizzle_sf(sf.view(np.uint8), sf.shape[1] * NVFP4_BLOCK)


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
# UE8M0: four exponents per int32, MN-major TMA-aligned storage
# --------------------------------------------------------------------------------------

def pack_ue8m0(exps: Any) -> np.ndarray:
    """UE8M0 bytes [M, G] -> int32 [M, ceil(G/4)]: group 4j+i in byte i (little-endian,
    group 4j in the low byte); missing groups of the last word are 0 bytes."""
    e = np.asarray(exps, dtype=np.uint8)
    m, g = e.shape
    k4 = _layouts.ue8m0_words_per_row(g)
    buf = np.zeros((m, k4 * 4), dtype=np.uint8)
    buf[:, :g] = e
    return buf.view("<u4").astype(np.uint32).view(np.int32).reshape(m, k4)


def unpack_ue8m0(packed: Any, num_groups: int) -> np.ndarray:
    """Inverse of :func:`pack_ue8m0`: int32 [M, K4] -> UE8M0 bytes [M, num_groups]."""
    p = _contig(packed, np.int32)
    m = p.shape[0]
    b = p.astype("<i4").view(np.uint8).reshape(m, 4 * p.shape[1])  # m may be 0
    return b[:, :num_groups].copy()


def ue8m0_to_mn_major_storage(packed: Any) -> np.ndarray:
    """Logical packed scales int32 [M, K4] -> flat int32 storage in the MN-major,
    TMA-aligned layout: element (t, j) at ``j * align4(M) + t`` (i.e. a strided
    [M, K4] view with strides (1, align4(M)) elements). Gap elements are 0."""
    p = np.asarray(packed, dtype=np.int32)
    m, k4 = p.shape
    out = np.zeros(ue8m0_mn_major_storage_size(m, 4 * k4), dtype=np.int32)
    t, j = np.meshgrid(np.arange(m), np.arange(k4), indexing="ij")
    out[_layouts.ue8m0_mn_major_offset(t, j, m)] = p
    return out


def ue8m0_from_mn_major_storage(storage: Any, num_rows: int, num_groups: int) -> np.ndarray:
    """Inverse of :func:`ue8m0_to_mn_major_storage` -> int32 [M, ceil(G/4)]."""
    s = np.asarray(storage, dtype=np.int32).reshape(-1)
    k4 = _layouts.ue8m0_words_per_row(num_groups)
    t, j = np.meshgrid(np.arange(num_rows), np.arange(k4), indexing="ij")
    return s[_layouts.ue8m0_mn_major_offset(t, j, num_rows)]
