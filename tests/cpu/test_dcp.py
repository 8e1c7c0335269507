"""Decode CP all-to-all and LSE combine: the NumPy reference against attention computed
whole, the argument checks made before any launch, workspace sizing."""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402
from moecomm.constants import StatsFormat  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------ reference: all-to-all
def test_alltoall_reference_is_the_transpose_over_ranks():
    rng = np.random.default_rng(1)
    cp, lead, d, s = 3, (2, 5), 8, 4
    o = [rng.standard_normal((*lead, cp, d)).astype(np.float16) for _ in range(cp)]
    st = [rng.standard_normal((*lead, cp, s)).astype(np.float32) for _ in range(cp)]
    o_out, st_out = ref.dcp_alltoall(o, st)
    for r in range(cp):
        assert o_out[r].shape == o[r].shape and st_out[r].shape == st[r].shape
        for src in range(cp):
            for b in np.ndindex(*lead):
                np.testing.assert_array_equal(o_out[r][b][src], o[src][b][r])
                np.testing.assert_array_equal(st_out[r][b][src], st[src][b][r])


def test_alltoall_reference_turns_negative_zero_positive_only():
    o = [np.array([[[-0.0, 1.0], [2.0, -3.0]]], np.float16) for _ in range(2)]
    bits = [np.array([[[0x8000, 0x8001], [0x0001, 0xBF80]]], np.uint16) for _ in range(2)]  # bf16
    st = [np.array([[[-0.0, -1.5], [0.0, np.inf]]], np.float32) for _ in range(2)]
    o_out, st_out = ref.dcp_alltoall(o, st)
    for r, s in ((0, 0), (0, 1)):  # o_out[r][0, s] = o[s][0, r] = [-0.0, 1.0]
        assert o_out[r].view(np.uint16)[0, s, 0] == 0 and o_out[r][0, s, 1] == 1.0
        assert st_out[r].view(np.uint32)[0, s, 0] == 0 and st_out[r][0, s, 1] == -1.5
    np.testing.assert_array_equal(o_out[1][0, 0], [2.0, -3.0])
    assert st_out[1][0, 1, 1] == np.inf
    b_out, _ = ref.dcp_alltoall(bits, st)
    np.testing.assert_array_equal(b_out[0][0, 0], [0x0000, 0x8001])  # only 0x8000 changes
    np.testing.assert_array_equal(b_out[0][0, 1], [0x0000, 0x8001])


def test_alltoall_reference_rejects_mismatched_ranks():
    o = [np.zeros((1, 2, 8), np.float16)] * 2
    with pytest.raises(ValueError, match="cp=3"):
        ref.dcp_alltoall(o + o[:1], [np.zeros((1, 2, 2), np.float32)] * 3)
    with pytest.raises(ValueError, match="softmax_stats"):
        ref.dcp_alltoall(o, [np.zeros((2, 2, 2), np.float32)] * 2)


# ------------------------------------------------------------------ reference: combine
def _sharded_attention(rng, rows, cp, d, n_per_shard, empty=()):
    """Exact attention (float64) of each row over all keys, and per shard the normalised
    partial output and its max / sum-exp / LSE. Shards in ``empty`` have no keys."""
    scores = [rng.standard_normal((rows, n)) * 3 for n in n_per_shard]
    values = [rng.standard_normal((rows, n, d)) for n in n_per_shard]
    kept = [p for p in range(cp) if p not in empty]
    all_s = np.concatenate([scores[p] for p in kept], axis=1)
    all_v = np.concatenate([values[p] for p in kept], axis=1)
    w = np.exp(all_s - all_s.max(1, keepdims=True))
    exact = np.einsum("rn,rnd->rd", w / w.sum(1, keepdims=True), all_v)
    exact_lse = np.log(np.exp(all_s).sum(1))
    o = np.zeros((rows, cp, d))
    m = np.full((rows, cp), -np.inf)
    l = np.zeros((rows, cp))
    for p in kept:
        m[:, p] = scores[p].max(1)
        e = np.exp(scores[p] - m[:, p, None])
        l[:, p] = e.sum(1)
        o[:, p] = np.einsum("rn,rnd->rd", e / l[:, p, None], values[p])
    with np.errstate(divide="ignore"):
        lse = m + np.log(l)
    return exact, exact_lse, o, m, l, lse


@pytest.mark.parametrize("fmt", list(StatsFormat))
@pytest.mark.parametrize("empty", [(), (1,)])
def test_combine_reference_equals_attention_over_all_shards(fmt, empty):
    rng = np.random.default_rng(7)
    rows, cp, d = 6, 4, 16
    exact, exact_lse, o, m, l, lse = _sharded_attention(rng, rows, cp, d, [5, 3, 9, 1], empty)
    stats = np.zeros((rows, cp, 4), np.float32)
    if fmt == StatsFormat.MAX_SUMEXP:
        stats[..., 0], stats[..., 1] = m, l
        want_lse = exact_lse
    elif fmt == StatsFormat.LSE:
        stats[..., 0] = lse
        want_lse = exact_lse
    else:
        stats[..., 0] = lse / np.log(2)
        want_lse = exact_lse / np.log(2)
    stats[..., 2:] = 1e30  # ignored entries
    out, got_lse = ref.lse_combine(o.astype(np.float32), stats, fmt)
    np.testing.assert_allclose(out, exact, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-5, atol=1e-5)
    out16, _ = ref.lse_combine(o.astype(np.float16), stats, fmt)
    assert out16.dtype == np.float16
    np.testing.assert_allclose(out16.astype(np.float32), exact, rtol=2e-3, atol=2e-3)


