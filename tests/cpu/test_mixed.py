"""Mixed communication without a GPU: the TP x DP layout and its validation, the source
tables every mode sums in world-rank order, and the NumPy reference."""

import itertools

import numpy as np
import pytest

from moecomm import reference
from moecomm.constants import MixedCommOp
from moecomm.mixed import (MixedCommConfig, MixedCommHandler, MixedCommMode, MixedLayout,
                           run_mixed_comm)

LAYOUTS = [  # (world, local, sizes)
    (2, 2, {"tp_size": 2}), (2, 2, {"dp_size": 2}), (2, 1, {"tp_size": 2}),
    (2, 1, {"dp_size": 2}), (4, 2, {"tp_size": 2, "dp_size": 2}),
    (4, 4, {"local_tp_size": 2}), (4, 2, {"local_tp_size": 1, "inter_tp_size": 2}),
    (8, 4, {"local_tp_size": 2, "inter_tp_size": 1}), (8, 2, {"tp_size": 4}),
    (16, 4, {"local_dp_size": 2, "inter_dp_size": 2}), (6, 3, {"tp_size": 3}),
]


def layouts():
    return [MixedLayout.resolve(w, l, **kw) for w, l, kw in LAYOUTS]


def test_defaults_are_all_tp():
    lay = MixedLayout.resolve(8, 4)
    assert (lay.tp_size, lay.dp_size, lay.local_tp_size, lay.inter_tp_size) == (8, 1, 4, 2)


@pytest.mark.parametrize("lay", layouts(), ids=str)
def test_coordinates_round_trip_and_groups_partition(lay):
    assert lay.tp_size * lay.dp_size == lay.world_size
    seen = set()
    for r in range(lay.world_size):
        t, d = lay.coords(r)
        assert 0 <= t < lay.tp_size and 0 <= d < lay.dp_size
        assert lay.rank(t, d) == r
        seen.add((t, d))
    assert len(seen) == lay.world_size
    for groups in (lay.tp_groups(), lay.dp_groups()):
        assert sorted(itertools.chain(*groups)) == list(range(lay.world_size))
        assert all(g == sorted(g) for g in groups), "group order is world-rank order"
    # FlashInfer's rule: inside a node TP is fastest.
    for r in range(lay.world_size):
        local = r % lay.local_size
        t, d = lay.coords(r)
        assert t % lay.local_tp_size == local % lay.local_tp_size
        assert d % lay.local_dp_size == local // lay.local_tp_size


def test_tp_dp_pack_tp_inside_nodes():
    lay = MixedLayout.resolve(8, 2, tp_size=4, dp_size=2)
    assert (lay.local_tp_size, lay.inter_tp_size, lay.local_dp_size, lay.inter_dp_size) == (2, 2, 1, 2)
    lay = MixedLayout.resolve(8, 4, tp_size=2)
    assert (lay.local_tp_size, lay.local_dp_size, lay.inter_dp_size) == (2, 2, 2)


