"""MoeAlltoAll: expert-parallel dispatch / combine over CUDA IPC, static layout.

Semantics (DESIGN.md section 3, reference: ``moecomm.reference.moe_a2a_dispatch`` and
``moe_a2a_combine``): ``dispatch`` sends each token once to every DISTINCT rank owning one
of its experts (``rank = expert // (num_experts // ep_size)``; ids < 0 or >= num_experts
route nowhere). On every rank each payload arrives as a workspace-backed
``[ep_size, runtime_max_tokens_per_rank, *row_shape]`` array whose block ``s`` holds the
tokens of rank ``s`` routed here, compacted, in source order; ``recv_counts[s]`` says how
many. ``combine`` returns, for each local token, the sum over its distinct target ranks
(ascending rank, fp32 accumulation from +0, one rounding) of the row that rank produced at
the token's slot.

Padding rows (``>= recv_counts[s]`` in block ``s``) hold unspecified bytes (whatever an
earlier call left), except in the expert-id payload when sanitising is asked for, where
every padding id is ``invalid_token_expert_id``. combine never reads padding rows.

Rules of use:

* Collective: every rank of the ep group makes the object, calls ``dispatch`` and
  ``combine`` the same number of times, in strict alternation, with the same
  ``runtime_max_tokens_per_rank`` and the same payload count, dtypes and row shapes (in
  dispatch and in combine), and ``close()``s it. Token counts ``T`` may differ per rank
  (0 included), ``T <= runtime_max_tokens_per_rank <= max_num_tokens``.
* Arrays returned by ``dispatch`` (and the combine payload view) are views of the
  workspace: valid until the next ``dispatch``. ``recv_counts`` is likewise rewritten by
  each dispatch. Use one stream for a dispatch and its combine (or order them).
* Alignment: each payload's bytes per token (``itemsize * prod(shape[1:])``) and base
  address must be multiples of 4; rows whose size and address are multiples of 16 move as
  16-byte vectors (the fast path: use it for hidden states). The combine payload is bf16,
  fp16 or fp32 with ``hidden * itemsize`` a multiple of 16 and a 16-byte aligned address.
* No host synchronisation, no device allocation (pass ``out=`` to ``combine``) and no
  data-dependent Python: dispatch + combine can be captured in a CUDA graph and replayed;
  the epoch that pairs the ranks' flags is a device-side call counter.
* Waits for peers are bounded (``timeout_s``, default ``MOECOMM_TIMEOUT_S`` or 10 s). A
  timeout is recorded on the device and raised as ``PeerTimeoutError`` naming the missing
  rank by the next call (or ``check_error``); the object is then unusable: close it.

FP8 dispatch (``dispatch(..., quantize=Fp8Dispatch(payload_index, scale_format))``, as
DeepEP's low-latency mode): payload ``payload_index`` must be bf16 ``[T, H]`` with
``H % 128 == 0`` and a 16-byte aligned address. The dispatch kernel quantizes each token
once, on the sender, and sends e4m3 codes (H bytes instead of 2H) plus one scale per 128
elements; that payload arrives as ``Fp8Rows(codes, scales)``: codes uint8
``[ep_size, runtime_max, H]`` and scales ``[ep_size, runtime_max, H // 128]`` float32
(``"fp32"``) or ``[ep_size, runtime_max, ceil(H / 512)]`` int32 (``"ue8m0"``). Per group
of 128 elements, in fp32, ``amax = max |x|`` and ``s = max(fp32(amax / 448), 1e-10)``:

* ``"ue8m0"``: exactly ``reference.quant_fp8_per_token_group(x, 128)``: the scale is
  the smallest power of two >= s, ``2**(e - 127)`` with ``e`` its UE8M0 byte, and
  ``q = e4m3_sat(x / scale)``; four exponent bytes per int32, group 4j+i in byte i, unused
  bytes of the last word 0 (DeepGEMM's packed layout, token-major here).
* ``"fp32"``: ``scale = s`` (stored as float32), ``q = e4m3_sat(x * fp32(1 / s))``: two
  round-to-nearest-even steps (reciprocal, product), a multiplication per element as in
  DeepEP; dequantize as ``decode(q) * scale``.

An all-zero group gets codes 0 and scale 1e-10 (fp32) or 2**-33 (UE8M0 byte 94). NaN
inputs are outside the contract. The scales take one of the ``MAX_PAYLOADS`` receive
tensors, so at most 7 payloads go with ``quantize``. Dispatches with and without
``quantize`` may alternate on one workspace (all ranks alike per call).

Workspace (one ``SymmetricBuffer`` per rank, bytes): a 4 KiB header (counters, counts),
the receive tensors of the current dispatch (each at a 256-byte boundary; the fp8 scales
last), then the combine region ``[ep_size, runtime_max_tokens_per_rank, hidden]`` that peers
read during combine. Size it with ``get_moe_workspace_size_per_rank`` (``quantize=`` for
fp8 dispatch: its rows are H + scale bytes instead of 2H).

Launch: ``MoeAlltoAllConfig`` sets the SM budget (``num_sms``) and block sizes; grids are
the same on every rank (derived from ``runtime_max_tokens_per_rank``), kernels use
programmatic dependent launch, and each call patches a prepared argument struct (no
per-call allocation or NumPy on the host). Under an SM budget the combine pulls through
a shared-memory ring per warp (``combine_ring``), which keeps the link busy from fewer
SMs. Protocol: ``kernels_cu/moe_a2a.cu``.

Routing handle (decode): ``dispatch(..., return_handle=True)`` also returns a
``RoutingHandle``; ``dispatch(..., handle=h)`` with the same ``token_selected_experts``
(the layers of one step, a replayed step) skips the layout pass (every block's count over
all tokens and the slot assignment) and reads the recorded slots; results are identical.
Overlap: ``dispatch`` and ``combine`` take ``previous_event`` / ``async_op``
(``moecomm.events``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import cupy
import numpy as np

from ..constants import (A2A_COMBINE_DEPTH, A2A_COMBINE_GROUP, A2A_COMBINE_UNITS,
                         A2A_DISPATCH_SUB, A2A_FP8_GROUP, A2A_HEADER_BYTES, A2A_MAX_PAYLOADS,
                         A2A_MAX_RANKS, REGION_ALIGN)
from .. import events
from .. import group as _group
from ..errors import ErrorWord, timeout_ns
from ..kernel_args import CombineArgs, DispatchArgs, SanitizeArgs
from ..kernels import get_kernel
from ..launch import Launcher
from ..op import (Op, Phase, bool_option, device_facts, empty, ep_group, grid_limit, group_sms,
                  int_at_least, options, overlaps, require_aligned, round_up)
from ..symmetric import SymmetricBuffer
from ..tensors import DeviceArray, as_array, as_stream, bfloat16, import_array, stream_handle

__all__ = [
    "MoeAlltoAll", "MoeAlltoAllConfig", "DispatchPlan", "plan_dispatch",
    "moe_a2a_get_workspace_size_per_rank", "moe_a2a_sanitize_expert_ids", "MAX_RANKS",
    "MAX_PAYLOADS", "HEADER_BYTES", "Fp8Dispatch", "Fp8Rows", "FP8_GROUP_SIZE", "RoutingHandle",
]

# The limits, under the names this module has always exported (values: moecomm.constants).
MAX_RANKS = A2A_MAX_RANKS
MAX_PAYLOADS = A2A_MAX_PAYLOADS
HEADER_BYTES = A2A_HEADER_BYTES
FP8_GROUP_SIZE = A2A_FP8_GROUP
_SOURCE = "moe_a2a.cu"
_STATE_WORDS = 8  # kState* in kernels_cu/a2a.cuh
# The combine kernel of each payload dtype: moe_a2a_combine_<suffix> (register path) or
# moe_a2a_combine_ring_<suffix> (the shared-memory ring).
_COMBINE_KERNELS = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32"}
if bfloat16 is not None:
    _COMBINE_KERNELS[bfloat16] = "bf16"
_COMBINE_DTYPES = tuple(_COMBINE_KERNELS)
_PLAN_CACHE = 64  # prepared dispatch / combine launches kept per MoeAlltoAll
# Dispatch grid: one block per _DISPATCH_TOKENS_PER_BLOCK tokens of runtime_max, but at
# least _DISPATCH_MIN_BLOCKS (or runtime_max) blocks, within the SM budget: fewer blocks
# send fewer release signals, and each block's signal takes longer the more blocks signal
# at once. Graph-replayed pair on 2 x H200, top-8 of 256, hidden 7168, one block per token
# against 2, 3, 4, 6 and 8 tokens per block (bench/results/moe-dispatch-grid-2xH200-
# 20261130T1010.txt): 48 tokens 16.6 us at one token per block, 17.1 at two; 96 tokens
# 21.5 against 20.6 at three; 128 24.5 against 23.6 at four; 192 30.3 against 29.4 at
# four; 512 58.4 against 57.7 at four; from 1024 tokens the SM budget caps the grid.
_DISPATCH_TOKENS_PER_BLOCK = 4
_DISPATCH_MIN_BLOCKS = 48
# Under an SM budget (sm_90+) the grids launch as thread block clusters of up to this many
# blocks (the largest size that divides the grid), which the hardware places on the SMs of
# one GPC. Measured on 2 x H200 at 4096 tokens, the pair alone by bench moe's sweep
# (bench/results/moe-clusters-overlap-2xH200-20261130T1730.txt): 24 SMs 0.89 of every
# SM's rate without clusters, 0.91-0.92 with pairs, 0.94 with fours. Beside a cuBLAS GEMM
# on the other SMs a cluster waits until one GPC has that many SMs free: with fours the
# pair at 16 SMs waited out an 8192 x 4096 x 7168 GEMM (0.16-0.20 of it hidden, 0.91
# with pairs); clusters of 8 delayed the combine at 8 SMs (moe-budget-clusters-*T1600).
_BUDGET_CLUSTER = 2


def _align(n: int, a: int = REGION_ALIGN) -> int:
    return round_up(n, a)


# The combine's ring: per thread A2A_COMBINE_DEPTH copies of A2A_COMBINE_UNITS 16-byte
# columns of A2A_COMBINE_GROUP ranks (kernels_cu/moe_a2a.cu, combine step 3).
_COMBINE_RING_BYTES_PER_THREAD = A2A_COMBINE_DEPTH * A2A_COMBINE_UNITS * A2A_COMBINE_GROUP * 16


def _combine_threads(wanted: int | None, ring: bool) -> int:
    """The combine's block size: ``wanted`` (None: 512), or through the ring fewer warps
    where the device's shared memory per block cannot hold their rings."""
    if not ring:
        return wanted or 512
    most = device_facts().max_shared_per_block // _COMBINE_RING_BYTES_PER_THREAD // 32 * 32
    return max(32, min(wanted or 512, most))


