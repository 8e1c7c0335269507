"""The DLPack boundary: caller arrays in, ``cupy.ndarray`` out, zero-copy, validated.

Any object with ``__dlpack__`` on this rank's CUDA device is accepted (CuPy, PyTorch,
JAX, ...). Checks happen here, in the one import path every op goes through, before any
kernel launch, and raise ``TypeError`` (not an array, wrong dtype) or ``ValueError``
(wrong device -- another GPU or the host --, shape, layout) naming the argument, where
the array is and where it was expected. Results are ``cupy.ndarray`` objects, which
``torch.from_dlpack`` and ``jax.dlpack.from_dlpack`` import zero-copy.

Three import paths, cheapest first:

- ``cupy.ndarray``: read directly.
- a CUDA PyTorch tensor of a dtype in ``_torch_dtype_map`` (float8 and packed fp4
  included): read directly (``data_ptr``, shape, dtype), no capsule; torch's current
  stream, when it is not the op's, is ordered before the op's stream with one event.
- anything else: DLPack, consumed by this module's own parser (``_consume``): the
  producer is asked for a (versioned when it can) capsule made ready on the op's stream,
  the ``DLManagedTensor`` is read with ctypes and wrapped as a ``cupy.ndarray`` over
  ``cupy.cuda.UnownedMemory`` whose owner calls the producer's deleter once the last
  view is gone. Own parser, not ``cupy.from_dlpack``: CuPy refuses the float8 / float4
  DLPack dtype codes (JAX float8 arrays), and one parser means one device check and one
  dtype table for every producer. 8-bit floats arrive as their ``ml_dtypes`` dtype; packed
  fp4 (two e2m1 codes per byte) as uint8 of the same shape.

Dtypes of quantized data (``CODE_DTYPES`` ...) are listed once below: an op that writes
e4m3 codes takes uint8 or float8_e4m3fn arrays from any framework. CuPy holds bf16 and
the 8-bit floats only as views (``cupy.ndarray(shape, ml_dtypes.float8_e4m3fn, memptr)``,
no arithmetic on them); such arrays are accepted like any other.

Lifetimes: the import keeps the producer's buffer referenced for the call only. An op's
kernels may still read it afterwards, so the caller keeps inputs alive until the op's
stream is past them (torch: as with any tensor used on a second stream, or
``record_stream``; JAX: a dropped array's buffer may be reused on JAX's stream).
JAX arrays are immutable: give outputs as CuPy or torch arrays, or take moecomm's.

Streams: every op takes ``stream=`` as a ``cupy.cuda.Stream``, a raw ``cudaStream_t``
integer, or any object with ``cuda_stream`` / ``ptr`` / ``__cuda_stream__`` (PyTorch
streams among them); ``None`` means CuPy's current stream (the legacy default stream
unless changed, which is also PyTorch's default). How a stream object yields its handle
is looked up once per type. An imported array is made visible on that stream by its
producer (the ``stream`` argument of ``__dlpack__``; JAX makes the stream wait for the
computation that produces the array), so no host synchronisation is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import struct
import sys
import threading
from typing import Iterable, Sequence

import cupy
import numpy as np

try:  # bf16 and the 8-bit floats as NumPy/CuPy dtypes come from ml_dtypes
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml-dtypes is a core dependency
    ml_dtypes = None
    bfloat16 = None


def _ml(name: str):
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else None


float8_e4m3fn = _ml("float8_e4m3fn")
float8_e5m2 = _ml("float8_e5m2")
float8_e8m0fnu = _ml("float8_e8m0fnu")
_U8, _I32 = np.dtype(np.uint8), np.dtype(np.int32)

FLOAT_DTYPES = tuple(d for d in (np.dtype(np.float16), bfloat16, np.dtype(np.float32)) if d)
# Quantized data, by what the bytes mean (uint8 is always accepted as raw storage):
CODE_DTYPES = tuple(d for d in (_U8, float8_e4m3fn) if d)          # e4m3 codes
FP4_DTYPES = (_U8,)          # two e2m1 codes per byte (torch.float4_e2m1fn_x2 arrives so)
E4M3_SCALE_DTYPES = CODE_DTYPES                                     # NVFP4 block scales
UE8M0_DTYPES = tuple(d for d in (_I32, _U8, float8_e8m0fnu) if d)  # exponent bytes

_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13
_KDL_NAMES = {1: "cpu", 2: "cuda", 3: "cuda pinned host", 4: "opencl", 7: "vulkan",
              8: "metal", 10: "rocm", 13: "cuda managed"}


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _where(kind: int, device_id: int) -> str:
    if kind in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        return f"cuda:{device_id}" + (" (managed)" if kind == _KDL_CUDA_MANAGED else "")
    return _KDL_NAMES.get(kind, f"DLPack device type {kind}")


def _expected(device: int | None) -> str:
    """The device an array must be on, for an error message (no CUDA call needed)."""
    if device is None:
        try:
            device = cupy.cuda.runtime.getDevice()
        except Exception:  # no CUDA here: the message still says what is wrong
            return "CUDA device memory"
    return f"cuda:{device}"


def _wrong_device(name: str, where: str, device: int | None) -> ValueError:
    return ValueError(f"{name}: array is on {where}, expected {_expected(device)}")


def _device_of(x, name: str, device: int | None = None) -> tuple[int, int]:
    """(DLPack device type, CUDA device id) of a DLPack producer; raises if it is not on
    a CUDA device."""
    try:
        kind, device_id = x.__dlpack_device__()
    except AttributeError:
        raise TypeError(
            f"{name}: expected an array with __dlpack__ (CuPy, PyTorch, JAX), got "
            f"{type(x).__name__}"
        ) from None
    kind, device_id = int(kind), int(device_id)
    if kind not in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        raise _wrong_device(name, _where(kind, device_id), device)
    return kind, device_id


# ------------------------------------------------------------------ DLPack consumer
# ctypes mirrors of dlpack.h's structs: the layout's definition (checked against the
# struct formats below) and what tests build capsules with.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32),
                ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


# The deleter runs with the GIL held (a Python-object producer may drop references).
_DELETER = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes, _capsule_is_valid.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.argtypes, _capsule_pointer.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_void_p
_capsule_rename = ctypes.pythonapi.PyCapsule_SetName
_capsule_rename.argtypes, _capsule_rename.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
# PyCapsule_SetName keeps the pointer: these objects live as long as the module.
_NAME, _USED = ctypes.c_char_p(b"dltensor"), ctypes.c_char_p(b"used_dltensor")
_NAME_V, _USED_V = ctypes.c_char_p(b"dltensor_versioned"), ctypes.c_char_p(b"used_dltensor_versioned")
_READ_ONLY = 1  # DLPACK_FLAG_BITMASK_READ_ONLY

# DLPack (code, bits) -> NumPy dtype, lanes == 1 (dlpack.h, DLDataTypeCode).
_DL_DTYPES = {(0, b): np.dtype(f"int{b}") for b in (8, 16, 32, 64)}
_DL_DTYPES.update({(1, b): np.dtype(f"uint{b}") for b in (8, 16, 32, 64)})
_DL_DTYPES.update({(2, 16): np.dtype(np.float16), (2, 32): np.dtype(np.float32),
                   (2, 64): np.dtype(np.float64), (5, 64): np.dtype(np.complex64),
                   (5, 128): np.dtype(np.complex128), (6, 8): np.dtype(np.bool_)})
if bfloat16 is not None:
    _DL_DTYPES[(4, 16)] = bfloat16
for _code, _name in ((7, "float8_e3m4"), (8, "float8_e4m3"), (9, "float8_e4m3b11fnuz"),
                     (10, "float8_e4m3fn"), (11, "float8_e4m3fnuz"), (12, "float8_e5m2"),
                     (13, "float8_e5m2fnuz"), (14, "float8_e8m0fnu")):
    if _ml(_name) is not None:
        _DL_DTYPES[(_code, 8)] = _ml(_name)
_DL_FLOAT4 = 17  # kDLFloat4_e2m1fn


def dlpack_dtype(code: int, bits: int, lanes: int) -> np.dtype:
    """The NumPy dtype moecomm sees a DLPack dtype as: 8-bit floats as their ml_dtypes
    dtype, packed fp4 (4 bits x 2 lanes, one byte per element) as uint8. TypeError for
    anything else (sub-byte elements, vectors, float6)."""
    if lanes == 1 and (code, bits) in _DL_DTYPES:
        return _DL_DTYPES[(code, bits)]
    if code == _DL_FLOAT4 and bits * lanes == 8:
        return _U8
    if code == _DL_FLOAT4:
        raise TypeError("float4_e2m1fn arrays of one code per element index are not supported: "
                        "pass the packed bytes (uint8, two codes per byte)")
    raise TypeError(f"DLPack dtype (code={code}, bits={bits}, lanes={lanes}) is not supported")


class DLPackInfo:
    """What a DLPack capsule describes, read without taking ownership (``_parse``).
    ``ptr`` includes ``byte_offset``; ``strides`` are in bytes, None when compact."""

    __slots__ = ("ptr", "device_type", "device_id", "dtype", "shape", "strides", "read_only",
                 "versioned", "managed", "deleter")

    @property
    def nbytes(self) -> int:
        """Bytes spanned by the elements (0 for an empty array)."""
        size = 1
        for n in self.shape:
            size *= n
        if size == 0:
            return 0
        if self.strides is None:
            return size * self.dtype.itemsize
        return self.dtype.itemsize + sum((n - 1) * s for n, s in zip(self.shape, self.strides))


# Offsets of dlpack.h's structs (64-bit): DLTensor is data, device (type, id), ndim, dtype
# (code, bits, lanes), shape, strides, byte_offset; DLManagedTensor appends manager_ctx and
# deleter; DLManagedTensorVersioned is version (major, minor), manager_ctx, deleter, flags,
# then the DLTensor. Read with one struct.unpack: ctypes attribute access costs ~0.3 us each.
_TENSOR = struct.Struct("=QiiiBBHQQQ")
_LEGACY_TAIL = struct.Struct("=QQ")        # manager_ctx, deleter, after the DLTensor
_VERSIONED_HEAD = struct.Struct("=IIQQQ")  # major, minor, manager_ctx, deleter, flags
_I64 = {}
assert _TENSOR.size == ctypes.sizeof(_DLTensor) == 48
assert ctypes.sizeof(_DLManagedTensorVersioned) == _VERSIONED_HEAD.size + _TENSOR.size


def _int64s(address: int, n: int) -> tuple:
    fmt = _I64.get(n) or _I64.setdefault(n, struct.Struct(f"={n}q"))
    return fmt.unpack(ctypes.string_at(address, 8 * n))


def _parse(capsule, name: str) -> DLPackInfo:
    """Read a (versioned or legacy) DLPack capsule; raises, leaving it unconsumed (its own
    destructor then frees it), if it is used, of an unknown major version or dtype."""
    if _capsule_is_valid(capsule, _NAME_V):
        managed = _capsule_pointer(capsule, _NAME_V)
        raw = ctypes.string_at(managed, _VERSIONED_HEAD.size + _TENSOR.size)
        major, minor, _, deleter, flags = _VERSIONED_HEAD.unpack_from(raw)
        if major != 1:
            raise BufferError(f"{name}: DLPack version {major}.{minor} is not supported")
        tensor = _TENSOR.unpack_from(raw, _VERSIONED_HEAD.size)
        versioned, read_only = True, bool(flags & _READ_ONLY)
    elif _capsule_is_valid(capsule, _NAME):
        managed = _capsule_pointer(capsule, _NAME)
        raw = ctypes.string_at(managed, _TENSOR.size + _LEGACY_TAIL.size)
        tensor = _TENSOR.unpack_from(raw)
        deleter = _LEGACY_TAIL.unpack_from(raw, _TENSOR.size)[1]
        versioned, read_only = False, False
    else:
        raise TypeError(f"{name}: __dlpack__ gave no unconsumed DLPack capsule ({capsule!r})")
    data, device_type, device_id, ndim, code, bits, lanes, shape, strides, offset = tensor
    info = DLPackInfo()
    info.dtype = dlpack_dtype(code, bits, lanes)
    info.ptr = data + offset
    info.device_type, info.device_id = device_type, device_id
    info.shape = _int64s(shape, ndim) if ndim else ()
    info.strides = None
    if strides and ndim:
        itemsize = info.dtype.itemsize
        # A dimension of extent 1 (or an empty array) never steps: its stride, whatever
        # its sign, is taken as 0.
        empty = 0 in info.shape
        info.strides = tuple(0 if empty or n == 1 else s * itemsize
                             for n, s in zip(info.shape, _int64s(strides, ndim)))
        if any(s < 0 for s in info.strides):
            raise ValueError(f"{name}: negative strides {info.strides}; pass a contiguous copy")
    info.read_only, info.versioned, info.managed, info.deleter = read_only, versioned, managed, deleter
    return info


class _DLPackOwner:
    """Owns a consumed DLPack tensor (the ``UnownedMemory`` owner of its view): calls the
    producer's deleter exactly once, when the last array over it is gone."""

    __slots__ = ("managed", "deleter")

    def __init__(self, managed: int, deleter: int | None):
        self.managed, self.deleter = managed, deleter

    def __del__(self):
        managed, self.managed = self.managed, None
        if managed and self.deleter:
            try:
                _DELETER(self.deleter)(managed)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


