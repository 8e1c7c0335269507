"""N ranks of one host ask for every kernel module at once, against one empty cache; run
under mpiexec by tests/cpu/test_compile_ranks.py. Arg: the arch. Rank 0 checks that each
module was compiled by exactly one rank and the others waited for it or found it cached."""

import sys

from mpi4py import MPI

from moecomm import kernels
from tests.mpi import report_pass

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
arch = sys.argv[1]
sources = kernels.list_sources()
# Each rank starts on a different module, so every lock is contended while held.
shift = rank % len(sources)
order = sources[shift:] + sources[:shift]

world.Barrier()
paths = {s: kernels.cubin_path(s, arch) for s in order}
for path in paths.values():
    assert path.read_bytes()[:4] == b"\x7fELF", path

everyone = world.allgather(({s: str(p) for s, p in paths.items()}, kernels.stats()))
assert all(p == everyone[0][0] for p, _ in everyone), "ranks got different cache entries"
for source in sources:
    what = f"{source}/{arch}"
    compiled = [r for r, (_, st) in enumerate(everyone) if what in st["compiled"]]
    others = [r for r, (_, st) in enumerate(everyone)
              if what in st["waited"] or what in st["cached"]]
    assert len(compiled) == 1, f"{what}: compiled by ranks {compiled}"
    assert sorted(compiled + others) == list(range(size)), (what, compiled, others)
if rank == 0:
    waited = sum(len(st["waited"]) for _, st in everyone)
    print(f"compiles: {len(sources)}, waits: {waited}", flush=True)
report_pass(rank)
