"""One launch path for every kernel: a by-value argument struct, patched in place.

Every kernel takes a single argument, a struct declared once in ``kernels_cu/args.cuh``
and mirrored once in ``moecomm.kernel_args`` (a CPU test compares the two). A ``Launcher``
owns one instance of that struct; an op fills the fixed fields when it is built, patches
the few that change per call, and launches through the driver's ``cuLaunchKernelEx``
with a launch configuration built once per geometry and stream, so an eager call costs
one driver call and no Python boxing (CuPy's ``RawKernel.__call__`` costs about 1 us per
argument).

With ``pdl=True`` the kernel is launched with programmatic stream serialization: it may
start while the previous kernel on the stream finishes, and must execute
``griddepcontrol.wait`` (``pdl_wait()`` in ``kernels_cu/common.cuh``) before touching
memory that kernel writes. CUDA graph capture records the programmatic edge.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

_ATTR_CLUSTER_DIMENSION = 4                  # CU_LAUNCH_ATTRIBUTE_..., cuda.h
_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_MAX_CONFIGS = 64  # launch configurations kept per Launcher (geometry x stream)


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an id, padding, a 64-byte value union (here: up to three uints,
    the programmatic-serialization flag or the cluster dimensions)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4),
                ("value", ctypes.c_uint * 3), ("value_pad", ctypes.c_char * 52)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""

    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


@lru_cache(maxsize=1)
def _launch_kernel_ex():
    """The driver's cuLaunchKernelEx (libcuda is already loaded by CuPy)."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernelEx
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


class Launcher:
    """One kernel and its argument struct.

    Args:
        kernel: a ``cupy.RawKernel`` (``moecomm.kernels.get_kernel``).
        args: the ``ctypes.Structure`` class mirroring the kernel's argument struct, or an
            instance to share with another launcher of the same op (kernels run in turn
            on one argument set).
        pdl: launch with programmatic dependent launch (see the module doc).

    ``launcher.args`` is the struct: set its fields, then call
    ``launcher(grid, block, stream)``. Not thread-safe: one Launcher per op object.
    """

    def __init__(self, kernel, args, *, pdl: bool = False):
        self.kernel = kernel
        self.args = args() if isinstance(args, type) else args
        self.pdl = bool(pdl)
        self._fn = ctypes.c_void_p(kernel.kernel.ptr)
        self._params = (ctypes.c_void_p * 1)(ctypes.addressof(self.args))
        self._configs: dict[tuple, tuple] = {}
        self._launch = _launch_kernel_ex()

    def __call__(self, grid: int, block: int, stream: int, shared_mem: int = 0,
                 cluster: int = 1) -> None:
        """Launch ``grid`` blocks of ``block`` threads on ``stream`` (a raw handle); with
        ``cluster`` > 1 (sm_90+), in thread block clusters of that many blocks (``grid``
        a multiple of it)."""
        key = (grid, block, stream, shared_mem, cluster)
        config = self._configs.get(key)
        if config is None:
            config = self._config(*key)
        status = self._launch(config[0], self._fn, self._params, None)
        if status:
            from cupy_backends.cuda.api.driver import CUDADriverError

            raise CUDADriverError(status)

    def _config(self, grid: int, block: int, stream: int, shared_mem: int, cluster: int):
        """The launch configuration of one geometry and stream, built once: filling a
        ctypes struct per call costs about as much as a quarter of the launch itself."""
        attrs = (_LaunchAttribute * 2)()
        used = 0
        if self.pdl:
            attrs[0].id, attrs[0].value[0] = _ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, 1
            used = 1
        if cluster > 1:
            attrs[used].id = _ATTR_CLUSTER_DIMENSION
            attrs[used].value[0], attrs[used].value[1], attrs[used].value[2] = cluster, 1, 1
            used += 1
        config = _LaunchConfig(gridDimX=grid, gridDimY=1, gridDimZ=1, blockDimX=block,
                               blockDimY=1, blockDimZ=1, sharedMemBytes=shared_mem,
                               hStream=stream, attrs=attrs, numAttrs=used)
        if len(self._configs) >= _MAX_CONFIGS:
            self._configs.clear()
        entry = self._configs[(grid, block, stream, shared_mem, cluster)] = (
            ctypes.byref(config), config, attrs)
        return entry