def _consume(capsule, name: str, device: int | None, *, cuda: bool = True,
             writable: bool = False) -> cupy.ndarray:
    """A ``cupy.ndarray`` viewing a DLPack capsule, which this takes ownership of. The
    capsule's device must be CUDA device ``device`` (``cuda=False``, for tests: any);
    with ``writable`` (the op writes the array) a capsule flagged read-only is refused,
    and stays with its producer."""
    info = _parse(capsule, name)
    if cuda:
        if info.device_type not in (_KDL_CUDA, _KDL_CUDA_MANAGED):
            raise _wrong_device(name, _where(info.device_type, info.device_id), device)
        if device is not None and info.device_id != device:
            raise _wrong_device(name, _where(info.device_type, info.device_id), device)
    if writable and info.read_only:
        raise ValueError(f"{name}: the array is read-only (its DLPack export says so) and "
                         f"the op writes it; pass a writable array")
    if _capsule_rename(capsule, _USED_V if info.versioned else _USED):
        raise BufferError(f"{name}: could not take the DLPack capsule")  # pragma: no cover
    owner = _DLPackOwner(info.managed, info.deleter)
    mem = cupy.cuda.UnownedMemory(info.ptr, info.nbytes, owner, max(info.device_id, 0))
    return cupy.ndarray(info.shape, info.dtype, cupy.cuda.MemoryPointer(mem, 0),
                        strides=info.strides)


