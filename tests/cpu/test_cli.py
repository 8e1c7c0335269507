"""The benchmark entry point on a machine without a GPU: a clear message, exit code 2."""

import subprocess
import sys

import pytest

from tests.mpi import ROOT


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the no-GPU path cannot be shown")
@pytest.mark.parametrize("suite", ["allreduce", "fusion", "moe", "p2p", "dlpack", "mixed",
                                   "quant", "prepare"])
def test_no_gpu_message(suite):
    proc = subprocess.run([sys.executable, "-m", "moecomm.bench", suite], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU is available" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_suites():
    proc = subprocess.run([sys.executable, "-m", "moecomm.bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for suite in ("allreduce", "fusion", "moe", "p2p", "dlpack", "mixed", "quant", "prepare"):
        assert suite in proc.stdout
