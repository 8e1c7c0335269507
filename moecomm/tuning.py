"""Measured choices of the ``auto`` algorithms, by world size (ranks of one node).

Each table names the committed benchmark result it was read from; ``python -m
moecomm.bench allreduce`` / ``fusion`` print the faster algorithm per size, and the entries
here are the crossovers of such a run. World sizes without a measurement use the byte
model (one-shot moves ``(n-1)`` times the message per rank, two-shot ``2(n-1)/n`` times):
the entry of the next larger measured world size.
"""

from __future__ import annotations

# Largest message (bytes) that all_reduce "auto" sends one-shot.
# 2 ranks: bench/results/allreduce-bf16-r2-2xNVIDIA_H200-20261129T211508.json (and the
# four runs after it): one-shot faster up to 4 MiB (19.6 vs 20.1 us), two-shot from 8 MiB
# (32.9 vs 37.8 us). 4 and 8 ranks: byte model, to be measured.
ALLREDUCE_ONESHOT_MAX_BYTES = {2: 4 << 20, 4: 512 << 10, 8: 256 << 10, 16: 128 << 10}

# Largest message (bytes, tokens x hidden x itemsize) that allreduce_fusion "auto" runs
# one-shot. 2 ranks: bench/results/fusion-r2-2xNVIDIA_H200-20261129T212806.json: one-shot
# faster at 512 x 4096 bf16 = 4 MiB (21.0 vs 24.2 us), two-shot at 512 x 7168 = 7 MiB
# (36.3 vs 37.1 us) and above. 4 and 8 ranks: byte model.
FUSION_ONESHOT_MAX_BYTES = {2: 4 << 20, 4: 1 << 20, 8: 512 << 10, 16: 256 << 10}


def lookup(table: dict[int, int], world: int) -> int:
    """The entry of ``world``, else of the next larger world size in ``table``."""
    for size in sorted(table):
        if world <= size:
            return table[size]
    return table[max(table)]
