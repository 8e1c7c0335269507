"""Start multi-rank test jobs with the ``mpiexec`` that matches this Python's mpi4py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mpiexec() -> str | None:
    """The mpiexec next to this interpreter (pip's mpich), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return str(beside)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _is_open_mpi(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def run_ranks(n: int, script: str, *args: str, env: dict | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python script args`` on ``n`` ranks; returns the finished process.

    The job's environment is this one plus ``env``, with the checkout on PYTHONPATH and
    NVLink multicast kept off.
    """
    exe = mpiexec()
    if exe is None:
        raise RuntimeError("no mpiexec found: install the test extra (pip's mpich)")
    cmd = [exe]
    if _is_open_mpi(exe):
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    cmd += ["-n", str(n), sys.executable, str(ROOT / script), *args]
    full_env = dict(os.environ)
    full_env.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                     "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"})
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [full_env.get("PYTHONPATH")])])
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def check_ranks(n: int, script: str, *args: str, env: dict | None = None,
                timeout: float = 240) -> str:
    """``run_ranks`` that fails the test with the job's output unless every rank passed.

    Each worker calls ``report_pass(rank)`` as its last act; all ``n`` must appear.
    """
    proc = run_ranks(n, script, *args, env=env, timeout=timeout)
    out = proc.stdout + proc.stderr
    # Ranks' lines may arrive glued together, so match the marker anywhere.
    passed = set(re.findall(r"<PASS (\d+)>", proc.stdout))
    if proc.returncode != 0 or len(passed) != n:
        raise AssertionError(f"{script} {' '.join(args)} on {n} ranks: exit {proc.returncode}, "
                             f"passed ranks {sorted(passed)}\n{out[-6000:]}")
    return out


def report_pass(rank: int) -> None:
    """A worker's last line: this rank ran every check."""
    print(f"<PASS {rank}>", flush=True)


def expect_raises(exc_type, text: str, fn):
    """``fn()`` must raise ``exc_type`` with ``text`` in its message; returns the error."""
    try:
        fn()
    except exc_type as exc:
        assert text in str(exc), f"{exc_type.__name__} without {text!r}: {exc}"
        return exc
    raise AssertionError(f"no {exc_type.__name__} ({text})")
