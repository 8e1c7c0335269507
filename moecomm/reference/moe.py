"""MoE all-to-all: the static layout (``MoeAlltoAll``: routing, dispatch, combine, expert
id sanitizing) and the compact expert-major layout (``EPAllToAll``). Every function takes
all ranks' inputs at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .formats import _check_same, cast_from_float32, to_float32

__all__ = [
    "A2ARouting", "moe_a2a_target_ranks", "moe_a2a_dispatch", "moe_a2a_combine",
    "sanitize_expert_ids", "moe_a2a_sanitize_expert_ids",
    "CompactLayout", "ep_dispatch_compact", "ep_combine_compact",
]

# --------------------------------------------------------------------------------------
# static layout (MoeAlltoAll)
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
