"""Fused all-reduce: all-reduce + residual add + RMSNorm (+ quantization) in one kernel.

``allreduce_fusion(input, workspace, pattern, options, outputs)`` is what a
tensor-parallel layer calls after its attention and MLP projections. With ``x`` the
all-reduced ``input`` ([token_num, hidden], bf16 or fp16):

- ``allreduce_out = x``; ``residual_out = x + residual``;
- ``norm_out = (gamma + weight_bias) * r * rsqrt(mean(r^2) + eps)`` with ``r = residual_out``;
- quantization of ``norm_out``: static FP8 e4m3 (``q = sat(norm * scale_factor)``), NVFP4
  (16-element blocks, e4m3 block scales, 128x4 swizzled or linear), per-token-group FP8
  with packed UE8M0 scales, or dynamic per-token FP8 (``scale_out[t] = max(amax/448,
  2^-9/448)``).

Rounding points are those of ``moecomm.reference`` (each intermediate rounded to the I/O
dtype where the unfused ops would round; quantizers read the rounded ``norm_out``).
Output layouts:

- ``quant_out``: uint8 (or float8_e4m3fn) ``[T, H]`` codes; NVFP4: uint8 ``[T, H/2]``, two
  e2m1 codes per byte, the even element in the low nibble.
- ``scale_out``: NVFP4 swizzled: uint8 of ``compute_fp4_swizzled_layout_sf_size(T, H/16)``
  bytes (padding written as 0); NVFP4 linear: uint8 ``[T, H/16]``; group FP8: int32, the
  MN-major TMA-aligned layout of DeepGEMM (word (t, j) at ``j * align4(T) + t``, four
  UE8M0 bytes per word, group ``4j + i`` in byte ``i``), at least
  ``reference.ue8m0_mn_major_storage_size(T, H/g)`` words; dynamic FP8: fp32 ``[T]``.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass

import cupy
import numpy as np

from . import kernels, reference
from .allreduce import WORKSPACE_ARGTYPES, AllReduceWorkspace, Algorithm
from . import group as _group
from .group import ProcessGroup, default_group
from .tensors import as_array, bfloat16, dtype_name, stream_handle

MAX_VECS_PER_THREAD = 4  # kMaxVecs in fusion.cu
MAX_THREADS = 512        # kMaxThreads in fusion.cu
MAX_HIDDEN = MAX_VECS_PER_THREAD * 8 * MAX_THREADS


class AllReduceFusionPattern(enum.IntEnum):
    """Fusion patterns. 0-5 carry the reference library's values; 6-9 are moecomm's."""

    kAllReduce = 0
    kARResidualRMSNorm = 1
    kARResidualRMSNormFP8Quant = 2
    kARResidualRMSNormFP4Quant = 3
    kARResidualRMSNormOutFP8Quant = 4
    kARResidualRMSNormOutFP4Quant = 5
    kARResidualRMSNormPerTokenGroupFP8PackedQuant = 6
    kARResidualRMSNormOutPerTokenGroupFP8PackedQuant = 7
    kARResidualRMSNormDynamicFP8Quant = 8
    kARResidualRMSNormOutDynamicFP8Quant = 9


class QuantizationSFLayout(enum.IntEnum):
    """NVFP4 scale-factor layout (values as in the reference library)."""

    SWIZZLED_128x4 = 0
    LINEAR = 2


@dataclass
class AllReduceFusionOptions:
    """Inputs and settings of the epilogue.

    residual: [T, H], the I/O dtype. rms_gamma: [H], the I/O dtype.
    rms_eps: epsilon inside the rsqrt. weight_bias: 0.0 standard RMSNorm, 1.0 Gemma/Qwen.
    scale_factor: fp32 device scalar (one-element array): the static FP8 multiplier or
        the NVFP4 global scale (a device array, so CUDA graphs see updates).
    block_quant_group_size: elements per scale of the per-token-group FP8 patterns
        (8, 16, 32, 64, 128 or 256; must divide H).
    layout: NVFP4 scale layout. fp32_acc: peers are always summed in fp32 (accepted for
        compatibility; False is refused). use_oneshot: None picks by size.
    """

    residual: object = None
    rms_gamma: object = None
    rms_eps: float = 1e-6
    weight_bias: float = 0.0
    scale_factor: object = None
    block_quant_group_size: int = 128
    layout: QuantizationSFLayout = QuantizationSFLayout.SWIZZLED_128x4
    fp32_acc: bool = True
    use_oneshot: bool | None = None


@dataclass
class AllReduceFusionOutputs:
    """Output arrays; a pattern's required ones must be given (see module doc)."""

    allreduce_out: object = None
    residual_out: object = None
    norm_out: object = None
    quant_out: object = None
    scale_out: object = None


