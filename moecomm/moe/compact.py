"""EPAllToAll: expert-parallel dispatch / combine with a compact expert-major layout.

Semantics (DESIGN.md section 3; reference: ``moecomm.reference.ep_dispatch_compact`` and
``ep_combine_compact``; API after reference document 003, ``EPAll2AllLayer``):

* ``dispatch(x [T, H], topk_ids [T, k] int32, weights [T, k] fp32 = None)`` gives every
  rank one row per (token, k slot) whose expert it owns (``rank = id // experts_per_rank``;
  ids < 0 or >= num_experts route nowhere; a token naming one expert in two slots gives
  two rows). Rows are grouped by local expert (ascending), then ordered by source rank,
  token index, k slot. ``recv_x [capacity, H]`` holds them from row 0; ``tokens_per_expert``
  / ``expert_offsets`` say where each expert's rows are; ``recv_weights [capacity]`` is
  each row's routing weight (1.0 where its source passed ``weights=None``).
* ``combine(y [capacity, H], layout, apply_weights)`` returns ``[T, H]``: for each local
  token, the sum over its valid k slots, in slot order, of the row its slot's owner
  produced (times that row's received weight when ``apply_weights``), accumulated in fp32
  from +0 and rounded once to y's dtype: exactly ``ep_combine_compact``, bit for bit, and
  so independent of the ep size. This "exact" combine fetches each slot's row on its own
  (k rows per token cross the links).
* ``local_combine=True`` (003's ``enable_local_combine``) trades that for bandwidth: each
  rank first sums its own rows of a token (slot order, fp32, rounded to y's dtype), then
  the ranks' partials are summed in rank order in fp32 (one row per (token, rank) on the
  links, like the static layout). The result then differs from the reference in the last
  bits wherever a token has several slots on one rank, and depends on the ep size.

Capacity. ``capacity`` rows (``max_recv_rows``, or ``capacity_factor`` times the balanced
load ``max_num_tokens * top_k``; default the worst case ``ep_size * max_num_tokens * top_k``)
are allocated at construction. Rows past it (the tail of the expert-major order) are
dropped: never written, counted on the device (``layout.num_dropped``, the clamped
``tokens_per_expert``), and raised as ``CapacityError`` by ``layout.check_capacity()`` or by
the sticky ``EPAllToAll.check_capacity()`` (both synchronise). combine skips dropped rows.

Rules of use (as for ``MoeAlltoAll``, which carries the exchange):

* Collective: every rank of the ep group constructs, calls ``dispatch`` and ``combine`` in
  strict alternation (same ``runtime_max_tokens_per_rank`` and ``apply_weights`` on every
  rank), and ``close()``s. Token counts may differ per rank (0 included). ``weights`` may
  be given on some ranks and not others.
* ``recv_x``, ``recv_weights`` and the layout's arrays are rewritten by the next dispatch;
  a layout is only accepted by the combine that follows its dispatch. Use one stream for a
  dispatch, its combine and the next dispatch (or order them).
* No host synchronisation, no allocation (pass ``out=`` to ``combine``) and no
  data-dependent Python: dispatch + combine can be captured in a CUDA graph.
* ``hidden * itemsize`` must be a multiple of 16 for x and y; experts_per_rank <= 1024,
  top_k <= 256, capacity <= 2**24.
* Waits for peers are bounded (``timeout_s``); a timeout surfaces as ``PeerTimeoutError``
  from the next call or ``check_error``.

Kernels: ``kernels_cu/moe_compact.cu``: expand after the MoeAlltoAll dispatch; the exact
combine is one pull kernel that keeps the exchange's combine handshake; the local combine
reduces, then runs the MoeAlltoAll combine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cupy
import numpy as np

from .. import events
from .. import group as _group
from ..constants import (A2A_MAX_RANKS, COMPACT_MAX_CAPACITY, COMPACT_MAX_LOCAL_EXPERTS,
                         COMPACT_MAX_TOP_K, COMPACT_PULL_UNITS, COMPACT_COMBINE_THREADS,
                         CompactStat)
from ..kernel_args import (CompactDispatchArgs, CompactPullArgs, CompactReduceArgs,
                           CompactStageArgs)
from ..kernels import get_kernel
from ..launch import Launcher
from ..op import (Op, Phase, bool_option, device_facts, empty, ep_group, int_at_least,
                  require_aligned, round_up)
from ..symmetric import SymmetricBuffer
from ..tensors import DeviceArray, as_stream, bfloat16, import_array, stream_handle
from .alltoall import MoeAlltoAll, MoeAlltoAllConfig, moe_a2a_get_workspace_size_per_rank

__all__ = [
    "MAX_CAPACITY",
    "MAX_LOCAL_EXPERTS",
    "MAX_TOP_K",
    "CapacityError",
    "EPAll2AllLayer",
    "EPAllToAll",
    "EPDispatchOutput",
    "EPLayout",
]

MAX_LOCAL_EXPERTS = COMPACT_MAX_LOCAL_EXPERTS
MAX_TOP_K = COMPACT_MAX_TOP_K  # one row's k entries fit an expand tile
MAX_CAPACITY = COMPACT_MAX_CAPACITY
_SOURCE = "moe_compact.cu"
_DISPATCH_THREADS = 512
_EXPAND_SLICES = 4  # most blocks copying one received row (each a slice of its columns)
_COMBINE_THREADS = COMPACT_COMBINE_THREADS
_PULL_PIECE = 32 * COMPACT_PULL_UNITS  # 16-byte columns of a pull warp's piece of a row
_SUFFIX = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32"}
if bfloat16 is not None:
    _SUFFIX[bfloat16] = "bf16"


class CapacityError(RuntimeError):
    """A dispatch produced more rows than the layer's capacity; the tail was dropped."""

    def __init__(self, message: str, needed: int, capacity: int):
        super().__init__(message)
        self.needed, self.capacity = needed, capacity


