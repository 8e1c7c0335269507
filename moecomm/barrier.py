"""A device-side barrier over CUDA IPC: ``barrier(group, stream=)``.

Kernels issued on ``stream`` after the barrier start only once every rank of the group
has completed what its own stream held before its barrier; the host never waits. One
launch of one 32-thread block (protocol: ``kernels_cu/barrier.cu``): each rank bumps its
arrival counter in every peer's buffer and waits for every peer's. Used between phases
that reuse memory peers read (reference document 003 puts one between its dispatch and
combine buffers' reuse).

* Bounded: the wait gives up after ``timeout_s`` (default ``MOECOMM_TIMEOUT_S`` or 10 s)
  and the next call (or ``check()``) raises ``PeerTimeoutError`` naming the missing rank.
* Graph-capturable: the call count lives on the device; capture it and replay it.
* Collective: every rank of the group calls it the same number of times.

``DeviceBarrier(group)`` is the object (collective creation and ``close()``); the function
``barrier(group)`` keeps one per group, made on its first call (collective, allocates:
make that first call outside a graph capture) and freed by ``close_barriers()``
(collective). The group must lie inside one node (CUDA IPC); ``group.barrier()`` is the
host-side MPI barrier.
"""

from __future__ import annotations

import cupy
import numpy as np

from . import events
from . import group as _group
from .constants import BARRIER_MAX_RANKS
from .errors import ErrorWord, timeout_ns
from .group import ProcessGroup, default_group
from .kernel_args import BarrierArgs
from .kernels import get_kernel
from .launch import Launcher
from .op import Op
from .symmetric import SymmetricBuffer
from .tensors import stream_handle

__all__ = ["DeviceBarrier", "barrier", "close_barriers"]

_STATE_WORDS = 2  # kStateCalls, kStateAbort in barrier.cu


class DeviceBarrier(Op):
    """A device-side barrier of ``group`` (default: ``moecomm.init()``'s group).

    Args:
        group: the ranks, all on one node.
        timeout_s: bound of the wait for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s;
            0: forever).

    Call it: ``bar(stream=None, *, previous_event=None, async_op=False)``.
    """

    name = "DeviceBarrier"

    def __init__(self, group: ProcessGroup | None = None, *, timeout_s: float | None = None):
        self.group = default_group() if group is None else group
        if not isinstance(self.group, ProcessGroup):
            raise TypeError(f"group: expected a ProcessGroup, got {type(group).__name__}")
        if self.group.spans_nodes:
            raise ValueError(f"barrier: the group spans {self.group.num_nodes} nodes; CUDA IPC "
                             "reaches one node only")
        self.world = self.group.local_size
        if self.world > BARRIER_MAX_RANKS:
            raise ValueError(f"barrier: group of {self.world} ranks exceeds the "
                             f"{BARRIER_MAX_RANKS} supported")
        ns = timeout_ns(timeout_s)
        ranks = self.group.local_comm.allgather(self.group.rank)
        self.buffer = SymmetricBuffer(self.group, 4 * BARRIER_MAX_RANKS)
        error = None
        try:  # collective, as construction is: free what was made if any step fails
            with self.group.all_or_none("DeviceBarrier"):  # local steps
                kernel = get_kernel("barrier.cu", "device_barrier")
                self.state = cupy.zeros(_STATE_WORDS, np.uint32)
                error = ErrorWord(ranks)
                self._launch = Launcher(kernel, BarrierArgs)
                a = self._launch.args
                a.peers[:self.world] = self.buffer.ptrs
                a.state, a.error_word, a.timeout_ns = self.state.data.ptr, error.ptr, ns
                a.rank, a.world = self.group.local_rank, self.world
                cupy.cuda.runtime.deviceSynchronize()  # zeroed state visible to any stream
        except BaseException:
            if error is not None:
                error.close()
            self.buffer.close()
            raise
        self._open(error)

    def __call__(self, stream=None, *, previous_event=None, async_op: bool = False):
        """Launch the barrier on ``stream``; returns None, or a ``CommHandle`` with
        ``async_op`` (``moecomm.events``)."""
        self.usable("barrier")
        handle = stream_handle(stream)
        if previous_event is not None or async_op or _group.DEBUG:
            async_op = events.issue(handle, previous_event, async_op, owner=self, op="barrier")
        self._launch(1, 32, handle)
        if async_op:
            return events.record(handle, owner=self, op="barrier")
        return None

    def check(self, stream=None) -> None:
        """Wait for ``stream`` and raise ``PeerTimeoutError`` if a peer never arrived."""
        self.check_error(stream, synchronize=True)

    def _release(self) -> None:
        self.buffer.close()
        self.state = None

    def __repr__(self) -> str:
        return f"DeviceBarrier(world={self.world}, {self.phase.value})"


_barriers: dict = {}  # id(group) -> (group, DeviceBarrier)


def barrier(group: ProcessGroup | None = None, stream=None, *, timeout_s: float | None = None,
            previous_event=None, async_op: bool = False):
    """Device-side barrier of ``group`` on ``stream`` (see the module doc). ``timeout_s``
    applies when the group's barrier is made (its first call)."""
    group = default_group() if group is None else group
    entry = _barriers.get(id(group))
    if entry is None or entry[0] is not group or entry[1].closed:
        entry = _barriers[id(group)] = (group, DeviceBarrier(group, timeout_s=timeout_s))
    return entry[1](stream, previous_event=previous_event, async_op=async_op)


def close_barriers() -> None:
    """Collective: free the barriers ``barrier()`` made (the last made first)."""
    while _barriers:
        _, (_, bar) = _barriers.popitem()
        bar.close()
