"""EPAllToAll without a GPU: kernel argument structs, constants, constructor checks."""

import numpy as np
import pytest

compact = pytest.importorskip("moecomm.moe.compact", reason="CuPy is not installed")
from tests.cuda_source import kernel_source
from moecomm import reference as ref


def test_constants_match_kernels():
    from moecomm import constants

    assert compact.MAX_LOCAL_EXPERTS == constants.COMPACT_MAX_LOCAL_EXPERTS
    assert compact.MAX_TOP_K == constants.COMPACT_MAX_TOP_K
    assert max(constants.CompactStat) < 8  # the stats array is int32[8]
    source = kernel_source("moe_compact.cu")
    for stat in constants.CompactStat:
        assert f"MOECOMM_STAT_{stat.name}" in source
    # the exact combine's own handshake reports its timeouts under its own name
    assert constants.ErrorCode.COMPACT_COMBINE.op == "EPAllToAll.combine"
    assert "config::kErrCompactCombine" in source


def _bare(max_num_tokens=16, top_k=4):
    """An EPAllToAll with only the fields _capacity reads (no group, no GPU)."""
    obj = object.__new__(compact.EPAllToAll)
    obj.max_num_tokens, obj.top_k = max_num_tokens, top_k
    return obj


def test_capacity_rules():
    obj = _bare(16, 4)
    assert obj._capacity(4, None, None) == 4 * 16 * 4  # worst case: never drops
    assert obj._capacity(4, 10, None) == 10
    assert obj._capacity(4, 10_000, None) == 256  # never more than can arrive
    assert obj._capacity(4, None, 1.5) == 96
    assert obj._capacity(4, None, 1e-6) == 1
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        obj._capacity(4, None, 0.0)
    with pytest.raises(ValueError, match="max_recv_rows must be >= 1"):
        obj._capacity(4, 0, None)
    with pytest.raises(TypeError, match="max_recv_rows must be an int"):
        obj._capacity(4, 2.5, None)
    big = _bare(1 << 20, 8)
    with pytest.raises(ValueError, match="exceeds the supported"):
        big._capacity(8, None, None)


def test_expand_grid_rules():
    """Up to _EXPAND_SLICES blocks per received row while the grid has room; one row per
    block at most otherwise; the grid a multiple of the slices, within its limit."""
    obj = _bare()
    obj._max_grid, obj._row_vecs = 264, 896  # 2 blocks per SM of an H200; 7168 bf16
    most = compact._EXPAND_SLICES
    assert obj._expand_grid(1) == (most, most)
    assert obj._expand_grid(128) == (256, 2)
    assert obj._expand_grid(264) == (264, 1)
    assert obj._expand_grid(4096) == (264, 1)
    obj._max_grid = 8  # an SM budget: one block per budgeted SM
    assert obj._expand_grid(4) == (8, 2)
    assert obj._expand_grid(1) == (most, most)
    obj._max_grid, obj._row_vecs = 264, 2  # rows of two vectors: at most two slices
    assert obj._expand_grid(1) == (2, 2)
    for max_grid in (1, 7, 132, 264):
        for vecs in (1, 3, 896):
            obj._max_grid, obj._row_vecs = max_grid, vecs
            for rows in (1, 2, 5, 33, 131, 132, 133, 264, 1 << 20):
                grid, slices = obj._expand_grid(rows)
                assert 1 <= slices <= min(most, vecs) and grid % slices == 0
                assert slices <= grid <= max(max_grid, slices)
                assert grid // slices == max(1, min(rows, max_grid // slices))


def test_constructor_checks_before_any_collective():
    # Argument errors are raised before the group is touched (none exists here).
    with pytest.raises(ValueError, match="top_k=300 exceeds"):
        compact.EPAllToAll(None, 8, 300, 8, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        compact.EPAllToAll(None, 8, 2, 8, 4)  # 4 bf16 = 8 bytes per row
    with pytest.raises(ValueError, match="combine_dtype float16: rows of 8 bytes"):
        compact.EPAllToAll(None, 8, 2, 8, 4, np.float32, combine_dtype=np.float16)
    with pytest.raises(TypeError, match="combine_dtype int32 is not supported"):
        compact.EPAllToAll(None, 8, 2, 8, 64, np.int32)
    with pytest.raises(ValueError, match="not both"):
        compact.EPAllToAll(None, 8, 2, 8, 64, max_recv_rows=4, capacity_factor=1.0)
    with pytest.raises(TypeError, match="local_combine must be a bool"):
        compact.EPAllToAll(None, 8, 2, 8, 64, local_combine="yes")
    with pytest.raises(TypeError, match="max_num_tokens must be an int"):
        compact.EPAllToAll(None, 8.0, 2, 8, 64)


def test_two_level_sum_is_not_the_reference():
    """Why the default combine fetches every slot's row: summing a rank's slots first
    (local_combine) rounds differently from the reference's one slot-order sum."""
    ids = [np.array([[0, 2, 1]], np.int32), np.zeros((0, 3), np.int32)]
    x = [np.ones((1, 1), np.float32), np.zeros((0, 1), np.float32)]
    _, _, lay = ref.ep_dispatch_compact(x, ids, None, 4, 2)
    # slots 0 and 2 (experts 0, 1) are rank 0's rows, slot 1 (expert 2) rank 1's
    tiny = np.float32(2.0 ** -24)
    y = [np.array([[tiny], [tiny]], np.float32), np.array([[1.0]], np.float32)]
    exact = ref.ep_combine_compact(y, lay)[0][0, 0]
    assert exact == np.float32(1.0)  # (tiny + 1) + tiny: each add ties back to 1
    partial = np.float32(tiny + tiny)  # rank 0 sums its slots first ...
    two_level = np.float32(partial + np.float32(1.0))  # ... then the ranks: 1 + 2^-23
    assert two_level != exact
