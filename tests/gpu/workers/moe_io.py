"""Host/device plumbing shared by the MoE GPU workers (one ``IO`` per worker)."""

import cupy
import numpy as np

from moecomm.moe.alltoall import HEADER_BYTES
from moecomm.tensors import bfloat16


def bits(a: np.ndarray) -> np.ndarray:
    """The unsigned-integer view of a host array (compare floats bit for bit)."""
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


class IO:
    """Uploads, downloads and rank-wide quiescence on one stream of one group."""

    def __init__(self, group, stream):
        self.group, self.stream = group, stream

    def shared_seed(self) -> int:
        """A fresh seed, the same on every rank."""
        return self.group.bcast(int(np.random.SeedSequence().entropy % (1 << 63)))

    def device(self, a: np.ndarray, bf16: bool = True) -> cupy.ndarray:
        """Upload on the stream; uint16 arrays become bf16 arrays unless bf16=False."""
        with self.stream:
            d = cupy.asarray(a)
        return cupy.ndarray(d.shape, bfloat16, d.data) if a.dtype == np.uint16 and bf16 else d

    def host(self, d: cupy.ndarray) -> np.ndarray:
        """Download (after the stream); bf16 comes back as uint16 bit patterns."""
        self.stream.synchronize()
        if d.dtype == bfloat16:
            d = cupy.ndarray(d.shape, np.uint16, d.data)
        return d.get()

    def quiesce(self) -> None:
        """No rank has work in flight or touches a peer's buffers after this."""
        self.stream.synchronize()
        cupy.cuda.runtime.deviceSynchronize()
        self.group.barrier()

    def poison_workspace(self, a2a) -> None:
        """Fill a MoeAlltoAll's workspace past its header, and its counts, with garbage."""
        ws = a2a._ws
        ws.view(np.uint8, (ws.nbytes - HEADER_BYTES,), offset=HEADER_BYTES).fill(0xA5)
        a2a.recv_counts.fill(-7)
