"""vLLM's custom all-reduce lifecycle on moecomm's all-reduce workspace.

Engines built around vLLM's custom all-reduce register an IPC staging buffer, all-reduce
out of place through it, and after CUDA-graph capture exchange the addresses of the
tensors the captured all-reduces read, so replays reduce those tensors in place. The
same lifecycle, method for method (``fa`` is the handle vLLM's functions take; the
``vllm_*`` functions here take a ``CustomAllReduce`` in its place):

=======================================================  =====================================
vLLM / FlashInfer                                         moecomm
=======================================================  =====================================
``init_custom_ar(ipc_tensors, rank_data, rank, fc)``      ``CustomAllReduce(group, dtype)``
``meta_size()``                                           ``meta_size()``: per-rank flag bytes
``register_buffer(fa, ipc_ptrs)``                         ``.register_buffer(SymmetricBuffer
                                                          or per-rank addresses)``
``all_reduce(fa, inp, out, reg_buffer, reg_sz)``          ``.all_reduce(inp, out, reg_buffer=)``
``get_graph_buffer_ipc_meta(fa)``                         ``.get_graph_buffer_ipc_meta()``
``register_graph_buffers(fa, handles, offsets)``          ``.register_graph_buffers(handles,
                                                          offsets)`` (None: gathered here)
``dispose(fa)``                                           ``.close()`` (collective)
=======================================================  =====================================

How it works. One kernel (``kernels_cu/vllm_ar.cu``) reads every rank's input in place
through a device table of addresses (one row of ``world`` addresses per registered buffer
or captured input) and sums in rank order in fp32, reading -0.0 as +0.0, so its results
equal ``moecomm.allreduce.all_reduce``'s bit for bit. It runs on an ``AllReduceWorkspace``'s
call sequence, flags, bounded waits and error word (a start barrier "inputs ready" and an
end barrier "done reading", per block), so it interleaves with ``all_reduce`` calls on
that workspace and a missing peer raises ``PeerTimeoutError`` naming it.

- ``all_reduce(inp, out, reg_buffer=buf)``: ``inp`` is copied into this rank's part of
  the registered buffer ``buf``, then reduced from every rank's ``buf``.
- ``all_reduce(inp, out)`` with ``inp`` inside a registered buffer: read in place at the
  same offset on every rank.
- ``all_reduce(inp, out)`` during CUDA-graph capture with any other ``inp``: the address is
  recorded and the captured launch reads a new table row. After capture,
  ``register_graph_buffers`` exchanges the CUDA IPC handles of the recorded inputs'
  allocations (``cuMemGetAddressRange`` + ``cudaIpcGetMemHandle``; every rank must have
  captured the same sequence of calls), opens the peers' and fills the rows, so replays
  read the peers' inputs directly. A replay before that reads address 0 and faults.
- Anything else is refused before any launch (``ValueError`` naming the address).

Differences from vLLM: one dtype per object (the workspace's Lamport sentinel depends on
it); inputs are always read one-shot (every rank reads all of every input: best for the
decode sizes this path is for); ``out`` must not overlap an input that peers read in place;
captured inputs must come from ``cudaMalloc``-backed memory (CuPy's default pool or
PyTorch's caching allocator), whose IPC handles CUDA can export.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import cupy
import numpy as np

from . import group as _group
from . import kernels
from .allreduce import _FLAG_BYTES, AllReduceConfig, AllReduceWorkspace
from .constants import AR_MAX_BLOCKS, AR_MAX_RANKS, VECTOR_BYTES
from .group import ProcessGroup, default_group
from .kernel_args import RegAllReduceArgs
from .launch import Launcher
from .op import Op, empty, int_at_least, overlaps, require_aligned, supported_dtype
from .symmetric import SymmetricBuffer
from .tensors import FLOAT_DTYPES, bfloat16, dtype_name, import_array, stream_handle

__all__ = ["CustomAllReduce", "meta_size", "vllm_init_custom_ar", "vllm_register_buffer",
           "vllm_all_reduce", "vllm_get_graph_buffer_ipc_meta", "vllm_register_graph_buffers",
           "vllm_meta_size", "vllm_dispose"]

_SUFFIX = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", bfloat16: "bf16"}
_DTYPES = (bfloat16, np.dtype(np.float16), np.dtype(np.float32))  # as error messages name them
_IPC_HANDLE_BYTES = 64


def meta_size() -> int:
    """Bytes of the control region (two-stage flags) each rank's workspace holds: what
    vLLM's ``meta_size()`` (its ``Signal`` struct) sizes."""
    return _FLAG_BYTES


