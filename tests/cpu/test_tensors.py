"""DLPack boundary checks that need no GPU: non-arrays, host arrays, devices, stream
handles, and the DLPack capsule consumer on host capsules (NumPy's, and hand-made ones
for the float8 / fp4 codes NumPy does not export)."""

import ctypes
import gc
import sys
import threading
import weakref

import ml_dtypes
import numpy as np
import pytest

tensors = pytest.importorskip("moecomm.tensors", reason="CuPy is not installed")


def test_not_an_array():
    with pytest.raises(TypeError, match=r"x: expected an array with __dlpack__.*list"):
        tensors.as_array([1, 2, 3], "x")


def test_host_array_is_refused_before_any_cuda_call():
    with pytest.raises(ValueError, match="hidden: array is on cpu"):
        tensors.as_array(np.zeros((4, 8), np.float32), "hidden")


def test_other_device_type():
    class Fake:
        def __dlpack_device__(self):
            return (10, 0)

    with pytest.raises(ValueError, match="rocm"):
        tensors.as_array(Fake(), "y")


def test_stream_handles():
    class TorchLike:
        cuda_stream = 1234

    class Protocol:
        def __cuda_stream__(self):
            return (0, 77)

    assert tensors.stream_handle(5) == 5
    assert tensors.stream_handle(np.int64(6)) == 6
    assert tensors.stream_handle(TorchLike()) == 1234
    assert tensors.stream_handle(Protocol()) == 77
    with pytest.raises(TypeError, match="stream"):
        tensors.stream_handle("default")


def test_bfloat16_dtype_available():
    assert tensors.bfloat16 is not None and tensors.bfloat16.itemsize == 2


# ---------------------------------------------------------------- DLPack consumer


def test_wrong_device_messages_name_argument_device_and_expected():
    class OtherGpu:
        def __dlpack_device__(self):
            return (2, 1)

    class Managed:
        def __dlpack_device__(self):
            return (13, 2)

    with pytest.raises(ValueError, match=r"^y: array is on cuda:1, expected cuda:0$"):
        tensors.as_array(OtherGpu(), "y", device=0)
    with pytest.raises(ValueError, match=r"^y: array is on cuda:2 \(managed\), expected cuda:0$"):
        tensors.as_array(Managed(), "y", device=0)
    with pytest.raises(ValueError, match=r"^out: array is on cpu, expected cuda:3$"):
        tensors.as_array(np.zeros(4, np.uint8), "out", device=3)
    with pytest.raises(ValueError, match=r"^x: array is on cpu, expected cuda:1$"):
        tensors.import_array(np.zeros(4, np.float32), "x", device=1, stream=0)
    with pytest.raises(ValueError, match=r"^x: array is on cuda pinned host, expected"):
        tensors.as_array(type("Pinned", (), {"__dlpack_device__": lambda s: (3, 0)})(), "x")


def test_host_array_is_never_exported():
    class HostArray:
        exported = False

        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, **kw):  # pragma: no cover - must not be reached
            HostArray.exported = True

    with pytest.raises(ValueError, match="array is on cpu"):
        tensors.as_array(HostArray(), "x", device=0)
    assert not HostArray.exported


@pytest.mark.parametrize("versioned", [False, True])
def test_parse_numpy_capsule(versioned):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    cap = a.__dlpack__(max_version=(1, 0)) if versioned else a.__dlpack__()
    info = tensors._parse(cap, "a")
    assert info.versioned is versioned
    assert (info.device_type, info.device_id) == (1, 0)
    assert info.ptr == a.ctypes.data and info.dtype == np.float32 and info.shape == (2, 3, 4)
    assert info.strides in (None, (48, 16, 4)) and info.nbytes == a.nbytes
    # parsing does not consume: the capsule can be parsed again
    assert tensors._parse(cap, "a").ptr == a.ctypes.data


