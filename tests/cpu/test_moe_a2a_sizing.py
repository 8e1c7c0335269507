"""MoeAlltoAll without a GPU: workspace sizing, receive layout, kernel argument structs."""

import re

import numpy as np
import pytest

a2a = pytest.importorskip("moecomm.moe.alltoall", reason="CuPy is not installed")
from tests.cuda_source import kernel_source  # noqa: E402

MoeAlltoAll = a2a.MoeAlltoAll


def test_workspace_size_formula():
    # header + 8 payload alignments of 256 + ep*max*(dispatch + combine bytes/token),
    # dispatch = bf16 hidden + int32 ids + fp32 weights, combine = bf16 hidden.
    rows = 4 * 128
    expected = a2a.HEADER_BYTES + 8 * 256 + rows * ((2 * 7168 + 4 * 8 + 4 * 8) + 2 * 7168)
    assert expected % 256 == 0
    assert MoeAlltoAll.get_moe_workspace_size_per_rank(4, 8, 128, 7168) == expected
    extra = MoeAlltoAll.get_moe_workspace_size_per_rank(4, 8, 128, 7168, 7168 + 224)
    assert extra == expected + rows * (7168 + 224)
    assert a2a.moe_a2a_get_workspace_size_per_rank(2, 10, 100, 36) % 256 == 0


@pytest.mark.parametrize("ep,top_k,max_tokens,hidden", [
    (1, 1, 1, 8), (2, 8, 1, 7168), (4, 8, 4096, 7168), (8, 6, 333, 2880), (32, 2, 17, 64)])
