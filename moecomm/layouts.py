"""Sizes and offsets of the scale-factor layouts the fused quantizers write.

Pure Python integer arithmetic: no NumPy, no CuPy, so the runtime can validate output
sizes with it and the NumPy reference (``moecomm.reference``) applies the same formulas to
index arrays. The offset functions use only ``//``, ``%``, ``*`` and ``+``, so they work
element-wise on Python ints and on NumPy integer arrays alike; the size functions take
ints only.

NVFP4 128x4 swizzled layout (FlashInfer's ``QuantizationSFLayout.SWIZZLED_128x4``): one
e4m3 byte per 16-element block; rows padded to 128, scale columns to 4; a band of 128 rows
is ``Kt = ceil(num_cols / 64)`` tiles of 512 bytes (32 rows x 4 row groups x 4 columns).

UE8M0 MN-major storage (DeepGEMM's TMA-aligned layout, used by the per-token-group FP8
patterns): four UE8M0 exponents per int32 word, ``K4 = ceil(num_groups / 4)`` words per
row; word ``(row, j)`` lives at ``j * align4(num_rows) + row``.
"""

from __future__ import annotations

import operator

__all__ = [
    "pad_up", "compute_fp4_swizzled_layout_sf_size", "swizzled_sf_offset",
    "ue8m0_words_per_row", "ue8m0_mn_major_storage_size", "ue8m0_mn_major_offset",
]

SWIZZLE_ROWS = 128       # rows of one swizzled band
SWIZZLE_COLS = 4         # scale columns of one 512-byte tile
SWIZZLE_TILE_BYTES = 512
UE8M0_PER_WORD = 4       # UE8M0 exponents packed into one int32
UE8M0_ROW_ALIGN = 4      # MN-major storage: each word column starts on a multiple of 4 rows


def _count(value, name: str) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def pad_up(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y`` (``y >= 1``)."""
    return (x + y - 1) // y * y


def compute_fp4_swizzled_layout_sf_size(total_row: int, total_column: int,
                                        row_size: int = SWIZZLE_ROWS) -> int:
    """Bytes of a swizzled NVFP4 scale-factor array: rows padded to ``row_size`` (128 for
    the 128x4 layout) times scale columns padded to 4.

    ``total_column`` is the number of SCALE columns (hidden // 16), as in FlashInfer's
    ``compute_fp4_swizzled_layout_sf_size(token_num, hidden // SF_VEC_SIZE)``.
    """
    rows = _count(total_row, "total_row")
    cols = _count(total_column, "total_column")
    size = _count(row_size, "row_size")
    if size < 1:
        raise ValueError("row_size must be >= 1")
    return pad_up(rows, size) * pad_up(cols, SWIZZLE_COLS)


def swizzled_sf_offset(m, k, num_cols: int):
    """Byte offset of scale factor (row ``m``, scale column ``k``) in the 128x4 layout.

    ``num_cols`` is the number of DATA columns per row (hidden size N, FlashInfer's
    ``numCols``); ``Kt = ceil(N / 64)``::

        (m // 128) * (Kt * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4

    ``m`` and ``k`` may be ints or integer arrays (element-wise, broadcasting).
    """
    kt = (num_cols + 63) // 64
    return ((m // SWIZZLE_ROWS) * (kt * SWIZZLE_TILE_BYTES)
            + (k // SWIZZLE_COLS) * SWIZZLE_TILE_BYTES
            + (m % 32) * 16 + ((m % SWIZZLE_ROWS) // 32) * 4 + k % SWIZZLE_COLS)


def ue8m0_words_per_row(num_groups: int) -> int:
    """int32 words holding ``num_groups`` UE8M0 exponents: ``ceil(num_groups / 4)``."""
    return (_count(num_groups, "num_groups") + UE8M0_PER_WORD - 1) // UE8M0_PER_WORD


def ue8m0_mn_major_storage_size(num_rows: int, num_groups: int) -> int:
    """int32 elements of the TMA-aligned MN-major storage of packed UE8M0 scales
    (DeepGEMM / FlashInfer ``kARResidualRMSNorm*PerTokenGroupFP8PackedQuant``):
    ``M + (K4 - 1) * align4(M)`` with ``K4 = ceil(G / 4)`` (0 when ``K4 == 0``)."""
    rows = _count(num_rows, "num_rows")
    k4 = ue8m0_words_per_row(num_groups)
    return rows + (k4 - 1) * pad_up(rows, UE8M0_ROW_ALIGN) if k4 else 0


def ue8m0_mn_major_offset(row, word, num_rows: int):
    """int32 index of packed word ``(row, word)`` in the MN-major storage:
    ``word * align4(num_rows) + row``. ``row``/``word`` may be ints or integer arrays."""
    return word * pad_up(num_rows, UE8M0_ROW_ALIGN) + row
