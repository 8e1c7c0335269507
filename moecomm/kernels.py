"""Kernel library: the CUDA C++ sources in ``kernels_cu/``, compiled by NVRTC.

Kernels are ``extern "C"`` functions. Every compile gets the shared constants of
``moecomm.constants`` as ``-D`` options (``kernels_cu/config.cuh`` reads them); a source may
be specialised further with ``defines`` (name -> int). Launching is ``moecomm.launch``.

Where a module's cubin comes from (``get_module``, for the current device), in order:

1. **Shipped with the wheel.** A wheel build compiles every source for sm_80, sm_90 and
   sm_100 with NVRTC (no GPU needed) into ``moecomm/kernels_prebuilt/`` with a manifest.
   A shipped cubin is used only when its key -- the digest of every file of
   ``kernels_cu/``, the source, and the exact options this process would compile with
   (``--gpu-architecture``, the base options, every ``-D`` define) -- equals the key of
   the compile it replaces, so the device's arch must be exactly the cubin's (an sm_86
   or sm_89 device compiles its own). The rule against the driver: a cubin is SASS for
   that exact arch, so the driver loads it without any JIT of its own; what it needs is
   to understand the cubin's CUDA major version, so a shipped cubin is used when the
   driver's CUDA major version (``cudaDriverGetVersion``) is at least that of the NVRTC
   that built it (CUDA's minor-version compatibility covers a newer minor; the cu12-built
   cubins load under a CUDA 13 driver). The local NVRTC's version does not matter for a
   shipped cubin. Should the driver still refuse it, the module is compiled instead
   (logged as a WARNING).
2. **The disk cache**, ``MOECOMM_CACHE_DIR`` (default ``~/.cache/moecomm``; a folder in
   the temp dir when that is not writable), keyed by the same digest, source and
   options plus the NVRTC version.
3. **A JIT compile** with NVRTC into that cache. Only one process per host compiles a
   given module: a file lock next to the cache entry (``<key>.lock``, ``flock``) makes
   the others wait and then load its result. The entry is written to a temporary file
   and renamed into place, so a process killed at any point never leaves a broken
   entry (and the operating system releases its lock).

``MOECOMM_FORCE_JIT=1`` skips step 1. An editable install (``pip install -e``) or a
source checkout has no shipped cubins and always takes steps 2-3.
``python -m moecomm.precompile`` fills the cache ahead of time.

``nvrtc_compile(source, arch)`` (no cache: the wheel build) and ``compile_cubin`` /
``cubin_path`` (through the cache: the CPU tests, ``precompile``) compile for any arch
without a GPU (NVRTC only, through ``moecomm._nvrtc``; no CuPy). Each compile through
the cache logs one INFO line on the ``moecomm`` logger (``moecomm.log``); the first one
of a process that runs past ``SLOW_COMPILE_S`` seconds logs a WARNING, while it runs,
saying how to precompile.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from .constants import kernel_defines
from .log import logger

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, the atomic rename still holds
    fcntl = None

SUPPORTED_ARCHS = ("sm_80", "sm_90", "sm_100")
_BASE_OPTIONS = ("-std=c++17", "--device-as-default-execution-space")

CACHE_DIR_ENV = "MOECOMM_CACHE_DIR"
FORCE_JIT_ENV = "MOECOMM_FORCE_JIT"
PREBUILT_DIRNAME = "kernels_prebuilt"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# A compile running longer than this (seconds) warns, once per process.
SLOW_COMPILE_S = 5.0


class KernelCompileError(RuntimeError):
    """NVRTC rejected a source; the message carries NVRTC's log."""


def source_dir() -> Path:
    """The folder of ``*.cu``/``*.cuh`` files: ``moecomm/kernels_cu`` in an installed
    wheel, the top-level ``kernels_cu/`` in a source checkout (editable install included)."""
    package = Path(__file__).resolve().parent
    for folder in (package / "kernels_cu", package.parent / "kernels_cu"):
        if (folder / "common.cuh").is_file():
            return folder
    raise FileNotFoundError(f"kernels_cu/ not found in {package} or beside it")


def list_sources() -> list[str]:
    """Names of the compilable sources (``*.cu``), sorted."""
    return sorted(p.name for p in source_dir().glob("*.cu"))