def test_size_covers_the_payloads_it_promises(ep, top_k, max_tokens, hidden):
    size = MoeAlltoAll.get_moe_workspace_size_per_rank(ep, top_k, max_tokens, hidden)
    rows = [2 * hidden, 4 * top_k, 4 * top_k]
    for rmax in (1, max_tokens // 2 or 1, max_tokens):
        plan = a2a.plan_dispatch(ep, rmax, rows)
        assert plan.combine_end(2 * hidden) <= size
    # fp8 hidden + fp32 scales per 128 elements, as extra bytes
    extra = hidden + 4 * -(-hidden // 128)
    size = MoeAlltoAll.get_moe_workspace_size_per_rank(ep, top_k, max_tokens, hidden, extra)
    plan = a2a.plan_dispatch(ep, max_tokens, rows + [hidden, 4 * -(-hidden // 128)])
    assert plan.combine_end(2 * hidden) <= size
    # eight tiny payloads: the alignment slack is covered too
    size = a2a.moe_a2a_get_workspace_size_per_rank(ep, max_tokens, 8 * 4, 16)
    assert a2a.plan_dispatch(ep, max_tokens, [4] * 8).combine_end(16) <= size


def test_plan_layout():
    plan = a2a.plan_dispatch(4, 10, [512, 24, 8, 32])
    assert plan.recv_off[0] == a2a.HEADER_BYTES
    for off, nxt, rb in zip(plan.recv_off, plan.recv_off[1:] + (plan.combine_off,), plan.row_bytes):
        assert off % 256 == 0 and nxt >= off + 4 * 10 * rb
    assert plan.combine_off % 256 == 0
    assert plan.combine_end(64) == plan.combine_off + 4 * 10 * 64


@pytest.mark.parametrize("rows,match", [
    ([], "expected 1 to 8"), ([4] * 9, "expected 1 to 8"),
    ([512, 6], r"input_payloads\[1\]: 6 bytes per token.*multiple of 4"),
    ([0], r"input_payloads\[0\]: 0 bytes")])
def test_plan_rejects(rows, match):
    with pytest.raises(ValueError, match=match):
        a2a.plan_dispatch(2, 4, rows)


def test_sizing_arguments():
    with pytest.raises(ValueError, match="ep_size must be >= 1"):
        MoeAlltoAll.get_moe_workspace_size_per_rank(0, 8, 128, 7168)
    with pytest.raises(ValueError, match="hidden_size must be >= 1"):
        MoeAlltoAll.get_moe_workspace_size_per_rank(2, 8, 128, 0)
    with pytest.raises(ValueError, match="extra_payload_bytes_per_token must be >= 0"):
        MoeAlltoAll.get_moe_workspace_size_per_rank(2, 8, 128, 64, -1)
    with pytest.raises(TypeError, match="top_k must be an int"):
        MoeAlltoAll.get_moe_workspace_size_per_rank(2, 8.0, 128, 64)


def test_limits_come_from_constants():
    from moecomm import constants

    assert (a2a.MAX_RANKS, a2a.MAX_PAYLOADS, a2a.HEADER_BYTES) == (
        constants.A2A_MAX_RANKS, constants.A2A_MAX_PAYLOADS, constants.A2A_HEADER_BYTES)
    assert {constants.ErrorCode.A2A_DISPATCH.op, constants.ErrorCode.A2A_COMBINE.op} == {
        "MoeAlltoAll.dispatch", "MoeAlltoAll.combine"}


def test_header_fits():
    source = kernel_source("a2a.cuh")
    offs = dict(re.findall(r"constexpr size_t (k\w+Off) = (\d+);", source))
    assert int(offs["kRecvCountOff"]) + 4 * a2a.MAX_RANKS <= a2a.HEADER_BYTES
    assert int(offs["kCombineCountOff"]) + 4 * a2a.MAX_RANKS <= int(offs["kRecvCountOff"])
    assert int(offs["kDispatchCountOff"]) + 4 * a2a.MAX_RANKS <= int(offs["kCombineCountOff"])


# ---------------------------------------------------------------- fp8 dispatch
@pytest.mark.parametrize("fmt,hidden,width", [
    ("fp32", 128, 1), ("fp32", 7168, 56), ("ue8m0", 128, 1), ("ue8m0", 384, 1),
    ("ue8m0", 512, 1), ("ue8m0", 640, 2), ("ue8m0", 7168, 14)])
def test_fp8_scale_layout(fmt, hidden, width):
    q = a2a.Fp8Dispatch(scale_format=fmt)
    assert (q.payload_index, q.group_size) == (0, 128)
    assert q.scale_width(hidden) == width
    assert q.scale_dtype == (np.float32 if fmt == "fp32" else np.int32)
    assert q.bytes_per_token(hidden) == hidden + 4 * width  # half the bf16 row, plus scales


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(scale_format="e8m0"), ValueError, "scale_format='e8m0'"),
    (dict(group_size=64), ValueError, "only 128"),
    (dict(payload_index=-1), ValueError, "payload_index must be >= 0"),
    (dict(payload_index=True), TypeError, "payload_index must be an int")])
def test_fp8_option_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        a2a.Fp8Dispatch(**kwargs)


def test_fp8_hidden_must_be_whole_groups():
    q = a2a.Fp8Dispatch()
    with pytest.raises(ValueError, match="200 elements per token is not a multiple of the fp8 "
                                         "group_size=128"):
        q.scale_width(200)
    with pytest.raises(ValueError, match="not a multiple"):
        MoeAlltoAll.get_moe_workspace_size_per_rank(2, 8, 16, 200, quantize=q)
    with pytest.raises(TypeError, match="quantize: expected an Fp8Dispatch"):
        MoeAlltoAll.get_moe_workspace_size_per_rank(2, 8, 16, 256, quantize="fp8")


@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("ep,top_k,max_tokens,hidden", [
    (1, 1, 1, 128), (2, 8, 1, 7168), (4, 8, 4096, 7168), (8, 6, 333, 2944), (32, 2, 17, 384)])
def test_fp8_workspace_size(fmt, ep, top_k, max_tokens, hidden):
    q = a2a.Fp8Dispatch(scale_format=fmt)
    size = MoeAlltoAll.get_moe_workspace_size_per_rank(ep, top_k, max_tokens, hidden, quantize=q)
    bf16 = MoeAlltoAll.get_moe_workspace_size_per_rank(ep, top_k, max_tokens, hidden)
    rows = ep * max_tokens
    per_token = q.bytes_per_token(hidden) + 8 * top_k + 2 * hidden  # fp8 + ids/weights + combine
    header = a2a.HEADER_BYTES
    assert size == -(-(header + 8 * 256 + rows * per_token) // 256) * 256
    assert size < bf16
    # What dispatch lays out: codes in the payload's place, the scales last, each at a
    # 256-byte boundary; then a bf16 combine region.
    for rmax in (1, max_tokens // 2 or 1, max_tokens):
        plan = a2a.plan_dispatch(ep, rmax, [hidden, 4 * top_k, 4 * top_k,
                                            4 * q.scale_width(hidden)])
        assert plan.combine_end(2 * hidden) <= size
    extra = MoeAlltoAll.get_moe_workspace_size_per_rank(ep, top_k, max_tokens, hidden, 64,
                                                        quantize=q)
    assert extra == -(-(header + 8 * 256 + rows * (per_token + 64)) // 256) * 256


def test_fp8_rows_and_kernel():
    assert a2a.Fp8Rows._fields == ("codes", "scales")
    source = kernel_source("moe_a2a.cu")
    bound = re.search(r"__launch_bounds__\((\d+)\) moe_a2a_dispatch_fp8\(", source)
    assert bound and int(bound.group(1)) >= a2a.MoeAlltoAllConfig().dispatch_threads
    assert a2a._SCALE_FORMATS == {"fp32": 0, "ue8m0": 1}  # scale_format in DispatchArgs


def test_config_combine_options():
    cfg = a2a.MoeAlltoAllConfig()
    assert cfg.combine_threads is None and cfg.combine_ring is None
    a2a.MoeAlltoAllConfig(combine_threads=64, combine_ring=True)
    for bad in (48, 0, 1024):
        with pytest.raises(ValueError, match="combine_threads"):
            a2a.MoeAlltoAllConfig(combine_threads=bad)

