"""Fused all-reduce: all-reduce + residual add + RMSNorm (+ quantization) in one kernel.

``allreduce_fusion(input, workspace, pattern, options, outputs)`` is what a
tensor-parallel layer calls after its attention and MLP projections. With ``x`` the
all-reduced ``input`` ([token_num, hidden], bf16 or fp16):

- ``allreduce_out = x``; ``residual_out = x + residual``;
- ``norm_out = (gamma + weight_bias) * r * rsqrt(mean(r^2) + eps)`` with ``r = residual_out``;
- quantization of ``norm_out``: static FP8 e4m3 (``q = sat(norm * (1 / scale_factor))``:
  ``scale_factor`` is the dequantization scale, as vLLM, TensorRT-LLM and FlashInfer keep
  it), NVFP4 (16-element blocks, e4m3 block scales, 128x4 swizzled or linear), per-token-
  group FP8 with packed UE8M0 scales, or dynamic per-token FP8 (``scale_out[t] =
  max(amax/448, 2^-9/448)``).

Patterns (``AllReduceFusionPattern``) carry FlashInfer 0.7.2's integer values; what each
computes and writes is ``moecomm.constants.PATTERNS``. Rounding points are those of
``moecomm.reference`` (each intermediate rounded to the I/O dtype where the unfused ops
would round; quantizers read the rounded ``norm_out``). Output layouts:

- ``quant_out``: uint8 (or float8_e4m3fn) ``[T, H]`` codes; NVFP4: uint8 (or torch's
  float4_e2m1fn_x2) ``[T, H/2]``, two e2m1 codes per byte, the even element in the low
  nibble. Any framework's array of these dtypes (``moecomm.tensors.CODE_DTYPES`` ...).
- ``scale_out``: NVFP4 swizzled: uint8 (or float8_e4m3fn) of
  ``compute_fp4_swizzled_layout_sf_size(T, H/16)`` bytes (padding written as 0); NVFP4
  linear: the same dtypes, ``[T, H/16]``; group FP8: int32 (or its bytes: uint8,
  float8_e8m0fnu; 4-byte aligned), the
  MN-major TMA-aligned layout of DeepGEMM (word (t, j) at ``j * align4(T) + t``, four
  UE8M0 bytes per word, group ``4j + i`` in byte ``i``), at least
  ``ue8m0_mn_major_storage_size(T, H/g)`` words; dynamic FP8: fp32 ``[T]`` (or ``[T, 1]``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple

import cupy
import numpy as np

from . import group as _group
from . import events, kernels, tuning
from .allreduce import Algorithm, AllReduceConfig, AllReduceWorkspace
from .constants import (AR_MAX_BLOCKS, FUSION_MAX_HIDDEN, GROUP_FP8_SIZES, PATTERNS,
                        AllReduceFusionPattern, PatternSpec, Quant, QuantizationSFLayout, Source)
from .group import ProcessGroup, default_group
from .kernel_args import FusionArgs
from .launch import Launcher
from .layouts import compute_fp4_swizzled_layout_sf_size, ue8m0_mn_major_storage_size
from .op import (Op, device_facts, grid_limit, group_sms, int_at_least, overlaps,
                 require_aligned, supported_dtype)
from .op import options as config_options
from .tensors import (CODE_DTYPES, E4M3_SCALE_DTYPES, FP4_DTYPES, UE8M0_DTYPES, as_array,
                      bfloat16, dtype_name, stream_handle)

__all__ = [
    "AllReduceFusionPattern", "QuantizationSFLayout", "AllReduceFusionOptions",
    "AllReduceFusionOutputs", "AllReduceFusionWorkspace", "create_allreduce_fusion_workspace",
    "allreduce_fusion", "moe_allreduce_fusion", "moe_finalize_allreduce_fusion",
    "rmsnorm_fusion", "compute_fp4_swizzled_layout_sf_size",
]

_QUANT_NAME = {Quant.NONE: "none", Quant.FP8: "fp8", Quant.NVFP4: "nvfp4",
               Quant.GROUP_FP8: "group_fp8", Quant.DYNAMIC_FP8: "dynamic_fp8"}
_SUFFIX = {np.dtype(np.float16): "fp16", bfloat16: "bf16"}
_OUTPUTS = ("allreduce_out", "residual_out", "norm_out", "quant_out", "scale_out")
_POINTERS = ("input", "residual_in", "gamma", "scale", *_OUTPUTS, "moe_rows", "moe_scale",
             "moe_extra", "moe_index")


@dataclass
class AllReduceFusionOptions:
    """Inputs and settings of the epilogue.

    residual: [T, H], the I/O dtype. rms_gamma: [H], the I/O dtype.
    rms_eps: epsilon inside the rsqrt. weight_bias: 0.0 standard RMSNorm, 1.0 Gemma/Qwen.
    scale_factor: fp32 device scalar (one-element array): the static FP8 dequantization
        scale (codes are ``norm * (1 / scale_factor)``) or the NVFP4 global scale (a device
        array, so CUDA graphs see updates).
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


