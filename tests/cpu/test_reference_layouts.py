"""Scale layouts: moecomm.layouts (sizes, offsets) and the reference's array versions."""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402


# ------------------------------------------------------------------ NVFP4

@pytest.mark.parametrize("m,n", [(1, 16), (5, 64), (128, 80), (130, 256), (257, 48)])
def test_swizzle_offset_bijection(m, n):
    k = n // 16
    size = ref.compute_fp4_swizzled_layout_sf_size(m, k)
    mp, kp = -(-m // 128) * 128, -(-k // 4) * 4
    mm, kk = np.meshgrid(np.arange(mp), np.arange(kp), indexing="ij")
    off = ref.swizzled_sf_offset(mm, kk, n)
    assert off.size == size
    np.testing.assert_array_equal(np.sort(off.reshape(-1)), np.arange(size))


def test_swizzle_offset_formula_small():
    o = ref.swizzled_sf_offset
    n = 256  # Kt = 4
    assert o(0, 0, n) == 0
    assert o(0, 1, n) == 1
    assert o(0, 3, n) == 3
    assert o(0, 4, n) == 512
    assert o(1, 0, n) == 16
    assert o(31, 0, n) == 31 * 16
    assert o(32, 0, n) == 4
    assert o(96, 2, n) == 12 + 2
    assert o(128, 0, n) == 4 * 512
    assert o(129, 5, n) == 4 * 512 + 512 + 16 + 1
    # vectorised and broadcasting
    np.testing.assert_array_equal(o(np.array([0, 1, 32]), 0, n), [0, 16, 4])


def test_ue8m0_packing():
    e = np.array([[1, 2, 3, 4, 5, 6], [250, 0, 127, 128, 9, 10]], np.uint8)
    p = ref.pack_ue8m0(e)
    assert p.shape == (2, 2) and p.dtype == np.int32
    assert p[0, 0] == 0x04030201 and p[0, 1] == 0x00000605
    assert int(p[1, 0]) & 0xFF == 250
    np.testing.assert_array_equal(ref.unpack_ue8m0(p, 6), e)
    # zero rows round-trip too (the quantizers accept M = 0)
    empty = ref.unpack_ue8m0(ref.pack_ue8m0(np.zeros((0, 6), np.uint8)), 6)
    assert empty.shape == (0, 6) and empty.dtype == np.uint8
    # MN-major TMA-aligned storage: M=2 -> align 4; size = 2 + 1*4
    st = ref.ue8m0_to_mn_major_storage(p)
    assert ref.ue8m0_mn_major_storage_size(2, 6) == st.size == 6
    assert list(st) == [p[0, 0], p[1, 0], 0, 0, p[0, 1], p[1, 1]]
    np.testing.assert_array_equal(ref.ue8m0_from_mn_major_storage(st, 2, 6), p)
    assert ref.ue8m0_mn_major_storage_size(3, 4) == 3
    assert ref.ue8m0_mn_major_storage_size(5, 12) == 5 + 2 * 8
