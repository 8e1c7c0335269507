"""Decode context-parallel attention: the all-to-all of partial outputs and softmax stats
(FlashInfer's ``decode_cp_a2a_*``) and the LSE combine that follows it.

With the KV cache split over a CP group, each rank computes partial attention outputs of
every row (batch x heads) for every rank: ``partial_o [..., cp, D]`` (fp16/bf16,
``D * itemsize`` a multiple of 16) and ``softmax_stats [..., cp, S]`` (fp32, S >= 2 and
even: e.g. the LSE, or max and sum-exp). ``DcpAlltoAll.alltoall`` sends
``partial_o[..., p, :]`` and ``softmax_stats[..., p, :]`` to rank p and returns
``(o_out, stats_out)`` of the same shapes: ``o_out[..., s, :]`` is rank s's slice for this
rank. ``lse_combine`` then merges the cp partials of each row into ``[..., D]`` (and the
row's LSE) by their stats, read as ``constants.StatsFormat`` says: LSE (natural log,
vLLM's and FlashInfer's ``basee``), LSE_BASE2 (FlashInfer MLA's ``base2``) or
MAX_SUMEXP (``stats[..., 0]`` max, ``stats[..., 1]`` sum of exp). The exact arithmetic
is ``moecomm.reference.dcp``.

Design (kernels_cu/dcp.cu): one kernel per exchange, no barrier, graph-capturable. Each
rank pushes every peer's rows over CUDA IPC into that peer's Lamport buffer (three
rotating buffers and a device call counter: the all-reduce's protocol of
``kernels_cu/allreduce.cuh``, reused as is), receivers poll their own buffer until no
word holds the "not yet written" sentinel, and each call clears what its peers wrote two
calls before. A row travels as its partial output followed by its stats padded to a
16-byte vector, so one flag-free message carries both. The exchange is bitwise, except
that -0.0 arrives as +0.0. Outputs may be the inputs (in place). Launched with
programmatic dependent launch (``DcpConfig.pdl``). Waits are bounded: a missing peer
becomes ``PeerTimeoutError`` naming it (``check()``, or the next call).

The workspace is sized for ``max_rows`` rows of ``head_dim`` and ``stats_dim``; any call
whose rows fit its bytes per peer is served (``decode_cp_a2a_workspace_size``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cupy
import numpy as np

from . import group as _group
from . import kernels
from .constants import DCP_MAX_RANKS, DCP_SENTINEL_WORD, REGION_ALIGN, VECTOR_BYTES, StatsFormat
from .errors import ErrorWord, timeout_ns
from .group import ProcessGroup, default_group
from .kernel_args import ArWorkspace, DcpArgs, DcpCombineArgs, FillArgs
from .launch import Launcher
from .mapping import Mapping
from .op import (Op, device_facts, empty, enum_member, int_at_least, options, overlaps,
                 require_aligned, round_up)
from .symmetric import SymmetricBuffer
from .tensors import bfloat16, import_array, stream_handle

_SUFFIX = {np.dtype(np.float16): "fp16", bfloat16: "bf16"}
O_DTYPES = tuple(_SUFFIX)
_STATS_DTYPE = np.dtype(np.float32)
_STATE_WORDS = 8  # kStateWords in allreduce.cuh


@dataclass(frozen=True)
class DcpConfig:
    """Launch sizes of the DCP kernels (checked at construction).

    threads / blocks_per_sm: the all-to-all's block size and most resident blocks per SM
        (the whole grid must be resident: its blocks wait for each other's peers).
    combine_threads: the combine's block size.
    pdl: launch with programmatic dependent launch.
    """

    threads: int = 256
    blocks_per_sm: int = 4
    combine_threads: int = 256
    pdl: bool = True

    def __post_init__(self):
        for name in ("threads", "combine_threads"):
            t = int_at_least(f"DcpConfig.{name}", getattr(self, name), 32)
            if t % 32 or t > 1024:
                raise ValueError(f"DcpConfig.{name}={t}: a multiple of 32, at most 1024")
        int_at_least("DcpConfig.blocks_per_sm", self.blocks_per_sm)


@dataclass(frozen=True)
class DcpShape:
    """What a (partial_o, softmax_stats) pair describes: rows = the product of the leading
    dims, head_dim D, stats_dim S, the output dtype."""

    rows: int
    head_dim: int
    stats_dim: int
    dtype: np.dtype

    @property
    def o_vecs(self) -> int:
        """16-byte vectors of one partial output."""
        return self.head_dim * self.dtype.itemsize // VECTOR_BYTES

    @property
    def row_vecs(self) -> int:
        """16-byte vectors of one row of a message: the output, then the stats padded."""
        return self.o_vecs + -(-self.stats_dim // 4)

    @property
    def row_bytes(self) -> int:
        return self.row_vecs * VECTOR_BYTES


def dcp_shape(o_shape, o_dtype, stats_shape, stats_dtype, cp_size: int) -> DcpShape:
    """Check ``partial_o [..., cp_size, D]`` and ``softmax_stats [..., cp_size, S]`` (shapes
    and dtypes only) and describe them; TypeError/ValueError naming the argument."""
    o_dtype, stats_dtype = np.dtype(o_dtype), np.dtype(stats_dtype)
    if o_dtype not in _SUFFIX:
        raise TypeError(f"partial_o: dtype {o_dtype.name} is not supported, expected float16 "
                        "or bfloat16")
    if stats_dtype != _STATS_DTYPE:
        raise TypeError(f"softmax_stats: dtype {stats_dtype.name} is not supported, expected "
                        "float32")
    o_shape, stats_shape = tuple(o_shape), tuple(stats_shape)
    if len(o_shape) < 2:
        raise ValueError(f"partial_o: shape {o_shape} is not [..., cp_size, D]")
    if o_shape[-2] != cp_size:
        raise ValueError(f"partial_o: axis -2 has {o_shape[-2]} slices, the CP group has "
                         f"cp_size={cp_size} ranks (shape {o_shape})")
    head_dim = o_shape[-1]
    if head_dim < 1 or head_dim * o_dtype.itemsize % VECTOR_BYTES:
        raise ValueError(f"partial_o: D={head_dim} x {o_dtype.itemsize} bytes is not a positive "
                         f"multiple of {VECTOR_BYTES} bytes")
    if len(stats_shape) != len(o_shape) or stats_shape[:-1] != o_shape[:-1]:
        raise ValueError(f"softmax_stats: shape {stats_shape} is not [{', '.join(map(str, o_shape[:-1]))}"
                         f", S] (the leading dims of partial_o {o_shape})")
    stats_dim = stats_shape[-1]
    if stats_dim < 2 or stats_dim % 2:
        raise ValueError(f"softmax_stats: S={stats_dim} must be even and >= 2")
    rows = 1
    for d in o_shape[:-2]:
        rows *= d
    return DcpShape(rows, head_dim, stats_dim, o_dtype)


def decode_cp_a2a_workspace_size(cp_size: int, max_rows: int, head_dim: int = 128,
                                 stats_dim: int = 2, dtype=bfloat16) -> int:
    """Bytes of device memory per rank of a ``DcpAlltoAll`` for ``max_rows`` rows (batch x
    heads) of ``head_dim`` elements of ``dtype`` and ``stats_dim`` fp32 stats:
    three Lamport buffers of ``cp_size`` slots of ``max_rows`` message rows."""
    cp_size = int_at_least("cp_size", cp_size)
    max_rows = int_at_least("max_rows", max_rows)
    head_dim, stats_dim = int_at_least("head_dim", head_dim), int_at_least("stats_dim", stats_dim)
    dtype = np.dtype(dtype)
    if dtype not in _SUFFIX:  # named as this function's arguments, not dcp_shape's
        raise TypeError(f"dtype: {dtype.name} is not supported, expected float16 or bfloat16")
    if head_dim * dtype.itemsize % VECTOR_BYTES:
        raise ValueError(f"head_dim={head_dim} x {dtype.itemsize} bytes is not a multiple of "
                         f"{VECTOR_BYTES} bytes")
    if stats_dim % 2:
        raise ValueError(f"stats_dim={stats_dim} must be even and >= 2")
    shape = dcp_shape((cp_size, head_dim), dtype, (cp_size, stats_dim), np.float32, cp_size)
    return 3 * cp_size * round_up(max_rows * shape.row_bytes, REGION_ALIGN)


class DcpAlltoAll(Op):
    """The DCP all-to-all of one CP group: its workspace and its kernel.

    Args:
        group: the CP group (a ProcessGroup on one node; a Mapping: its cp group, split
            off the default group; None: the default group).
        max_rows: most rows (product of the leading dims of ``partial_o``) per call.
        head_dim, stats_dim, dtype: the sizes the workspace is made for; a call may use
            others as long as its rows fit (``rows * row_bytes`` per peer).
        timeout_s: how long a kernel waits for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s).
        config: ``DcpConfig``.

    Creation initialises the Lamport buffers and ends with a barrier, so the first call
    may follow at once. Creation and ``close()`` are collective; every rank calls
    ``alltoall`` the same number of times with the same shapes (a CUDA graph replay counts
    as its calls).
    """

    name = "DcpAlltoAll"

    def __init__(self, group: ProcessGroup | Mapping | None = None, max_rows: int = 4096,
                 head_dim: int = 128, stats_dim: int = 2, dtype=bfloat16, *,
                 timeout_s: float | None = None, config: DcpConfig | None = None):
        self.config = options(DcpConfig, config)
        self._own_group = False
        if group is None:
            group = default_group()
        elif isinstance(group, Mapping):
            parent = default_group()
            if (group.world_size, group.rank) != (parent.size, parent.rank):
                raise ValueError(f"mapping (world_size={group.world_size}, rank={group.rank}) "
                                 f"does not match the default group (size={parent.size})")
            group, self._own_group = parent.split(group.cp_group), True
        elif not isinstance(group, ProcessGroup):
            raise TypeError(f"group: expected a ProcessGroup or Mapping, got {type(group).__name__}")
        self.buffer = None
        try:  # collective, as construction is: free what was made if any step fails
            self.group = group
            self.cp_size, self.cp_rank = group.size, group.rank
            if self.cp_size > DCP_MAX_RANKS:
                raise ValueError(f"CP group of {self.cp_size} ranks exceeds the {DCP_MAX_RANKS} "
                                 "supported")
            self.max_rows = int_at_least("max_rows", max_rows)
            self.nbytes = decode_cp_a2a_workspace_size(self.cp_size, self.max_rows, head_dim,
                                                       stats_dim, dtype)
            self.slot_bytes = self.nbytes // (3 * self.cp_size)
            if self.slot_bytes >= 1 << 32:
                raise ValueError(f"max_rows={max_rows}: {self.slot_bytes} bytes per peer exceed "
                                 "4 GiB")
            self.device_id = cupy.cuda.runtime.getDevice()
            self.timeout_ns = timeout_ns(timeout_s)
            ranks = group.local_comm.allgather(group.rank)
            self.buffer = SymmetricBuffer(group, self.nbytes)  # refuses a group spanning nodes
            with group.all_or_none("DcpAlltoAll"):  # local steps
                self.state = cupy.zeros(_STATE_WORDS, np.uint32)
                self.error = ErrorWord(ranks)
                ws = ArWorkspace(state=self.state.data.ptr, error_word=self.error.ptr,
                                 timeout_ns=self.timeout_ns, lamport_off=0,
                                 lamport_slot=self.slot_bytes, rank=group.local_rank,
                                 world=self.cp_size)
                ws.peers[:self.cp_size] = self.buffer.ptrs
                self._launchers = {}
                for dt, suffix in _SUFFIX.items():
                    launcher = Launcher(kernels.get_kernel("dcp.cu", f"dcp_alltoall_{suffix}"),
                                        DcpArgs, pdl=self.config.pdl)
                    launcher.args.ws = ws
                    self._launchers[dt] = launcher
                    _combiner(self.device_id, dt, self.config.pdl)  # now, not in a capture
                facts = device_facts(self.device_id)
                self._most_blocks = facts.sms * min(
                    self.config.blocks_per_sm,
                    facts.blocks_per_sm(self._launchers[bfloat16].kernel, self.config.threads))
                fill = Launcher(kernels.get_kernel("allreduce.cu", "fill_words"), FillArgs)
                fill.args.dst, fill.args.nbytes = self.buffer.ptr, self.nbytes
                fill.args.word = DCP_SENTINEL_WORD
                fill(min(facts.sms * 4, -(-self.nbytes // (16 * 256))), 256, 0)
                cupy.cuda.runtime.deviceSynchronize()
            group.barrier()  # every sentinel is in place before any peer writes
        except BaseException:
            if self.error is not None:
                self.error.close()
            if self.buffer is not None:
                self.buffer.close()
            if self._own_group:
                group.close()
            raise
        self._open(self.error)

    def check(self, stream=None) -> None:
        """Wait for ``stream`` and raise ``PeerTimeoutError`` if a peer never arrived."""
        self.check_error(stream, synchronize=True)

    def alltoall(self, partial_o, softmax_stats, out=None, stream=None):
        """Exchange the CP group's partial outputs and softmax stats.

        Args:
            partial_o: ``[..., cp_size, D]`` fp16/bf16, ``D * itemsize`` a multiple of 16,
                C-contiguous, 16-byte aligned; slice ``[..., p, :]`` goes to rank p.
            softmax_stats: ``[..., cp_size, S]`` fp32 (same leading dims), S >= 2 and even.
            out: ``(o_out, stats_out)`` of the same shapes and dtypes (may be the inputs);
                pass it when capturing a CUDA graph. Default: new arrays.
            stream: where the op runs (see ``moecomm.tensors``).

        Returns ``(o_out, stats_out)``: ``o_out[..., s, :]`` and ``stats_out[..., s, :]`` are
        rank s's slices for this rank (-0.0 arrives as +0.0). Caller arrays come back as
        themselves (a PyTorch ``out`` stays a tensor).
        """
        self.usable("alltoall")
        handle = stream_handle(stream)
        o = import_array(partial_o, "partial_o", device=self.device_id, stream=handle)
        st = import_array(softmax_stats, "softmax_stats", device=self.device_id, stream=handle)
        shape = dcp_shape(o.shape, o.dtype, st.shape, st.dtype, self.cp_size)
        if shape.rows * shape.row_bytes > self.slot_bytes:
            raise ValueError(f"partial_o: {shape.rows} rows of {shape.row_bytes} bytes per peer "
                             f"exceed the workspace's {self.slot_bytes} bytes (max_rows="
                             f"{self.max_rows} rows of its head_dim and stats_dim)")
        if _group.DEBUG:
            self.group.check_uniform("DcpAlltoAll.alltoall shapes (partial_o, softmax_stats, "
                                     "dtype)", (o.shape, st.shape, o.dtype.name))
        if out is None:
            o_out, st_out = empty(o.shape, o.dtype, handle), empty(st.shape, st.dtype, handle)
            result = (o_out, st_out)
            o_ptr, st_ptr = o_out.data.ptr, st_out.data.ptr
        else:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError("out: expected a pair (o_out, stats_out)")
            oo = import_array(out[0], "out[0] (o_out)", dtype=o.dtype, shape=o.shape,
                              device=self.device_id, stream=handle, writable=True)
            so = import_array(out[1], "out[1] (stats_out)", dtype=st.dtype, shape=st.shape,
                              device=self.device_id, stream=handle, writable=True)
            result, o_ptr, st_ptr = (oo.obj, so.obj), oo.ptr, so.ptr
            # In place is an output at its own input's address (each thread writes the
            # items it read); any other overlap lets a write land on an unsent input.
            o_bytes, st_bytes = o.size * o.itemsize, st.size * st.itemsize
            for name, ptr, nbytes, own in (("out[0] (o_out)", o_ptr, o_bytes, o.ptr),
                                           ("out[1] (stats_out)", st_ptr, st_bytes, st.ptr)):
                if nbytes and ptr != own and (overlaps(ptr, nbytes, o.ptr, o_bytes)
                                              or overlaps(ptr, nbytes, st.ptr, st_bytes)):
                    raise ValueError(f"{name}: overlaps the inputs other than in place (an "
                                     "output at its own input's address)")
        require_aligned("partial_o", o.ptr)
        require_aligned("out[0] (o_out)", o_ptr)
        if shape.rows:
            self._launch(shape, o.ptr, st.ptr, o_ptr, st_ptr, handle)
        return result

    def _launch(self, shape: DcpShape, o_in: int, st_in: int, o_out: int, st_out: int,
                stream: int) -> None:
        launcher = self._launchers[shape.dtype]
        a = launcher.args
        a.o_in, a.stats_in, a.o_out, a.stats_out = o_in, st_in, o_out, st_out
        a.rows, a.o_vecs, a.stats_dim, a.row_vecs = (shape.rows, shape.o_vecs, shape.stats_dim,
                                                     shape.row_vecs)
        nvec = shape.rows * self.cp_size * shape.row_vecs
        threads = min(self.config.threads, round_up(nvec, 32))
        launcher(max(1, min(-(-nvec // threads), self._most_blocks)), threads, stream)

    def _release(self) -> None:
        self.buffer.close()
        self.state = None
        if self._own_group:
            self.group.close()

    def __repr__(self) -> str:
        return (f"DcpAlltoAll(cp_size={self.cp_size}, max_rows={self.max_rows}, "
                f"slot_bytes={self.slot_bytes}, {self.phase.value})")


def decode_cp_a2a_alltoall(partial_o, softmax_stats, workspace: DcpAlltoAll, out=None,
                           stream=None):
    """FlashInfer's name for ``workspace.alltoall(partial_o, softmax_stats, out, stream)``."""
    if not isinstance(workspace, DcpAlltoAll):
        raise TypeError(f"workspace: expected a DcpAlltoAll, got {type(workspace).__name__}")
    return workspace.alltoall(partial_o, softmax_stats, out=out, stream=stream)


