"""Mixed communication: all-reduce over TP groups, all-gather / reduce-scatter over DP
groups, and the two transitions between attention data parallelism and the MoE layer.

``run_mixed_comm(op, handler, x_in, x_out=None, mode=AUTO, stream=None)`` runs one
``MixedCommOp`` over the ranks of a ``MixedCommHandler``; every rank of the handler's group
makes every call (one call is collective over the whole group, also for ops whose data
stays inside TP or DP groups).

Layout (``MixedLayout``, as FlashInfer's ``MixedCommHandler``): the group is ``inter_size``
(declared) nodes of ``local_size`` ranks; inside a node TP is fastest
(``local_rank = local_tp_rank + local_dp_rank * local_tp_size``), across nodes likewise
(``node = inter_tp_rank + inter_dp_rank * inter_tp_size``); ``tp_rank = local_tp_rank +
inter_tp_rank * local_tp_size``, ``dp_rank = local_dp_rank + inter_dp_rank *
local_dp_size``. Shapes: ``x_in [rows, ...]``; ALLGATHER and ALLREDUCE_ALLGATHER return
``[dp_size * rows, ...]``; REDUCESCATTER and REDUCESCATTER_ALLREDUCE need ``rows`` divisible
by ``dp_size`` and return ``[rows / dp_size, ...]``; ALLREDUCE keeps the shape. Every op is
valid in every layout (a DP or TP size of 1 makes an axis a no-op).

Determinism. Each output block is a sum over a fixed set of ranks (``moecomm.reference.
mixed_comm`` says which), taken in ascending world-rank order in fp32 and rounded once,
inputs read canonically (-0.0 as +0.0, the Lamport rule). All modes compute exactly that,
so their results are bitwise equal on every rank:

- ``FUSED``: one kernel inside one node (``kernels_cu/mixed.cu``) on an
  ``AllReduceWorkspace``'s Lamport buffers: each input block is pushed only to the ranks
  whose output needs it, each rank sums its sources as they land. ALLREDUCE with
  ``dp_size == 1`` is the workspace's own ``all_reduce`` (one-shot or two-shot). Needs the
  group inside one node; one rank receives at most ``max_bytes`` from each source.
- ``NCCL_ONE``: one NCCL all-gather of the inputs over the whole group, then the sums on
  this GPU (``mixed_reduce``). The reduce-scatter ops gather whole inputs (``dp_size``
  times the bytes they need): one call, exact.
- ``NCCL_TP_DP``: one NCCL call per axis, moving bytes only: all-gather over TP,
  all-to-all over DP, all-gather over DP of already-summed blocks; then the same sums.
  NCCL's own reductions (ring or tree order) are never used: their order depends on the
  algorithm NCCL picks, so they cannot equal the other modes bit for bit (the benchmark
  times them as the NCCL baseline).
- ``AUTO``: ``FUSED`` inside a node up to ``MixedCommConfig.fused_max_bytes`` (default the
  all-reduce one-shot crossover, ``moecomm.tuning``), else ``NCCL_TP_DP`` when both axes
  are larger than 1, else ``NCCL_ONE``.

Not done: a hierarchical mode (IPC inside each node, NCCL between nodes in one kernel);
groups spanning nodes use the NCCL modes. The first NCCL-mode call makes the communicators
and staging buffers (collective, and not allowed during CUDA-graph capture); everything
else is allocated at creation, so FUSED calls and NCCL calls after the first are
graph-capturable with ``x_out`` given.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass
from functools import lru_cache

import cupy
import numpy as np

from . import group as _group
from . import kernels, tuning
from .allreduce import Algorithm, AllReduceConfig, AllReduceWorkspace
from .constants import AR_MAX_RANKS, VECTOR_BYTES, MixedCommOp
from .group import ProcessGroup, default_group
from .kernel_args import MixedArgs
from .launch import Launcher
from .op import (Op, device_facts, empty, enum_member, int_at_least, options, overlaps,
                 require_aligned, supported_dtype)
from .tensors import FLOAT_DTYPES, bfloat16, dtype_name, import_array, stream_handle

__all__ = ["MixedCommOp", "MixedCommMode", "MixedCommConfig", "MixedLayout",
           "MixedCommHandler", "run_mixed_comm"]

_SUFFIX = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16", bfloat16: "bf16"}
_DTYPES = (bfloat16, np.dtype(np.float16), np.dtype(np.float32))  # as error messages name them
_RS_OPS = (MixedCommOp.REDUCESCATTER, MixedCommOp.REDUCESCATTER_ALLREDUCE)
_GATHER_OPS = (MixedCommOp.ALLGATHER, MixedCommOp.ALLREDUCE_ALLGATHER)


class MixedCommMode(enum.IntEnum):
    """How ``run_mixed_comm`` moves the data (see the module doc). Values: FlashInfer's
    ``NCCL_ONE``, ``NCCL_TP_DP`` and ``AUTOTUNE`` (here ``AUTO``: a table, not a timing
    run); FlashInfer's six fused variants are the one ``FUSED`` (0)."""

    FUSED = 0
    NCCL_ONE = 6
    NCCL_TP_DP = 7
    AUTO = 8


