"""``python -m moecomm.bench ARGS`` as a script, for tests.mpi.run_ranks."""

import runpy
import sys

sys.argv = ["moecomm.bench", *sys.argv[1:]]
runpy.run_module("moecomm.bench", run_name="__main__")