@dataclass(frozen=True)
class MoeAlltoAllConfig:
    """Launch configuration of ``MoeAlltoAll`` (checked at construction).

    num_sms: SMs dispatch and combine may occupy (None: every SM of the device); the rest
        stay free for compute running beside them. The same on every rank. Below the
        device's SM count each grid has at most ``num_sms`` blocks, one per SM (the
        block scheduler spreads a grid over free SMs first: two blocks per budgeted SM
        would occupy twice the SMs while a GEMM beside them waits for its next kernel's),
        launched on sm_90+ as thread block clusters of up to 2 (``cluster_size``).
    dispatch_threads: block size of dispatch (a multiple of 32, at most 512).
    dispatch_blocks_per_sm: dispatch blocks per SM, capped at the blocks of the kernel that
        fit on one SM; under a budget, one block of that many times ``dispatch_threads``
        (up to the kernel's limit) per SM instead.
    combine_threads: block size of combine (a multiple of 32, at most 512; fewer where a
        block's shared memory cannot hold that many threads' rings). None: 512.
    combine_ring: how the combine pulls rows. False: into registers (the lowest latency);
        True: through a shared-memory ring per warp (cp.async), which keeps more bytes in
        flight per SM than registers can hold; None: the ring under an SM budget
        (``num_sms`` below the device's SMs), registers otherwise. Measured on 2 x H200 at
        4096 tokens (bench/results/moe-*T061922): at 16 SMs the pair took 378 us with the
        ring, 461 without; with every SM the same, and 0.4-1 us more at 1-1024 tokens.
    pdl: launch with programmatic dependent launch.
    """

    num_sms: int | None = None
    dispatch_threads: int = 512
    dispatch_blocks_per_sm: int = 2
    combine_threads: int | None = None
    combine_ring: bool | None = None
    pdl: bool = True

    def __post_init__(self):
        if self.num_sms is not None:
            int_at_least("MoeAlltoAllConfig.num_sms", self.num_sms)
        for name in ("dispatch_threads", "combine_threads"):
            if name == "combine_threads" and self.combine_threads is None:
                continue  # chosen with the path
            n = int_at_least(f"MoeAlltoAllConfig.{name}", getattr(self, name), 32)
            if n % 32 or n > 512:
                raise ValueError(f"MoeAlltoAllConfig.{name}={n}: a multiple of 32, at most 512")
        int_at_least("MoeAlltoAllConfig.dispatch_blocks_per_sm", self.dispatch_blocks_per_sm)


# ---------------------------------------------------------------------------- fp8
_SCALE_FORMATS = {"fp32": 0, "ue8m0": 1}