class _FusionArgs(ctypes.Structure):
    """FusionArgs of fusion.cu, field for field."""

    _fields_ = [("input", ctypes.c_void_p), ("residual_in", ctypes.c_void_p),
                ("gamma", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("allreduce_out", ctypes.c_void_p), ("residual_out", ctypes.c_void_p),
                ("norm_out", ctypes.c_void_p), ("quant_out", ctypes.c_void_p),
                ("scale_out", ctypes.c_void_p), ("moe_rows", ctypes.c_void_p),
                ("moe_scale", ctypes.c_void_p), ("moe_extra", ctypes.c_void_p),
                ("moe_index", ctypes.c_void_p), ("tokens", ctypes.c_uint64),
                ("hidden", ctypes.c_uint32), ("eps", ctypes.c_float),
                ("weight_bias", ctypes.c_float), ("group_size", ctypes.c_uint32),
                ("swizzled", ctypes.c_uint32), ("source", ctypes.c_uint32),
                ("moe_count", ctypes.c_uint32), ("moe_scale_fp32", ctypes.c_uint32),
                ("routed_scaling", ctypes.c_float), ("pad_", ctypes.c_uint32)]


_SOURCE_MOE_REDUCTION, _SOURCE_MOE_FINALIZE = 1, 2  # Source in fusion.cu


_QUANT_KERNEL = {None: "none", "fp8": "fp8", "fp4": "fp4", "group_fp8": "group_fp8",
                 "dynamic_fp8": "dynamic_fp8"}
_SUFFIX = {np.dtype(np.float16): "fp16", bfloat16: "bf16"}
_GROUP_SIZES = (8, 16, 32, 64, 128, 256)


class AllReduceFusionWorkspace:
    """The all-reduce workspace sized for ``[max_token_num, hidden_dim]`` rows of ``dtype``.

    ``.allreduce`` is the underlying ``AllReduceWorkspace`` (plain ``all_reduce`` calls
    may share it). Collective creation and ``close()``.
    """

    def __init__(self, group: ProcessGroup | None, max_token_num: int, hidden_dim: int,
                 dtype=bfloat16, **options):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _SUFFIX:
            raise TypeError(f"dtype {self.dtype.name} is not supported, expected bfloat16 "
                            "or float16")
        self.max_token_num, self.hidden_dim = int(max_token_num), int(hidden_dim)
        if self.max_token_num <= 0:
            raise ValueError(f"max_token_num must be > 0, got {max_token_num}")
        if self.hidden_dim <= 0 or self.hidden_dim % 16:
            raise ValueError(f"hidden_dim must be a positive multiple of 16, got {hidden_dim}")
        if self.hidden_dim > MAX_HIDDEN:
            raise ValueError(f"hidden_dim {hidden_dim} exceeds the supported {MAX_HIDDEN}")
        row = self.hidden_dim * self.dtype.itemsize
        group = default_group() if group is None else group
        self.allreduce = AllReduceWorkspace(
            group, self.max_token_num * row, self.dtype,
            segment_bytes=-(-self.max_token_num // group.size) * row, **options)
        self.group = group
        self._launchers: dict = {}
        if self.allreduce.ipc:
            self._sms = cupy.cuda.Device().attributes["MultiProcessorCount"]

    @property
    def world_size(self) -> int:
        return self.allreduce.world

    def launcher(self, algorithm: Algorithm, quant: str | None) -> kernels.Launcher:
        key = (algorithm, quant)
        launcher = self._launchers.get(key)
        if launcher is None:
            name = f"fusion_{algorithm.value}_{_QUANT_KERNEL[quant]}_{_SUFFIX[self.dtype]}"
            launcher = kernels.Launcher(kernels.get_kernel("fusion.cu", name),
                                        [_FusionArgs, *WORKSPACE_ARGTYPES])
            launcher.set_all([None, *self.allreduce.kernel_args])
            self._launchers[key] = launcher
        return launcher

    def check(self, stream=None) -> None:
        self.allreduce.check(stream)

    def close(self) -> None:
        self.allreduce.close()

    def __enter__(self) -> "AllReduceFusionWorkspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_allreduce_fusion_workspace(group: ProcessGroup | None = None, max_token_num: int = 2048,
                                      hidden_dim: int = 4096, dtype=bfloat16,
                                      **options) -> AllReduceFusionWorkspace:
    """An ``AllReduceFusionWorkspace`` (options as for ``AllReduceWorkspace``)."""
    return AllReduceFusionWorkspace(group, max_token_num, hidden_dim, dtype, **options)


def compute_fp4_swizzled_layout_sf_size(total_row: int, total_column: int,
                                        row_size: int = 128) -> int:
    """Bytes of a swizzled NVFP4 scale array: rows padded to ``row_size``, columns
    (16-element blocks) to 4."""
    return reference.compute_fp4_swizzled_layout_sf_size(total_row, total_column, row_size)


def allreduce_fusion(input, workspace: AllReduceFusionWorkspace,
                     pattern: AllReduceFusionPattern | int,
                     options: AllReduceFusionOptions | None = None,
                     outputs: AllReduceFusionOutputs | None = None,
                     stream=None) -> AllReduceFusionOutputs:
    """All-reduce ``input`` [T, H] over the workspace's group and apply ``pattern``.

    Writes into the arrays of ``outputs`` and returns it. Every array is validated before
    the launch; a required output missing, an output the pattern does not write, or a
    shape/dtype off raises ``ValueError``/``TypeError``. Same ``pattern`` and shapes on
    every rank.
    """
    x = as_array(input, "input", ndim=2, stream=stream)
    return _run(workspace, x.shape[0], x, pattern, options, outputs, stream, None)


def moe_allreduce_fusion(active_experts_token_input, scale_input, token_input,
                         workspace: AllReduceFusionWorkspace,
                         pattern: AllReduceFusionPattern | int = AllReduceFusionPattern.kARResidualRMSNorm,
                         options: AllReduceFusionOptions | None = None,
                         outputs: AllReduceFusionOutputs | None = None,
                         stream=None) -> AllReduceFusionOutputs:
    """MoE reduction, all-reduce and ``pattern`` in one kernel.

    Each rank contributes ``sum_e active_experts_token_input[e] * scale_input[e] +
    token_input`` (fp32, experts in order, rounded once), which is all-reduced.

    Args:
        active_experts_token_input: [E, T, H], the workspace's dtype.
        scale_input: [E, T] fp32 (expert e's weight of token t).
        token_input: [T, H], the workspace's dtype.
    """
    tok = as_array(token_input, "token_input", ndim=2, stream=stream)
    tokens, hidden = tok.shape
    active = as_array(active_experts_token_input, "active_experts_token_input",
                      dtype=tok.dtype, shape=(None, tokens, hidden), stream=stream)
    scale = as_array(scale_input, "scale_input", dtype=np.float32,
                     shape=(active.shape[0], tokens), stream=stream)
    moe = dict(source=_SOURCE_MOE_REDUCTION, moe_rows=active.data.ptr, moe_scale=scale.data.ptr,
               moe_extra=tok.data.ptr, moe_count=active.shape[0])
    return _run(workspace, tokens, tok, pattern, options, outputs, stream, moe, [active])


def moe_finalize_allreduce_fusion(allreduce_in, expanded_idx_to_permuted_idx,
                                  workspace: AllReduceFusionWorkspace,
                                  pattern: AllReduceFusionPattern | int = AllReduceFusionPattern.kARResidualRMSNorm,
                                  options: AllReduceFusionOptions | None = None,
                                  outputs: AllReduceFusionOutputs | None = None, *,
                                  expert_scale_factor=None, shared_expert_output=None,
                                  routed_scaling_factor: float = 1.0,
                                  stream=None) -> AllReduceFusionOutputs:
    """MoE finalize (un-permute), all-reduce and ``pattern`` in one kernel.

    Each rank contributes, per token t, ``routed_scaling_factor * sum_k
    allreduce_in[idx[t, k]] * expert_scale_factor[t, k] + shared_expert_output[t]`` (fp32,
    k in order, entries with ``idx < 0`` skipped, rounded once), which is all-reduced.

    Args:
        allreduce_in: [P, H] expert outputs in permuted order, the workspace's dtype.
        expanded_idx_to_permuted_idx: [T, top_k] int32, rows of ``allreduce_in`` (< P).
        expert_scale_factor: [T, top_k] fp32 or the workspace's dtype, or None (1).
        shared_expert_output: [T, H] or None.
    """
    rows = as_array(allreduce_in, "allreduce_in", ndim=2, stream=stream)
    idx = as_array(expanded_idx_to_permuted_idx, "expanded_idx_to_permuted_idx",
                   dtype=np.int32, ndim=2, stream=stream)
    tokens, top_k = idx.shape
    hidden = rows.shape[1]
    moe = dict(source=_SOURCE_MOE_FINALIZE, moe_rows=rows.data.ptr, moe_index=idx.data.ptr,
               moe_count=top_k, routed_scaling=float(routed_scaling_factor))
    keep = [rows]
    if expert_scale_factor is not None:
        esf = as_array(expert_scale_factor, "expert_scale_factor",
                       dtype=(np.dtype(np.float32), rows.dtype), shape=(tokens, top_k),
                       stream=stream)
        moe.update(moe_scale=esf.data.ptr, moe_scale_fp32=int(esf.dtype == np.float32))
    if shared_expert_output is not None:
        shared = as_array(shared_expert_output, "shared_expert_output", dtype=rows.dtype,
                          shape=(tokens, hidden), stream=stream)
        moe.update(moe_extra=shared.data.ptr)
        keep.append(shared)
    return _run(workspace, tokens, rows, pattern, options, outputs, stream, moe, keep)


def _run(ws: AllReduceFusionWorkspace, tokens: int, like: cupy.ndarray, pattern, options,
         outputs, stream, moe: dict | None, aligned=()) -> AllReduceFusionOutputs:
    """Validate against the workspace, fill FusionArgs and launch (shared by every entry).

    ``like`` is the input (or, for the MoE fusions, an array with its dtype and hidden
    size); ``moe`` holds the FusionArgs fields of the MoE sources.
    """
    pattern = AllReduceFusionPattern(pattern)
    options = options or AllReduceFusionOptions()
    outputs = outputs or AllReduceFusionOutputs()
    hidden = like.shape[-1]
    if like.dtype != ws.dtype:
        raise TypeError(f"input: dtype {like.dtype.name} does not match the workspace's "
                        f"{dtype_name(ws.dtype)}")
    if hidden != ws.hidden_dim:
        raise ValueError(f"input: hidden size {hidden} does not match the workspace's "
                         f"hidden_dim {ws.hidden_dim}")
    if tokens > ws.max_token_num:
        raise ValueError(f"input: token_num {tokens} exceeds the workspace's max_token_num "
                         f"{ws.max_token_num}")
    args, quant = _fusion_args(like, tokens, pattern, options, outputs, stream, aligned)
    if moe is not None:
        args.input = None
        for name, value in moe.items():
            setattr(args, name, value)

    nbytes = tokens * hidden * ws.dtype.itemsize
    if options.use_oneshot is None:
        algo = ws.allreduce.choose(nbytes)
    else:
        algo = ws.allreduce.choose(nbytes, Algorithm.ONESHOT if options.use_oneshot
                                   else Algorithm.TWOSHOT)
    if algo == Algorithm.NCCL:
        raise ValueError("allreduce_fusion needs CUDA IPC; the group spans nodes")
    if _group.DEBUG:
        ws.group.check_uniform("allreduce_fusion arguments (pattern, tokens, source, algorithm)",
                               (pattern.name, tokens, args.source, algo.value))
    ws.allreduce.error.check()
    if tokens == 0:
        return outputs
    if algo == Algorithm.ONESHOT:
        grid = min(ws._sms, tokens)
    else:
        grid = min(ws._sms, 256, -(-tokens // ws.world_size))
    launcher = ws.launcher(algo, quant)
    ctypes.pointer(launcher.slot(0))[0] = args
    launcher(grid, _block(hidden), stream_handle(stream))
    return outputs


_local_launchers: dict = {}


def rmsnorm_fusion(input, pattern: AllReduceFusionPattern | int,
                   options: AllReduceFusionOptions | None = None,
                   outputs: AllReduceFusionOutputs | None = None,
                   stream=None) -> AllReduceFusionOutputs:
    """The epilogue of ``pattern`` alone, one kernel, no communication: ``input`` [T, H]
    (bf16/fp16) is taken as already all-reduced. The unfused baseline of the benchmark
    (NCCL all-reduce, then this), and a residual + RMSNorm + quant kernel in its own right.
    """
    pattern = AllReduceFusionPattern(pattern)
    options = options or AllReduceFusionOptions()
    outputs = outputs or AllReduceFusionOutputs()
    x = as_array(input, "input", dtype=tuple(_SUFFIX), ndim=2, stream=stream)
    tokens, hidden = x.shape
    if hidden % 16 or hidden > MAX_HIDDEN:
        raise ValueError(f"input: hidden size {hidden} must be a multiple of 16, at most "
                         f"{MAX_HIDDEN}")
    args, quant = _fusion_args(x, tokens, pattern, options, outputs, stream)
    if tokens == 0:
        return outputs
    key = (cupy.cuda.Device().id, x.dtype, quant)
    launcher = _local_launchers.get(key)
    if launcher is None:
        name = f"fusion_local_{_QUANT_KERNEL[quant]}_{_SUFFIX[x.dtype]}"
        launcher = _local_launchers[key] = kernels.Launcher(
            kernels.get_kernel("fusion.cu", name), [_FusionArgs])
    ctypes.pointer(launcher.slot(0))[0] = args
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    launcher(min(tokens, 4 * sms), _block(hidden), stream_handle(stream))
    return outputs


def _block(hidden: int) -> int:
    """Threads per row: one 16-byte vector each, up to MAX_THREADS (then several)."""
    return min(MAX_THREADS, -(-(hidden // 8) // 32) * 32)


def _fusion_args(x: cupy.ndarray, tokens: int, pattern: AllReduceFusionPattern, options,
                 outputs, stream, aligned=()) -> tuple[_FusionArgs, str | None]:
    """Validate every array ``pattern`` reads or writes; the kernel's FusionArgs.

    ``x``: the input [T, H] (its dtype and hidden size rule the other arrays);
    ``aligned``: further arrays the kernel reads with 16-byte vector loads.
    """
    do_norm, quant, _ = reference.ALLREDUCE_FUSION_PATTERNS[pattern.name]
    needed = reference.pattern_outputs(pattern.name)
    if not options.fp32_acc:
        raise ValueError("fp32_acc=False is not supported: peers are summed in fp32")
    hidden = x.shape[-1]
    args = _FusionArgs(input=x.data.ptr, tokens=tokens, hidden=hidden,
                       eps=options.rms_eps, weight_bias=options.weight_bias or 0.0,
                       routed_scaling=1.0)
    keep = [x, *aligned]  # arrays read or written with vector accesses (16-byte aligned)
    for field in ("allreduce_out", "residual_out", "norm_out", "quant_out", "scale_out"):
        given = getattr(outputs, field)
        if field in needed and given is None:
            raise ValueError(f"pattern {pattern.name} writes outputs.{field}: pass an array")
        if given is not None and field not in needed and field != "allreduce_out":
            raise ValueError(f"pattern {pattern.name} does not write outputs.{field}"
                             + ("; use the Out variant" if field == "norm_out" else ""))
    if outputs.allreduce_out is not None:
        arr = as_array(outputs.allreduce_out, "outputs.allreduce_out", dtype=x.dtype,
                       shape=(tokens, hidden), stream=stream)
        args.allreduce_out = arr.data.ptr
        keep.append(arr)
    if do_norm:
        res = as_array(_required(options.residual, "options.residual", pattern),
                       "options.residual", dtype=x.dtype, shape=(tokens, hidden), stream=stream)
        gamma = as_array(_required(options.rms_gamma, "options.rms_gamma", pattern),
                         "options.rms_gamma", dtype=x.dtype, shape=(hidden,), stream=stream)
        args.residual_in, args.gamma = res.data.ptr, gamma.data.ptr
        keep += [res, gamma]
        for field in ("residual_out", "norm_out"):
            if getattr(outputs, field) is not None:
                arr = as_array(getattr(outputs, field), f"outputs.{field}", dtype=x.dtype,
                               shape=(tokens, hidden), stream=stream)
                setattr(args, field, arr.data.ptr)
                keep.append(arr)
    if quant is not None:
        _quant_arguments(args, quant, pattern, options, outputs, tokens, hidden, stream, keep)
    for arr in keep:
        if arr.data.ptr % 16:
            raise ValueError(f"arrays must be 16-byte aligned (one is at 0x{arr.data.ptr:x})")
    return args, quant


def _required(value, name: str, pattern: AllReduceFusionPattern):
    if value is None:
        raise ValueError(f"pattern {pattern.name} needs {name}")
    return value


def _quant_arguments(args, quant, pattern, options, outputs, tokens, hidden, stream, keep):
    """Validate the quantization inputs/outputs of ``pattern`` and fill ``args``."""
    code_dtypes = (np.dtype(np.uint8),)
    try:
        import ml_dtypes

        code_dtypes += (np.dtype(ml_dtypes.float8_e4m3fn),)
    except ImportError:  # pragma: no cover
        pass
    if quant in ("fp8", "fp4"):
        scale = as_array(_required(options.scale_factor, "options.scale_factor", pattern),
                         "options.scale_factor", dtype=np.float32, stream=stream)
        if scale.size != 1:
            raise ValueError(f"options.scale_factor: expected one element, got {scale.shape}")
        args.scale = scale.data.ptr
    if quant == "fp4":
        if hidden % 16:
            raise ValueError(f"NVFP4 needs hidden % 16 == 0, got {hidden}")
        q = as_array(outputs.quant_out, "outputs.quant_out", dtype=np.uint8,
                     shape=(tokens, hidden // 2), stream=stream)
        swizzled = QuantizationSFLayout(options.layout) == QuantizationSFLayout.SWIZZLED_128x4
        sf = as_array(outputs.scale_out, "outputs.scale_out", dtype=np.uint8, stream=stream)
        need = (compute_fp4_swizzled_layout_sf_size(tokens, hidden // 16) if swizzled
                else tokens * (hidden // 16))
        if (swizzled and sf.size < need) or (not swizzled and sf.size != need):
            raise ValueError(f"outputs.scale_out: {sf.size} bytes, the "
                             f"{'swizzled' if swizzled else 'linear'} layout needs {need}")
        args.swizzled = int(swizzled)
    else:
        q = as_array(outputs.quant_out, "outputs.quant_out", dtype=code_dtypes,
                     shape=(tokens, hidden), stream=stream)
        sf = None
        if quant == "group_fp8":
            g = int(options.block_quant_group_size or 0)
            if g not in _GROUP_SIZES or hidden % g:
                raise ValueError(f"options.block_quant_group_size={g} must be one of "
                                 f"{_GROUP_SIZES} and divide hidden {hidden}")
            sf = as_array(outputs.scale_out, "outputs.scale_out", dtype=np.int32, stream=stream)
            need = reference.ue8m0_mn_major_storage_size(tokens, hidden // g)
            if sf.size < need:
                raise ValueError(f"outputs.scale_out: {sf.size} int32 words, the MN-major "
                                 f"layout of {tokens} tokens needs {need}")
            args.group_size = g
        elif quant == "dynamic_fp8":
            sf = as_array(outputs.scale_out, "outputs.scale_out", dtype=np.float32,
                          stream=stream)
            if sf.size != tokens:
                raise ValueError(f"outputs.scale_out: expected {tokens} fp32 scales, got "
                                 f"shape {sf.shape}")
    args.quant_out = q.data.ptr
    keep.append(q)
    if sf is not None:
        args.scale_out = sf.data.ptr
