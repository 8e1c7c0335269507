"""The DLPack boundary: caller arrays in, ``cupy.ndarray`` out, zero-copy, validated.

Any object with ``__dlpack__`` on this rank's CUDA device is accepted (CuPy, PyTorch,
JAX, ...). Checks happen here, before any kernel launch, and raise ``TypeError`` (not an
array, wrong dtype) or ``ValueError`` (wrong device, shape, layout) naming the argument.
Results are ``cupy.ndarray`` objects, which ``torch.from_dlpack`` and
``jax.dlpack.from_dlpack`` import zero-copy.

Streams: every op takes ``stream=`` as a ``cupy.cuda.Stream``, a raw ``cudaStream_t``
integer, or any object with ``cuda_stream`` / ``ptr`` / ``__cuda_stream__`` (PyTorch
streams among them); ``None`` means CuPy's current stream (the legacy default stream
unless changed, which is also PyTorch's default). An imported array is made visible on
that stream by its producer (the ``stream`` argument of ``__dlpack__``), so no host
synchronisation is ever needed. A CUDA PyTorch tensor skips the capsule exchange: it is
viewed directly, and torch's current stream, when it is not the op's, is ordered before
the op's with one event.
"""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

import cupy
import numpy as np

try:  # bf16 as a NumPy/CuPy dtype comes from ml_dtypes
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml-dtypes is a core dependency
    bfloat16 = None

_KDL_CUDA = 2
_KDL_CUDA_MANAGED = 13
_KDL_NAMES = {1: "cpu", 2: "cuda", 3: "cuda pinned host", 4: "opencl", 7: "vulkan",
              8: "metal", 10: "rocm", 13: "cuda managed"}

FLOAT_DTYPES = tuple(d for d in (np.dtype(np.float16), bfloat16, np.dtype(np.float32)) if d)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _device_of(x, name: str) -> int:
    """CUDA device id of a DLPack producer; raises if it is not on a CUDA device."""
    try:
        kind, device_id = x.__dlpack_device__()
    except AttributeError:
        raise TypeError(
            f"{name}: expected an array with __dlpack__ (CuPy, PyTorch, JAX), got "
            f"{type(x).__name__}"
        ) from None
    if int(kind) not in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        where = _KDL_NAMES.get(int(kind), f"DLPack device type {int(kind)}")
        raise ValueError(f"{name}: array is on {where}; moecomm needs CUDA device memory")
    return int(device_id)


def as_array(
    x,
    name: str,
    *,
    dtype=None,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    device: int | None = None,
    stream=None,
) -> cupy.ndarray:
    """Import ``x`` zero-copy as a C-contiguous ``cupy.ndarray`` on ``device``.

    Args:
        x: a CuPy array or any ``__dlpack__`` producer.
        name: the argument's name, used in error messages.
        dtype: allowed dtype, or an iterable of allowed dtypes (None: any).
        shape: required shape; ``None`` entries match any extent.
        ndim: required number of dimensions (implied by ``shape``).
        device: required CUDA device id (default: CuPy's current device).
        stream: the stream the caller will use ``x`` on (passed to the producer).
    """
    if isinstance(x, cupy.ndarray):
        arr = x
        if device is None:
            device = cupy.cuda.runtime.getDevice()
        if arr.device.id != device:
            raise ValueError(f"{name}: array is on cuda:{arr.device.id}, expected cuda:{device}")
    else:
        arr = _torch_view(x, name, device, stream)
        if arr is None:
            on = _device_of(x, name)  # before any CUDA call: a CPU array fails here
            if device is None:
                device = cupy.cuda.runtime.getDevice()
            if on != device:
                raise ValueError(f"{name}: array is on cuda:{on}, expected cuda:{device}")
            if stream is None:
                arr = cupy.from_dlpack(x)
            else:
                with as_stream(stream):
                    arr = cupy.from_dlpack(x)
    check(arr, name, dtype=dtype, shape=shape, ndim=ndim)
    return arr