@dataclass(frozen=True)
class Fp8Dispatch:
    """Option of ``MoeAlltoAll.dispatch(..., quantize=...)`` and of the workspace sizing:
    quantize input payload ``payload_index`` (bf16 ``[T, H]``, ``H % 128 == 0``) to FP8
    e4m3 inside the dispatch kernel, with one ``scale_format`` scale (``"fp32"`` or
    ``"ue8m0"``) per ``group_size`` = 128 elements. Formats: see the module doc."""

    payload_index: int = 0
    scale_format: str = "fp32"
    group_size: int = FP8_GROUP_SIZE

    def __post_init__(self):
        int_at_least("Fp8Dispatch.payload_index", self.payload_index, 0)
        if self.scale_format not in _SCALE_FORMATS:
            raise ValueError(f"Fp8Dispatch.scale_format={self.scale_format!r}, expected one of "
                             f"{sorted(_SCALE_FORMATS)}")
        if int_at_least("Fp8Dispatch.group_size", self.group_size) != FP8_GROUP_SIZE:
            raise ValueError(f"Fp8Dispatch.group_size={self.group_size}: only "
                             f"{FP8_GROUP_SIZE} is supported")

    @property
    def scale_dtype(self) -> np.dtype:
        """float32 (``"fp32"``) or int32 (``"ue8m0"``: four exponent bytes per element)."""
        return np.dtype(np.float32 if self.scale_format == "fp32" else np.int32)

    def scale_width(self, hidden_size: int, name: str = "hidden_size") -> int:
        """Scale elements per token for ``hidden_size`` elements (ValueError unless it is a
        positive multiple of 128; ``name`` names the argument)."""
        hidden = int_at_least(name, hidden_size)
        if hidden % self.group_size:
            raise ValueError(f"{name}: {hidden} elements per token is not a multiple of "
                             f"the fp8 group_size={self.group_size}")
        groups = hidden // self.group_size
        return groups if self.scale_format == "fp32" else -(-groups // 4)

    def bytes_per_token(self, hidden_size: int) -> int:
        """Bytes a token's quantized payload takes in the workspace: codes + scales."""
        return int(hidden_size) + 4 * self.scale_width(hidden_size)


class Fp8Rows(NamedTuple):
    """What an fp8-dispatched payload arrives as (workspace views, valid until the next
    dispatch): ``codes`` uint8 e4m3 ``[ep_size, runtime_max, H]`` and ``scales``
    ``[ep_size, runtime_max, Fp8Dispatch.scale_width(H)]`` of ``scale_dtype``."""

    codes: cupy.ndarray
    scales: cupy.ndarray


# ---------------------------------------------------------------------------- sizing
@dataclass(frozen=True)
class DispatchPlan:
    """Where one dispatch's receive tensors and the combine region sit (byte offsets).

    ``recv_off[p]``: start of payload p's ``[ep_size, runtime_max, row_bytes[p]]`` tensor;
    ``combine_off``: start of the combine region, right after the receive tensors.
    """

    ep_size: int
    runtime_max: int
    row_bytes: tuple
    recv_off: tuple
    combine_off: int

    def combine_end(self, row_bytes: int) -> int:
        """First byte past a combine region of ``row_bytes`` per token."""
        return self.combine_off + self.ep_size * self.runtime_max * row_bytes


def plan_dispatch(ep_size: int, runtime_max: int, row_bytes: Sequence[int]) -> DispatchPlan:
    """Lay out the receive tensors of payloads with ``row_bytes`` bytes per token.

    Raises ValueError when a row is empty or not a multiple of 4 bytes, or there are
    more than ``MAX_PAYLOADS`` payloads.
    """
    if not 1 <= len(row_bytes) <= MAX_PAYLOADS:
        raise ValueError(f"input_payloads: {len(row_bytes)} payloads, expected 1 to {MAX_PAYLOADS}")
    offs, off = [], HEADER_BYTES
    for i, rb in enumerate(row_bytes):
        if rb <= 0 or rb % 4:
            raise ValueError(
                f"input_payloads[{i}]: {rb} bytes per token; each payload's bytes per token "
                "must be a positive multiple of 4 (16 for the vector fast path)")
        offs.append(off)
        off += _align(ep_size * runtime_max * rb)
    return DispatchPlan(ep_size, runtime_max, tuple(int(r) for r in row_bytes), tuple(offs), off)


def moe_a2a_get_workspace_size_per_rank(ep_size: int, max_num_tokens: int,
                                        dispatch_bytes_per_token: int,
                                        combine_bytes_per_token: int,
                                        num_payloads: int = MAX_PAYLOADS) -> int:
    """Workspace bytes per rank for dispatches of ``dispatch_bytes_per_token`` (all
    payloads together) over up to ``num_payloads`` payloads and combines of
    ``combine_bytes_per_token``, at up to ``max_num_tokens`` tokens per rank."""
    ep_size = int_at_least("ep_size", ep_size)
    max_num_tokens = int_at_least("max_num_tokens", max_num_tokens)
    dispatch = int_at_least("dispatch_bytes_per_token", dispatch_bytes_per_token)
    combine = int_at_least("combine_bytes_per_token", combine_bytes_per_token)
    num_payloads = int_at_least("num_payloads", num_payloads)
    rows = ep_size * max_num_tokens
    return _align(HEADER_BYTES + num_payloads * REGION_ALIGN + rows * (dispatch + combine))


def moe_a2a_sanitize_expert_ids(expert_ids, recv_counts, ep_rank: int, experts_per_rank: int,
                                invalid_expert_id: int, stream=None):
    """In place on a received id tensor ``expert_ids`` int32 ``[ep_size, runtime_max, ...]``:
    ids not owned by ``ep_rank`` (outside ``[ep_rank*experts_per_rank,
    (ep_rank+1)*experts_per_rank)``) and every id of the padding rows (index >=
    ``recv_counts[s]`` in block s; ``recv_counts`` int32 ``[ep_size]`` on the device)
    become ``invalid_expert_id``. Returns ``expert_ids`` (as a cupy array)."""
    ids = as_array(expert_ids, "expert_ids", dtype=np.int32, stream=stream, writable=True)
    if ids.ndim < 2:
        raise ValueError(f"expert_ids: expected [ep_size, runtime_max, ...], got {ids.shape}")
    ep, rmax = ids.shape[0], ids.shape[1]
    counts = as_array(recv_counts, "recv_counts", dtype=np.int32, shape=(ep,), stream=stream)
    invalid = int(invalid_expert_id)
    if not -(1 << 31) <= invalid < (1 << 31):
        raise ValueError(f"invalid_expert_id {invalid} does not fit int32")
    epr = int_at_least("experts_per_rank", experts_per_rank)
    lo = int_at_least("ep_rank", ep_rank, 0) * epr
    if lo + epr >= 1 << 31:
        raise ValueError(f"ep_rank={ep_rank} x experts_per_rank={epr}: expert ids past int32")
    if ids.size:
        launcher = Launcher(get_kernel(_SOURCE, "moe_a2a_sanitize"), SanitizeArgs)
        a = launcher.args
        a.ids, a.counts, a.ep_size, a.runtime_max = ids.data.ptr, counts.data.ptr, ep, rmax
        a.width, a.lo, a.hi, a.invalid = math.prod(ids.shape[2:]), lo, lo + epr, invalid
        launcher(max(1, min(1024, -(-ids.size // 256))), 256, stream_handle(stream))
    return ids


# ---------------------------------------------------------------------------- routing
_ROUTE_NONE, _ROUTE_RECORD, _ROUTE_REPLAY = 0, 1, 2  # DispatchArgs.route_mode (moe_a2a.cu)


class RoutingHandle:
    """The routing layout of one dispatch, kept for the next dispatches of the same
    ``token_selected_experts`` (the layers of one decode step, a replayed step).

    It holds, on the device, each token's row on every target rank (``[T, ep]`` int32) and
    the rows sent to each target (``[ep]``); a dispatch given a recorded handle skips its
    layout pass (the count over all tokens and the slot assignment) and reads them instead.
    Made by ``MoeAlltoAll.dispatch(..., return_handle=True)``, or empty by
    ``MoeAlltoAll.routing_handle()`` (no allocation at dispatch time: the way to record
    inside a CUDA graph capture) and recorded by the first dispatch given it.

    The caller promises that the ids are the same as at recording (``MOECOMM_DEBUG=1``
    compares them, synchronising); results are then identical to a dispatch without it.
    ``num_tokens`` is the T it was recorded with (None until then).
    """

    __slots__ = ("_owner", "_slot", "_total", "num_tokens", "_ids")

    def __init__(self, owner: "MoeAlltoAll"):
        self._owner = owner
        # Written in full by the recording dispatch before any replay reads them.
        self._slot = cupy.empty(max(1, owner.max_num_tokens * owner.ep_size), np.int32)
        self._total = cupy.empty(owner.ep_size, np.int32)
        self.num_tokens: int | None = None
        self._ids = None  # MOECOMM_DEBUG: the ids it was recorded with

    @property
    def recorded(self) -> bool:
        return self.num_tokens is not None

    @property
    def rows_per_rank(self) -> cupy.ndarray:
        """int32 ``[ep]`` on the device: rows this rank sends to each target."""
        return self._total

    def __repr__(self) -> str:
        return f"RoutingHandle(num_tokens={self.num_tokens})"


# ---------------------------------------------------------------------------- the op
class _Prepared(NamedTuple):
    """A dispatch or combine launch prepared for one layout: its launcher (argument struct
    filled but for the per-call pointers), grid, block, and the views it returns."""

    launcher: Launcher
    grid: int
    block: int
    plan: DispatchPlan | None
    views: list | None
    combine_views: dict | None = None  # (runtime_max, hidden, dtype) -> combine region view
    shared_mem: int = 0  # dynamic shared memory of the launch, bytes
    cluster: int = 1  # blocks per thread block cluster (MoeAlltoAll.cluster_size)


class MoeAlltoAll(Op):
    """MoE all-to-all with a static receive layout (see the module doc for the rules).

    Args:
        group: the ep group: a ``ProcessGroup`` whose ranks are all on one node (its
            local ranks are the ep ranks), a ``Mapping`` (its moe_ep group is split off
            the default group; collective over that group), or None (default group).
        max_num_tokens: most tokens any rank dispatches in one call.
        top_k: experts per token (columns of ``token_selected_experts``).
        num_experts: total experts, a multiple of the ep size.
        workspace_size_per_rank: workspace bytes; default sized from ``hidden_size`` by
            ``get_moe_workspace_size_per_rank``.
        hidden_size: used only when ``workspace_size_per_rank`` is None.
        timeout_s: bound of every wait for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s;
            0: forever).
        config: ``MoeAlltoAllConfig`` (SM budget, block sizes, PDL).

    Collective over the ep group, like ``close()``. Also a context manager.
    """

    name = "MoeAlltoAll"

    def __init__(self, group, max_num_tokens: int, top_k: int, num_experts: int,
                 workspace_size_per_rank: int | None = None, hidden_size: int | None = None,
                 *, timeout_s: float | None = None, config: MoeAlltoAllConfig | None = None):
        self.max_num_tokens = int_at_least("max_num_tokens", max_num_tokens)
        self.top_k = int_at_least("top_k", top_k)
        self.num_experts = int_at_least("num_experts", num_experts)
        self.config = options(MoeAlltoAllConfig, config)
        self._timeout_ns = timeout_ns(timeout_s)
        if workspace_size_per_rank is None and hidden_size is None:
            raise ValueError("pass workspace_size_per_rank or hidden_size")
        group, owned = ep_group(group)
        self._ws = error = None
        try:
            if group.spans_nodes:
                raise ValueError(
                    f"MoeAlltoAll: the ep group spans {group.num_nodes} nodes; CUDA IPC "
                    "reaches one node only (use an ep group inside a node)")
            ep = group.local_size
            if ep > MAX_RANKS:
                raise ValueError(f"ep size {ep} exceeds the maximum {MAX_RANKS}")
            if self.num_experts % ep:
                raise ValueError(f"num_experts={self.num_experts} is not a multiple of the ep "
                                 f"size {ep}")
            if workspace_size_per_rank is None:
                size = self.get_moe_workspace_size_per_rank(
                    ep, self.top_k, self.max_num_tokens, int_at_least("hidden_size", hidden_size))
            else:
                size = int_at_least("workspace_size_per_rank", workspace_size_per_rank,
                                    HEADER_BYTES + REGION_ALIGN)
            ranks = group.allgather(group.rank)
            sms = group_sms(group)
            # the combine's path and block size set its grid, which must agree on every rank
            ring = (self.config.combine_ring if self.config.combine_ring is not None
                    else min(sms, self.config.num_sms or sms) < sms)
            combine_threads = min(group.local_comm.allgather(
                _combine_threads(self.config.combine_threads, ring)))
            self._ws = SymmetricBuffer(group, size)
            with group.all_or_none("MoeAlltoAll"):  # local steps
                self._group, self._owns_group = group, owned
                self.ep_rank, self.ep_size = group.local_rank, ep
                self.experts_per_rank = self.num_experts // ep
                self.workspace_size_per_rank = size
                self.num_sms = min(sms, self.config.num_sms or sms)
                self.budgeted = self.num_sms < sms  # one block per SM (MoeAlltoAllConfig)
                self._state = cupy.zeros(_STATE_WORDS, np.uint32)
                self._send_slot = cupy.full(max(1, self.max_num_tokens * ep), -1, np.int32)
                self._recv_counts = cupy.zeros(ep, np.int32)
                # the dispatch blocks' tagged counts, [grid, ep] (moe_a2a.cu, step 1)
                self._chunk_counts = cupy.zeros(
                    self.num_sms * self.config.dispatch_blocks_per_sm * ep, np.uint64)
                error = ErrorWord(ranks)
                self._kernel_workspace = dict(state=self._state.data.ptr, error_word=error.ptr,
                                              timeout_ns=self._timeout_ns, rank=self.ep_rank,
                                              ep_size=ep)
                self._dispatch_kernels = {False: get_kernel(_SOURCE, "moe_a2a_dispatch"),
                                          True: get_kernel(_SOURCE, "moe_a2a_dispatch_fp8")}
                path = "moe_a2a_combine_ring_" if ring else "moe_a2a_combine_"
                self._combine_kernels = {dt: get_kernel(_SOURCE, path + suffix)
                                         for dt, suffix in _COMBINE_KERNELS.items()}
                self._combine_ring, self._combine_threads = bool(ring), combine_threads
                self._combine_smem = (combine_threads * _COMBINE_RING_BYTES_PER_THREAD
                                      if ring else 0)
                for k in self._combine_kernels.values():
                    if k.max_dynamic_shared_size_bytes < self._combine_smem:
                        k.max_dynamic_shared_size_bytes = self._combine_smem
                self._combine_blocks_per_sm = min(
                    device_facts().blocks_per_sm(k, combine_threads, self._combine_smem)
                    for k in self._combine_kernels.values())
                self._prepared_dispatch: dict = {}
                self._prepared_combine: dict = {}
                self._dispatched: _Prepared | None = None
                self._num_tokens = 0
                cupy.cuda.runtime.deviceSynchronize()  # zeroed state visible to any stream
        except BaseException:  # collective, as construction is
            if error is not None:
                error.close()
            if self._ws is not None:
                self._ws.close()
            if owned:
                group.close()
            raise
        self._open(error)

    def _new_launcher(self, kernel, args_type) -> Launcher:
        launcher = Launcher(kernel, args_type, pdl=self.config.pdl)
        ws = launcher.args.ws
        for name, value in self._kernel_workspace.items():
            setattr(ws, name, value)
        ws.peers[:self.ep_size] = self._ws.ptrs
        return launcher

    # -- sizing -----------------------------------------------------------------------
    @staticmethod
    def get_moe_workspace_size_per_rank(ep_size: int, top_k: int, max_num_tokens: int,
                                        hidden_size: int,
                                        extra_payload_bytes_per_token: int = 0, *,
                                        quantize: Fp8Dispatch | None = None) -> int:
        """Workspace bytes per rank for bf16/fp16 hidden states of ``hidden_size`` plus
        int32 expert ids and fp32 weights (``top_k`` each) per token, and
        ``extra_payload_bytes_per_token`` more (e.g. fp8 scales); the combine region holds
        16-bit rows of ``hidden_size``. With ``quantize`` the hidden states are dispatched
        as fp8 codes + scales (``quantize.bytes_per_token(hidden_size)`` instead of
        ``2 * hidden_size``; such a workspace may be too small for bf16 dispatches). For
        other mixes use ``moe_a2a_get_workspace_size_per_rank``."""
        top_k = int_at_least("top_k", top_k)
        hidden_size = int_at_least("hidden_size", hidden_size)
        extra = int_at_least("extra_payload_bytes_per_token", extra_payload_bytes_per_token, 0)
        if quantize is None:
            hidden_bytes = 2 * hidden_size
        elif isinstance(quantize, Fp8Dispatch):
            hidden_bytes = quantize.bytes_per_token(hidden_size)
        else:
            raise TypeError(f"quantize: expected an Fp8Dispatch or None, got "
                            f"{type(quantize).__name__}")
        return moe_a2a_get_workspace_size_per_rank(
            ep_size, max_num_tokens, hidden_bytes + 8 * top_k + extra, 2 * hidden_size)

    # -- state ------------------------------------------------------------------------
    @property
    def recv_counts(self) -> cupy.ndarray:
        """int32 ``[ep_size]`` on the device: rows received from each rank by the last
        dispatch (rewritten by the next one)."""
        return self._recv_counts

    def poison(self) -> None:
        """Fill the receive tensors and the combine region (the workspace past its header)
        with 0xA5 bytes and ``recv_counts`` with -7, keeping the counters: tests use it to
        prove that every valid row is written. Synchronizes the device; not collective."""
        self.usable("poison")
        cupy.cuda.runtime.deviceSynchronize()
        self._ws.view(np.uint8, (self._ws.nbytes - HEADER_BYTES,), offset=HEADER_BYTES).fill(0xA5)
        self._recv_counts.fill(-7)
        cupy.cuda.runtime.deviceSynchronize()

    def _runtime_max(self, value) -> int:
        rmax = int_at_least("runtime_max_tokens_per_rank", value)
        if rmax > self.max_num_tokens:
            raise ValueError(f"runtime_max_tokens_per_rank={rmax} exceeds max_num_tokens="
                             f"{self.max_num_tokens}")
        return rmax

    def _require_dispatched(self, op: str) -> _Prepared:
        if self.phase != Phase.DISPATCHED:
            raise RuntimeError(f"MoeAlltoAll.{op} needs a dispatch first (dispatch and combine "
                               "alternate)")
        return self._dispatched

    # -- dispatch ---------------------------------------------------------------------
    def dispatch(self, token_selected_experts, input_payloads, runtime_max_tokens_per_rank: int,
                 invalid_token_expert_id: int | None = None,
                 expert_id_payload_index: int | None = None, stream=None, *,
                 quantize: Fp8Dispatch | None = None, handle: RoutingHandle | None = None,
                 return_handle: bool = False, previous_event=None,
                 async_op: bool = False) -> list:
        """Send each token's payload rows to the ranks owning its experts.

        Args:
            token_selected_experts: int32 ``[T, top_k]``, ``T <= runtime_max``.
            input_payloads: 1 to 8 arrays ``[T, ...]`` of any dtype (see the alignment
                rule in the module doc).
            runtime_max_tokens_per_rank: rows per source block of the receive tensors;
                the same on every rank, ``>= T`` of every rank, ``<= max_num_tokens``.
            invalid_token_expert_id: if given, the received ids of payload
                ``expert_id_payload_index`` (int32) that this rank does not own, and all
                ids of padding rows, read as this value.
            stream: the stream to run on (default: CuPy's current stream).
            quantize: an ``Fp8Dispatch``: send payload ``quantize.payload_index`` (bf16
                ``[T, H]``) as fp8 codes + scales, quantized once per token inside the
                kernel (see the module doc); at most 7 payloads then.
            handle: a ``RoutingHandle`` of this object: recorded, its layout is replayed
                (``token_selected_experts`` must hold the ids it was recorded with, T
                equal); empty, this dispatch records into it.
            return_handle: record into a new ``RoutingHandle`` and return it too.
            previous_event, async_op: overlap options (``moecomm.events``).

        Returns one workspace view ``[ep_size, runtime_max, *payload.shape[1:]]`` per
        payload (for the quantized payload an ``Fp8Rows(codes, scales)``);
        ``recv_counts`` holds the valid rows per source block. With ``return_handle``
        ``(views, RoutingHandle)``; with ``async_op`` that result and a ``CommHandle``.
        """
        self.usable("dispatch")
        if self.phase == Phase.DISPATCHED:
            raise RuntimeError("MoeAlltoAll.dispatch called twice without combine (dispatch "
                               "and combine alternate)")
        rmax = self._runtime_max(runtime_max_tokens_per_rank)
        stream_ptr = stream_handle(stream)
        ids = import_array(token_selected_experts, "token_selected_experts", dtype=np.int32,
                           ndim=2, device=self.device_id, stream=stream_ptr)
        T, k = ids.shape
        if k != self.top_k:
            raise ValueError(f"token_selected_experts: {k} experts per token, the workspace "
                             f"was made for top_k={self.top_k}")
        if T > self.max_num_tokens:
            raise ValueError(f"token_selected_experts: {T} tokens exceed max_num_tokens="
                             f"{self.max_num_tokens}")
        if T > rmax:
            raise ValueError(f"token_selected_experts: {T} tokens exceed "
                             f"runtime_max_tokens_per_rank={rmax}")
        payloads = self._payloads(input_payloads, T, stream_ptr)
        prepared = self._prepared(rmax, payloads, invalid_token_expert_id,
                                  expert_id_payload_index, quantize)
        route = self._route(handle, return_handle, token_selected_experts, T, stream)
        if previous_event is not None or async_op or _group.DEBUG:
            async_op = events.issue(stream_ptr, previous_event, async_op, owner=self,
                                    op="MoeAlltoAll.dispatch")
        self._send(prepared, ids, payloads, stream_ptr, route)
        result = list(prepared.views)
        if return_handle:
            result = (result, route)
        if not async_op:
            return result
        return events.finish(result, stream_ptr, True, owner=self, op="MoeAlltoAll.dispatch",
                             keep=(token_selected_experts, input_payloads))

    def _prepared(self, rmax: int, payloads: list, invalid_token_expert_id: int | None = None,
                  expert_id_payload_index: int | None = None,
                  quantize: Fp8Dispatch | None = None) -> _Prepared:
        """The launch of a dispatch of these payloads' dtypes and row shapes, prepared
        once (checks the options; raises before anything is launched)."""
        key = (rmax, invalid_token_expert_id, expert_id_payload_index, quantize,
               *((a.dtype, a.shape[1:]) for a in payloads))
        prepared = self._prepared_dispatch.get(key)
        if prepared is None:
            prepared = self._prepare_dispatch(rmax, payloads, invalid_token_expert_id,
                                              expert_id_payload_index, quantize)
            if len(self._prepared_dispatch) >= _PLAN_CACHE:
                self._prepared_dispatch.clear()
            self._prepared_dispatch[key] = prepared
        if quantize is not None:  # per call: the cached layout holds no address
            i = quantize.payload_index
            require_aligned(f"input_payloads[{i}] (fp8 dispatch)", payloads[i].ptr)
        return prepared

    def _send(self, prepared: _Prepared, ids: DeviceArray, payloads: list, stream_ptr: int,
              route: RoutingHandle | None = None) -> None:
        """Launch ``prepared`` on checked arrays: ``dispatch`` after its checks, or a layer
        on this exchange that checked its own arrays (``prepared.views`` are then the
        receive tensors)."""
        T = ids.shape[0]
        a = prepared.launcher.args
        a.experts, a.num_tokens = ids.ptr, T
        for i, x in enumerate(payloads):
            a.src[i] = x.ptr
        if route is None:
            a.route_mode = _ROUTE_NONE
        else:
            a.route_slot, a.route_total = route._slot.data.ptr, route._total.data.ptr
            a.route_mode = _ROUTE_REPLAY if route.recorded else _ROUTE_RECORD
        prepared.launcher(prepared.grid, prepared.block, stream_ptr, prepared.shared_mem,
                          prepared.cluster)
        if route is not None:  # recorded once its launch is in
            route.num_tokens = T
        self.phase, self._dispatched, self._num_tokens = Phase.DISPATCHED, prepared, T

    def routing_handle(self) -> RoutingHandle:
        """An empty ``RoutingHandle`` for this object (allocates; not inside a capture):
        the first dispatch given it records its layout, the following ones replay it."""
        self.usable("routing_handle")
        return RoutingHandle(self)

    def _route(self, handle, return_handle, ids_obj, T: int, stream) -> RoutingHandle | None:
        """The routing handle of a dispatch (validated), or None."""
        if bool_option("return_handle", return_handle):
            if handle is not None:
                raise ValueError("pass handle= (to replay or record into it) or "
                                 "return_handle=True (a new handle), not both")
            handle = RoutingHandle(self)
        if handle is None:
            return None
        if not isinstance(handle, RoutingHandle):
            raise TypeError(f"handle: expected a RoutingHandle, got {type(handle).__name__}")
        if handle._owner is not self:
            raise ValueError("handle: a RoutingHandle of another MoeAlltoAll")
        if handle.recorded and handle.num_tokens != T:
            raise ValueError(f"handle: recorded for {handle.num_tokens} tokens, "
                             f"token_selected_experts has {T}")
        if _group.DEBUG:
            ids = as_array(ids_obj, "token_selected_experts", stream=stream)
            with as_stream(stream):
                if not handle.recorded:
                    handle._ids = ids.copy()
                elif handle._ids is not None and not bool((handle._ids == ids).all()):
                    raise ValueError("handle: token_selected_experts differ from the ids the "
                                     "RoutingHandle was recorded with (MOECOMM_DEBUG)")
        return handle

    def max_blocks(self, per_sm: int) -> int:
        """The most blocks a grid of this layer may have: ``per_sm`` per SM with every SM,
        one per SM under a budget (``MoeAlltoAllConfig.num_sms``)."""
        return grid_limit(self.num_sms, per_sm, self.budgeted)

    def cluster_size(self, grid: int) -> int:
        """Blocks per thread block cluster of a ``grid``-block launch of this layer: under a
        budget on sm_90+, the largest size up to _BUDGET_CLUSTER that divides ``grid`` (a
        cluster's blocks run on one GPC: measured faster); else 1."""
        if not self.budgeted or device_facts(self.device_id).arch < (9, 0):
            return 1
        return max(c for c in range(1, _BUDGET_CLUSTER + 1) if grid % c == 0)

    def dispatch_plan(self, rmax: int, row_bytes: Sequence[int]) -> DispatchPlan:
        """The receive layout of payloads of ``row_bytes`` bytes per token (the FP8 scales
        as their own last row) at ``rmax`` tokens per rank; raises the ValueError a
        dispatch would (rows, payload count, workspace size), launching nothing."""
        plan = plan_dispatch(self.ep_size, rmax, row_bytes)
        if plan.combine_off > self._ws.nbytes:
            raise ValueError(
                f"input_payloads: {plan.combine_off} workspace bytes needed at "
                f"runtime_max_tokens_per_rank={rmax}, the workspace has {self._ws.nbytes} "
                "(size it with get_moe_workspace_size_per_rank)")
        return plan

    def _prepare_dispatch(self, rmax: int, payloads, invalid, id_index, quantize) -> _Prepared:
        """Validate the options of a new payload layout; its launcher, grid and views."""
        id_payload, invalid = self._sanitize_option(invalid, id_index, payloads)
        rows = [_row_bytes(x) for x in payloads]
        quant = self._quant_option(quantize, payloads)  # (index, hidden) or None
        if quant is not None:
            rows[quant[0]] = quant[1]  # codes; the scales go last
            rows.append(quantize.bytes_per_token(quant[1]) - quant[1])
        plan = self.dispatch_plan(rmax, rows)
        kernel = self._dispatch_kernels[quant is not None]
        launcher = self._new_launcher(kernel, DispatchArgs)
        a = launcher.args
        a.send_slot, a.recv_counts = self._send_slot.data.ptr, self._recv_counts.data.ptr
        a.chunk_counts = self._chunk_counts.data.ptr
        a.top_k, a.num_experts, a.experts_per_rank = self.top_k, self.num_experts, self.experts_per_rank
        a.runtime_max, a.num_payloads = rmax, len(payloads)
        a.id_payload, a.invalid_id, a.quant_payload = id_payload, invalid, -1
        for i in range(len(payloads)):
            a.row_bytes[i], a.recv_off[i] = plan.row_bytes[i], plan.recv_off[i]
        views = [self._ws.view(x.dtype, (self.ep_size, rmax, *x.shape[1:]), offset=off)
                 for x, off in zip(payloads, plan.recv_off)]
        if quant is not None:
            i, hidden = quant
            a.quant_payload, a.scale_format = i, _SCALE_FORMATS[quantize.scale_format]
            a.scale_row_bytes, a.scale_off = plan.row_bytes[-1], plan.recv_off[-1]
            views[i] = Fp8Rows(
                self._ws.view(np.uint8, (self.ep_size, rmax, hidden), offset=plan.recv_off[i]),
                self._ws.view(quantize.scale_dtype,
                              (self.ep_size, rmax, quantize.scale_width(hidden)),
                              offset=plan.recv_off[-1]))
        smem = A2A_DISPATCH_SUB * self.ep_size * 4  # a sub-chunk's slots, int32 [sub, ep]
        threads = self.config.dispatch_threads
        per_sm = min(self.config.dispatch_blocks_per_sm,
                     device_facts().blocks_per_sm(kernel, threads, smem))
        if self.budgeted:  # one block per SM holds what per_sm blocks would
            threads = min(threads * per_sm, kernel.max_threads_per_block)
        wanted = max(min(rmax, _DISPATCH_MIN_BLOCKS), -(-rmax // _DISPATCH_TOKENS_PER_BLOCK))
        grid = max(1, min(wanted, self.max_blocks(per_sm)))
        return _Prepared(launcher, grid, threads, plan, views, {}, shared_mem=smem,
                         cluster=self.cluster_size(grid))

    def _payloads(self, input_payloads, T: int, stream: int) -> list:
        if not isinstance(input_payloads, (list, tuple)):
            raise TypeError(f"input_payloads: expected a list of arrays, got "
                            f"{type(input_payloads).__name__}")
        if not 1 <= len(input_payloads) <= MAX_PAYLOADS:
            raise ValueError(f"input_payloads: {len(input_payloads)} payloads, expected 1 to "
                             f"{MAX_PAYLOADS}")
        arrays = []
        for i, x in enumerate(input_payloads):
            a = import_array(x, f"input_payloads[{i}]", device=self.device_id, stream=stream)
            if a.ndim < 1 or a.shape[0] != T:
                raise ValueError(f"input_payloads[{i}]: shape {tuple(a.shape)}, expected "
                                 f"[T={T}, ...] like token_selected_experts")
            require_aligned(f"input_payloads[{i}]", a.ptr, 4)
            arrays.append(a)
        return arrays

    @staticmethod
    def _sanitize_option(invalid, index, payloads) -> tuple[int, int]:
        """(payload index to sanitise or -1, invalid id)."""
        if index is not None and not 0 <= int(index) < len(payloads):
            raise ValueError(f"expert_id_payload_index={index} is not in [0, {len(payloads)})")
        if invalid is None:
            return -1, 0
        if index is None:
            raise ValueError("invalid_token_expert_id needs expert_id_payload_index (the payload "
                             "holding the expert ids)")
        index, invalid = int(index), int(invalid)
        if payloads[index].dtype != np.int32:
            raise TypeError(f"input_payloads[{index}] (expert ids): dtype "
                            f"{payloads[index].dtype.name}, expected int32")
        if not -(1 << 31) <= invalid < (1 << 31):
            raise ValueError(f"invalid_token_expert_id={invalid} does not fit int32")
        return index, invalid

    @staticmethod
    def _quant_option(quantize, payloads) -> tuple[int, int] | None:
        """(index of the payload to quantize, its hidden size), or None."""
        if quantize is None:
            return None
        if not isinstance(quantize, Fp8Dispatch):
            raise TypeError(f"quantize: expected an Fp8Dispatch or None, got "
                            f"{type(quantize).__name__}")
        if len(payloads) >= MAX_PAYLOADS:
            raise ValueError(f"input_payloads: {len(payloads)} payloads; with quantize at most "
                             f"{MAX_PAYLOADS - 1} (the fp8 scales take a receive tensor)")
        i = quantize.payload_index
        if i >= len(payloads):
            raise ValueError(f"quantize.payload_index={i} is not in [0, {len(payloads)})")
        a, name = payloads[i], f"input_payloads[{i}] (fp8 dispatch)"
        if bfloat16 is None or a.dtype != bfloat16:
            raise TypeError(f"{name}: dtype {a.dtype.name} is not supported, expected bfloat16")
        if a.ndim != 2:
            raise ValueError(f"{name}: shape {tuple(a.shape)}, expected [T, hidden]")
        quantize.scale_width(a.shape[1], name)
        return i, int(a.shape[1])

    def sanitize_expert_ids(self, expert_ids, invalid_expert_id: int, stream=None):
        """``moe_a2a_sanitize_expert_ids`` for this rank and the last dispatch's counts
        (in place on a received id tensor ``[ep_size, runtime_max, ...]`` int32)."""
        self.usable("sanitize_expert_ids")
        ids = as_array(expert_ids, "expert_ids", dtype=np.int32, stream=stream, writable=True)
        if ids.ndim < 2 or ids.shape[0] != self.ep_size:
            raise ValueError(f"expert_ids: shape {tuple(ids.shape)}, expected "
                             f"[ep_size={self.ep_size}, runtime_max, ...]")
        return moe_a2a_sanitize_expert_ids(ids, self._recv_counts, self.ep_rank,
                                           self.experts_per_rank, invalid_expert_id, stream)

    # -- combine ----------------------------------------------------------------------
    def get_combine_payload_tensor_in_workspace(self, runtime_max_tokens_per_rank: int,
                                                hidden_size: int, dtype) -> cupy.ndarray:
        """The combine region as ``[ep_size, runtime_max, hidden_size]`` of ``dtype`` (bf16,
        fp16, fp32): write the expert outputs here and call ``combine(...,
        payload_in_workspace=True)`` to skip the staging copy. Only between a dispatch and
        its combine; valid until the next dispatch (dispatches of the same layout return
        the same array object)."""
        self.usable("get_combine_payload_tensor_in_workspace")
        prepared = self._require_dispatched("get_combine_payload_tensor_in_workspace")
        key = (type(runtime_max_tokens_per_rank), runtime_max_tokens_per_rank,
               type(hidden_size), hidden_size, dtype)
        try:  # the same view object per layout and arguments: no CuPy array per call
            view = prepared.combine_views.get(key)
        except TypeError:  # unhashable arguments: the checks below name them
            view = None
        if view is None:
            view = self._combine_view(prepared.plan, runtime_max_tokens_per_rank, hidden_size,
                                      dtype)
            if len(prepared.combine_views) < _PLAN_CACHE:
                prepared.combine_views[key] = view
        return view

    def _combine_view(self, plan: DispatchPlan, runtime_max_tokens_per_rank, hidden_size,
                      dtype) -> cupy.ndarray:
        self._same_runtime_max(runtime_max_tokens_per_rank, plan)
        dtype = np.dtype(dtype)
        if dtype not in _COMBINE_KERNELS:
            raise TypeError(f"dtype {dtype.name} is not supported, expected bfloat16, float16 "
                            "or float32")
        hidden = int_at_least("hidden_size", hidden_size)
        self._check_combine_row(hidden * dtype.itemsize, plan, "hidden_size")
        return self._ws.view(dtype, (self.ep_size, plan.runtime_max, hidden),
                             offset=plan.combine_off)

    def combine(self, payload, runtime_max_tokens_per_rank: int, payload_in_workspace: bool = False,
                stream=None, *, out=None, previous_event=None,
                async_op: bool = False) -> cupy.ndarray:
        """Sum, for each local token, the rows its target ranks produced.

        Args:
            payload: bf16/fp16/fp32 ``[ep_size, runtime_max, H]``: row ``(s, i)`` is this
                rank's result for the i-th token received from rank s (rows past
                ``recv_counts[s]`` are ignored).
            runtime_max_tokens_per_rank: as passed to the dispatch.
            payload_in_workspace: True when ``payload`` is the array of
                ``get_combine_payload_tensor_in_workspace`` (no staging copy). A receive
                tensor of the dispatch with rows of the payload's size (e.g. the hidden
                states, transformed in place) is read in place too; anything else is first
                copied into the combine region. Every rank must pass the same kind of
                payload (checked with ``MOECOMM_DEBUG=1``).
            out: optional ``[T, H]`` array of the payload's dtype (T of the dispatch);
                default a new array. Pass it when capturing a CUDA graph.
            previous_event, async_op: overlap options (``moecomm.events``).

        Returns ``[T, H]`` (``out`` as passed, or a new ``cupy.ndarray``): per token, the fp32
        sum over its distinct target ranks in rank order, rounded once to the payload dtype;
        +0 for a token routed nowhere. With ``async_op``, ``(that, CommHandle)``.
        """
        self.usable("combine")
        plan = self._require_dispatched("combine").plan
        rmax = self._same_runtime_max(runtime_max_tokens_per_rank, plan)
        handle = stream_handle(stream)
        x = import_array(payload, "payload", dtype=_COMBINE_DTYPES, ndim=3, device=self.device_id,
                         stream=handle)
        if x.shape[:2] != (self.ep_size, rmax):
            raise ValueError(f"payload: shape {tuple(x.shape)}, expected [ep_size={self.ep_size}, "
                             f"runtime_max_tokens_per_rank={rmax}, hidden]")
        row = x.shape[2] * x.itemsize
        region = self._ws.ptr + plan.combine_off
        source = self._in_place_source(x.ptr, row, plan)
        stage = source is None
        key = (plan.runtime_max, plan.combine_off, x.dtype, row, source)
        prepared = self._prepared_combine.get(key)
        if prepared is None:
            self._check_combine_row(row, plan, "payload")
            prepared = self._prepare_combine(plan, x.dtype, row, source)
            if len(self._prepared_combine) >= _PLAN_CACHE:
                self._prepared_combine.clear()
            self._prepared_combine[key] = prepared
        if _group.DEBUG:
            self._group.check_uniform("MoeAlltoAll.combine payload (kind, dtype, row bytes)",
                                      (source, x.dtype.name, row))
        if stage:
            if payload_in_workspace:
                raise ValueError("payload_in_workspace=True but payload is not the array of "
                                 "get_combine_payload_tensor_in_workspace")
            require_aligned("payload", x.ptr)
            if overlaps(x.ptr, x.nbytes, region, plan.combine_end(row) - plan.combine_off):
                raise ValueError("payload overlaps the workspace's combine region; pass the "
                                 "array of get_combine_payload_tensor_in_workspace or a "
                                 "separate array")
        T = self._num_tokens
        if out is None:
            out = empty((T, x.shape[2]), x.dtype, handle)
            out_ptr = out.data.ptr
        else:
            out_ptr = import_array(out, "out", dtype=x.dtype, shape=(T, x.shape[2]),
                                   device=self.device_id, stream=handle, writable=True).ptr
            require_aligned("out", out_ptr)
        if previous_event is not None or async_op or _group.DEBUG:
            async_op = events.issue(handle, previous_event, async_op, owner=self,
                                    op="MoeAlltoAll.combine")
        a = prepared.launcher.args
        a.payload, a.out, a.num_tokens = x.ptr, out_ptr, T
        prepared.launcher(prepared.grid, prepared.block, handle, prepared.shared_mem,
                          prepared.cluster)
        self.phase = Phase.IDLE
        if not async_op:
            return out
        return events.finish(out, handle, True, owner=self, op="MoeAlltoAll.combine",
                             keep=(payload, out))

    def combine_launcher(self, kernel, args_type) -> Launcher:
        """A launcher of ``kernel``, whose argument struct has this exchange's
        ``A2aWorkspace`` as field ``ws`` (filled in here), for ``combine_with``."""
        return self._new_launcher(kernel, args_type)

    def combine_with(self, launcher: Launcher, grid: int, block: int, stream: int) -> None:
        """Run ``launcher`` (``combine_launcher``) as the combine of the current dispatch:
        a kernel of another layer that keeps this exchange's combine handshake
        (``kernels_cu/a2a.cuh``: every block signals as it starts and waits for the
        peers' first signals) and reads what it needs itself. ``grid`` must be the same on
        every rank."""
        self.usable("combine")
        self._require_dispatched("combine")
        launcher(grid, block, stream, cluster=self.cluster_size(grid))
        self.phase = Phase.IDLE

    def _in_place_source(self, ptr: int, row: int, plan: DispatchPlan) -> int | None:
        """The workspace offset peers may read the payload at in place: the combine region,
        or a receive tensor of the dispatch with rows of ``row`` bytes (block s of rank t's
        receive tensor is written by rank s's dispatch and read by rank s's combine only,
        so no other rank can overwrite it meanwhile). None: the payload is staged."""
        offset = ptr - self._ws.ptr
        if offset == plan.combine_off:
            return offset
        for off, rb in zip(plan.recv_off, plan.row_bytes):
            if offset == off and rb == row:
                return offset
        return None

    def _prepare_combine(self, plan: DispatchPlan, dtype, row: int,
                         source: int | None) -> _Prepared:
        launcher = self._new_launcher(self._combine_kernels[dtype], CombineArgs)
        a = launcher.args
        a.send_slot, a.recv_counts = self._send_slot.data.ptr, self._recv_counts.data.ptr
        a.region_off = plan.combine_off if source is None else source
        a.row_bytes, a.runtime_max, a.stage = row, plan.runtime_max, int(source is None)
        block = self._combine_threads
        # A warp per piece of A2A_COMBINE_UNITS x 32 columns of a row at most, and the
        # blocks the budget's SMs hold at once (more would only run in turns).
        pieces = plan.runtime_max * -(-(row // 16) // (32 * A2A_COMBINE_UNITS))
        grid = max(1, min(-(-pieces // (block // 32)),
                          self.max_blocks(self._combine_blocks_per_sm)))
        return _Prepared(launcher, grid, block, None, None, shared_mem=self._combine_smem,
                         cluster=self.cluster_size(grid))

    def _same_runtime_max(self, value, plan: DispatchPlan) -> int:
        rmax = int_at_least("runtime_max_tokens_per_rank", value)
        if rmax != plan.runtime_max:
            raise ValueError(f"runtime_max_tokens_per_rank={rmax} differs from the dispatch's "
                             f"{plan.runtime_max}")
        return rmax

    def _check_combine_row(self, row: int, plan: DispatchPlan, name: str) -> None:
        if row % 16:
            raise ValueError(f"{name}: {row} bytes per token; hidden * itemsize must be a "
                             "multiple of 16")
        if plan.combine_end(row) > self._ws.nbytes:
            raise ValueError(
                f"{name}: the combine region needs {plan.combine_end(row)} workspace bytes "
                f"after this dispatch's receive tensors, the workspace has {self._ws.nbytes} "
                "(size it with get_moe_workspace_size_per_rank)")

    # -- lifetime ---------------------------------------------------------------------
    def _release(self) -> None:
        """Wait for the device, free the workspace in order (``SymmetricBuffer.close``)."""
        self._prepared_dispatch.clear()
        self._prepared_combine.clear()
        self._ws.close()
        if self._owns_group:
            self._group.close()

    def __repr__(self) -> str:
        return (f"MoeAlltoAll(ep_rank={getattr(self, 'ep_rank', '?')}/"
                f"{getattr(self, 'ep_size', '?')}, max_num_tokens={self.max_num_tokens}, "
                f"top_k={self.top_k}, num_experts={self.num_experts}, {self.phase.value})")


def _row_bytes(a: cupy.ndarray) -> int:
    return a.itemsize * math.prod(a.shape[1:])