class _PrefixViews(NamedTuple):
    """The first T rows of an ``EPAllToAll``'s constant buffers."""

    tokens: DeviceArray  # int32 [T]: token indices 0..T-1 (a dispatch payload)
    ones: DeviceArray  # fp32 [T, k]: unit weights, when dispatch is given none


class EPDispatchOutput(NamedTuple):
    """What ``dispatch`` returns; unpacks as ``recv_x, recv_weights, layout`` (as in 003).

    recv_x: ``[capacity, H]`` of x's dtype, rows ``[0, layout.num_rows)`` valid.
    recv_weights: fp32 ``[capacity]``, each row's routing weight.
    layout: the ``EPLayout`` that ``combine`` takes.
    """

    recv_x: cupy.ndarray
    recv_weights: cupy.ndarray
    layout: EPLayout

    @property
    def tokens_per_expert(self) -> cupy.ndarray:
        """int32 ``[experts_per_rank]`` on the device (see ``EPLayout``)."""
        return self.layout.tokens_per_expert


class EPLayout:
    """The routing of one dispatch, on the device; valid until the next dispatch.

    Attributes (``cupy`` arrays, rewritten by the next dispatch):
        tokens_per_expert: int32 ``[experts_per_rank]``, rows of each local expert held in
            recv_x (clamped to the capacity).
        expert_offsets: int32 ``[experts_per_rank + 1]``: expert e's rows are
            ``[offsets[e], offsets[e+1])``; ``offsets[-1]`` is ``num_rows``.
        src: int32 ``[capacity, 3]``: (source rank, token index, k slot) of each row.
        num_rows: int32 ``[1]``, rows held (<= capacity).
        num_needed / num_dropped: int32 ``[1]``, rows the routing produced / dropped.
    Host values: ``num_tokens`` (this rank's T), ``runtime_max_tokens_per_rank``.
    """

    def __init__(self, owner: EPAllToAll, epoch: int, num_tokens: int, runtime_max: int):
        self._owner, self._epoch = owner, epoch
        self.num_tokens, self.runtime_max_tokens_per_rank = num_tokens, runtime_max

    @property
    def current(self) -> bool:
        """False once a later dispatch has rewritten the arrays."""
        return self._owner._epoch == self._epoch and not self._owner.closed

    def _check(self, what: str) -> EPAllToAll:
        if not self.current:
            raise RuntimeError(f"EPLayout.{what}: the layout is stale (a later dispatch, or "
                               "close(), replaced it)")
        return self._owner

    @property
    def tokens_per_expert(self) -> cupy.ndarray:
        return self._check("tokens_per_expert")._tpe

    @property
    def expert_offsets(self) -> cupy.ndarray:
        return self._check("expert_offsets")._offsets

    @property
    def src(self) -> cupy.ndarray:
        return self._check("src")._src

    @property
    def num_rows(self) -> cupy.ndarray:
        return self._check("num_rows")._stats[CompactStat.ROWS:CompactStat.ROWS + 1]

    @property
    def num_needed(self) -> cupy.ndarray:
        return self._check("num_needed")._stats[CompactStat.NEEDED:CompactStat.NEEDED + 1]

    @property
    def num_dropped(self) -> cupy.ndarray:
        return self._check("num_dropped")._stats[CompactStat.DROPPED:CompactStat.DROPPED + 1]

    def tokens_per_expert_host(self, stream=None) -> np.ndarray:
        """``tokens_per_expert`` as a NumPy array. Synchronises ``stream``."""
        owner = self._check("tokens_per_expert_host")
        as_stream(stream).synchronize()
        return owner._tpe.get()

    def num_rows_host(self, stream=None) -> int:
        """Rows held in recv_x. Synchronises ``stream``."""
        owner = self._check("num_rows_host")
        as_stream(stream).synchronize()
        return int(owner._stats[CompactStat.ROWS].get())

    def check_capacity(self, stream=None) -> None:
        """Raise ``CapacityError`` if this dispatch dropped rows. Synchronises ``stream``."""
        owner = self._check("check_capacity")
        as_stream(stream).synchronize()
        needed, dropped = (int(v) for v in owner._stats[CompactStat.NEEDED:CompactStat.DROPPED + 1].get())
        if dropped:
            raise CapacityError(
                f"EPAllToAll.dispatch: rank {owner.ep_rank} received {needed} rows, the "
                f"capacity is {owner.capacity}; the last {dropped} rows (expert-major order) "
                "were dropped (raise max_recv_rows / capacity_factor)", needed, owner.capacity)