class DeviceArray:
    """A caller's device array as an op sees it after ``import_array``: address, shape,
    dtype. ``obj`` is the caller's object (kept alive for the call; returned as ``out``).
    No CuPy object is built, so importing costs about a microsecond."""

    __slots__ = ("ptr", "shape", "dtype", "obj")

    def __init__(self, ptr: int, shape: tuple, dtype: np.dtype, obj):
        self.ptr, self.shape, self.dtype, self.obj = ptr, shape, dtype, obj

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


class _StreamOrder:
    """Orders torch's current stream before an op's stream with one event per device
    (a record and a wait, ~2 us), instead of a DLPack capsule exchange per tensor."""

    events: dict[int, cupy.cuda.Event] = {}

    @classmethod
    def after(cls, producer: int, consumer: int, device: int) -> None:
        event = cls.events.get(device)
        if event is None:
            event = cls.events[device] = cupy.cuda.Event(block=False, disable_timing=True)
        cupy.cuda.runtime.eventRecord(event.ptr, producer)
        cupy.cuda.runtime.streamWaitEvent(consumer, event.ptr, 0)


def import_array(x, name: str, *, dtype=None, shape=None, ndim=None, device: int | None = None,
                 stream=None) -> DeviceArray:
    """Import ``x`` for one op call without building a CuPy array (the hot paths' version
    of ``as_array``, with the same checks and error messages).

    CuPy arrays and CUDA PyTorch tensors are read directly (a PyTorch tensor produced on
    another stream than ``stream`` is ordered before it with an event); anything else
    goes through DLPack (``as_array``). ``stream`` must be the op's stream as a raw handle
    or any form ``stream_handle`` takes.
    """
    if type(x) is cupy.ndarray:
        if device is None:
            device = cupy.cuda.runtime.getDevice()
        if x.data.device_id != device:
            raise ValueError(f"{name}: array is on cuda:{x.data.device_id}, expected cuda:{device}")
        check(x, name, dtype=dtype, shape=shape, ndim=ndim)
        return DeviceArray(x.data.ptr, x.shape, x.dtype, x)
    arr = _torch_ref(x, name, device, stream)
    if arr is not None:
        check_meta(arr.shape, arr.dtype, name, dtype=dtype, shape=shape, ndim=ndim)
        return arr
    arr = as_array(x, name, dtype=dtype, shape=shape, ndim=ndim, device=device, stream=stream)
    return DeviceArray(arr.data.ptr, arr.shape, arr.dtype, arr)


_torch_dtypes: dict | None = None


def _torch_dtype_map(torch) -> dict:
    """torch dtype -> NumPy dtype, for every dtype both sides have (float8 included)."""
    global _torch_dtypes
    if _torch_dtypes is None:
        table = {getattr(torch, t): np.dtype(t) for t in (
            "float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")}
        if bfloat16 is not None:
            table[torch.bfloat16] = bfloat16
            for name in ("float8_e4m3fn", "float8_e5m2"):
                if hasattr(torch, name) and hasattr(ml_dtypes, name):
                    table[getattr(torch, name)] = np.dtype(getattr(ml_dtypes, name))
        _torch_dtypes = table
    return _torch_dtypes


