"""Mapping: the parallel layout of a job (world / tp / pp / cp / moe_tp / moe_ep).

A ``Mapping`` turns the sizes of a job's parallel dimensions into ranks and groups of
world ranks. It follows TensorRT-LLM's ``Mapping`` (also FlashInfer's
``flashinfer.comm.Mapping``): same argument names, defaults, rank numbering and group
order. Pure arithmetic: it imports nothing beyond the standard library and never talks to
other ranks; a caller makes one communicator per group it needs (for example with
``ProcessGroup.split``).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from moecomm.group import ProcessGroup


def _checked_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an ``int`` >= ``minimum``; ValueError naming ``name`` otherwise."""
    try:
        if isinstance(value, bool):  # an int subclass, but never a size or a rank
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


@dataclasses.dataclass(frozen=True)
class Mapping:
    """Parallel layout of a job as seen from one rank.

    Fields (all sizes are positive ints; the object is immutable, hashable, compared by
    value):
        world_size: number of ranks in the job; must equal ``tp_size * pp_size * cp_size``.
        rank: this process's rank in ``[0, world_size)``.
        gpus_per_node: ranks per node (>= 1, default 8). Ranks are numbered node-major:
            node ``r // gpus_per_node`` holds rank ``r``; the last node may be partial.
        tp_size: tensor-parallel degree (default 1).
        pp_size: pipeline-parallel degree, i.e. the number of stages (default 1).
        cp_size: context-parallel degree (default 1).
        moe_tp_size, moe_ep_size: how the MoE layer splits each tp group: ``moe_ep_size``
            ranks hold different experts, ``moe_tp_size`` ranks share an expert's weights;
            ``moe_tp_size * moe_ep_size == tp_size``. Left unset (None, or -1 as in
            TensorRT-LLM): both unset gives ``moe_tp_size = tp_size, moe_ep_size = 1``; one
            unset gives ``tp_size // other``.
        moe_cluster_size: accepted for TensorRT-LLM compatibility; only 1 (or -1, meaning
            1) is supported.
        enable_attention_dp: attention data-parallel flag, stored for callers; it does not
            change the layout (and, unlike TensorRT-LLM, does not relax the rank check).

    TensorRT-LLM's ``attn_tp_size``, ``attn_cp_size``, ``cp_config`` and
    ``auto_parallel`` are not accepted.

    Rank layout (tp fastest, then cp, then pp)::

        rank    = (pp_rank * cp_size + cp_rank) * tp_size + tp_rank
        tp_rank = rank % tp_size
        cp_rank = (rank // tp_size) % cp_size
        pp_rank = rank // (tp_size * cp_size)

    MoE ranks split ``tp_rank``, ep fastest, as in TensorRT-LLM::

        moe_ep_rank = tp_rank % moe_ep_size
        moe_tp_rank = tp_rank // moe_ep_size

    so each moe_ep group is a contiguous slice of a tp group and each moe_tp group a
    strided one. The moe groups always partition the tp groups; this equals
    TensorRT-LLM's groups whenever ``cp_size == 1`` (TensorRT-LLM refuses
    ``moe_ep_size > 1`` with ``cp_size > 1``; here that layout is allowed).

    Every group is a list of world ranks, ordered by the rank within that group (so
    ``tp_group[tp_rank] == rank``). ``tp_groups``, ``pp_groups``, ... list every group of
    one kind, in TensorRT-LLM's order. Example, one node of 8 GPUs, ``tp_size=4,
    pp_size=2``: tp groups ``[0, 1, 2, 3], [4, 5, 6, 7]``; pp groups ``[0, 4], [1, 5],
    [2, 6], [3, 7]``. With ``tp_size=4, cp_size=2`` instead, the cp groups are the
    latter. With ``tp_size=8, moe_tp_size=2, moe_ep_size=4``: moe_ep groups
    ``[0, 1, 2, 3], [4, 5, 6, 7]``; moe_tp groups ``[0, 4], [1, 5], [2, 6], [3, 7]``.

    Invalid arguments raise ``ValueError`` naming the argument and its value.
    """

    world_size: int = 1
    rank: int = 0
    gpus_per_node: int = 8
    _: dataclasses.KW_ONLY
    tp_size: int = 1
    pp_size: int = 1
    cp_size: int = 1
    moe_tp_size: int | None = None
    moe_ep_size: int | None = None
    moe_cluster_size: int = 1
    enable_attention_dp: bool = False

    def __post_init__(self) -> None:
        def store(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        for name in ("world_size", "gpus_per_node", "tp_size", "pp_size", "cp_size"):
            store(name, _checked_int(name, getattr(self, name)))
        if self.tp_size * self.pp_size * self.cp_size != self.world_size:
            raise ValueError(
                f"world_size={self.world_size} must equal tp_size * pp_size * cp_size = "
                f"{self.tp_size} * {self.pp_size} * {self.cp_size}"
            )

        rank = _checked_int("rank", self.rank, 0)
        if rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        store("rank", rank)

        cluster = 1 if self.moe_cluster_size == -1 else self.moe_cluster_size
        if _checked_int("moe_cluster_size", cluster) != 1:
            raise ValueError(
                f"moe_cluster_size must be 1 (MoE clusters are not supported), got {cluster!r}"
            )
        store("moe_cluster_size", 1)

        moe_tp, moe_ep = (
            None if v is None or v == -1 else _checked_int(n, v)
            for n, v in (("moe_tp_size", self.moe_tp_size), ("moe_ep_size", self.moe_ep_size))
        )
        if moe_tp is None and moe_ep is None:
            moe_tp, moe_ep = self.tp_size, 1
        elif moe_tp is None:
            moe_tp = self.tp_size // moe_ep
        elif moe_ep is None:
            moe_ep = self.tp_size // moe_tp
        if moe_tp * moe_ep != self.tp_size:
            raise ValueError(
                f"moe_tp_size * moe_ep_size must equal tp_size={self.tp_size}, "
                f"got moe_tp_size={moe_tp}, moe_ep_size={moe_ep} "
                f"(from moe_tp_size={self.moe_tp_size!r}, moe_ep_size={self.moe_ep_size!r})"
            )
        store("moe_tp_size", moe_tp)
        store("moe_ep_size", moe_ep)

        if not isinstance(self.enable_attention_dp, bool):
            raise ValueError(
                f"enable_attention_dp must be a bool, got {self.enable_attention_dp!r}"
            )

    @classmethod
    def from_group(
        cls,
        group: ProcessGroup,
        *,
        tp_size: int | None = None,
        pp_size: int = 1,
        cp_size: int = 1,
        moe_tp_size: int | None = None,
        moe_ep_size: int | None = None,
        moe_cluster_size: int = 1,
        enable_attention_dp: bool = False,
    ) -> "Mapping":
        """The mapping of ``group``'s rank: world_size, rank and gpus_per_node from it.

        ``tp_size`` defaults to ``group.size // (pp_size * cp_size)``. The group's node
        membership (``group.node``, ``group.local_rank``) must match the node-major
        numbering a Mapping assumes, otherwise ValueError (pass a ``gpus_per_node`` to
        the group that matches how ranks are placed on hosts).
        """
        if tp_size is None:
            stages = _checked_int("pp_size", pp_size) * _checked_int("cp_size", cp_size)
            if group.size % stages:
                raise ValueError(
                    f"group.size={group.size} is not divisible by pp_size * cp_size = "
                    f"{pp_size} * {cp_size}; pass tp_size"
                )
            tp_size = group.size // stages
        mapping = cls(
            group.size,
            group.rank,
            group.gpus_per_node,
            tp_size=tp_size,
            pp_size=pp_size,
            cp_size=cp_size,
            moe_tp_size=moe_tp_size,
            moe_ep_size=moe_ep_size,
            moe_cluster_size=moe_cluster_size,
            enable_attention_dp=enable_attention_dp,
        )
        if (group.node, group.local_rank) != (mapping.node_rank, mapping.local_rank):
            raise ValueError(
                f"rank {group.rank} is local rank {group.local_rank} of node {group.node} in "
                f"the group, but gpus_per_node={group.gpus_per_node} numbers it local rank "
                f"{mapping.local_rank} of node {mapping.node_rank}: ranks are not placed "
                "node-major with that many ranks per node"
            )
        return mapping

    # -- ranks ----------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        """Position in the tp group."""
        return self.rank % self.tp_size

    @property
    def cp_rank(self) -> int:
        """Position in the cp group."""
        return self.rank // self.tp_size % self.cp_size

    @property
    def pp_rank(self) -> int:
        """Pipeline stage, i.e. position in the pp group."""
        return self.rank // (self.tp_size * self.cp_size)

    @property
    def moe_tp_rank(self) -> int:
        """Position in the moe_tp group (``tp_rank // moe_ep_size``)."""
        return self.tp_rank // self.moe_ep_size

    @property
    def moe_ep_rank(self) -> int:
        """Position in the moe_ep group (``tp_rank % moe_ep_size``): which expert shard."""
        return self.tp_rank % self.moe_ep_size

    def world_rank(self, tp_rank: int, cp_rank: int = 0, pp_rank: int = 0) -> int:
        """The world rank at (tp_rank, cp_rank, pp_rank); ValueError if one is out of range."""
        for name, value, size in (
            ("tp_rank", tp_rank, self.tp_size),
            ("cp_rank", cp_rank, self.cp_size),
            ("pp_rank", pp_rank, self.pp_size),
        ):
            if not 0 <= value < size:
                raise ValueError(f"{name} must be in [0, {size}), got {value}")
        return (pp_rank * self.cp_size + cp_rank) * self.tp_size + tp_rank

    # -- this rank's groups ---------------------------------------------------------------
    @property
    def tp_group(self) -> list[int]:
        """World ranks of this rank's tp group (same cp and pp rank)."""
        first = self.rank - self.tp_rank
        return list(range(first, first + self.tp_size))

    @property
    def cp_group(self) -> list[int]:
        """World ranks of this rank's cp group (same tp and pp rank)."""
        return [self.world_rank(self.tp_rank, c, self.pp_rank) for c in range(self.cp_size)]

    @property
    def pp_group(self) -> list[int]:
        """World ranks of this rank's pp group (same tp and cp rank), first stage first."""
        return [self.world_rank(self.tp_rank, self.cp_rank, p) for p in range(self.pp_size)]

    @property
    def moe_tp_group(self) -> list[int]:
        """World ranks sharing this rank's experts: its tp group, every moe_ep_size-th."""
        return self.tp_group[self.moe_ep_rank :: self.moe_ep_size]

    @property
    def moe_ep_group(self) -> list[int]:
        """World ranks among which the experts are split: a slice of its tp group."""
        start = self.moe_tp_rank * self.moe_ep_size
        return self.tp_group[start : start + self.moe_ep_size]

    # -- every group of a kind (the same on every rank) -----------------------------------
    @property
    def tp_groups(self) -> list[list[int]]:
        """All tp groups, ordered by (pp_rank, cp_rank)."""
        return [
            [self.world_rank(t, c, p) for t in range(self.tp_size)]
            for p in range(self.pp_size)
            for c in range(self.cp_size)
        ]

    @property
    def cp_groups(self) -> list[list[int]]:
        """All cp groups, ordered by (pp_rank, tp_rank)."""
        return [
            [self.world_rank(t, c, p) for c in range(self.cp_size)]
            for p in range(self.pp_size)
            for t in range(self.tp_size)
        ]

    @property
    def pp_groups(self) -> list[list[int]]:
        """All pp groups, ordered by (cp_rank, tp_rank)."""
        return [
            [self.world_rank(t, c, p) for p in range(self.pp_size)]
            for c in range(self.cp_size)
            for t in range(self.tp_size)
        ]

    @property
    def moe_tp_groups(self) -> list[list[int]]:
        """All moe_tp groups, ordered by (tp group, moe_ep_rank)."""
        ep = self.moe_ep_size
        return [tp[e::ep] for tp in self.tp_groups for e in range(ep)]

    @property
    def moe_ep_groups(self) -> list[list[int]]:
        """All moe_ep groups, ordered by (tp group, moe_tp_rank)."""
        ep = self.moe_ep_size
        return [tp[m * ep : (m + 1) * ep] for tp in self.tp_groups for m in range(self.moe_tp_size)]

    # -- nodes ----------------------------------------------------------------------------
    def get_node_rank(self, rank: int) -> int:
        """Index of the node that holds world rank ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        return rank // self.gpus_per_node

    def get_local_rank(self, rank: int) -> int:
        """Position of world rank ``rank`` on its node."""
        return rank - self.get_node_rank(rank) * self.gpus_per_node

    @property
    def node_rank(self) -> int:
        """Index of this rank's node."""
        return self.get_node_rank(self.rank)

    @property
    def local_rank(self) -> int:
        """Position of this rank on its node."""
        return self.get_local_rank(self.rank)

    def is_multi_node(self) -> bool:
        """True when the job has more ranks than one node holds."""
        return self.world_size > self.gpus_per_node

    def spans_nodes(self, ranks: Iterable[int]) -> bool:
        """True when the world ranks ``ranks`` are on more than one node."""
        return len({self.get_node_rank(r) for r in ranks}) > 1

    @property
    def tp_spans_nodes(self) -> bool:
        """Whether this rank's tp group crosses a node boundary (so needs NCCL, not IPC)."""
        return self.spans_nodes(self.tp_group)

    @property
    def moe_ep_spans_nodes(self) -> bool:
        """Whether this rank's moe_ep group crosses a node boundary."""
        return self.spans_nodes(self.moe_ep_group)

    # -- pipeline -------------------------------------------------------------------------
    def is_first_pp_rank(self) -> bool:
        """True on the first pipeline stage."""
        return self.pp_rank == 0

    def is_last_pp_rank(self) -> bool:
        """True on the last pipeline stage."""
        return self.pp_rank == self.pp_size - 1

    def prev_pp_rank(self) -> int:
        """World rank of the previous stage (same tp/cp rank); the first wraps to the last."""
        return (self.rank - self.tp_size * self.cp_size) % self.world_size

    def next_pp_rank(self) -> int:
        """World rank of the next stage (same tp/cp rank); the last wraps to the first."""
        return (self.rank + self.tp_size * self.cp_size) % self.world_size
