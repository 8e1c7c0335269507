"""The fused all-reduce's launch geometry (no GPU): row plans, NVFP4 padding blocks and
the measured rule of ``auto``."""

from moecomm.allreduce import AllReduceConfig
from moecomm.constants import AR_MAX_BLOCKS
from moecomm.fusion import _AutoRule, _padding_grid, _row_grid, _row_plan


def test_row_plans():
    # up to 512 vectors a row: one block; longer decode rows: a cluster of 2-8 blocks
    assert tuple(_row_plan(4096, 1, 132, True)) == ("v1", 1, 1, 512)
    assert tuple(_row_plan(7168, 1, 132, True)) == ("v1", 1, 4, 224)
    assert tuple(_row_plan(7168, 512, 132, True)) == ("w1", 1, 1, 896)
    assert tuple(_row_plan(16384, 512, 132, False)) == ("v2", 2, 1, 1024)


def test_row_grids():
    """A block (or cluster) per row up to the resident grid; two-shot never past the flag
    slots: hidden 1024 is 128-thread blocks, 8 a SM, 1056 on 132 SMs, and 2 ranks x 2050
    tokens give 1025 rows a rank (block 1024's flags were block 0's next stage's)."""
    row = _row_plan(1024, 2050, 132, True)
    assert _row_grid(1025, 132 * 8, row, oneshot=False) == AR_MAX_BLOCKS
    assert _row_grid(1025, 132 * 8, row, oneshot=True) == 1025
    assert _row_grid(7, 132 * 8, row, oneshot=False) == 7
    assert _row_grid(0, 132, row, oneshot=True) == 1
    cluster = _row_plan(7168, 1, 132, True)  # 4 blocks a row
    assert _row_grid(3, 132, cluster, oneshot=True) == 12
    assert _row_grid(100, 132, cluster, oneshot=True) == 132
    assert _row_grid(100, 2, cluster, oneshot=True) == 4  # at least one cluster


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


def test_fusion_auto_rule():
    """allreduce_fusion's measured rule (moecomm.tuning): at 2 ranks rows of >= 384
    vectors split once they outnumber the SMs, rows of 320-383 from 5 x the SMs, and take
    two-shot past the row table; shorter rows never split and take one-shot up to 4 MiB;
    an explicit split threshold or crossover replaces the rule."""
    def rule(hidden, config=AllReduceConfig(), world=2, sms=132):
        return _AutoRule.measured(config, world, sms, hidden * 2)

    for hidden in (3072, 4096, 7168, 8192):
        r = rule(hidden)
        assert not r.splits(132) and r.splits(133) and r.oneshot(132) and r.oneshot(133)
    assert rule(3072).oneshot(1536) and not rule(3072).oneshot(1537)
    assert rule(3584).oneshot(3072) and not rule(3584).oneshot(3073)
    assert rule(4096).oneshot(4096) and not rule(4096).oneshot(4097)  # 32 MiB bound
    assert rule(7168).oneshot(2048) and not rule(7168).oneshot(2341)
    for hidden, most in ((1024, 2048), (2048, 1024), (2304, 910)):
        r = rule(hidden)
        assert not any(r.splits(t) for t in (133, 512, 4096))
        assert r.oneshot(most) and not r.oneshot(most + 1)
        assert r.largest_oneshot_bytes() == 4 << 20
    # rows of 320-383 vectors: plain one-shot up to 5 x the SMs, split beyond, to 1024 rows
    for hidden in (2560, 3056):
        r = rule(hidden)
        assert not r.splits(660) and r.splits(661) and r.oneshot(660) and r.oneshot(661)
        assert r.oneshot(1024) and not r.oneshot(1025)
    assert rule(2560).largest_oneshot_bytes() == 1024 * 5120
    assert rule(3072).largest_oneshot_bytes() == 1536 * 6144
    assert rule(4096).largest_oneshot_bytes() == 32 << 20
    # no split under a budget of 24 SMs, nor where none is measured (4 ranks)
    assert not rule(4096, AllReduceConfig(num_sms=24), sms=24).splits(1000)
    assert not rule(4096, world=4).splits(1000) and rule(4096, world=4).oneshot(128)
    assert not rule(4096, world=4).oneshot(129)  # the byte model's 1 MiB
    # a budget of 64 SMs splits from 65 rows
    assert rule(4096, AllReduceConfig(num_sms=64), sms=64).splits(65)
    # explicit threshold: by bytes; explicit crossover: bytes only
    r = rule(2048, AllReduceConfig(split_min_bytes=1 << 20))
    assert r.splits(256) and not r.splits(255)
    r = _AutoRule.measured(AllReduceConfig(), 2, 132, 8192, oneshot_max_bytes=1000)
    assert r.oneshot(0) and not r.oneshot(1) and r.largest_oneshot_bytes() == 1000