def test_combine_reference_rounds_once_in_the_output_dtype():
    rng = np.random.default_rng(3)
    o32 = rng.standard_normal((4, 2, 8)).astype(np.float32)
    bits = ref.cast_from_float32(o32, "bf16")
    stats = rng.standard_normal((4, 2, 2)).astype(np.float32)
    out, _ = ref.lse_combine(bits, stats, StatsFormat.LSE)
    assert out.dtype == np.uint16
    want, _ = ref.lse_combine(ref.to_float32(bits), stats, StatsFormat.LSE)
    np.testing.assert_array_equal(out, ref.cast_from_float32(want, "bf16"))


def test_combine_reference_non_finite_partials_have_no_weight():
    o = np.array([[[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]]], np.float32)
    for bad in (-np.inf, np.inf, np.nan):
        stats = np.array([[[0.0, 0], [bad, 0], [0.0, 0]]], np.float32)
        out, lse = ref.lse_combine(o, stats, StatsFormat.LSE)
        np.testing.assert_allclose(out, [[2.0, 3.0]])
        np.testing.assert_allclose(lse, [np.log(2)], rtol=1e-6)
    stats = np.array([[[0.0, 1], [0.0, 0], [0.0, -1]]], np.float32)  # sums 1, 0, -1
    out, lse = ref.lse_combine(o, stats, StatsFormat.MAX_SUMEXP)
    np.testing.assert_allclose(out, [[1.0, 2.0]])
    np.testing.assert_allclose(lse, [0.0])


def test_combine_reference_no_partial_left_is_zero():
    o = np.full((2, 3, 4), np.nan, np.float32)
    stats = np.full((2, 3, 2), -np.inf, np.float32)
    out, lse = ref.lse_combine(o, stats, StatsFormat.LSE_BASE2)
    assert np.all(out == 0) and np.all(lse == -np.inf)


# ------------------------------------------------------------------ checks before launch
dcp = pytest.importorskip("moecomm.dcp")


def test_shape_is_described():
    s = dcp.dcp_shape((3, 32, 2, 128), BF16, (3, 32, 2, 2), np.float32, 2)
    assert (s.rows, s.head_dim, s.stats_dim, s.o_vecs, s.row_vecs, s.row_bytes) == \
        (96, 128, 2, 16, 17, 272)
    assert dcp.dcp_shape((4, 8), np.float16, (4, 6), np.float32, 4).rows == 1
    assert dcp.dcp_shape((0, 2, 8), np.float16, (0, 2, 4), np.float32, 2).rows == 0


@pytest.mark.parametrize("o_shape, o_dtype, s_shape, s_dtype, error, match", [
    ((4, 2, 128), np.float32, (4, 2, 2), np.float32, TypeError, "partial_o: dtype float32"),
    ((4, 2, 128), BF16, (4, 2, 2), np.float16, TypeError, "softmax_stats: dtype float16"),
    ((4, 3, 128), BF16, (4, 3, 2), np.float32, ValueError, "cp_size=2"),
    ((128,), BF16, (2,), np.float32, ValueError, r"partial_o: shape \(128,\)"),
    ((4, 2, 100), BF16, (4, 2, 2), np.float32, ValueError, "D=100 x 2 bytes"),
    ((4, 2, 0), BF16, (4, 2, 2), np.float32, ValueError, "D=0"),
    ((4, 2, 128), BF16, (4, 2, 3), np.float32, ValueError, "S=3 must be even"),
    ((4, 2, 128), BF16, (4, 2, 0), np.float32, ValueError, "S=0"),
    ((4, 2, 128), BF16, (5, 2, 2), np.float32, ValueError, "softmax_stats: shape"),
    ((4, 2, 128), BF16, (2, 2, 2, 2), np.float32, ValueError, "softmax_stats: shape"),
])
def test_bad_shapes_are_named(o_shape, o_dtype, s_shape, s_dtype, error, match):
    with pytest.raises(error, match=match):
        dcp.dcp_shape(o_shape, o_dtype, s_shape, s_dtype, 2)


def test_workspace_size():
    # 3 Lamport buffers x cp slots x max_rows rows of (256 B output + 16 B stats), 256-aligned
    assert dcp.decode_cp_a2a_workspace_size(2, 100, 128, 2, BF16) == 3 * 2 * 27392
    assert dcp.decode_cp_a2a_workspace_size(4, 1, 64, 8, np.float16) == 3 * 4 * 256
    # errors name this function's arguments
    with pytest.raises(ValueError, match="stats_dim=3 must be even"):
        dcp.decode_cp_a2a_workspace_size(2, 16, 128, 3)
    with pytest.raises(ValueError, match="head_dim=100 x 2 bytes"):
        dcp.decode_cp_a2a_workspace_size(2, 16, head_dim=100)
    with pytest.raises(TypeError, match="dtype: float32 is not supported"):
        dcp.decode_cp_a2a_workspace_size(2, 16, dtype=np.float32)
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        dcp.decode_cp_a2a_workspace_size(2, 0)


def test_config_is_checked():
    with pytest.raises(ValueError, match="threads=100"):
        dcp.DcpConfig(threads=100)
    with pytest.raises(ValueError, match="combine_threads=2048"):
        dcp.DcpConfig(combine_threads=2048)
    with pytest.raises(ValueError, match="blocks_per_sm"):
        dcp.DcpConfig(blocks_per_sm=0)
