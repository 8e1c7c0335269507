"""The kernels' argument structs (``kernels_cu/args.cuh``), mirrored field for field.

One ``ctypes.Structure`` per CUDA struct, same name, same field order and types; ctypes
lays them out as the C compiler does (natural alignment). ``tests/cpu/test_kernel_args.py``
parses ``args.cuh`` and checks every struct here against it. Pure ctypes: no CuPy.
"""

from __future__ import annotations

import ctypes

from .constants import (A2A_MAX_PAYLOADS, A2A_MAX_RANKS, A2A_PLAN_MAX_RANKS, AR_MAX_RANKS,
                        BARRIER_MAX_RANKS, VC_MAX_RANKS, VC_MAX_TENSORS)

_ptr = ctypes.c_void_p
_u64, _i64 = ctypes.c_uint64, ctypes.c_int64
_u32, _i32 = ctypes.c_uint32, ctypes.c_int32
_f32 = ctypes.c_float


def _fields(*spec):
    """``("a b c", type), ...`` -> ctypes ``_fields_``."""
    return [(name, ctype) for names, ctype in spec for name in names.split()]


class ArWorkspace(ctypes.Structure):
    _fields_ = _fields(("peers", _u64 * AR_MAX_RANKS), ("state error_word", _ptr),
                       ("timeout_ns lamport_off lamport_slot rs_off rs_slot ag_off flag_off", _u64),
                       ("rank world", _i32))


class AllReduceArgs(ctypes.Structure):
    _fields_ = _fields(("in_ out", _ptr), ("n", _u64), ("chunk_vecs push_blocks", _u32),
                       ("ws", ArWorkspace))


class MixedArgs(ctypes.Structure):
    _fields_ = _fields(("in_ out staged", _ptr), ("unit row_elems", _u64),
                       ("in_blocks out_blocks in_block", _u32),
                       ("push_mask src_count", _u32 * AR_MAX_RANKS),
                       ("src_rows", _u64 * AR_MAX_RANKS), ("ws", ArWorkspace))


class RegAllReduceArgs(ctypes.Structure):
    _fields_ = _fields(("table out", _ptr), ("offset n", _u64), ("ws", ArWorkspace))


class FusionArgs(ctypes.Structure):
    _fields_ = _fields(
        ("input residual_in gamma scale allreduce_out residual_out norm_out quant_out scale_out "
         "moe_rows moe_scale moe_extra moe_index", _ptr),
        ("tokens", _u64), ("hidden source", _u32), ("eps weight_bias", _f32),
        ("group_size swizzled moe_count moe_scale_fp32", _u32), ("routed_scaling", _f32),
        ("push_blocks", _u32), ("ws", ArWorkspace))


class A2aWorkspace(ctypes.Structure):
    _fields_ = _fields(("peers", _u64 * A2A_MAX_RANKS), ("state error_word", _ptr),
                       ("timeout_ns", _u64), ("rank ep_size", _i32))


class DispatchArgs(ctypes.Structure):
    _fields_ = _fields(
        ("experts send_slot recv_counts route_slot route_total chunk_counts", _ptr),
        ("src", _u64 * A2A_MAX_PAYLOADS), ("row_bytes", _u64 * A2A_MAX_PAYLOADS),
        ("recv_off", _u64 * A2A_MAX_PAYLOADS), ("scale_off scale_row_bytes", _u64),
        ("num_tokens top_k num_experts experts_per_rank runtime_max num_payloads id_payload "
         "invalid_id quant_payload scale_format route_mode", _i32),
        ("ws", A2aWorkspace))


class CombineArgs(ctypes.Structure):
    _fields_ = _fields(("payload out send_slot recv_counts", _ptr),
                       ("region_off row_bytes", _u64), ("num_tokens runtime_max stage", _i32),
                       ("ws", A2aWorkspace))


class SanitizeArgs(ctypes.Structure):
    _fields_ = _fields(("ids counts", _ptr), ("ep_size runtime_max width", _i64),
                       ("lo hi invalid", _i32))


class CompactDispatchArgs(ctypes.Structure):
    _fields_ = _fields(
        ("ids tok x w recv_counts recv_x recv_w src inv", _ptr), ("peers", _u64 * A2A_MAX_RANKS),
        ("codes_off", _i64), ("ids_in ids_copy", _ptr), ("num_tokens", _i64),
        ("stats tokens_per_expert offsets", _ptr),
        ("ep_size rank experts_per_rank top_k runtime_max capacity row_bytes slices", _i64))


