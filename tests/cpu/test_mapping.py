"""Mapping: rank layout, groups, node membership, validation (pure CPU)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import moecomm.mapping
from moecomm.mapping import Mapping

KINDS = ("tp", "cp", "pp", "moe_tp", "moe_ep")


def all_ranks(**kwargs) -> list[Mapping]:
    world = kwargs.pop("world_size")
    return [Mapping(world, r, **kwargs) for r in range(world)]


# -- the examples of the reference docstring (TensorRT-LLM / FlashInfer) ------------------
REFERENCE_EXAMPLES = [
    (
        dict(world_size=8, tp_size=4, pp_size=2),
        dict(
            tp=[[0, 1, 2, 3], [4, 5, 6, 7]],
            pp=[[0, 4], [1, 5], [2, 6], [3, 7]],
        ),
    ),
    (
        dict(world_size=8, tp_size=4, cp_size=2),
        dict(
            tp=[[0, 1, 2, 3], [4, 5, 6, 7]],
            cp=[[0, 4], [1, 5], [2, 6], [3, 7]],
        ),
    ),
    (
        dict(world_size=8, tp_size=8, moe_tp_size=2, moe_ep_size=4),
        dict(
            moe_tp=[[0, 4], [1, 5], [2, 6], [3, 7]],
            moe_ep=[[0, 1, 2, 3], [4, 5, 6, 7]],
        ),
    ),
    (
        dict(world_size=16, tp_size=8, pp_size=2, moe_tp_size=2, moe_ep_size=4),
        dict(
            moe_tp=[[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
            moe_ep=[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
            pp=[[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]],
        ),
    ),
    (
        dict(world_size=8, tp_size=2, pp_size=2, cp_size=2),
        dict(
            tp=[[0, 1], [2, 3], [4, 5], [6, 7]],
            pp=[[0, 4], [1, 5], [2, 6], [3, 7]],
            cp=[[0, 2], [1, 3], [4, 6], [5, 7]],
        ),
    ),
]


@pytest.mark.parametrize("kwargs,expected", REFERENCE_EXAMPLES)
def test_reference_examples(kwargs, expected):
    for m in all_ranks(**kwargs):
        for kind, groups in expected.items():
            assert getattr(m, f"{kind}_groups") == groups, kind
            mine = [g for g in groups if m.rank in g]
            assert getattr(m, f"{kind}_group") == mine[0], (kind, m.rank)


def test_docstring_example_tp4_pp2_ranks():
    m = Mapping(8, 6, tp_size=4, pp_size=2)
    assert (m.tp_rank, m.cp_rank, m.pp_rank) == (2, 0, 1)
    assert m.tp_group == [4, 5, 6, 7]
    assert m.pp_group == [2, 6]
    assert m.cp_group == [6]
    assert (m.moe_tp_size, m.moe_ep_size) == (4, 1)
    assert m.moe_tp_group == [4, 5, 6, 7] and m.moe_ep_group == [6]
    assert not m.is_first_pp_rank() and m.is_last_pp_rank()
    assert m.prev_pp_rank() == 2 and m.next_pp_rank() == 2


def test_defaults():
    m = Mapping()
    assert (m.world_size, m.rank, m.gpus_per_node) == (1, 0, 8)
    assert (m.tp_size, m.pp_size, m.cp_size) == (1, 1, 1)
    assert (m.moe_tp_size, m.moe_ep_size, m.moe_cluster_size) == (1, 1, 1)
    assert m.enable_attention_dp is False
    assert m.tp_group == m.pp_group == m.cp_group == m.moe_tp_group == m.moe_ep_group == [0]
    assert m.is_first_pp_rank() and m.is_last_pp_rank()
    assert m.prev_pp_rank() == m.next_pp_rank() == 0
    assert not m.is_multi_node() and not m.tp_spans_nodes and not m.moe_ep_spans_nodes


# -- MoE splits ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "moe_tp,moe_ep,expected",
    [
        (None, None, (8, 1)),
        (-1, -1, (8, 1)),  # TensorRT-LLM's spelling of "unset"
        (None, 4, (2, 4)),
        (-1, 8, (1, 8)),
        (2, None, (2, 4)),
        (8, -1, (8, 1)),
        (4, 2, (4, 2)),
    ],
)
def test_moe_size_resolution(moe_tp, moe_ep, expected):
    m = Mapping(8, 0, tp_size=8, moe_tp_size=moe_tp, moe_ep_size=moe_ep)
    assert (m.moe_tp_size, m.moe_ep_size) == expected


def test_moe_ranks_ep_fastest():
    # tp_rank = moe_tp_rank * moe_ep_size + moe_ep_rank (TensorRT-LLM's convention).
    for m in all_ranks(world_size=8, tp_size=8, moe_tp_size=2, moe_ep_size=4):
        assert m.moe_ep_rank == m.tp_rank % 4
        assert m.moe_tp_rank == m.tp_rank // 4
    m = Mapping(8, 5, tp_size=8, moe_tp_size=2, moe_ep_size=4)
    assert (m.moe_tp_rank, m.moe_ep_rank) == (1, 1)
    assert m.moe_ep_group == [4, 5, 6, 7]
    assert m.moe_tp_group == [1, 5]


def test_pure_ep():
    m = Mapping(8, 3, tp_size=8, moe_ep_size=8)
    assert m.moe_tp_size == 1 and m.moe_ep_rank == 3 and m.moe_tp_rank == 0
    assert m.moe_ep_group == list(range(8))
    assert m.moe_tp_group == [3]


def test_moe_with_cp_partitions_tp_groups():
    # TensorRT-LLM refuses moe_ep_size > 1 with cp; here moe groups split each tp group.
    m = Mapping(16, 13, tp_size=4, cp_size=2, pp_size=2, moe_ep_size=2)
    assert (m.tp_rank, m.cp_rank, m.pp_rank) == (1, 1, 1)
    assert m.tp_group == [12, 13, 14, 15]
    assert m.moe_ep_group == [12, 13]
    assert m.moe_tp_group == [13, 15]
    assert m.cp_group == [9, 13]
    assert m.pp_group == [5, 13]


# -- context parallel ---------------------------------------------------------------------
def test_cp_ranks_and_groups():
    m = Mapping(12, 7, tp_size=2, cp_size=3, pp_size=2)
    assert (m.tp_rank, m.cp_rank, m.pp_rank) == (1, 0, 1)
    assert m.tp_group == [6, 7]
    assert m.cp_group == [7, 9, 11]
    assert m.pp_group == [1, 7]
    assert m.prev_pp_rank() == 1 and m.next_pp_rank() == 1
    assert m.world_rank(1, 2, 0) == 5


# -- nodes ----------------------------------------------------------------------------------
def test_node_membership():
    ms = all_ranks(world_size=16, gpus_per_node=4, tp_size=8, pp_size=2, moe_ep_size=4)
    for m in ms:
        assert m.node_rank == m.rank // 4 and m.local_rank == m.rank % 4
        assert m.is_multi_node()
        assert m.tp_spans_nodes  # 8 ranks over nodes of 4
        assert not m.moe_ep_spans_nodes  # ep groups of 4 line up with nodes
    m = ms[9]
    assert (m.node_rank, m.local_rank) == (2, 1)
    assert m.get_node_rank(15) == 3 and m.get_local_rank(15) == 3
    assert m.spans_nodes([0, 3]) is False and m.spans_nodes([3, 4]) is True

    wide = Mapping(16, 0, 4, tp_size=8, pp_size=2, moe_ep_size=8)
    assert wide.moe_ep_spans_nodes


def test_node_single_and_partial():
    m = Mapping(8, 7, tp_size=8)  # gpus_per_node defaults to 8
    assert not m.is_multi_node() and not m.tp_spans_nodes
    assert (m.node_rank, m.local_rank) == (0, 7)
    # gpus_per_node need not divide the groups: only some tp groups cross a node.
    ms = all_ranks(world_size=6, gpus_per_node=4, tp_size=3, pp_size=2)
    spans = [m.tp_spans_nodes for m in ms]
    assert spans == [False] * 3 + [True] * 3
    last = Mapping(6, 5, 4, tp_size=3, pp_size=2)
    assert (last.node_rank, last.local_rank) == (1, 1)  # a partial last node


def test_node_rank_out_of_range():
    m = Mapping(8, 0, 4, tp_size=8)
    with pytest.raises(ValueError, match="rank"):
        m.get_node_rank(8)
    with pytest.raises(ValueError, match="rank"):
        m.spans_nodes([0, -1])


# -- consistency over many layouts ------------------------------------------------------------
LAYOUTS = [
    dict(world_size=1),
    dict(world_size=8, tp_size=8),
    dict(world_size=8, tp_size=4, pp_size=2),
    dict(world_size=8, tp_size=2, pp_size=2, cp_size=2),
    dict(world_size=8, tp_size=1, pp_size=8),
    dict(world_size=8, tp_size=1, cp_size=8),
    dict(world_size=16, gpus_per_node=4, tp_size=8, pp_size=2, moe_tp_size=2, moe_ep_size=4),
    dict(world_size=24, gpus_per_node=8, tp_size=4, cp_size=3, pp_size=2, moe_ep_size=2),
    dict(world_size=12, gpus_per_node=5, tp_size=6, pp_size=2, moe_tp_size=3),
    dict(world_size=32, gpus_per_node=8, tp_size=16, pp_size=2, moe_ep_size=16),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: ",".join(map(str, d.values())))
def test_every_rank_consistent(layout):
    ms = all_ranks(**layout)
    world = len(ms)
    ref = ms[0]
    expected_size = {kind: getattr(ref, f"{kind}_size") for kind in KINDS}
    for kind in KINDS:
        groups = getattr(ref, f"{kind}_groups")
        # identical on every rank, a partition of the world, groups of the right size
        assert all(getattr(m, f"{kind}_groups") == groups for m in ms), kind
        assert sorted(r for g in groups for r in g) == list(range(world)), kind
        assert len(groups) == world // expected_size[kind], kind
        assert all(len(g) == expected_size[kind] for g in groups), kind
        for m in ms:
            mine = getattr(m, f"{kind}_group")
            assert [g for g in groups if m.rank in g] == [mine], (kind, m.rank)
            # every member agrees on the group
            assert all(getattr(ms[r], f"{kind}_group") == mine for r in mine), (kind, m.rank)
            # ordered by the rank within the group
            assert mine.index(m.rank) == getattr(m, f"{kind}_rank"), (kind, m.rank)

    for m in ms:
        assert 0 <= m.tp_rank < m.tp_size and 0 <= m.cp_rank < m.cp_size
        assert 0 <= m.pp_rank < m.pp_size
        assert m.world_rank(m.tp_rank, m.cp_rank, m.pp_rank) == m.rank
        assert m.tp_rank == m.moe_tp_rank * m.moe_ep_size + m.moe_ep_rank
        assert set(m.moe_tp_group) | set(m.moe_ep_group) <= set(m.tp_group)
        assert set(m.moe_tp_group) & set(m.moe_ep_group) == {m.rank}
        # pipeline neighbours: same tp/cp rank, adjacent stage, wrapping around
        prev, nxt = ms[m.prev_pp_rank()], ms[m.next_pp_rank()]
        assert (prev.tp_rank, prev.cp_rank) == (nxt.tp_rank, nxt.cp_rank) == (m.tp_rank, m.cp_rank)
        assert prev.pp_rank == (m.pp_rank - 1) % m.pp_size
        assert nxt.pp_rank == (m.pp_rank + 1) % m.pp_size
        assert m.is_first_pp_rank() == (m.pp_rank == 0)
        assert m.is_last_pp_rank() == (m.pp_rank == m.pp_size - 1)
        # node helpers agree with spans_nodes over the groups
        assert m.tp_spans_nodes == (len({r // m.gpus_per_node for r in m.tp_group}) > 1)
        assert m.moe_ep_spans_nodes == (len({r // m.gpus_per_node for r in m.moe_ep_group}) > 1)
        assert m.node_rank * m.gpus_per_node + m.local_rank == m.rank


def test_world_rank_range_checked():
    m = Mapping(8, 0, tp_size=4, pp_size=2)
    for args, name in [
        ((4, 0, 0), "tp_rank"),
        ((-1,), "tp_rank"),
        ((0, 1, 0), "cp_rank"),
        ((0, 0, 2), "pp_rank"),
    ]:
        with pytest.raises(ValueError, match=name):
            m.world_rank(*args)


# -- validation --------------------------------------------------------------------------------
INVALID = [
    (dict(world_size=0), "world_size"),
    (dict(world_size=-8, tp_size=-8), "world_size"),
    (dict(world_size=2.0, tp_size=2), "world_size"),
    (dict(world_size=8), "world_size"),  # tp_size defaults to 1, as in the reference
    (dict(world_size=8, tp_size=4), "world_size"),
    (dict(world_size=8, tp_size=16), "world_size"),
    (dict(world_size=8, rank=8, tp_size=8), "rank"),
    (dict(world_size=8, rank=-1, tp_size=8), "rank"),
    (dict(world_size=8, rank="0", tp_size=8), "rank"),
    (dict(world_size=8, rank=True, tp_size=8), "rank"),
    (dict(world_size=8, gpus_per_node=0, tp_size=8), "gpus_per_node"),
    (dict(world_size=8, gpus_per_node=None, tp_size=8), "gpus_per_node"),
    (dict(world_size=8, tp_size=0), "tp_size"),
    (dict(world_size=8, tp_size="8"), "tp_size"),
    (dict(world_size=8, tp_size=True), "tp_size"),
    (dict(world_size=8, tp_size=8, pp_size=0), "pp_size"),
    (dict(world_size=8, tp_size=8, cp_size=-1), "cp_size"),
    (dict(world_size=8, tp_size=8, cp_size=1.5), "cp_size"),
    (dict(world_size=8, tp_size=8, moe_tp_size=0), "moe_tp_size"),
    (dict(world_size=8, tp_size=8, moe_ep_size=-2), "moe_ep_size"),
    (dict(world_size=8, tp_size=8, moe_ep_size=3), "moe_ep_size"),
    (dict(world_size=8, tp_size=8, moe_ep_size=16), "moe_ep_size"),
    (dict(world_size=8, tp_size=8, moe_tp_size=2, moe_ep_size=2), "moe_tp_size"),
    (dict(world_size=8, tp_size=8, moe_cluster_size=2), "moe_cluster_size"),
    (dict(world_size=8, tp_size=8, moe_cluster_size=0), "moe_cluster_size"),
    (dict(world_size=8, tp_size=8, enable_attention_dp="yes"), "enable_attention_dp"),
]


@pytest.mark.parametrize("kwargs,name", INVALID, ids=[f"{n}:{k}" for k, n in INVALID])
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Mapping(**kwargs)


def test_error_names_value():
    with pytest.raises(ValueError, match=r"rank.*\[0, world_size=8\).*got 9"):
        Mapping(8, 9, tp_size=8)
    with pytest.raises(ValueError, match=r"world_size=6.*2 \* 2 \* 1"):
        Mapping(6, 0, tp_size=2, pp_size=2)


def test_size_arguments_keyword_only():
    with pytest.raises(TypeError):
        Mapping(8, 0, 8, 8)


# -- value semantics ---------------------------------------------------------------------------
def test_frozen_eq_hash_repr():
    a = Mapping(8, 3, tp_size=8, moe_ep_size=8)
    b = Mapping(8, 3, tp_size=8, moe_tp_size=1)  # resolves to the same layout
    c = dataclasses.replace(a, rank=4)
    assert a == b and hash(a) == hash(b)
    assert a != c and c.rank == 4 and c.moe_ep_size == 8
    assert a != Mapping(8, 3, tp_size=8, moe_ep_size=8, enable_attention_dp=True)
    assert len({a, b, c}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.rank = 0
    text = repr(a)
    assert text.startswith("Mapping(") and "moe_ep_size=8" in text and "rank=3" in text
    assert eval(text, {"Mapping": Mapping}) == a


def test_integer_like_sizes_are_normalised():
    class Idx:
        def __init__(self, v):
            self.v = v

        def __index__(self):
            return self.v

    m = Mapping(Idx(4), Idx(1), tp_size=Idx(4))
    assert m == Mapping(4, 1, tp_size=4)
    assert type(m.world_size) is int and type(m.tp_size) is int


# -- from_group ----------------------------------------------------------------------------------
def fake_group(rank, size, gpus_per_node, node=None, local_rank=None):
    return SimpleNamespace(
        rank=rank,
        size=size,
        gpus_per_node=gpus_per_node,
        node=rank // gpus_per_node if node is None else node,
        local_rank=rank % gpus_per_node if local_rank is None else local_rank,
    )


def test_from_group_defaults_to_tp_over_group():
    m = Mapping.from_group(fake_group(5, 8, 4))
    assert m == Mapping(8, 5, 4, tp_size=8)
    assert m.tp_spans_nodes and (m.node_rank, m.local_rank) == (1, 1)


def test_from_group_with_sizes():
    group = fake_group(13, 16, 8)
    m = Mapping.from_group(group, pp_size=2, moe_ep_size=4, enable_attention_dp=True)
    assert m == Mapping(16, 13, 8, tp_size=8, pp_size=2, moe_ep_size=4, enable_attention_dp=True)
    m = Mapping.from_group(fake_group(3, 8, 8), tp_size=2, cp_size=4)
    assert (m.tp_rank, m.cp_rank, m.pp_rank) == (1, 1, 0)


def test_from_group_invalid():
    with pytest.raises(ValueError, match="pp_size"):
        Mapping.from_group(fake_group(0, 6, 8), pp_size=4)
    with pytest.raises(ValueError, match="pp_size"):
        Mapping.from_group(fake_group(0, 6, 8), pp_size=0)
    with pytest.raises(ValueError, match="world_size"):
        Mapping.from_group(fake_group(0, 6, 8), tp_size=4)
    with pytest.raises(ValueError, match="gpus_per_node"):
        Mapping.from_group(fake_group(0, 6, 0, node=0, local_rank=0))
    # ranks placed round-robin over hosts: the group's nodes are not rank // gpus_per_node
    with pytest.raises(ValueError, match="node-major"):
        Mapping.from_group(fake_group(1, 8, 4, node=1, local_rank=0))


def test_mapping_module_imports_only_the_standard_library():
    # Load mapping.py on its own (not through the package, which imports numpy) and check
    # nothing heavy came with it.
    path = moecomm.mapping.__file__
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('mapping_alone', {path!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert module.Mapping(4, 1, tp_size=4).tp_group == [0, 1, 2, 3]\n"
        "heavy = {'moecomm', 'mpi4py', 'numpy', 'cupy', 'torch'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_the_package_does_not_start_mpi():
    # mpi4py initialises MPI when imported; a program that only uses the package's
    # pure-Python parts (or has not made a group yet) must not start it: under an MPI
    # without a launcher that fails. The group is loaded on first use (not here: this
    # process has no launcher either).
    code = (
        "import sys, moecomm, moecomm.log, moecomm.mapping, moecomm.reference\n"
        "assert moecomm.Mapping(2, 0, tp_size=2).tp_size == 2\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n"
        "assert {'init', 'ProcessGroup', 'default_group'} <= set(moecomm.__all__)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
