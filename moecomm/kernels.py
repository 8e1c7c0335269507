"""Kernel library: the CUDA C++ sources in ``kernels_cu/``, compiled by NVRTC.

``compile_cubin(source, arch)`` needs no GPU (NVRTC only), so the CPU test suite compiles
every kernel for sm_80, sm_90 and sm_100. ``get_kernel(source, name)`` compiles for the
current device and returns a ``cupy.RawKernel``. Compiled cubins are cached in memory and
on disk (``MOECOMM_CACHE_DIR``, default ``~/.cache/moecomm``), keyed by a hash of every
source file, the architecture, the options and the NVRTC version.

Kernels are ``extern "C"`` functions. Every compile gets the shared constants of
``moecomm.constants`` as ``-D`` options (``kernels_cu/config.cuh`` reads them); a source may
be specialised further with ``defines`` (name -> int). Launching is ``moecomm.launch``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from .constants import kernel_defines

SUPPORTED_ARCHS = ("sm_80", "sm_90", "sm_100")
_BASE_OPTIONS = ("-std=c++17", "--device-as-default-execution-space")


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


def _nvrtc():
    from cupy.cuda import nvrtc

    return nvrtc


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


def _options(arch: str, defines: Mapping[str, int] | None) -> tuple[str, ...]:
    opts = [f"--gpu-architecture={arch}", *_BASE_OPTIONS]
    opts += [f"-I{source_dir()}", f"-I{_cuda_include_dir()}"]
    for key, value in sorted({**kernel_defines(), **(defines or {})}.items()):
        if not key.isidentifier():
            raise ValueError(f"define name {key!r} is not an identifier")
        opts.append(f"-D{key}={int(value)}")
    return tuple(opts)


def _cache_dirs() -> list[Path]:
    """Where cubins are kept: MOECOMM_CACHE_DIR or ~/.cache/moecomm, else a temp folder."""
    root = os.environ.get("MOECOMM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "moecomm"
    )
    fallback = Path(tempfile.gettempdir()) / f"moecomm-{os.getuid()}"
    return [Path(root) / "kernels", fallback / "kernels"]


def cubin_path(
    source: str, arch: str | int | tuple[int, int], defines: Mapping[str, int] | None = None
) -> Path:
    """Compile ``kernels_cu/<source>`` for ``arch`` (unless cached); the cubin's path.

    Needs no GPU. Raises KernelCompileError with NVRTC's log on failure.
    """
    arch = normalize_arch(arch)
    path = source_dir() / source
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {source!r} in {source_dir()}")
    nvrtc = _nvrtc()
    options = _options(arch, defines)
    # Include folders are left out of the key: the tree digest covers our headers.
    key_options = tuple(o for o in options if not o.startswith("-I"))
    key = hashlib.sha256(
        repr((_tree_digest(), source, key_options, nvrtc.getVersion())).encode()
    ).hexdigest()[:32]
    for folder in _cache_dirs():
        if (folder / f"{key}.cubin").is_file():
            return folder / f"{key}.cubin"

    prog = nvrtc.createProgram(path.read_text(), source, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise KernelCompileError(f"NVRTC failed on {source} for {arch}:\n{log}") from exc
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)

    # Several ranks may compile at once: each writes a private file, then renames it.
    for folder in _cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(cubin)
            os.replace(tmp, folder / f"{key}.cubin")
            return folder / f"{key}.cubin"
        except OSError:
            continue
    raise OSError(f"no writable kernel cache folder among {_cache_dirs()}")


def compile_cubin(
    source: str, arch: str | int | tuple[int, int], defines: Mapping[str, int] | None = None
) -> bytes:
    """The cubin of ``kernels_cu/<source>`` for ``arch`` (see ``cubin_path``)."""
    return cubin_path(source, arch, defines).read_bytes()


_modules: dict = {}


def current_arch() -> str:
    """Architecture of CuPy's current device, e.g. ``"sm_90"``."""
    import cupy

    return "sm_" + cupy.cuda.Device().compute_capability


def get_module(source: str, defines: Mapping[str, int] | None = None):
    """The ``cupy.RawModule`` of ``source`` for the current device (compiled once)."""
    import cupy

    key = (source, cupy.cuda.Device().id, tuple(sorted((defines or {}).items())))
    module = _modules.get(key)
    if module is None:
        module = cupy.RawModule(path=str(cubin_path(source, current_arch(), defines)))
        _modules[key] = module
    return module


def get_kernel(source: str, name: str, defines: Mapping[str, int] | None = None):
    """The ``cupy.RawKernel`` ``name`` of ``kernels_cu/<source>`` for the current device."""
    return get_module(source, defines).get_function(name)
