"""Prepare/finalize and v-collectives on the CPU: the NumPy reference (collectives, the
all-to-all-v plan and transfers, the scaling-expert MoE layer through both paths), the
host-side checks and the factory's choice rule."""

import ml_dtypes
import numpy as np
import pytest

from moecomm import reference as ref
from moecomm.collectives import VCollectiveConfig, check_sizes, gather_layout, scatter_bytes
from moecomm.moe import prepare_finalize as pf


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- collectives
@pytest.mark.parametrize("sizes", [[3, 5], [0, 4], [0, 0], [7, 0, 2, 1]])
def test_all_gatherv_stacks_in_rank_order(sizes):
    rng = _rng()
    xs = [[rng.random((n, 3)).astype(np.float32), rng.integers(-9, 9, (n, 2)).astype(np.int32),
           rng.integers(0, 256, (n, 5)).astype(np.uint8)] for n in sizes]
    got = ref.all_gatherv(xs, sizes)
    for i in range(3):
        assert got[i].shape[0] == sum(sizes)
        row = 0
        for r, n in enumerate(sizes):
            assert np.array_equal(got[i][row:row + n], xs[r][i])
            row += n


def test_all_gatherv_rejects_rows_that_do_not_match_sizes():
    xs = [[np.zeros((2, 4), np.float32)], [np.zeros((3, 4), np.float32)]]
    with pytest.raises(ValueError, match="does not match"):
        ref.all_gatherv(xs, [2, 2])
    with pytest.raises(ValueError, match="2 non-negative"):
        ref.all_gatherv(xs, [2, 3, 1])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_reduce_scatterv_sums_in_rank_order_from_plus_zero(dtype):
    rng = _rng(1)
    sizes = [2, 0, 3]
    x32 = [rng.standard_normal((5, 8)).astype(np.float32) for _ in sizes]
    xs = [ref.cast_from_float32(x, dtype) for x in x32]
    got = ref.reduce_scatterv(xs, sizes)
    offs = [0, 2, 2, 5]
    for r in range(3):
        acc = np.zeros((sizes[r], 8), np.float32)
        for s in range(3):
            acc = acc + ref.to_float32(xs[s])[offs[r]:offs[r + 1]]
        assert np.array_equal(got[r], ref.cast_from_float32(acc, dtype))
        assert got[r].shape == (sizes[r], 8)


def test_reduce_scatterv_order_is_observable():
    """fp32 sums are not associative: the rank order is part of the contract."""
    a = np.array([[1e8]], np.float32)
    b = np.array([[1.0]], np.float32)
    c = np.array([[-1e8]], np.float32)
    assert ref.reduce_scatterv([a, b, c], [1, 0, 0])[0][0, 0] == np.float32(0.0)
    assert ref.reduce_scatterv([a, c, b], [1, 0, 0])[0][0, 0] == np.float32(1.0)


def test_reduce_scatterv_minus_zero_becomes_plus_zero():
    z = np.array([[-0.0]], np.float32)
    out = ref.reduce_scatterv([z, z], [1, 0])[0]
    assert not np.signbit(out[0, 0])


# ---------------------------------------------------------------- all-to-all-v plan
def _routing(seed, T, top_k, E):
    rng = _rng(seed)
    ids = [rng.integers(0, E, (t, top_k)).astype(np.int32) for t in T]
    for a in ids:
        bad = rng.random(a.shape) < 0.15
        a[bad] = rng.choice(np.array([-1, -7, E, E + 5], np.int32), bad.sum())
    weights = [rng.random((t, top_k)).astype(np.float32) for t in T]
    return ids, weights


def test_plan_slots_counts_and_invalid_ids():
    ids = [np.array([[0, 5], [-1, 99], [6, 7], [1, 1]], np.int32),
           np.array([[4, 4]], np.int32)]
    plan = ref.a2a_plan(ids, num_experts=8)   # 2 ranks, 4 experts each
    assert plan.runtime_max == 4
    assert plan.send[0].tolist() == [[True, True], [False, False], [False, True], [True, False]]
    assert plan.send_slot[0].tolist() == [[0, 0], [-1, -1], [-1, 1], [1, -1]]
    assert plan.send_slot[1].tolist() == [[-1, 0]]
    assert plan.recv_counts[0].tolist() == [2, 0]
    assert plan.recv_counts[1].tolist() == [2, 1]