class CompactPullArgs(ctypes.Structure):
    _fields_ = _fields(("peers", _u64 * A2A_MAX_RANKS), ("ids codes out", _ptr),
                       ("y_off w_off num_tokens top_k experts_per_rank row_bytes capacity "
                        "apply_weights", _i64), ("ws", A2aWorkspace))


class CompactReduceArgs(ctypes.Structure):
    _fields_ = _fields(("y recv_w inv recv_counts payload", _ptr),
                       ("ep_size runtime_max top_k row_bytes capacity apply_weights", _i64))


class CompactStageArgs(ctypes.Structure):
    _fields_ = _fields(("y dst stats", _ptr), ("row_bytes capacity", _i64))


class DcpArgs(ctypes.Structure):
    _fields_ = _fields(("o_in stats_in o_out stats_out", _ptr), ("rows", _u64),
                       ("o_vecs stats_dim row_vecs", _u32), ("ws", ArWorkspace))


class DcpCombineArgs(ctypes.Structure):
    _fields_ = _fields(("o stats out lse_out", _ptr), ("rows", _u64),
                       ("o_vecs stats_dim cp format", _u32))


class BarrierArgs(ctypes.Structure):
    _fields_ = _fields(("peers", _u64 * BARRIER_MAX_RANKS), ("state error_word", _ptr),
                       ("timeout_ns", _u64), ("rank world", _i32))


class VcWorkspace(ctypes.Structure):
    _fields_ = _fields(("peers", _u64 * VC_MAX_RANKS), ("state error_word", _ptr),
                       ("timeout_ns data_off buffer_bytes", _u64), ("rank world", _i32))


class AllGathervArgs(ctypes.Structure):
    _fields_ = _fields(("src dst row_bytes region_off", _u64 * VC_MAX_TENSORS),
                       ("item_bytes", _u64), ("rows", _i64 * VC_MAX_RANKS), ("num_tensors", _i64),
                       ("ws", VcWorkspace), ("lamport", ArWorkspace))


class ReduceScattervArgs(ctypes.Structure):
    _fields_ = _fields(("in_ out", _ptr), ("rows", _i64 * VC_MAX_RANKS),
                       ("row_bytes item_bytes", _i64), ("ws", VcWorkspace),
                       ("lamport", ArWorkspace))


class StackReduceArgs(ctypes.Structure):
    _fields_ = _fields(("in_ out", _ptr), ("nvec slots", _i64))


class MapIdsArgs(ctypes.Structure):
    _fields_ = _fields(("ids expert_map", _ptr), ("n num_experts", _i64))


class ScaleRowsArgs(ctypes.Structure):
    _fields_ = _fields(("x w", _ptr), ("tokens cols", _i64))


class A2aPlanArgs(ctypes.Structure):
    _fields_ = _fields(("ids inv src_row", _ptr), ("rows", _i64 * A2A_PLAN_MAX_RANKS),
                       ("top_k num_experts experts_per_rank rank runtime_max", _i64))


class A2aTakeRowsArgs(ctypes.Structure):
    _fields_ = _fields(("src dst row_bytes", _u64 * A2A_MAX_PAYLOADS), ("src_row", _ptr),
                       ("n_rows num_payloads id_payload lo hi", _i64))


class A2aPutRowsArgs(ctypes.Structure):
    _fields_ = _fields(("y z inv", _ptr), ("total row_bytes", _i64))


class QuantArgs(ctypes.Structure):
    _fields_ = _fields(("x q scale_out scale", _ptr), ("rows", _u64),
                       ("cols group_size swizzled ue8m0", _u32))


class FillArgs(ctypes.Structure):
    _fields_ = _fields(("dst", _ptr), ("nbytes", _u64), ("word", _u32))


class CopyArgs(ctypes.Structure):
    _fields_ = _fields(("dst src", _ptr), ("nbytes", _u64))


class GatherArgs(ctypes.Structure):
    _fields_ = _fields(("peer_ptrs out", _ptr), ("offset nbytes", _u64), ("num_peers", _i32))


# ``in`` is a Python keyword: the CUDA field ``in`` is ``in_`` here.
CUDA_NAMES = {"in_": "in"}
