"""DLPack boundary checks that need no GPU: non-arrays, host arrays, stream handles."""

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
