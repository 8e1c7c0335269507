"""Compile moecomm's kernels ahead of time, so no process waits for NVRTC.

``python -m moecomm.precompile [--arch sm_90 ...] [--source fusion.cu ...] [--jobs N]``
fills the kernel cache (``MOECOMM_CACHE_DIR``, default ``~/.cache/moecomm``) for the
archs of this host's GPUs (every supported arch where there is none, or none is
visible), and prints each module, what happened to it and where its cubin is. A module
the installed wheel already ships a matching cubin for is listed as such and not
compiled (``MOECOMM_FORCE_JIT=1`` compiles it anyway, as the runtime would then).
Several compiles run at once, in worker processes; the cache's per-entry lock makes it
safe to run this while ranks are starting. Needs NVRTC, not a GPU, nor CuPy.

``build_prebuilt(folder)`` is what a wheel build runs: every source for every supported
arch, written with the manifest ``moecomm.kernels`` reads the shipped cubins through.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import kernels
from .log import logger, show_info


def _default_jobs(tasks: int) -> int:
    return max(1, min(tasks, os.cpu_count() or 1, 8))


def _pool(jobs: int) -> ProcessPoolExecutor:
    # fork: the workers inherit this process's modules as they are (the wheel build loads
    # moecomm without its package __init__), and start at once.
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"))


def _compile_bare(task: tuple[str, str]) -> tuple[bytes, float]:
    source, arch = task
    start = time.perf_counter()
    cubin = kernels.nvrtc_compile(source, arch)
    return cubin, time.perf_counter() - start


def build_prebuilt(folder: str | os.PathLike, archs=kernels.SUPPORTED_ARCHS, sources=None,
                   jobs: int | None = None) -> dict:
    """Compile ``sources`` (default: every one) for ``archs`` into ``folder``: one
    ``<arch>/<stem>.cubin`` each and ``manifest.json``, which maps each cubin's
    ``kernels.prebuilt_key`` (source tree digest, source, exact options) to its file.
    Bypasses the cache (a build must not depend on what this machine compiled before).
    Returns the manifest."""
    folder = Path(folder)
    archs = [kernels.normalize_arch(a) for a in archs]
    sources = list(sources) if sources is not None else kernels.list_sources()
    tasks = [(s, a) for a in archs for s in sources]
    jobs = jobs or _default_jobs(len(tasks))
    manifest = {"format": kernels.MANIFEST_FORMAT, "nvrtc": list(kernels.nvrtc_version()),
                "tree_digest": kernels._tree_digest(), "cubins": {}}
    start = time.perf_counter()
    if jobs > 1 and len(tasks) > 1:
        with _pool(jobs) as pool:
            results = list(pool.map(_compile_bare, tasks))
    else:
        results = [_compile_bare(t) for t in tasks]
    for (source, arch), (cubin, seconds) in zip(tasks, results):
        rel = f"{arch}/{Path(source).stem}.cubin"
        (folder / arch).mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(cubin)
        manifest["cubins"][kernels.prebuilt_key(source, arch)] = {
            "source": source, "arch": arch, "file": rel,
            "options": list(kernels._key_options(arch, None)),
            "sha256": hashlib.sha256(cubin).hexdigest(), "kernels": kernels.cubin_kernels(cubin),
            "seconds": round(seconds, 2)}
        logger.info("built %s for %s in %.1f s -> %s", source, arch, seconds, folder / rel)
    (folder / kernels.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    logger.info("built %d cubins with NVRTC %d.%d in %.1f s (%d jobs) -> %s", len(tasks),
                *manifest["nvrtc"], time.perf_counter() - start, jobs, folder)
    return manifest


def host_archs() -> list[str]:
    """Archs of this host's visible GPUs, or [] without CuPy, a driver or a device."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        return sorted({"sm_" + cupy.cuda.Device(i).compute_capability for i in range(count)})
    except Exception:
        return []