def _torch_ref(x, name: str, device: int | None, stream) -> DeviceArray | None:
    """A CUDA PyTorch tensor of a mapped dtype, read directly: device and contiguity
    checked, and, when torch's current stream on its device is not ``stream``, that
    stream ordered before ``stream`` with one event (what a DLPack exchange would do, for
    a fraction of its cost). None for anything else (not torch, on the CPU, an unmapped
    dtype): the DLPack path takes it."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        return None
    on = x.get_device()  # -1 on the CPU
    if on < 0:
        return None
    if device is None:
        device = cupy.cuda.runtime.getDevice()
    if on != device:
        raise ValueError(f"{name}: array is on cuda:{on}, expected cuda:{device}")
    dtype = _torch_dtype_map(torch).get(x.dtype)
    if dtype is None:
        return None
    if not x.is_contiguous():
        raise ValueError(
            f"{name}: array must be C-contiguous (strides {tuple(x.stride())}); pass a contiguous copy"
        )
    producer, consumer = _torch_stream(torch, on), stream_handle(stream)
    if producer != consumer:
        _StreamOrder.after(producer, consumer, on)
    return DeviceArray(x.data_ptr(), tuple(x.shape), dtype, x)


def _torch_view(x, name: str, device: int | None, stream) -> cupy.ndarray | None:
    """A CuPy view of a CUDA PyTorch tensor (``_torch_ref``), or None."""
    ref = _torch_ref(x, name, device, stream)
    if ref is None:
        return None
    mem = cupy.cuda.UnownedMemory(ref.ptr, ref.nbytes, x, x.get_device())
    return cupy.ndarray(ref.shape, ref.dtype, cupy.cuda.MemoryPointer(mem, 0))


_raw_stream = None


def _torch_stream(torch, device: int) -> int:
    """torch's current stream on ``device`` as a raw handle. Its private accessor is ten
    times cheaper than ``torch.cuda.current_stream`` (the fallback); looked up once."""
    global _raw_stream
    if _raw_stream is None:
        _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda d: torch.cuda.current_stream(d).cuda_stream)
    return _raw_stream(device)


def check(arr: cupy.ndarray, name: str, *, dtype=None, shape=None, ndim=None) -> None:
    """Validate dtype, shape and C-contiguity of an imported array (see ``as_array``)."""
    check_meta(arr.shape, arr.dtype, name, dtype=dtype, shape=shape, ndim=ndim)
    if not arr.flags.c_contiguous:
        raise ValueError(
            f"{name}: array must be C-contiguous (strides {arr.strides}); pass a contiguous copy"
        )


def check_meta(arr_shape, arr_dtype, name: str, *, dtype=None, shape=None, ndim=None) -> None:
    """Validate the dtype and shape of an imported array (see ``as_array``)."""
    if dtype is not None:
        allowed = (dtype,) if not isinstance(dtype, (tuple, list, set, frozenset)) else dtype
        if arr_dtype not in allowed:
            want = " or ".join(dtype_name(d) for d in allowed)
            raise TypeError(f"{name}: dtype {arr_dtype.name} is not supported, expected {want}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and len(arr_shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(arr_shape)}")
    if shape is not None:
        for axis, (have, want) in enumerate(zip(arr_shape, shape)):
            if want is not None and have != want:
                expected = ", ".join("*" if w is None else str(w) for w in shape)
                raise ValueError(
                    f"{name}: shape {tuple(arr_shape)} does not match ({expected}) (axis {axis})"
                )


def as_arrays(xs: Iterable, name: str, **kwargs) -> list[cupy.ndarray]:
    """``as_array`` on each element of a list, naming them ``name[i]``."""
    return [as_array(x, f"{name}[{i}]", **kwargs) for i, x in enumerate(xs)]


_external: dict[int, cupy.cuda.ExternalStream] = {}


def as_stream(stream=None):
    """A CuPy stream object for ``stream`` (see the module doc for what is accepted)."""
    if stream is None:
        return cupy.cuda.get_current_stream()
    if isinstance(stream, cupy.cuda.Stream) or isinstance(stream, cupy.cuda.ExternalStream):
        return stream
    handle = stream_handle(stream)
    ext = _external.get(handle)
    if ext is None:
        if len(_external) > 256:
            _external.clear()
        ext = _external[handle] = cupy.cuda.ExternalStream(handle)
    return ext


def stream_handle(stream=None) -> int:
    """The raw ``cudaStream_t`` of ``stream`` as an int (0 is the legacy default stream)."""
    if stream is None:
        return cupy.cuda.get_current_stream().ptr
    if isinstance(stream, (int, np.integer)):
        return int(stream)
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    for attr in ("ptr", "cuda_stream"):
        value = getattr(stream, attr, None)
        if value is not None:
            return int(value)
    raise TypeError(
        f"stream: expected a cupy.cuda.Stream, an int handle or an object with cuda_stream/"
        f"ptr, got {type(stream).__name__}"
    )
