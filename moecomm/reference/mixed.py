"""Mixed TP/DP collectives (``moecomm.constants.MixedCommOp``) over all ranks' inputs.

The rank at (tp, dp) holds ``x`` of shape ``[rows, ...]``; ``tp_rank[r]``/``dp_rank[r]``
give every world rank's coordinates. Each output element is a sum over a set of ranks,
taken in ascending world-rank order in fp32 and rounded once (``all_reduce``: an input -0.0
reads as +0.0), so every rank, and every mode of the runtime, gets the same bits. A copy
(ALLGATHER) is a sum of one input: -0.0 arrives as +0.0.

* ALLREDUCE: ``sum over s with dp(s) == dp(r) of x_s`` (the TP group).
* ALLGATHER: block ``i`` is ``x_s`` with ``tp(s) == tp(r)``, ``dp(s) == i``.
* REDUCESCATTER: ``sum over s with tp(s) == tp(r) of block dp(r) of x_s``; blocks are
  ``rows / dp_size`` rows.
* ALLREDUCE_ALLGATHER: block ``i`` is ``sum over s with dp(s) == i of x_s``.
* REDUCESCATTER_ALLREDUCE: ``sum over every s of block dp(r) of x_s``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..constants import MixedCommOp
from .allreduce import all_reduce

__all__ = ["mixed_comm"]


def mixed_comm(op: MixedCommOp, inputs: Sequence[Any], tp_rank: Sequence[int],
               dp_rank: Sequence[int]) -> list[np.ndarray]:
    """Every rank's output of ``op``; ``inputs[r]`` is world rank r's ``x`` (bf16 bits,
    fp16 or fp32; same shape everywhere)."""
    op = MixedCommOp(op)
    world = len(inputs)
    if len(tp_rank) != world or len(dp_rank) != world:
        raise ValueError("tp_rank and dp_rank need one entry per input")
    xs = [np.asarray(x) for x in inputs]
    dp_size = max(dp_rank) + 1
    rows = xs[0].shape[0]
    if op in (MixedCommOp.REDUCESCATTER, MixedCommOp.REDUCESCATTER_ALLREDUCE) and rows % dp_size:
        raise ValueError(f"{rows} rows do not split into {dp_size} blocks")
    block = rows // dp_size

    def ranks(pred) -> list[int]:
        return [s for s in range(world) if pred(s)]

    def blk(x, d):
        return x[d * block:(d + 1) * block]

    outs = []
    for r in range(world):
        t, d = tp_rank[r], dp_rank[r]
        if op == MixedCommOp.ALLREDUCE:
            out = all_reduce([xs[s] for s in ranks(lambda s: dp_rank[s] == d)])
        elif op == MixedCommOp.ALLGATHER:
            out = np.concatenate([all_reduce([xs[s] for s in ranks(
                lambda s: tp_rank[s] == t and dp_rank[s] == i)]) for i in range(dp_size)])
        elif op == MixedCommOp.REDUCESCATTER:
            out = all_reduce([blk(xs[s], d) for s in ranks(lambda s: tp_rank[s] == t)])
        elif op == MixedCommOp.ALLREDUCE_ALLGATHER:
            out = np.concatenate([all_reduce([xs[s] for s in ranks(lambda s: dp_rank[s] == i)])
                                  for i in range(dp_size)])
        else:
            out = all_reduce([blk(xs[s], d) for s in range(world)])
        outs.append(out)
    return outs