# ------------------------------------------------------------------------ LSE combine
_local = threading.local()  # the combine's launchers, one set per thread (a Launcher's
                            # argument struct is filled, then launched: not thread-safe)


def _combiner(device_id: int, dtype: np.dtype, pdl: bool) -> Launcher:
    combiners = getattr(_local, "combiners", None)
    if combiners is None:
        combiners = _local.combiners = {}
    key = (device_id, dtype, pdl)
    launcher = combiners.get(key)
    if launcher is None:
        launcher = combiners[key] = Launcher(
            kernels.get_kernel("dcp.cu", f"dcp_combine_{_SUFFIX[dtype]}"), DcpCombineArgs, pdl=pdl)
    return launcher


def lse_combine(partial_o, softmax_stats, stats_format: StatsFormat | int = StatsFormat.LSE, *,
                out=None, lse_out=None, return_lse: bool = False, stream=None,
                config: DcpConfig | None = None):
    """Merge the cp partial outputs of each row by their softmax stats (a local kernel).

    Args:
        partial_o: ``[..., cp, D]`` fp16/bf16 (``o_out`` of ``alltoall``), 16-byte aligned.
        softmax_stats: ``[..., cp, S]`` fp32 (``stats_out``), read per ``stats_format``.
        stats_format: ``StatsFormat`` (LSE natural, LSE_BASE2, MAX_SUMEXP).
        out: ``[..., D]`` of partial_o's dtype, 16-byte aligned, not overlapping the
            inputs (default: new).
        lse_out: ``[...]`` fp32: the merged LSE, in the format's base (natural for
            MAX_SUMEXP); written when given or when ``return_lse``.
        stream, config: as for ``alltoall`` (``config.combine_threads``, ``config.pdl``).

    Returns ``out``, or ``(out, lse_out)`` when ``lse_out`` is given or ``return_lse``.
    Arithmetic: ``moecomm.reference.dcp.lse_combine``.
    """
    config = options(DcpConfig, config)
    fmt = enum_member(StatsFormat, stats_format, "stats_format")
    handle = stream_handle(stream)
    device = cupy.cuda.runtime.getDevice()
    o = import_array(partial_o, "partial_o", device=device, stream=handle)
    st = import_array(softmax_stats, "softmax_stats", device=device, stream=handle)
    if o.ndim < 2 or o.shape[-2] < 1:
        raise ValueError(f"partial_o: shape {o.shape} is not [..., cp, D] with cp >= 1")
    shape = dcp_shape(o.shape, o.dtype, st.shape, st.dtype, o.shape[-2])
    out_shape = o.shape[:-2] + o.shape[-1:]
    if out is None:
        result = empty(out_shape, o.dtype, handle)
        out_ptr = result.data.ptr
    else:
        ref = import_array(out, "out", dtype=o.dtype, shape=out_shape, device=device, stream=handle,
                           writable=True)
        result, out_ptr = ref.obj, ref.ptr
    lse_ptr, lse = 0, None
    if lse_out is not None:
        ref = import_array(lse_out, "lse_out", dtype=_STATS_DTYPE, shape=o.shape[:-2],
                           device=device, stream=handle, writable=True)
        lse, lse_ptr = ref.obj, ref.ptr
    elif return_lse:
        lse = empty(o.shape[:-2], _STATS_DTYPE, handle)
        lse_ptr = lse.data.ptr
    require_aligned("partial_o", o.ptr)
    require_aligned("out", out_ptr)
    # every thread reads all cp partials of its row while others write: no overlap at all
    o_bytes, st_bytes = o.size * o.itemsize, st.size * st.itemsize
    for name, ptr, nbytes in (("out", out_ptr, shape.rows * o.shape[-1] * o.itemsize),
                              ("lse_out", lse_ptr, 4 * shape.rows)):
        if ptr and (overlaps(ptr, nbytes, o.ptr, o_bytes)
                    or overlaps(ptr, nbytes, st.ptr, st_bytes)):
            raise ValueError(f"{name}: overlaps partial_o or softmax_stats, which the combine "
                             "reads while it writes")
    n = shape.rows * shape.o_vecs
    if n:
        launcher = _combiner(device, o.dtype, config.pdl)
        a = launcher.args
        a.o, a.stats, a.out, a.lse_out = o.ptr, st.ptr, out_ptr, lse_ptr
        a.rows, a.o_vecs, a.stats_dim, a.cp, a.format = (shape.rows, shape.o_vecs,
                                                         shape.stats_dim, o.shape[-2], int(fmt))
        threads = min(config.combine_threads, round_up(n, 32))
        launcher(max(1, min(-(-n // threads), device_facts(device).sms * 8)), threads, handle)
    return (result, lse) if lse is not None else result
