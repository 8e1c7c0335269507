"""Custom all-reduce over CUDA IPC: Lamport one-shot, pipelined two-shot, and NCCL.

``all_reduce(x, workspace)`` sums ``x`` (bf16, fp16 or fp32, any shape, any element
count) over the workspace's group. With one-shot and two-shot every rank gets bitwise the
same result, whichever of the two runs: peers are summed in rank order in fp32 and
rounded once (an input -0.0 counts as +0.0, the Lamport sentinel). ``nccl`` (and every
call of a group spanning nodes) gives NCCL's sum, whose order and precision NCCL picks.

- one-shot: each rank writes its whole input into its slot of every rank's Lamport
  buffer; readers spin until no -0.0 sentinel is left and sum. One kernel, no barrier;
  three rotating buffers and a device-side call counter keep it graph-capturable.
  Moves ``(world-1) * bytes`` per rank over NVLink. Large messages split the SMs by role
  (``AllReduceConfig.split_min_bytes``): a few SMs push, the others clear, poll and
  reduce as the data arrives; at 2 ranks, where both algorithms move the same bytes over
  the link, that beats two-shot at every size measured (up to 64 MiB).
- two-shot: reduce-scatter then all-gather through the workspace, pipelined in chunks
  with per-block flags; ``2 * (world-1)/world * bytes`` per rank: best for large messages.
- nccl: ``NcclCommunicator.all_reduce``; the only path when the group spans nodes.

``auto`` takes one-shot up to ``AllReduceConfig.oneshot_max_bytes`` (default: the measured
table of ``moecomm.tuning``) and two-shot above. Kernels are launched with programmatic
dependent launch (``AllReduceConfig.pdl``), so back-to-back calls overlap their launch.
Protocol and memory layout: ``kernels_cu/allreduce.cuh``.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import cupy
import numpy as np

from . import group as _group
from . import events, kernels, tuning
from .constants import AR_LAMPORT_BUFFERS, AR_MAX_BLOCKS, AR_MAX_RANKS, REGION_ALIGN
from .errors import ErrorWord, timeout_ns
from .group import ProcessGroup, default_group
from .kernel_args import AllReduceArgs, ArWorkspace, FillArgs
from .launch import Launcher
from .op import (Op, device_facts, empty, grid_limit, group_sms, int_at_least, options,
                 overlaps, require_aligned, round_up, supported_dtype)
from .symmetric import SymmetricBuffer
from .tensors import FLOAT_DTYPES, bfloat16, dtype_name, import_array, stream_handle

_SUFFIX = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", bfloat16: "bf16"}
_DTYPES = (bfloat16, np.dtype(np.float16), np.dtype(np.float32))  # as error messages name them
_SENTINEL = {np.dtype(np.float32): 0x80000000, np.dtype(np.float16): 0x80008000,
             bfloat16: 0x80008000}
_STATE_WORDS = 8       # kStateWords in allreduce.cuh
_MAX_CHUNKS = 4095     # chunks of one block per call (the sizing the two-shot was measured with)
_FLAG_BYTES = 2 * AR_MAX_BLOCKS * AR_MAX_RANKS * 8  # u64 two-shot flags (allreduce.cuh)


class Algorithm(str, enum.Enum):
    AUTO = "auto"
    ONESHOT = "oneshot"
    TWOSHOT = "twoshot"
    NCCL = "nccl"


_ALGORITHMS = {a.value: a for a in Algorithm}  # value -> member, cheaper than Enum lookup


@dataclass(frozen=True)
class AllReduceConfig:
    """Launch configuration of ``all_reduce`` (checked at construction).

    oneshot_threads / oneshot_blocks_per_sm: block size and most blocks per SM of the
        one-shot kernel (each thread takes one 16-byte vector until the grid is full).
    twoshot_threads / twoshot_blocks_per_sm: the same for two-shot (by default one block
        of 1024 threads per SM: a two-shot block is bound by the bytes it has in flight).
    twoshot_chunk_bytes: most bytes a two-shot block moves per pipelined chunk with every
        SM; each block gets the same number of equal chunks. Under ``num_sms`` every block
        moves its share as one chunk: a chunk's flags cost its block a drain of its remote
        writes, and a budget's few blocks are bound by such latencies, not by the link.
    oneshot_max_bytes: the ``auto`` crossover; None: the measured tables of
        ``moecomm.tuning`` for the group's size (``ALLREDUCE_SPLIT_ONESHOT_MAX_BYTES``
        where the split below applies, else ``ALLREDUCE_ONESHOT_MAX_BYTES``).
    split_min_bytes: one-shot messages of at least this many bytes split the SMs by role:
        ``split_push_sms`` SMs push the message to the peers, the others clear and reduce,
        one block of ``split_threads`` per SM (the reducers then keep pace with the
        arrivals instead of queueing behind the remote stores). None: the measured
        ``tuning.ALLREDUCE_SPLIT_MIN_BYTES`` for the group's size (no split where none is
        measured); a value above ``max_bytes`` turns it off. The split needs more than
        ``2 * split_push_sms`` SMs in the budget.
    twoshot_copy_engine: two-shot moves each peer's share of the input into its inbox, and
        the gathered shares into ``out``, with the copy engines (``cudaMemcpyAsync``
        before and after the kernel) instead of the SMs, which then only reduce; the same
        bits either way. None: under ``num_sms`` (the SMs a budget leaves the kernel are
        bound by the latency of the bytes they move, the copy engines are not), else off.
    pdl: launch with programmatic dependent launch.
    num_sms: SMs the kernels (and ``allreduce_fusion``'s) may occupy (None: every SM):
        below the device's SMs every grid has at most ``num_sms`` blocks, one per SM (the
        block scheduler spreads a grid over free SMs first), and the rest of the GPU
        stays free for compute running beside them. The same on every rank (checked at
        workspace creation).
    """

    oneshot_threads: int = 128
    oneshot_blocks_per_sm: int = 4
    twoshot_threads: int = 1024
    twoshot_blocks_per_sm: int = 1
    twoshot_chunk_bytes: int = 256 << 10
    oneshot_max_bytes: int | None = None
    split_min_bytes: int | None = None
    split_push_sms: int = 12
    split_threads: int = 512
    twoshot_copy_engine: bool | None = None
    pdl: bool = True
    num_sms: int | None = None

    def __post_init__(self):
        for name, most in (("oneshot_threads", 1024), ("twoshot_threads", 1024),
                           ("split_threads", 1024)):
            threads = int_at_least(f"AllReduceConfig.{name}", getattr(self, name), 32)
            if threads % 32 or threads > most:
                raise ValueError(f"AllReduceConfig.{name}={threads}: a multiple of 32, at most "
                                 f"{most}")
        int_at_least("AllReduceConfig.split_push_sms", self.split_push_sms)
        if self.split_min_bytes is not None:
            int_at_least("AllReduceConfig.split_min_bytes", self.split_min_bytes, 0)
        int_at_least("AllReduceConfig.oneshot_blocks_per_sm", self.oneshot_blocks_per_sm)
        int_at_least("AllReduceConfig.twoshot_blocks_per_sm", self.twoshot_blocks_per_sm)
        chunk = int_at_least("AllReduceConfig.twoshot_chunk_bytes", self.twoshot_chunk_bytes)
        if chunk % (16 * self.twoshot_threads):
            raise ValueError(f"AllReduceConfig.twoshot_chunk_bytes={chunk}: a multiple of 16 "
                             f"bytes x twoshot_threads={self.twoshot_threads}")
        if self.oneshot_max_bytes is not None:
            int_at_least("AllReduceConfig.oneshot_max_bytes", self.oneshot_max_bytes, 0)
        if self.num_sms is not None:
            int_at_least("AllReduceConfig.num_sms", self.num_sms)
        if not isinstance(self.twoshot_copy_engine, (bool, type(None))):
            raise TypeError(f"AllReduceConfig.twoshot_copy_engine must be a bool or None, not "
                            f"{self.twoshot_copy_engine!r}")

    def budget(self, device_sms: int) -> int:
        """The SMs every grid may hold on a device of ``device_sms``."""
        return min(device_sms, self.num_sms or device_sms)

    def crossover(self, world: int, sms: int) -> int:
        """The ``auto`` crossover in bytes for ``world`` ranks and an SM budget of ``sms``:
        ``oneshot_max_bytes``, else the measured one (``measured_crossover``)."""
        if self.oneshot_max_bytes is not None:
            return self.oneshot_max_bytes
        return self.measured_crossover(world, sms)

    def measured_crossover(self, world: int, sms: int) -> int:
        """The measured one-shot limit of ``all_reduce`` in bytes: the split one-shot's
        table where the split applies, else the plain one-shot's (``allreduce_fusion``
        has its own rule, by rows: ``moecomm.fusion``)."""
        split = tuning.ALLREDUCE_SPLIT_ONESHOT_MAX_BYTES
        if self.split_from(world, sms) != float("inf") and world in split:
            return split[world]
        return tuning.lookup(tuning.ALLREDUCE_ONESHOT_MAX_BYTES, world)

    def split_from(self, world: int, sms: int) -> float:
        """Bytes from which a one-shot call splits the SMs by role (inf: never)."""
        if sms <= 2 * self.split_push_sms:
            return float("inf")
        if self.split_min_bytes is not None:
            return self.split_min_bytes
        return tuning.ALLREDUCE_SPLIT_MIN_BYTES.get(world, float("inf"))

    def oneshot_grid(self, nvec: int, sms: int, budgeted: bool = False) -> tuple[int, int]:
        """(blocks, threads) of a one-shot call over ``nvec`` 16-byte vectors on ``sms``
        SMs; ``budgeted`` (``num_sms`` below the device's): one block per SM holding what
        ``oneshot_blocks_per_sm`` blocks would (the block scheduler spreads a grid over
        free SMs first, so more blocks than SMs would occupy more SMs than the budget)."""
        per_sm = self.oneshot_blocks_per_sm
        threads = self.oneshot_threads * (per_sm if budgeted else 1)
        threads = min(threads, 1024, round_up(nvec, 32))
        return max(1, min(-(-nvec // threads), grid_limit(sms, per_sm, budgeted))), threads

    def twoshot_grid(self, nvec: int, world: int, sms: int,
                     budgeted: bool = False) -> tuple[int, int, int]:
        """(blocks, threads, chunk vectors) of a two-shot call over ``nvec`` vectors on
        ``sms`` SMs; ``budgeted``: at most one block per SM (as ``oneshot_grid``)."""
        threads = self.twoshot_threads
        seg = -(-nvec // world)
        most = min(grid_limit(sms, self.twoshot_blocks_per_sm, budgeted), AR_MAX_BLOCKS)
        per_block = -(-seg // most)
        chunks = 1 if budgeted else -(-per_block // (self.twoshot_chunk_bytes // 16))
        chunk = round_up(-(-seg // (most * min(chunks, _MAX_CHUNKS))), threads)
        return max(1, min(most, -(-seg // chunk))), threads, chunk


class AllReduceWorkspace(Op):
    """Buffers, flags and counters of ``all_reduce`` for one group and one dtype.

    Args:
        group: the ranks (default: ``moecomm.init()``'s group). Within one node the
            custom kernels are used; a group spanning nodes uses NCCL only.
        max_bytes: largest message, in bytes.
        dtype: element type of every message (bf16, fp16, fp32); the Lamport sentinel
            depends on it.
        max_oneshot_bytes: bytes of one Lamport slot (default ``min(max_bytes, the auto
            crossover)``); one-shot calls above it are refused.
        timeout_s: how long a kernel waits for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s).
        segment_bytes: two-shot inbox bytes per peer (default ``max_bytes / world``; the
            fused all-reduce splits by whole rows and needs ``ceil(rows / world)`` rows).
        config: ``AllReduceConfig`` (launch sizes, crossover, PDL).

    Memory per rank: ``3 * world * max_oneshot_bytes + 2 * max_bytes`` plus 256 KiB of
    flags. Creation and ``close()`` are collective. If the buffers cannot be shared (CUDA
    IPC refused on some rank), the workspace warns and serves every call through NCCL.
    """

    name = "AllReduceWorkspace"

    def __init__(self, group: ProcessGroup | None, max_bytes: int, dtype, *,
                 max_oneshot_bytes: int | None = None, timeout_s: float | None = None,
                 segment_bytes: int | None = None, config: AllReduceConfig | None = None):
        self.group = default_group() if group is None else group
        self.dtype = supported_dtype(dtype, _DTYPES)
        self.max_bytes = int_at_least("max_bytes", max_bytes)
        self.config = options(AllReduceConfig, config)
        self.world, self.rank = self.group.size, self.group.rank
        self.timeout_ns = timeout_ns(timeout_s)
        self.ipc = not self.group.spans_nodes
        # why the custom kernels cannot serve (empty while they can)
        self.no_ipc_reason = "" if self.ipc else f"the group spans {self.group.num_nodes} nodes"
        if self.ipc and self.world > AR_MAX_RANKS:
            raise ValueError(f"group of {self.world} ranks exceeds the {AR_MAX_RANKS} supported")
        self._nccl = None
        self.buffer = None
        self.max_oneshot_bytes = 0
        if self.ipc:
            self._make(max_oneshot_bytes, segment_bytes)
        self._open(self.error)

    def _make(self, max_oneshot_bytes, segment_bytes) -> None:
        self.group.check_uniform("AllReduceConfig.num_sms", self.config.num_sms)
        sms = group_sms(self.group)
        self.device_sms = sms  # the node's SMs per GPU, whatever the budget
        self.sms = self.config.budget(sms)  # the SM budget of every grid
        self.budgeted = self.sms < sms  # then one block per SM (AllReduceConfig.oneshot_grid)
        crossover = self.config.crossover(self.world, self.sms)
        slot = round_up(min(self.max_bytes, crossover) if max_oneshot_bytes is None
                        else int_at_least("max_oneshot_bytes", max_oneshot_bytes, 0), 16)
        # a two-shot of max_bytes sends every peer ceil(vectors / world) 16-byte vectors
        rs_slot = round_up(-(-round_up(self.max_bytes, 16) // self.world), 16)
        if segment_bytes is not None:
            rs_slot = round_up(int_at_least("segment_bytes", segment_bytes, rs_slot), 16)
        lamport_off = round_up(_FLAG_BYTES, REGION_ALIGN)
        rs_off = round_up(lamport_off + AR_LAMPORT_BUFFERS * self.world * slot, REGION_ALIGN)
        ag_off = round_up(rs_off + self.world * rs_slot, REGION_ALIGN)
        total = ag_off + round_up(self.max_bytes, REGION_ALIGN)
        try:
            self.buffer = SymmetricBuffer(self.group, total)
        except RuntimeError as exc:  # raised on every rank alike: fall back together
            warnings.warn(f"CUDA IPC is unavailable ({exc}); all_reduce goes through NCCL",
                          RuntimeWarning, stacklevel=3)
            self.ipc = False
            self.no_ipc_reason = f"CUDA IPC was refused ({exc})"
            return
        ranks = self.group.local_comm.allgather(self.rank)
        try:  # collective, as construction is: free what was made if any step fails
            with self.group.all_or_none("AllReduceWorkspace"):  # local steps
                self.max_oneshot_bytes, self._auto_limit = slot, min(slot, crossover)
                self.state = cupy.zeros(_STATE_WORDS, np.uint32)
                self.error = ErrorWord(ranks)
                # The workspace as kernels see it; copied into every launcher's arguments.
                self.kernel_workspace = ArWorkspace(
                    state=self.state.data.ptr, error_word=self.error.ptr,
                    timeout_ns=self.timeout_ns, lamport_off=lamport_off, lamport_slot=slot,
                    rs_off=rs_off, rs_slot=rs_slot, ag_off=ag_off, flag_off=0,
                    rank=self.group.local_rank, world=self.world)
                self.kernel_workspace.peers[:self.world] = self.buffer.ptrs
                suffix = _SUFFIX[self.dtype]
                self._geometry: dict = {}  # (bytes, algorithm) -> (grid, block, chunk vecs)
                self._launchers = {}
                ce = self.config.twoshot_copy_engine
                self.copy_engine = self.budgeted if ce is None else bool(ce)
                for algo in (Algorithm.ONESHOT, Algorithm.TWOSHOT):
                    ce_suffix = "_ce" if self.copy_engine and algo == Algorithm.TWOSHOT else ""
                    launcher = Launcher(kernels.get_kernel(
                        "allreduce.cu", f"allreduce_{algo.value}{ce_suffix}_{suffix}"),
                        AllReduceArgs, pdl=self.config.pdl)
                    launcher.args.ws = self.kernel_workspace
                    self._launchers[algo] = launcher
                # The one-shot split by SM role: from split_from bytes, one block per SM,
                # which split_shared_mem bytes of (unused) shared memory ensure.
                self.split_from = self.config.split_from(self.world, self.sms)
                self.split_shared_mem = device_facts().max_shared_per_block // 2 + 1024
                self._split = Launcher(self.split_kernel(
                    kernels.get_kernel("allreduce.cu", f"allreduce_oneshot_split_{suffix}")),
                    AllReduceArgs, pdl=self.config.pdl)
                self._split.args.ws = self.kernel_workspace
                self._split.args.push_blocks = self.config.split_push_sms
                lamport_bytes = AR_LAMPORT_BUFFERS * self.world * slot
                if lamport_bytes:
                    fill = Launcher(kernels.get_kernel("allreduce.cu", "fill_words"), FillArgs)
                    fill.args.dst = self.buffer.ptr + lamport_off
                    fill.args.nbytes = lamport_bytes
                    fill.args.word = _SENTINEL[self.dtype]
                    fill(min(self.sms * 4, -(-lamport_bytes // (16 * 256))), 256, 0)
                cupy.cuda.runtime.deviceSynchronize()
        except BaseException:
            if self.error is not None:
                self.error.close()
            self.buffer.close()
            raise
        self.group.barrier()  # every sentinel is in place before any peer writes

    def split_kernel(self, kernel):
        """``kernel`` (a cupy.RawKernel) allowed ``split_shared_mem`` bytes of shared memory."""
        if kernel.max_dynamic_shared_size_bytes < self.split_shared_mem:
            kernel.max_dynamic_shared_size_bytes = self.split_shared_mem
        return kernel

    # ------------------------------------------------------------------------------------
    def choose(self, nbytes: int, algorithm: Algorithm | str = Algorithm.AUTO) -> Algorithm:
        """The algorithm a message of ``nbytes`` takes; raises if it cannot be served."""
        algo = _ALGORITHMS.get(algorithm)
        if algo is None:
            raise ValueError(f"{algorithm!r} is not a valid Algorithm: choose from "
                             f"{[a.value for a in Algorithm]}")
        if nbytes > self.max_bytes:
            raise ValueError(f"message of {nbytes} bytes exceeds the workspace's max_bytes "
                             f"{self.max_bytes}")
        if not self.ipc:
            if algo in (Algorithm.ONESHOT, Algorithm.TWOSHOT):
                raise ValueError(f"{algo.value} needs CUDA IPC, but {self.no_ipc_reason}")
            return Algorithm.NCCL
        if algo == Algorithm.AUTO:
            return Algorithm.ONESHOT if nbytes <= self._auto_limit else Algorithm.TWOSHOT
        if algo == Algorithm.ONESHOT and nbytes > self.max_oneshot_bytes:
            raise ValueError(f"one-shot message of {nbytes} bytes exceeds the workspace's "
                             f"max_oneshot_bytes {self.max_oneshot_bytes}")
        return algo

    @property
    def nccl(self):
        """The NcclCommunicator of the group, made on first use (collective)."""
        if self._nccl is None:
            from .nccl import NcclCommunicator

            self._nccl = NcclCommunicator(self.group)
        return self._nccl

    def check(self, stream=None) -> None:
        """Wait for ``stream`` and raise ``PeerTimeoutError`` if a peer never arrived."""
        self.check_error(stream, synchronize=True)

    def launch(self, x_ptr: int, out_ptr: int, n: int, algorithm: Algorithm,
               stream_ptr: int) -> None:
        """Launch the ``algorithm`` kernel over ``n`` elements at validated addresses
        (``all_reduce`` checks)."""
        nbytes = n * self.dtype.itemsize
        # The split one-shot's reducers write vectors its pushers may not have read yet:
        # in place (out overlapping x) the unsplit kernel runs, whose threads push a vector
        # before they write it.
        if (algorithm == Algorithm.ONESHOT and nbytes >= self.split_from
                and not overlaps(x_ptr, nbytes, out_ptr, nbytes)):
            args = self._split.args
            args.in_, args.out, args.n = x_ptr, out_ptr, n
            self._split(self.sms, self.config.split_threads, stream_ptr, self.split_shared_mem)
            return
        geometry = self._geometry.get((nbytes, algorithm))
        if geometry is None:
            nvec = -(-nbytes // 16)
            if algorithm == Algorithm.ONESHOT:
                geometry = (*self.config.oneshot_grid(nvec, self.sms, self.budgeted), 0)
            else:
                geometry = self.config.twoshot_grid(nvec, self.world, self.sms, self.budgeted)
            if len(self._geometry) > 256:
                self._geometry.clear()
            self._geometry[(nbytes, algorithm)] = geometry
        launcher = self._launchers[algorithm]
        args = launcher.args
        args.in_, args.out, args.n, args.chunk_vecs = x_ptr, out_ptr, n, geometry[2]
        if algorithm == Algorithm.TWOSHOT and self.copy_engine:
            self._copy_segments(x_ptr, nbytes, stream_ptr, into_inboxes=True)
            launcher(geometry[0], geometry[1], stream_ptr)
            self._copy_segments(out_ptr, nbytes, stream_ptr, into_inboxes=False)
            return
        launcher(geometry[0], geometry[1], stream_ptr)

    def _copy_segments(self, ptr: int, nbytes: int, stream_ptr: int, *, into_inboxes: bool):
        """The copy-engine two-shot's copies (``AllReduceConfig.twoshot_copy_engine``):
        segment p of the input at ``ptr`` into peer p's inbox (``into_inboxes``), or every
        peer's segment from the all-gather inbox to the output at ``ptr``. Segments are
        ``ceil(nbytes / 16 / world)`` vectors of 16 bytes, as the kernel splits them."""
        nvec = -(-nbytes // 16)
        seg = -(-nvec // self.world) * 16
        ws, ptrs = self.kernel_workspace, self.buffer.ptrs
        for q in range(1, self.world):
            p = (ws.rank + q) % self.world
            size = min(seg, nbytes - p * seg)
            if size <= 0:
                continue
            if into_inboxes:
                dst, src = ptrs[p] + ws.rs_off + ws.rank * ws.rs_slot, ptr + p * seg
            else:
                dst, src = ptr + p * seg, self.buffer.ptr + ws.ag_off + p * seg
            cupy.cuda.runtime.memcpyAsync(dst, src, size, cupy.cuda.runtime.memcpyDefault,
                                          stream_ptr)

    def _release(self) -> None:
        if self._nccl is not None:
            self._nccl.close()
        if self.buffer is not None:
            self.buffer.close()
            self.state = None

    def __repr__(self) -> str:
        return (f"AllReduceWorkspace(world={self.world}, dtype={self.dtype.name}, "
                f"max_bytes={self.max_bytes}, max_oneshot_bytes={self.max_oneshot_bytes}, "
                f"ipc={self.ipc}, {self.phase.value})")


def create_allreduce_workspace(group: ProcessGroup | None = None, max_bytes: int | None = None,
                               dtype=bfloat16, *, max_token_num: int | None = None,
                               hidden_dim: int | None = None, **options) -> AllReduceWorkspace:
    """An ``AllReduceWorkspace`` sized by ``max_bytes`` or by ``max_token_num x hidden_dim``
    elements of ``dtype``. Options as in ``AllReduceWorkspace``."""
    if (max_bytes is None) == (max_token_num is None or hidden_dim is None):
        raise ValueError("give either max_bytes, or max_token_num and hidden_dim")
    if max_bytes is None:
        max_bytes = int(max_token_num) * int(hidden_dim) * np.dtype(dtype).itemsize
    return AllReduceWorkspace(group, max_bytes, dtype, **options)


def all_reduce(x, workspace: AllReduceWorkspace, out=None,
               algorithm: Algorithm | str = Algorithm.AUTO, stream=None, *,
               previous_event=None, async_op: bool = False):
    """Sum ``x`` over the workspace's group.

    Args:
        x: any shape, dtype = the workspace's, C-contiguous, 16-byte aligned; any
            ``__dlpack__`` array on this rank's GPU (CuPy, PyTorch, JAX).
        out: same shape and dtype; may be ``x`` (in place). Pass it when capturing a
            CUDA graph (no allocation then).
        algorithm: "auto", "oneshot", "twoshot" or "nccl"; same on every rank.
        stream: where the op runs (see ``moecomm.tensors``).
        previous_event, async_op: overlap options (``moecomm.events``).

    Returns ``out`` as passed (a PyTorch ``out`` stays a tensor), or a new ``cupy.ndarray``;
    with ``async_op``, ``(that, CommHandle)``.
    """
    ws = workspace
    ws.usable("all_reduce")
    handle = stream_handle(stream)
    xa = import_array(x, "x", dtype=FLOAT_DTYPES, device=ws.device_id, stream=handle)
    if xa.dtype != ws.dtype:
        raise TypeError(f"x: dtype {xa.dtype.name} does not match the workspace's "
                        f"{dtype_name(ws.dtype)}")
    algo = ws.choose(xa.nbytes, algorithm)
    if _group.DEBUG:
        ws.group.check_uniform("all_reduce arguments (shape, dtype, algorithm)",
                               (xa.shape, xa.dtype.name, algo.value))
    if out is None:
        out = empty(xa.shape, xa.dtype, handle)
        out_ptr = out.data.ptr
    else:
        out_ptr = import_array(out, "out", dtype=xa.dtype, shape=xa.shape, device=ws.device_id,
                               stream=handle, writable=True).ptr
    if algo != Algorithm.NCCL:
        require_aligned("x", xa.ptr)
        require_aligned("out", out_ptr)
    if previous_event is not None or async_op or _group.DEBUG:
        async_op = events.issue(handle, previous_event, async_op, owner=ws, op="all_reduce")
    if algo == Algorithm.NCCL:
        ws.nccl.all_reduce(x, out, stream=stream)
    elif xa.size:
        ws.launch(xa.ptr, out_ptr, xa.size, algo, handle)
    if not async_op:  # the hot path: no handle
        return out
    return events.finish(out, handle, True, owner=ws, op="all_reduce", keep=(x, out))