@lru_cache(maxsize=1)
def _tree_digest() -> str:
    """Hash of every source and header, so editing a header invalidates the cache."""
    h = hashlib.sha256()
    for path in sorted(source_dir().glob("*.cu*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def _cuda_include_dir() -> str:
    """CUDA headers (cuda_bf16.h, ...) from NVIDIA's runtime wheel or the toolkit."""
    import cuda.pathfinder

    found = cuda.pathfinder.find_nvidia_header_directory("cudart")
    if not found:
        raise FileNotFoundError(
            "CUDA headers not found: install nvidia-cuda-runtime-cu12 (or the cuda12/cuda13 "
            "extra of moecomm), or set CUDA_HOME to a CUDA toolkit"
        )
    return str(found)


@lru_cache(maxsize=1)
def _headers_digest() -> str:
    """Hash of the CUDA headers whose conversions the kernels use (cuda_bf16, cuda_fp16,
    cuda_fp8), so a new runtime wheel's headers invalidate the cache."""
    h = hashlib.sha256()
    folder = Path(_cuda_include_dir())
    for stem in ("cuda_bf16", "cuda_fp16", "cuda_fp8"):
        for path in (folder / f"{stem}.h", folder / f"{stem}.hpp"):
            h.update(path.name.encode())
            h.update(path.read_bytes() if path.is_file() else b"-")
    return h.hexdigest()


def _nvrtc():
    from . import _nvrtc

    return _nvrtc


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC that compiles here."""
    return _nvrtc().version()


def normalize_arch(arch: str | int | tuple[int, int]) -> str:
    """``90``, ``"90"``, ``(9, 0)``, ``"sm_90"`` -> ``"sm_90"``."""
    if isinstance(arch, tuple):
        arch = arch[0] * 10 + arch[1]
    text = str(arch)
    if text.startswith("sm_"):
        text = text[3:]
    if not text.rstrip("af").isdigit():
        raise ValueError(f"arch {arch!r} is not like 'sm_90', '90' or (9, 0)")
    return "sm_" + text


def _key_options(arch: str, defines: Mapping[str, int] | None) -> tuple[str, ...]:
    """Every option that shapes the cubin (include folders aside: the tree digest covers
    our headers)."""
    opts = [f"--gpu-architecture={arch}", *_BASE_OPTIONS]
    for key, value in sorted({**kernel_defines(), **(defines or {})}.items()):
        if not key.isidentifier():
            raise ValueError(f"define name {key!r} is not an identifier")
        opts.append(f"-D{key}={int(value)}")
    return tuple(opts)


def _options(arch: str, defines: Mapping[str, int] | None) -> tuple[str, ...]:
    """The full NVRTC command line: the key options plus the include folders."""
    key_options = _key_options(arch, defines)
    return (*key_options[:1 + len(_BASE_OPTIONS)], f"-I{source_dir()}",
            f"-I{_cuda_include_dir()}", *key_options[1 + len(_BASE_OPTIONS):])


def _source_path(source: str) -> Path:
    path = source_dir() / source
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {source!r} in {source_dir()}")
    return path


def nvrtc_compile(
    source: str, arch: str | int | tuple[int, int], defines: Mapping[str, int] | None = None
) -> bytes:
    """Compile ``kernels_cu/<source>`` for ``arch`` now, bypassing every cache; the cubin.

    Needs no GPU. Raises KernelCompileError with NVRTC's log on failure.
    """
    arch = normalize_arch(arch)
    path = _source_path(source)
    _key_options(arch, defines)  # validates the defines before NVRTC is looked for
    nvrtc = _nvrtc()
    try:
        return nvrtc.compile_to_cubin(path.read_text(), source, _options(arch, defines))
    except nvrtc.NvrtcError as exc:
        if not exc.log:
            raise
        raise KernelCompileError(f"NVRTC failed on {source} for {arch}:\n{exc.log}") from exc


# ------------------------------------------------------------------ cubins shipped in the wheel

def prebuilt_dir() -> Path:
    """Where a wheel keeps its cubins (absent in a source checkout)."""
    return Path(__file__).resolve().parent / PREBUILT_DIRNAME


@lru_cache(maxsize=4)
def _read_manifest(folder: str) -> dict | None:
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the shipped cubins: %s is unreadable (%s)", path, exc)
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        logger.warning("ignoring the shipped cubins: %s has format %r, this moecomm reads %r",
                       path, manifest.get("format"), MANIFEST_FORMAT)
        return None
    return manifest


def prebuilt_manifest() -> dict | None:
    """The shipped cubins' manifest (``{"format", "nvrtc", "tree_digest", "cubins"}``), or
    None where there is none (source checkout, editable install)."""
    return _read_manifest(str(prebuilt_dir()))


def prebuilt_key(
    source: str, arch: str | int | tuple[int, int], defines: Mapping[str, int] | None = None
) -> str:
    """The key under which a shipped cubin of ``source`` for ``arch`` is found: the digest
    of ``kernels_cu/``, the source and the exact compile options (defines included)."""
    options = _key_options(normalize_arch(arch), defines)
    return hashlib.sha256(
        repr(("prebuilt", _tree_digest(), source, options)).encode()).hexdigest()[:32]


def prebuilt_cubin(
    source: str, arch: str | int | tuple[int, int], defines: Mapping[str, int] | None = None
) -> Path | None:
    """The shipped cubin of ``kernels_cu/<source>`` for ``arch``, or None when there is no
    cubin built from these very sources with exactly the options this process would
    compile with. Needs no GPU; does not look at ``MOECOMM_FORCE_JIT`` or the driver."""
    manifest = prebuilt_manifest()
    if manifest is None:
        return None
    entry = manifest["cubins"].get(prebuilt_key(source, arch, defines))
    if entry is None or entry.get("source") != source:
        return None
    path = prebuilt_dir() / entry["file"]
    return path if _is_cubin(path) else None


def _driver_takes_prebuilt() -> bool:
    """The driver rule of the module docstring: its CUDA major >= that of the NVRTC that
    built the shipped cubins."""
    import cupy

    manifest = prebuilt_manifest()
    built_major = int(manifest["nvrtc"][0]) if manifest else 0
    driver_major = cupy.cuda.runtime.driverGetVersion() // 1000
    if driver_major < built_major:
        logger.info("shipped cubins were built by NVRTC %s, newer than this driver's CUDA %d: "
                    "compiling with the local NVRTC instead", manifest["nvrtc"], driver_major)
        return False
    return True


def force_jit() -> bool:
    """``MOECOMM_FORCE_JIT`` is set to something other than ``""``/``0``."""
    return os.environ.get(FORCE_JIT_ENV, "") not in ("", "0")


# ------------------------------------------------------------------ JIT and the disk cache

def _cache_dirs() -> list[Path]:
    """Where cubins are kept: MOECOMM_CACHE_DIR or ~/.cache/moecomm, else a temp folder."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "moecomm"
    )
    fallback = Path(tempfile.gettempdir()) / f"moecomm-{os.getuid()}"
    return [Path(root) / "kernels", fallback / "kernels"]


def _is_cubin(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


_stats_lock = threading.Lock()
_stats: dict = {"prebuilt": [], "cached": [], "compiled": {}, "waited": {}}
_warned_slow = False


def stats() -> dict:
    """What this process's kernel lookups did so far, by ``"<source>/<arch>"``:
    ``prebuilt`` (loaded from the wheel) and ``cached`` (found in the disk cache) are
    lists; ``compiled`` (NVRTC ran here) and ``waited`` (another process was compiling
    it; this one waited, then loaded its cubin) map to seconds."""
    with _stats_lock:
        return {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in _stats.items()}


def _record(kind: str, name: str, seconds: float | None = None) -> None:
    with _stats_lock:
        if seconds is None:
            _stats[kind].append(name)
        else:
            _stats[kind][name] = seconds


def _lock(fd: int, what: str) -> float:
    """Take the exclusive lock on ``fd``, blocking; the seconds spent waiting."""
    if fcntl is None:
        return 0.0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except BlockingIOError:
        pass
    logger.debug("%s: another process is compiling it; waiting for its cubin", what)
    start = time.perf_counter()
    fcntl.flock(fd, fcntl.LOCK_EX)
    return time.perf_counter() - start


def _write_atomic(target: Path, data: bytes) -> None:
    """``target`` appears complete or not at all: a private temporary file beside it,
    flushed to disk, then renamed over it. Call with the entry's lock held."""
    folder = target.parent
    for stale in folder.glob(f"{target.name}.*.tmp"):  # left by a process killed mid-write
        try:
            stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _compile_timed(source: str, arch: str, defines, cache_folder: Path) -> tuple[bytes, float]:
    """``nvrtc_compile`` that warns (once per process) while a compile runs past
    SLOW_COMPILE_S."""
    timer = None
    if not _warned_slow:
        def warn():
            global _warned_slow
            if _warned_slow:
                return
            _warned_slow = True
            logger.warning(
                "compiling %s for %s with NVRTC: over %.0f s so far. Kernels are compiled once "
                "per host and cached in %s (other processes wait for this one). To skip this "
                "wait, install the moecomm wheel (it ships cubins for %s) or compile ahead of "
                "time: python -m moecomm.precompile", source, arch, SLOW_COMPILE_S,
                cache_folder, ", ".join(SUPPORTED_ARCHS))

        timer = threading.Timer(SLOW_COMPILE_S, warn)
        timer.daemon = True
        timer.start()
    start = time.perf_counter()
    try:
        cubin = nvrtc_compile(source, arch, defines)
    finally:
        if timer is not None:
            timer.cancel()
    return cubin, time.perf_counter() - start


def _cache_key(source: str, arch: str, defines: Mapping[str, int] | None) -> str:
    return hashlib.sha256(
        repr((_tree_digest(), _headers_digest(), source, _key_options(arch, defines),
              nvrtc_version())).encode()
    ).hexdigest()[:32]


def cubin_path(
    source: str, arch: str | int | tuple[int, int], defines: Mapping[str, int] | None = None
) -> Path:
    """Compile ``kernels_cu/<source>`` for ``arch`` (unless cached); the cubin's path.

    The disk cache only (shipped cubins are ``prebuilt_cubin``). One process per host
    compiles a given entry; concurrent callers wait for it and return its file. Needs no
    GPU. Raises KernelCompileError with NVRTC's log on failure.
    """
    arch = normalize_arch(arch)
    _source_path(source)
    name = f"{_cache_key(source, arch, defines)}.cubin"
    what = f"{source}/{arch}"
    folders = _cache_dirs()
    for folder in folders:
        if _is_cubin(folder / name):
            _record("cached", what)
            logger.debug("%s: cached %s", what, folder / name)
            return folder / name

    cubin = seconds = None
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            waited = _lock(lock_fd, what)
            target = folder / name
            if _is_cubin(target):  # compiled by the process we waited for
                _record("waited", what, waited)
                logger.debug("%s: compiled by another process; loaded after waiting %.1f s",
                             what, waited)
                return target
            if cubin is None:
                cubin, seconds = _compile_timed(source, arch, defines, folder)
            try:
                _write_atomic(target, cubin)
            except OSError as exc:
                logger.debug("cannot write %s (%s); trying the next cache folder", target, exc)
                continue
            _record("compiled", what, seconds)
            logger.info("compiled %s for %s in %.1f s (NVRTC %d.%d) -> %s", source, arch,
                        seconds, *nvrtc_version(), target)
            return target
        finally:
            os.close(lock_fd)  # releases the lock
    raise OSError(f"no writable kernel cache folder among {folders}")


def compile_cubin(
    source: str, arch: str | int | tuple[int, int], defines: Mapping[str, int] | None = None
) -> bytes:
    """The cubin of ``kernels_cu/<source>`` for ``arch`` (see ``cubin_path``)."""
    return cubin_path(source, arch, defines).read_bytes()


def cubin_kernels(cubin: bytes) -> list[str]:
    """Names of the kernels (entry functions) a cubin defines, in symbol-table order: the
    names ``RawModule.get_function`` / ``cuModuleGetFunction`` resolve. Needs no GPU."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF cubin")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
                for i in range(shnum)]
    names = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2 or not entsize:  # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for i in range(size // entsize):
            st_name, info, other, _, _, _ = struct.unpack_from("<IBBHQQ", cubin,
                                                               offset + i * entsize)
            # A kernel: a global function marked as a CUDA entry point (STO_CUDA_ENTRY).
            if info & 0xF == 2 and info >> 4 == 1 and other & 0x10:
                end = cubin.index(b"\0", strtab + st_name)
                names.append(cubin[strtab + st_name:end].decode())
    return names


# ------------------------------------------------------------------ loading on the device

_modules: dict = {}


def current_arch() -> str:
    """Architecture of CuPy's current device, e.g. ``"sm_90"``."""
    import cupy

    return "sm_" + cupy.cuda.Device().compute_capability


def _load(path: Path):
    import cupy

    module = cupy.RawModule(path=str(path))
    module.module  # load now (CuPy defers it), so a refused cubin raises here
    return module


def get_module(source: str, defines: Mapping[str, int] | None = None):
    """The ``cupy.RawModule`` of ``source`` for the current device (loaded once per
    process and device): the wheel's cubin where it applies, else the cache or a JIT
    compile (see the module docstring)."""
    import cupy

    key = (source, cupy.cuda.Device().id, tuple(sorted((defines or {}).items())))
    module = _modules.get(key)
    if module is None:
        arch = current_arch()
        what = f"{source}/{arch}"
        shipped = None if force_jit() else prebuilt_cubin(source, arch, defines)
        if shipped is not None and _driver_takes_prebuilt():
            try:
                module = _load(shipped)
                _record("prebuilt", what)
                logger.debug("%s: shipped %s", what, shipped)
            except cupy.cuda.driver.CUDADriverError as exc:
                logger.warning("the driver refused the shipped cubin %s (%s); compiling %s "
                               "for %s with NVRTC instead", shipped, exc, source, arch)
        if module is None:
            module = _load(cubin_path(source, arch, defines))
        _modules[key] = module
    return module


def get_kernel(source: str, name: str, defines: Mapping[str, int] | None = None):
    """The ``cupy.RawKernel`` ``name`` of ``kernels_cu/<source>`` for the current device."""
    return get_module(source, defines).get_function(name)