def test_parse_strided_and_offset_views():
    base = np.arange(64, dtype=np.int16).reshape(8, 8)
    view = base[2:5, 1::2]
    info = tensors._parse(view.__dlpack__(), "v")
    assert info.ptr == view.ctypes.data  # byte_offset included
    assert info.strides == view.strides and info.shape == view.shape
    assert info.nbytes == 2 + 2 * 16 + 3 * 4
    arr = tensors._consume(view.__dlpack__(), "v", None, cuda=False)
    assert not arr.flags.c_contiguous and arr.strides == view.strides


def test_read_only_flag_of_versioned_capsule():
    a = np.zeros(4, np.uint8)
    a.flags.writeable = False
    assert tensors._parse(a.__dlpack__(max_version=(1, 0)), "a").read_only


def test_read_only_capsule_refused_where_written():
    a = np.arange(4, dtype=np.uint8)
    a.flags.writeable = False
    cap = a.__dlpack__(max_version=(1, 0))
    with pytest.raises(ValueError, match=r"^out: the array is read-only .* pass a writable"):
        tensors._consume(cap, "out", None, cuda=False, writable=True)
    assert tensors._parse(cap, "out").ptr == a.ctypes.data  # refused: still unconsumed
    arr = tensors._consume(cap, "x", None, cuda=False)  # an input may be read-only
    assert arr.data.ptr == a.ctypes.data
    w = np.zeros(4, np.uint8)
    assert tensors._consume(w.__dlpack__(max_version=(1, 0)), "out", None, cuda=False,
                            writable=True).data.ptr == w.ctypes.data


@pytest.mark.parametrize("versioned", [False, True])
def test_consume_owns_the_producer_until_the_last_view_is_gone(versioned):
    a = np.arange(10, dtype=np.int32)
    alive = weakref.ref(a)
    ptr = a.ctypes.data
    cap = a.__dlpack__(max_version=(1, 0)) if versioned else a.__dlpack__()
    arr = tensors._consume(cap, "a", None, cuda=False)
    assert arr.data.ptr == ptr and arr.shape == (10,) and arr.dtype == np.int32
    assert arr.flags.c_contiguous
    with pytest.raises(TypeError, match="no unconsumed DLPack capsule"):
        tensors._parse(cap, "a")  # consumed: renamed to used_dltensor
    del a, cap
    gc.collect()
    assert alive() is not None, "the producer was freed while a view was alive"
    view = arr[2:]
    del arr
    gc.collect()
    assert alive() is not None
    del view
    gc.collect()
    assert alive() is None, "the deleter was not called"


def test_refused_capsule_stays_with_its_producer():
    a = np.zeros(5, np.float64)
    alive = weakref.ref(a)
    cap = a.__dlpack__()
    with pytest.raises(ValueError, match=r"^w: array is on cpu, expected cuda:0$"):
        tensors._consume(cap, "w", 0)
    assert tensors._parse(cap, "w").ptr == a.ctypes.data  # still unconsumed
    del a, cap
    gc.collect()
    assert alive() is None  # the capsule's own destructor freed it


# Capsules built here, for dtypes NumPy does not export (DLPack 1.1 codes).
_pycapsule_new = ctypes.pythonapi.PyCapsule_New
_pycapsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_pycapsule_new.restype = ctypes.py_object


class _Capsule:
    """A hand-made DLManagedTensor over a NumPy buffer, counting deleter calls."""

    def __init__(self, buf, code, bits, lanes, shape, versioned=False, strides=None):
        self.buf, self.deleted = buf, 0
        self.shape = (ctypes.c_int64 * len(shape))(*shape)
        self.strides = None if strides is None else (ctypes.c_int64 * len(strides))(*strides)
        cls = tensors._DLManagedTensorVersioned if versioned else tensors._DLManagedTensor
        self.managed = cls()
        t = self.managed.dl_tensor
        t.data, t.device.device_type, t.device.device_id = buf.ctypes.data, 1, 0
        t.ndim, t.shape = len(shape), self.shape
        if self.strides is not None:
            t.strides = self.strides
        t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits, lanes
        if versioned:
            self.managed.major, self.managed.minor = 1, 1

        def deleter(ptr):
            assert ptr == ctypes.addressof(self.managed)
            self.deleted += 1

        self.callback = tensors._DELETER(deleter)
        self.managed.deleter = ctypes.cast(self.callback, ctypes.c_void_p).value
        self.name = b"dltensor_versioned" if versioned else b"dltensor"
        self.capsule = _pycapsule_new(ctypes.addressof(self.managed), self.name, None)


