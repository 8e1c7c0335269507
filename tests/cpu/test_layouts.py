"""moecomm.layouts: scale-layout sizes and offsets as plain Python ints."""

import pytest

from moecomm import layouts


def test_fp4_swizzled_size():
    f = layouts.compute_fp4_swizzled_layout_sf_size
    assert f(1, 4) == 512
    assert f(1, 1) == 512
    assert f(128, 448) == 128 * 448
    assert f(129, 7) == 256 * 8
    assert f(0, 0) == 0
    assert f(9, 5, row_size=8) == 16 * 8
    assert type(f(3, 5)) is int


@pytest.mark.parametrize("args,exc", [((-1, 4), ValueError), ((4, -1), ValueError),
                                      ((4, 4, 0), ValueError), ((4.0, 4), TypeError),
                                      ((4, "4"), TypeError)])
def test_fp4_swizzled_size_rejects(args, exc):
    with pytest.raises(exc):
        layouts.compute_fp4_swizzled_layout_sf_size(*args)


def test_swizzled_offset_scalar():
    o = layouts.swizzled_sf_offset
    n = 256  # Kt = 4
    assert o(0, 0, n) == 0 and o(0, 3, n) == 3 and o(0, 4, n) == 512
    assert o(1, 0, n) == 16 and o(32, 0, n) == 4 and o(96, 2, n) == 14
    assert o(128, 0, n) == 4 * 512
    assert o(129, 5, n) == 4 * 512 + 512 + 16 + 1
    # every slot of a padded 130 x 16-column (N = 256) array exactly once
    rows, cols = 256, 16
    offs = sorted(o(m, k, n) for m in range(rows) for k in range(cols))
    assert offs == list(range(layouts.compute_fp4_swizzled_layout_sf_size(130, 16)))


def test_ue8m0_mn_major():
    s = layouts.ue8m0_mn_major_storage_size
    assert layouts.ue8m0_words_per_row(0) == 0
    assert layouts.ue8m0_words_per_row(6) == 2
    assert s(2, 6) == 2 + 1 * 4
    assert s(3, 4) == 3
    assert s(5, 12) == 5 + 2 * 8
    assert s(7, 0) == 0 and s(0, 8) == 0
    assert type(s(5, 12)) is int
    with pytest.raises(ValueError):
        s(-1, 4)
    with pytest.raises(TypeError):
        s(2, 4.0)
    # the last word of row M-1 is the last element of the storage
    for m, g in [(1, 1), (2, 6), (5, 12), (8, 32)]:
        k4 = layouts.ue8m0_words_per_row(g)
        assert layouts.ue8m0_mn_major_offset(m - 1, k4 - 1, m) == s(m, g) - 1
