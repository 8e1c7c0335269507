"""MoE all-to-all references: static layout and compact expert-major layout."""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ MoE all-to-all (static)

def _hand_routing():
    # ep_size 3, 6 experts -> 2 per rank
    ids = [np.array([[0, 1], [2, 5], [1, -1], [7, 3]], np.int32),   # rank 0
           np.zeros((0, 2), np.int32),                                # rank 1: no tokens
           np.array([[4, 4], [0, 5]], np.int32)]                      # rank 2
    x = [np.arange(len(i) * 2, dtype=np.float32).reshape(-1, 2) + 10 * (s + 1) for s, i in enumerate(ids)]
    return ids, x


def test_a2a_dispatch_hand_example():
    ids, x = _hand_routing()
    recv, counts, routing = ref.moe_a2a_dispatch(ids, [[x[s], ids[s]] for s in range(3)], 6, 3, 4,
                                                 invalid_token_expert_id=-1, expert_id_payload_index=1)
    np.testing.assert_array_equal(counts[0], [2, 0, 1])   # rank0 <- s0 tokens 0,2 ; s2 token 1
    np.testing.assert_array_equal(counts[1], [2, 0, 0])   # rank1 <- s0 tokens 1,3
    np.testing.assert_array_equal(counts[2], [1, 0, 2])   # rank2 <- s0 token 1 ; s2 tokens 0,1
    assert recv[0][0].shape == (3, 4, 2) and recv[0][1].shape == (3, 4, 2)
    np.testing.assert_array_equal(recv[0][0][0, :2], x[0][[0, 2]])
    np.testing.assert_array_equal(recv[0][0][2, :1], x[2][[1]])
    np.testing.assert_array_equal(recv[1][0][0, :2], x[0][[1, 3]])
    np.testing.assert_array_equal(recv[2][0][2, :2], x[2][[0, 1]])
    assert not recv[0][0][0, 2:].any()                     # padding rows
    # sanitized ids: only ids owned by the receiving rank survive, padding is invalid
    np.testing.assert_array_equal(recv[0][1][0, :2], [[0, 1], [1, -1]])
    np.testing.assert_array_equal(recv[1][1][0, :2], [[2, -1], [-1, 3]])
    np.testing.assert_array_equal(recv[2][1][2, :2], [[4, 4], [-1, 5]])
    assert np.all(recv[1][1][1] == -1) and np.all(recv[0][1][0, 2:] == -1)
    np.testing.assert_array_equal(routing.send_slot[0], [[0, -1, -1], [-1, 0, 0], [1, -1, -1], [-1, 1, -1]])
    assert routing.send_slot[1].shape == (0, 3)


def test_a2a_combine_hand_example_and_errors():
    ids, x = _hand_routing()
    recv, counts, routing = ref.moe_a2a_dispatch(ids, [[x[s]] for s in range(3)], 6, 3, 4)
    # rank r returns its received rows times (r + 1)
    payload = [recv[r][0] * np.float32(r + 1) for r in range(3)]
    out = ref.moe_a2a_combine(payload, routing)
    np.testing.assert_array_equal(out[0], [x[0][0] * 1, x[0][1] * (2 + 3), x[0][2] * 1, x[0][3] * 2])
    assert out[1].shape == (0, 2)
    np.testing.assert_array_equal(out[2], [x[2][0] * 3, x[2][1] * (1 + 3)])
    # a token with only invalid experts gets 0
    ids2 = [np.array([[-1, 9]], np.int32)] * 3
    r2, _, rt2 = ref.moe_a2a_dispatch(ids2, [[np.ones((1, 2), np.float32)]] * 3, 6, 3, 1)
    assert not any(o.any() for o in ref.moe_a2a_combine([r[0] for r in r2], rt2))
    with pytest.raises(ValueError):
        ref.moe_a2a_dispatch(ids, [[x[s]] for s in range(3)], 6, 3, 3)   # rank 0 has 4 tokens


