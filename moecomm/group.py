"""ProcessGroup: an mpi4py communicator plus the CUDA device of this rank.

Every other module reaches the other ranks through this one. It knows nothing about
buffers or kernels; it only answers "who am I, who is on my node, which GPU is mine" and
moves small host byte strings between ranks (IPC handles, NCCL unique ids, sizes).

Node membership. Ranks on one host are found with ``MPI_Comm_split_type(SHARED)``. A
host may be cut into several *declared* nodes of ``gpus_per_node`` ranks each (argument,
or the ``MOECOMM_GPUS_PER_NODE`` environment variable), so the code paths for groups
that span nodes (NCCL instead of CUDA IPC) can be exercised on one machine.

Device choice. Rank ``r`` on its host uses device ``host_local_rank % device_count``, so
several ranks may share one GPU (CUDA IPC works between processes on one device).
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

from mpi4py import MPI

GPUS_PER_NODE_ENV = "MOECOMM_GPUS_PER_NODE"
# MOECOMM_DEBUG=1: ops compare their arguments across ranks before each launch (one
# host allgather per call), turning a mismatch into a ValueError instead of a hang.
DEBUG = os.environ.get("MOECOMM_DEBUG") == "1"


def _env_gpus_per_node() -> int | None:
    value = os.environ.get(GPUS_PER_NODE_ENV)
    if value in (None, ""):
        return None
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"{GPUS_PER_NODE_ENV}={value!r} is not an integer") from None
    if parsed < 1:
        raise ValueError(f"{GPUS_PER_NODE_ENV} must be >= 1, got {parsed}")
    return parsed


class ProcessGroup:
    """A set of ranks that talk to each other, and the node-local part of it.

    Args:
        comm: the mpi4py communicator (default ``MPI.COMM_WORLD``). It is duplicated, so
            traffic of this group never matches messages of the caller's.
        gpus_per_node: ranks per (declared) node; default ``MOECOMM_GPUS_PER_NODE`` or the
            number of ranks on the host. Collective: every rank must pass the same value.

    Attributes:
        rank, size: position in and size of ``comm``.
        local_rank, local_size: position in and size of this rank's node.
        node, num_nodes: index of this rank's node and the number of nodes.
        host, host_local_rank: the physical host (named by its lowest rank) and the
            position among its ranks (which picks the device).
    """

    def __init__(
        self,
        comm: MPI.Comm | None = None,
        gpus_per_node: int | None = None,
        *,
        _parent: "ProcessGroup | None" = None,
    ):
        base = MPI.COMM_WORLD if comm is None else comm
        self.comm: MPI.Comm = base.Dup()
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self._closed = False

        if _parent is not None:  # a subgroup keeps its parent's node and device
            self.gpus_per_node: int = _parent.gpus_per_node
            self.host_local_rank: int = _parent.host_local_rank
            node_key = _parent._node_key
        else:
            host = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            self.host_local_rank = host.Get_rank()
            host_size = host.Get_size()
            host_leader = host.allreduce(self.rank, op=MPI.MIN)
            host.Free()
            if gpus_per_node is None:
                gpus_per_node = _env_gpus_per_node()
            declared = gpus_per_node if gpus_per_node is not None else host_size
            agreed = self.comm.allgather(declared)  # first: every rank then raises alike
            if len(set(agreed)) != 1:
                self.comm.Free()
                raise ValueError(f"gpus_per_node differs across ranks: {agreed}")
            if declared < 1:
                self.comm.Free()
                raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
            self.gpus_per_node = declared
            # A node is (host, slice of gpus_per_node ranks of that host); the host is
            # named by its lowest rank.
            node_key = (host_leader, self.host_local_rank // declared)
        self._node_key = node_key
        self.host: int = node_key[0]  # lowest world rank on this rank's physical host

        ordered = sorted(set(self.comm.allgather(node_key)))
        self.node: int = ordered.index(node_key)
        self.num_nodes: int = len(ordered)
        self.local_comm: MPI.Comm = self.comm.Split(color=self.node, key=self.rank)
        self.local_rank: int = self.local_comm.Get_rank()
        self.local_size: int = self.local_comm.Get_size()
        self.device_id: int | None = None if _parent is None else _parent.device_id

    # -- topology ---------------------------------------------------------------------
    @property
    def spans_nodes(self) -> bool:
        """True when the group's ranks are on more than one (declared) node."""
        return self.num_nodes > 1

    def select_device(self) -> int:
        """Make ``host_local_rank % device_count`` CuPy's current device; return its id."""
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        self.device_id = self.host_local_rank % count
        cupy.cuda.Device(self.device_id).use()
        return self.device_id

    # -- host byte transport ----------------------------------------------------------
    def barrier(self) -> None:
        self.comm.Barrier()

    def local_barrier(self) -> None:
        self.local_comm.Barrier()

    def allgather_bytes(self, data: bytes, *, local: bool = False) -> list[bytes]:
        """Every rank's ``data``, in rank order (node-local ranks if ``local``)."""
        comm = self.local_comm if local else self.comm
        return [bytes(x) for x in comm.allgather(bytes(data))]

    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """``data`` of rank ``root`` on every rank."""
        return bytes(self.comm.bcast(None if data is None else bytes(data), root=root))

    def allgather(self, obj):
        """Every rank's picklable ``obj``, in rank order (small host values only)."""
        return self.comm.allgather(obj)

    def bcast(self, obj, root: int = 0):
        """Rank ``root``'s picklable ``obj`` on every rank (small host values only)."""
        return self.comm.bcast(obj, root=root)

    def check_uniform(self, what: str, value) -> None:
        """Raise ValueError on every rank unless every rank passed an equal ``value``."""
        values = self.comm.allgather(value)
        if any(v != values[0] for v in values):
            detail = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{what} differ across ranks ({detail})")

    @contextlib.contextmanager
    def all_or_none(self, what: str):
        """Collective: a block of local steps (allocations, kernel loads; no collective
        inside) that fails on every rank when it fails on one. After the block the ranks
        compare outcomes; a rank whose block raised re-raises its exception, the others
        raise ``RuntimeError`` naming the failed ranks. Constructors then free what they
        made with collective calls that every rank reaches, instead of one rank's cleanup
        waiting for peers that went on (a hang)."""
        error = None
        try:
            yield
        except BaseException as exc:  # reported collectively below
            error = exc
        failed = [r for r, ok in enumerate(self.comm.allgather(error is None)) if not ok]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"{what} failed on rank(s) {failed} of this group")

    def split(self, ranks: Sequence[int]) -> "ProcessGroup | None":
        """A new group of ``ranks`` (world ranks of this group, in this order).

        Collective over this group: every rank calls it with its own subgroup's list
        (disjoint lists, e.g. a Mapping's tp groups). Returns None on ranks not listed.
        """
        ranks = list(ranks)
        if self.rank in ranks:
            sub = self.comm.Split(color=min(ranks), key=ranks.index(self.rank))
        else:
            sub = self.comm.Split(color=MPI.UNDEFINED, key=0)
            return None
        group = ProcessGroup(sub, _parent=self)
        sub.Free()
        return group

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not MPI.Is_finalized():
            self.local_comm.Free()
            self.comm.Free()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ProcessGroup(rank={self.rank}/{self.size}, local={self.local_rank}/"
            f"{self.local_size}, node={self.node}/{self.num_nodes}, device={self.device_id})"
        )


_default_group: ProcessGroup | None = None


def init(comm: MPI.Comm | None = None, gpus_per_node: int | None = None) -> ProcessGroup:
    """Create the group of ``comm`` (default COMM_WORLD) and select this rank's GPU.

    Raises RuntimeError when no CUDA device is visible. The group is remembered as the
    default for calls that take ``group=None``.
    """
    global _default_group
    group = ProcessGroup(comm, gpus_per_node=gpus_per_node)
    try:
        group.select_device()
    except Exception as exc:  # CuPy raises its own error types for "no driver/no device"
        raise RuntimeError(f"rank {group.rank}: no usable CUDA device ({exc})") from exc
    _default_group = group
    return group


def default_group() -> ProcessGroup:
    """The group made by the last ``init()``; raises if there is none."""
    if _default_group is None:
        raise RuntimeError("no process group: call moecomm.init() first or pass group=")
    return _default_group