@pytest.mark.parametrize("versioned", [False, True])
@pytest.mark.parametrize("code, bits, lanes, expected", [
    (10, 8, 1, ml_dtypes.float8_e4m3fn),
    (12, 8, 1, ml_dtypes.float8_e5m2),
    (14, 8, 1, ml_dtypes.float8_e8m0fnu),
    (11, 8, 1, ml_dtypes.float8_e4m3fnuz),
    (17, 4, 2, np.uint8),   # packed fp4, one byte per element
    (17, 8, 1, np.uint8),
    (4, 16, 1, ml_dtypes.bfloat16),
    (1, 8, 1, np.uint8),
    (0, 32, 1, np.int32),
])
def test_consume_quantized_dtypes_bitwise(versioned, code, bits, lanes, expected):
    rng = np.random.default_rng(code * 100 + bits)
    nbytes = np.dtype(expected).itemsize
    raw = rng.integers(0, 256, size=(6, 8 * nbytes), dtype=np.uint8)
    c = _Capsule(raw, code, bits, lanes, (6, 8), versioned)
    arr = tensors._consume(c.capsule, "q", None, cuda=False)
    assert arr.dtype == np.dtype(expected) and arr.shape == (6, 8)
    assert arr.data.ptr == raw.ctypes.data and arr.flags.c_contiguous
    # the view's bytes are the producer's bytes: read them back through NumPy
    back = np.ctypeslib.as_array((ctypes.c_uint8 * raw.nbytes).from_address(arr.data.ptr))
    assert np.array_equal(back, raw.reshape(-1))
    assert c.deleted == 0
    del arr
    gc.collect()
    assert c.deleted == 1


@pytest.mark.parametrize("code, bits, lanes", [(17, 4, 1), (15, 6, 1), (2, 32, 4), (2, 8, 1)])
def test_unsupported_dlpack_dtypes_are_refused_unconsumed(code, bits, lanes):
    c = _Capsule(np.zeros(16, np.uint8), code, bits, lanes, (4,))
    with pytest.raises(TypeError, match="not supported"):
        tensors._consume(c.capsule, "q", None, cuda=False)
    assert ctypes.pythonapi.PyCapsule_IsValid(ctypes.py_object(c.capsule), c.name)
    assert c.deleted == 0


def test_unknown_dlpack_major_version_is_refused():
    c = _Capsule(np.zeros(4, np.uint8), 1, 8, 1, (4,), versioned=True)
    c.managed.major = 2
    with pytest.raises(BufferError, match="version 2"):
        tensors._consume(c.capsule, "q", None, cuda=False)


def test_consume_elementwise_strides():
    raw = np.zeros((4, 8), np.uint8)
    c = _Capsule(raw, 10, 8, 1, (4, 4), strides=(8, 2))
    arr = tensors._consume(c.capsule, "q", None, cuda=False)
    assert arr.strides == (8, 2) and not arr.flags.c_contiguous


def test_steps_of_unit_and_empty_dims_are_ignored():
    """A negative stride where the extent is 1 (or the array empty) never steps: such
    views (a [::-1] of one row, say) import as contiguous; a real negative step does not."""
    raw = np.zeros((4, 8), np.uint8)
    arr = tensors._consume(_Capsule(raw, 1, 8, 1, (1, 4), strides=(-4, 1)).capsule, "q",
                           None, cuda=False)
    assert arr.shape == (1, 4) and arr.flags.c_contiguous
    arr = tensors._consume(_Capsule(raw, 1, 8, 1, (0, 4), strides=(-4, -1)).capsule, "q",
                           None, cuda=False)
    assert arr.size == 0
    with pytest.raises(ValueError, match="negative strides"):
        tensors._consume(_Capsule(raw, 1, 8, 1, (2, 4), strides=(-4, 1)).capsule, "q",
                         None, cuda=False)