@pytest.mark.parametrize("T", [[5, 3], [0, 6], [4, 0, 2, 7]])
def test_a2a_prepare_layout_sanitized_ids_and_expert_map(T):
    ep, top_k, E = len(T), 3, 4 * len(T)
    ids, weights = _routing(2, T, top_k, E)
    rng = _rng(3)
    x = [rng.integers(0, 256, (t, 16)).astype(np.uint8) for t in T]
    maps = [np.where(np.arange(E) // 4 == r, np.arange(E) % 4 + 100 * r, -1).astype(np.int32)
            for r in range(ep)]
    plan, recv = ref.a2a_prepare(ids, weights, [[a] for a in x], E, expert_maps=maps)
    rmax = plan.runtime_max
    for r in range(ep):
        rx, rids, rw = recv[r]
        assert rx.shape == (ep * rmax, 16) and rids.shape == (ep * rmax, top_k)
        for s in range(ep):
            sent = np.nonzero(plan.send[s][:, r])[0]
            assert plan.recv_counts[r][s] == sent.size
            block = slice(s * rmax, s * rmax + sent.size)
            assert np.array_equal(rx[block], x[s][sent])
            assert np.array_equal(rw[block], weights[s][sent])
            owned = (ids[s][sent] >= 4 * r) & (ids[s][sent] < 4 * r + 4)
            expect = np.where(owned, ids[s][sent] % 4 + 100 * r, -1)
            assert np.array_equal(rids[block], expect)
            assert np.all(rids[s * rmax + sent.size:(s + 1) * rmax] == -1)


def test_a2a_finalize_sums_target_ranks_in_order():
    T, top_k, E = [6, 4], 2, 8
    ids, weights = _routing(4, T, top_k, E)
    rng = _rng(5)
    x = [rng.standard_normal((t, 8)).astype(np.float32) for t in T]
    plan, recv = ref.a2a_prepare(ids, weights, [[a] for a in x], E)
    # rank r's "expert" returns (r + 1) * row
    rows = [recv[r][0] * np.float32(r + 1) for r in range(2)]
    out = ref.a2a_finalize(rows, plan)
    for s in range(2):
        expect = np.zeros_like(x[s])
        for r in range(2):
            expect = expect + np.where(plan.send[s][:, r:r + 1], x[s] * np.float32(r + 1), 0)
        assert np.array_equal(out[s], expect)


def test_apply_router_weight_on_input_rounds_weight_first():
    rng = _rng(6)
    a1 = ref.to_bf16_bits(rng.standard_normal((4, 8)).astype(np.float32))
    w = rng.random((4, 1)).astype(np.float32)
    got = ref.apply_router_weight_on_input(a1, w)
    bf = ml_dtypes.bfloat16
    expect = (a1.view(bf).astype(np.float32) * w.astype(bf).astype(np.float32)).astype(bf)
    assert np.array_equal(got, expect.view(np.uint16))
    with pytest.raises(ValueError, match="top_k == 1"):
        ref.apply_router_weight_on_input(a1, np.ones((4, 2), np.float32))


def _exact_layer(seed, T, top_k=4, E=16, H=32):
    """Inputs whose every product and sum is exact in fp32: power-of-two weights and
    expert scales, small-integer activations."""
    rng = _rng(seed)
    ids, _ = _routing(seed, T, top_k, E)
    weights = [np.float32(2.0) ** rng.integers(-3, 2, (t, top_k)).astype(np.float32) for t in T]
    scale = np.float32(2.0) ** rng.integers(-2, 3, E).astype(np.float32)
    x = [rng.integers(-8, 9, (t, H)).astype(np.float32) for t in T]
    return ids, weights, scale, x


@pytest.mark.parametrize("T", [[9, 5], [0, 7], [3, 8, 0, 6]])
def test_both_paths_compute_the_moe_layer(T):
    ep, E = len(T), 4 * len(T)
    ids, weights, scale, x = _exact_layer(7, T, E=E)
    expect = ref.moe_layer(x, ids, weights, scale)
    owned = [np.arange(E) // (E // ep) == r for r in range(ep)]
    # all-gather path: every rank computes its experts on every token, reduce-scatter back
    xg, ig, wg = ref.all_gatherv([[x[s], ids[s], weights[s]] for s in range(ep)], T)
    partial = [ref.scaled_experts(xg, ig, wg, scale, owned[r]) for r in range(ep)]
    ag = ref.reduce_scatterv(partial, T)
    # all-to-all-v path: received ids are -1 where not owned, so any mask of them works
    plan, recv = ref.a2a_prepare(ids, weights, [[a] for a in x], E)
    rows = [ref.scaled_experts(recv[r][0], recv[r][1], recv[r][2], scale, owned[r])
            for r in range(ep)]
    a2a = ref.a2a_finalize(rows, plan)
    for s in range(ep):
        assert np.array_equal(ag[s], expect[s])      # values (a -0 may read +0)
        assert np.array_equal(a2a[s], expect[s])
        assert np.array_equal(ag[s].view(np.uint32), a2a[s].view(np.uint32))


# ---------------------------------------------------------------- host-side checks
def test_check_sizes():
    assert check_sizes([1, np.int64(0)], 2) == (1, 0)
    with pytest.raises(ValueError, match="3 row counts for a group of 2"):
        check_sizes([1, 2, 3], 2)
    with pytest.raises(ValueError, match=r"sizes\[1\]=-1 is negative"):
        check_sizes([1, -1], 2)
    with pytest.raises(TypeError, match=r"sizes\[0\]: expected an int"):
        check_sizes([1.5, 2], 2)
    with pytest.raises(TypeError, match="sequence"):
        check_sizes(4, 2)


def test_workspace_layouts():
    offs, total = gather_layout([3, 1], [32, 1])
    assert offs == [0, 256] and total == 512
    assert scatter_bytes([3, 0, 5], 64) == 3 * 5 * 64


def test_vcollective_config_checks():
    with pytest.raises(ValueError, match="multiple of 32"):
        VCollectiveConfig(threads=100)
    with pytest.raises(ValueError, match="at most"):
        VCollectiveConfig(max_blocks=100000)
    cfg = VCollectiveConfig(bytes_per_block=1024)
    assert cfg.grid(0, 132) == 1 and cfg.grid(10 * 1024, 132) == 10
    assert cfg.grid(1 << 30, 132) == 132


def test_quant_config_checks():
    assert pf.FusedMoEQuantConfig("NVFP4", a1_gscale=object()).quant_dtype == "nvfp4"
    assert pf.FusedMoEQuantConfig("fp8", a1_gscale=object()).per_tensor
    assert pf.FusedMoEQuantConfig("fp8", a1_gscale=object(), per_act_token_quant=True).per_tensor
    assert not pf.FusedMoEQuantConfig("fp8", per_act_token_quant=True).per_tensor
    assert not pf.FusedMoEQuantConfig("fp8", a1_gscale=object(), block_shape=[1, 128]).per_tensor
    with pytest.raises(ValueError, match="fp8 needs a1_gscale"):
        pf.FusedMoEQuantConfig("fp8")
    with pytest.raises(ValueError, match="a1_gscale"):
        pf.FusedMoEQuantConfig("nvfp4")
    with pytest.raises(ValueError, match="expected None, 'fp8' or 'nvfp4'"):
        pf.FusedMoEQuantConfig("int4")


def test_factory_choice_rule(monkeypatch):
    made = []
    monkeypatch.setattr(pf, "FlashInferAllGatherMoEPrepareAndFinalize",
                        lambda use_dp, **kw: made.append(("ag", use_dp, kw)) or "ag")
    monkeypatch.setattr(pf, "FlashInferAllToAllMoEPrepareAndFinalize",
                        lambda use_dp, **kw: made.append(("a2a", use_dp, kw)) or "a2a")
    assert pf.create_prepare_finalize(True, use_nvfp4=True, enable_alltoallv=True, top_k=8) == "a2a"
    assert pf.create_prepare_finalize(True, use_nvfp4=True) == "ag"
    assert pf.create_prepare_finalize(False, use_nvfp4=False, enable_alltoallv=True) == "ag"
    assert pf.create_flashinfer_prepare_finalize(True, True, True) == "a2a"
    assert made[0] == ("a2a", True, {"top_k": 8})