class _RowPlan(NamedTuple):
    """How a row is spread over threads: kernel variant (fusion.cu's suffix), vectors per
    thread, blocks per row (a thread block cluster), threads per block."""

    variant: str
    v: int
    cluster: int
    block: int


def _row_plan(hidden: int, tokens: int, sms: int, clusters: bool) -> _RowPlan:
    """A row of ``hidden`` 16-bit elements is ``hidden / 8`` 16-byte vectors, one per
    thread where it fits. Up to 512 of them: one block of the register-rich ``_v1``
    kernels. Longer rows, where thread block clusters exist (sm_90+; one-shot and the
    epilogue alone) and the rows' blocks fit the SMs (decode): a cluster of 2-8 ``_v1``
    blocks of 128-512 threads (each a multiple of 32 vectors, so no quantizer group
    straddles two), the more blocks the fewer rows; a row's sum of squares is then reduced
    over the cluster. Otherwise one block: ``_w1`` (up to 1024 threads) or ``_v2`` (two
    vectors a thread)."""
    hvec = hidden // 8
    if hvec <= 512:
        return _RowPlan("v1", 1, 1, -(-hvec // 32) * 32)
    if clusters:
        c = next((c for c in (2, 4, 8) if hvec % (32 * c) == 0 and hvec // c <= 512), 0)
        if c and tokens * c <= sms:
            while (c < 8 and hvec % (64 * c) == 0 and hvec // (2 * c) >= 128
                   and tokens * 2 * c <= sms):
                c *= 2
            return _RowPlan("v1", 1, c, hvec // c)
    if hvec <= 1024:
        return _RowPlan("w1", 1, 1, -(-hvec // 32) * 32)
    return _RowPlan("v2", 2, 1, -(-hvec // 64) * 32)


def _row_grid(rows: int, resident_blocks: int, plan: _RowPlan, oneshot: bool) -> int:
    """Blocks of a call over ``rows`` rows (a rank's segment for two-shot) where
    ``resident_blocks`` fit the device at once: a cluster per row up to that; two-shot
    grids at most ``AR_MAX_BLOCKS`` blocks, the slots of its per-block flags (with 128-thread
    blocks of hidden 1024, 8 a SM, an H200 holds 1056)."""
    resident = max(1, resident_blocks // plan.cluster)
    if not oneshot:
        resident = min(resident, AR_MAX_BLOCKS // plan.cluster)
    return max(1, min(rows, resident)) * plan.cluster


def _padding_grid(grid: int, plan: _RowPlan, tokens: int, hidden: int, limit: int) -> int:
    """``grid`` blocks and, for a swizzled NVFP4 scale array with padding rows, whole
    clusters past the rows' that zero the padding alone (fusion.cu, zero_sf_padding_aside;
    up to ``limit`` blocks in all, one 16-byte chunk a thread): the rows' warps, whose
    chain of dependent instructions sets a small call's time, then do none of it."""
    if tokens % 128 == 0:
        return grid
    chunks = -(-hidden // 64) * 32  # of the last 128-row band
    return min(limit, grid + -(-chunks // (plan.block * plan.cluster)) * plan.cluster)


class _AutoRule(NamedTuple):
    """How ``allreduce_fusion`` picks for rows of ``row_bytes`` (``moecomm.tuning``): the
    one-shot splits the SMs by role from ``split_rows`` rows on (a row is one block's
    chain of dependent instructions: once an SM holds two, the split is faster); ``auto``
    runs one-shot up to ``plain_max_bytes`` unsplit, up to ``split_max_rows`` rows and
    ``split_max_bytes`` split, two-shot beyond, or, where the caller gave one, up to
    ``oneshot_max_bytes``."""

    row_bytes: int
    split_rows: float            # inf: never split
    split_max_rows: float
    split_max_bytes: int
    plain_max_bytes: int
    oneshot_max_bytes: int | None = None

    @classmethod
    def measured(cls, config: AllReduceConfig, world: int, sms: int, row_bytes: int,
                 oneshot_max_bytes: int | None = None) -> _AutoRule:
        """The rule of ``world`` ranks on an SM budget of ``sms``: by rows as measured, by
        bytes where ``config.split_min_bytes`` is given, never split where the all-reduce's
        split does not apply (``AllReduceConfig.split_from``)."""
        split_from = config.split_from(world, sms)
        hvec = row_bytes // 16

        def by_row(table):  # the entry of the first bound above hvec, else None
            return next((v for shorter, v in table.get(world, ()) if hvec < shorter), None)

        per_sm = by_row(tuning.FUSION_SPLIT_ROWS_PER_SM)
        if split_from == float("inf"):
            split_rows = float("inf")
        elif config.split_min_bytes is not None:
            split_rows = max(1, -(-int(split_from) // row_bytes))
        elif per_sm is not None:
            split_rows = per_sm * sms + 1
        else:
            split_rows = float("inf")
        max_rows = by_row(tuning.FUSION_SPLIT_MAX_ROWS) or float("inf")
        return cls(row_bytes, split_rows, max_rows,
                   tuning.FUSION_SPLIT_ONESHOT_MAX_BYTES.get(world, 0),
                   tuning.lookup(tuning.FUSION_ONESHOT_MAX_BYTES, world), oneshot_max_bytes)

    def splits(self, tokens: int) -> bool:
        """Whether a one-shot call over ``tokens`` rows splits the SMs by role."""
        return tokens >= self.split_rows

    def oneshot(self, tokens: int) -> bool:
        """Whether ``auto`` runs ``tokens`` rows one-shot."""
        nbytes = tokens * self.row_bytes
        if self.oneshot_max_bytes is not None:
            return nbytes <= self.oneshot_max_bytes
        if self.splits(tokens):
            return tokens <= self.split_max_rows and nbytes <= self.split_max_bytes
        return nbytes <= self.plain_max_bytes

    def largest_oneshot_bytes(self) -> int:
        """The largest message ``auto`` runs one-shot (what the Lamport buffers hold)."""
        if self.oneshot_max_bytes is not None:
            return self.oneshot_max_bytes
        if self.split_rows == float("inf"):
            return self.plain_max_bytes
        split = min(self.split_max_bytes, self.split_max_rows * self.row_bytes)
        return int(max(self.plain_max_bytes, split))


def _check_hidden(hidden: int, name: str) -> None:
    if hidden <= 0 or hidden % 16 or hidden > FUSION_MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {hidden} must be a positive multiple of 16, at "
                         f"most {FUSION_MAX_HIDDEN}")


def _kernel(algo: str, quant: Quant, dtype, variant: str):
    return kernels.get_kernel("fusion.cu",
                              f"fusion_{algo}_{_QUANT_NAME[quant]}_{_SUFFIX[dtype]}_{variant}")


class AllReduceFusionWorkspace(Op):
    """The all-reduce workspace sized for ``[max_token_num, hidden_dim]`` rows of ``dtype``.

    ``.allreduce`` is the underlying ``AllReduceWorkspace`` (plain ``all_reduce`` calls may
    share it). ``oneshot_max_bytes``: the ``auto`` crossover in bytes (default: the measured
    rule, by rows, of ``moecomm.tuning``'s ``FUSION_*`` tables: at 2 ranks rows of 384 or
    more 16-byte vectors split the one-shot's SMs by role once they outnumber the SMs,
    rows of 320-383 once they are five times the SMs, and take two-shot past
    ``FUSION_SPLIT_MAX_ROWS``; otherwise the plain one-shot up to
    ``FUSION_ONESHOT_MAX_BYTES``); the largest one-shot message also sizes
    the Lamport buffers (3 x world x min(it, the largest message) per rank). Other options
    as for ``AllReduceWorkspace`` (an explicit ``AllReduceConfig.split_min_bytes`` splits
    by bytes instead). Collective creation and ``close()``.
    """

    name = "AllReduceFusionWorkspace"

    def __init__(self, group: ProcessGroup | None, max_token_num: int, hidden_dim: int,
                 dtype=bfloat16, *, oneshot_max_bytes: int | None = None,
                 config: AllReduceConfig | None = None, **options):
        self.dtype = supported_dtype(dtype, tuple(_SUFFIX))
        self.max_token_num = int_at_least("max_token_num", max_token_num)
        self.hidden_dim = int_at_least("hidden_dim", hidden_dim)
        _check_hidden(self.hidden_dim, "hidden_dim")
        group = default_group() if group is None else group
        cfg = config_options(AllReduceConfig, config)
        row = self.hidden_dim * self.dtype.itemsize
        if oneshot_max_bytes is not None:
            oneshot_max_bytes = int_at_least("oneshot_max_bytes", oneshot_max_bytes, 0)
        self._auto = _AutoRule.measured(cfg, group.size, cfg.budget(group_sms(group)), row,
                                        oneshot_max_bytes)
        max_bytes = self.max_token_num * row
        self.allreduce = AllReduceWorkspace(
            group, max_bytes, self.dtype, segment_bytes=-(-self.max_token_num // group.size) * row,
            max_oneshot_bytes=options.pop("max_oneshot_bytes",
                                          min(max_bytes, self._auto.largest_oneshot_bytes())),
            config=config, **options)
        self.group = group
        self._launchers: dict = {}
        self._geometry: dict = {}
        self._open(None)

    @property
    def world_size(self) -> int:
        return self.allreduce.world

    def launcher(self, algorithm: Algorithm, quant: Quant, tokens: int,
                 swizzled: bool = False, split: bool = True) -> tuple:
        """(launcher, grid, block, cluster, push blocks, shared memory) of a call over
        ``tokens`` rows, made on first use: one-shot spreads a decode row over a cluster
        where the device has them, and from the all-reduce's ``split_from`` bytes splits
        the SMs by role (one block per SM, ``split_push_sms`` of them pushing); every block
        is resident at once (blocks wait for peers). Under an SM budget a grid has at most
        one block per budgeted SM (at least one cluster). A one-shot writing a swizzled
        NVFP4 scale array may add blocks for its padding (``_padding_grid``). ``split``
        False: never split (an output overlaps what the pushers read)."""
        key = (algorithm, quant, tokens, swizzled, split)
        entry = self._geometry.get(key)
        if entry is None:
            sms = self.allreduce.sms
            oneshot = algorithm == Algorithm.ONESHOT
            # The row plan (hence a row's fp32 sum-of-squares tree, hence norm_out's bits)
            # follows the device, never the SM budget: a budgeted call gives the bits of
            # an unbudgeted one, its grid looping over the rows the budget cannot hold.
            plan = _row_plan(self.hidden_dim, tokens, self.allreduce.device_sms,
                             oneshot and device_facts().arch >= (9, 0))
            launcher = self._launchers.get((algorithm, quant, plan.variant))
            if launcher is None:
                launcher = Launcher(_kernel(algorithm.value, quant, self.dtype, plan.variant),
                                    FusionArgs, pdl=self.allreduce.config.pdl)
                launcher.args.ws = self.allreduce.kernel_workspace
                self._launchers[(algorithm, quant, plan.variant)] = launcher
            ar = self.allreduce
            # the split: rows of one block and one vector a thread (the variants tested)
            if (split and oneshot and plan.cluster == 1 and plan.v == 1
                    and self._auto.splits(tokens)):
                ar.split_kernel(launcher.kernel)
                entry = (launcher, sms, plan.block, 1, ar.config.split_push_sms,
                         ar.split_shared_mem)
            else:
                per_sm = device_facts().blocks_per_sm(launcher.kernel, plan.block)
                resident = grid_limit(sms, per_sm, ar.budgeted)
                rows = tokens if oneshot else -(-tokens // self.world_size)
                grid = _row_grid(rows, resident, plan, oneshot)
                if oneshot and swizzled:  # within the resident whole clusters
                    limit = max(1, resident // plan.cluster) * plan.cluster
                    grid = _padding_grid(grid, plan, tokens, self.hidden_dim, limit)
                entry = (launcher, grid, plan.block, plan.cluster, 0, 0)
            if len(self._geometry) > 1024:
                self._geometry.clear()
            self._geometry[key] = entry
        return entry

    def choose(self, tokens: int, use_oneshot: bool | None = None) -> Algorithm:
        """The algorithm a call over ``tokens`` rows takes (``use_oneshot`` None: the
        measured rule, ``_AutoRule``)."""
        if not self.allreduce.ipc:
            raise ValueError(f"allreduce_fusion needs CUDA IPC, but "
                             f"{self.allreduce.no_ipc_reason}")
        nbytes = tokens * self.hidden_dim * self.dtype.itemsize
        if use_oneshot is None:
            use_oneshot = (self._auto.oneshot(tokens)
                           and nbytes <= self.allreduce.max_oneshot_bytes)
        return self.allreduce.choose(nbytes, Algorithm.ONESHOT if use_oneshot
                                     else Algorithm.TWOSHOT)

    def usable(self, what: str) -> None:
        super().usable(what)
        self.allreduce.usable(what)

    def check(self, stream=None) -> None:
        self.allreduce.check(stream)

    def _release(self) -> None:
        self.allreduce.close()


def create_allreduce_fusion_workspace(group: ProcessGroup | None = None, max_token_num: int = 2048,
                                      hidden_dim: int = 4096, dtype=bfloat16,
                                      **options) -> AllReduceFusionWorkspace:
    """An ``AllReduceFusionWorkspace`` (options as for ``AllReduceFusionWorkspace``)."""
    return AllReduceFusionWorkspace(group, max_token_num, hidden_dim, dtype, **options)


def allreduce_fusion(input, workspace: AllReduceFusionWorkspace,
                     pattern: AllReduceFusionPattern | int,
                     options: AllReduceFusionOptions | None = None,
                     outputs: AllReduceFusionOutputs | None = None,
                     stream=None, *, previous_event=None,
                     async_op: bool = False) -> AllReduceFusionOutputs:
    """All-reduce ``input`` [T, H] over the workspace's group and apply ``pattern``.

    Writes into the arrays of ``outputs`` and returns it. Every array is validated before
    the launch; a required output missing, an output the pattern does not write, or a
    shape/dtype off raises ``ValueError``/``TypeError``. Same ``pattern`` and shapes on
    every rank. The MoE patterns (6, 7) go through ``moe_allreduce_fusion`` /
    ``moe_finalize_allreduce_fusion``. ``previous_event``, ``async_op``: overlap options of
    every entry here (``moecomm.events``; with ``async_op`` the return is ``(outputs,
    CommHandle)``).
    """
    spec, pattern = _pattern(pattern, Source.INPUT, "allreduce_fusion")
    _usable(workspace, "allreduce_fusion")
    x = as_array(input, "input", ndim=2, stream=stream)
    return _run(workspace, x.shape[0], x, pattern, spec, options, outputs, stream,
                dict(source=Source.INPUT, input=x.data.ptr), [x],
                (previous_event, async_op, input))


def moe_allreduce_fusion(active_experts_token_input, scale_input, token_input,
                         workspace: AllReduceFusionWorkspace,
                         pattern: AllReduceFusionPattern | int = AllReduceFusionPattern.kARResidualRMSNorm,
                         options: AllReduceFusionOptions | None = None,
                         outputs: AllReduceFusionOutputs | None = None,
                         stream=None, *, previous_event=None,
                         async_op: bool = False) -> AllReduceFusionOutputs:
    """MoE reduction, all-reduce and ``pattern`` in one kernel.

    Each rank contributes ``sum_e active_experts_token_input[e] * scale_input[e] +
    token_input`` (fp32, experts in order, rounded once), which is all-reduced.
    ``pattern``: an epilogue pattern, or ``kMoEReductionARResidualRMSNorm``.

    Args:
        active_experts_token_input: [E, T, H], the workspace's dtype.
        scale_input: [E, T] fp32 (expert e's weight of token t).
        token_input: [T, H], the workspace's dtype.
    """
    spec, pattern = _pattern(pattern, Source.MOE_REDUCTION, "moe_allreduce_fusion")
    _usable(workspace, "moe_allreduce_fusion")
    tok = as_array(token_input, "token_input", ndim=2, stream=stream)
    tokens, hidden = tok.shape
    active = as_array(active_experts_token_input, "active_experts_token_input",
                      dtype=tok.dtype, shape=(None, tokens, hidden), stream=stream)
    scale = as_array(scale_input, "scale_input", dtype=np.float32,
                     shape=(active.shape[0], tokens), stream=stream)
    require_aligned("active_experts_token_input", active.data.ptr)
    moe = dict(source=Source.MOE_REDUCTION, moe_rows=active.data.ptr, moe_scale=scale.data.ptr,
               moe_extra=tok.data.ptr, moe_count=active.shape[0])
    return _run(workspace, tokens, tok, pattern, spec, options, outputs, stream, moe,
                [active, tok, scale],
                (previous_event, async_op, (active_experts_token_input, scale_input, token_input)))


def moe_finalize_allreduce_fusion(allreduce_in, expanded_idx_to_permuted_idx,
                                  workspace: AllReduceFusionWorkspace,
                                  pattern: AllReduceFusionPattern | int = AllReduceFusionPattern.kARResidualRMSNorm,
                                  options: AllReduceFusionOptions | None = None,
                                  outputs: AllReduceFusionOutputs | None = None, *,
                                  expert_scale_factor=None, shared_expert_output=None,
                                  routed_scaling_factor: float = 1.0,
                                  stream=None, previous_event=None,
                                  async_op: bool = False) -> AllReduceFusionOutputs:
    """MoE finalize (un-permute), all-reduce and ``pattern`` in one kernel.

    Each rank contributes, per token t, ``routed_scaling_factor * sum_k
    allreduce_in[idx[t, k]] * expert_scale_factor[t, k] + shared_expert_output[t]`` (fp32,
    k in order, entries with ``idx < 0`` skipped, rounded once), which is all-reduced.
    ``pattern``: an epilogue pattern, or ``kMoEFinalizeARResidualRMSNorm``.

    Args:
        allreduce_in: [P, H] expert outputs in permuted order, the workspace's dtype.
        expanded_idx_to_permuted_idx: [T, top_k] int32, rows of ``allreduce_in`` (< P).
        expert_scale_factor: [T, top_k] fp32 or the workspace's dtype, or None (1).
        shared_expert_output: [T, H] or None.
    """
    spec, pattern = _pattern(pattern, Source.MOE_FINALIZE, "moe_finalize_allreduce_fusion")
    _usable(workspace, "moe_finalize_allreduce_fusion")
    rows = as_array(allreduce_in, "allreduce_in", ndim=2, stream=stream)
    idx = as_array(expanded_idx_to_permuted_idx, "expanded_idx_to_permuted_idx",
                   dtype=np.int32, ndim=2, stream=stream)
    tokens, top_k = idx.shape
    hidden = rows.shape[1]
    require_aligned("allreduce_in", rows.data.ptr)
    moe = dict(source=Source.MOE_FINALIZE, moe_rows=rows.data.ptr, moe_index=idx.data.ptr,
               moe_count=top_k, routed_scaling=float(routed_scaling_factor))
    reads = [rows, idx]
    if expert_scale_factor is not None:
        esf = as_array(expert_scale_factor, "expert_scale_factor",
                       dtype=(np.dtype(np.float32), rows.dtype), shape=(tokens, top_k),
                       stream=stream)
        moe.update(moe_scale=esf.data.ptr, moe_scale_fp32=int(esf.dtype == np.float32))
        reads.append(esf)
    if shared_expert_output is not None:
        shared = as_array(shared_expert_output, "shared_expert_output", dtype=rows.dtype,
                          shape=(tokens, hidden), stream=stream)
        require_aligned("shared_expert_output", shared.data.ptr)
        moe.update(moe_extra=shared.data.ptr)
        reads.append(shared)
    return _run(workspace, tokens, rows, pattern, spec, options, outputs, stream, moe, reads,
                (previous_event, async_op, (allreduce_in, expanded_idx_to_permuted_idx,
                                            expert_scale_factor, shared_expert_output)))


def _pattern(pattern, source: Source, entry: str) -> tuple[PatternSpec, AllReduceFusionPattern]:
    """The spec of ``pattern`` (enum, int or name) for an entry point with ``source``."""
    try:
        pattern = (AllReduceFusionPattern[pattern] if isinstance(pattern, str)
                   else AllReduceFusionPattern(pattern))
    except (KeyError, ValueError):
        raise ValueError(f"{pattern!r} is not an AllReduceFusionPattern") from None
    spec = PATTERNS[pattern]
    if spec.source not in (Source.INPUT, source):
        fused = {Source.MOE_REDUCTION: "moe_allreduce_fusion",
                 Source.MOE_FINALIZE: "moe_finalize_allreduce_fusion"}[spec.source]
        raise ValueError(f"pattern {pattern.name} is the epilogue of {fused}, not of {entry}")
    if source != Source.INPUT and not spec.norm:
        raise ValueError(f"{entry} needs a residual + RMSNorm pattern, got {pattern.name}")
    return spec, pattern


def _usable(ws, entry: str) -> None:
    """``ws`` is an open fusion workspace, and its GPU current: before any argument is
    imported, so that they are checked against that GPU."""
    if not isinstance(ws, AllReduceFusionWorkspace):
        raise TypeError(f"workspace: expected an AllReduceFusionWorkspace, got "
                        f"{type(ws).__name__}")
    ws.usable(entry)


def _run(ws: AllReduceFusionWorkspace, tokens: int, like: cupy.ndarray, pattern, spec,
         options, outputs, stream, source_fields: dict, sources: list,
         overlap: tuple = (None, False, None)) -> AllReduceFusionOutputs:
    """Validate against the workspace, fill the launcher's FusionArgs and launch (shared
    by every entry). ``like``: an array with the I/O dtype and hidden size; ``sources``:
    the arrays each rank's contribution is read from. ``overlap``:
    (previous_event, async_op, the inputs a CommHandle keeps alive). The entry made
    ``ws`` usable (``_usable``) before importing anything."""
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
    require_aligned("input", like.data.ptr)
    fields, written = _epilogue_fields(like.dtype, tokens, hidden, pattern, spec, options,
                                       outputs, stream)
    fields.update(source_fields)
    if source_fields["source"] == Source.MOE_FINALIZE:
        # a token's rows are gathered through the permutation: any block may read any
        # row of allreduce_in while another writes its outputs
        rows = sources[0]
        for name, w, nw in written:
            if overlaps(w, nw, rows.data.ptr, rows.nbytes):
                raise ValueError(f"{name}: overlaps allreduce_in, whose rows every token may "
                                 "read (through expanded_idx_to_permuted_idx)")
    algo = ws.choose(tokens, options.use_oneshot)
    # The split one-shot pushes the contributions from blocks other than those writing the
    # outputs: an output overlapping a source (in place) takes the unsplit kernel.
    split = not (algo == Algorithm.ONESHOT and ws._auto.splits(tokens)) or not any(
        overlaps(w, nw, s.data.ptr, s.nbytes) for _, w, nw in written for s in sources)
    if _group.DEBUG:
        ws.group.check_uniform("allreduce_fusion arguments (pattern, tokens, source, algorithm)",
                               (pattern.name, tokens, int(fields["source"]), algo.value))
    handle = stream_handle(stream)
    previous_event, async_op, inputs = overlap
    if previous_event is not None or async_op or _group.DEBUG:
        async_op = events.issue(handle, previous_event, async_op, owner=ws,
                                op="allreduce_fusion")
    if tokens:
        launcher, grid, block, cluster, pushers, shared_mem = ws.launcher(
            algo, spec.quant, tokens, bool(fields.get("swizzled")), split)
        _fill(launcher.args, fields)
        launcher.args.push_blocks = pushers
        launcher(grid, block, handle, shared_mem, cluster=cluster)
    if not async_op:
        return outputs
    return events.finish(outputs, handle, True, owner=ws, op="allreduce_fusion",
                         keep=(inputs, options, outputs))


def _fill(args: FusionArgs, fields: dict) -> None:
    """Every field of ``args`` a call sets (pointers absent from ``fields`` are null)."""
    for name in _POINTERS:
        setattr(args, name, fields.get(name))
    args.tokens, args.hidden, args.source = fields["tokens"], fields["hidden"], fields["source"]
    args.eps, args.weight_bias = fields["eps"], fields["weight_bias"]
    args.group_size, args.swizzled = fields.get("group_size", 0), fields.get("swizzled", 0)
    args.moe_count, args.moe_scale_fp32 = fields.get("moe_count", 0), fields.get("moe_scale_fp32", 0)
    args.routed_scaling = fields.get("routed_scaling", 1.0)


_local = threading.local()  # rmsnorm_fusion's launchers, one set per thread


def rmsnorm_fusion(input, pattern: AllReduceFusionPattern | int,
                   options: AllReduceFusionOptions | None = None,
                   outputs: AllReduceFusionOutputs | None = None,
                   stream=None) -> AllReduceFusionOutputs:
    """The epilogue of ``pattern`` alone, one kernel, no communication: ``input`` [T, H]
    (bf16/fp16) is taken as already all-reduced. The unfused baseline of the benchmark
    (NCCL all-reduce, then this), and a residual + RMSNorm + quant kernel in its own right.
    """
    spec, pattern = _pattern(pattern, Source.INPUT, "rmsnorm_fusion")
    options = options or AllReduceFusionOptions()
    outputs = outputs or AllReduceFusionOutputs()
    x = as_array(input, "input", dtype=tuple(_SUFFIX), ndim=2, stream=stream)
    tokens, hidden = x.shape
    _check_hidden(hidden, "input")
    require_aligned("input", x.data.ptr)
    fields = _epilogue_fields(x.dtype, tokens, hidden, pattern, spec, options, outputs,
                              stream)[0]
    fields.update(source=Source.INPUT, input=x.data.ptr)
    if tokens == 0:
        return outputs
    cache = getattr(_local, "launchers", None)
    if cache is None:
        cache = _local.launchers = {}
    facts = device_facts()
    plan = _row_plan(hidden, tokens, facts.sms, facts.arch >= (9, 0))
    key = (facts.id, x.dtype, spec.quant, plan.variant)
    launcher = cache.get(key)
    if launcher is None:
        launcher = cache[key] = Launcher(_kernel("local", spec.quant, x.dtype, plan.variant),
                                         FusionArgs)
    _fill(launcher.args, fields)
    limit = 4 * facts.sms // plan.cluster * plan.cluster
    grid = min(tokens * plan.cluster, limit)
    if fields.get("swizzled"):
        grid = _padding_grid(grid, plan, tokens, hidden, limit)
    launcher(grid, plan.block, stream_handle(stream), cluster=plan.cluster)
    return outputs


def _epilogue_fields(dtype, tokens: int, hidden: int, pattern: AllReduceFusionPattern,
                     spec: PatternSpec, options, outputs, stream) -> tuple[dict, list]:
    """Validate every array the epilogue of ``pattern`` reads or writes; its FusionArgs
    fields (all 16-byte aligned: the kernel uses vector accesses) and the (name, address,
    bytes) of every output."""
    if not options.fp32_acc:
        raise ValueError("fp32_acc=False is not supported: peers are summed in fp32")
    fields = dict(tokens=tokens, hidden=hidden, eps=float(options.rms_eps),
                  weight_bias=float(options.weight_bias or 0.0))
    needed = spec.outputs
    for name in _OUTPUTS:
        given = getattr(outputs, name)
        if name in needed and given is None:
            raise ValueError(f"pattern {pattern.name} writes outputs.{name}: pass an array")
        if given is not None and name not in needed and name != "allreduce_out":
            raise ValueError(f"pattern {pattern.name} does not write outputs.{name}"
                             + ("; use the Out variant" if name == "norm_out" else ""))

    written = []

    def array(value, name, alignment=16, **check):
        arr = as_array(value, name, stream=stream, writable=name.startswith("outputs."),
                       **check)
        require_aligned(name, arr.data.ptr, alignment)
        if name.startswith("outputs."):
            written.append((name, arr.data.ptr, arr.nbytes))
        return arr

    row = dict(dtype=dtype, shape=(tokens, hidden))
    if outputs.allreduce_out is not None:
        fields["allreduce_out"] = array(outputs.allreduce_out, "outputs.allreduce_out", **row).data.ptr
    if spec.norm:
        for name, value in (("options.residual", options.residual),
                            ("options.rms_gamma", options.rms_gamma)):
            if value is None:
                raise ValueError(f"pattern {pattern.name} needs {name}")
        fields["residual_in"] = array(options.residual, "options.residual", **row).data.ptr
        fields["gamma"] = array(options.rms_gamma, "options.rms_gamma", dtype=dtype,
                                shape=(hidden,)).data.ptr
        for name in ("residual_out", "norm_out"):
            if getattr(outputs, name) is not None:
                fields[name] = array(getattr(outputs, name), f"outputs.{name}", **row).data.ptr
    if spec.quant != Quant.NONE:
        fields.update(_quant_fields(spec.quant, pattern, options, outputs, tokens, hidden,
                                    stream, array))
    return fields, written


def _quant_fields(quant: Quant, pattern, options, outputs, tokens, hidden, stream, array) -> dict:
    """Validate the quantization inputs/outputs of ``pattern``; their FusionArgs fields."""
    fields = {}
    if quant in (Quant.FP8, Quant.NVFP4):
        if options.scale_factor is None:
            raise ValueError(f"pattern {pattern.name} needs options.scale_factor")
        scale = as_array(options.scale_factor, "options.scale_factor", dtype=np.float32,
                         stream=stream)
        if scale.size != 1:
            raise ValueError(f"options.scale_factor: expected one element, got {scale.shape}")
        fields["scale"] = scale.data.ptr
    if quant == Quant.NVFP4:
        q = array(outputs.quant_out, "outputs.quant_out", dtype=FP4_DTYPES,
                  shape=(tokens, hidden // 2))
        swizzled = QuantizationSFLayout(options.layout) == QuantizationSFLayout.SWIZZLED_128x4
        sf = array(outputs.scale_out, "outputs.scale_out", alignment=4 if swizzled else 1,
                   dtype=E4M3_SCALE_DTYPES)
        need = (compute_fp4_swizzled_layout_sf_size(tokens, hidden // 16) if swizzled
                else tokens * (hidden // 16))
        if (swizzled and sf.size < need) or (not swizzled and sf.size != need):
            raise ValueError(f"outputs.scale_out: {sf.size} bytes, the "
                             f"{'swizzled' if swizzled else 'linear'} layout needs {need}")
        fields["swizzled"] = int(swizzled)
    else:
        q = array(outputs.quant_out, "outputs.quant_out", dtype=CODE_DTYPES,
                  shape=(tokens, hidden))
        sf = None
        if quant == Quant.GROUP_FP8:
            g = options.block_quant_group_size
            if g not in GROUP_FP8_SIZES or hidden % g:
                raise ValueError(f"options.block_quant_group_size={g} must be one of "
                                 f"{GROUP_FP8_SIZES} and divide hidden {hidden}")
            sf = array(outputs.scale_out, "outputs.scale_out", alignment=4,
                       dtype=UE8M0_DTYPES)  # int32 words, or their bytes
            need = ue8m0_mn_major_storage_size(tokens, hidden // g)
            if sf.nbytes < 4 * need:
                raise ValueError(f"outputs.scale_out: {sf.nbytes // 4} int32 words, the "
                                 f"MN-major layout of {tokens} tokens needs {need}")
            fields["group_size"] = g
        elif quant == Quant.DYNAMIC_FP8:
            sf = array(outputs.scale_out, "outputs.scale_out", alignment=1, dtype=np.float32)
            if sf.size != tokens:
                raise ValueError(f"outputs.scale_out: expected {tokens} fp32 scales, got "
                                 f"shape {sf.shape}")
    fields["quant_out"] = q.data.ptr
    if sf is not None:
        fields["scale_out"] = sf.data.ptr
    return fields