def _fill(task: tuple[str, str]) -> tuple[str, str, float | None]:
    """One cache entry: ("compiled"|"cached"|"waited", path, seconds compiled)."""
    source, arch = task
    path = kernels.cubin_path(source, arch)
    what = f"{source}/{arch}"
    done = kernels.stats()
    if what in done["compiled"]:
        return "compiled", str(path), done["compiled"][what]
    return ("waited" if what in done["waited"] else "cached"), str(path), None


def precompile(archs=None, sources=None, jobs: int | None = None) -> list[dict]:
    """Make every (source, arch) loadable without a compile; one row per pair:
    ``{"source", "arch", "status", "path", "seconds"}`` with status ``shipped`` (the
    wheel's cubin applies), ``compiled``, ``cached`` (already there) or ``waited``
    (another process compiled it meanwhile)."""
    archs = [kernels.normalize_arch(a) for a in (archs or host_archs() or
                                                 kernels.SUPPORTED_ARCHS)]
    sources = list(sources) if sources is not None else kernels.list_sources()
    rows, tasks = [], []
    for arch in archs:
        for source in sources:
            shipped = None if kernels.force_jit() else kernels.prebuilt_cubin(source, arch)
            if shipped is not None:
                rows.append({"source": source, "arch": arch, "status": "shipped",
                             "path": str(shipped), "seconds": None})
            else:
                tasks.append((source, arch))
    jobs = jobs or _default_jobs(len(tasks))
    if jobs > 1 and len(tasks) > 1:
        with _pool(jobs) as pool:
            results = list(pool.map(_fill, tasks))
    else:
        results = [_fill(t) for t in tasks]
    for (source, arch), (status, path, seconds) in zip(tasks, results):
        rows.append({"source": source, "arch": arch, "status": status, "path": path,
                     "seconds": seconds})
    order = {(a, s): i for i, (a, s) in enumerate((a, s) for a in archs for s in sources)}
    return sorted(rows, key=lambda r: order[(r["arch"], r["source"])])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moecomm.precompile",
        description="Compile moecomm's kernels into the kernel cache ahead of time.")
    parser.add_argument("--arch", action="append", metavar="sm_XY",
                        help="an arch to compile for (repeatable); default: this host's "
                             "GPUs, or %s without one" % ", ".join(kernels.SUPPORTED_ARCHS))
    parser.add_argument("--source", action="append", metavar="NAME.cu",
                        help="a kernel source (repeatable); default: all of %s"
                             % ", ".join(kernels.list_sources()))
    parser.add_argument("--jobs", type=int, default=None,
                        help="compiles at once (default: CPU count, at most 8)")
    args = parser.parse_args(argv)
    show_info()
    try:
        archs = [kernels.normalize_arch(a) for a in args.arch] if args.arch else None
    except ValueError as exc:
        parser.error(str(exc))
    unknown = sorted(set(args.source or ()) - set(kernels.list_sources()))
    if unknown:
        parser.error(f"no kernel source {', '.join(unknown)} in {kernels.source_dir()}")
    start = time.perf_counter()
    try:
        rows = precompile(archs, args.source, args.jobs)
    except kernels.KernelCompileError as exc:
        print(f"moecomm.precompile: {exc}", file=sys.stderr)
        return 1
    width = max(len(r["source"]) for r in rows)
    for r in rows:
        status = r["status"] + (f" in {r['seconds']:.1f} s" if r["seconds"] is not None else "")
        print(f"{r['arch']:<7} {r['source']:<{width}}  {status:<18} {r['path']}")
    compiled = sum(r["status"] == "compiled" for r in rows)
    cache = {str(Path(r["path"]).parent) for r in rows if r["status"] != "shipped"}
    print(f"{len(rows)} module{'s' * (len(rows) != 1)} ready ({compiled} compiled) in "
          f"{time.perf_counter() - start:.1f} s; cache: {', '.join(sorted(cache)) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