def _dlpack_stream(handle: int) -> int:
    """``handle`` as the ``stream`` argument of ``__dlpack__`` (0 is spelt 1 there)."""
    return 1 if handle == 0 else handle


def _from_dlpack(x, name: str, device: int | None, stream, writable: bool) -> cupy.ndarray:
    """Import any DLPack producer (see the module doc); device checked before export."""
    kind, on = _device_of(x, name, device)  # before any CUDA call: a host array fails here
    if device is None:
        device = cupy.cuda.runtime.getDevice()
    if on != device:
        raise _wrong_device(name, _where(kind, on), device)
    arg = _dlpack_stream(stream_handle(stream))
    try:
        try:
            capsule = x.__dlpack__(stream=arg, max_version=(1, 0))
        except TypeError:  # a producer older than DLPack 1.0
            capsule = x.__dlpack__(stream=arg)
    except (BufferError, TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: {type(x).__name__} refused to export it through DLPack "
                        f"({type(exc).__name__}: {exc})") from exc
    return _consume(capsule, name, device, writable=writable)


# ------------------------------------------------------------------ imports
def as_array(
    x,
    name: str,
    *,
    dtype=None,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    device: int | None = None,
    stream=None,
    writable: bool = False,
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
        writable: the op writes ``x``: a DLPack export flagged read-only is refused.
    """
    if isinstance(x, cupy.ndarray):
        arr = x
        if device is None:
            device = cupy.cuda.runtime.getDevice()
        if arr.data.device_id != device:
            raise _wrong_device(name, f"cuda:{arr.data.device_id}", device)
    else:
        arr = _torch_view(x, name, device, stream)
        if arr is None:
            arr = _from_dlpack(x, name, device, stream, writable)
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
    """Orders torch's current stream before an op's stream with one event per device and
    thread (a record and a wait, ~2 us), instead of a DLPack capsule exchange per tensor.
    Per thread: a wait takes the event's latest record, which another thread's record
    between ours and the wait would replace."""

    _local = threading.local()

    @classmethod
    def after(cls, producer: int, consumer: int, device: int) -> None:
        events = getattr(cls._local, "events", None)
        if events is None:
            events = cls._local.events = {}
        event = events.get(device)
        if event is None:
            event = events[device] = cupy.cuda.Event(block=False, disable_timing=True)
        _event_record(event.ptr, producer)
        _stream_wait_event(consumer, event.ptr, 0)


_event_record = cupy.cuda.runtime.eventRecord
_stream_wait_event = cupy.cuda.runtime.streamWaitEvent


def import_array(x, name: str, *, dtype=None, shape=None, ndim=None, device: int | None = None,
                 stream=None, writable: bool = False) -> DeviceArray:
    """Import ``x`` for one op call without building a CuPy array (the hot paths' version
    of ``as_array``, with the same checks and error messages).

    CuPy arrays and CUDA PyTorch tensors are read directly (a PyTorch tensor produced on
    another stream than ``stream`` is ordered before it with an event); anything else
    goes through DLPack (``as_array``). ``stream`` must be the op's stream as a raw handle
    or any form ``stream_handle`` takes.
    """
    if type(x) is cupy.ndarray:
        data = x.data
        if device is None:
            device = cupy.cuda.runtime.getDevice()
        if data.device_id != device:
            raise _wrong_device(name, f"cuda:{data.device_id}", device)
        check(x, name, dtype=dtype, shape=shape, ndim=ndim)
        return DeviceArray(data.ptr, x.shape, x.dtype, x)
    arr = _torch_ref(x, name, device, stream)
    if arr is not None:
        check_meta(arr.shape, arr.dtype, name, dtype=dtype, shape=shape, ndim=ndim)
        return arr
    arr = as_array(x, name, dtype=dtype, shape=shape, ndim=ndim, device=device, stream=stream,
                   writable=writable)
    return DeviceArray(arr.data.ptr, arr.shape, arr.dtype, arr)


_torch_dtypes: dict | None = None


def _torch_dtype_map(torch) -> dict:
    """torch dtype -> NumPy dtype, for every dtype both sides have: the 8-bit floats as
    their ml_dtypes dtype, ``float4_e2m1fn_x2`` (two e2m1 codes per byte) as uint8."""
    global _torch_dtypes
    if _torch_dtypes is None:
        table = {getattr(torch, t): np.dtype(t) for t in (
            "float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
            "uint16", "uint32", "uint64", "complex64", "complex128") if hasattr(torch, t)}
        if bfloat16 is not None:
            table[torch.bfloat16] = bfloat16
            for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                         "float8_e8m0fnu"):
                if hasattr(torch, name) and _ml(name) is not None:
                    table[getattr(torch, name)] = _ml(name)
        if hasattr(torch, "float4_e2m1fn_x2"):
            table[torch.float4_e2m1fn_x2] = _U8
        _torch_dtypes = table
    return _torch_dtypes


def _torch_ref(x, name: str, device: int | None, stream) -> DeviceArray | None:
    """A CUDA PyTorch tensor of a mapped dtype, read directly: device and contiguity
    checked, and, when torch's current stream on its device is not ``stream``, that
    stream ordered before ``stream`` with one event (what a DLPack exchange would do, for
    a fraction of its cost). None for anything else (not torch, on the CPU, an unmapped
    dtype): the DLPack path takes it."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor) or not x.is_cuda:
        return None  # XPU and MPS tensors have device indices too: only CUDA is read here
    on = x.get_device()
    if device is None:
        device = cupy.cuda.runtime.getDevice()
    if on != device:
        raise _wrong_device(name, f"cuda:{on}", device)
    dtype = (_torch_dtypes or _torch_dtype_map(torch)).get(x.dtype)
    if dtype is None:
        return None
    if not x.is_contiguous():
        raise ValueError(
            f"{name}: array must be C-contiguous (strides {tuple(x.stride())}); pass a contiguous copy"
        )
    producer = (_raw_stream or _torch_stream_fn(torch))(on)
    consumer = stream if type(stream) is int else stream_handle(stream)
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


def _torch_stream_fn(torch):
    """torch's current stream on a device as a raw handle: its private accessor is ten
    times cheaper than ``torch.cuda.current_stream`` (the fallback); looked up once."""
    global _raw_stream
    if _raw_stream is None:
        _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda d: torch.cuda.current_stream(d).cuda_stream)
    return _raw_stream


