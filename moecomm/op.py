"""What every op shares: argument checks, output allocation, device facts, lifecycle.

Ops (``AllReduceWorkspace``, ``AllReduceFusionWorkspace``, ``MoeAlltoAll``, ``EPAllToAll``)
derive from ``Op``, which owns the closed/open state, the context-manager protocol and the
device error word; the free functions here are the validation and allocation helpers they
call before any launch.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from functools import lru_cache

import cupy
import numpy as np

from .constants import VECTOR_BYTES
from .errors import ErrorWord
from .group import ProcessGroup, default_group
from .mapping import Mapping
from .tensors import as_array, as_stream, on_stream

_runtime = cupy.cuda.runtime


# ------------------------------------------------------------------------ checks
def supported_dtype(dtype, allowed, name: str = "dtype") -> np.dtype:
    """``np.dtype(dtype)`` when it is one of ``allowed`` (an op's element types), else a
    TypeError naming them."""
    dt = np.dtype(dtype)
    if dt not in allowed:
        names = [np.dtype(a).name for a in allowed]
        want = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise TypeError(f"{name} {dt.name} is not supported, expected {want}")
    return dt


def enum_member(cls, value, name: str):
    """``cls(value)``: a member of the enum ``cls`` given as itself or its value, else a
    ValueError naming the members."""
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a {cls.__name__}; choose from "
                         f"{[m.name for m in cls]}") from None


def options(cls, value, name: str = "config"):
    """An op's frozen option object: ``value``, or ``cls()`` when None (TypeError for
    anything that is not a ``cls``)."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"{name}: expected {article} {cls.__name__}, got {type(value).__name__}")
    return value


def bool_option(name: str, value) -> bool:
    """``value`` as a bool (TypeError for anything but a Python or NumPy bool)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def int_at_least(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (TypeError for non-integers, bools included)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def require_aligned(name: str, ptr: int, alignment: int = VECTOR_BYTES) -> None:
    """Raise ValueError (naming ``name``) unless device address ``ptr`` is a multiple of
    ``alignment`` bytes."""
    if ptr % alignment:
        raise ValueError(f"{name}: address 0x{ptr:x} is not {alignment}-byte aligned")


def overlaps(a: int, na: int, b: int, nb: int) -> bool:
    """Whether the byte ranges ``[a, a + na)`` and ``[b, b + nb)`` share a byte."""
    return a < b + nb and b < a + na


def round_up(n: int, a: int) -> int:
    return -(-n // a) * a


# ------------------------------------------------------------------------ allocation
def empty(shape, dtype, stream=None) -> cupy.ndarray:
    """A device array of any dtype CuPy can view (bf16 included), allocated on ``stream``
    from CuPy's pool, 256-byte aligned."""
    dtype = np.dtype(dtype)
    with on_stream(stream):  # the pool is stream-ordered: allocate on the stream of use
        mem = cupy.cuda.alloc(max(1, math.prod(shape)) * dtype.itemsize)
    return cupy.ndarray(tuple(shape), dtype, mem)


def out_array(out, name: str, shape, dtype, stream=None,
              alignment: int = VECTOR_BYTES) -> cupy.ndarray:
    """The caller's ``out`` checked against ``shape``/``dtype``/alignment, or a new array."""
    if out is None:
        return empty(shape, dtype, stream)
    arr = as_array(out, name, dtype=dtype, shape=shape, stream=stream, writable=True)
    require_aligned(name, arr.data.ptr, alignment)
    return arr


# ------------------------------------------------------------------------ device facts
@dataclass(frozen=True)
class DeviceFacts:
    """What launch configurations depend on, read once per device."""

    id: int
    sms: int                   # multiprocessors
    arch: tuple[int, int]      # compute capability
    max_threads_per_sm: int
    max_shared_per_block: int  # bytes of shared memory a block may opt in to

    def blocks_per_sm(self, kernel, threads: int, shared_mem: int = 0) -> int:
        """Resident blocks of ``kernel`` (a cupy.RawKernel) per SM at ``threads``."""
        from cupy.cuda import driver

        return max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(
            kernel.kernel.ptr, threads, shared_mem))


