"""Measured choices of the ``auto`` algorithms, by world size (ranks of one node).

Each table names the committed benchmark result it was read from; ``python -m
moecomm.bench allreduce`` / ``fusion`` print the faster algorithm per size, and the entries
here are the crossovers of such a run. World sizes without a measurement use the byte
model (one-shot moves ``(n-1)`` times the message per rank, two-shot ``2(n-1)/n`` times):
the entry of the next larger measured world size.
"""

from __future__ import annotations

# Largest message (bytes) that all_reduce "auto" sends one-shot where the split below
# does not apply (other world sizes, SM budgets of 2 x split_push_sms or fewer).
# 2 ranks: bench/results/allreduce-bf16-r2-2xNVIDIA_H200-20261129T211508.json (and the
# four runs after it): one-shot faster up to 4 MiB (19.6 vs 20.1 us), two-shot from 8 MiB
# (32.9 vs 37.8 us). 4 and 8 ranks: byte model, to be measured.
ALLREDUCE_ONESHOT_MAX_BYTES = {2: 4 << 20, 4: 512 << 10, 8: 256 << 10, 16: 128 << 10}

# The same where the one-shot splits the SMs by role. 2 ranks:
# bench/results/allreduce-bf16-r2-2xNVIDIA_H200-20261130T081351.json: the split one-shot
# is faster at every size up to 64 MiB (16 MiB 54.1 vs 58.4 us, 64 MiB 206 vs 210); the
# Lamport buffers cost 3 x world x this per rank, so one-shot stops at 16 MiB.
ALLREDUCE_SPLIT_ONESHOT_MAX_BYTES = {2: 16 << 20}

# Smallest one-shot all_reduce message (bytes) that splits the SMs by role (pushers and
# reducers, AllReduceConfig.split_min_bytes). 2 ranks, 2 x H200, graph replay, the split
# (12 pushing SMs of 512 threads) in bench/results/allreduce-bf16-r2-2xNVIDIA_H200-
# 20261130T082431.json against the one-shot without it (split_min_bytes above every size)
# in ...T082438.json: 2 MiB 9.6 vs 10.5 us, 4 MiB 15.9 vs 19.1, 8 MiB 29.3 vs 37.4,
# 16 MiB 52.9 vs 78.8. At 256 KiB and 1 MiB a probe of the split was slower (4.2 vs 3.4
# and 6.4 vs 6.1 us): one block per SM hides less latency than four. Other world sizes:
# not measured, no split.
ALLREDUCE_SPLIT_MIN_BYTES = {2: 2 << 20}

# allreduce_fusion splits the one-shot's SMs by role by rows, not bytes: each row is one
# block's chain of dependent instructions, so the plain one-shot slows by 10-20% as soon as
# one SM holds two rows' blocks of 384 threads or more. 2 ranks, kARResidualRMSNorm, graph
# replay (bench/results/fusion-crossover-2xH200-20261130T2305.txt), plain / split us:
# hidden 4096 x 132 tokens 7.43 / 7.92, x 133 8.28 / 7.89, x 192 10.27 / 9.40; hidden 3072
# x 133 7.24 / 7.13; hidden 7168 x 128 10.76 / 11.39, x 136 13.27 / 11.67. Rows of up to 288
# vectors (hidden <= 2304 in 16-bit) run several blocks per SM at no such cost, and there
# the split (one block per SM) is slower at every size: hidden 2048 x 512 11.79 against
# 14.68, hidden 1024 x 1024 11.66 against 23.50, hidden 2304 x 768 21.15 against 22.02.
# Rows of 320-383 vectors are in between: plain faster at 256-512 rows (hidden 2816 x 384
# 12.79 / 13.37), split from 768 (2816 x 768 23.73 / 22.46, 2560 x 1024 29.81 / 28.74).
# Table: (rows shorter than this many 16-byte vectors, split once the rows exceed this
# many per SM of the budget; None: never).
FUSION_SPLIT_ROWS_PER_SM = {2: ((320, None), (384, 5), (1 << 30, 1))}

# Most rows the split one-shot takes before two-shot is faster (same file), by row length:
# (rows shorter than this many vectors, most rows); longer rows: the byte bound below.
# hidden 2560 x 1024 28.7 / two-shot 30.1 us, x 1280 36.0 / 34.9; hidden 3072 x 1536 46.2 /
# 46.8, x 2048 61.0 / 59.6; hidden 3584 x 3072 95.1 / 95.3, x 4096 126.1 / 124.5; hidden
# 4096 x 4096 134.4 / 140.7.
FUSION_SPLIT_MAX_ROWS = {2: ((384, 1024), (448, 1536), (512, 3072))}

# Largest message (bytes, tokens x hidden x itemsize) that allreduce_fusion "auto" runs
# as the split one-shot. 2 ranks: bench/results/fusion-r2-2xNVIDIA_H200-20261130T084629.json
# (one-shot allowed up to 32 MiB): the split one-shot is faster than two-shot at every
# size, 2048 x 7168 bf16 = 28 MiB included (95.4 vs 124.2 us); 32 MiB bounds the Lamport
# buffers.
FUSION_SPLIT_ONESHOT_MAX_BYTES = {2: 32 << 20}

# The same where the split does not apply (rows too short or too few, other world sizes,
# small SM budgets). 2 ranks: bench/results/fusion-r2-2xNVIDIA_H200-20261129T212806.json:
# one-shot faster at 512 x 4096 bf16 = 4 MiB (21.0 vs 24.2 us), two-shot at 512 x 7168 =
# 7 MiB (36.3 vs 37.1 us) and above; short rows (fusion-crossover-*T2305.txt): hidden 2048
# x 1024 = 4 MiB 20.96 vs 24.32, x 2048 43.19 vs 41.26. 4 and 8 ranks: byte model.
FUSION_ONESHOT_MAX_BYTES = {2: 4 << 20, 4: 1 << 20, 8: 512 << 10, 16: 256 << 10}


def lookup(table: dict[int, int], world: int) -> int:
    """The entry of ``world``, else of the next larger world size in ``table``."""
    for size in sorted(table):
        if world <= size:
            return table[size]
    return table[max(table)]