@pytest.mark.parametrize("args, kwargs, match", [
    ((4, 2), {"tp_size": 3}, "does not divide 4 ranks"),
    ((4, 2), {"tp_size": 2, "dp_size": 3}, r"TP x DP = 2 x 3 = 6 does not match"),
    ((4, 4), {"local_tp_size": 3, "local_dp_size": 1}, r"TP x DP = 3 x 1 = 3 does not match its 4"),
    ((8, 4), {"inter_tp_size": 2, "inter_dp_size": 2}, "2 nodes"),
    ((6, 4), {}, "not a multiple of local_size"),
    ((12, 4), {"tp_size": 6}, "neither divides"),
    ((32, 8), {}, "up to 16 ranks"),
    ((4, 2), {"tp_size": 2, "local_tp_size": 2}, "not both"),
    ((4, 2), {"tp_size": 0}, "tp_size must be >= 1"),
])
def test_bad_layouts(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixedLayout.resolve(*args, **kwargs)


def test_sizes_must_be_ints():
    with pytest.raises(TypeError, match="tp_size must be an int"):
        MixedLayout.resolve(4, 2, tp_size=2.0)


@pytest.mark.parametrize("lay", layouts(), ids=str)
@pytest.mark.parametrize("op", list(MixedCommOp), ids=lambda o: o.name)
def test_sources_and_receivers_agree(lay, op):
    """Rank q sums block b of rank r exactly when r pushes block b to q."""
    in_blocks, out_blocks = lay.blocks(op)
    for r in range(lay.world_size):
        pushes = lay.receivers(op, r)
        assert len(pushes) == in_blocks
        for q in range(lay.world_size):
            lists, block = lay.sources(op, q)
            assert len(lists) == out_blocks
            assert all(s == sorted(set(s)) and s for s in lists)
            reads = any(r in s for s in lists)
            assert reads == (q in pushes[block])
            assert all(q not in pushes[j] for j in range(in_blocks) if j != block)


def _handler(lay, rank):
    """A handler's host side only (no group, no GPU): enough for its launch tables."""
    h = MixedCommHandler.__new__(MixedCommHandler)
    h.layout, h.rank, h._plans = lay, rank, {}
    h.tp_rank, h.dp_rank = lay.coords(rank)
    return h


def _unpack(word, count):
    return [(word >> (4 * k)) & 0xF for k in range(count)]


@pytest.mark.parametrize("lay", layouts(), ids=str)
@pytest.mark.parametrize("op", list(MixedCommOp), ids=lambda o: o.name)
def test_every_mode_sums_the_same_ranks_in_world_order(lay, op):
    """Decode each mode's rows back to world ranks: all equal the reference's sets,
    ascending (determinism by construction)."""
    T, D = lay.tp_size, lay.dp_size
    for rank in range(lay.world_size):
        h = _handler(lay, rank)
        t, d = lay.coords(rank)
        want, _ = lay.sources(op, rank)
        for mode in (MixedCommMode.FUSED, MixedCommMode.NCCL_ONE, MixedCommMode.NCCL_TP_DP):
            in_blocks, out_blocks, in_block, push, counts, packed = h._plan(op, mode)
            assert list(counts[out_blocks:]) == [0] * (16 - out_blocks)
            rows = [_unpack(w, c) for w, c in zip(packed[:out_blocks], counts[:out_blocks])]
            if mode == MixedCommMode.FUSED:
                assert [[q for q in range(16) if m >> q & 1] for m in push[:in_blocks]] == \
                    lay.receivers(op, rank)
            if mode != MixedCommMode.NCCL_TP_DP:
                assert rows == want
                continue
            # what the per-axis calls put in staged row i
            if op in (MixedCommOp.ALLREDUCE, MixedCommOp.ALLREDUCE_ALLGATHER):
                who = lambda i: lay.rank(i, d)  # noqa: E731
                want_here = [want[d]] if op == MixedCommOp.ALLREDUCE_ALLGATHER else want
            elif op == MixedCommOp.ALLGATHER:
                who, want_here = (lambda i: lay.rank(t, i)), want
            elif op == MixedCommOp.REDUCESCATTER:
                who, want_here = (lambda i: lay.rank(t, i)), want
            else:
                who, want_here = (lambda i: lay.rank(i // D, i % D)), want
            assert [[who(i) for i in r] for r in rows] == want_here


def test_reference_definitions():
    """The reference against the op definitions, on integer data (exact sums) and -0.0."""
    lay = MixedLayout.resolve(4, 2, tp_size=2, dp_size=2)
    tp = [lay.coords(r)[0] for r in range(4)]
    dp = [lay.coords(r)[1] for r in range(4)]
    rng = np.random.default_rng(0)
    xs = [rng.integers(-50, 50, (4, 8)).astype(np.float32) for _ in range(4)]
    xs[0][0, 0] = -0.0
    ar = reference.mixed_comm(MixedCommOp.ALLREDUCE, xs, tp, dp)
    ag = reference.mixed_comm(MixedCommOp.ALLGATHER, xs, tp, dp)
    rs = reference.mixed_comm(MixedCommOp.REDUCESCATTER, xs, tp, dp)
    arag = reference.mixed_comm(MixedCommOp.ALLREDUCE_ALLGATHER, xs, tp, dp)
    rsar = reference.mixed_comm(MixedCommOp.REDUCESCATTER_ALLREDUCE, xs, tp, dp)
    for r in range(4):
        t, d = lay.coords(r)
        same_dp = [s for s in range(4) if dp[s] == d]
        np.testing.assert_array_equal(ar[r], sum(xs[s] for s in same_dp))
        np.testing.assert_array_equal(ag[r], np.concatenate([xs[lay.rank(t, i)] for i in range(2)]))
        np.testing.assert_array_equal(rs[r], sum(xs[lay.rank(t, e)][2 * d:2 * d + 2] for e in range(2)))
        np.testing.assert_array_equal(arag[r], np.concatenate([ar[lay.rank(0, i)] for i in range(2)]))
        np.testing.assert_array_equal(rsar[r], sum(x[2 * d:2 * d + 2] for x in xs))
    # ALLGATHER is a one-input sum: -0.0 arrives as +0.0
    holder = [r for r in range(4) if tp[r] == tp[0]]
    for r in holder:
        assert ag[r][0, 0] == 0 and not np.signbit(ag[r][0, 0])


def test_reference_rounds_once_in_rank_order():
    """bf16: the fp32 sum of all sources is rounded once (not per axis)."""
    lay = MixedLayout.resolve(4, 4, tp_size=2, dp_size=2)
    tp = [lay.coords(r)[0] for r in range(4)]
    dp = [lay.coords(r)[1] for r in range(4)]
    one, tiny = np.float32(1.0), np.float32(2.0 ** -9)  # tiny < half an ulp of 1.0 in bf16
    xs = [np.full((2, 8), v, np.float32) for v in (one, tiny, tiny, tiny)]
    bits = [reference.cast_from_float32(x, "bf16") for x in xs]
    out = reference.mixed_comm(MixedCommOp.REDUCESCATTER_ALLREDUCE, bits, tp, dp)
    want = reference.cast_from_float32(np.full((1, 8), one + 3 * tiny, np.float32), "bf16")
    for o in out:
        np.testing.assert_array_equal(o, want)


def test_reference_refuses_ragged_blocks():
    with pytest.raises(ValueError, match="do not split"):
        reference.mixed_comm(MixedCommOp.REDUCESCATTER, [np.zeros((3, 8), np.float32)] * 2,
                             [0, 0], [0, 1])


def test_modes_and_config():
    assert [int(m) for m in MixedCommMode] == [0, 6, 7, 8]
    assert [int(o) for o in MixedCommOp] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="multiple of 32"):
        MixedCommConfig(threads=100)
    with pytest.raises(TypeError, match="AllReduceConfig"):
        MixedCommConfig(allreduce=3)
    with pytest.raises(TypeError, match="expected a MixedCommHandler"):
        run_mixed_comm(MixedCommOp.ALLREDUCE, object(), None)


def test_choose_refuses_unknown_modes():
    h = _handler(MixedLayout.resolve(2, 2, tp_size=2), 0)
    h.workspace, h.config, h.group = None, MixedCommConfig(), None
    with pytest.raises(ValueError, match="not a MixedCommMode"):
        h.choose(MixedCommOp.ALLREDUCE, 16, 5)
    assert h.choose(MixedCommOp.ALLREDUCE, 16) == MixedCommMode.NCCL_ONE
