"""The fused all-reduce's launch geometry (no GPU): row plans and NVFP4 padding blocks."""

from moecomm.fusion import _padding_grid, _row_plan


def test_row_plans():
    # up to 512 vectors a row: one block; longer decode rows: a cluster of 2-8 blocks
    assert tuple(_row_plan(4096, 1, 132, True)) == ("v1", 1, 1, 512)
    assert tuple(_row_plan(7168, 1, 132, True)) == ("v1", 1, 4, 224)
    assert tuple(_row_plan(7168, 512, 132, True)) == ("w1", 1, 1, 896)
    assert tuple(_row_plan(16384, 512, 132, False)) == ("v2", 2, 1, 1024)


def test_padding_blocks_follow_the_swizzled_band():
    one_block = _row_plan(4096, 1, 132, True)
    # 4096 / 16 = 256 scale columns: 64 tiles of 32 16-byte chunks, one a thread
    assert _padding_grid(1, one_block, 1, 4096, 132) == 1 + 2048 // 512
    assert _padding_grid(8, one_block, 8, 4096, 132) == 8 + 4
    cluster = _row_plan(7168, 1, 132, True)  # 4 blocks of 224 threads a row
    # 7168 / 16 = 448 columns: 112 tiles, 3584 chunks, 4 clusters of 896 threads
    assert _padding_grid(4, cluster, 1, 7168, 132) == 4 + 16
    # no padding rows: no extra blocks; never past the resident grid
    assert _padding_grid(128, one_block, 128, 4096, 132) == 128
    assert _padding_grid(130, one_block, 130, 4096, 132) == 132
    assert _padding_grid(4, cluster, 1, 7168, 12) == 12