def test_empty_capsule():
    c = _Capsule(np.zeros(1, np.uint8), 10, 8, 1, (0, 16))
    arr = tensors._consume(c.capsule, "q", None, cuda=False)
    assert arr.shape == (0, 16) and arr.size == 0


def test_dtype_tables():
    assert tensors.float8_e4m3fn in tensors.CODE_DTYPES and np.uint8 in tensors.CODE_DTYPES
    assert tensors.float8_e5m2 not in tensors.CODE_DTYPES
    assert tensors.FP4_DTYPES == (np.dtype(np.uint8),)
    assert set(tensors.UE8M0_DTYPES) >= {np.dtype(np.int32), np.dtype(np.uint8)}
    assert tensors.dlpack_dtype(10, 8, 1) == tensors.float8_e4m3fn


def test_stream_handle_getter_is_cached_per_type():
    class Counting:
        calls = 0

        @property
        def cuda_stream(self):
            Counting.calls += 1
            return 99

    assert tensors.stream_handle(Counting()) == 99
    assert tensors.stream_handle(Counting()) == 99
    assert tensors._getters[Counting] is not None and Counting.calls == 2
    assert tensors.stream_handle(7) == 7
    with pytest.raises(TypeError, match="stream"):
        tensors.stream_handle(object())


def test_on_stream_of_a_handle_is_a_no_op_context_only_for_none():
    assert tensors.on_stream(None) is tensors._NO_SCOPE


def test_cpu_micro_profile_runs(tmp_path, capsys):
    import argparse
    import json

    from moecomm.bench import dlpack

    p = argparse.ArgumentParser()
    dlpack.add_arguments(p)
    args = p.parse_args(["--cpu", "--calls", "1"])
    args.out = str(tmp_path)
    assert dlpack.run(args) == 0
    (result,) = tmp_path.glob("dlpack-cpu-*.json")
    rows = {r["piece"]: r["us_per_call"] for r in json.loads(result.read_text())["rows"]}
    assert "import_array(DLPack producer on cuda:0)" in rows
    assert all(v > 0 for v in rows.values())


class _CudaProducer:
    """A DLPack producer over host memory that reports CUDA device ``device``: the whole
    import path runs without a GPU. Records the ``stream`` it was asked for."""

    def __init__(self, a, device=0, versioned=True, refuse=None):
        self.a, self.device, self.versioned, self.refuse = a, device, versioned, refuse
        self.streams = []

    def __dlpack_device__(self):
        return (2, self.device)

    def _capsule(self, max_version):
        cap = self.a.__dlpack__(max_version=max_version)
        info = tensors._parse(cap, "x")
        kind = tensors._DLManagedTensorVersioned if info.versioned else tensors._DLManagedTensor
        t = kind.from_address(info.managed).dl_tensor
        t.device.device_type, t.device.device_id = 2, self.device
        return cap

    def __dlpack__(self, stream=None, **kw):
        self.streams.append(stream)
        if self.refuse:
            raise self.refuse
        if not self.versioned and kw:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        return self._capsule(kw.get("max_version"))


@pytest.mark.parametrize("versioned", [True, False])
def test_as_array_through_dlpack_without_a_gpu(versioned):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = _CudaProducer(a, versioned=versioned)
    arr = tensors.as_array(p, "x", dtype=np.float32, shape=(None, 4), device=0, stream=7)
    assert arr.data.ptr == a.ctypes.data and arr.shape == (3, 4) and arr.dtype == np.float32
    assert p.streams[-1] == 7
    tensors.as_array(p, "x", device=0, stream=0)
    assert p.streams[-1] == 1, "the legacy default stream is spelt 1 in the DLPack protocol"
    ref = tensors.import_array(p, "x", dtype=np.float32, device=0, stream=5)
    assert ref.ptr == a.ctypes.data and ref.shape == (3, 4) and ref.nbytes == 48
    with pytest.raises(TypeError, match=r"^x: dtype float32 is not supported, expected uint8$"):
        tensors.as_array(p, "x", dtype=np.uint8, device=0, stream=7)
    with pytest.raises(ValueError, match=r"^x: shape \(3, 4\) does not match \(\*, 5\)"):
        tensors.as_array(p, "x", shape=(None, 5), device=0, stream=7)


