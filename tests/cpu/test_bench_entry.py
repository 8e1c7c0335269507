"""The benchmark entry point: ``gpus`` for ``mpiexec -n``, one "no GPU" message per job,
and ``coldstart`` refusing to run on a machine without a GPU."""

import argparse
import json
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


STAND_IN = """
import json, os
from mpi4py import MPI
if MPI.COMM_WORLD.rank == 0:
    jit = os.environ.get("MOECOMM_FORCE_JIT") == "1"
    assert os.environ["MOECOMM_CACHE_DIR"] and os.environ["MOECOMM_LOG_LEVEL"] == "INFO"
    print("COLDSTART " + json.dumps(dict(
        import_s=0.5, init_s=0.1, workspace_s=0.1, first_call_s=0.2, total_s=0.9,
        second_call_s=1e-4, arch="sm_90", ranks=[], origins=dict(
            prebuilt=0 if jit else 8, compiled=2 if jit else 0, waited=2 if jit else 0,
            cached=0))))
"""


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the test extra)")
def test_coldstart_driver(tmp_path, monkeypatch):
    """The driver's side of bench coldstart (jobs, environment, table, JSON), with a
    stand-in for the GPU worker."""
    from moecomm.bench import coldstart

    worker = tmp_path / "worker.py"
    worker.write_text(STAND_IN)
    monkeypatch.setattr(coldstart, "WORKER", worker)
    monkeypatch.setattr(coldstart, "_gpus", lambda: (2, "Stand-in GPU"))
    args = argparse.Namespace(ranks=2, modes="wheel,jit,cached", hidden=64, tokens=1,
                              mpiexec=None, timeout=120, out=str(tmp_path / "out"))
    assert coldstart.run(args) == 0
    (path,) = (tmp_path / "out").glob("coldstart-r2-2xStand-in_GPU-*.json")
    result = json.loads(path.read_text())
    assert result["benchmark"] == "coldstart" and result["ranks"] == 2
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["wheel"]["shipped"] == 8 and rows["wheel"]["compiled"] == 0
    assert rows["jit"]["shipped"] == 0 and rows["jit"]["compiled"] == 2
    assert rows["jit"]["total_s"] == 0.9
