"""SymmetricBuffer: one device allocation per rank of a node, shared with every peer.

Each rank ``cudaMalloc``s ``nbytes`` (never from CuPy's pool, so the allocation is whole
and its IPC handle stable), zeroes it, and the handles are allgathered over the
node-local communicator; every peer's buffer is opened with ``cudaIpcOpenMemHandle``.
Kernels get a device table ``peer_ptrs`` (``uint64[local_size]``, local rank order, own
buffer included) and index peers' memory directly.

Creation and ``close()`` are collective over the group. Closing is ordered so no rank
frees memory a peer may still touch: barrier, close peer handles, barrier, free.

Strided views (``moecomm.strided``): ``strided_view`` gives equally strided segments of one
rank's buffer as one array; ``peer_view`` gives every rank's buffer as one array when the
peer mappings are equally strided, which CUDA IPC does not promise (its docstring says
why and what to use instead).
"""

from __future__ import annotations

import math

import cupy
import numpy as np
from cupy.cuda import runtime

from .group import ProcessGroup, default_group
from .strided import common_stride, pack_strided_memory, strided_layout

ALIGNMENT = 256  # bytes; what cudaMalloc guarantees and every vector access needs


class SymmetricBuffer:
    """``nbytes`` of device memory on every rank of a node-local group, peer-accessible.

    Args:
        group: the ranks sharing the buffer; all must be on one (declared) node.
        nbytes: bytes per rank (> 0); every rank must pass the same value.

    Attributes:
        ptrs: device pointer of each local rank's buffer (ints, local rank order), valid
            in this process.
        ptr: this rank's own buffer.
        peer_ptrs: ``cupy.ndarray`` ``uint64[local_size]`` holding ``ptrs`` on the device.
    """

    def __init__(self, group: ProcessGroup | None, nbytes: int):
        group = default_group() if group is None else group
        if group.spans_nodes:
            raise ValueError(
                f"SymmetricBuffer: the group spans {group.num_nodes} nodes "
                f"(gpus_per_node={group.gpus_per_node}); CUDA IPC reaches one node only, "
                "use NcclCommunicator across nodes"
            )
        nbytes = int(nbytes)
        sizes = group.allgather(nbytes)  # first: every rank then raises alike
        if len(set(sizes)) != 1:
            raise ValueError(f"SymmetricBuffer: nbytes differs across ranks: {sizes}")
        if nbytes <= 0:
            raise ValueError(f"SymmetricBuffer: nbytes must be > 0, got {nbytes}")

        self.group = group
        self.nbytes = nbytes
        self.rank = group.local_rank
        self.world_size = group.local_size
        self.device_id = runtime.getDevice()  # where the memory lives; close() works there
        self._opened: list[int] = []
        self._closed = False
        self.ptr = 0
        self.peer_ptrs = None

        error = None
        try:
            self.ptr = runtime.malloc(nbytes)
            runtime.memset(self.ptr, 0, nbytes)
            runtime.deviceSynchronize()  # zeroes visible before any peer can look
            handle = bytes(runtime.ipcGetMemHandle(self.ptr))
        except Exception as exc:  # report collectively below, never leave peers waiting
            error, handle = exc, b""
        handles = group.allgather_bytes(handle, local=True)

        ptrs: list[int] = []
        if error is None and all(handles):
            try:
                for peer, h in enumerate(handles):
                    if peer == self.rank:
                        ptrs.append(self.ptr)
                    else:
                        ptrs.append(
                            runtime.ipcOpenMemHandle(h, runtime.cudaIpcMemLazyEnablePeerAccess)
                        )
                        self._opened.append(ptrs[-1])
                self.peer_ptrs = cupy.asarray(np.array(ptrs, dtype=np.uint64))
            except Exception as exc:
                error = exc
        failed = [r for r, ok in enumerate(group.local_comm.allgather(error is None)) if not ok]
        if failed:
            for p in self._opened:
                runtime.ipcCloseMemHandle(p)
            self._opened = []
            group.local_barrier()  # no peer holds our memory open when it is freed
            self._release()
            raise RuntimeError(
                f"SymmetricBuffer of {nbytes} bytes failed on local rank(s) {failed}"
                + (f": {error}" if error is not None else "")
            ) from error
        self.ptrs = ptrs
        group.local_barrier()

    def view(self, dtype, shape, *, offset: int = 0, rank: int | None = None) -> cupy.ndarray:
        """A ``cupy.ndarray`` over ``rank``'s buffer (default own) at byte ``offset``.

        The view does not keep the buffer alive: do not use it after ``close()``.
        """
        self._check_open()
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, {self.world_size})")
        dtype = np.dtype(dtype)
        count = math.prod(int(d) for d in shape)
        if offset < 0 or offset % dtype.itemsize:
            raise ValueError(f"offset {offset} is negative or not a multiple of {dtype.itemsize}")
        if offset + count * dtype.itemsize > self.nbytes:
            raise ValueError(
                f"view of {count * dtype.itemsize} bytes at offset {offset} exceeds the "
                f"buffer's {self.nbytes} bytes"
            )
        mem = cupy.cuda.UnownedMemory(self.ptrs[rank] + offset, count * dtype.itemsize, self,
                                      device_id=self.device_id)
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0))

    def strided_view(self, dtype, segment_size: int, segment_stride: int, num_segments: int, *,
                     offset: int = 0, rank: int | None = None) -> cupy.ndarray:
        """``pack_strided_memory`` inside ``rank``'s buffer (default own) from byte
        ``offset``: ``[num_segments, segment_size / itemsize]``, segment i at
        ``offset + i * segment_stride``. A view, valid until ``close()``."""
        self._check_open()
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, {self.world_size})")
        _, _, extent = strided_layout(segment_size, segment_stride, num_segments, dtype)
        if offset < 0 or offset + extent > self.nbytes:
            raise ValueError(f"strided view of {extent} bytes at offset {offset} exceeds the "
                             f"buffer's {self.nbytes} bytes")
        return pack_strided_memory(self.ptrs[rank] + offset, segment_size, segment_stride,
                                   num_segments, dtype, self.device_id, owner=self)

    def peer_view(self, dtype, shape, *, offset: int = 0) -> cupy.ndarray:
        """``[world_size, *shape]``: every rank's ``shape`` at byte ``offset`` of its
        buffer, as one array (and one DLPack tensor), when the peer mappings of this
        process lie at equal strides in rank order.

        CUDA IPC (``cudaIpcOpenMemHandle``) maps each peer's allocation at an address the
        driver picks, so the ranks' buffers are equally strided only by chance (always
        for one rank); otherwise this raises ValueError saying so. One array over every
        rank for sure needs one reserved virtual-address range with each rank's memory
        mapped into it (the CUDA VMM API, as FlashInfer's MNNVL workspaces do), which a
        SymmetricBuffer does not make: use ``view(rank=r)`` per rank, or
        ``strided_view`` within one rank's buffer."""
        self._check_open()
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < 0 or offset % dtype.itemsize or offset + size > self.nbytes:
            raise ValueError(f"view of {size} bytes at offset {offset} exceeds the buffer's "
                             f"{self.nbytes} bytes or is not aligned to {dtype.itemsize}")
        stride = self.nbytes if self.world_size == 1 else common_stride(self.ptrs)
        if stride is None:
            raise ValueError(
                "peer_view: the peer mappings are not at equal strides in rank order "
                f"({', '.join(hex(p) for p in self.ptrs)}): CUDA IPC maps each peer where the "
                "driver chooses; use view(rank=r) per rank or strided_view within one buffer")
        flat = pack_strided_memory(self.ptrs[0] + offset, size, stride, self.world_size, dtype,
                                   self.device_id, owner=self)
        return flat.reshape(self.world_size, *shape)

    def _check_open(self):
        if self._closed:
            raise RuntimeError("SymmetricBuffer is closed")

    def _release(self):
        for p in self._opened:
            runtime.ipcCloseMemHandle(p)
        self._opened = []
        self.peer_ptrs = None
        if self.ptr:
            runtime.free(self.ptr)
            self.ptr = 0

    def close(self) -> None:
        """Collective: barrier, close peer handles, barrier, free own memory. Works on the
        buffer's GPU whichever is current (its kernels are the ones waited for)."""
        if self._closed:
            return
        self._closed = True
        with cupy.cuda.Device(self.device_id):
            runtime.deviceSynchronize()
            self.group.local_barrier()  # no peer still reads or writes our memory
            for p in self._opened:
                runtime.ipcCloseMemHandle(p)
            self._opened = []
            self.group.local_barrier()  # every peer has closed its handle to our memory
            self._release()

    def __enter__(self) -> "SymmetricBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"ptr=0x{self.ptr:x}"
        return f"SymmetricBuffer({self.nbytes} bytes x {self.world_size} ranks, {state})"


# ---- the reference API: pointer lists ------------------------------------------------
_by_pointer: dict[int, SymmetricBuffer] = {}


def create_shared_buffer(size_in_bytes: int, group: ProcessGroup | None = None) -> list[int]:
    """Allocate ``size_in_bytes`` on every local rank and share it; every rank's pointer.

    Collective. Free with ``free_shared_buffer``; ``SymmetricBuffer`` is the object form.
    """
    buf = SymmetricBuffer(group, size_in_bytes)
    _by_pointer[buf.ptr] = buf
    return list(buf.ptrs)


def free_shared_buffer(pointers: list[int], group: ProcessGroup | None = None) -> None:
    """Free a buffer made by ``create_shared_buffer`` (collective)."""
    group = default_group() if group is None else group
    own = pointers[group.local_rank]
    buf = _by_pointer.pop(own, None)
    if buf is None:
        raise ValueError(f"0x{own:x} is not a buffer made by create_shared_buffer")
    buf.close()
