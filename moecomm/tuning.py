"""Measured choices of the ``auto`` algorithms, by world size (ranks of one node).

Each table names the committed benchmark result it was read from; ``python -m
moecomm.bench allreduce`` / ``fusion`` print the faster algorithm per size, and the entries
here are the crossovers of such a run. World sizes without a measurement use the byte
model (one-shot moves ``(n-1)`` times the message per rank, two-shot ``2(n-1)/n`` times):
the entry of the next larger measured world size.
"""

from __future__ import annotations

# Largest message (bytes) that all_reduce "auto" sends one-shot.
# 2 ranks: bench/results/allreduce-bf16-r2-2xNVIDIA_H200-*.json (crossover between 16 and
# 64 MiB); 4 and 8 ranks: byte model, to be measured.
ALLREDUCE_ONESHOT_MAX_BYTES = {2: 16 << 20, 4: 512 << 10, 8: 256 << 10, 16: 128 << 10}

# Largest message (bytes, tokens x hidden x itemsize) that allreduce_fusion "auto" runs
# one-shot. 2 ranks: bench/results/fusion-r2-2xNVIDIA_H200-*.json (one-shot faster at
# every measured shape up to 2048 x 7168 bf16); 4 and 8 ranks: byte model.
FUSION_ONESHOT_MAX_BYTES = {2: 32 << 20, 4: 1 << 20, 8: 512 << 10, 16: 256 << 10}


def lookup(table: dict[int, int], world: int) -> int:
    """The entry of ``world``, else of the next larger world size in ``table``."""
    for size in sorted(table):
        if world <= size:
            return table[size]
    return table[max(table)]