@lru_cache(maxsize=None)
def _facts(device_id: int) -> DeviceFacts:
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return DeviceFacts(device_id, int(props["multiProcessorCount"]),
                       (int(props["major"]), int(props["minor"])),
                       int(props["maxThreadsPerMultiProcessor"]),
                       cupy.cuda.runtime.deviceGetAttribute(_ATTR_MAX_SHARED_PER_BLOCK_OPTIN,
                                                            device_id))


_ATTR_MAX_SHARED_PER_BLOCK_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin


def device_facts(device_id: int | None = None) -> DeviceFacts:
    """Facts of ``device_id`` (default: CuPy's current device)."""
    return _facts(cupy.cuda.runtime.getDevice() if device_id is None else int(device_id))


def grid_limit(sms: int, per_sm: int, budgeted: bool) -> int:
    """The most blocks a grid may have on ``sms`` SMs: ``per_sm`` per SM with every SM of
    the device; under an SM budget (``budgeted``) one per SM, since the block scheduler
    spreads a grid over free SMs first and more blocks would occupy more SMs than that."""
    return sms * (1 if budgeted else per_sm)


def group_sms(group: ProcessGroup) -> int:
    """The smallest SM count of the node-local ranks (collective): kernels whose blocks pair
    up across ranks need the same grid everywhere."""
    return min(group.local_comm.allgather(device_facts().sms))


# ------------------------------------------------------------------------ groups
def ep_group(group) -> tuple[ProcessGroup, bool]:
    """The expert-parallel group of ``group`` (a ProcessGroup, a Mapping whose moe_ep
    group is split off the default group, or None for the default group) and whether the
    caller made it (and must close it)."""
    if group is None:
        return default_group(), False
    if isinstance(group, Mapping):
        parent = default_group()
        if (group.world_size, group.rank) != (parent.size, parent.rank):
            raise ValueError(f"mapping (world_size={group.world_size}, rank={group.rank}) does "
                             f"not match the default group (size={parent.size}, "
                             f"rank={parent.rank})")
        return parent.split(group.moe_ep_group), True
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"group: expected a ProcessGroup or Mapping, got {type(group).__name__}")
    return group, False


# ------------------------------------------------------------------------ lifecycle
class Phase(enum.Enum):
    """Where an op stands between calls."""

    IDLE = "idle"
    DISPATCHED = "dispatched"  # MoE: between a dispatch and its combine
    CLOSED = "closed"


class Op:
    """Lifecycle of an op object: open until ``close()`` (collective, idempotent), usable as
    a context manager; ``error`` is the device error word of its bounded waits (or None).
    Subclasses set ``name`` and implement ``_release()``."""

    name = "op"
    phase: Phase = Phase.CLOSED
    error: ErrorWord | None = None
    device_id: int | None = None  # the GPU the op was made on

    def _open(self, error: ErrorWord | None) -> None:
        if self.device_id is None:  # an op is made on its GPU
            self.device_id = _runtime.getDevice()
        self.error = error
        self.phase = Phase.IDLE

    @property
    def closed(self) -> bool:
        return self.phase == Phase.CLOSED

    def require_open(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` once the op is closed."""
        if self.phase == Phase.CLOSED:
            raise RuntimeError(f"{self.name}.{what}: {self.name} is closed")

    def usable(self, what: str) -> None:
        """Raise unless the op is open and no wait of it has timed out (no sync); make the
        op's GPU the calling thread's current device again if something switched it (JAX's
        GPU backend, for one, leaves the last GPU it initialised current), so that the
        call's launches and allocations happen on the op's device."""
        self.require_open(what)
        if self.device_id is not None and _runtime.getDevice() != self.device_id:
            _runtime.setDevice(self.device_id)
        if self.error is not None:
            self.error.check()

    def check_error(self, stream=None, *, synchronize: bool = False) -> None:
        """Raise ``PeerTimeoutError`` if a wait of this op timed out (with ``synchronize``,
        after waiting for ``stream``). Raises ``RuntimeError`` once the op is closed."""
        self.require_open("check")
        if self.error is not None:
            self.error.check(as_stream(stream) if synchronize else None,
                             synchronize=synchronize)

    def close(self) -> None:
        """Collective: free everything in order. Closing twice is harmless."""
        if self.phase == Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        here = (contextlib.nullcontext() if self.device_id is None
                else cupy.cuda.Device(self.device_id))
        with here:
            self._release()  # frees and waits on the op's GPU, whichever is current
        if self.error is not None:
            self.error.close()

    def _release(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
