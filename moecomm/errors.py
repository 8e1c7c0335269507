"""Bounded cross-GPU waits: the device error word and the exception it becomes.

Kernels that wait for peers give up after ``timeout_s`` and record, with ``atomicCAS`` on
a 32-bit word, ``(op code << 16) | (1 + local rank of the peer that never arrived)``
(``record_timeout`` in ``kernels_cu/common.cuh``; codes: ``constants.ErrorCode``). The word
lives in pinned, mapped host memory, so the host reads it without synchronising the GPU:
ops check it before every launch (a few hundred nanoseconds), and
``ErrorWord.check(synchronize=True)`` waits for the stream first. Kernels only write it;
their waiters poll a device-side abort word instead (host reads from thousands of
spinning warps would stall the GPU). A workspace whose word is set is unusable (peers
are out of step): the caller closes it and makes a new one.
"""

from __future__ import annotations

import ctypes
import os

from cupy.cuda import runtime

from .constants import ErrorCode

TIMEOUT_ENV = "MOECOMM_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 10.0


class PeerTimeoutError(RuntimeError):
    """A peer never arrived within the timeout; ``rank`` is its rank in the group."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def timeout_ns(timeout_s: float | None) -> int:
    """Seconds (None: ``MOECOMM_TIMEOUT_S`` or 10 s; 0: wait forever) -> nanoseconds."""
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
    return int(timeout_s * 1e9)


class ErrorWord:
    """One uint32 in mapped pinned host memory that kernels set when a wait times out.

    Args:
        local_to_global: the group rank of each local rank, for the error message.
    """

    def __init__(self, local_to_global: list[int]):
        # cudaHostAllocMapped; with unified addressing the device uses the same pointer.
        self.ptr = runtime.hostAlloc(4, 2)
        self._word = ctypes.c_uint32.from_address(self.ptr)
        self._word.value = 0
        self._ranks = list(local_to_global)

    @property
    def value(self) -> int:
        return self._word.value

    def check(self, stream=None, *, synchronize: bool = False) -> None:
        """Raise ``PeerTimeoutError`` if a kernel recorded a timeout.

        With ``synchronize`` the stream (a ``cupy.cuda.Stream``) is waited for first, so
        every launch so far is accounted for.
        """
        if not self.ptr:
            raise RuntimeError("ErrorWord.check: the error word is closed")
        if synchronize and stream is not None:
            stream.synchronize()
        word = self._word.value
        if word:
            local = (word & 0xFFFF) - 1
            code = word >> 16
            op = ErrorCode(code).op if code in ErrorCode._value2member_map_ else f"op {code}"
            rank = self._ranks[local] if 0 <= local < len(self._ranks) else local
            raise PeerTimeoutError(
                f"{op}: rank {rank} never arrived within the timeout; this workspace is out "
                "of step with its peers: close it and create a new one", rank)

    def close(self) -> None:
        if self.ptr:
            self._word = None  # no read of freed host memory
            runtime.freeHost(self.ptr)
            self.ptr = 0
