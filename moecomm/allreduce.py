"""Custom all-reduce over CUDA IPC: Lamport one-shot, two-shot, and the NCCL path.

``all_reduce(x, workspace)`` sums ``x`` (bf16, fp16 or fp32, any shape, any element
count) over the workspace's group. Every rank gets bitwise the same result whatever the
algorithm: peers are summed in rank order in fp32 and rounded once (an input -0.0 counts
as +0.0, the Lamport sentinel).

- one-shot: each rank writes its whole input into its slot of every peer's Lamport
  buffer; readers spin until no -0.0 sentinel is left and sum. One kernel, no barrier;
  three rotating buffers and a device-side call counter keep it graph-capturable.
  Moves ``(world-1) * bytes`` per rank over NVLink: best for small messages.
- two-shot: reduce-scatter then all-gather through the workspace with block-level flag
  barriers; ``2 * (world-1)/world * bytes`` per rank: best for large messages.
- nccl: ``NcclCommunicator.all_reduce``; the only path when the group spans nodes.

``auto`` takes one-shot up to ``oneshot_max_bytes(world)`` and two-shot above. The
crossovers in ``ONESHOT_MAX_BYTES`` come from the byte model above and the Lamport
polling cost; ``python -m moecomm.bench allreduce`` measures the real ones on a host.
"""

from __future__ import annotations

import ctypes
import enum
import warnings

import cupy
import numpy as np

from . import kernels
from .errors import ErrorWord, timeout_ns
from . import group as _group
from .group import ProcessGroup, default_group
from .symmetric import SymmetricBuffer
from .tensors import FLOAT_DTYPES, as_array, as_stream, bfloat16, dtype_name, stream_handle

MAX_BLOCKS = 256  # MOECOMM_AR_MAX_BLOCKS in allreduce.cu
MAX_RANKS = 16    # MOECOMM_AR_MAX_RANKS
ONESHOT_BLOCK = 256
TWOSHOT_BLOCK = 512
# Largest message (bytes) that "auto" sends one-shot, by world size.
ONESHOT_MAX_BYTES = {2: 1 << 20, 4: 512 << 10, 8: 256 << 10}
_SUFFIX = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", bfloat16: "bf16"}
_SENTINEL = {np.dtype(np.float32): 0x80000000, np.dtype(np.float16): 0x80008000,
             bfloat16: 0x80008000}
_CODES = {1: "all_reduce (one-shot)", 2: "all_reduce (two-shot)"}
# ctypes of MOECOMM_AR_ARGS (allreduce.cuh), the order of AllReduceWorkspace.kernel_args.
WORKSPACE_ARGTYPES = (ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_uint64,
                      ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                      ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64)


class Algorithm(str, enum.Enum):
    AUTO = "auto"
    ONESHOT = "oneshot"
    TWOSHOT = "twoshot"
    NCCL = "nccl"


# Algorithm members and their string values (equal hashes) -> member, without Enum lookup.
_ALGORITHMS = {a.value: a for a in Algorithm}


def oneshot_max_bytes(world: int) -> int:
    """The "auto" crossover for a group of ``world`` ranks."""
    for size in sorted(ONESHOT_MAX_BYTES):
        if world <= size:
            return ONESHOT_MAX_BYTES[size]
    return ONESHOT_MAX_BYTES[max(ONESHOT_MAX_BYTES)]


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


