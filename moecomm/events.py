"""Overlap: collectives issued on a communication stream, ordered by CUDA events.

Every collective (``all_reduce``, ``allreduce_fusion`` and the MoE fusions,
``MoeAlltoAll.dispatch``/``combine``, ``EPAllToAll.dispatch``/``combine``, the
``NcclCommunicator`` calls, ``barrier``) takes two keyword options besides ``stream=``:

* ``previous_event``: the op's stream first waits for this event (``cudaStreamWaitEvent``,
  no host synchronisation): the producer of the inputs recorded it on its own stream. A
  ``cupy.cuda.Event``, a ``CommHandle``, a ``torch.cuda.Event`` or a raw ``cudaEvent_t``.
* ``async_op=True``: the op returns ``(result, handle)``, ``result`` being exactly what it
  returns without the option, and ``handle`` a ``CommHandle`` whose ``event`` is recorded
  on the op's stream after its last kernel. The consumer calls ``handle.wait(stream)``
  (its stream waits on the device; the host never does) before it touches the result.

Decision: a tuple on request rather than an attribute of the result. The results are
CuPy arrays, lists of workspace views and option objects the caller passed in: none of
them can carry a handle, and the default return values stay what they always were. The
op runs where it always ran, on ``stream=``: a communication stream is simply the stream
the caller passes (``cupy.cuda.Stream(non_blocking=True)``), so no op owns a hidden stream
and the caller sees every dependency.

CUDA graphs: the event record and the waits are stream operations, so inside a capture
they become graph edges: record an event on the capturing stream, let the communication
stream wait on it (it joins the capture), issue the op there with ``async_op=True`` and
``handle.wait(capturing stream)`` before the capture ends (the join every fork needs).

Lifetimes: a handle keeps the arrays of its call alive until it is dropped, so an input
freed by the caller right after the call is not handed to another allocation (CuPy's pool
is per stream) while the communication kernel still reads it. Pass ``out=`` arrays made on
the consumer's stream: an output the op allocates belongs to the communication stream's
pool, which may hand it out again while the consumer still reads it. Inside a capture,
``previous_event`` must be recorded in the same capture (it becomes a plain edge): CUDA
refuses a wait on an event recorded outside it (``cudaErrorStreamCaptureIsolation``, and
the capture is invalidated).

Debug (``MOECOMM_DEBUG=1``): every handle must be consumed (``wait``, ``synchronize``,
``done`` or reading ``event``) before the next call of the same op, and before it is
dropped; otherwise the next call raises ``RuntimeError`` naming the op that was never
waited for.
"""

from __future__ import annotations

import weakref

import numpy as np

from . import group as _group
from .op import bool_option

__all__ = ["CommHandle", "event_handle", "issue", "finish"]


def event_handle(event, name: str = "previous_event") -> int:
    """The raw ``cudaEvent_t`` of ``event`` (see the module doc for what is accepted)."""
    if isinstance(event, CommHandle):
        event = event.event
    if isinstance(event, bool):
        raise TypeError(f"{name}: expected a CUDA event, got bool")
    if isinstance(event, (int, np.integer)):
        if int(event) <= 0:
            raise ValueError(f"{name}: {event} is not a CUDA event handle")
        return int(event)
    for attr in ("ptr", "cuda_event"):  # cupy.cuda.Event, torch.cuda.Event
        value = getattr(event, attr, None)
        if value is not None and not callable(value):
            return int(value)
    raise TypeError(f"{name}: expected a cupy.cuda.Event, CommHandle, torch.cuda.Event or "
                    f"an int cudaEvent_t, got {type(event).__name__}")


class CommHandle:
    """The completion of one asynchronous collective: ``event`` is recorded on the op's
    stream after its last kernel.

    ``wait(stream=None)``: ``stream`` (default CuPy's current one) waits for it on the
    device. ``synchronize()``: the host waits. ``done()``: whether it has completed.
    """

    __slots__ = ("_event", "_keep", "_op", "_consumed", "__weakref__")

    def __init__(self, event, op: str = "op", keep: tuple = ()):
        self._event = event
        self._keep = keep
        self._op = op
        self._consumed = False

    @property
    def event(self):
        """The ``cupy.cuda.Event`` (reading it counts as consuming the handle)."""
        self._consumed = True
        return self._event

    @property
    def consumed(self) -> bool:
        return self._consumed

    def wait(self, stream=None) -> None:
        """Make ``stream`` wait for the op (device side; graph-capturable)."""
        from cupy.cuda import runtime

        from .tensors import stream_handle

        runtime.streamWaitEvent(stream_handle(stream), self._event.ptr, 0)
        self._consumed = True

    def synchronize(self) -> None:
        """Block the host until the op completed."""
        self._event.synchronize()
        self._consumed = True

    def done(self) -> bool:
        """True once the op completed (never blocks)."""
        self._consumed = True
        return bool(self._event.done)

    def __del__(self):
        try:
            if not self._consumed and _group.DEBUG:
                _unwaited.append(self._op)
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"CommHandle({self._op}, {'consumed' if self._consumed else 'pending'})"


# Debug bookkeeping: the last handle of each op object, handles dropped unconsumed.
_pending: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_unwaited: list = []


def _debug_check(owner, op: str) -> None:
    if _unwaited:
        names = sorted(set(_unwaited))
        _unwaited.clear()
        raise RuntimeError(f"{op}: the CommHandle of an earlier async {', '.join(names)} was "
                           "dropped without handle.wait(stream) (MOECOMM_DEBUG)")
    previous = _pending.pop(owner, None) if owner is not None else None
    handle = previous() if previous is not None else None
    if handle is not None and not handle.consumed:
        handle._consumed = True  # reported once
        raise RuntimeError(f"{op}: the CommHandle of the previous async call of "
                           f"{handle._op} was never waited for (handle.wait(stream)) "
                           "(MOECOMM_DEBUG)")


def issue(stream: int, previous_event=None, async_op: bool = False, *, owner=None,
          op: str = "op") -> bool:
    """Called by an op after its argument checks, before its first launch on ``stream``
    (a raw handle): validates the options, orders the stream after ``previous_event``.
    Returns ``async_op`` as a bool (pass it on to ``finish``)."""
    async_op = bool_option("async_op", async_op)
    ev = None if previous_event is None else event_handle(previous_event)
    if _group.DEBUG:
        _debug_check(owner, op)
    if ev is not None:
        from cupy.cuda import runtime

        runtime.streamWaitEvent(stream, ev, 0)
    return async_op


def record(stream: int, *, owner=None, op: str = "op", keep: tuple = ()) -> CommHandle:
    """A ``CommHandle`` whose event is recorded on ``stream`` now."""
    import cupy
    from cupy.cuda import runtime

    event = cupy.cuda.Event(block=False, disable_timing=True)
    runtime.eventRecord(event.ptr, stream)
    handle = CommHandle(event, op, keep)
    if _group.DEBUG and owner is not None:
        _pending[owner] = weakref.ref(handle)
    return handle


def finish(result, stream: int, async_op: bool, *, owner=None, op: str = "op",
           keep: tuple = ()):
    """``result``, or ``(result, CommHandle)`` with ``async_op`` (the op's last line)."""
    if not async_op:
        return result
    return result, record(stream, owner=owner, op=op, keep=keep)