# ------------------------------------------------------------------------------- layout
def _size(name: str, value) -> int | None:
    return None if value is None else int_at_least(name, value)


def _split(total: int, a: int | None, b: int | None, what: str) -> tuple[int, int]:
    """(a, b) with a * b == total; None defaults as FlashInfer: (total, 1)."""
    if a is None and b is None:
        return total, 1
    if a is None:
        if total % b:
            raise ValueError(f"{what}: dp size {b} does not divide {total} ranks")
        return total // b, b
    if b is None:
        if total % a:
            raise ValueError(f"{what}: tp size {a} does not divide {total} ranks")
        return a, total // a
    if a * b != total:
        raise ValueError(f"{what}: TP x DP = {a} x {b} = {a * b} does not match its "
                         f"{total} ranks")
    return a, b


@dataclass(frozen=True)
class MixedLayout:
    """Where each rank sits in the TP x DP grid (pure arithmetic; see the module doc).

    world_size = inter_size * local_size; local_size = local_tp_size * local_dp_size;
    inter_size = inter_tp_size * inter_dp_size.
    """

    world_size: int
    local_size: int
    local_tp_size: int
    local_dp_size: int
    inter_tp_size: int
    inter_dp_size: int

    @classmethod
    def resolve(cls, world_size: int, local_size: int, *, tp_size: int | None = None,
                dp_size: int | None = None, local_tp_size: int | None = None,
                local_dp_size: int | None = None, inter_tp_size: int | None = None,
                inter_dp_size: int | None = None) -> "MixedLayout":
        """The layout of ``world_size`` ranks in nodes of ``local_size``, from either the
        per-level sizes (FlashInfer's arguments; unset ones default to TP inside and across
        nodes) or just ``tp_size`` / ``dp_size`` (TP packed inside nodes first)."""
        world = int_at_least("world_size", world_size)
        local = int_at_least("local_size", local_size)
        if world % local:
            raise ValueError(f"world_size {world} is not a multiple of local_size {local}")
        inter = world // local
        tp, dp = _size("tp_size", tp_size), _size("dp_size", dp_size)
        levels = [_size(n, v) for n, v in (("local_tp_size", local_tp_size),
                                           ("local_dp_size", local_dp_size),
                                           ("inter_tp_size", inter_tp_size),
                                           ("inter_dp_size", inter_dp_size))]
        if tp is not None or dp is not None:
            if any(v is not None for v in levels):
                raise ValueError("give tp_size/dp_size or the per-level sizes, not both")
            tp, dp = _split(world, tp, dp, f"group of {world} ranks")
            if tp % local == 0:
                levels = [local, 1, tp // local, dp]
            elif local % tp == 0:
                levels = [tp, local // tp, 1, inter]
            else:
                raise ValueError(f"tp_size {tp} neither divides nor is a multiple of the "
                                 f"{local} ranks per node")
        ltp, ldp = _split(local, levels[0], levels[1], f"a node of {local} ranks")
        itp, idp = _split(inter, levels[2], levels[3], f"{inter} nodes")
        if world > AR_MAX_RANKS:
            raise ValueError(f"mixed communication supports up to {AR_MAX_RANKS} ranks, "
                             f"got {world}")
        return cls(world, local, ltp, ldp, itp, idp)

    @property
    def inter_size(self) -> int:
        return self.world_size // self.local_size

    @property
    def tp_size(self) -> int:
        return self.local_tp_size * self.inter_tp_size

    @property
    def dp_size(self) -> int:
        return self.local_dp_size * self.inter_dp_size

    def coords(self, rank: int) -> tuple[int, int]:
        """(tp_rank, dp_rank) of world rank ``rank``."""
        local, inter = rank % self.local_size, rank // self.local_size
        tp = local % self.local_tp_size + (inter % self.inter_tp_size) * self.local_tp_size
        dp = local // self.local_tp_size + (inter // self.inter_tp_size) * self.local_dp_size
        return tp, dp

    def rank(self, tp_rank: int, dp_rank: int) -> int:
        """The world rank at (tp_rank, dp_rank)."""
        local = tp_rank % self.local_tp_size + (dp_rank % self.local_dp_size) * self.local_tp_size
        inter = tp_rank // self.local_tp_size + (dp_rank // self.local_dp_size) * self.inter_tp_size
        return inter * self.local_size + local

    def tp_groups(self) -> list[list[int]]:
        """One list per dp_rank: its TP group's world ranks, by tp_rank (ascending)."""
        return [[self.rank(t, d) for t in range(self.tp_size)] for d in range(self.dp_size)]

    def dp_groups(self) -> list[list[int]]:
        """One list per tp_rank: its DP group's world ranks, by dp_rank (ascending)."""
        return [[self.rank(t, d) for d in range(self.dp_size)] for t in range(self.tp_size)]

    def blocks(self, op: MixedCommOp) -> tuple[int, int]:
        """(input blocks, output blocks) of ``op``: the rows split into dp_size blocks."""
        dp = self.dp_size
        return (dp if op in _RS_OPS else 1), (dp if op in _GATHER_OPS else 1)

    def sources(self, op: MixedCommOp, rank: int) -> tuple[list[list[int]], int]:
        """For each output block of ``rank``, the world ranks it sums (ascending), and the
        input block of theirs it reads."""
        t, d = self.coords(rank)
        T, D = self.tp_size, self.dp_size
        if op == MixedCommOp.ALLREDUCE:
            lists, block = [[self.rank(u, d) for u in range(T)]], 0
        elif op == MixedCommOp.ALLGATHER:
            lists, block = [[self.rank(t, i)] for i in range(D)], 0
        elif op == MixedCommOp.REDUCESCATTER:
            lists, block = [[self.rank(t, e) for e in range(D)]], d
        elif op == MixedCommOp.ALLREDUCE_ALLGATHER:
            lists, block = [[self.rank(u, i) for u in range(T)] for i in range(D)], 0
        else:
            lists, block = [list(range(self.world_size))], d
        return [sorted(s) for s in lists], block

    def receivers(self, op: MixedCommOp, rank: int) -> list[list[int]]:
        """For each input block of ``rank``, the ranks whose output reads it."""
        pushes = [[] for _ in range(self.blocks(op)[0])]
        for q in range(self.world_size):
            lists, block = self.sources(op, q)
            if any(rank in s for s in lists):
                pushes[block].append(q)
        return pushes


# ------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MixedCommConfig:
    """fused_max_bytes: ``AUTO`` takes ``FUSED`` up to this many bytes (the larger of input
    and output; None: ``tuning.ALLREDUCE_ONESHOT_MAX_BYTES`` for the group size).
    threads / blocks_per_sm: launch size of the mixed kernels. allreduce: the
    ``AllReduceConfig`` of the workspace (ALLREDUCE with dp_size 1 is its all_reduce)."""

    fused_max_bytes: int | None = None
    threads: int = 128
    blocks_per_sm: int = 4
    allreduce: AllReduceConfig = AllReduceConfig()

    def __post_init__(self):
        if self.fused_max_bytes is not None:
            int_at_least("MixedCommConfig.fused_max_bytes", self.fused_max_bytes, 0)
        threads = int_at_least("MixedCommConfig.threads", self.threads, 32)
        if threads % 32 or threads > 1024:
            raise ValueError(f"MixedCommConfig.threads={threads}: a multiple of 32, at most 1024")
        int_at_least("MixedCommConfig.blocks_per_sm", self.blocks_per_sm)
        if not isinstance(self.allreduce, AllReduceConfig):
            raise TypeError("MixedCommConfig.allreduce: expected an AllReduceConfig")


def _pack(rows: list[int]) -> int:
    word = 0
    for k, r in enumerate(rows):
        word |= r << (4 * k)
    return word


@lru_cache(maxsize=None)
def _kernel(name: str):
    return kernels.get_kernel("mixed.cu", name)


def _view(ptr: int, shape, dtype) -> cupy.ndarray:
    """A CuPy array over device memory the caller keeps alive."""
    dtype = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, None)
    return cupy.ndarray(tuple(shape), dtype, cupy.cuda.MemoryPointer(mem, 0))


# ------------------------------------------------------------------------------ handler
class MixedCommHandler(Op):
    """The state of mixed communication over one group, for one dtype.

    Args:
        group: the ranks (default: ``moecomm.init()``'s group); nodes are the group's
            (declared) nodes, ``MOECOMM_GPUS_PER_NODE`` included.
        max_bytes: the largest ``x_in`` or ``x_out`` of a call, in bytes.
        dtype: bf16, fp16 or fp32.
        tp_size, dp_size: the TP x DP split (TP packed inside nodes first), or
        local_tp_size, local_dp_size, inter_tp_size, inter_dp_size: FlashInfer's per-level
            sizes (unset: TP). ``MixedLayout.resolve`` checks that they match the group.
        timeout_s: bound of every wait for a peer (None: ``MOECOMM_TIMEOUT_S`` or 10 s).
        config: ``MixedCommConfig``.

    Creation is collective: it splits the TP and DP sub-groups and, inside a node, makes an
    ``AllReduceWorkspace`` with one-shot slots of ``max_bytes`` (memory per rank about
    ``3 * world * max_bytes + 2 * max_bytes``). ``close()`` is collective.
    """

    name = "MixedCommHandler"

    def __init__(self, group: ProcessGroup | None = None, max_bytes: int = 1 << 20,
                 dtype=bfloat16, *, tp_size: int | None = None, dp_size: int | None = None,
                 local_tp_size: int | None = None, local_dp_size: int | None = None,
                 inter_tp_size: int | None = None, inter_dp_size: int | None = None,
                 timeout_s: float | None = None, config: MixedCommConfig | None = None):
        self.group = default_group() if group is None else group
        self.dtype = supported_dtype(dtype, _DTYPES)
        self.max_bytes = int_at_least("max_bytes", max_bytes)
        self.config = options(MixedCommConfig, config)
        g = self.group
        sizes = (tp_size, dp_size, local_tp_size, local_dp_size, inter_tp_size, inter_dp_size)
        g.check_uniform("MixedCommHandler arguments (sizes, max_bytes, dtype)",
                        (sizes, self.max_bytes, self.dtype.name))
        places = g.allgather((g.node, g.local_rank, g.local_size))
        if any(p != (r // g.local_size, r % g.local_size, g.local_size)
               for r, p in enumerate(places)):
            raise ValueError("mixed communication needs equal nodes with ranks numbered "
                             f"node-major; (node, local rank, node size) by rank: {places}")
        self.layout = MixedLayout.resolve(
            g.size, g.local_size, tp_size=tp_size, dp_size=dp_size,
            local_tp_size=local_tp_size, local_dp_size=local_dp_size,
            inter_tp_size=inter_tp_size, inter_dp_size=inter_dp_size)
        self.rank = g.rank
        self.tp_rank, self.dp_rank = self.layout.coords(self.rank)
        self.tp_group = g.split(self.layout.tp_groups()[self.dp_rank])
        self.dp_group = g.split(self.layout.dp_groups()[self.tp_rank])
        try:  # collective, as construction is: free what was made if any step fails
            self.workspace = None
            # why FUSED cannot serve (empty while it can)
            self.no_fused_reason = f"the group spans {g.num_nodes} nodes" if g.spans_nodes else ""
            if not g.spans_nodes:
                self.workspace = AllReduceWorkspace(g, self.max_bytes, self.dtype,
                                                    max_oneshot_bytes=self.max_bytes,
                                                    timeout_s=timeout_s,
                                                    config=self.config.allreduce)
                if not self.workspace.ipc:  # CUDA IPC refused: NCCL modes only
                    self.no_fused_reason = self.workspace.no_ipc_reason
                    self.workspace.close()
                    self.workspace = None
            self._nccl = None  # (world, tp, dp) communicators and staging, on first use
            self._plans: dict = {}
            suffix = _SUFFIX[self.dtype]
            with g.all_or_none("MixedCommHandler"):  # local steps
                self._launchers = {kind: Launcher(_kernel(f"mixed_{kind}_{suffix}"), MixedArgs,
                                                  pdl=self.config.allreduce.pdl)
                                   for kind in ("oneshot", "reduce")}
                if self.workspace is not None:
                    self._launchers["oneshot"].args.ws = self.workspace.kernel_workspace
                    self.sms = self.workspace.sms
                else:
                    self.sms = device_facts().sms
        except BaseException:
            if self.workspace is not None:
                self.workspace.close()
            self.tp_group.close()
            self.dp_group.close()
            raise
        self._open(None if self.workspace is None else self.workspace.error)

    # -- choices -------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        """Whether the FUSED mode is available (the group inside one node, CUDA IPC)."""
        return self.workspace is not None

    def choose(self, op: MixedCommOp, nbytes: int,
               mode: MixedCommMode | int = MixedCommMode.AUTO) -> MixedCommMode:
        """The mode a call of ``op`` moving ``nbytes`` (larger of input and output) takes."""
        mode = enum_member(MixedCommMode, mode, "mode")
        if mode == MixedCommMode.AUTO:
            limit = self.config.fused_max_bytes
            if limit is None:
                limit = tuning.lookup(tuning.ALLREDUCE_ONESHOT_MAX_BYTES, self.layout.world_size)
            if self.fused and nbytes <= limit:
                return MixedCommMode.FUSED
            both = self.layout.tp_size > 1 and self.layout.dp_size > 1
            return MixedCommMode.NCCL_TP_DP if both else MixedCommMode.NCCL_ONE
        if mode == MixedCommMode.FUSED and not self.fused:
            raise ValueError(f"mode FUSED needs CUDA IPC inside one node, but "
                             f"{self.no_fused_reason}")
        return mode

    def output_shape(self, op: MixedCommOp, shape: tuple) -> tuple:
        """The shape ``op`` returns for an input of ``shape`` (checked)."""
        if len(shape) < 1:
            raise ValueError("x_in: needs at least one dimension (rows)")
        rows, dp = shape[0], self.layout.dp_size
        if op in _RS_OPS:
            if rows % dp:
                raise ValueError(f"x_in: {rows} rows do not split into dp_size={dp} blocks")
            return (rows // dp, *shape[1:])
        if op in _GATHER_OPS:
            return (rows * dp, *shape[1:])
        return tuple(shape)

    # -- launches ------------------------------------------------------------------------
    def _plan(self, op: MixedCommOp, mode: MixedCommMode):
        """Host tables of (op, mode), computed once: the MixedArgs fields that depend on
        the layout only."""
        key = (op, mode)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        L = self.layout
        lists, in_block = L.sources(op, self.rank)
        in_blocks, out_blocks = L.blocks(op)
        if mode == MixedCommMode.FUSED:
            rows = lists
            push = [sum(1 << q for q in qs) for qs in L.receivers(op, self.rank)]
        elif mode == MixedCommMode.NCCL_ONE:
            rows, push = lists, []
        else:  # NCCL_TP_DP: rows of what the per-axis calls gathered, in world-rank order
            T, D = L.tp_size, L.dp_size
            if op in (MixedCommOp.ALLREDUCE, MixedCommOp.ALLREDUCE_ALLGATHER):
                rows, in_block = [list(range(T))], 0
            elif op == MixedCommOp.ALLGATHER:
                rows, in_block = [[i] for i in range(D)], 0
            elif op == MixedCommOp.REDUCESCATTER:
                rows, in_block = [list(range(D))], 0
            else:  # row t * D + e holds block dp_rank of rank (t, e)
                order = sorted(((L.rank(t, e), t * D + e) for t in range(T) for e in range(D)))
                rows, in_block = [[row for _, row in order]], 0
            if op == MixedCommOp.ALLREDUCE_ALLGATHER:
                out_blocks = 1  # summed into block dp_rank, then all-gathered over DP
            push = []
        u32, u64 = ctypes.c_uint32 * AR_MAX_RANKS, ctypes.c_uint64 * AR_MAX_RANKS
        plan = (in_blocks, out_blocks, in_block, u32(*push), u32(*[len(r) for r in rows]),
                u64(*[_pack(r) for r in rows]))
        self._plans[key] = plan
        return plan

    def _launch(self, kind: str, plan, in_ptr: int, out_ptr: int, staged_ptr: int, unit: int,
                row_elems: int, stream: int) -> None:
        in_blocks, out_blocks, in_block, push, counts, packed = plan
        launcher = self._launchers[kind]
        a = launcher.args
        a.in_, a.out, a.staged = in_ptr, out_ptr, staged_ptr
        a.unit, a.row_elems = unit, row_elems
        a.in_blocks, a.out_blocks, a.in_block = in_blocks, out_blocks, in_block
        a.push_mask, a.src_count, a.src_rows = push, counts, packed
        nvec = out_blocks * unit * self.dtype.itemsize // VECTOR_BYTES
        threads = min(self.config.threads, max(32, -(-nvec // 32) * 32))
        blocks = max(1, min(-(-nvec // threads), self.sms * self.config.blocks_per_sm))
        launcher(blocks, threads, stream)

    def nccl(self, stream=None) -> tuple:
        """The (world, TP, DP) ``NcclCommunicator``s the NCCL modes use, made on first use
        (collective; one rank per GPU)."""
        return self._nccl_state(stream_handle(stream))[:3]

    def _nccl_state(self, stream: int):
        """World / TP / DP communicators and staging buffers, made on the first NCCL-mode
        call (collective)."""
        if self._nccl is None:
            status = cupy.cuda.runtime.streamIsCapturing(stream) if stream else 0
            if status:
                raise RuntimeError("run_mixed_comm: the first NCCL-mode call makes NCCL "
                                   "communicators; make one before capturing a CUDA graph")
            from .nccl import NcclCommunicator

            world = NcclCommunicator(self.group)
            tp = NcclCommunicator(self.tp_group)
            dp = NcclCommunicator(self.dp_group)
            stage = cupy.empty(self.layout.world_size * self.max_bytes, np.uint8)
            stage2 = cupy.empty(self.max_bytes, np.uint8)
            cupy.cuda.runtime.deviceSynchronize()
            self._nccl = (world, tp, dp, stage, stage2)
        return self._nccl

    def run(self, op: MixedCommOp, x_in, x_out=None,
            mode: MixedCommMode | int = MixedCommMode.AUTO, stream=None):
        """``run_mixed_comm`` (see there)."""
        self.usable("run_mixed_comm")
        op = enum_member(MixedCommOp, op, "op")
        handle = stream_handle(stream)
        xa = import_array(x_in, "x_in", dtype=FLOAT_DTYPES, device=self.device_id, stream=handle)
        if xa.dtype != self.dtype:
            raise TypeError(f"x_in: dtype {xa.dtype.name} does not match the handler's "
                            f"{dtype_name(self.dtype)}")
        out_shape = self.output_shape(op, tuple(xa.shape))
        item = self.dtype.itemsize
        out_nbytes = int(np.prod(out_shape)) * item
        nbytes = max(xa.nbytes, out_nbytes)
        if nbytes > self.max_bytes:
            raise ValueError(f"x_in/x_out: {nbytes} bytes exceed the handler's max_bytes "
                             f"{self.max_bytes}")
        in_blocks, out_blocks = self.layout.blocks(op)
        unit = xa.size // in_blocks  # elements per block
        if (unit * item) % VECTOR_BYTES:
            raise ValueError(f"x_in: a block of {unit} elements ({unit * item} bytes: rows / "
                             f"{in_blocks} x the row) is not a multiple of {VECTOR_BYTES} bytes")
        mode = self.choose(op, nbytes, mode)
        if _group.DEBUG:
            self.group.check_uniform("run_mixed_comm arguments (op, shape, dtype, mode)",
                                     (op.name, tuple(xa.shape), xa.dtype.name, mode.name))
        if x_out is None:
            out = empty(out_shape, self.dtype, handle)
            out_ptr = out.data.ptr
        else:
            out = x_out
            out_ptr = import_array(x_out, "x_out", dtype=self.dtype, shape=out_shape,
                                   device=self.device_id, stream=handle, writable=True).ptr
        require_aligned("x_in", xa.ptr)
        require_aligned("x_out", out_ptr)
        if overlaps(out_ptr, out_nbytes, xa.ptr, xa.nbytes):
            raise ValueError("x_out: overlaps x_in (the op reads x_in while writing x_out)")
        if xa.size == 0:
            return out
        if mode == MixedCommMode.FUSED:
            if op == MixedCommOp.ALLREDUCE and self.layout.dp_size == 1:
                self.workspace.launch(xa.ptr, out_ptr, xa.size,
                                      self.workspace.choose(xa.nbytes, Algorithm.AUTO), handle)
            else:
                self._launch("oneshot", self._plan(op, mode), xa.ptr, out_ptr, 0, unit, 0,
                             handle)
            return out
        world, tp, dp, stage, stage2 = self._nccl_state(handle)
        plan = self._plan(op, mode)
        x = _view(xa.ptr, (xa.size,), self.dtype)
        L = self.layout
        if mode == MixedCommMode.NCCL_ONE:
            g = _view(stage.data.ptr, (L.world_size, xa.size), self.dtype)
            world.all_gather(x, g, stream=handle)
            self._launch("reduce", plan, 0, out_ptr, g.data.ptr, unit, xa.size, handle)
            return out
        T, D = L.tp_size, L.dp_size
        if op in (MixedCommOp.ALLREDUCE, MixedCommOp.ALLREDUCE_ALLGATHER):
            g = _view(stage.data.ptr, (T, unit), self.dtype)
            tp.all_gather(x, g, stream=handle)
            if op == MixedCommOp.ALLREDUCE:
                self._launch("reduce", plan, 0, out_ptr, g.data.ptr, unit, unit, handle)
            else:
                mine = out_ptr + self.dp_rank * unit * item
                self._launch("reduce", plan, 0, mine, g.data.ptr, unit, unit, handle)
                dp.all_gather(_view(mine, (unit,), self.dtype),
                              _view(out_ptr, (D, unit), self.dtype), stream=handle)
        elif op == MixedCommOp.ALLGATHER:
            g = _view(stage.data.ptr, (D, unit), self.dtype)
            dp.all_gather(x, g, stream=handle)
            self._launch("reduce", plan, 0, out_ptr, g.data.ptr, unit, unit, handle)
        else:
            r = _view((stage2 if op == MixedCommOp.REDUCESCATTER_ALLREDUCE else stage).data.ptr,
                      (D, unit), self.dtype)
            dp.all_to_all(_view(xa.ptr, (D, unit), self.dtype), r, stream=handle)
            if op == MixedCommOp.REDUCESCATTER:
                self._launch("reduce", plan, 0, out_ptr, r.data.ptr, unit, unit, handle)
            else:
                g = _view(stage.data.ptr, (T, D, unit), self.dtype)
                tp.all_gather(r, g, stream=handle)
                self._launch("reduce", plan, 0, out_ptr, g.data.ptr, unit, unit, handle)
        return out

    def check(self, stream=None) -> None:
        """Wait for ``stream`` and raise ``PeerTimeoutError`` if a peer never arrived."""
        self.check_error(stream, synchronize=True)

    def _release(self) -> None:
        if self._nccl is not None:
            for comm in self._nccl[:3]:
                comm.close()
            self._nccl = None
        if self.workspace is not None:
            self.workspace.close()
            self.error = None  # the workspace owned (and closed) it
        for g in (self.tp_group, self.dp_group):
            g.close()

    def __repr__(self) -> str:
        L = self.layout
        return (f"MixedCommHandler(world={L.world_size}, tp={L.tp_size} "
                f"({L.local_tp_size}x{L.inter_tp_size}), dp={L.dp_size} "
                f"({L.local_dp_size}x{L.inter_dp_size}), dtype={self.dtype.name}, "
                f"max_bytes={self.max_bytes}, fused={self.fused}, {self.phase.value})")


def run_mixed_comm(op: MixedCommOp, handler: MixedCommHandler, x_in, x_out=None,
                   mode: MixedCommMode | int = MixedCommMode.AUTO, stream=None):
    """Run ``op`` over the handler's group (collective: every rank, same op, shape, mode).

    Args:
        op: a ``MixedCommOp`` (or its int value).
        x_in: ``[rows, ...]`` of the handler's dtype, C-contiguous, 16-byte aligned, any
            ``__dlpack__`` array on this rank's GPU; a block (``rows / dp_size`` rows for
            the reduce-scatter ops, all rows otherwise) a multiple of 16 bytes.
        x_out: the output (shape: see ``MixedCommHandler.output_shape``); pass it when
            capturing a CUDA graph. Must not overlap ``x_in``.
        mode: a ``MixedCommMode``; same on every rank.
        stream: where the op runs.

    Returns ``x_out`` as passed, or a new ``cupy.ndarray``.
    """
    if not isinstance(handler, MixedCommHandler):
        raise TypeError(f"handler: expected a MixedCommHandler, got {type(handler).__name__}")
    return handler.run(op, x_in, x_out, mode, stream)