@lru_cache(maxsize=1)
def _address_range():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuMemGetAddressRange_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                   ctypes.c_uint64]
    fn.restype = ctypes.c_int
    return fn


def allocation_of(ptr: int) -> tuple[int, int]:
    """(base, size) of the device allocation holding address ``ptr``."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = _address_range()(ctypes.byref(base), ctypes.byref(size), ptr)
    if status:
        raise ValueError(f"address 0x{ptr:x} is not in a device allocation of this process "
                         f"(cuMemGetAddressRange: error {status})")
    return base.value, size.value


class CustomAllReduce(Op):
    """vLLM's custom all-reduce object (see the module doc for the method mapping).

    Args:
        group: the ranks, inside one node (default: ``moecomm.init()``'s group).
        dtype: bf16, fp16 or fp32: every call's.
        max_buffers: table rows for registered buffers and captured inputs together.
        timeout_s: bound of every wait for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s).
        config: ``AllReduceConfig`` (``twoshot_threads``/``twoshot_blocks_per_sm`` size
            the launch, ``pdl``).

    Creation and ``close()`` are collective.
    """

    name = "CustomAllReduce"

    def __init__(self, group: ProcessGroup | None = None, dtype=bfloat16, *,
                 max_buffers: int = 4096, timeout_s: float | None = None,
                 config: AllReduceConfig | None = None):
        self.group = default_group() if group is None else group
        self.dtype = supported_dtype(dtype, _DTYPES)
        self.max_buffers = int_at_least("max_buffers", max_buffers)
        if self.group.spans_nodes:
            raise ValueError(f"CustomAllReduce needs CUDA IPC, but the group spans "
                             f"{self.group.num_nodes} nodes")
        self.world, self.rank = self.group.size, self.group.rank
        # The workspace's flags, call counter and error word; no data regions.
        self.workspace = AllReduceWorkspace(self.group, VECTOR_BYTES, self.dtype,
                                            max_oneshot_bytes=0, timeout_s=timeout_s,
                                            config=config)
        if not self.workspace.ipc:
            self.workspace.close()
            raise ValueError("CustomAllReduce needs CUDA IPC, which this group refused")
        try:  # free the workspace if a later step fails (on every rank: close is collective)
            with self.group.all_or_none("CustomAllReduce"):  # local steps
                self.config = self.workspace.config
                self._table_host = np.zeros((self.max_buffers, AR_MAX_RANKS), np.uint64)
                self._table = cupy.zeros((self.max_buffers, AR_MAX_RANKS), np.uint64)
                self._buffers: dict[int, tuple[int, int, SymmetricBuffer | None]] = {}
                # own base -> (row, bytes, buffer)
                # Inputs captured since the last register_graph_buffers: address -> row, in
                # capture order. Registration empties it: an address captured again later
                # gets a new row, since its peers' allocations may have changed.
                self._graph: dict[int, int] = {}
                self._graph_rows = 0
                self._opened: dict[tuple[int, bytes], int] = {}  # (peer, handle) -> base
                self._rows = 0
                kernel = f"allreduce_registered_{_SUFFIX[self.dtype]}"
                self._launcher = Launcher(kernels.get_kernel("vllm_ar.cu", kernel),
                                          RegAllReduceArgs, pdl=self.config.pdl)
                self._launcher.args.ws = self.workspace.kernel_workspace
        except BaseException:
            self.workspace.close()
            raise
        self._open(self.workspace.error)

    # -- registration --------------------------------------------------------------------
    def _new_row(self, what: str) -> int:
        if self._rows >= self.max_buffers:
            raise ValueError(f"{what}: all {self.max_buffers} table rows are used (max_buffers)")
        self._rows += 1
        return self._rows - 1

    def _write_rows(self, rows) -> None:
        for row in rows:
            self._table[row].set(self._table_host[row])
        cupy.cuda.runtime.deviceSynchronize()

    def register_buffer(self, buffer) -> None:
        """Register a staging buffer shared over CUDA IPC: a ``SymmetricBuffer`` of this
        group (``moecomm.create_shared_buffer``), or its per-rank addresses as opened in
        this process (vLLM's ``fake_ipc_ptrs``: ``[world]`` ints, this rank's own at
        ``rank``). Not collective. The buffer must outlive this object's use of it."""
        self.usable("register_buffer")
        if isinstance(buffer, SymmetricBuffer):
            if buffer.group.size != self.world or buffer.group.rank != self.rank:
                raise ValueError("buffer: a SymmetricBuffer of another group")
            ptrs, nbytes, keep = list(buffer.ptrs), buffer.nbytes, buffer
        else:
            try:
                ptrs = [int(p) for p in buffer]
            except TypeError:
                raise TypeError("buffer: expected a SymmetricBuffer or a list of per-rank "
                                f"addresses, got {type(buffer).__name__}") from None
            if len(ptrs) != self.world:
                raise ValueError(f"buffer: {len(ptrs)} addresses for a group of {self.world}")
            base, size = allocation_of(ptrs[self.rank])
            nbytes, keep = base + size - ptrs[self.rank], None
        if any(p % VECTOR_BYTES for p in ptrs):
            raise ValueError(f"buffer: addresses must be {VECTOR_BYTES}-byte aligned")
        own = ptrs[self.rank]
        if own in self._buffers:
            raise ValueError(f"buffer: 0x{own:x} is already registered")
        row = self._new_row("register_buffer")
        self._table_host[row, :self.world] = ptrs
        self._buffers[own] = (row, nbytes, keep)
        self._write_rows([row])

    def _registered(self, ptr: int, nbytes: int):
        """(row, offset) of the registered buffer holding [ptr, ptr + nbytes), or None."""
        for base, (row, size, _) in self._buffers.items():
            if base <= ptr and ptr + nbytes <= base + size:
                return row, ptr - base
        return None

    def get_graph_buffer_ipc_meta(self) -> tuple[bytes, list[int]]:
        """The inputs recorded during capture since the last ``register_graph_buffers``:
        the CUDA IPC handles of their allocations (64 bytes each, concatenated) and each
        input's offset in its allocation. Not collective."""
        self.usable("get_graph_buffer_ipc_meta")
        handles, offsets = [], []
        for ptr in self._graph:
            base, _ = allocation_of(ptr)
            try:
                handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
            except cupy.cuda.runtime.CUDARuntimeError as exc:
                raise ValueError(f"captured input 0x{ptr:x}: its allocation cannot be shared "
                                 f"over CUDA IPC ({exc}); allocate it with cudaMalloc") from None
            handles.append(handle)
            offsets.append(ptr - base)
        return b"".join(handles), offsets

    def register_graph_buffers(self, handles=None, offsets=None) -> None:
        """Point the captured launches at every rank's inputs. ``handles``/``offsets``:
        every rank's ``get_graph_buffer_ipc_meta()`` results, in rank order (vLLM's
        arguments); None: gathered over the group here. Collective."""
        self.usable("register_graph_buffers")
        if (handles is None) != (offsets is None):
            raise ValueError("pass both handles and offsets, or neither")
        if handles is None:
            gathered = self.group.allgather(self.get_graph_buffer_ipc_meta())
            handles, offsets = [g[0] for g in gathered], [g[1] for g in gathered]
        pending = list(self._graph)
        if len(handles) != self.world or len(offsets) != self.world:
            raise ValueError(f"handles/offsets: need one entry per rank ({self.world})")
        for r in range(self.world):
            if len(offsets[r]) != len(pending) or len(handles[r]) != len(pending) * _IPC_HANDLE_BYTES:
                raise ValueError(f"rank {r} recorded {len(offsets[r])} graph inputs, this rank "
                                 f"{len(pending)}: every rank must capture the same calls")
            if any(int(o) % VECTOR_BYTES for o in offsets[r]):
                raise ValueError(f"rank {r}: a captured input is not {VECTOR_BYTES}-byte aligned")
        rows = []
        for i, ptr in enumerate(pending):
            row = self._graph[ptr]
            for r in range(self.world):
                if r == self.rank:
                    self._table_host[row, r] = ptr
                    continue
                h = bytes(handles[r][i * _IPC_HANDLE_BYTES:(i + 1) * _IPC_HANDLE_BYTES])
                base = self._opened.get((r, h))
                if base is None:
                    base = cupy.cuda.runtime.ipcOpenMemHandle(
                        h, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess)
                    self._opened[(r, h)] = base
                self._table_host[row, r] = base + int(offsets[r][i])
            rows.append(row)
        self._write_rows(rows)
        self._graph_rows += len(rows)
        self._graph.clear()
        self.group.barrier()

    # -- the all-reduce ------------------------------------------------------------------
    def all_reduce(self, inp, out=None, reg_buffer=None, stream=None):
        """Sum ``inp`` over the group into ``out`` (out of place).

        Args:
            inp: any shape, the object's dtype, C-contiguous, 16-byte aligned, any
                ``__dlpack__`` array on this GPU; inside a registered buffer, or any array
                during CUDA-graph capture, unless ``reg_buffer`` is given.
            out: same shape and dtype, 16-byte aligned; must not overlap ``inp`` when
                ``inp`` is read in place. None: a new array (not during capture).
            reg_buffer: a registered buffer (the ``SymmetricBuffer`` or this rank's address
                in it): ``inp`` is copied into it first (vLLM's eager path).
            stream: where the op runs.
        Returns ``out`` (a new ``cupy.ndarray`` when None was passed).
        """
        self.usable("all_reduce")
        handle = stream_handle(stream)
        xa = import_array(inp, "inp", dtype=FLOAT_DTYPES, device=self.device_id, stream=handle)
        if xa.dtype != self.dtype:
            raise TypeError(f"inp: dtype {xa.dtype.name} does not match the object's "
                            f"{dtype_name(self.dtype)}")
        capturing = bool(handle) and cupy.cuda.runtime.streamIsCapturing(handle) != 0
        if out is None:
            if capturing:
                raise ValueError("out: pass the output when capturing a CUDA graph")
            out = empty(xa.shape, xa.dtype, handle)
            out_ptr = out.data.ptr
        else:
            out_ptr = import_array(out, "out", dtype=xa.dtype, shape=xa.shape,
                                   device=self.device_id, stream=handle, writable=True).ptr
        require_aligned("inp", xa.ptr)
        require_aligned("out", out_ptr)
        nbytes = xa.nbytes
        copy_into = None
        if reg_buffer is not None:
            own = reg_buffer.ptr if isinstance(reg_buffer, SymmetricBuffer) else int(reg_buffer)
            entry = self._buffers.get(own)
            if entry is None:
                raise ValueError(f"reg_buffer: 0x{own:x} is not a registered buffer "
                                 "(register_buffer first)")
            row, size, _ = entry
            if nbytes > size:
                raise ValueError(f"inp: {nbytes} bytes exceed the registered buffer's {size}")
            if overlaps(out_ptr, nbytes, own, nbytes):
                raise ValueError("out: overlaps reg_buffer, where inp is staged for the peers "
                                 "to read")
            offset, copy_into = 0, own
        elif xa.size == 0:  # nothing to read in place (an empty array's address may be 0)
            return out
        else:
            found = self._registered(xa.ptr, nbytes)
            if found is not None:
                row, offset = found
            elif capturing:
                row, offset = self._graph.get(xa.ptr), 0
                if row is None:
                    row = self._new_row("all_reduce during capture")
                    self._graph[xa.ptr] = row
            else:
                raise ValueError(f"inp: 0x{xa.ptr:x} is not in a registered buffer; pass "
                                 "reg_buffer=, register_buffer() it, or capture the call "
                                 "in a CUDA graph and register_graph_buffers() after")
            if overlaps(out_ptr, nbytes, xa.ptr, nbytes):
                raise ValueError("out: overlaps inp, which the peers read in place")
        if _group.DEBUG:
            self.group.check_uniform("CustomAllReduce.all_reduce arguments (shape, dtype, "
                                     "path)", (tuple(xa.shape), xa.dtype.name,
                                               copy_into is not None))
        if xa.size == 0:
            return out
        if copy_into is not None:
            cupy.cuda.runtime.memcpyAsync(copy_into, xa.ptr, nbytes,
                                          cupy.cuda.runtime.memcpyDeviceToDevice, handle)
        a = self._launcher.args
        a.table = self._table.data.ptr + row * AR_MAX_RANKS * 8
        a.out, a.offset, a.n = out_ptr, offset, xa.size
        nvec = -(-nbytes // VECTOR_BYTES)
        threads = self.config.twoshot_threads
        blocks = max(1, min(-(-nvec // threads), self.workspace.sms * self.config.twoshot_blocks_per_sm,
                            AR_MAX_BLOCKS))
        self._launcher(blocks, threads, handle)
        return out

    def check(self, stream=None) -> None:
        """Wait for ``stream`` and raise ``PeerTimeoutError`` if a peer never arrived."""
        self.check_error(stream, synchronize=True)

    def _release(self) -> None:
        cupy.cuda.runtime.deviceSynchronize()
        self.group.barrier()  # no peer reads our inputs any more
        for base in self._opened.values():
            cupy.cuda.runtime.ipcCloseMemHandle(base)
        self._opened.clear()
        self._buffers.clear()
        self.workspace.close()
        self.error = None  # the workspace owned (and closed) it

    def __repr__(self) -> str:
        return (f"CustomAllReduce(world={self.world}, dtype={self.dtype.name}, "
                f"buffers={len(self._buffers)}, graph_inputs={self._graph_rows}, "
                f"{self.phase.value})")


# ------------------------------------------------------------------- vLLM-named functions
def vllm_init_custom_ar(group: ProcessGroup | None = None, dtype=bfloat16, **options):
    """vLLM's ``init_custom_ar``: a ``CustomAllReduce`` (options as there)."""
    return CustomAllReduce(group, dtype, **options)


def vllm_register_buffer(fa: CustomAllReduce, buffer) -> None:
    """vLLM's ``register_buffer``: ``fa.register_buffer(buffer)``."""
    fa.register_buffer(buffer)


def vllm_all_reduce(fa: CustomAllReduce, inp, out=None, reg_buffer=None, stream=None):
    """vLLM's ``all_reduce``: ``fa.all_reduce(inp, out, reg_buffer, stream)``."""
    return fa.all_reduce(inp, out, reg_buffer, stream)


def vllm_get_graph_buffer_ipc_meta(fa: CustomAllReduce) -> tuple[bytes, list[int]]:
    """vLLM's ``get_graph_buffer_ipc_meta``: ``fa.get_graph_buffer_ipc_meta()``."""
    return fa.get_graph_buffer_ipc_meta()


def vllm_register_graph_buffers(fa: CustomAllReduce, handles=None, offsets=None) -> None:
    """vLLM's ``register_graph_buffers``: ``fa.register_graph_buffers(handles, offsets)``."""
    fa.register_graph_buffers(handles, offsets)


def vllm_meta_size() -> int:
    """vLLM's ``meta_size``: ``meta_size()``."""
    return meta_size()


def vllm_dispose(fa: CustomAllReduce) -> None:
    """vLLM's ``dispose``: ``fa.close()`` (collective)."""
    fa.close()