def test_dlpack_view_of_a_strided_producer_is_refused_as_non_contiguous():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        tensors.as_array(_CudaProducer(a), "w", device=0, stream=7)


def test_producer_that_refuses_to_export_is_named():
    p = _CudaProducer(np.zeros(4, np.float32), refuse=BufferError("float8 has no DLPack code"))
    with pytest.raises(TypeError, match=r"^q: _CudaProducer refused to export it through "
                                        r"DLPack \(BufferError: float8 has no DLPack code\)$"):
        tensors.as_array(p, "q", device=0, stream=7)


def test_capsule_device_is_checked_too():
    class Lying(_CudaProducer):
        def __dlpack_device__(self):
            return (2, 0)  # says cuda:0, exports a cuda:1 capsule

    p = Lying(np.zeros(4, np.float32), device=1)
    with pytest.raises(ValueError, match=r"^x: array is on cuda:1, expected cuda:0$"):
        tensors.as_array(p, "x", device=0, stream=7)


# ---------------------------------------------------------------- the torch path, faked
class _FakeTorch:
    """Just enough of ``torch`` for ``tensors._torch_ref``: dtype objects, a Tensor
    class, the current-stream accessor and the Stream class (for stream_handle)."""

    def __init__(self, current_stream=0):
        import types

        for name in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32",
                     "int64", "bool", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                     "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32"):
            setattr(self, name, f"torch.{name}")
        self.current = current_stream
        self._C = types.SimpleNamespace(_cuda_getCurrentRawStream=lambda d: self.current)
        self.cuda = types.SimpleNamespace(Stream=type("Stream", (), {"cuda_stream": 0}))
        torch = self

        class Tensor:
            def __init__(self, shape, dtype, device=0, contiguous=True, ptr=4096, kind="cuda"):
                self.shape, self.dtype, self._device = shape, f"torch.{dtype}", device
                self._contiguous, self._ptr = contiguous, ptr
                self.is_cuda = kind == "cuda" and device >= 0

            def get_device(self):
                return self._device

            def is_contiguous(self):
                return self._contiguous

            def stride(self):
                return (1, self.shape[0])

            def data_ptr(self):
                return self._ptr

        self.Tensor = Tensor
        del torch


@pytest.fixture
def fake_torch(monkeypatch):
    torch = _FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(tensors, "_torch_dtypes", None)
    monkeypatch.setattr(tensors, "_raw_stream", None)
    orders = []
    monkeypatch.setattr(tensors._StreamOrder, "after",
                        classmethod(lambda cls, p, c, d: orders.append((p, c, d))))
    torch.orders = orders
    return torch



def test_stream_order_event_per_thread(monkeypatch):
    """Each thread records and waits on its own event: with one event per device, a
    record by another thread between ours and our wait would be the one waited for."""
    made = iter(range(100, 200))

    class FakeEvent:
        def __init__(self, **kw):
            self.ptr = next(made)

    calls = []
    monkeypatch.setattr(tensors.cupy.cuda, "Event", FakeEvent)
    monkeypatch.setattr(tensors, "_event_record", lambda e, s: calls.append(("record", e, s)))
    monkeypatch.setattr(tensors, "_stream_wait_event",
                        lambda s, e, f: calls.append(("wait", e, s)))
    monkeypatch.setattr(tensors._StreamOrder, "_local", threading.local())
    tensors._StreamOrder.after(1, 2, 0)
    tensors._StreamOrder.after(1, 2, 0)  # the same thread reuses its event
    other = threading.Thread(target=tensors._StreamOrder.after, args=(3, 4, 0))
    other.start()
    other.join()
    mine, theirs = {e for _, e, s in calls if s in (1, 2)}, {e for _, e, s in calls if s in (3, 4)}
    assert len(mine) == 1 and len(theirs) == 1 and mine != theirs
    assert [c[0] for c in calls] == ["record", "wait"] * 3


