"""NcclCommunicator: NCCL (through ``cupy.cuda.nccl``) over a ProcessGroup.

The path for ranks CUDA IPC cannot reach (other nodes) and the baseline every benchmark
is measured against. The unique id travels over MPI. Collectives take any ``__dlpack__``
array on this rank's device and return ``cupy.ndarray`` (or write ``out=``).

NCCL allows one rank per GPU: a group with two ranks on one device is refused with a
``ValueError`` before NCCL is called (NCCL itself would fail with "Duplicate GPU").

Variable-size exchanges (``all_to_all_v``, ``all_gather_v``, ``reduce_scatter_v``) take
per-rank row counts as host integers, as the NCCL API does; the rows are along axis 0.

Every collective also takes ``previous_event=`` and ``async_op=`` (``moecomm.events``):
NCCL runs on ``stream=``; with ``async_op`` the call returns ``(out, CommHandle)``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import cupy
import numpy as np
from cupy.cuda import nccl

from . import events
from . import group as _group
from .group import ProcessGroup, default_group
from .op import out_array
from .tensors import as_array, bfloat16, stream_handle

_NCCL_TYPES = {
    np.dtype(np.int8): nccl.NCCL_INT8,
    np.dtype(np.uint8): nccl.NCCL_UINT8,
    np.dtype(np.int32): nccl.NCCL_INT32,
    np.dtype(np.uint32): nccl.NCCL_UINT32,
    np.dtype(np.int64): nccl.NCCL_INT64,
    np.dtype(np.uint64): nccl.NCCL_UINT64,
    np.dtype(np.float16): nccl.NCCL_FLOAT16,
    np.dtype(np.float32): nccl.NCCL_FLOAT32,
    np.dtype(np.float64): nccl.NCCL_FLOAT64,
}
if bfloat16 is not None:
    _NCCL_TYPES[bfloat16] = nccl.NCCL_BFLOAT16

_OPS = {"sum": nccl.NCCL_SUM, "prod": nccl.NCCL_PROD, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}


def _reduce_type(arr: cupy.ndarray, name: str) -> int:
    try:
        return _NCCL_TYPES[arr.dtype]
    except KeyError:
        raise TypeError(f"{name}: NCCL cannot reduce dtype {arr.dtype.name}") from None


def _op(op: str) -> int:
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}") from None


def _out(out, name: str, shape, dtype, stream) -> cupy.ndarray:
    """The caller's ``out`` checked, or a new array allocated on ``stream`` (CuPy's pool is
    stream-ordered: one allocated on another stream could be handed out again while NCCL
    still writes it)."""
    return out_array(out, name, shape, dtype, stream, alignment=1)


def _overlap(method):
    """Adds the overlap options (``previous_event``, ``async_op``) to a collective, which
    runs with the communicator's GPU current."""
    op = f"NcclCommunicator.{method.__name__}"

    @functools.wraps(method)
    def call(self, *args, stream=None, previous_event=None, async_op=False, **kwargs):
        if cupy.cuda.runtime.getDevice() != self.device_id:  # e.g. JAX switched it
            cupy.cuda.runtime.setDevice(self.device_id)
        if previous_event is None and not async_op and not _group.DEBUG:
            return method(self, *args, stream=stream, **kwargs)
        handle = stream_handle(stream)
        async_op = events.issue(handle, previous_event, async_op, owner=self, op=op)
        out = method(self, *args, stream=stream, **kwargs)
        return events.finish(out, handle, async_op, owner=self, op=op, keep=(args, kwargs))

    return call


