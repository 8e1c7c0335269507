"""Cold start: seconds from `import moecomm` to the first completed allreduce_fusion.

Run it WITHOUT mpiexec: it starts its own jobs (``--ranks``, default 2), one per mode,
each in fresh processes and with a fresh, empty kernel cache:

- ``wheel``: the installed wheel's cubins (an editable install has none: the row says so);
- ``jit``: ``MOECOMM_FORCE_JIT=1``, every module compiled by NVRTC (once per host);
- ``cached``: JIT again over the cache the ``jit`` run filled.

Each rank times ``import moecomm`` (and CuPy, NumPy, mpi4py under it), ``init()``, the
fusion workspace, and the first ``allreduce_fusion`` (residual + RMSNorm, bf16) up to its
stream's completion; a row is the slowest rank. Also reported: where each rank's modules
came from (shipped / compiled / waited for another rank's compile / cache). Install the
wheel and run from outside the checkout, or the checkout's sources are imported:
``cd /tmp && python -m moecomm.bench coldstart --out <checkout>/bench/results``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..log import launcher_rank
from .common import NoGpuError, print_table

MODES = ("wheel", "jit", "cached")
WORKER = Path(__file__).with_name("coldstart_worker.py")


def add_arguments(p) -> None:
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help="any of " + ",".join(MODES))
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--mpiexec", default=None,
                   help="launcher (default: the one beside this Python, else on PATH)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")


def _mpiexec(explicit: str | None) -> list[str]:
    exe = explicit or (str(Path(sys.executable).parent / "mpiexec")
                       if (Path(sys.executable).parent / "mpiexec").is_file()
                       else shutil.which("mpiexec") or shutil.which("mpirun"))
    if not exe:
        raise SystemExit("moecomm.bench coldstart: no mpiexec found (install the test extra, "
                         "or pass --mpiexec)")
    cmd = [exe]
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=30)
        if any(name in version.stdout + version.stderr for name in ("Open MPI", "OpenRTE")):
            cmd += ["--oversubscribe", "--bind-to", "none"]
            if os.geteuid() == 0:
                cmd.append("--allow-run-as-root")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return cmd


def _gpus() -> tuple[int, str]:
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise NoGpuError(f"no CUDA GPU is available here ({type(exc).__name__}: {exc})") from None
    if count == 0:
        raise NoGpuError("no CUDA GPU is available here (0 devices)")
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return count, name.decode() if isinstance(name, bytes) else name


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], check=True,
                              capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MOECOMM_COMMIT", "unknown")


def _job(cmd: list[str], mode: str, cache: Path, args) -> dict:
    import moecomm

    env = dict(os.environ)
    for name in ("MOECOMM_FORCE_JIT", "MOECOMM_LOG_LEVEL"):
        env.pop(name, None)
    # CuPy's own kernel cache starts empty too, so nothing compiled earlier is reused.
    env.update({"MOECOMM_CACHE_DIR": str(cache), "CUPY_CACHE_DIR": str(cache / "cupy"),
                "MOECOMM_LOG_LEVEL": "INFO",
                "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"})
    if mode != "wheel":
        env["MOECOMM_FORCE_JIT"] = "1"
    # The workers import the moecomm this process imported (installed wheel or checkout).
    home = str(Path(moecomm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([home, *filter(None, [env.get("PYTHONPATH")])])
    full = [*cmd, "-n", str(args.ranks), sys.executable, str(WORKER), str(args.hidden),
            str(args.tokens)]
    proc = subprocess.run(full, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in proc.stderr.splitlines():
        if "moecomm" in line and ("INFO" in line or "WARNING" in line):
            print(f"  [{mode}] {line}")
    found = [line for line in proc.stdout.splitlines() if line.startswith("COLDSTART ")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"coldstart {mode}: exit {proc.returncode}\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(found[-1][len("COLDSTART "):])


def run(args) -> int:
    if launcher_rank() is not None:
        print("moecomm.bench coldstart starts its own jobs: run it without mpiexec",
              file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        print(f"moecomm.bench coldstart: unknown mode(s) {bad}; use {', '.join(MODES)}",
              file=sys.stderr)
        return 2
    gpu_count, device = _gpus()
    cmd = _mpiexec(args.mpiexec)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moecomm-coldstart-") as tmp:
        for mode in modes:
            cache = Path(tmp) / ("jit" if mode in ("jit", "cached") else mode)
            if mode == "jit":
                shutil.rmtree(cache, ignore_errors=True)  # "cached" may have run first
            print(f"coldstart {mode}: {args.ranks} ranks, cache {cache}", flush=True)
            result = _job(cmd, mode, cache, args)
            origins = result["origins"]
            note = ""
            if mode == "wheel" and not origins["prebuilt"]:
                note = ("no shipped cubin used (editable install, a source checkout on "
                        "PYTHONPATH, or no cubin for this arch)")
            rows.append({"mode": mode, "total_s": result["total_s"],
                         "import_s": result["import_s"], "init_s": result["init_s"],
                         "workspace_s": result["workspace_s"],
                         "first_call_s": result["first_call_s"],
                         "second_call_ms": result["second_call_s"] * 1e3,
                         "shipped": origins["prebuilt"], "compiled": origins["compiled"],
                         "waited": origins["waited"], "cached": origins["cached"],
                         "arch": result["arch"], "note": note})
    print_table(rows, ["mode", "total_s", "import_s", "init_s", "workspace_s", "first_call_s",
                       "second_call_ms", "shipped", "compiled", "waited", "cached"])
    for r in rows:
        if r["note"]:
            print(f"{r['mode']}: {r['note']}")
    env = {"device": device, "gpu_count": gpu_count, "ranks": args.ranks,
           "host": platform.node(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": _commit(), "hidden": args.hidden, "tokens": args.tokens}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    path = folder / (f"coldstart-r{args.ranks}-{gpu_count}x{device.replace(' ', '_')}-"
                     f"{stamp}.json")
    path.write_text(json.dumps({"benchmark": "coldstart", **env, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0