@pytest.mark.parametrize("name, dtype", [
    ("float8_e4m3fn", ml_dtypes.float8_e4m3fn), ("float8_e5m2", ml_dtypes.float8_e5m2),
    ("float8_e8m0fnu", ml_dtypes.float8_e8m0fnu), ("float4_e2m1fn_x2", np.uint8),
    ("bfloat16", ml_dtypes.bfloat16), ("int32", np.int32)])
def test_torch_dtypes_map_to_storage_dtypes(fake_torch, name, dtype):
    t = fake_torch.Tensor((4, 8), name, device=1, ptr=8192)
    ref = tensors.import_array(t, "q", device=1, stream=0)
    assert ref.dtype == np.dtype(dtype) and ref.shape == (4, 8) and ref.ptr == 8192
    assert ref.obj is t


def test_torch_quant_outputs_pass_the_dtype_tables(fake_torch):
    codes = fake_torch.Tensor((4, 8), "float8_e4m3fn")
    tensors.import_array(codes, "outputs.quant_out", dtype=tensors.CODE_DTYPES, device=0,
                         stream=0)
    packed = fake_torch.Tensor((4, 8), "float4_e2m1fn_x2")
    tensors.import_array(packed, "outputs.quant_out", dtype=tensors.FP4_DTYPES, device=0,
                         stream=0)
    e5m2 = fake_torch.Tensor((4, 8), "float8_e5m2")
    with pytest.raises(TypeError, match=r"quant_out: dtype float8_e5m2 is not supported, "
                                        r"expected uint8 or float8_e4m3fn"):
        tensors.import_array(e5m2, "outputs.quant_out", dtype=tensors.CODE_DTYPES, device=0,
                             stream=0)


def test_torch_wrong_device_and_layout(fake_torch):
    with pytest.raises(ValueError, match=r"^x: array is on cuda:1, expected cuda:0$"):
        tensors.import_array(fake_torch.Tensor((2, 2), "float32", device=1), "x", device=0,
                             stream=0)
    with pytest.raises(ValueError, match="C-contiguous"):
        tensors.import_array(fake_torch.Tensor((2, 2), "float32", contiguous=False), "x",
                             device=0, stream=0)
    assert fake_torch.orders == []


def test_torch_cpu_tensor_goes_to_dlpack_and_is_refused(fake_torch):
    class CpuTensor(fake_torch.Tensor):
        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(ValueError, match=r"^x: array is on cpu, expected cuda:0$"):
        tensors.import_array(CpuTensor((2,), "float32", device=-1), "x", device=0, stream=0)


def test_torch_xpu_tensor_is_not_read_as_cuda(fake_torch):
    """An XPU (or MPS) tensor has a device index too (0 here): it is not taken for a
    CUDA tensor, and the DLPack path refuses it naming its device."""
    class XpuTensor(fake_torch.Tensor):
        def __dlpack_device__(self):
            return (14, 0)  # kDLOneAPI

    with pytest.raises(ValueError, match=r"^x: array is on .*, expected cuda:0$"):
        tensors.import_array(XpuTensor((2,), "float32", device=0, kind="xpu"), "x", device=0,
                             stream=0)


def test_torch_stream_order_only_when_streams_differ(fake_torch):
    t = fake_torch.Tensor((2, 2), "float32")
    fake_torch.current = 0
    tensors.import_array(t, "x", device=0, stream=0)
    assert fake_torch.orders == []
    tensors.import_array(t, "x", device=0, stream=0xABC)          # a raw handle
    assert fake_torch.orders == [(0, 0xABC, 0)]
    fake_torch.current = 0xABC                                    # torch runs on it
    s = fake_torch.cuda.Stream()
    s.cuda_stream = 0xABC
    tensors.import_array(t, "x", device=0, stream=s)              # a torch stream object
    assert len(fake_torch.orders) == 1
