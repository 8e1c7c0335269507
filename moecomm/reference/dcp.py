"""Decode context-parallel attention: the all-to-all of partial outputs and softmax stats,
and the LSE combine that merges them. Every function takes all ranks' inputs at once.

With the KV cache split over a CP group of ``cp`` ranks, each rank computes, for every
row (batch x heads), one partial output per destination rank: ``partial_o[..., p, :]``
(``[..., cp, D]``, fp16 or bf16 bits) with its softmax stats ``softmax_stats[..., p, :]``
(``[..., cp, S]`` fp32, ``S >= 2`` and even). The all-to-all gives rank ``r``
``o_out[..., s, :] = partial_o_of_rank_s[..., r, :]`` (and likewise the stats): every
rank's partial for the rows this rank finishes. The exchange is bitwise, except that an
input -0.0 arrives as +0.0 (the Lamport sentinel rule of the GPU kernel).

The combine (``StatsFormat`` says what the stats hold), per row, in fp32:
``lse_p`` = ``stats[p, 0]`` (LSE, LSE_BASE2) or ``stats[p, 0] + log(stats[p, 1])``
(MAX_SUMEXP); partials whose ``lse_p`` is not finite are left out;
``m = max lse_p``; ``w_p = exp(lse_p - m)`` (``exp2`` for LSE_BASE2);
``out = io(sum_p (w_p * o_p) / sum_p w_p)`` with partials in order 0, 1, ...;
``lse = m + log(sum_p w_p)`` (``log2`` for LSE_BASE2). No partial left: ``out = 0``,
``lse = -inf``. The GPU's ``exp``/``log`` differ from NumPy's in the last bits, so GPU tests
compare the combine with a tolerance of about one ulp of the output dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..constants import StatsFormat
from .formats import _check_same, cast_from_float32, io_dtype_name, to_float32

__all__ = ["dcp_alltoall", "lse_combine"]


def _canonical_zero(a: np.ndarray) -> np.ndarray:
    """``a`` (fp32 or 16-bit bits) with every -0.0 replaced by +0.0, bits unchanged else."""
    bits = a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])
    sign = bits.dtype.type(1 << (8 * a.dtype.itemsize - 1))
    return np.where(bits == sign, bits.dtype.type(0), bits).view(a.dtype)


def dcp_alltoall(partial_o: Sequence[Any], softmax_stats: Sequence[Any]
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every rank's ``(o_out, stats_out)`` from every rank's ``partial_o [..., cp, D]``
    (fp16, or bf16 as uint16 bits) and ``softmax_stats [..., cp, S]`` (fp32); ``cp`` =
    the number of ranks given. ``o_out[r][..., s, :] = partial_o[s][..., r, :]``, -0.0 as
    +0.0; likewise the stats."""
    cp = len(partial_o)
    _check_same(partial_o, "partial_o")
    _check_same(softmax_stats, "softmax_stats")
    if len(softmax_stats) != cp:
        raise ValueError(f"{len(softmax_stats)} ranks of softmax_stats, {cp} of partial_o")
    o = [np.ascontiguousarray(x) for x in partial_o]
    st = [np.ascontiguousarray(x, dtype=np.float32) for x in softmax_stats]
    if o[0].ndim < 2 or o[0].shape[-2] != cp:
        raise ValueError(f"partial_o: shape {o[0].shape} is not [..., cp={cp}, D]")
    if st[0].shape[:-1] != o[0].shape[:-1]:
        raise ValueError(f"softmax_stats: shape {st[0].shape} is not [{o[0].shape[:-1]}, S]")
    o_out = [np.stack([_canonical_zero(o[s][..., r, :]) for s in range(cp)], axis=-2)
             for r in range(cp)]
    st_out = [np.stack([_canonical_zero(st[s][..., r, :]) for s in range(cp)], axis=-2)
              for r in range(cp)]
    return o_out, st_out


def lse_combine(partial_o: Any, softmax_stats: Any, stats_format: Any = StatsFormat.LSE,
                dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(out [..., D], lse [...])`` merging ``partial_o [..., cp, D]`` (fp16 / bf16 bits /
    fp32) by ``softmax_stats [..., cp, S]`` (fp32) as the module doc states. ``out`` is in
    ``dtype`` (default: partial_o's), ``lse`` fp32 in the format's base (e for
    MAX_SUMEXP)."""
    fmt = StatsFormat(stats_format)
    dtype = np.asarray(partial_o).dtype if dtype is None else dtype
    io_dtype_name(dtype)
    o = to_float32(partial_o)
    st = np.asarray(softmax_stats, dtype=np.float32)
    if o.ndim < 2 or st.shape[:-1] != o.shape[:-1]:
        raise ValueError(f"softmax_stats {st.shape} and partial_o {o.shape} are not "
                         "[..., cp, S] and [..., cp, D]")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if fmt == StatsFormat.MAX_SUMEXP:
            if st.shape[-1] < 2:
                raise ValueError("MAX_SUMEXP needs S >= 2")
            lse = st[..., 0] + np.log(st[..., 1])
        else:
            lse = st[..., 0].copy()
        finite = np.isfinite(lse)
        m = np.max(np.where(finite, lse, np.float32(-np.inf)), axis=-1)      # [...]
        exp = np.exp2 if fmt == StatsFormat.LSE_BASE2 else np.exp
        log = np.log2 if fmt == StatsFormat.LSE_BASE2 else np.log
        any_ = np.isfinite(m)
        shift = np.where(finite, lse - np.where(any_, m, 0)[..., None], np.float32(0))
        w = np.where(finite, exp(shift.astype(np.float32)), np.float32(0)).astype(np.float32)
        cp = o.shape[-2]
        acc = np.zeros(o.shape[:-2] + o.shape[-1:], np.float32)
        wsum = np.zeros(o.shape[:-2], np.float32)
        for p in range(cp):  # partials in order, each product rounded to fp32
            wp = w[..., p]
            term = (wp[..., None] * o[..., p, :]).astype(np.float32)
            acc = np.where(finite[..., p, None], (acc + term).astype(np.float32), acc)
            wsum = (wsum + wp).astype(np.float32)
        out = np.where(any_[..., None], acc / np.where(any_, wsum, 1)[..., None], 0)
        lse_out = np.where(any_, m + log(np.where(any_, wsum, 1)), np.float32(-np.inf))
    return cast_from_float32(out.astype(np.float32), dtype), lse_out.astype(np.float32)
