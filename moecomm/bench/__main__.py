"""``python -m moecomm.bench {allreduce,fusion,p2p,dlpack,moe,dcp,mixed,overlap,prepare,quant,coldstart} [options]`` (run under mpiexec,
e.g. ``mpiexec -n $(python -m moecomm.bench gpus) python -m moecomm.bench allreduce``);
``python -m moecomm.bench quant`` (one rank: the standalone quantizers' bandwidth);
``python -m moecomm.bench coldstart`` (without mpiexec: it starts its own jobs);
``python -m moecomm.bench gpus`` prints this host's GPU count (at least 1), for ``-n``."""

from __future__ import annotations

import argparse
import sys

from ..log import launcher_rank, show_info
from . import allreduce, coldstart, dcp, dlpack, fusion, mixed, moe, overlap, p2p, prepare, quant
from .common import NoGpuError

SUITES = {"allreduce": allreduce, "fusion": fusion, "p2p": p2p, "dlpack": dlpack,
          "moe": moe, "dcp": dcp, "mixed": mixed, "overlap": overlap, "prepare": prepare,
          "quant": quant, "coldstart": coldstart}


def gpu_count() -> int:
    """CUDA devices visible here (CUDA_VISIBLE_DEVICES applies), 0 without CuPy/driver."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def _rank() -> int:
    """This process's rank: MPI's where mpi4py has initialised it, else the launcher's."""
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD.Get_rank()
    except Exception:
        pass
    return launcher_rank() or 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moecomm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True)
    for name, module in SUITES.items():
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        p.add_argument("--out", default="bench/results", help="folder for the JSON result")
        module.add_arguments(p)
    sub.add_parser("gpus", help="print this host's GPU count (at least 1), for mpiexec -n")
    args = parser.parse_args(argv)
    if args.suite == "gpus":
        print(max(1, gpu_count()))
        return 0
    show_info()
    try:
        return SUITES[args.suite].run(args) or 0
    except NoGpuError as exc:
        # Every rank exits with 2; only the first says why, once for the whole job.
        if _rank() == 0:
            print(f"moecomm.bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
