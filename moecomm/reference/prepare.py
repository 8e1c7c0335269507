"""MoE prepare/finalize for data-parallel serving (reference document 002) and the
variable-size collectives under it. Every function takes all ranks' inputs at once.

* ``all_gatherv`` / ``reduce_scatterv``: the collectives (rank-order fp32 sum, one
  rounding).
* ``a2a_plan``: which local tokens go to which rank (each token once to every distinct rank
  owning one of its valid experts, ``rank = expert // (num_experts // ep_size)``), the
  received counts; ``a2a_prepare``: the received rows of the all-to-all-v path, flat
  ``[ep_size * runtime_max, ...]`` (block s = rows from rank s, compacted, in source order),
  received expert ids sanitized (not owned, padding -> -1) and renumbered through an
  ``expert_map``; ``a2a_finalize``: the rows sent back and summed per token.
* ``apply_router_weight_on_input``, and ``scaled_experts`` / ``moe_layer``: a MoE layer
  whose expert e multiplies its input by ``expert_scale[e]``, computed in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .formats import cast_from_float32, to_float32
from .moe import A2ARouting, moe_a2a_combine, moe_a2a_dispatch, moe_a2a_target_ranks

__all__ = ["all_gatherv", "reduce_scatterv", "A2APlan", "a2a_plan", "a2a_prepare",
           "a2a_finalize", "apply_router_weight_on_input", "scaled_experts", "moe_layer"]


def _sizes(sizes: Sequence[int], n: int) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != n or min(sizes, default=0) < 0:
        raise ValueError(f"sizes: need {n} non-negative row counts, got {sizes}")
    return sizes


def all_gatherv(xs: Sequence[Sequence[Any]], sizes: Sequence[int]) -> list[np.ndarray]:
    """xs[r]: rank r's list of arrays, each ``[sizes[r], ...]``. Returns, per array, the
    rows of every rank stacked in rank order (what every rank receives)."""
    n = len(xs)
    sizes = _sizes(sizes, n)
    out = []
    for i in range(len(xs[0])):
        parts = [np.asarray(xs[r][i]) for r in range(n)]
        for r, p in enumerate(parts):
            if p.shape[0] != sizes[r] or p.shape[1:] != parts[0].shape[1:] or p.dtype != parts[0].dtype:
                raise ValueError(f"xs[{r}][{i}]: shape {p.shape}/{p.dtype} does not match "
                                 f"[{sizes[r]}, {parts[0].shape[1:]}]/{parts[0].dtype}")
        out.append(np.concatenate(parts, axis=0))
    return out


def reduce_scatterv(xs: Sequence[Any], sizes: Sequence[int], dtype: Any = None) -> list[np.ndarray]:
    """xs[r]: rank r's ``[sum(sizes), ...]`` (bf16 bits / fp16 / fp32). Returns, per rank r,
    its rows ``[off_r, off_r + sizes[r])`` summed over ranks 0, 1, ... in fp32 starting
    from +0 (so -0 inputs give +0, as MoeAlltoAll's combine), rounded once to ``dtype``
    (default the input's)."""
    n = len(xs)
    sizes = _sizes(sizes, n)
    x0 = np.asarray(xs[0])
    dtype = x0.dtype if dtype is None else dtype
    f32 = [to_float32(np.asarray(x)) for x in xs]
    for r, x in enumerate(f32):
        if x.shape != x0.shape or x.shape[0] != sum(sizes):
            raise ValueError(f"xs[{r}]: shape {x.shape}, expected [{sum(sizes)}, ...] like xs[0]")
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out = []
    for r in range(n):
        acc = np.zeros_like(f32[0][offs[r]:offs[r + 1]])
        for s in range(n):
            acc = acc + f32[s][offs[r]:offs[r + 1]]
        out.append(cast_from_float32(acc, dtype))
    return out


@dataclass
class A2APlan:
    """The exchange plan of the all-to-all-v path.

    send[s]: bool ``[T_s, ep_size]``, token t of rank s goes to rank r;
    send_slot[s]: int32 ``[T_s, ep_size]``, its row in block s of rank r's receive tensors
    (-1 when not sent); recv_counts[r]: int32 ``[ep_size]``, rows rank r receives from each
    rank; runtime_max: rows per block (the largest token count).
    """

    ep_size: int
    num_experts: int
    runtime_max: int
    num_tokens: list
    send: list
    send_slot: list
    recv_counts: list


def a2a_plan(topk_ids: Sequence[Any], num_experts: int, runtime_max: int | None = None) -> A2APlan:
    """The plan from every rank's ``topk_ids`` ``[T_s, top_k]``; ids < 0 or >=
    ``num_experts`` route nowhere, a token goes once to each distinct owning rank."""
    n = len(topk_ids)
    masks = [moe_a2a_target_ranks(np.asarray(ids).reshape(-1, np.asarray(ids).shape[-1]),
                                  num_experts, n) for ids in topk_ids]
    T = [m.shape[0] for m in masks]
    rmax = max(1, max(T)) if runtime_max is None else int(runtime_max)
    if max(T) > rmax:
        raise ValueError(f"runtime_max={rmax} is below the largest token count {max(T)}")
    slots = [np.where(m, np.cumsum(m, axis=0) - 1, -1).astype(np.int32) for m in masks]
    counts = [np.array([masks[s][:, r].sum() for s in range(n)], np.int32) for r in range(n)]
    return A2APlan(n, int(num_experts), rmax, T, masks, slots, counts)


def a2a_prepare(topk_ids: Sequence[Any], topk_weights: Sequence[Any], payloads: Sequence[Sequence[Any]],
                num_experts: int, expert_maps: Sequence[Any] | None = None,
                runtime_max: int | None = None):
    """The all-to-all-v dispatch: every rank's tokens (``payloads[s]``: list of
    ``[T_s, ...]`` arrays, e.g. NVFP4 codes and linear scale factors), their ids and
    weights, to the ranks owning their experts.

    Returns ``(plan, received)`` with ``received[r] = (payload rows..., ids, weights)``,
    each flat ``[ep_size * runtime_max, ...]``: row ``s * runtime_max + i`` is the i-th token
    rank s sent to r; rows past ``recv_counts[r][s]`` of a block are padding (zeros here;
    unspecified on the device, except ids). Received ids: an id rank r does not own, and
    every id of a padding row, is -1; with ``expert_maps[r]`` (int ``[num_experts]``) an owned
    id e becomes ``expert_maps[r][e]``.
    """
    n = len(topk_ids)
    plan = a2a_plan(topk_ids, num_experts, runtime_max)
    lists = [[*map(np.asarray, payloads[s]), np.asarray(topk_ids[s], np.int32),
              np.asarray(topk_weights[s], np.float32)] for s in range(n)]
    id_index = len(lists[0]) - 2
    recv, counts, _ = moe_a2a_dispatch([np.asarray(i) for i in topk_ids], lists, num_experts, n,
                                       plan.runtime_max, -1, id_index)
    out = []
    for r in range(n):
        flat = [a.reshape(n * plan.runtime_max, *a.shape[2:]) for a in recv[r]]
        if expert_maps is not None and expert_maps[r] is not None:
            emap = np.asarray(expert_maps[r], np.int32)
            ids = flat[id_index]
            ok = (ids >= 0) & (ids < num_experts)
            flat[id_index] = np.where(ok, emap[np.clip(ids, 0, num_experts - 1)], ids).astype(np.int32)
        out.append(tuple(flat))
    return plan, out


def a2a_finalize(expert_rows: Sequence[Any], plan: A2APlan, dtype: Any = None) -> list[np.ndarray]:
    """The all-to-all-v combine: ``expert_rows[r]`` ``[ep_size * runtime_max, H]`` (rank r's
    output for each received row). Per rank s, ``[T_s, H]``: for each token the fp32 sum
    over its distinct target ranks in ascending order of the row that rank produced,
    rounded once (+0 for a token routed nowhere)."""
    n = plan.ep_size
    payloads = [np.asarray(y).reshape(n, plan.runtime_max, *np.asarray(y).shape[1:])
                for y in expert_rows]
    routing = A2ARouting(n, plan.num_experts, plan.runtime_max, plan.num_tokens,
                         plan.send_slot, plan.recv_counts)
    return moe_a2a_combine(payloads, routing, dtype)


def apply_router_weight_on_input(a1: Any, topk_weights: Any, dtype: Any = None) -> np.ndarray:
    """``a1 [T, H] * T(w)`` with top-1 weights ``[T, 1]``: the weight rounded to a1's dtype,
    the product in fp32, rounded once."""
    w = np.asarray(topk_weights, np.float32)
    if w.ndim != 2 or w.shape[1] != 1:
        raise ValueError(f"apply_router_weight_on_input needs top_k == 1, got weights {w.shape}")
    a1 = np.asarray(a1)
    dtype = a1.dtype if dtype is None else dtype
    w_t = to_float32(cast_from_float32(w, dtype))
    return cast_from_float32(to_float32(a1) * w_t, dtype)


def scaled_experts(x32: Any, topk_ids: Any, topk_weights: Any, expert_scale: Any,
                   owned: Any) -> np.ndarray:
    """One rank's expert output of the test MoE layer, fp32 ``[T, H]``: for k = 0, 1, ...,
    ``acc += (w[:, k] * expert_scale[e_k]) * x`` over the slots whose expert ``e_k`` is owned
    (``owned``: bool ``[num_experts]``, indexed by the ids as given; ids out of range and -1
    count as not owned)."""
    x32 = np.asarray(x32, np.float32)
    ids = np.asarray(topk_ids).astype(np.int64)
    w = np.asarray(topk_weights, np.float32)
    scale = np.asarray(expert_scale, np.float32)
    owned = np.asarray(owned, bool)
    acc = np.zeros(x32.shape, np.float32)
    for k in range(ids.shape[1]):
        e = ids[:, k]
        ok = (e >= 0) & (e < owned.size)
        ok[ok] = owned[e[ok]]
        c = np.where(ok, w[:, k] * scale[np.clip(e, 0, scale.size - 1)], np.float32(0))
        acc = acc + c.astype(np.float32)[:, None] * x32
    return acc


def moe_layer(xs: Sequence[Any], topk_ids: Sequence[Any], topk_weights: Sequence[Any],
              expert_scale: Any, dtype: Any = np.float32) -> list[np.ndarray]:
    """The test MoE layer on every rank's tokens in one process: per rank s ``[T_s, H]`` =
    the fp32 sum over ranks r = 0, 1, ... of ``scaled_experts`` with r's experts
    (``num_experts // ep_size`` consecutive ids), rounded once to ``dtype``."""
    n = len(xs)
    E = np.asarray(expert_scale).size
    epr = E // n
    out = []
    for s in range(n):
        x32 = to_float32(np.asarray(xs[s]))
        acc = None
        for r in range(n):
            owned = np.zeros(E, bool)
            owned[r * epr:(r + 1) * epr] = True
            y = scaled_experts(x32, topk_ids[s], topk_weights[s], expert_scale, owned)
            acc = y if acc is None else acc + y
        out.append(cast_from_float32(acc, dtype))
    return out