def _torch_stream(torch, device: int) -> int:
    return _torch_stream_fn(torch)(device)


# CuPy keeps C-contiguity as a plain attribute; ``flags`` builds an object per access.
_c_contiguous = (operator.attrgetter("_c_contiguous") if hasattr(cupy.ndarray, "_c_contiguous")
                 else lambda a: a.flags.c_contiguous)


def check(arr: cupy.ndarray, name: str, *, dtype=None, shape=None, ndim=None) -> None:
    """Validate dtype, shape and C-contiguity of an imported array (see ``as_array``)."""
    check_meta(arr.shape, arr.dtype, name, dtype=dtype, shape=shape, ndim=ndim)
    if not _c_contiguous(arr):
        raise ValueError(
            f"{name}: array must be C-contiguous (strides {arr.strides}); pass a contiguous copy"
        )


_SEQUENCES = (tuple, list, set, frozenset)


def check_meta(arr_shape, arr_dtype, name: str, *, dtype=None, shape=None, ndim=None) -> None:
    """Validate the dtype and shape of an imported array (see ``as_array``)."""
    if dtype is not None:
        allowed = dtype if isinstance(dtype, _SEQUENCES) else (dtype,)
        if arr_dtype not in allowed:
            want = " or ".join(dtype_name(d) for d in allowed)
            raise TypeError(f"{name}: dtype {arr_dtype.name} is not supported, expected {want}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and len(arr_shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(arr_shape)}")
    if shape is not None:
        for have, want in zip(arr_shape, shape):
            if want is not None and have != want:
                axis = next(i for i, (h, w) in enumerate(zip(arr_shape, shape))
                            if w is not None and h != w)
                expected = ", ".join("*" if w is None else str(w) for w in shape)
                raise ValueError(
                    f"{name}: shape {tuple(arr_shape)} does not match ({expected}) (axis {axis})"
                )


