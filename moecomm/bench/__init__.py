"""Benchmarks: ``mpiexec -n N python -m moecomm.bench <name> [options]``.

Every benchmark prints a table on rank 0 and writes a JSON file (device, GPU count, date,
commit, every measured row) to ``--out`` (default ``bench/results``).
"""