def test_a2a_all_to_one_rank_and_round_trip_bf16():
    n, e, t, h = 4, 8, 5, 16
    ids = [np.full((t, 2), 6, np.int32) for _ in range(n)]          # everything to rank 3
    ids[1][:, 1] = 7                                                  # same rank twice
    x = [ref.to_bf16_bits(RNG.standard_normal((t, h)).astype(np.float32)) for _ in range(n)]
    recv, counts, routing = ref.moe_a2a_dispatch(ids, [[a] for a in x], e, n, t)
    for r in range(3):
        assert not counts[r].any()
    np.testing.assert_array_equal(counts[3], [t] * n)
    out = ref.moe_a2a_combine([rv[0] for rv in recv], routing)
    for s in range(n):
        np.testing.assert_array_equal(out[s], x[s])                   # one target: identity
    # random routing: combine(dispatch(x)) == x * number of distinct target ranks
    ids = [RNG.integers(-1, e + 1, (RNG.integers(0, 7), 3)).astype(np.int32) for _ in range(n)]
    x = [ref.to_bf16_bits(RNG.standard_normal((len(i), h)).astype(np.float32)) for i in ids]
    recv, counts, routing = ref.moe_a2a_dispatch(ids, [[a] for a in x], e, n, 6)
    out = ref.moe_a2a_combine([rv[0] for rv in recv], routing)
    for s in range(n):
        cnt = ref.moe_a2a_target_ranks(ids[s], e, n).sum(1).astype(np.float32)
        np.testing.assert_array_equal(out[s], ref.to_bf16_bits(ref.from_bf16_bits(x[s]) * cnt[:, None]))


def test_sanitize_expert_ids():
    ids = np.array([[0, 3, 5], [2, -1, 8]], np.int32)
    np.testing.assert_array_equal(ref.sanitize_expert_ids(ids, 1, 2, -7), [[-7, 3, -7], [2, -7, -7]])
    assert ref.moe_a2a_sanitize_expert_ids is ref.sanitize_expert_ids


# ------------------------------------------------------------------ compact expert-major

def test_compact_dispatch_order_and_combine():
    n, e = 2, 4                                   # experts 0,1 on rank 0; 2,3 on rank 1
    ids = [np.array([[3, 0], [1, 1]], np.int32),  # rank 0: token 1 picks expert 1 twice
           np.array([[0, 2], [-1, 3], [5, 1]], np.int32)]
    w = [np.array([[0.1, 0.2], [0.3, 0.4]], np.float32), np.array([[1, 2], [3, 4], [5, 6]], np.float32)]
    x = [np.array([[1.0], [2.0]], np.float32), np.array([[10.0], [20.0], [30.0]], np.float32)]
    xr, wr, lay = ref.ep_dispatch_compact(x, ids, w, e, n)
    # rank 0: expert 0 <- (0,0,1), (1,0,0); expert 1 <- (0,1,0), (0,1,1), (1,2,1)
    np.testing.assert_array_equal(lay.src[0], [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 2, 1]])
    np.testing.assert_array_equal(lay.tokens_per_expert[0], [2, 3])
    np.testing.assert_array_equal(lay.local_expert[0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(xr[0][:, 0], [1, 10, 2, 2, 30])
    np.testing.assert_allclose(wr[0], [0.2, 1, 0.3, 0.4, 6])
    # rank 1: expert 2 <- (1,0,1); expert 3 <- (0,0,0), (1,1,1)
    np.testing.assert_array_equal(lay.src[1], [[1, 0, 1], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(lay.tokens_per_expert[1], [1, 2])
    # combine: expert "computes" y = x * (global expert id + 1)
    ys = [xr[r] * (lay.local_expert[r][:, None] + r * 2 + 1).astype(np.float32) for r in range(n)]
    out = ref.ep_combine_compact(ys, lay, apply_weights=False)
    np.testing.assert_array_equal(out[0][:, 0], [1 * 4 + 1 * 1, 2 * 2 + 2 * 2])
    np.testing.assert_array_equal(out[1][:, 0], [10 * 1 + 10 * 3, 20 * 4, 30 * 2])
    outw = ref.ep_combine_compact(ys, lay, apply_weights=True)
    want0 = np.float32(np.float32(4.0) * np.float32(0.1)) + np.float32(np.float32(1.0) * np.float32(0.2))
    assert outw[0][0, 0] == want0
    np.testing.assert_array_equal(outw[1][:, 0], [10 * 1 + 30 * 2, 80 * 4, 60 * 6])
    # round trip without weights: y = x gives x * number of valid slots
    back = ref.ep_combine_compact(xr, lay)
    np.testing.assert_array_equal(back[1][:, 0], [20, 20, 30])
    with pytest.raises(ValueError):
        _, _, lay2 = ref.ep_dispatch_compact(x, ids, None, e, n)
        ref.ep_combine_compact(xr, lay2, apply_weights=True)
