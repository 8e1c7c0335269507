"""All-reduce, residual + RMSNorm, the fused all-reduce patterns and the MoE reductions
fused before the all-reduce. Every function takes all ranks' inputs at once.

Rounding points of the fused all-reduce (the GPU kernels follow these)
----------------------------------------------------------------------
1. Each rank's contribution is in the I/O dtype (for the MoE fusions: the MoE reduction is
   computed in fp32 and rounded once to the I/O dtype; that rounded value is what is
   exchanged).
2. ``allreduce_out = io(sum_r fp32(x_r))``, ranks in order 0, 1, ...; an input -0.0 is
   read as +0.0 (the Lamport sentinel rule), so a zero sum is +0.0.
3. ``residual_out = io(fp32(allreduce_out) + fp32(residual))`` - the ROUNDED all-reduce
   value is used, so the fused op equals all-reduce followed by the unfused ops.
4. The norm reads the ROUNDED ``residual_out``: ``r = fp32(residual_out)``;
   ``ms = fp32(mean(r**2))`` (sum in float64 here; a GPU tree sum differs in the last
   bits), ``rstd = fp32(1/sqrt(ms + fp32(eps)))`` (``ms + eps`` in fp32, rsqrt correctly
   rounded), ``norm32 = (r * rstd) * (gamma + weight_bias)`` in fp32,
   ``norm_out = io(norm32)``. The kernels sum ``fp32(r * r)`` in fp32 (multiply, then
   add, each rounded) and divide and take the square root correctly rounded.
   FlashInfer 0.7.2 computes the same formula as ``rsqrtf(acc / hidden + eps)`` with
   ``acc += v * v`` under fast math: squares accumulated by FMA, an approximate division
   and an approximate reciprocal square root (up to 2 ulp). Its row factor then differs
   from the correctly rounded one in the last bit for some rows, which moves about 1 in
   10^5 elements of ``norm_out`` (and the FP8 codes read from them) by one step: measured
   on 2 x H200, 1-111 elements per shape at 32-2048 tokens x 4096/7168, none at 1 and 8
   tokens; moecomm's one-shot and two-shot agree bit for bit, FlashInfer's differ from
   each other in 2 elements at 7168 x 128. The correctly rounded
   value is the one this reference states; an approximation of the hardware's
   reciprocal units cannot be reproduced here, so the kernels keep the exact factor.
5. Every quantizer reads the ROUNDED ``norm_out`` (decoded to fp32), also in the patterns
   that do not write ``norm_out``. A GPU ``norm_out`` may differ from this reference by
   one ulp of the I/O dtype (step 4), so GPU tests compare norm/quant outputs with a
   tolerance of one quantization step where the norm is not bit-exact.
6. The quantizers (``moecomm.reference.quant``), fp32, every operation rounded, ``v`` an
   element of the rounded ``norm_out``:

   * static FP8: ``inv = fp32(1 / scale_factor)`` once per call (``scale_factor`` is the
     dequantization scale); ``q = e4m3_rne_satfinite(v * inv)``;
   * NVFP4, per 16-element block:
     ``sf = e4m3_rne_satfinite(global_scale * (amax * fp32(1/6)))``;
     ``out_scale = global_scale / float(sf)`` (IEEE division; 0 where sf decodes to 0);
     ``code = e2m1_rne_satfinite(v * out_scale)``;
   * per-token-group FP8, per group: ``scale = 2**ceil(log2(max(amax / 448, 1e-10)))``
     (UE8M0); ``q = e4m3(v / scale)`` (exact);
   * dynamic FP8, per row: ``scale = max(amax / 448, 2**-9 / 448)``; ``q = e4m3(v / scale)``.
     Both divisions correctly rounded. FlashInfer 0.7.2 writes the same formula but builds
     its communication kernels with ``-use_fast_math``, where ``/`` is the approximate
     division (within 2 ulp): its per-token scale is then one ulp off the correctly
     rounded quotient in about half the rows (measured on 2 x H200: 25-75% of the scales
     at 8-2048 tokens, as often none of the one row at 1 token), while the e4m3 codes,
     3 mantissa bits, come out equal. The correctly rounded quotient is the value the
     formula defines and the one a framework's ``amax / 448`` gives; the kernels keep it.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import numpy as np

from ..constants import GROUP_FP8_SIZES, PATTERNS, AllReduceFusionPattern, Quant, Source
from .formats import _check_same, cast_from_float32, to_float32
from .quant import quant_fp8, quant_fp8_dynamic_per_token, quant_fp8_per_token_group, quant_nvfp4

__all__ = [
    "all_reduce", "residual_rmsnorm",
    "as_fusion_pattern", "pattern_outputs", "allreduce_fusion",
    "moe_reduction", "moe_finalize", "moe_allreduce_fusion", "moe_finalize_allreduce_fusion",
]

# --------------------------------------------------------------------------------------
# all-reduce and residual + RMSNorm
# --------------------------------------------------------------------------------------

def all_reduce(inputs: Sequence[Any], dtype: Any = None) -> np.ndarray:
    """Sum over ranks: ``io(((x_0 + x_1) + x_2) + ...)`` in fp32, rank 0 first.

    ``inputs``: one array per rank, same shape and dtype (bf16 bits / fp16 / fp32).
    Input -0.0 is read as +0.0 (Lamport sentinel rule), so an all-zero sum is +0.0.
    Returns the result in ``dtype`` (default: the inputs' dtype); every rank gets it.
    """
    _check_same(inputs, "all_reduce")
    dtype = np.asarray(inputs[0]).dtype if dtype is None else dtype
    acc = to_float32(inputs[0]) + np.float32(0.0)       # -0 -> +0
    for x in inputs[1:]:
        acc = acc + to_float32(x)
    return cast_from_float32(acc, dtype)


def residual_rmsnorm(x: Any, residual: Any, gamma: Any, eps: float = 1e-6,
                     weight_bias: float = 0.0, dtype: Any = None):
    """Residual add + RMSNorm, rounding as the fused kernel does (module docstring 3-4).

    x, residual: [T, H] in the I/O dtype; gamma: [H] (any float dtype, read as fp32).
    ``residual=None`` means no residual add (residual_out = x).
    ``residual_out = io(fp32(x) + fp32(residual))``; with ``r = fp32(residual_out)``:
    ``norm_out = io((r * rstd) * (gamma + weight_bias))``,
    ``rstd = fp32(1 / sqrt(fp32(mean(r**2)) + fp32(eps)))`` (mean of squares summed in
    float64, rounded to fp32; ``+ eps`` in fp32; rsqrt correctly rounded).
    ``weight_bias`` 0.0 or None: standard RMSNorm; 1.0: Gemma/Qwen ``(1 + gamma)``.
    Returns ``(residual_out, norm_out)`` in ``dtype`` (default: x's dtype).
    """
    dtype = np.asarray(x).dtype if dtype is None else dtype
    weight_bias = 0.0 if weight_bias is None else weight_bias
    r32 = to_float32(x)
    if residual is not None:
        r32 = r32 + to_float32(residual)
    residual_out = cast_from_float32(r32, dtype)
    r = to_float32(residual_out)
    if r.ndim != 2:
        raise ValueError(f"x must be [T, H], got {r.shape}")
    g = to_float32(gamma).reshape(-1)
    if g.shape[0] != r.shape[1]:
        raise ValueError(f"gamma has {g.shape[0]} elements, hidden size is {r.shape[1]}")
    ms = np.mean(np.square(r.astype(np.float64)), axis=-1).astype(np.float32)
    denom = (ms + np.float32(eps)).astype(np.float64)
    rstd = (1.0 / np.sqrt(denom)).astype(np.float32)
    w = g + np.float32(weight_bias)
    norm32 = (r * rstd[:, None]) * w[None, :]
    return residual_out, cast_from_float32(norm32, dtype)


# --------------------------------------------------------------------------------------
# allreduce_fusion
# --------------------------------------------------------------------------------------

_MOE_ENTRY_POINTS = {Source.MOE_REDUCTION: "moe_allreduce_fusion",
                     Source.MOE_FINALIZE: "moe_finalize_allreduce_fusion"}


def as_fusion_pattern(pattern: Any) -> AllReduceFusionPattern:
    """The :class:`~moecomm.constants.AllReduceFusionPattern` meant by ``pattern``: a
    member, its int value (FlashInfer 0.7.2's numbering), its name, or a member of another
    enum (matched by name, not by value). Unknown patterns raise ValueError."""
    if isinstance(pattern, AllReduceFusionPattern):
        return pattern
    name = pattern if isinstance(pattern, str) else getattr(pattern, "name", None)
    if isinstance(name, str):
        if name in AllReduceFusionPattern.__members__:
            return AllReduceFusionPattern[name]
        raise ValueError(f"unknown allreduce_fusion pattern {pattern!r}; "
                         f"known: {list(AllReduceFusionPattern.__members__)}")
    if isinstance(pattern, bool):
        raise TypeError(f"pattern must be an AllReduceFusionPattern, int or name, got {pattern!r}")
    try:
        value = operator.index(pattern)
    except TypeError:
        raise TypeError(f"pattern must be an AllReduceFusionPattern, int or name, "
                        f"got {type(pattern).__name__}") from None
    try:
        return AllReduceFusionPattern(value)
    except ValueError:
        raise ValueError(f"unknown allreduce_fusion pattern value {value}; known: "
                         f"{[int(p) for p in AllReduceFusionPattern]}") from None


def pattern_outputs(pattern: Any) -> tuple:
    """Outputs a pattern must write (the caller must pass them; ``allreduce_out`` is
    optional for every other pattern): ``PATTERNS[pattern].outputs``. FP8 static quant has
    no ``scale_out``. ``pattern`` as for :func:`as_fusion_pattern`."""
    return PATTERNS[as_fusion_pattern(pattern)].outputs


def allreduce_fusion(inputs: Sequence[Any], pattern: Any, *, residual: Any = None,
                     rms_gamma: Any = None, rms_eps: float = 1e-6, weight_bias: float = 0.0,
                     scale_factor: float | None = None, layout: Any = "swizzled",
                     block_quant_group_size: int | None = None, dtype: Any = None) -> dict:
    """Fused all-reduce reference. ``inputs``: per-rank [T, H] arrays in the I/O dtype.

    ``pattern``: an :class:`~moecomm.constants.AllReduceFusionPattern`, its int value or
    its name (:func:`as_fusion_pattern`); what it computes is
    ``moecomm.constants.PATTERNS[pattern]``. The MoE patterns
    (``kMoEReductionARResidualRMSNorm``, ``kMoEFinalizeARResidualRMSNorm``) need the
    experts' outputs: they raise ValueError here and are computed by
    :func:`moe_allreduce_fusion` / :func:`moe_finalize_allreduce_fusion`.

    ``residual`` [T, H] is this rank's residual input (call once per rank if ranks'
    residuals differ); ``rms_gamma`` [H]. ``scale_factor``: the static FP8
    dequantization scale (FP8 patterns; :func:`quant_fp8` multiplies by its reciprocal)
    or the NVFP4 ``global_scale`` (FP4 patterns).
    ``layout``: NVFP4 scale layout (:func:`quant_nvfp4`). ``block_quant_group_size``: group
    size of the per-token-group patterns, one of ``constants.GROUP_FP8_SIZES``.

    Returns a dict with ``allreduce_out`` always, plus the pattern's outputs
    (:func:`pattern_outputs`): ``residual_out``, ``norm_out`` (I/O dtype), ``quant_out``
    (uint8 codes: e4m3 [T, H], or packed e2m1 [T, H//2]) and ``scale_out`` (NVFP4: uint8
    e4m3 per :func:`quant_nvfp4`; group FP8: int32 [T, ceil(H/g/4)] logical packed UE8M0;
    dynamic FP8: fp32 [T]). Rounding points: module docstring.
    """
    p = as_fusion_pattern(pattern)
    spec = PATTERNS[p]
    if spec.source != Source.INPUT:
        raise ValueError(f"pattern {p.name} reduces the experts' outputs before the all-reduce: "
                         f"use {_MOE_ENTRY_POINTS[spec.source]}")
    name = p.name
    _check_same(inputs, "allreduce_fusion")
    dtype = np.asarray(inputs[0]).dtype if dtype is None else dtype
    ar = all_reduce(inputs, dtype)
    out = {"allreduce_out": ar}
    if not spec.norm:
        return out
    if residual is None:
        raise ValueError(f"pattern {name} needs residual")
    if rms_gamma is None:
        raise ValueError(f"pattern {name} needs rms_gamma")
    if np.asarray(residual).shape != np.asarray(ar).shape:
        raise ValueError(f"residual shape {np.asarray(residual).shape} != input shape {ar.shape}")
    residual_out, norm_out = residual_rmsnorm(ar, residual, rms_gamma, rms_eps, weight_bias, dtype)
    out["residual_out"] = residual_out
    if spec.norm_out:
        out["norm_out"] = norm_out
    if spec.quant == Quant.NONE:
        return out
    y = to_float32(norm_out)
    if spec.quant == Quant.FP8:
        if scale_factor is None:
            raise ValueError(f"pattern {name} needs scale_factor (the FP8 dequantization scale)")
        out["quant_out"] = quant_fp8(y, scale_factor)
    elif spec.quant == Quant.NVFP4:
        if scale_factor is None:
            raise ValueError(f"pattern {name} needs scale_factor (the NVFP4 global scale)")
        out["quant_out"], out["scale_out"] = quant_nvfp4(y, scale_factor, layout)
    elif spec.quant == Quant.GROUP_FP8:
        if block_quant_group_size not in GROUP_FP8_SIZES:
            raise ValueError(f"pattern {name} needs block_quant_group_size in {GROUP_FP8_SIZES}, "
                             f"got {block_quant_group_size!r}")
        out["quant_out"], out["scale_out"] = quant_fp8_per_token_group(y, block_quant_group_size)
    elif spec.quant == Quant.DYNAMIC_FP8:
        out["quant_out"], out["scale_out"] = quant_fp8_dynamic_per_token(y)
    else:  # a quantizer added to constants.Quant without a reference
        raise NotImplementedError(f"pattern {name}: no reference for {spec.quant!r}")
    return out


# The plain pattern computing the same epilogue as each pattern (MoE patterns included).
_EPILOGUE = {p: next(q for q, t in PATTERNS.items() if t.source == Source.INPUT
                     and (t.norm, t.quant, t.norm_out) == (s.norm, s.quant, s.norm_out))
             for p, s in PATTERNS.items()}


def _moe_epilogue(pattern: Any, source: Source) -> AllReduceFusionPattern:
    """The plain pattern whose epilogue a MoE entry point applies: ``pattern`` itself, or
    the residual + RMSNorm of the entry point's own MoE pattern."""
    p = as_fusion_pattern(pattern)
    spec = PATTERNS[p]
    if spec.source not in (Source.INPUT, source):
        raise ValueError(f"pattern {p.name} belongs to {_MOE_ENTRY_POINTS[spec.source]}, "
                         f"not {_MOE_ENTRY_POINTS[source]}")
    return _EPILOGUE[p]


# --------------------------------------------------------------------------------------
# MoE reductions fused before the all-reduce
# --------------------------------------------------------------------------------------

def moe_reduction(active_experts_token_input: Any, scale_input: Any, token_input: Any,
                  dtype: Any = None) -> np.ndarray:
    """This rank's MoE reduction (``trtllm_moe_allreduce_fusion``), before the all-reduce.

    active_experts_token_input [E, T, H] (I/O dtype), scale_input [E, T] (fp32, expert
    major: expert e's weight for token t at e*T + t), token_input [T, H] (I/O dtype).
    ``acc = sum_e fp32(a[e]) * s[e]`` (e ascending, fp32 products and adds, starting from
    +0), then ``acc + fp32(token_input)``; rounded once to ``dtype`` (default: token_input's).
    """
    a = to_float32(active_experts_token_input)
    s = to_float32(scale_input)
    tok = to_float32(token_input)
    if a.ndim != 3 or tok.ndim != 2 or a.shape[1:] != tok.shape:
        raise ValueError(f"expected active [E, T, H] and token_input [T, H]; got {a.shape}, {tok.shape}")
    if s.shape != a.shape[:2]:
        raise ValueError(f"scale_input must be [E, T] = {a.shape[:2]}, got {s.shape}")
    dtype = np.asarray(token_input).dtype if dtype is None else dtype
    acc = np.zeros(tok.shape, np.float32)
    for e in range(a.shape[0]):
        acc = acc + a[e] * s[e][:, None]
    return cast_from_float32(acc + tok, dtype)


def moe_finalize(allreduce_in: Any, expanded_idx_to_permuted_idx: Any,
                 expert_scale_factor: Any = None, shared_expert_output: Any = None,
                 routed_scaling_factor: float = 1.0, dtype: Any = None) -> np.ndarray:
    """This rank's MoE finalize (un-permute) (``trtllm_moe_finalize_allreduce_fusion``).

    allreduce_in [P, H]: expert outputs in permuted order (I/O dtype);
    expanded_idx_to_permuted_idx [T, k] int: row of token t's k-th expert, or < 0 when
    that expert is not on this rank (contributes nothing); expert_scale_factor [T, k]
    (any float dtype; None = 1); shared_expert_output [T, H] or None.
    In fp32: ``acc = sum_{k ascending, p >= 0} fp32(allreduce_in[p]) * fp32(scale[t, k])``;
    ``acc = acc * fp32(routed_scaling_factor)`` (routed terms only);
    ``acc = acc + fp32(shared_expert_output)``; rounded once to ``dtype`` (default:
    allreduce_in's). Indices >= P raise ValueError.
    """
    a = to_float32(allreduce_in)
    idx = np.asarray(expanded_idx_to_permuted_idx).astype(np.int64)
    if a.ndim != 2 or idx.ndim != 2:
        raise ValueError(f"expected allreduce_in [P, H] and index [T, k]; got {a.shape}, {idx.shape}")
    if idx.size and idx.max() >= a.shape[0]:
        raise ValueError(f"expanded_idx_to_permuted_idx has {idx.max()} >= {a.shape[0]} rows")
    t, k = idx.shape
    w = None if expert_scale_factor is None else to_float32(expert_scale_factor)
    if w is not None and w.shape != idx.shape:
        raise ValueError(f"expert_scale_factor must be {idx.shape}, got {w.shape}")
    dtype = np.asarray(allreduce_in).dtype if dtype is None else dtype
    acc = np.zeros((t, a.shape[1]), np.float32)
    for j in range(k):
        p = idx[:, j]
        valid = p >= 0
        rows = a[np.where(valid, p, 0)] if a.shape[0] else np.zeros((t, a.shape[1]), np.float32)
        term = rows if w is None else rows * w[:, j][:, None]
        acc = acc + np.where(valid[:, None], term, np.float32(0.0))
    acc = acc * np.float32(routed_scaling_factor)
    if shared_expert_output is not None:
        sh = to_float32(shared_expert_output)
        if sh.shape != acc.shape:
            raise ValueError(f"shared_expert_output must be {acc.shape}, got {sh.shape}")
        acc = acc + sh
    return cast_from_float32(acc, dtype)


def moe_allreduce_fusion(active_experts_token_input: Sequence[Any], scale_input: Sequence[Any],
                         token_input: Sequence[Any],
                         pattern: Any = AllReduceFusionPattern.kARResidualRMSNorm,
                         **kwargs) -> dict:
    """Per-rank :func:`moe_reduction`, then the all-reduce and the epilogue of ``pattern``
    (keyword arguments as for :func:`allreduce_fusion`).

    ``pattern``: ``kMoEReductionARResidualRMSNorm`` (the same as the default
    ``kARResidualRMSNorm``) or any plain pattern; the MoE finalize pattern raises
    ValueError.
    """
    epilogue = _moe_epilogue(pattern, Source.MOE_REDUCTION)
    contrib = [moe_reduction(a, s, t, kwargs.get("dtype"))
               for a, s, t in zip(active_experts_token_input, scale_input, token_input)]
    return allreduce_fusion(contrib, epilogue, **kwargs)


def moe_finalize_allreduce_fusion(allreduce_in: Sequence[Any], expanded_idx_to_permuted_idx: Sequence[Any],
                                  expert_scale_factor: Sequence[Any] | None = None,
                                  shared_expert_output: Sequence[Any] | None = None,
                                  routed_scaling_factor: float = 1.0,
                                  pattern: Any = AllReduceFusionPattern.kARResidualRMSNorm,
                                  **kwargs) -> dict:
    """Per-rank :func:`moe_finalize`, then the all-reduce and the epilogue of ``pattern``
    (keyword arguments as for :func:`allreduce_fusion`).

    ``pattern``: ``kMoEFinalizeARResidualRMSNorm`` (the same as the default
    ``kARResidualRMSNorm``) or any plain pattern; the MoE reduction pattern raises
    ValueError.
    """
    epilogue = _moe_epilogue(pattern, Source.MOE_FINALIZE)
    n = len(allreduce_in)
    esf = expert_scale_factor if expert_scale_factor is not None else [None] * n
    seo = shared_expert_output if shared_expert_output is not None else [None] * n
    contrib = [moe_finalize(allreduce_in[r], expanded_idx_to_permuted_idx[r], esf[r], seo[r],
                            routed_scaling_factor, kwargs.get("dtype")) for r in range(n)]
    return allreduce_fusion(contrib, epilogue, **kwargs)
