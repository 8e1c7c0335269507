"""Variable-size collectives: ``all_gatherv`` and ``reduce_scatterv``.

Rank ``r`` holds ``sizes[r]`` rows (axis 0); ``sizes`` is a host sequence of one count per
rank, the same on every rank (rows of 0 allowed), as a serving engine's per-rank token
counts are.

* ``all_gatherv(xs, sizes)``: ``xs`` is a list of 1 to 8 arrays of any dtype and row
  shape, each with ``sizes[rank]`` rows; every rank gets, per array, the rows of every
  rank stacked in rank order: ``[sum(sizes), *row_shape]``. All arrays move in one call.
* ``reduce_scatterv(x, sizes)``: ``x`` (bf16, fp16, fp32) has ``sum(sizes)`` rows; rank
  ``r`` gets the sum over ranks of their rows ``[off_r, off_r + sizes[r])`` (``off`` the
  prefix sum), accumulated in fp32 from +0 in rank order 0, 1, ... and rounded once, so
  every path (IPC, NCCL) gives the same bits.

Inside a node (``VCollectiveWorkspace`` over CUDA IPC) each call is one kernel: every block
pushes its share of what the peers need into their buffer of a double-buffered
``SymmetricBuffer`` item by item, raising one flag per (block, peer) per item, and copies
or sums the items the peers pushed as their flags arrive (bounded waits:
``PeerTimeoutError`` names a missing rank), so the pushes over NVLink overlap the copy
out (protocol: ``kernels_cu/collectives.cu``). A device-side call counter picks
the buffer and the flag value, so calls with fixed sizes can be captured in a CUDA graph
and replayed. all_gatherv copies rows of any byte size (16-byte vectors where addresses
and sizes allow, else 4-byte words, else bytes); reduce_scatterv needs rows of a multiple
of 16 bytes and 16-byte aligned arrays.

Small calls skip the flags (``VCollectiveConfig.lamport_max_bytes``, by default a byte
model: ``lamport_crossover()``): they go through Lamport buffers owned by the workspace,
with the all-reduce's protocol of ``kernels_cu/allreduce.cuh`` (three rotating buffers,
slots written only by their rank, every word the sentinel 0x80000000 between uses, a
device call counter, each call refilling what its peers wrote two calls before): one
kernel, no barrier, no flag round trip. Each slot starts with an arrival vector written and
awaited every call, rows or not, so that a rank with nothing to receive cannot run two calls
ahead into a buffer its peer is still refilling. Payload words equal to the sentinel stay
exact: all_gatherv sends 512-byte lines of 31 payload vectors and one mask vector whose bits
mark the words that were 0x80000000 (sent as 0, restored by the receiver), so any bytes
arrive bitwise at 1/32 extra traffic; reduce_scatterv sends -0.0 as +0.0, which cannot
change a sum that starts at +0. The path depends only on sizes, row bytes and the workspace,
so every rank takes the same one.

Across nodes (or with ``MOECOMM_GPUS_PER_NODE`` cutting the group) the same calls go
through ``NcclCommunicator``: ``all_gather_v`` of every array in one NCCL group, and for
reduce_scatterv a grouped send/recv of the row blocks followed by a local sum of the
received blocks in rank order (``vc_stack_reduce``), not NCCL's own reduction, so the
result has the same bits as the IPC path.

Validation (before any launch): ``sizes`` must have one non-negative int per rank and
match the arrays' rows; dtypes and row shapes are checked; with ``MOECOMM_DEBUG=1`` the
sizes, dtypes and row shapes are also compared across ranks (a mismatch raises
``ValueError`` on every rank instead of a hang or garbage).

Outputs are new ``cupy.ndarray`` objects, or the caller's ``outs=`` / ``out=`` (pass them
when capturing a graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cupy
import numpy as np

from . import group as _group
from . import kernels
from .constants import (DCP_SENTINEL_WORD, REGION_ALIGN, VC_LAMPORT_HEADER_BYTES,
                        VC_MAX_BLOCKS, VC_MAX_RANKS, VC_MAX_TENSORS)
from .errors import ErrorWord, timeout_ns
from .group import ProcessGroup, default_group
from .kernel_args import (AllGathervArgs, ArWorkspace, FillArgs, ReduceScattervArgs,
                          StackReduceArgs, VcWorkspace)
from .launch import Launcher
from .op import Op, empty, group_sms, int_at_least, options, require_aligned, round_up
from .symmetric import SymmetricBuffer
from .tensors import FLOAT_DTYPES, bfloat16, import_array, stream_handle

__all__ = ["VCollectiveConfig", "VCollectiveWorkspace", "create_vcollective_workspace",
           "all_gatherv", "reduce_scatterv", "lamport_crossover", "MAX_TENSORS"]

MAX_TENSORS = VC_MAX_TENSORS
_SOURCE = "collectives.cu"
_SUFFIX = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}
if bfloat16 is not None:
    _SUFFIX[bfloat16] = "bf16"
_STATE_WORDS = 4  # kState* in collectives.cu
_FLAG_BYTES = VC_MAX_BLOCKS * VC_MAX_RANKS * 8  # u64 flags (collectives.cu, flag_value)
# Items of one tensor in a block's share. A flag holds the call in its high 32 bits and
# the item over every tensor in the low 32; the items of VC_MAX_TENSORS tensors are kept
# below 2^16, the sizing the pipelined path was measured with.
_MAX_ITEMS = (1 << 16) // VC_MAX_TENSORS - 1
_CACHE = 64       # prepared launches kept per workspace
_LAMPORT_STATE_WORDS = 8         # kStateWords in allreduce.cuh
LINE_VECS, LINE_BYTES = 31, 512  # all_gatherv Lamport line: 31 payload vectors + a mask

# Byte model of the crossover, fitted to 2 x H200 graph replays (bench prepare,
# bench/results/prepare-r2-2xNVIDIA_H200-20261129T225737.json: Lamport 3.3 us at 8 KiB,
# 6.8 at 1 MiB, 19.3 at 4 MiB; pipelined 6.5, 9.4, 19.9): the pipelined path costs about
# _PIPELINED_US + bytes / _LINK (a flag round trip per call sets its floor), the Lamport
# path _LAMPORT_US + _LAMPORT_COST * bytes / _LINK (every byte is pushed, polled and,
# two calls later, refilled with the sentinel), ``bytes`` being what a rank receives.
_PIPELINED_US, _LAMPORT_US = 6.0, 2.5
_LINK_BYTES_PER_US = 300e3
_LAMPORT_COST = 1.2
_LAMPORT_MAX = 1 << 30  # lamport_max_bytes: slots stay below 4 GiB (u32 clear sizes)


def lamport_crossover() -> int:
    """Received bytes per rank up to which the Lamport path is modelled faster (~5 MB)."""
    return int((_PIPELINED_US - _LAMPORT_US) * _LINK_BYTES_PER_US / (_LAMPORT_COST - 1))


def received_bytes(total: int, world: int) -> int:
    """Bytes a rank receives on average when a call moves ``total`` bytes (all ranks' rows):
    the same number on every rank, so every rank picks the same path."""
    return total * (world - 1) // world


def lamport_gather_bytes(sizes: Sequence[int], row_bytes: Sequence[int]) -> int:
    """Bytes of the largest rank's all_gatherv Lamport stream (its segments, each padded to
    16 bytes, in lines of ``LINE_VECS`` payload vectors + one mask vector)."""
    most = 0
    for c in sizes:
        vecs = sum(-(-c * rb // 16) for rb in row_bytes)
        most = max(most, -(-vecs // LINE_VECS) * LINE_BYTES)
    return most


def lamport_slot_bytes(max_bytes: int, limit: int, world: int) -> int:
    """Bytes of one Lamport slot (what one rank sends one peer) of a workspace: the largest
    stream a call within ``limit`` received bytes and ``max_bytes`` can send; 0 if
    ``limit`` is 0 (no Lamport path)."""
    if limit <= 0:
        return 0
    cap = min(max_bytes, limit * world // (world - 1) if world > 1 else limit)
    vecs = -(-cap // 16) + VC_MAX_TENSORS
    return round_up(VC_LAMPORT_HEADER_BYTES + -(-vecs // LINE_VECS) * LINE_BYTES, REGION_ALIGN)


@dataclass(frozen=True)
class VCollectiveConfig:
    """Launch configuration of the IPC v-collectives (checked at construction).

    threads: block size (a multiple of 32, at most 1024).
    bytes_per_block: a block is added per this many bytes a rank moves, up to
        ``max_blocks`` (default: the smallest SM count of the node's GPUs, at most
        ``VC_MAX_BLOCKS``); small messages take few blocks (low latency), large ones the
        whole GPU. Every block must be resident: every block waits for its peers.
    item_bytes: a block moves its share in items of this many bytes (a multiple of 16),
        raising a flag per item, so its pushes overlap the peers' items in flight and
        their copy out (larger when a block's share of one tensor would need more than
        ``_MAX_ITEMS`` items).
    pdl: launch with programmatic dependent launch.
    lamport_max_bytes: calls in which a rank receives at most this many bytes (on
        average: ``received_bytes``) take the Lamport path, if the workspace's Lamport
        slots hold them; 0: never; None: the byte model, ``lamport_crossover()``. The
        workspace's Lamport buffers are sized from it (``lamport_slot_bytes``).
    """

    threads: int = 512
    bytes_per_block: int = 32 << 10
    max_blocks: int | None = None
    item_bytes: int = 32 << 10
    pdl: bool = True
    lamport_max_bytes: int | None = None

    def __post_init__(self):
        t = int_at_least("VCollectiveConfig.threads", self.threads, 32)
        if t % 32 or t > 1024:
            raise ValueError(f"VCollectiveConfig.threads={t}: a multiple of 32, at most 1024")
        int_at_least("VCollectiveConfig.bytes_per_block", self.bytes_per_block, 16)
        if int_at_least("VCollectiveConfig.item_bytes", self.item_bytes, 16) % 16:
            raise ValueError(f"VCollectiveConfig.item_bytes={self.item_bytes}: a multiple of 16")
        if self.lamport_max_bytes is not None:
            if int_at_least("VCollectiveConfig.lamport_max_bytes", self.lamport_max_bytes,
                            0) > _LAMPORT_MAX:
                raise ValueError(f"VCollectiveConfig.lamport_max_bytes={self.lamport_max_bytes}: "
                                 f"at most {_LAMPORT_MAX}")
        if self.max_blocks is not None:
            if not 1 <= int_at_least("VCollectiveConfig.max_blocks", self.max_blocks) <= VC_MAX_BLOCKS:
                raise ValueError(f"VCollectiveConfig.max_blocks={self.max_blocks}: at most "
                                 f"{VC_MAX_BLOCKS}")

    def grid(self, nbytes: int, sms: int) -> int:
        return max(1, min(self.most_blocks(sms), -(-nbytes // self.bytes_per_block)))

    def most_blocks(self, sms: int) -> int:
        """Blocks of one launch: at most one per SM (every block waits for its peers)."""
        return min(self.max_blocks or sms, VC_MAX_BLOCKS, sms)

    def lamport_limit(self) -> int:
        """``lamport_max_bytes``, or the byte model's crossover when None."""
        return lamport_crossover() if self.lamport_max_bytes is None else self.lamport_max_bytes

    def items(self, segment_bytes: int, grid: int) -> int:
        """Item bytes for segments of up to ``segment_bytes`` over ``grid`` blocks."""
        share = -(-segment_bytes // grid)
        return max(self.item_bytes, round_up(-(-share // _MAX_ITEMS), 16))


def check_sizes(sizes, world: int, name: str = "sizes") -> tuple[int, ...]:
    """``sizes`` as a tuple of ``world`` non-negative ints (TypeError / ValueError)."""
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
        raise TypeError(f"{name}: expected a sequence of {world} row counts, got "
                        f"{type(sizes).__name__}")
    if len(sizes) != world:
        raise ValueError(f"{name}: {len(sizes)} row counts for a group of {world} ranks")
    out = []
    for r, c in enumerate(sizes):
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"{name}[{r}]: expected an int, got {type(c).__name__}")
        if c < 0:
            raise ValueError(f"{name}[{r}]={c} is negative")
        out.append(int(c))
    return tuple(out)


def gather_layout(sizes: Sequence[int], row_bytes: Sequence[int]) -> tuple[list[int], int]:
    """(region offset of each tensor, bytes) of one all_gatherv data buffer: tensor i's
    region holds ``sum(sizes) * row_bytes[i]`` bytes, each region 256-byte aligned."""
    total = sum(sizes)
    offs, off = [], 0
    for rb in row_bytes:
        offs.append(off)
        off += round_up(total * rb, REGION_ALIGN)
    return offs, off


def scatter_bytes(sizes: Sequence[int], row_bytes: int) -> int:
    """Bytes of one reduce_scatterv data buffer: every rank's slot of the largest segment."""
    return len(sizes) * max(sizes) * row_bytes


class VCollectiveWorkspace(Op):
    """Buffers of ``all_gatherv`` / ``reduce_scatterv`` for one group.

    Args:
        group: the ranks (default: ``moecomm.init()``'s group). Inside one node: CUDA IPC;
            a group spanning nodes: NCCL only.
        max_bytes: bytes one data buffer holds: the largest all_gatherv output (all
            tensors, all ranks, each tensor rounded up to 256 bytes) and the largest
            reduce_scatterv ``world * max(sizes) * row_bytes``
            (``create_vcollective_workspace`` computes it from token counts).
        timeout_s: bound of every wait for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s).
        config: ``VCollectiveConfig``.

    Memory per rank (IPC): ``2 * max_bytes`` plus 64 KiB of flags, plus the Lamport
    buffers ``3 * world * lamport_slot`` (``lamport_slot_bytes``: about
    ``min(max_bytes, 2 * lamport_max_bytes)`` for 2 ranks); NCCL path: one
    ``max_bytes`` staging buffer for reduce_scatterv. Creation and ``close()`` are
    collective; also a context manager.
    """

    name = "VCollectiveWorkspace"

    def __init__(self, group: ProcessGroup | None, max_bytes: int, *,
                 timeout_s: float | None = None, config: VCollectiveConfig | None = None):
        self.group = default_group() if group is None else group
        self.max_bytes = round_up(int_at_least("max_bytes", max_bytes), REGION_ALIGN)
        self.config = options(VCollectiveConfig, config)
        self.world, self.rank = self.group.size, self.group.rank
        self.ipc = not self.group.spans_nodes
        if self.ipc and self.world > VC_MAX_RANKS:
            raise ValueError(f"group of {self.world} ranks exceeds the {VC_MAX_RANKS} an IPC "
                             "workspace supports")
        self._nccl = None
        self.buffer = None
        self._prepared: dict = {}
        with self.group.all_or_none("VCollectiveWorkspace"):  # nothing made yet to free
            self._stack_kernels = {dt: kernels.get_kernel(_SOURCE, f"vc_stack_reduce_{s}")
                                   for dt, s in _SUFFIX.items()}
        error = None
        self.lamport_slot = 0
        if self.ipc:
            self.lamport_slot = lamport_slot_bytes(self.max_bytes, self.config.lamport_limit(),
                                                   self.world)
            lamport_off = _FLAG_BYTES + 2 * self.max_bytes
            lamport_bytes = 3 * self.world * self.lamport_slot
            ranks = self.group.local_comm.allgather(self.rank)
            self.sms = group_sms(self.group)
            self.buffer = SymmetricBuffer(self.group, lamport_off + lamport_bytes)
            try:  # collective, as construction is: free what was made if any step fails
                with self.group.all_or_none("VCollectiveWorkspace"):  # local steps
                    self.state = cupy.zeros(_STATE_WORDS, np.uint32)
                    self.lamport_state = cupy.zeros(_LAMPORT_STATE_WORDS, np.uint32)
                    error = ErrorWord(ranks)
                    wait_ns = timeout_ns(timeout_s)
                    self.kernel_workspace = VcWorkspace(
                        state=self.state.data.ptr, error_word=error.ptr, timeout_ns=wait_ns,
                        data_off=_FLAG_BYTES, buffer_bytes=self.max_bytes,
                        rank=self.group.local_rank, world=self.world)
                    self.kernel_workspace.peers[:self.world] = self.buffer.ptrs
                    self.lamport_workspace = ArWorkspace(
                        state=self.lamport_state.data.ptr, error_word=error.ptr,
                        timeout_ns=wait_ns, lamport_off=lamport_off,
                        lamport_slot=self.lamport_slot, rank=self.group.local_rank,
                        world=self.world)
                    self.lamport_workspace.peers[:self.world] = self.buffer.ptrs
                    self._gather_kernel = kernels.get_kernel(_SOURCE, "vc_all_gatherv")
                    self._gather_lamport = kernels.get_kernel(_SOURCE,
                                                              "vc_all_gatherv_lamport")
                    self._scatter_kernels = {
                        dt: kernels.get_kernel(_SOURCE, f"vc_reduce_scatterv_{s}")
                        for dt, s in _SUFFIX.items()}
                    self._scatter_lamport = {
                        dt: kernels.get_kernel(_SOURCE, f"vc_reduce_scatterv_lamport_{s}")
                        for dt, s in _SUFFIX.items()}
                    if lamport_bytes:  # every word the sentinel before any peer writes
                        fill = Launcher(kernels.get_kernel("allreduce.cu", "fill_words"),
                                        FillArgs)
                        fill.args.dst = self.buffer.ptr + lamport_off
                        fill.args.nbytes = lamport_bytes
                        fill.args.word = DCP_SENTINEL_WORD
                        fill(max(1, min(self.sms * 4, -(-lamport_bytes // (16 * 256)))), 256, 0)
                    cupy.cuda.runtime.deviceSynchronize()
            except BaseException:
                if error is not None:
                    error.close()
                self.buffer.close()
                raise
            self.group.barrier()
        else:
            from .nccl import NcclCommunicator

            self._nccl = NcclCommunicator(self.group)
            self._stage = cupy.empty(self.max_bytes, np.uint8)
        self._open(error)

    @property
    def path(self) -> str:
        """``"ipc"`` or ``"nccl"``."""
        return "ipc" if self.ipc else "nccl"

    def check(self, stream=None) -> None:
        """Wait for ``stream``; raise ``PeerTimeoutError`` if a peer never arrived."""
        self.check_error(stream, synchronize=True)

    # -- all_gatherv ----------------------------------------------------------------------
    def all_gatherv(self, xs, sizes, *, outs=None, stream=None) -> list[cupy.ndarray]:
        """Every rank's rows of every array of ``xs``, in rank order (see the module doc).

        Args:
            xs: a list of 1 to 8 arrays ``[sizes[rank], ...]`` of any dtype.
            sizes: rows of every rank (host ints, the same on every rank).
            outs: optional list of ``[sum(sizes), ...]`` arrays (dtype and row shape of
                the matching ``xs``).
        Returns the list of gathered arrays (``outs`` when given).
        """
        self.usable("all_gatherv")
        sizes = check_sizes(sizes, self.world)
        handle = stream_handle(stream)
        if not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs: expected a list of arrays, got {type(xs).__name__}")
        if not 1 <= len(xs) <= VC_MAX_TENSORS:
            raise ValueError(f"xs: {len(xs)} arrays, expected 1 to {VC_MAX_TENSORS}")
        arrays = []
        for i, x in enumerate(xs):
            a = import_array(x, f"xs[{i}]", device=self.device_id, stream=handle)
            if a.ndim < 1 or a.shape[0] != sizes[self.rank]:
                raise ValueError(f"xs[{i}]: shape {tuple(a.shape)}, expected [sizes[{self.rank}]="
                                 f"{sizes[self.rank]}, ...] rows")
            arrays.append(a)
        total = sum(sizes)
        if outs is not None:
            if not isinstance(outs, (list, tuple)) or len(outs) != len(arrays):
                raise ValueError(f"outs: expected a list of {len(arrays)} arrays")
            outs = [import_array(o, f"outs[{i}]", dtype=a.dtype, shape=(total, *a.shape[1:]),
                                 device=self.device_id, stream=handle, writable=True)
                    for i, (o, a) in enumerate(zip(outs, arrays))]
        if _group.DEBUG:
            self.group.check_uniform("all_gatherv sizes and (dtype, row shape) of xs",
                                     (sizes, [(a.dtype.str, tuple(a.shape[1:])) for a in arrays]))
        if outs is None:
            outs = [empty((total, *a.shape[1:]), a.dtype, handle) for a in arrays]
            out_ptrs = [o.data.ptr for o in outs]
            results = outs
        else:
            out_ptrs = [o.ptr for o in outs]
            results = [o.obj for o in outs]
        row_bytes = [a.itemsize * math.prod(a.shape[1:]) for a in arrays]
        if not self.ipc:
            self._nccl.all_gather_v_list([a.obj for a in arrays], sizes, outs=results,
                                         stream=handle)
            return results
        key = ("g", sizes, tuple(row_bytes))
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepare_gather(sizes, row_bytes)
        launcher, grid = prepared
        args = launcher.args
        for i, (a, p) in enumerate(zip(arrays, out_ptrs)):
            args.src[i], args.dst[i] = a.ptr, p
        launcher(grid, self.config.threads, handle)
        return results

    def check_gather(self, sizes, row_bytes: Sequence[int]) -> None:
        """Raise the ValueError an ``all_gatherv`` of ``sizes`` rows of ``row_bytes`` (one
        int per tensor) would, launching nothing: for callers that change state first."""
        if self.ipc:
            self._gather_layout(check_sizes(sizes, self.world), row_bytes)

    def _gather_layout(self, sizes, row_bytes) -> list:
        """The offsets of every tensor's region in the workspace (raises past max_bytes)."""
        offs, need = gather_layout(sizes, row_bytes)
        if need > self.max_bytes:
            raise ValueError(f"all_gatherv of {need} bytes (sizes={list(sizes)}, row bytes "
                             f"{row_bytes}) exceeds the workspace's max_bytes {self.max_bytes}")
        return offs

    def _prepare_gather(self, sizes, row_bytes):
        offs = self._gather_layout(sizes, row_bytes)
        lamport = self.gather_path(sizes, row_bytes) == "lamport"
        kernel = self._gather_lamport if lamport else self._gather_kernel
        launcher = Launcher(kernel, AllGathervArgs, pdl=self.config.pdl)
        a = launcher.args
        a.ws = self.kernel_workspace
        a.num_tensors = len(row_bytes)
        for i, (rb, off) in enumerate(zip(row_bytes, offs)):
            a.row_bytes[i], a.region_off[i] = rb, off
        a.rows[:self.world] = sizes
        if lamport:  # a warp per line of every rank's stream
            a.lamport = self.lamport_workspace
            lines = sum(-(-sum(-(-c * rb // 16) for rb in row_bytes) // LINE_VECS) for c in sizes)
            grid = max(1, min(self.config.most_blocks(self.sms),
                              -(-lines // (self.config.threads // 32))))
        else:
            grid = self.config.grid(sum(sizes) * sum(row_bytes), self.sms)
        a.item_bytes = self.config.items(max(sizes) * max(row_bytes), grid)
        return self._remember(("g", sizes, tuple(row_bytes)), (launcher, grid))

    def gather_path(self, sizes, row_bytes: Sequence[int]) -> str:
        """The kernel an all_gatherv of ``sizes`` rows of ``row_bytes`` (one int per
        tensor) takes: ``"lamport"``, ``"pipelined"`` (or ``"nccl"``)."""
        sizes = check_sizes(sizes, self.world)
        if not self.ipc:
            return "nccl"
        lamport = self._lamport(sum(sizes) * sum(row_bytes), lamport_gather_bytes(sizes, row_bytes))
        return "lamport" if lamport else "pipelined"

    def scatter_path(self, sizes, row_bytes: int) -> str:
        """The kernel a reduce_scatterv of ``sizes`` rows of ``row_bytes`` takes (as
        ``gather_path``)."""
        sizes = check_sizes(sizes, self.world)
        if not self.ipc:
            return "nccl"
        lamport = self._lamport(sum(sizes) * row_bytes, max(sizes) * row_bytes)
        return "lamport" if lamport else "pipelined"

    def _lamport(self, total: int, slot_bytes: int) -> bool:
        """Whether a call moving ``total`` bytes (every rank's rows), needing
        ``slot_bytes`` per Lamport slot, takes the Lamport path (the same on every rank)."""
        return (0 < self.lamport_slot and slot_bytes + VC_LAMPORT_HEADER_BYTES <= self.lamport_slot
                and received_bytes(total, self.world) <= self.config.lamport_limit())

    # -- reduce_scatterv --------------------------------------------------------------------
    def reduce_scatterv(self, x, sizes, *, out=None, stream=None):
        """This rank's rows of the sum of every rank's ``x`` (see the module doc).

        Args:
            x: bf16/fp16/fp32 ``[sum(sizes), ...]``, rows of a multiple of 16 bytes,
                16-byte aligned.
            sizes: rows of every rank (host ints, the same on every rank).
            out: optional ``[sizes[rank], ...]`` array of x's dtype, 16-byte aligned.
        Returns ``out`` (as passed) or a new array.
        """
        self.usable("reduce_scatterv")
        sizes = check_sizes(sizes, self.world)
        handle = stream_handle(stream)
        a = import_array(x, "x", dtype=FLOAT_DTYPES, device=self.device_id, stream=handle)
        if a.ndim < 1 or a.shape[0] != sum(sizes):
            raise ValueError(f"x: shape {tuple(a.shape)}, expected sum(sizes)={sum(sizes)} rows "
                             f"(sizes={list(sizes)})")
        row = a.itemsize * math.prod(a.shape[1:])
        if row % 16:
            raise ValueError(f"x: {row} bytes per row; reduce_scatterv needs a multiple of 16")
        require_aligned("x", a.ptr)
        shape = (sizes[self.rank], *a.shape[1:])
        if out is None:
            result = empty(shape, a.dtype, handle)
            out_ptr = result.data.ptr
        else:
            o = import_array(out, "out", dtype=a.dtype, shape=shape, device=self.device_id,
                             stream=handle, writable=True)
            require_aligned("out", o.ptr)
            result, out_ptr = o.obj, o.ptr
        need = scatter_bytes(sizes, row)
        if need > self.max_bytes:
            raise ValueError(f"reduce_scatterv needs {need} bytes (world x max(sizes) x row "
                             f"bytes, sizes={list(sizes)}), the workspace's max_bytes is "
                             f"{self.max_bytes}")
        if _group.DEBUG:
            self.group.check_uniform("reduce_scatterv sizes, dtype and row shape of x",
                                     (sizes, a.dtype.str, tuple(a.shape[1:])))
        if not self.ipc:
            self._nccl_reduce_scatterv(a, sizes, row, out_ptr, handle)
            return result
        key = ("s", sizes, row, a.dtype)
        prepared = self._prepared.get(key)
        if prepared is None:
            lamport = self.scatter_path(sizes, row) == "lamport"
            kernels_ = self._scatter_lamport if lamport else self._scatter_kernels
            launcher = Launcher(kernels_[a.dtype], ReduceScattervArgs, pdl=self.config.pdl)
            launcher.args.ws = self.kernel_workspace
            launcher.args.rows[:self.world] = sizes
            launcher.args.row_bytes = row
            if lamport:  # a thread per 16-byte vector
                launcher.args.lamport = self.lamport_workspace
                grid = max(1, min(self.config.most_blocks(self.sms),
                                  -(-sum(sizes) * row // (16 * self.config.threads))))
            else:
                grid = self.config.grid(sum(sizes) * row, self.sms)
            launcher.args.item_bytes = self.config.items(max(sizes) * row, grid)
            prepared = self._remember(key, (launcher, grid))
        launcher, grid = prepared
        launcher.args.in_, launcher.args.out = a.ptr, out_ptr
        launcher(grid, self.config.threads, handle)
        return result

    def _nccl_reduce_scatterv(self, a, sizes, row: int, out_ptr: int, handle: int) -> None:
        """Grouped send/recv of the row blocks into the staging buffer, then their sum in
        rank order (the IPC path's bits)."""
        n = sizes[self.rank] * row
        stage = self._stage.data.ptr
        self._nccl.send_recv_bytes(a.ptr, [c * row for c in sizes], stage, [n] * self.world,
                                   stream=handle)
        key = ("r", a.dtype)
        launcher = self._prepared.get(key)
        if launcher is None:
            launcher = self._remember(key, Launcher(self._stack_kernels[a.dtype], StackReduceArgs))
        args = launcher.args
        args.in_, args.out, args.nvec, args.slots = stage, out_ptr, n // 16, self.world
        if n:
            launcher(max(1, min(1024, -(-(n // 16) // 256))), 256, handle)

    def _remember(self, key, value):
        if len(self._prepared) >= _CACHE:
            self._prepared.clear()
        self._prepared[key] = value
        return value

    def _release(self) -> None:
        self._prepared.clear()
        if self._nccl is not None:
            self._nccl.close()
        if self.buffer is not None:
            self.buffer.close()
            self.state = self.lamport_state = None

    def __repr__(self) -> str:
        return (f"VCollectiveWorkspace(world={self.world}, max_bytes={self.max_bytes}, "
                f"lamport_slot={self.lamport_slot}, path={self.path}, {self.phase.value})")


def create_vcollective_workspace(group: ProcessGroup | None = None, *,
                                 max_tokens_per_rank: int, bytes_per_token: Sequence[int] | int,
                                 **options) -> VCollectiveWorkspace:
    """A workspace for all_gatherv of tensors of ``bytes_per_token`` (one int per tensor)
    and reduce_scatterv of rows up to ``max(bytes_per_token)``, with at most
    ``max_tokens_per_rank`` rows per rank. Options as in ``VCollectiveWorkspace``."""
    group = default_group() if group is None else group
    rows = int_at_least("max_tokens_per_rank", max_tokens_per_rank)
    per = [bytes_per_token] if isinstance(bytes_per_token, (int, np.integer)) else list(bytes_per_token)
    per = [int_at_least("bytes_per_token", b) for b in per]
    sizes = [rows] * group.size
    need = max(gather_layout(sizes, per)[1], scatter_bytes(sizes, max(per)))
    return VCollectiveWorkspace(group, need, **options)


def all_gatherv(xs, sizes, workspace: VCollectiveWorkspace, *, outs=None, stream=None):
    """``workspace.all_gatherv(xs, sizes, outs=, stream=)``."""
    return workspace.all_gatherv(xs, sizes, outs=outs, stream=stream)


def reduce_scatterv(x, sizes, workspace: VCollectiveWorkspace, *, out=None, stream=None):
    """``workspace.reduce_scatterv(x, sizes, out=, stream=)``."""
    return workspace.reduce_scatterv(x, sizes, out=out, stream=stream)
