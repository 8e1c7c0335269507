"""Shared benchmark machinery: GPU check, CUDA-event timing, graph replay, JSON results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable


class NoGpuError(RuntimeError):
    """No CUDA device (or no CuPy): the benchmark cannot run on this machine."""


def require_gpu():
    """Initialise the process group and this rank's device, or raise NoGpuError."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, or CuPy's "no driver/no device" errors
        raise NoGpuError(f"no CUDA GPU is available here ({type(exc).__name__}: {exc})") from None
    if count == 0:
        raise NoGpuError("no CUDA GPU is available here (0 devices)")
    import moecomm

    return moecomm.init()


def median_us(fn: Callable[[], None], *, iters: int = 50, warmup: int = 10, stream=None) -> float:
    """Median time of ``fn()`` in microseconds: CUDA events around each call on ``stream``."""
    import cupy
    import numpy as np

    stream = stream or cupy.cuda.get_current_stream()
    for _ in range(warmup):
        fn()
    stream.synchronize()
    times = []
    for _ in range(iters):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
    return float(np.median(times))


def in_turn(fns: list, rounds: int, measure: Callable, *, warm: Callable,
            scopes: list | None = None) -> list[list]:
    """``measure(fn)`` ``rounds`` times for each of ``fns``, every round taking each fn once
    in turn, so that a drift of the host or a peer over the run moves every fn's results
    alike (one fn after another would give the drift to whichever ran then). ``warm(fn)``
    runs once per fn first; ``scopes[i]()``, if given, is a context entered around fn
    i's calls. Returns one list of ``rounds`` results per fn."""
    import contextlib

    scopes = scopes or [contextlib.nullcontext] * len(fns)
    for fn, scope in zip(fns, scopes):
        with scope():
            warm(fn)
    results = [[] for _ in fns]
    for _ in range(rounds):
        for fn, scope, out in zip(fns, scopes, results):
            with scope():
                out.append(measure(fn))
    return results


def batch_wall_us(fn: Callable[[], None], calls: int, barrier=None) -> float:
    """Wall microseconds per call of ``calls`` back-to-back ``fn()`` calls, synchronised
    once at the end (the GPU drained first; ``barrier()``, if given, lines the ranks up)."""
    import cupy

    cupy.cuda.runtime.deviceSynchronize()
    if barrier is not None:
        barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    cupy.cuda.runtime.deviceSynchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def host_speed(group, calls: int = 400) -> list[dict]:
    """Each rank's host speed, measured in the process that runs the benchmark: host
    microseconds per bare kernel launch (a zero-length ``bench_spin`` through CuPy,
    enqueued behind a spin so that no launch waits for the GPU; ``calls`` stays well
    below the launch queue's depth, past which a launch waits for the spin to end) and
    per 8 KiB ``cupy.empty``, medians of 5 batches of ``calls``.

    Eager (host-bound) results mean little without it: on the virtual machines of the
    2 x H200 hosts a process at times runs every piece of host code 1.4-1.9x slower than
    the other rank on the same machine (a bare launch 5.4-8.2 instead of 4.1-4.5 us), for
    seconds at a stretch or all along; this is its state at the time of the call."""
    import cupy
    import numpy as np

    from ..kernels import get_kernel

    spin = get_kernel("bench_moe.cu", "bench_spin")
    zero = (np.uint64(0),)
    launch, alloc = [], []
    for _ in range(5):
        cupy.cuda.runtime.deviceSynchronize()
        spin((1,), (1,), (np.uint64(20_000_000),))  # 20 ms, longer than the batch's launches
        t0 = time.perf_counter()
        for _ in range(calls):
            spin((1,), (1,), zero)
        launch.append((time.perf_counter() - t0) / calls * 1e6)
        t0 = time.perf_counter()
        for _ in range(calls):
            cupy.empty(4096, np.uint16)
        alloc.append((time.perf_counter() - t0) / calls * 1e6)
    cupy.cuda.runtime.deviceSynchronize()
    mine = {"rank": group.rank, "launch_us": float(np.median(launch)),
            "alloc_us": float(np.median(alloc))}
    return group.allgather(mine)


def graph_median_us(fn: Callable[[], None], *, calls: int = 10, iters: int = 50,
                    warmup: int = 5, stream=None) -> float:
    """Median time per ``fn()`` of a captured graph of ``calls`` calls, replayed."""
    import cupy

    stream = stream or cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()  # compile and load outside the capture
        stream.begin_capture()
        for _ in range(calls):
            fn()
        graph = stream.end_capture()
    graph.upload(stream)
    return median_us(lambda: graph.launch(stream), iters=iters, warmup=warmup,
                     stream=stream) / calls


def source_commit() -> str:
    """The commit of the running source: git's HEAD, with ``-dirty`` when tracked files
    differ from it (results then belong to no commit); else MOECOMM_COMMIT or unknown."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"],
                                capture_output=True, text=True, check=True,
                                cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True,
                                 cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MOECOMM_COMMIT", "unknown")
    return commit + ("-dirty" if changed else "")


def environment(group) -> dict:
    """Device, GPU count, host, date and commit, for the result file."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    commit = source_commit()
    gpus = sorted(set(group.allgather((group.host, cupy.cuda.Device().pci_bus_id))))
    return {
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "gpu_count": len(gpus),
        "ranks": group.size,
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "cupy": cupy.__version__,
    }


def write_result(out_dir: str, name: str, env: dict, rows: list[dict], **extra) -> Path:
    """Write ``{env, rows, extra}`` as
    ``<out_dir>/<name>-r<ranks>-<gpus>x<device>-<date>.json``."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    device = env["device"].replace(" ", "_")
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    path = folder / f"{name}-r{env['ranks']}-{env['gpu_count']}x{device}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, **env, **extra, "rows": rows}, indent=1))
    return path


def parse_config(cls, text: str):
    """A frozen config dataclass from ``"field=value,field=value"`` (ints, bools as 0/1)."""
    import dataclasses

    values = {}
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--config: {cls.__name__} has no field {name!r}; fields: "
                             f"{sorted(types)}")
        values[name] = bool(int(value)) if "bool" in str(types[name]) else int(value)
    return cls(**values)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "-" if v is None else str(v)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install moecomm[plot])")
        return None
    return plt