class NcclCommunicator:
    """An NCCL communicator over every rank of ``group`` (one rank per GPU).

    Args:
        group: the ranks (default: the group of ``moecomm.init()``); collective.
    """

    def __init__(self, group: ProcessGroup | None = None):
        self.group = default_group() if group is None else group
        self.rank = self.group.rank
        self.size = self.group.size
        device = cupy.cuda.Device()
        self.device_id = device.id  # the GPU of the communicator, current in every call
        where = (self.group.host, device.pci_bus_id)
        placements = self.group.allgather(where)
        owners: dict = {}
        for rank, key in enumerate(placements):
            if key in owners:
                raise ValueError(
                    f"NcclCommunicator: ranks {owners[key]} and {rank} share GPU {key[1]}; "
                    "NCCL needs one rank per GPU"
                )
            owners[key] = rank
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.group.bcast(uid, root=0)
        self._comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    # -- collectives ----------------------------------------------------------------
    @_overlap
    def all_reduce(self, x, out=None, *, op: str = "sum", stream=None) -> cupy.ndarray:
        """Elementwise reduction of ``x`` over all ranks; ``out`` may be ``x`` (in place)."""
        x = as_array(x, "x", stream=stream)
        dtype = _reduce_type(x, "x")
        out = _out(out, "out", x.shape, x.dtype, stream)
        self._comm.allReduce(x.data.ptr, out.data.ptr, x.size, dtype, _op(op),
                             stream_handle(stream))
        return out

    @_overlap
    def all_gather(self, x, out=None, *, stream=None) -> cupy.ndarray:
        """``out[r] = x of rank r``: shape ``[size, *x.shape]``."""
        x = as_array(x, "x", stream=stream)
        out = _out(out, "out", (self.size, *x.shape), x.dtype, stream)
        self._comm.allGather(x.data.ptr, out.data.ptr, x.nbytes, nccl.NCCL_UINT8,
                             stream_handle(stream))
        return out

    @_overlap
    def reduce_scatter(self, x, out=None, *, op: str = "sum", stream=None) -> cupy.ndarray:
        """Rank r gets block r of the reduction of ``x`` ``[size, *block]`` -> ``block``."""
        x = as_array(x, "x", stream=stream)
        if x.ndim < 1 or x.shape[0] != self.size:
            raise ValueError(f"x: axis 0 must be the group size {self.size}, got {x.shape}")
        dtype = _reduce_type(x, "x")
        out = _out(out, "out", x.shape[1:], x.dtype, stream)
        self._comm.reduceScatter(x.data.ptr, out.data.ptr, out.size, dtype, _op(op),
                                 stream_handle(stream))
        return out

    @_overlap
    def all_to_all(self, x, out=None, *, stream=None) -> cupy.ndarray:
        """``x [size, *block]``: block p goes to rank p; ``out[s]`` is rank s's block."""
        x = as_array(x, "x", stream=stream)
        if x.ndim < 1 or x.shape[0] != self.size:
            raise ValueError(f"x: axis 0 must be the group size {self.size}, got {x.shape}")
        out = _out(out, "out", x.shape, x.dtype, stream)
        n = x.nbytes // self.size
        self._exchange(x.data.ptr, [n] * self.size, out.data.ptr, [n] * self.size,
                       stream_handle(stream))
        return out

    @_overlap
    def all_to_all_v(self, x, send_counts: Sequence[int], recv_counts: Sequence[int],
                     out=None, *, stream=None) -> cupy.ndarray:
        """Rows ``x[off_p : off_p + send_counts[p]]`` go to rank p (``off`` = prefix sum);
        ``out`` stacks the ``recv_counts[s]`` rows from each rank s in rank order."""
        x = as_array(x, "x", stream=stream)
        send_counts = self._counts(send_counts, "send_counts")
        recv_counts = self._counts(recv_counts, "recv_counts")
        if sum(send_counts) > x.shape[0]:
            raise ValueError(f"send_counts sum {sum(send_counts)} > x rows {x.shape[0]}")
        row = int(np.prod(x.shape[1:], dtype=np.int64)) * x.itemsize  # also when x has no rows
        out = _out(out, "out", (sum(recv_counts), *x.shape[1:]), x.dtype, stream)
        self._exchange(x.data.ptr, [c * row for c in send_counts],
                       out.data.ptr, [c * row for c in recv_counts], stream_handle(stream))
        return out

    @_overlap
    def all_gather_v(self, x, counts: Sequence[int], out=None, *, stream=None) -> cupy.ndarray:
        """Rank r contributes ``counts[r]`` rows (``x`` rows); every rank gets all rows."""
        x = as_array(x, "x", stream=stream)
        counts = self._counts(counts, "counts")
        if x.shape[0] != counts[self.rank]:
            raise ValueError(f"x has {x.shape[0]} rows, counts[{self.rank}]={counts[self.rank]}")
        row = int(np.prod(x.shape[1:], dtype=np.int64)) * x.itemsize
        out = _out(out, "out", (sum(counts), *x.shape[1:]), x.dtype, stream)
        handle = stream_handle(stream)
        nccl.groupStart()
        offset = 0
        for root, c in enumerate(counts):
            self._comm.broadcast(x.data.ptr, out.data.ptr + offset, c * row, nccl.NCCL_UINT8,
                                 root, handle)
            offset += c * row
        nccl.groupEnd()
        return out

    def all_gather_v_list(self, xs: Sequence, counts: Sequence[int], outs=None, *,
                          stream=None) -> list:
        """``all_gather_v`` of several arrays (each ``counts[rank]`` rows) in one NCCL
        group; ``outs``: optional list of ``[sum(counts), ...]`` arrays."""
        counts = self._counts(counts, "counts")
        xs = [as_array(x, f"xs[{i}]", stream=stream) for i, x in enumerate(xs)]
        if outs is None:
            outs = [None] * len(xs)
        if len(outs) != len(xs):
            raise ValueError(f"outs: {len(outs)} arrays for {len(xs)} inputs")
        handle = stream_handle(stream)
        results, arrays = [], []
        for i, (x, o) in enumerate(zip(xs, outs)):
            if x.shape[0] != counts[self.rank]:
                raise ValueError(f"xs[{i}] has {x.shape[0]} rows, counts[{self.rank}]="
                                 f"{counts[self.rank]}")
            arrays.append(_out(o, f"outs[{i}]", (sum(counts), *x.shape[1:]), x.dtype, stream))
            results.append(arrays[-1] if o is None else o)
        nccl.groupStart()
        for x, out in zip(xs, arrays):
            row = int(np.prod(x.shape[1:], dtype=np.int64)) * x.itemsize
            offset = 0
            for root, c in enumerate(counts):
                if c:
                    self._comm.broadcast(x.data.ptr, out.data.ptr + offset, c * row,
                                         nccl.NCCL_UINT8, root, handle)
                offset += c * row
        nccl.groupEnd()
        return results

    def send_recv_bytes(self, send_ptr: int, send_bytes: Sequence[int], recv_ptr: int,
                        recv_bytes: Sequence[int], *, stream=None) -> None:
        """Grouped send/recv of byte ranges at device addresses: ``send_bytes[p]`` bytes
        (at prefix-sum offsets) to rank p, ``recv_bytes[s]`` from rank s (the caller keeps
        the memory alive and valid)."""
        self._exchange(int(send_ptr), [int(b) for b in send_bytes], int(recv_ptr),
                       [int(b) for b in recv_bytes], stream_handle(stream))

    @_overlap
    def reduce_scatter_v(self, x, counts: Sequence[int], out=None, *, op: str = "sum",
                         stream=None) -> cupy.ndarray:
        """``x`` has ``sum(counts)`` rows; rank r gets the reduction of its ``counts[r]``."""
        x = as_array(x, "x", stream=stream)
        counts = self._counts(counts, "counts")
        if x.shape[0] != sum(counts):
            raise ValueError(f"x has {x.shape[0]} rows, sum(counts)={sum(counts)}")
        dtype = _reduce_type(x, "x")
        per_row = int(np.prod(x.shape[1:], dtype=np.int64))
        out = _out(out, "out", (counts[self.rank], *x.shape[1:]), x.dtype, stream)
        handle = stream_handle(stream)
        nccl.groupStart()
        offset = 0
        for root, c in enumerate(counts):
            self._comm.reduce(x.data.ptr + offset * per_row * x.itemsize, out.data.ptr,
                              c * per_row, dtype, _op(op), root, handle)
            offset += c
        nccl.groupEnd()
        return out

    # -- internals --------------------------------------------------------------------
    def _counts(self, counts: Sequence[int], name: str) -> list[int]:
        counts = [int(c) for c in counts]
        if len(counts) != self.size or min(counts) < 0:
            raise ValueError(f"{name}: need {self.size} non-negative counts, got {counts}")
        return counts

    def _exchange(self, send_ptr: int, send_bytes: list[int], recv_ptr: int,
                  recv_bytes: list[int], handle: int) -> None:
        """Grouped send/recv of byte ranges (prefix-sum offsets) with every rank."""
        nccl.groupStart()
        s_off = r_off = 0
        for peer in range(self.size):
            if send_bytes[peer]:
                self._comm.send(send_ptr + s_off, send_bytes[peer], nccl.NCCL_UINT8, peer, handle)
            if recv_bytes[peer]:
                self._comm.recv(recv_ptr + r_off, recv_bytes[peer], nccl.NCCL_UINT8, peer, handle)
            s_off += send_bytes[peer]
            r_off += recv_bytes[peer]
        nccl.groupEnd()

    def close(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None

    def __enter__(self) -> "NcclCommunicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