def as_arrays(xs: Iterable, name: str, **kwargs) -> list[cupy.ndarray]:
    """``as_array`` on each element of a list, naming them ``name[i]``."""
    return [as_array(x, f"{name}[{i}]", **kwargs) for i, x in enumerate(xs)]


# ------------------------------------------------------------------ streams
_external: dict[int, cupy.cuda.ExternalStream] = {}
_current_stream = cupy.cuda.get_current_stream
_NO_SCOPE = contextlib.nullcontext()


def as_stream(stream=None):
    """A CuPy stream object for ``stream`` (see the module doc for what is accepted);
    raw handles map to one cached ``ExternalStream`` each."""
    if stream is None:
        return _current_stream()
    if isinstance(stream, (cupy.cuda.Stream, cupy.cuda.ExternalStream)):
        return stream
    handle = stream_handle(stream)
    ext = _external.get(handle)
    if ext is None:
        if len(_external) > 256:
            _external.clear()
        ext = _external[handle] = cupy.cuda.ExternalStream(handle)
    return ext


def on_stream(stream=None):
    """A context that makes ``stream`` CuPy's current stream (for allocations from CuPy's
    stream-ordered pool), or does nothing when it already is."""
    if stream is None:
        return _NO_SCOPE
    handle = stream if type(stream) is int else stream_handle(stream)
    if handle == _current_stream().ptr:
        return _NO_SCOPE
    return as_stream(handle)


