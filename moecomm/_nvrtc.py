"""NVRTC through ctypes: source text + options -> cubin bytes, without CuPy or a GPU.

The library is the ``libnvrtc`` that NVIDIA's wheel ships (``nvidia-cuda-nvrtc-cu12`` or
``nvidia-cuda-nvrtc`` 13), or a CUDA toolkit's, as ``cuda.pathfinder`` finds it. The same
binding serves the runtime's JIT, ``python -m moecomm.precompile`` and the wheel build,
so all three run the same compiler with the same options. ctypes releases the GIL for
the duration of each call, so a compile does not stall the process's other threads.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache


class NvrtcError(RuntimeError):
    """An NVRTC call failed; ``log`` holds the program log when there is one."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    try:
        import cuda.pathfinder
    except ImportError as exc:
        raise NvrtcError("cuda.pathfinder is not installed: install the cuda12 (or cuda13) "
                         "extra of moecomm to compile kernels") from exc
    try:
        loaded = cuda.pathfinder.load_nvidia_dynamic_lib("nvrtc")
    except Exception as exc:  # DynamicLibNotFoundError and friends
        raise NvrtcError(f"NVRTC not found ({exc}): install nvidia-cuda-nvrtc-cu12 (or the "
                         "cuda12/cuda13 extra of moecomm), or set CUDA_HOME to a CUDA "
                         "toolkit") from exc
    lib = ctypes.CDLL(loaded.abs_path)
    prog_p = ctypes.POINTER(ctypes.c_void_p)
    size_p = ctypes.POINTER(ctypes.c_size_t)
    int_p = ctypes.POINTER(ctypes.c_int)
    char_pp = ctypes.POINTER(ctypes.c_char_p)
    for name, args in {
        "nvrtcVersion": [int_p, int_p],
        "nvrtcCreateProgram": [prog_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                               char_pp, char_pp],
        "nvrtcDestroyProgram": [prog_p],
        "nvrtcCompileProgram": [ctypes.c_void_p, ctypes.c_int, char_pp],
        "nvrtcGetProgramLogSize": [ctypes.c_void_p, size_p],
        "nvrtcGetProgramLog": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcGetCUBINSize": [ctypes.c_void_p, size_p],
        "nvrtcGetCUBIN": [ctypes.c_void_p, ctypes.c_char_p],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def library_path() -> str:
    """Path of the libnvrtc in use."""
    return _lib()._name


def _check(status: int, what: str) -> None:
    if status != 0:
        message = _lib().nvrtcGetErrorString(status)
        raise NvrtcError(f"{what}: {message.decode() if message else status}")


@lru_cache(maxsize=1)
def version() -> tuple[int, int]:
    """NVRTC's (major, minor), e.g. (12, 9)."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(_lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def compile_to_cubin(text: str, name: str, options: tuple[str, ...] | list[str]) -> bytes:
    """Compile CUDA C++ ``text`` (called ``name`` in messages) with ``options`` into a
    cubin. Raises NvrtcError with the program log when NVRTC rejects it."""
    lib = _lib()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), name.encode(), 0,
                                  None, None), "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        argv = (ctypes.c_char_p * len(encoded))(*encoded)
        status = lib.nvrtcCompileProgram(prog, len(encoded), argv)
        if status != 0:
            size = ctypes.c_size_t()
            log = ""
            if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0 and size.value > 1:
                buf = ctypes.create_string_buffer(size.value)
                if lib.nvrtcGetProgramLog(prog, buf) == 0:
                    log = buf.value.decode(errors="replace")
            message = lib.nvrtcGetErrorString(status)
            raise NvrtcError(f"nvrtcCompileProgram: {message.decode() if message else status}",
                             log)
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        buf = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