class EPAllToAll(Op):
    """Expert-parallel all-to-all, compact expert-major layout (see the module doc).

    Args:
        group: the ep group (``ProcessGroup`` inside one node, ``Mapping`` whose moe_ep
            group is used, or None for the default group).
        max_num_tokens: most tokens any rank dispatches in one call.
        top_k: experts per token (columns of ``topk_ids``), <= 256.
        num_experts: total experts, a multiple of the ep size; experts_per_rank <= 1024.
        hidden: columns of x and y.
        dtype: x's dtype (any; ``hidden * itemsize`` a multiple of 16). Default bf16.
        max_recv_rows: rows of recv_x / y (the capacity) ...
        capacity_factor: ... or this times ``max_num_tokens * top_k`` (rounded up); default
            the worst case ``ep_size * max_num_tokens * top_k``, which never drops rows.
        combine_dtype: y's and combine's output dtype: bf16, fp16 or fp32 (default dtype).
        local_combine: sum each rank's rows of a token before the exchange (faster, other
            rounding: see the module doc). Default False: the exact, reference combine.
        timeout_s: bound of every wait for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s).

        config: the ``MoeAlltoAllConfig`` of the exchange (SM budget, block sizes).

    Collective over the ep group, like ``close()``. Also a context manager.
    """

    name = "EPAllToAll"

    def __init__(self, group, max_num_tokens: int, top_k: int, num_experts: int, hidden: int,
                 dtype=bfloat16, *, max_recv_rows: int | None = None,
                 capacity_factor: float | None = None, combine_dtype=None,
                 local_combine: bool = False, timeout_s: float | None = None,
                 config: MoeAlltoAllConfig | None = None):
        self.max_num_tokens = int_at_least("max_num_tokens", max_num_tokens)
        self.top_k = int_at_least("top_k", top_k)
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"top_k={self.top_k} exceeds the supported {MAX_TOP_K}")
        self.num_experts = int_at_least("num_experts", num_experts)
        self.hidden = int_at_least("hidden", hidden)
        self.dtype = np.dtype(dtype)
        self.combine_dtype = self.dtype if combine_dtype is None else np.dtype(combine_dtype)
        if self.combine_dtype not in _SUFFIX:
            raise TypeError(f"combine_dtype {self.combine_dtype.name} is not supported, expected "
                            "bfloat16, float16 or float32")
        for name, dt in (("dtype", self.dtype), ("combine_dtype", self.combine_dtype)):
            if self.hidden * dt.itemsize % 16:
                raise ValueError(f"hidden={self.hidden} with {name} {dt.name}: rows of "
                                 f"{self.hidden * dt.itemsize} bytes, must be a multiple of 16")
        self.local_combine = bool_option("local_combine", local_combine)
        if max_recv_rows is not None and capacity_factor is not None:
            raise ValueError("pass max_recv_rows or capacity_factor, not both")

        group, owned = ep_group(group)
        try:
            if group.spans_nodes:
                raise ValueError(f"EPAllToAll: the ep group spans {group.num_nodes} nodes; CUDA "
                                 "IPC reaches one node only (use an ep group inside a node)")
            ep = group.local_size
            if ep > A2A_MAX_RANKS:
                raise ValueError(f"ep size {ep} exceeds the maximum {A2A_MAX_RANKS}")
            if self.num_experts % ep:
                raise ValueError(f"num_experts={self.num_experts} is not a multiple of the ep "
                                 f"size {ep}")
            self.experts_per_rank = self.num_experts // ep
            if self.experts_per_rank > MAX_LOCAL_EXPERTS:
                raise ValueError(f"{self.experts_per_rank} experts per rank exceed the "
                                 f"supported {MAX_LOCAL_EXPERTS}")
            self.capacity = self._capacity(ep, max_recv_rows, capacity_factor)
            self._make(group, ep, timeout_s, config)
        except BaseException:
            if owned:
                group.close()
            raise
        self._group, self._owns_group = group, owned
        self._open(None)  # waits are the exchange's: check_error goes to it

    def _capacity(self, ep: int, max_recv_rows, capacity_factor) -> int:
        worst = ep * self.max_num_tokens * self.top_k
        if max_recv_rows is not None:
            cap = int_at_least("max_recv_rows", max_recv_rows)
        elif capacity_factor is not None:
            factor = float(capacity_factor)
            if not factor > 0:
                raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
            cap = max(1, math.ceil(factor * self.max_num_tokens * self.top_k))
        else:
            cap = worst
        cap = min(cap, worst)  # more rows can never arrive
        if cap > MAX_CAPACITY:
            raise ValueError(f"capacity of {cap} rows exceeds the supported {MAX_CAPACITY} "
                             "(pass a smaller max_recv_rows / capacity_factor)")
        return cap

    def _make(self, group, ep: int, timeout_s, config) -> None:
        k, H, cap, epr = self.top_k, self.hidden, self.capacity, self.experts_per_rank
        row_x = H * self.dtype.itemsize
        row_y = H * self.combine_dtype.itemsize
        # The exact combine reads y from the layer's own symmetric buffer, not the
        # exchange's combine region.
        combine_bytes = row_y if self.local_combine else 16
        ws = moe_a2a_get_workspace_size_per_rank(
            ep, self.max_num_tokens, row_x + 8 * k + 4, combine_bytes, num_payloads=4)
        self._a2a = MoeAlltoAll(group, self.max_num_tokens, k, self.num_experts,
                                workspace_size_per_rank=ws, timeout_s=timeout_s, config=config)
        self.ep_rank, self.ep_size = self._a2a.ep_rank, self._a2a.ep_size
        self._sym = None
        try:
            with group.all_or_none("EPAllToAll"):  # local steps
                # the expand's and the combine's most blocks: 2 and 4 per SM of the budget
                self._max_grid = self._a2a.max_blocks(2)
                self._row_vecs = row_x // 16
                self._max_combine_grid = self._a2a.max_blocks(4)
                self._y_view = None  # the combine input array, made on first use
                self._prefix: dict[int, _PrefixViews] = {}  # by token count
                # One spare row past the capacity in recv_x / src / recv_weights: nothing may
                # ever be written there (tests poison and check it).
                self._recv_x_buf = empty((cap + 1, H), self.dtype)
                self._src_buf = cupy.zeros((cap + 1, 3), np.int32)
                if self.local_combine:
                    self._recv_w_buf = cupy.zeros(cap + 1, np.float32)
                    self._inv = cupy.full(ep * self.max_num_tokens * k, -1, np.int32)
                else:  # symmetric: y [cap, H], weights [cap + 1], codes i32 [tokens, k]
                    self._y_off = 0
                    self._w_off = round_up(cap * row_y, 256)
                    self._codes_off = self._w_off + round_up(4 * (cap + 1), 256)
            if not self.local_combine:
                self._sym = SymmetricBuffer(
                    group, self._codes_off + round_up(4 * self.max_num_tokens * k, 256))
            with group.all_or_none("EPAllToAll"):  # local steps
                if not self.local_combine:
                    self._recv_w_buf = self._sym.view(np.float32, (cap + 1,),
                                                      offset=self._w_off)
                    self._codes = self._sym.view(np.int32, (self.max_num_tokens, k),
                                                 offset=self._codes_off)
                    self._ids_copy = cupy.zeros((self.max_num_tokens, k), np.int32)
                self._stats = cupy.zeros(8, np.int32)
                self._tpe = cupy.zeros(epr, np.int32)
                self._offsets = cupy.zeros(epr + 1, np.int32)
                self._iota = cupy.arange(self.max_num_tokens, dtype=np.int32)
                self._ones = cupy.ones((self.max_num_tokens, k), np.float32)
                self._recv_x, self._src = self._recv_x_buf[:cap], self._src_buf[:cap]
                self._recv_w = self._recv_w_buf[:cap]

                self._expand = Launcher(get_kernel(_SOURCE, "moe_compact_expand"),
                                        CompactDispatchArgs, pdl=self._a2a.config.pdl)
                d = self._expand.args
                d.recv_counts, d.recv_x = self._a2a.recv_counts.data.ptr, self._recv_x_buf.data.ptr
                d.recv_w, d.src = self._recv_w_buf.data.ptr, self._src_buf.data.ptr
                d.inv = self._inv.data.ptr if self.local_combine else None
                d.codes_off = -1 if self.local_combine else self._codes_off
                if not self.local_combine:
                    d.peers[:ep] = self._sym.ptrs
                    d.ids_copy = self._ids_copy.data.ptr
                d.stats = self._stats.data.ptr
                d.tokens_per_expert, d.offsets = self._tpe.data.ptr, self._offsets.data.ptr
                d.ep_size, d.rank, d.experts_per_rank, d.top_k = ep, self.ep_rank, epr, k
                d.capacity, d.row_bytes = cap, row_x
                suffix = _SUFFIX[self.combine_dtype]
                if self.local_combine:
                    self._reduce = Launcher(get_kernel(_SOURCE, f"moe_compact_reduce_{suffix}"),
                                            CompactReduceArgs)
                    r = self._reduce.args
                    r.recv_w, r.inv = self._recv_w_buf.data.ptr, self._inv.data.ptr
                    r.recv_counts, r.ep_size, r.top_k = self._a2a.recv_counts.data.ptr, ep, k
                    r.row_bytes, r.capacity = row_y, cap
                else:
                    kernel = get_kernel(_SOURCE, f"moe_compact_pull_{suffix}")
                    self._pull = self._a2a.combine_launcher(kernel, CompactPullArgs)
                    # At most the blocks the SMs hold at once (more would only run in turns).
                    self._pull_blocks = self._a2a.max_blocks(
                        device_facts().blocks_per_sm(kernel, _COMBINE_THREADS))
                    q = self._pull.args
                    q.peers[:ep] = self._sym.ptrs
                    q.ids, q.codes = self._ids_copy.data.ptr, self._codes.data.ptr
                    q.y_off, q.w_off, q.top_k, q.experts_per_rank = self._y_off, self._w_off, k, epr
                    q.row_bytes, q.capacity = row_y, cap
                    self._stage = Launcher(get_kernel(_SOURCE, "moe_compact_stage"),
                                           CompactStageArgs)
                    g = self._stage.args
                    g.dst, g.stats = self._sym.ptr + self._y_off, self._stats.data.ptr
                    g.row_bytes, g.capacity = row_y, cap
                cupy.cuda.runtime.deviceSynchronize()  # zeroed buffers visible to any stream
        except BaseException:
            if self._sym is not None:
                self._sym.close()
            self._a2a.close()
            raise
        self._epoch = 0
        self._layout: EPLayout | None = None

    # -- state ------------------------------------------------------------------------
    @property
    def recv_x(self) -> cupy.ndarray:
        """``[capacity, H]`` of dtype: the last dispatch's rows (valid: ``num_rows``)."""
        return self._recv_x

    @property
    def recv_weights(self) -> cupy.ndarray:
        """fp32 ``[capacity]``: each row's routing weight (1.0 from ``weights=None``)."""
        return self._recv_w

    def check_error(self, stream=None, *, synchronize: bool = False) -> None:
        """Raise ``PeerTimeoutError`` if a wait for a peer timed out."""
        self.require_open("check")
        self._a2a.check_error(stream, synchronize=synchronize)

    def check_capacity(self, stream=None) -> None:
        """Raise ``CapacityError`` if any dispatch since the last check dropped rows (the
        largest overflow is reported), and reset that record. Synchronises ``stream``:
        call it after graph replays or periodically, not on the hot path."""
        self.usable("check_capacity")
        as_stream(stream).synchronize()
        needed, dropped = (int(v) for v in self._stats[CompactStat.MAX_NEEDED:CompactStat.MAX_DROPPED + 1].get())
        if dropped:
            self._stats[CompactStat.MAX_NEEDED:CompactStat.MAX_DROPPED + 1] = 0
            cupy.cuda.runtime.deviceSynchronize()
            raise CapacityError(
                f"EPAllToAll: a dispatch on rank {self.ep_rank} received up to {needed} rows, "
                f"the capacity is {self.capacity}; up to {dropped} rows were dropped (raise "
                "max_recv_rows / capacity_factor)", needed, self.capacity)

    def usable(self, what: str) -> None:
        super().usable(what)
        self._a2a.check_error()

    def poison(self) -> None:
        """Fill every output buffer (recv_x with its spare row past the capacity, src,
        recv_weights, tokens_per_expert, offsets, the row counters, the combine input
        region, the code rows and the ids copy) with 0xFF bytes and poison the exchange
        (``MoeAlltoAll.poison``), keeping the sticky capacity record: tests use it to
        prove that every valid output is written. Synchronizes the device; not
        collective."""
        self.usable("poison")
        cupy.cuda.runtime.deviceSynchronize()
        for buf in (self._recv_x_buf, self._src_buf, self._recv_w_buf, self._tpe, self._offsets):
            buf.view(np.uint8).fill(0xFF)
        self._stats[CompactStat.ROWS:CompactStat.DROPPED + 1] = -1
        if not self.local_combine:
            self.get_combine_input_tensor_in_workspace().view(np.uint8).fill(0xFF)
            for buf in (self._codes, self._ids_copy):
                buf.view(np.uint8).fill(0xFF)
        self._a2a.poison()

    def overrun_guard(self) -> tuple:
        """Views of the spare row just past the capacity, which no dispatch may write:
        ``(recv_x [1, H], src [1, 3], weight [1])`` (tests check it keeps its poison)."""
        cap = self.capacity
        return self._recv_x_buf[cap:], self._src_buf[cap:], self._recv_w_buf[cap:]

    # -- dispatch ---------------------------------------------------------------------
    def dispatch(self, x, topk_ids, weights=None, stream=None, *,
                 runtime_max_tokens_per_rank: int | None = None, handle=None,
                 return_handle: bool = False, previous_event=None,
                 async_op: bool = False) -> EPDispatchOutput:
        """Send each (token, k slot) to its expert's rank, grouped by local expert.

        Args:
            x: ``[T, hidden]`` of the layer's dtype, ``T <= max_num_tokens``.
            topk_ids: int32 ``[T, top_k]`` global expert ids (invalid ids route nowhere).
            weights: fp32 ``[T, top_k]`` routing weights, or None (weight 1.0).
            stream: the stream to run on (default: CuPy's current stream).
            runtime_max_tokens_per_rank: bound on every rank's T for this call (the same
                on every rank; default max_num_tokens).
            handle, return_handle: the exchange's ``RoutingHandle`` (``MoeAlltoAll.
                dispatch``): replaying one skips the sender's layout pass; the receiver's
                expand still runs (it depends on every peer's ids).
            previous_event, async_op: overlap options (``moecomm.events``).

        Returns ``EPDispatchOutput(recv_x, recv_weights, layout)`` (views of the layer's
        buffers, rewritten by the next dispatch); with ``return_handle``
        ``(that, RoutingHandle)``; with ``async_op`` that result and a ``CommHandle``.
        """
        self.usable("dispatch")
        if self.phase == Phase.DISPATCHED:
            raise RuntimeError("EPAllToAll.dispatch called twice without combine (dispatch and "
                               "combine alternate)")
        rmax = self.max_num_tokens
        if runtime_max_tokens_per_rank is not None:
            rmax = int_at_least("runtime_max_tokens_per_rank", runtime_max_tokens_per_rank)
            if rmax > self.max_num_tokens:
                raise ValueError(f"runtime_max_tokens_per_rank={rmax} exceeds max_num_tokens="
                                 f"{self.max_num_tokens}")
        stream_ptr = stream_handle(stream)
        dev = self.device_id
        ids = import_array(topk_ids, "topk_ids", dtype=np.int32, ndim=2, device=dev,
                           stream=stream_ptr)
        T, k = ids.shape
        if k != self.top_k:
            raise ValueError(f"topk_ids: {k} experts per token, the layer was made for "
                             f"top_k={self.top_k}")
        if T > self.max_num_tokens:
            raise ValueError(f"topk_ids: {T} tokens exceed max_num_tokens={self.max_num_tokens}")
        if T > rmax:
            raise ValueError(f"topk_ids: {T} tokens exceed runtime_max_tokens_per_rank={rmax}")
        xa = import_array(x, "x", dtype=self.dtype, shape=(T, self.hidden), device=dev,
                          stream=stream_ptr)
        prefix = self._prefix_views(T)
        if weights is None:
            w = prefix.ones
        else:
            w = import_array(weights, "weights", dtype=np.float32, shape=(T, k), device=dev,
                             stream=stream_ptr)
        for name, a in (("topk_ids", ids), ("x", xa), ("weights", w)):
            require_aligned(name, a.ptr, 4)
        a2a = self._a2a
        payloads = [xa, ids, prefix.tokens, w]
        prepared = a2a._prepared(rmax, payloads)
        route = a2a._route(handle, return_handle, topk_ids, T, stream)
        if previous_event is not None or async_op or _group.DEBUG:
            async_op = events.issue(stream_ptr, previous_event, async_op, owner=self,
                                    op="EPAllToAll.dispatch")
        a2a._send(prepared, ids, payloads, stream_ptr, route)
        args = self._expand.args
        args.x, args.ids, args.tok, args.w = (a.data.ptr for a in prepared.views)
        args.runtime_max, args.ids_in, args.num_tokens = rmax, ids.ptr, T
        grid, args.slices = self._expand_grid(self.ep_size * rmax)
        self._expand(grid, _DISPATCH_THREADS, stream_ptr)
        self._epoch += 1
        self.phase, self._rmax = Phase.DISPATCHED, rmax
        self._layout = EPLayout(self, self._epoch, T, rmax)
        result = EPDispatchOutput(self._recv_x, self._recv_w, self._layout)
        if return_handle:
            result = (result, route)
        if not async_op:
            return result
        return events.finish(result, stream_ptr, True, owner=self, op="EPAllToAll.dispatch",
                             keep=(x, topk_ids, weights))

    # -- combine ----------------------------------------------------------------------
    def get_combine_input_tensor_in_workspace(self) -> cupy.ndarray:
        """A ``[capacity, H]`` array of combine_dtype to write the expert outputs into:
        ``combine`` of this very array skips the copy into the exchange buffer. Write it
        on the op's stream, after the dispatch (peers read it until then)."""
        self.usable("get_combine_input_tensor_in_workspace")
        if self._y_view is None:
            if self.local_combine:  # y is read locally: any array will do, this one included
                self._y_view = empty((self.capacity, self.hidden), self.combine_dtype)
            else:
                self._y_view = self._sym.view(self.combine_dtype, (self.capacity, self.hidden),
                                              offset=self._y_off)
        return self._y_view

    def combine(self, y, layout: EPLayout, apply_weights: bool = False, stream=None, *,
                out=None, previous_event=None, async_op: bool = False) -> cupy.ndarray:
        """Bring the expert outputs back and sum them per token.

        Args:
            y: ``[capacity, H]`` of combine_dtype, 16-byte aligned: row i is the expert
                output of recv_x row i (rows past ``num_rows`` are never read).
            layout: the layout of the dispatch just before.
            apply_weights: multiply each row by its ``recv_weights`` entry first.
            out: optional ``[T, H]`` combine_dtype array, 16-byte aligned (pass it when
                capturing a graph).
            previous_event, async_op: overlap options (``moecomm.events``).

        Returns ``[T, H]`` (``out`` as passed, or a new ``cupy.ndarray``): per token the fp32
        sum of its slots' rows in slot order, rounded once (module doc; with
        ``local_combine`` the two-level sum).
        """
        self.usable("combine")
        if not isinstance(layout, EPLayout) or layout._owner is not self:
            raise TypeError("layout: expected the EPLayout returned by this layer's dispatch")
        if layout is not self._layout or self.phase != Phase.DISPATCHED:
            raise RuntimeError("EPAllToAll.combine needs the layout of the dispatch just before "
                               "(dispatch and combine alternate)")
        apply_weights = bool_option("apply_weights", apply_weights)
        handle = stream_handle(stream)
        dev = self.device_id
        ya = import_array(y, "y", dtype=self.combine_dtype, shape=(self.capacity, self.hidden),
                          device=dev, stream=handle)
        T, rmax = layout.num_tokens, self._rmax
        if out is None:
            out = empty((T, self.hidden), self.combine_dtype, handle)
            out_ptr = out.data.ptr
        else:
            out_ptr = import_array(out, "out", dtype=self.combine_dtype, shape=(T, self.hidden),
                                   device=dev, stream=handle, writable=True).ptr
        require_aligned("y", ya.ptr)
        require_aligned("out", out_ptr)
        if previous_event is not None or async_op or _group.DEBUG:
            async_op = events.issue(handle, previous_event, async_op, owner=self,
                                    op="EPAllToAll.combine")
        if self.local_combine:
            region = self._a2a.get_combine_payload_tensor_in_workspace(
                rmax, self.hidden, self.combine_dtype)
            args = self._reduce.args
            args.y, args.payload = ya.ptr, region.data.ptr
            args.runtime_max, args.apply_weights = rmax, int(apply_weights)
            units = self.ep_size * rmax * (self.hidden * self.combine_dtype.itemsize // 16)
            self._reduce(self._combine_grid(units), _COMBINE_THREADS, handle)
            self._a2a.combine(region, rmax, payload_in_workspace=True, stream=stream, out=out)
        else:
            y_region = self._sym.ptr + self._y_off
            if ya.ptr != y_region:
                if ya.ptr < y_region + ya.nbytes and y_region < ya.ptr + ya.nbytes:
                    raise ValueError("y overlaps the layer's combine input buffer; pass the "
                                     "array of get_combine_input_tensor_in_workspace or a "
                                     "separate array")
                self._stage.args.y = ya.ptr
                units = ya.nbytes // 16
                self._stage(self._combine_grid(units), _COMBINE_THREADS, handle)
            args = self._pull.args
            args.out, args.num_tokens, args.apply_weights = out_ptr, T, int(apply_weights)
            self._a2a.combine_with(self._pull, self._pull_grid(rmax), _COMBINE_THREADS, handle)
        self.phase = Phase.IDLE
        if not async_op:
            return out
        return events.finish(out, handle, True, owner=self, op="EPAllToAll.combine",
                             keep=(y, out))

    def _prefix_views(self, T: int) -> _PrefixViews:
        """The first T rows of the layer's constant buffers, sliced once per T (a CuPy
        slice costs microseconds per call)."""
        views = self._prefix.get(T)
        if views is None:
            if len(self._prefix) >= 64:
                self._prefix.clear()
            views = self._prefix[T] = _PrefixViews(
                *(DeviceArray(a.data.ptr, (T, *a.shape[1:]), a.dtype, a)
                  for a in (self._iota, self._ones)))
        return views

    def _expand_grid(self, rows: int) -> tuple[int, int]:
        """(grid, slices) of the expand for up to ``rows`` received rows: one row per block
        while rows are few (the copy, not the count, sets the time: every block counts all
        rows), and while the grid has room, up to _EXPAND_SLICES blocks per row, each
        copying a slice of its columns."""
        slices = max(1, min(_EXPAND_SLICES, self._max_grid // max(1, rows), self._row_vecs))
        return slices * max(1, min(self._max_grid // slices, rows)), slices

    def _combine_grid(self, units: int) -> int:
        return max(1, min(self._max_combine_grid, -(-units // _COMBINE_THREADS)))

    def _pull_grid(self, rmax: int) -> int:
        """The pull's grid: a warp per piece of _PULL_PIECE columns of up to rmax tokens'
        rows (the same on every rank), at most the blocks the SMs hold at once."""
        pieces = rmax * -(-(self.hidden * self.combine_dtype.itemsize // 16) // _PULL_PIECE)
        return max(1, min(self._pull_blocks, -(-pieces // (_COMBINE_THREADS // 32))))

    # -- lifetime ---------------------------------------------------------------------
    def _release(self) -> None:
        """Wait for the device, free the exchange buffers in order."""
        self._a2a.close()
        if self._sym is not None:
            self._sym.close()
        if self._owns_group:
            self._group.close()

    def finalize(self) -> None:
        """``close()`` under reference document 003's name."""
        self.close()

    def __enter__(self) -> EPAllToAll:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EPAllToAll(ep_rank={getattr(self, 'ep_rank', '?')}/"
                f"{getattr(self, 'ep_size', '?')}, max_num_tokens={self.max_num_tokens}, "
                f"top_k={self.top_k}, num_experts={self.num_experts}, "
                f"capacity={getattr(self, 'capacity', '?')}, "
                f"{'local' if self.local_combine else 'exact'} combine, {self.phase.value})")


EPAll2AllLayer = EPAllToAll  # the name of reference document 003