def _protocol_handle(stream) -> int:
    return int(stream.__cuda_stream__()[1])


def _handle_getter(kind: type):
    """How a stream object of type ``kind`` gives its raw handle (None: it does not)."""
    if issubclass(kind, (int, np.integer)) and not issubclass(kind, bool):
        return int
    if issubclass(kind, (cupy.cuda.Stream, cupy.cuda.ExternalStream)):
        return operator.attrgetter("ptr")
    torch = sys.modules.get("torch")
    if torch is not None and issubclass(kind, torch.cuda.Stream):
        return operator.attrgetter("cuda_stream")
    if hasattr(kind, "__cuda_stream__"):
        return _protocol_handle
    for attr in ("ptr", "cuda_stream"):
        if hasattr(kind, attr):
            return operator.attrgetter(attr)
    return None


_getters: dict[type, object] = {int: int}


def stream_handle(stream=None) -> int:
    """The raw ``cudaStream_t`` of ``stream`` as an int (0 is the legacy default stream)."""
    if stream is None:
        return _current_stream().ptr
    get = _getters.get(type(stream))
    if get is None:
        get = _handle_getter(type(stream))
        value = None if get is None else get(stream)
        if value is None:
            for attr in ("ptr", "cuda_stream"):  # instance attributes
                value = getattr(stream, attr, None)
                if value is not None:
                    return int(value)
            raise TypeError(
                f"stream: expected a cupy.cuda.Stream, an int handle or an object with "
                f"cuda_stream/ptr/__cuda_stream__, got {type(stream).__name__}")
        if len(_getters) < 64:
            _getters[type(stream)] = get
        return int(value)
    return get(stream)
