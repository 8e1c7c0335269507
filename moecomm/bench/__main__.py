"""``python -m moecomm.bench {allreduce,fusion,p2p,dlpack,moe} [options]`` (run under mpiexec)."""

from __future__ import annotations

import argparse
import sys

from . import allreduce, dlpack, fusion, moe, p2p
from .common import NoGpuError

SUITES = {"allreduce": allreduce, "fusion": fusion, "p2p": p2p, "dlpack": dlpack,
          "moe": moe}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moecomm.bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    for name, module in SUITES.items():
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        p.add_argument("--out", default="bench/results", help="folder for the JSON result")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return SUITES[args.suite].run(args) or 0
    except NoGpuError as exc:
        print(f"moecomm.bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