class AllReduceWorkspace:
    """Buffers, flags and counters of ``all_reduce`` for one group and one dtype.

    Args:
        group: the ranks (default: ``moecomm.init()``'s group). Within one node the
            custom kernels are used; a group spanning nodes uses NCCL only.
        max_bytes: largest message, in bytes.
        dtype: element type of every message (bf16, fp16, fp32); the Lamport sentinel
            depends on it.
        max_oneshot_bytes: size of the Lamport buffers (default ``min(max_bytes,
            oneshot_max_bytes(world))``); one-shot calls above it are refused.
        timeout_s: how long a kernel waits for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s).
        segment_bytes: two-shot inbox size per peer (default ``max_bytes / world``; the
            fused all-reduce splits by whole rows and needs ``ceil(rows / world)`` rows).

    Memory per rank: ``3 * world * max_oneshot_bytes + 2 * max_bytes`` plus 32 KiB of
    flags. Creation and ``close()`` are collective. If the buffers cannot be shared (CUDA
    IPC refused on some rank), the workspace warns and serves every call through NCCL.
    """

    def __init__(self, group: ProcessGroup | None, max_bytes: int, dtype, *,
                 max_oneshot_bytes: int | None = None, timeout_s: float | None = None,
                 segment_bytes: int | None = None):
        self.group = default_group() if group is None else group
        self.dtype = np.dtype(dtype)
        if self.dtype not in _SUFFIX:
            raise TypeError(f"dtype {self.dtype.name} is not supported, expected bfloat16, "
                            "float16 or float32")
        self.max_bytes = int(max_bytes)
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.world = self.group.size
        self.rank = self.group.rank
        self.timeout_ns = timeout_ns(timeout_s)
        self.ipc = not self.group.spans_nodes
        if self.ipc and self.world > MAX_RANKS:
            raise ValueError(f"group of {self.world} ranks exceeds the {MAX_RANKS} supported")
        self._nccl = None
        self._closed = False
        self.buffer = None
        if not self.ipc:
            self.max_oneshot_bytes = 0
            return

        default_oneshot = min(self.max_bytes, oneshot_max_bytes(self.world))
        self.max_oneshot_bytes = _round16(
            default_oneshot if max_oneshot_bytes is None else int(max_oneshot_bytes))
        lamport_slot = self.max_oneshot_bytes
        self._auto_limit = min(self.max_oneshot_bytes, oneshot_max_bytes(self.world))
        rs_slot = _round16(segment_bytes if segment_bytes is not None
                           else -(-_round16(self.max_bytes) // self.world))
        self.flag_off = 0
        self.lamport_off = 2 * MAX_BLOCKS * MAX_RANKS * 4
        self.rs_off = self.lamport_off + 3 * self.world * lamport_slot
        self.ag_off = self.rs_off + self.world * rs_slot
        total = self.ag_off + _round16(self.max_bytes)
        self.lamport_slot, self.rs_slot = lamport_slot, rs_slot

        try:
            self.buffer = SymmetricBuffer(self.group, total)
        except RuntimeError as exc:  # raised on every rank alike: fall back together
            warnings.warn(f"CUDA IPC is unavailable ({exc}); all_reduce goes through NCCL",
                          RuntimeWarning, stacklevel=2)
            self.ipc, self.max_oneshot_bytes = False, 0
            return
        self.state = cupy.zeros(8, np.uint32)
        self.error = ErrorWord(self.group.local_comm.allgather(self.rank), _CODES)
        suffix = _SUFFIX[self.dtype]
        # The workspace's kernel parameters (MOECOMM_AR_ARGS in allreduce.cuh), which every
        # all-reduce kernel takes after its own.
        self.kernel_args = [self.buffer.peer_ptrs.data.ptr, self.rank, self.world,
                            self.lamport_off, lamport_slot, self.rs_off, rs_slot, self.ag_off,
                            self.flag_off, self.state.data.ptr, self.error.ptr, self.timeout_ns]
        ptr, u64 = ctypes.c_void_p, ctypes.c_uint64
        self._launchers = {}
        for algo in (Algorithm.ONESHOT, Algorithm.TWOSHOT):
            launcher = kernels.Launcher(
                kernels.get_kernel("allreduce.cu", f"allreduce_{algo.value}_{suffix}"),
                [ptr, ptr, u64, *WORKSPACE_ARGTYPES])
            launcher.set_all([0, 0, 0, *self.kernel_args])
            self._launchers[algo] = launcher
        fill = kernels.get_kernel("allreduce.cu", "lamport_fill")
        lamport_bytes = 3 * self.world * lamport_slot
        if lamport_bytes:
            fill((256,), (256,), (np.uint64(self.buffer.ptr + self.lamport_off),
                                  np.uint64(lamport_bytes), np.uint32(_SENTINEL[self.dtype])))
        cupy.cuda.runtime.deviceSynchronize()
        self.group.barrier()  # every sentinel is in place before any peer writes
        self._sms = cupy.cuda.Device().attributes["MultiProcessorCount"]

    # ------------------------------------------------------------------------------------
    def choose(self, nbytes: int, algorithm: Algorithm | str = Algorithm.AUTO) -> Algorithm:
        """The algorithm a message of ``nbytes`` takes; raises if it cannot be served."""
        algorithm_name = algorithm
        algorithm = _ALGORITHMS.get(algorithm)
        if algorithm is None:
            raise ValueError(f"{algorithm_name!r} is not a valid Algorithm: choose from "
                             f"{[a.value for a in Algorithm]}")
        if nbytes > self.max_bytes:
            raise ValueError(f"message of {nbytes} bytes exceeds the workspace's max_bytes "
                             f"{self.max_bytes}")
        if not self.ipc:
            if algorithm in (Algorithm.ONESHOT, Algorithm.TWOSHOT):
                raise ValueError(f"{algorithm.value} needs CUDA IPC, but the group spans "
                                 f"{self.group.num_nodes} nodes")
            return Algorithm.NCCL
        if algorithm == Algorithm.AUTO:
            algorithm = Algorithm.ONESHOT if nbytes <= self._auto_limit else Algorithm.TWOSHOT
        if algorithm == Algorithm.ONESHOT and nbytes > self.max_oneshot_bytes:
            raise ValueError(f"one-shot message of {nbytes} bytes exceeds the workspace's "
                             f"max_oneshot_bytes {self.max_oneshot_bytes}")
        return algorithm

    @property
    def nccl(self):
        """The NcclCommunicator of the group, made on first use (collective)."""
        if self._nccl is None:
            from .nccl import NcclCommunicator

            self._nccl = NcclCommunicator(self.group)
        return self._nccl

    def check(self, stream=None) -> None:
        """Wait for ``stream`` and raise ``PeerTimeoutError`` if a peer never arrived."""
        if self.ipc:
            self.error.check(as_stream(stream), synchronize=True)

    def _launch(self, x: cupy.ndarray, out: cupy.ndarray, algorithm: Algorithm,
                stream_ptr: int) -> None:
        n = x.size
        nvec = -(-n // (16 // self.dtype.itemsize))
        if algorithm == Algorithm.ONESHOT:
            # every block must own at least one vector (see oneshot in allreduce.cu)
            block = ONESHOT_BLOCK
            grid = min(self._sms, -(-nvec // block))
        else:
            block = TWOSHOT_BLOCK
            grid = min(self._sms, MAX_BLOCKS, max(1, -(-nvec // (self.world * block))))
        launcher = self._launchers[algorithm]
        launcher.set(0, x.data.ptr)
        launcher.set(1, out.data.ptr)
        launcher.set(2, n)
        launcher(grid, block, stream_ptr)

    def close(self) -> None:
        """Collective: free the buffers and the NCCL communicator."""
        if self._closed:
            return
        self._closed = True
        if self._nccl is not None:
            self._nccl.close()
        if self.buffer is not None:
            self.buffer.close()
            self.error.close()
            self.state = None

    def __enter__(self) -> "AllReduceWorkspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"AllReduceWorkspace(world={self.world}, dtype={self.dtype.name}, "
                f"max_bytes={self.max_bytes}, max_oneshot_bytes={self.max_oneshot_bytes}, "
                f"ipc={self.ipc})")


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
               algorithm: Algorithm | str = Algorithm.AUTO, stream=None) -> cupy.ndarray:
    """Sum ``x`` over the workspace's group; returns ``out`` (a new array if None).

    Args:
        x: any shape, dtype = the workspace's, C-contiguous, 16-byte aligned.
        out: same shape and dtype; may be ``x`` (in place). Pass it when capturing a
            CUDA graph (no allocation then).
        algorithm: "auto", "oneshot", "twoshot" or "nccl"; same on every rank.
        stream: where the op runs (see ``moecomm.tensors``).
    """
    ws = workspace
    if ws._closed:
        raise RuntimeError("the workspace is closed")
    x = as_array(x, "x", dtype=FLOAT_DTYPES, stream=stream)
    if x.dtype != ws.dtype:
        raise TypeError(f"x: dtype {x.dtype.name} does not match the workspace's "
                        f"{dtype_name(ws.dtype)}")
    algo = ws.choose(x.nbytes, algorithm)
    if _group.DEBUG:
        ws.group.check_uniform("all_reduce arguments (shape, dtype, algorithm)",
                               (x.shape, x.dtype.name, algo.value))
    if out is None:
        out = cupy.empty_like(x)
    else:
        out = as_array(out, "out", dtype=x.dtype, shape=x.shape, stream=stream)
    if algo == Algorithm.NCCL:
        return ws.nccl.all_reduce(x, out, stream=stream)
    for name, arr in (("x", x), ("out", out)):
        if arr.data.ptr % 16:
            raise ValueError(f"{name}: data must be 16-byte aligned (address 0x{arr.data.ptr:x})")
    ws.error.check()
    if x.size:
        ws._launch(x, out, algo, stream_handle(stream))
    return out
