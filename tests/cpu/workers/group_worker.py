"""Checks ProcessGroup on every rank; run under mpiexec by tests/cpu/test_group_mpi.py."""

import os
import sys

from mpi4py import MPI

from moecomm.group import ProcessGroup
from tests.mpi import report_pass

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
declared = int(os.environ.get("MOECOMM_GPUS_PER_NODE", "0")) or size

with ProcessGroup() as g:
    assert (g.rank, g.size) == (rank, size), (g.rank, g.size)
    # All ranks of this job share one host; declared nodes cut it in slices.
    assert g.host_local_rank == rank
    assert g.node == rank // declared, (g.node, rank, declared)
    assert g.num_nodes == -(-size // declared)
    assert g.local_rank == rank % declared
    assert g.local_size == min(declared, size - g.node * declared)
    assert g.spans_nodes == (g.num_nodes > 1)

    payload = bytes([rank]) * (rank + 1) + b"\x00tail"
    got = g.allgather_bytes(payload)
    assert got == [bytes([r]) * (r + 1) + b"\x00tail" for r in range(size)]
    local = g.allgather_bytes(payload, local=True)
    first = g.node * declared
    assert local == [bytes([r]) * (r + 1) + b"\x00tail" for r in range(first, first + g.local_size)]
    root = size - 1
    assert g.bcast_bytes(b"from-root" if rank == root else None, root=root) == b"from-root"
    g.barrier()
    g.check_uniform("sizes", (4, "bf16"))
    if size > 1:
        try:
            g.check_uniform("sizes", (4 + rank, "bf16"))
        except ValueError as exc:
            assert "sizes differ across ranks (rank 0: (4, 'bf16'); rank 1: (5, 'bf16')" in str(exc), exc
        else:
            raise AssertionError("differing values went unnoticed")

    # all_or_none: a block that raises on the last rank only raises on every rank (its
    # own error there, one naming it elsewhere), and the collective after it still meets.
    last = size - 1
    try:
        with g.all_or_none("setup"):
            if rank == last:
                raise MemoryError("out of memory here")
    except MemoryError as exc:
        assert rank == last and "out of memory here" in str(exc), exc
    except RuntimeError as exc:
        assert rank != last and f"setup failed on rank(s) [{last}] of this group" in str(exc), exc
    else:
        raise AssertionError("a failed block went unnoticed")
    with g.all_or_none("nothing fails"):
        pass
    assert g.allgather(rank) == list(range(size))

    # Subgroups of even and odd ranks keep node membership of the parent.
    parity = [r for r in range(size) if r % 2 == rank % 2]
    sub = g.split(parity)
    assert sub is not None and sub.size == len(parity) and sub.rank == parity.index(rank)
    nodes_in_sub = {r // declared for r in parity}
    assert sub.num_nodes == len(nodes_in_sub), (sub.num_nodes, nodes_in_sub)
    assert sub.allgather(rank) == parity
    sub.close()
    only_zero = g.split([0])
    assert (only_zero is None) == (rank != 0)
    if only_zero is not None:
        only_zero.close()

# Disagreeing on gpus_per_node is an error on every rank, not a hang.
try:
    ProcessGroup(gpus_per_node=1 + rank % 2)
except ValueError as exc:
    assert "gpus_per_node differs" in str(exc)
else:
    assert size == 1, "mismatched gpus_per_node went unnoticed"
# An invalid value on one rank too: checked after the exchange, so every rank raises.
try:
    ProcessGroup(gpus_per_node=0 if rank == 0 else 1)
except ValueError as exc:
    assert ("must be >= 1" if size == 1 else "gpus_per_node differs") in str(exc), exc
else:
    raise AssertionError("gpus_per_node=0 went unnoticed")

report_pass(rank)
sys.exit(0)
