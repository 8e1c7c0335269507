"""``python -m moecomm.precompile`` fills the cache ahead of time and says what and where."""

import os
import re
import subprocess
import sys

from moecomm import kernels
from tests.mpi import ROOT


def _precompile(cache, *args):
    env = dict(os.environ, MOECOMM_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop("MOECOMM_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "moecomm.precompile", *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_fills_the_cache_and_says_where(tmp_path):
    args = ["--arch", "sm_90", "--arch", "80", "--source", "symmetric.cu",
            "--source", "allreduce.cu"]
    proc = _precompile(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    folder = str(tmp_path / "kernels")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert len(rows) == 4, proc.stdout
    for line in rows:
        assert re.match(r"sm_(80|90)\s+(symmetric|allreduce)\.cu\s+compiled in \d+\.\d s\s+"
                        + re.escape(folder) + r"/\w+\.cubin$", line), line
    assert "4 modules ready (4 compiled)" in proc.stdout
    # INFO is on for this command: one log line per compile.
    assert len(re.findall(r"moecomm INFO: compiled ", proc.stderr)) == 4, proc.stderr
    assert len(list((tmp_path / "kernels").glob("*.cubin"))) == 4

    again = _precompile(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(" cached ") == 4, again.stdout
    assert "(0 compiled)" in again.stdout
    assert "INFO: compiled" not in again.stderr


def test_bad_arguments(tmp_path):
    proc = _precompile(tmp_path, "--source", "missing.cu")
    assert proc.returncode == 2 and "missing.cu" in proc.stderr
    proc = _precompile(tmp_path, "--arch", "hopper")
    assert proc.returncode == 2 and "hopper" in proc.stderr


def test_cache_key_covers_the_cuda_headers(monkeypatch):
    """A cubin compiled against other CUDA headers (a new runtime wheel) is not reused."""
    key = kernels._cache_key("symmetric.cu", "sm_90", None)
    assert kernels._cache_key("symmetric.cu", "sm_90", None) == key
    monkeypatch.setattr(kernels, "_headers_digest", lambda: "headers of another release")
    assert kernels._cache_key("symmetric.cu", "sm_90", None) != key
