"""Strided views: layout math, argument checks, and the array built over an address that
is never dereferenced (no GPU needed)."""

import numpy as np
import pytest

from moecomm.strided import common_stride, strided_layout


def test_layout():
    assert strided_layout(512, 2048, 4, np.float16) == ((4, 256), (2048, 2), 3 * 2048 + 512)
    assert strided_layout(16, 16, 3, np.float32) == ((3, 4), (16, 4), 48)  # contiguous
    assert strided_layout(0, 0, 2, np.uint8) == ((2, 0), (0, 1), 0)
    assert strided_layout(64, 0, 1, np.uint8)[0] == (1, 64)  # one segment: any stride


@pytest.mark.parametrize("args, error, match", [
    ((6, 8, 2, np.float32), ValueError, "multiples of the float32 itemsize 4"),
    ((8, 6, 2, np.float32), ValueError, "multiples"),
    ((64, 32, 2, np.uint8), ValueError, "overlap"),
    ((8, 8, 0, np.uint8), ValueError, "num_segments must be >= 1"),
    ((-8, 8, 1, np.uint8), ValueError, "segment_size must be >= 0"),
    ((8.0, 8, 1, np.uint8), TypeError, "segment_size must be an int"),
    ((8, 8, True, np.uint8), TypeError, "num_segments must be an int"),
])
def test_layout_errors(args, error, match):
    with pytest.raises(error, match=match):
        strided_layout(*args)


def test_common_stride():
    assert common_stride([0x1000, 0x3000, 0x5000]) == 0x2000
    assert common_stride([0x1000, 0x3000, 0x6000]) is None
    assert common_stride([0x3000, 0x1000]) is None  # descending: not in rank order
    assert common_stride([0x1000]) is None


def test_view_over_an_address():
    cupy = pytest.importorskip("cupy")
    from moecomm.strided import pack_strided_memory

    a = pack_strided_memory(0x10000, 512, 2048, 4, np.float16, 0)
    assert isinstance(a, cupy.ndarray)
    assert (a.shape, a.strides, a.data.ptr, a.dtype) == ((4, 256), (2048, 2), 0x10000,
                                                         np.float16)
    assert a.reshape(4, 16, 16).strides == (2048, 32, 2)  # a view, still strided
    with pytest.raises(ValueError, match="not aligned"):
        pack_strided_memory(0x10001, 512, 2048, 4, np.float16, 0)
    with pytest.raises(ValueError, match="ptr must be >= 1"):
        pack_strided_memory(0, 512, 2048, 4, np.float16, 0)
