"""The benchmark entry point: ``gpus`` for ``mpiexec -n``, one "no GPU" message per job,
and ``coldstart`` refusing to run on a machine without a GPU."""

import subprocess
import sys

import pytest

from tests.cpu.test_cli import _has_gpu
from tests.mpi import ROOT, mpiexec, run_ranks


def _bench(*args):
    return subprocess.run([sys.executable, "-m", "moecomm.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_gpus_prints_a_rank_count():
    proc = _bench("gpus")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 1


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the no-GPU path cannot be shown")
@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the test extra)")
def test_no_gpu_message_once_per_job():
    proc = run_ranks(3, "tests/cpu/workers/bench_main.py", "allreduce", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("no CUDA GPU is available") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the no-GPU path cannot be shown")
def test_coldstart_without_gpu():
    proc = _bench("coldstart")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU is available" in proc.stderr
