"""Strided views: one array over equally strided segments of device memory.

``pack_strided_memory(ptr, segment_size, segment_stride, num_segments, dtype, device_id)``
(FlashInfer's name) views ``num_segments`` segments of ``segment_size`` bytes, segment i
at ``ptr + i * segment_stride``, as a ``cupy.ndarray [num_segments, segment_size /
itemsize]`` with byte strides ``(segment_stride, itemsize)``. It is a view (no copy, no
ownership: pass ``owner`` to keep the memory's owner alive with it) and exports itself
through DLPack with those strides, so ``torch.from_dlpack`` / ``jax.dlpack.from_dlpack``
see the same memory as one tensor.

``SymmetricBuffer.strided_view`` applies it inside one rank's buffer (e.g. one slot of
each rotating buffer of a workspace) and ``SymmetricBuffer.peer_view`` across the ranks'
buffers when their peer mappings happen to be equally strided (see there why that is
not guaranteed under CUDA IPC).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def strided_layout(segment_size: int, segment_stride: int, num_segments: int,
                   dtype) -> tuple[tuple[int, int], tuple[int, int], int]:
    """``(shape, byte strides, extent in bytes)`` of the view of ``num_segments`` segments
    of ``segment_size`` bytes at ``segment_stride`` bytes apart. Sizes and strides must be
    whole elements; segments may not overlap (``segment_stride >= segment_size``)."""
    dtype = np.dtype(dtype)
    size = _int("segment_size", segment_size, 0)
    stride = _int("segment_stride", segment_stride, 0)
    count = _int("num_segments", num_segments, 1)
    item = dtype.itemsize
    if size % item or stride % item:
        raise ValueError(f"segment_size={size} and segment_stride={stride} must be multiples of "
                         f"the {dtype.name} itemsize {item}")
    if count > 1 and stride < size:
        raise ValueError(f"segment_stride={stride} < segment_size={size}: segments would overlap")
    return (count, size // item), (stride, item), (count - 1) * stride + size


def pack_strided_memory(ptr: int, segment_size: int, segment_stride: int, num_segments: int,
                        dtype, device_id: int | None = None, *, owner=None):
    """A ``cupy.ndarray [num_segments, segment_size // itemsize]`` over device memory at
    ``ptr`` (an int) on ``device_id`` (default: the current device), segment i at
    ``ptr + i * segment_stride`` bytes. ``owner`` is kept alive by the view (None: the
    caller keeps the memory alive while the view is used)."""
    import cupy

    ptr = _int("ptr", ptr, 1)
    dtype = np.dtype(dtype)
    shape, strides, extent = strided_layout(segment_size, segment_stride, num_segments, dtype)
    if ptr % dtype.itemsize:
        raise ValueError(f"ptr 0x{ptr:x} is not aligned to the {dtype.name} itemsize")
    if device_id is None:
        device_id = cupy.cuda.runtime.getDevice()
    mem = cupy.cuda.UnownedMemory(ptr, extent, owner, _int("device_id", device_id, 0))
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0), strides=strides)


def common_stride(ptrs: Sequence[int]) -> int | None:
    """The positive distance between consecutive addresses of ``ptrs`` when it is the same
    for all of them (None otherwise; None for fewer than two)."""
    if len(ptrs) < 2:
        return None
    gaps = {int(b) - int(a) for a, b in zip(ptrs, ptrs[1:])}
    gap = gaps.pop()
    return gap if not gaps and gap > 0 else None
