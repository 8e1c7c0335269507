"""MoE prepare/finalize for data-parallel serving (reference document 002), without torch.

A serving engine with data parallelism wraps its expert computation in two calls:
``prepare`` quantizes the activations and moves the tokens (with their top-k ids and
weights) to where the experts run; ``finalize`` brings the expert outputs back. Arrays go
in through DLPack and come out as ``cupy.ndarray``; every method takes ``stream=``.
Reference: ``moecomm.reference.prepare`` (all_gatherv, reduce_scatterv, a2a_prepare,
a2a_finalize, apply_router_weight_on_input).

Two paths, and no communication at all with ``use_dp=False`` (quantize only, NVFP4 scale
factors swizzled; finalize copies):

* ``FlashInferAllGatherMoEPrepareAndFinalize``: quantize ``a1`` (NVFP4 with the global
  scale ``a1_gscale`` and linear scale factors, FP8, or none), then one
  ``all_gatherv([topk_weights, topk_ids, a1q, a1q_scale], sizes)`` (``moecomm.collectives``)
  gives every rank every rank's tokens, stacked in rank order; NVFP4 scale factors are
  then interleaved into the 128x4 swizzled layout. ``finalize`` is
  ``reduce_scatterv(fused_expert_output, sizes)`` into ``output``: per token the fp32 sum
  over ranks in rank order, from +0, rounded once.
* ``FlashInferAllToAllMoEPrepareAndFinalize`` (NVFP4 or unquantized): each token goes
  once to every distinct rank owning one of its experts (``rank = id // (num_experts //
  ep_size)``; ids < 0 or >= num_experts route nowhere). Received tensors are flat
  ``[ep_size * runtime_max, ...]`` with ``runtime_max = max(sizes)``: block s (rows
  ``s * runtime_max ...``) holds the tokens of rank s routed here, in source order, then
  padding. Received ids that this rank does not own, and all ids of padding rows, are
  -1 (padding rows' other payloads are unspecified); with an ``expert_map``
  (int32 ``[num_experts]``, global -> local id) the owned ids are renumbered. The NVFP4
  scale factors travel linear and are interleaved after the exchange. ``finalize``
  sends each row of ``fused_expert_output`` (``[ep_size * runtime_max, H]``, row i being
  this rank's output for received row i) back and sums, per token, the rows of its
  target ranks in rank order in fp32 from +0, rounded once.

The exchange also stands on its own: ``FlashInferAllToAllMoEPrepareAndFinalize.dispatch(
topk_ids, tensors)`` moves any 1 to 7 arrays (any dtype, rows of a multiple of 4 bytes)
along the plan and returns them with the received ids; ``combine(rows)`` brings rows back.

Top-k weights: ``finalize`` does not apply them. ``fused_expert_output`` must already be
weighted and reduced over the top-k slots this rank owns (as FlashInfer's CUTLASS fused
MoE writes it; ``weight_and_reduce_impl`` accepts only None / ``"noop"``), unless
``apply_router_weight_on_input`` put the (top-1) weight on the input: ``a1 *= T(weight)``
in place before quantization (the weight rounded to a1's dtype, the product in fp32,
rounded once).

The all-to-all-v transfers are ``MoeAlltoAll``'s (one dispatch of [a1q, a1q_scale,
topk_ids, topk_weights] with ids sanitised per target; its combine). Two things it does
not serve: payload rows must be multiples of 4 bytes, so NVFP4 needs ``hidden % 64 == 0``
(linear scale rows of ``hidden / 16`` bytes); and its transfers are CUDA IPC only, so a
group that spans nodes takes the all-to-all-v path through NCCL instead: an all_gatherv
of the same four tensors, then the plan applied locally (``a2a_plan`` /
``a2a_take_rows`` in ``kernels_cu/prepare.cu``: the same receive layout, ids sanitised the
same way), and for finalize the expert rows put back in gathered order (zeros where a
token was not received) and reduce-scattered. Adding +0 for a rank that did not receive
a token changes no bit of a sum that starts from +0, so both give the same bits.

Per-rank token counts ``sizes`` (host ints, the same on every rank, as vLLM's
``get_local_sizes()``): pass them to ``prepare`` (graph capture needs them); None
exchanges them over MPI (host only, no GPU sync). ``MOECOMM_DEBUG=1`` compares them across
ranks.

Outputs of ``prepare`` are kept per shape by the object and rewritten by the next
``prepare`` of that shape (a2a: views of the MoeAlltoAll workspace, rewritten by the next
prepare): warm up once before capturing a CUDA graph, then replay. Everything is
validated before any launch: ``TypeError`` for dtypes, ``ValueError`` for shapes, sizes,
top_k != 1 with ``apply_router_weight_on_input``, NVFP4 hidden not a multiple of 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import cupy
import numpy as np

from .. import group as _group
from ..collectives import VCollectiveWorkspace, check_sizes, gather_layout, scatter_bytes
from ..constants import A2A_MAX_PAYLOADS, A2A_PLAN_MAX_RANKS, NVFP4_BLOCK
from ..group import ProcessGroup, default_group
from ..kernel_args import A2aPlanArgs, A2aPutRowsArgs, A2aTakeRowsArgs, MapIdsArgs, ScaleRowsArgs
from ..kernels import get_kernel
from ..launch import Launcher
from ..layouts import compute_fp4_swizzled_layout_sf_size
from ..op import Phase, empty, int_at_least, require_aligned
from ..tensors import FLOAT_DTYPES, as_array, bfloat16, import_array, stream_handle
from .alltoall import MoeAlltoAll, moe_a2a_get_workspace_size_per_rank

__all__ = [
    "FusedMoEQuantConfig", "PrepareResult", "FlashInferCutlassMoEPrepareAndFinalize",
    "FlashInferAllGatherMoEPrepareAndFinalize", "FlashInferAllToAllMoEPrepareAndFinalize",
    "create_prepare_finalize", "create_flashinfer_prepare_finalize",
]

_SOURCE = "prepare.cu"
_SUFFIX = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}
if bfloat16 is not None:
    _SUFFIX[bfloat16] = "bf16"
_QUANT = {None: None, "fp8": "fp8", "nvfp4": "nvfp4"}


def _quant():
    """``moecomm.quant`` (imported on first quantized call)."""
    try:
        from .. import quant
    except ImportError as exc:  # pragma: no cover - part of the package
        raise ImportError(f"quantized prepare needs moecomm.quant ({exc})") from None
    return quant


def _quant_name(value) -> str | None:
    """None, "fp8" or "nvfp4" from a string, a ``moecomm.quant.QuantDtype`` or None."""
    if value is None:
        return None
    name = value if isinstance(value, str) else getattr(value, "value", None)
    if not isinstance(name, str):
        name = getattr(value, "name", "")
    if name.lower() not in _QUANT:
        raise ValueError(f"quant_dtype={value!r}: expected None, 'fp8' or 'nvfp4'")
    return name.lower()


@dataclass(frozen=True)
class FusedMoEQuantConfig:
    """How ``prepare`` quantizes ``a1`` (the fields of the reference's quant config that the
    activations use).

    quant_dtype: None (no quantization: a1 moves as it is, ``a1q_scale`` None), "fp8" or
        "nvfp4" (or a ``moecomm.quant.QuantDtype``).
    a1_gscale: device scalar array (fp32, one element): the NVFP4 global scale (required),
        or the static per-tensor FP8 dequantization scale.
    per_act_token_quant / block_shape: FP8 dynamic per-token scales (fp32 [T, 1]) or
        per-token-group scales of ``block_shape[1]`` elements (fp32 [T, H / G]); these
        have a row per token and travel with the tokens. As vLLM's
        ``moe_kernel_quantize_input``: ``block_shape`` wins over ``a1_gscale``, and a given
        ``a1_gscale`` makes FP8 static (per_act_token_quant is then ignored). FP8 needs
        one of the three (dynamic per-tensor scales would differ from rank to rank).
    """

    quant_dtype: Any = None
    a1_gscale: Any = None
    per_act_token_quant: bool = False
    block_shape: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "quant_dtype", _quant_name(self.quant_dtype))
        if self.quant_dtype == "nvfp4" and self.a1_gscale is None:
            raise ValueError("FusedMoEQuantConfig: nvfp4 needs a1_gscale (the global scale)")
        if self.block_shape is not None:
            object.__setattr__(self, "block_shape", tuple(int(b) for b in self.block_shape))
        if (self.quant_dtype == "fp8" and self.a1_gscale is None and self.block_shape is None
                and not self.per_act_token_quant):
            raise ValueError("FusedMoEQuantConfig: fp8 needs a1_gscale (static), "
                             "per_act_token_quant=True or block_shape")

    @property
    def per_tensor(self) -> bool:
        """Static per-tensor FP8: one scale, the same on every rank (not gathered)."""
        return self.quant_dtype == "fp8" and self.block_shape is None and self.a1_gscale is not None


class PrepareResult(NamedTuple):
    """What ``prepare`` returns, in the reference's order."""

    a1q: cupy.ndarray
    a1q_scale: cupy.ndarray | None
    expert_tokens_meta: None
    topk_ids: cupy.ndarray
    topk_weights: cupy.ndarray


class _Inputs(NamedTuple):
    a1: Any           # DeviceArray
    weights: Any
    ids: Any
    T: int
    H: int
    top_k: int


class FlashInferCutlassMoEPrepareAndFinalize:
    """What both paths share: argument checks, the router weight on the input, the
    quantization, output buffers. Not used directly: see the two subclasses and
    ``create_prepare_finalize``.

    Args:
        use_dp: data parallelism (communicate) or not (quantize only).
        num_dispatchers: reported by ``num_dispatchers()``.
        group: the data-parallel ranks (default: ``moecomm.init()``'s group).
    """

    def __init__(self, use_dp: bool, num_dispatchers: int = 1, *,
                 group: ProcessGroup | None = None):
        self.use_dp = bool(use_dp)
        self.num_dispatchers_ = int_at_least("num_dispatchers", num_dispatchers)
        self.group = default_group() if group is None else group
        self.local_tokens: int | None = None
        self.local_sizes: tuple | None = None
        self.device_id = cupy.cuda.runtime.getDevice()
        self._buffers: dict = {}
        self._launchers: dict = {}
        self._closed = False

    # -- the reference's queries ------------------------------------------------------------
    @property
    def activation_format(self) -> str:
        return "standard"

    def max_num_tokens_per_rank(self) -> int | None:
        return None

    def topk_indices_dtype(self):
        return None

    def num_dispatchers(self) -> int:
        return self.num_dispatchers_

    # -- shared steps -------------------------------------------------------------------------
    def _inputs(self, a1, topk_weights, topk_ids, num_experts, expert_map,
                apply_router_weight_on_input, quant_config, handle) -> _Inputs:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if not isinstance(quant_config, FusedMoEQuantConfig):
            raise TypeError(f"quant_config: expected a FusedMoEQuantConfig, got "
                            f"{type(quant_config).__name__}")
        int_at_least("num_experts", num_experts)
        a = import_array(a1, "a1", dtype=FLOAT_DTYPES, ndim=2, device=self.device_id, stream=handle,
                         writable=bool(apply_router_weight_on_input))  # scaled in place
        T, H = a.shape
        ids = import_array(topk_ids, "topk_ids", dtype=np.int32, ndim=2, device=self.device_id,
                           stream=handle)
        if ids.shape[0] != T or ids.shape[1] < 1:
            raise ValueError(f"topk_ids: shape {tuple(ids.shape)}, expected [T={T}, top_k >= 1]")
        w = import_array(topk_weights, "topk_weights", dtype=np.float32, shape=ids.shape,
                         device=self.device_id, stream=handle)
        if expert_map is not None:
            import_array(expert_map, "expert_map", dtype=np.int32, shape=(int(num_experts),),
                         device=self.device_id, stream=handle)
        if apply_router_weight_on_input and ids.shape[1] != 1:
            raise ValueError(f"apply_router_weight_on_input needs top_k == 1, got top_k="
                             f"{ids.shape[1]}")
        # What the quantizer would refuse, refused before a1 is scaled in place.
        if quant_config.quant_dtype is not None:
            if H % NVFP4_BLOCK:
                raise ValueError(f"a1: hidden size {H} is not a multiple of {NVFP4_BLOCK}, as "
                                 f"{quant_config.quant_dtype.upper()} needs")
            if T:  # an empty a1 never reaches the quantizer
                require_aligned("a1", a.ptr)
            ignored = quant_config.quant_dtype == "fp8" and quant_config.block_shape is not None
            if quant_config.a1_gscale is not None and T and not ignored:
                gs = import_array(quant_config.a1_gscale, "quant_config.a1_gscale",
                                  dtype=np.float32, device=self.device_id, stream=handle)
                if gs.size != 1:
                    raise ValueError(f"quant_config.a1_gscale: expected a one-element fp32 "
                                     f"array, got shape {gs.shape}")
        if quant_config.quant_dtype == "fp8" and quant_config.block_shape is not None:
            try:
                _quant().block_group_size(quant_config.block_shape, H)
            except ValueError as exc:
                raise ValueError(f"quant_config.{exc}") from None
        return _Inputs(a, w, ids, T, H, ids.shape[1])

    @staticmethod
    def _quant_rows(inputs: _Inputs, qc: FusedMoEQuantConfig) -> tuple[int, int | None]:
        """Bytes per token of ``_quantize``'s codes and of its linear scales (None: no
        per-token scales: unquantized, or one static FP8 scale)."""
        H = inputs.H
        if qc.quant_dtype is None:
            return H * inputs.a1.dtype.itemsize, None
        if qc.quant_dtype == "nvfp4":
            return H // 2, H // NVFP4_BLOCK
        if qc.block_shape is not None:
            return H, 4 * (H // qc.block_shape[-1])
        return H, None if qc.a1_gscale is not None else 4

    def _sizes(self, T: int, sizes) -> tuple:
        if not self.use_dp:
            return (T,)
        if sizes is None:
            sizes = self.group.allgather(T)
        sizes = check_sizes(sizes, self.group.size)
        if sizes[self.group.rank] != T:
            raise ValueError(f"sizes[{self.group.rank}]={sizes[self.group.rank]}, but a1 has {T} "
                             "tokens on this rank")
        if _group.DEBUG:
            self.group.check_uniform("prepare sizes", sizes)
        return sizes

    def _apply_router_weight_on_input(self, inputs: _Inputs, apply: bool, handle: int) -> None:
        """``a1 *= T(topk_weights)`` in place (top_k == 1, checked)."""
        if not apply or inputs.a1.size == 0:
            return
        launcher = self._launcher(f"scale_rows_{_SUFFIX[inputs.a1.dtype]}", ScaleRowsArgs)
        args = launcher.args
        args.x, args.w, args.tokens, args.cols = (inputs.a1.ptr, inputs.weights.ptr, inputs.T,
                                                  inputs.H)
        launcher(max(1, min(1024, -(-inputs.a1.size // 256))), 256, handle)

    def _quantize(self, inputs: _Inputs, qc: FusedMoEQuantConfig, swizzled: bool, handle: int):
        """(a1q, a1q_scale) of ``a1``; a1 itself and None without quantization."""
        a, T, H = inputs.a1, inputs.T, inputs.H
        if qc.quant_dtype is None:
            return _cupy(a, handle), None
        if qc.quant_dtype == "nvfp4":
            q = self._buffer("a1q", (T, H // 2), np.uint8, handle)
            cols = H // NVFP4_BLOCK
            sf = self._buffer("a1q_scale", (compute_fp4_swizzled_layout_sf_size(T, cols),)
                              if swizzled else (T, cols), np.uint8, handle)
            if T == 0:
                return q, sf
            return _quant().quantize(a.obj, "nvfp4", scale=qc.a1_gscale,
                                     is_fp4_scale_swizzled=swizzled, out=q, scale_out=sf,
                                     stream=handle)
        q = self._buffer("a1q", (T, H), np.uint8, handle)
        if qc.block_shape is not None:   # per-token-group scales, computed (group checked)
            group = qc.block_shape[-1]
            scale, per_token = None, False
            sf = self._buffer("a1q_scale", (T, H // group), np.float32, handle)
        elif qc.a1_gscale is not None:   # static per-tensor
            scale, per_token, sf = qc.a1_gscale, False, None
        else:                            # dynamic per-token
            scale, per_token = None, True
            sf = self._buffer("a1q_scale", (T, 1), np.float32, handle)
        if T == 0:
            return q, (sf if sf is not None else as_array(scale, "quant_config.a1_gscale"))
        return _quant().quantize(a.obj, "fp8", scale=scale, per_act_token_quant=per_token,
                                 block_shape=qc.block_shape, out=q, scale_out=sf,
                                 stream=handle)

    def _interleave(self, sf_linear: cupy.ndarray, handle: int) -> cupy.ndarray:
        rows, cols = sf_linear.shape
        out = self._buffer("a1q_scale_swizzled",
                           (compute_fp4_swizzled_layout_sf_size(rows, cols),), np.uint8, handle)
        if rows == 0:
            return out
        return _quant().nvfp4_block_scale_interleave(sf_linear, out=out, stream=handle)

    def _map_ids(self, ids: cupy.ndarray, expert_map, num_experts: int, handle: int) -> None:
        if expert_map is None or ids.size == 0:
            return
        emap = import_array(expert_map, "expert_map", dtype=np.int32, device=self.device_id,
                            stream=handle)
        launcher = self._launcher("map_expert_ids", MapIdsArgs)
        args = launcher.args
        args.ids, args.expert_map = ids.data.ptr, emap.ptr
        args.n, args.num_experts = ids.size, num_experts
        launcher(max(1, min(1024, -(-ids.size // 256))), 256, handle)

    def _buffer(self, name: str, shape, dtype, handle: int) -> cupy.ndarray:
        """An output array kept per (name, shape, dtype): rewritten by the next call."""
        key = (name, tuple(shape), np.dtype(dtype))
        arr = self._buffers.get(key)
        if arr is None:
            if len(self._buffers) > 64:
                self._buffers.clear()
            arr = self._buffers[key] = empty(shape, dtype, handle)
        return arr

    def _launcher(self, kernel: str, args_type) -> Launcher:
        launcher = self._launchers.get(kernel)
        if launcher is None:
            launcher = self._launchers[kernel] = Launcher(get_kernel(_SOURCE, kernel), args_type)
        return launcher

    @staticmethod
    def _weight_and_reduce(impl) -> None:
        if impl not in (None, "noop", "NoOP"):
            raise ValueError(f"weight_and_reduce_impl={impl!r}: fused_expert_output must already "
                             "be weighted and reduced over top-k (only None / 'noop')")

    def _copy(self, output, fused_expert_output, handle: int) -> None:
        """``output[...] = fused_expert_output`` (same dtype and shape), one async copy."""
        src = import_array(fused_expert_output, "fused_expert_output", dtype=FLOAT_DTYPES,
                           device=self.device_id, stream=handle)
        dst = import_array(output, "output", dtype=src.dtype, shape=src.shape,
                           device=self.device_id, stream=handle, writable=True)
        if src.nbytes and src.ptr != dst.ptr:
            cupy.cuda.runtime.memcpyAsync(dst.ptr, src.ptr, src.nbytes,
                                          cupy.cuda.runtime.memcpyDeviceToDevice, handle)

    def poison(self) -> None:
        """Fill the kept output buffers (and the all-to-all workspace) with 0xA5 bytes, so
        tests can prove every output is written. Synchronizes the device; not collective:
        call it while no peer writes into this rank's buffers."""
        cupy.cuda.runtime.deviceSynchronize()
        for arr in self._buffers.values():
            cupy.ndarray((arr.nbytes,), np.uint8, arr.data).fill(0xA5)
        manager = getattr(self, "all2all_manager", None)
        if manager is not None:
            manager.poison()
        cupy.cuda.runtime.deviceSynchronize()

    def close(self) -> None:
        """Collective when ``use_dp``: frees the workspaces. Closing twice is harmless."""
        self._closed = True
        self._buffers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cupy(arr, handle: int) -> cupy.ndarray:
    """A zero-copy CuPy view of an imported caller array."""
    return arr.obj if isinstance(arr.obj, cupy.ndarray) else as_array(arr.obj, "array",
                                                                     stream=handle)


def _workspace_bytes(max_num_tokens: int, top_k: int, hidden_size: int) -> list[int]:
    """Bytes per token of the gathered tensors, sized for the widest case: fp32 weights,
    int32 ids, activations of up to 4 bytes per element, scales of up to hidden / 4 bytes."""
    return [4 * top_k, 4 * top_k, 4 * hidden_size, max(16, hidden_size // 4)]


class FlashInferAllGatherMoEPrepareAndFinalize(FlashInferCutlassMoEPrepareAndFinalize):
    """The all-gather-v / reduce-scatter-v path (see the module doc).

    Args:
        use_dp, num_dispatchers, group: as the base class.
        max_num_tokens, top_k, hidden_size: size the ``VCollectiveWorkspace`` (needed with
            ``use_dp`` unless ``workspace`` is given): tokens per rank, experts per token,
            elements per token.
        workspace: a ``VCollectiveWorkspace`` to use (not closed by ``close()``).
        num_experts: accepted for the factory's sake (routing does not depend on it here).
        timeout_s: bound of the IPC waits.
    """

    def __init__(self, use_dp: bool, num_dispatchers: int = 1, *, group=None,
                 max_num_tokens: int | None = None, top_k: int | None = None,
                 hidden_size: int | None = None, num_experts: int | None = None,
                 workspace: VCollectiveWorkspace | None = None, timeout_s: float | None = None):
        super().__init__(use_dp, num_dispatchers, group=group)
        self.workspace, self._owns_workspace = None, False
        if self.use_dp:
            if workspace is None:
                if None in (max_num_tokens, top_k, hidden_size):
                    raise ValueError("use_dp needs max_num_tokens, top_k and hidden_size (or a "
                                     "workspace)")
                per = _workspace_bytes(int_at_least("max_num_tokens", max_num_tokens),
                                       int_at_least("top_k", top_k),
                                       int_at_least("hidden_size", hidden_size))
                sizes = [int(max_num_tokens)] * self.group.size
                need = max(gather_layout(sizes, per)[1], scatter_bytes(sizes, max(per)))
                workspace = VCollectiveWorkspace(self.group, need, timeout_s=timeout_s)
                self._owns_workspace = True
            elif not isinstance(workspace, VCollectiveWorkspace):
                raise TypeError(f"workspace: expected a VCollectiveWorkspace, got "
                                f"{type(workspace).__name__}")
            self.workspace = workspace

    def prepare(self, a1, topk_weights, topk_ids, num_experts: int, expert_map,
                apply_router_weight_on_input: bool, quant_config: FusedMoEQuantConfig, *,
                sizes=None, stream=None) -> PrepareResult:
        """Quantize and all-gather; returns ``(a1q, a1q_scale, None, topk_ids,
        topk_weights)`` with ``sum(sizes)`` rows (``use_dp``) or this rank's. ``expert_map``
        is checked but not applied (ids stay global: every rank sees every token)."""
        handle = stream_handle(stream)
        x = self._inputs(a1, topk_weights, topk_ids, num_experts, expert_map,
                         apply_router_weight_on_input, quant_config, handle)
        sizes = self._sizes(x.T, sizes)
        if self.use_dp:  # what all_gatherv would refuse, before a1 is scaled in place
            q_row, sf_row = self._quant_rows(x, quant_config)
            self.workspace.check_gather(sizes, [4 * x.top_k, 4 * x.top_k, q_row]
                                        + ([sf_row] if sf_row is not None else []))
        self._apply_router_weight_on_input(x, apply_router_weight_on_input, handle)
        a1q, a1q_scale = self._quantize(x, quant_config, swizzled=not self.use_dp, handle=handle)
        if not self.use_dp:
            return PrepareResult(a1q, a1q_scale, None, _cupy(x.ids, handle),
                                 _cupy(x.weights, handle))
        tensors = [_cupy(x.weights, handle), _cupy(x.ids, handle), a1q]
        gather_scale = a1q_scale is not None and not quant_config.per_tensor
        if gather_scale:
            tensors.append(a1q_scale)
        total = sum(sizes)
        outs = [self._buffer(f"gathered{i}", (total, *t.shape[1:]), t.dtype, handle)
                for i, t in enumerate(tensors)]
        self.workspace.all_gatherv(tensors, sizes, outs=outs, stream=handle)
        self.local_tokens, self.local_sizes = x.T, sizes  # what finalize reuses
        w, ids, q = outs[:3]
        scale = outs[3] if gather_scale else a1q_scale
        if quant_config.quant_dtype == "nvfp4":
            scale = self._interleave(scale, handle)
        return PrepareResult(q, scale, None, ids, w)

    def finalize(self, output, fused_expert_output, topk_weights, topk_ids,
                 apply_router_weight_on_input: bool, weight_and_reduce_impl=None, *,
                 stream=None) -> None:
        """``output [T, H] = reduce_scatterv(fused_expert_output [sum(sizes), H])`` (or a
        copy without ``use_dp``)."""
        self._weight_and_reduce(weight_and_reduce_impl)
        handle = stream_handle(stream)
        if not self.use_dp:
            self._copy(output, fused_expert_output, handle)
            return
        if self.local_sizes is None:
            raise RuntimeError("finalize needs a prepare first (it reuses its sizes)")
        self.workspace.reduce_scatterv(fused_expert_output, self.local_sizes, out=output,
                                       stream=handle)

    def close(self) -> None:
        if not self._closed and self._owns_workspace and self.workspace is not None:
            self.workspace.close()
        super().close()


class _A2AInfo(NamedTuple):
    """What finalize needs from prepare (the reference's ``alltoall_info``); across nodes
    also the plan's gathered-row -> received-row map, held here rather than looked up
    again in the buffer cache, which may drop it in between."""

    sizes: tuple
    runtime_max: int
    num_tokens: int
    inv: cupy.ndarray | None = None


class FlashInferAllToAllMoEPrepareAndFinalize(FlashInferCutlassMoEPrepareAndFinalize):
    """The all-to-all-v path (see the module doc).

    Args:
        use_dp, num_dispatchers, group: as the base class.
        max_num_tokens, top_k, num_experts, hidden_size: the exchange's limits (needed
            with ``use_dp``): tokens per rank, experts per token, experts (a multiple of
            the group size), elements per token.
        timeout_s: bound of the IPC waits.

    ``all2all_manager`` is the ``MoeAlltoAll`` (None across nodes or without ``use_dp``);
    ``alltoall_info`` what the last prepare left for finalize.
    """

    def __init__(self, use_dp: bool, num_dispatchers: int = 1, *, group=None,
                 max_num_tokens: int | None = None, top_k: int | None = None,
                 num_experts: int | None = None, hidden_size: int | None = None,
                 timeout_s: float | None = None):
        super().__init__(use_dp, num_dispatchers, group=group)
        self.alltoall_info: _A2AInfo | None = None
        self.all2all_manager: MoeAlltoAll | None = None
        self.workspace: VCollectiveWorkspace | None = None
        if not self.use_dp:
            return
        if None in (max_num_tokens, top_k, num_experts, hidden_size):
            raise ValueError("use_dp needs max_num_tokens, top_k, num_experts and hidden_size")
        self.max_num_tokens = int_at_least("max_num_tokens", max_num_tokens)
        self.top_k = int_at_least("top_k", top_k)
        self.num_experts = int_at_least("num_experts", num_experts)
        hidden = int_at_least("hidden_size", hidden_size)
        ep = self.group.size
        if self.num_experts % ep:
            raise ValueError(f"num_experts={self.num_experts} is not a multiple of the group "
                             f"size {ep}")
        self.experts_per_rank = self.num_experts // ep
        per = _workspace_bytes(self.max_num_tokens, self.top_k, hidden)
        if self.group.spans_nodes:
            if ep > A2A_PLAN_MAX_RANKS:
                raise ValueError(f"group of {ep} ranks: the all-to-all-v path across nodes "
                                 f"serves up to {A2A_PLAN_MAX_RANKS}")
            sizes = [self.max_num_tokens] * ep
            need = max(gather_layout(sizes, per)[1], scatter_bytes(sizes, 4 * hidden))
            self.workspace = VCollectiveWorkspace(self.group, need, timeout_s=timeout_s)
        else:
            size = moe_a2a_get_workspace_size_per_rank(ep, self.max_num_tokens, sum(per),
                                                       4 * hidden, num_payloads=4)
            self.all2all_manager = MoeAlltoAll(self.group, self.max_num_tokens, self.top_k,
                                               self.num_experts, size, timeout_s=timeout_s)

    def prepare(self, a1, topk_weights, topk_ids, num_experts: int, expert_map,
                apply_router_weight_on_input: bool, quant_config: FusedMoEQuantConfig, *,
                sizes=None, stream=None) -> PrepareResult:
        """Plan, quantize (linear scales), exchange, interleave; returns ``(a1q, a1q_scale,
        None, topk_ids, topk_weights)`` with ``ep_size * max(sizes)`` rows (``use_dp``;
        see the module doc for padding rows) or this rank's."""
        handle = stream_handle(stream)
        x = self._inputs(a1, topk_weights, topk_ids, num_experts, expert_map,
                         apply_router_weight_on_input, quant_config, handle)
        if not self.use_dp:
            self._apply_router_weight_on_input(x, apply_router_weight_on_input, handle)
            a1q, a1q_scale = self._quantize(x, quant_config, swizzled=True, handle=handle)
            return PrepareResult(a1q, a1q_scale, None, _cupy(x.ids, handle),
                                 _cupy(x.weights, handle))
        qc = quant_config
        if qc.quant_dtype == "fp8":
            raise ValueError("the all-to-all-v path carries NVFP4 or unquantized activations; "
                             "FP8 takes the all-gather path (create_prepare_finalize)")
        if int(num_experts) != self.num_experts:
            raise ValueError(f"num_experts={num_experts}, the exchange was made for "
                             f"{self.num_experts}")
        if x.top_k != self.top_k:
            raise ValueError(f"topk_ids: top_k={x.top_k}, the exchange was made for {self.top_k}")
        if x.T > self.max_num_tokens:
            raise ValueError(f"a1: {x.T} tokens exceed max_num_tokens={self.max_num_tokens}")
        if qc.quant_dtype == "nvfp4" and (x.H // NVFP4_BLOCK) % 4:
            raise ValueError(f"a1: hidden size {x.H}: the all-to-all-v path needs a multiple of "
                             "64 (scale rows of hidden / 16 bytes move in 4-byte words)")
        if qc.quant_dtype is None and (x.H * x.a1.itemsize) % 4:
            raise ValueError(f"a1: {x.H * x.a1.itemsize} bytes per token, not a multiple of 4")
        sizes = self._sizes(x.T, sizes)
        codes, scales = self._quant_rows(x, qc)
        rows = [codes] + ([scales] if scales is not None else []) + [4 * x.top_k] * 2
        self._check_exchange(sizes, rows)  # before a1 is scaled in place
        self._apply_router_weight_on_input(x, apply_router_weight_on_input, handle)
        a1q, a1q_scale = self._quantize(x, qc, swizzled=False, handle=handle)
        tensors = [a1q] + ([a1q_scale] if a1q_scale is not None else []) + [
            _cupy(x.weights, handle)]
        recv, ids = self._dispatch(x.ids, tensors, sizes, expert_map, handle)
        scale = self._interleave(recv[1], handle) if a1q_scale is not None else None
        return PrepareResult(recv[0], scale, None, ids, recv[-1])

    def dispatch(self, topk_ids, tensors, *, sizes=None, expert_map=None, stream=None):
        """The all-to-all-v exchange on its own: every array of ``tensors`` (1 to 7 arrays
        ``[T, ...]`` of any dtype, rows of a multiple of 4 bytes) goes along the plan of
        ``topk_ids`` (int32 ``[T, top_k]``), as ``prepare`` moves the activations.

        Returns ``(received, ids)``: one ``[ep_size * max(sizes), ...]`` array per tensor
        (rows laid out as in the module doc) and the received ids (-1 where not owned here
        and in padding rows; renumbered by ``expert_map``). ``combine`` brings rows back.
        """
        if not self.use_dp:
            raise RuntimeError("dispatch needs use_dp=True (without it nothing moves)")
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        handle = stream_handle(stream)
        ids = import_array(topk_ids, "topk_ids", dtype=np.int32, ndim=2, device=self.device_id,
                           stream=handle)
        T, k = ids.shape
        if k != self.top_k:
            raise ValueError(f"topk_ids: top_k={k}, the exchange was made for {self.top_k}")
        if T > self.max_num_tokens:
            raise ValueError(f"topk_ids: {T} tokens exceed max_num_tokens={self.max_num_tokens}")
        if not isinstance(tensors, (list, tuple)) or not 1 <= len(tensors) <= A2A_MAX_PAYLOADS - 1:
            raise ValueError(f"tensors: expected a list of 1 to {A2A_MAX_PAYLOADS - 1} arrays")
        arrays = []
        for i, t in enumerate(tensors):
            a = import_array(t, f"tensors[{i}]", device=self.device_id, stream=handle)
            if a.ndim < 1 or a.shape[0] != T:
                raise ValueError(f"tensors[{i}]: shape {tuple(a.shape)}, expected [T={T}, ...]")
            if (a.itemsize * math.prod(a.shape[1:])) % 4 or a.ptr % 4:
                raise ValueError(f"tensors[{i}]: rows and address must be multiples of 4 bytes")
            arrays.append(_cupy(a, handle))
        if expert_map is not None:
            import_array(expert_map, "expert_map", dtype=np.int32, shape=(self.num_experts,),
                         device=self.device_id, stream=handle)
        sizes = self._sizes(T, sizes)
        rows = [a.itemsize * math.prod(a.shape[1:]) for a in arrays] + [4 * k]
        self._check_exchange(sizes, rows)  # nothing is changed before this: a clear error
        return self._dispatch(ids, arrays, sizes, expert_map, handle)

    def _check_exchange(self, sizes, row_bytes) -> None:
        """What the exchange would refuse, before anything is launched: a rank's tokens
        past max_num_tokens, a dispatch whose combine has not run, rows of ``row_bytes``
        (one int per tensor, the ids last) the workspace cannot hold."""
        if max(sizes) > self.max_num_tokens:
            raise ValueError(f"sizes: {max(sizes)} tokens on rank {sizes.index(max(sizes))} "
                             f"exceed max_num_tokens={self.max_num_tokens}")
        manager = self.all2all_manager
        if manager is not None:
            if manager.phase == Phase.DISPATCHED:
                raise RuntimeError("prepare / dispatch called twice without finalize / "
                                   "combine (they alternate)")
            manager.dispatch_plan(max(1, max(sizes)), row_bytes)
        else:
            self.workspace.check_gather(sizes, row_bytes)

    def _dispatch(self, ids, tensors: list, sizes, expert_map, handle: int):
        """``tensors`` and the ids along the plan (validated arguments)."""
        rmax = max(1, max(sizes))
        rows = self.group.size * rmax
        payloads = [*tensors, _cupy(ids, handle)]
        id_index = len(tensors)
        inv = None
        if self.all2all_manager is not None:
            recv = self.all2all_manager.dispatch(ids.obj, payloads, rmax,
                                                 invalid_token_expert_id=-1,
                                                 expert_id_payload_index=id_index, stream=handle)
            recv = [v.reshape(rows, *v.shape[2:]) for v in recv]
        else:
            recv, inv = self._nccl_dispatch(payloads, id_index, sizes, rmax, handle)
        self._map_ids(recv[id_index], expert_map, self.num_experts, handle)
        self.local_tokens, self.local_sizes = ids.shape[0], sizes
        self.alltoall_info = _A2AInfo(sizes, rmax, ids.shape[0], inv)
        return recv[:id_index], recv[id_index]

    def _nccl_dispatch(self, payloads, id_index: int, sizes, rmax: int,
                       handle: int) -> tuple[list, cupy.ndarray]:
        """All-gather every rank's tokens, then take the rows routed here (module doc).
        Returns the received arrays and the plan's map of gathered rows to received rows
        (-1: not received here), which finalize needs."""
        total, ep = sum(sizes), self.group.size
        gathered = [self._buffer(f"gathered{i}", (total, *p.shape[1:]), p.dtype, handle)
                    for i, p in enumerate(payloads)]
        self.workspace.all_gatherv(payloads, sizes, outs=gathered, stream=handle)
        inv = self._buffer("inv", (max(1, total),), np.int32, handle)
        src_row = self._buffer("src_row", (ep * rmax,), np.int32, handle)
        recv = [self._buffer(f"recv{i}", (ep * rmax, *p.shape[1:]), p.dtype, handle)
                for i, p in enumerate(payloads)]
        plan = self._launcher("a2a_plan", A2aPlanArgs)
        a = plan.args
        a.ids, a.inv, a.src_row = gathered[id_index].data.ptr, inv.data.ptr, src_row.data.ptr
        a.rows[:ep] = sizes
        a.top_k, a.num_experts, a.experts_per_rank = self.top_k, self.num_experts, self.experts_per_rank
        a.rank, a.runtime_max = self.group.rank, rmax
        plan(ep, 1024, handle)
        take = self._launcher("a2a_take_rows", A2aTakeRowsArgs)
        t = take.args
        for i, (g, r) in enumerate(zip(gathered, recv)):
            t.src[i], t.dst[i] = g.data.ptr, r.data.ptr
            t.row_bytes[i] = g.itemsize * math.prod(g.shape[1:])
        t.src_row, t.n_rows = src_row.data.ptr, ep * rmax
        t.num_payloads, t.id_payload = len(recv), id_index
        t.lo = self.group.rank * self.experts_per_rank
        t.hi = t.lo + self.experts_per_rank
        take(max(1, min(1024, -(-ep * rmax // 8))), 256, handle)
        return recv, inv

    def finalize(self, output, fused_expert_output, topk_weights, topk_ids,
                 apply_router_weight_on_input: bool, weight_and_reduce_impl=None, *,
                 stream=None) -> None:
        """``output [T, H]``: per token, the rows its target ranks produced
        (``fused_expert_output [ep_size * max(sizes), H]``), summed in rank order (or a
        copy without ``use_dp``)."""
        self._weight_and_reduce(weight_and_reduce_impl)
        handle = stream_handle(stream)
        if not self.use_dp:
            self._copy(output, fused_expert_output, handle)
            return
        self.combine(fused_expert_output, output, stream=handle)

    def combine(self, expert_rows, out=None, *, stream=None):
        """Row i of ``expert_rows`` (bf16/fp16/fp32 ``[ep_size * max(sizes), H]``, ``H *
        itemsize`` a multiple of 16: this rank's output for received row i of the last
        dispatch) back to its token: per token the fp32 sum, from +0, of the rows its
        target ranks produced, in rank order, rounded once (+0 for a token routed nowhere).
        Top-k weights are not applied: the rows come weighted. Returns ``out`` ``[T, H]``
        (or a new array); padding rows are never read."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        handle = stream_handle(stream)
        info = self.alltoall_info
        if info is None:
            raise RuntimeError("combine / finalize needs a prepare first (or a dispatch)")
        ep, rmax = self.group.size, info.runtime_max
        y = as_array(expert_rows, "fused_expert_output", dtype=FLOAT_DTYPES, ndim=2,
                     device=self.device_id, stream=handle)
        if y.shape[0] != ep * rmax:
            raise ValueError(f"fused_expert_output: shape {tuple(y.shape)}, expected "
                             f"[ep_size * runtime_max = {ep * rmax}, hidden]")
        row = y.shape[1] * y.itemsize
        if row % 16:
            raise ValueError(f"fused_expert_output: {row} bytes per row, not a multiple of 16")
        require_aligned("fused_expert_output", y.data.ptr)
        if self.all2all_manager is not None:
            return self.all2all_manager.combine(y.reshape(ep, rmax, y.shape[1]), rmax,
                                                stream=handle, out=out)
        if out is not None:  # what reduce_scatterv would refuse, before the put launches
            o = import_array(out, "out", dtype=y.dtype,
                             shape=(info.sizes[self.group.rank], y.shape[1]),
                             device=self.device_id, stream=handle, writable=True)
            require_aligned("out", o.ptr)
        total = sum(info.sizes)
        z = self._buffer("put_back", (total, y.shape[1]), y.dtype, handle)
        put = self._launcher("a2a_put_rows", A2aPutRowsArgs)
        p = put.args
        p.y, p.z = y.data.ptr, z.data.ptr
        p.inv = info.inv.data.ptr
        p.total, p.row_bytes = total, row
        if total:
            put(max(1, min(1024, -(-total // 8))), 256, handle)
        return self.workspace.reduce_scatterv(z, info.sizes, out=out, stream=handle)

    def close(self) -> None:
        if not self._closed:
            if self.all2all_manager is not None:
                self.all2all_manager.close()
            if self.workspace is not None:
                self.workspace.close()
        super().close()


def create_prepare_finalize(use_dp: bool, use_nvfp4: bool = False,
                            enable_alltoallv: bool = False,
                            **options) -> FlashInferCutlassMoEPrepareAndFinalize:
    """The reference's choice: NVFP4 with ``enable_alltoallv`` takes the all-to-all-v path,
    everything else (FP8 always) the all-gather path. ``options`` go to the class
    (``group``, ``max_num_tokens``, ``top_k``, ``num_experts``, ``hidden_size``,
    ``timeout_s``, ``num_dispatchers``)."""
    if use_nvfp4 and enable_alltoallv:
        return FlashInferAllToAllMoEPrepareAndFinalize(use_dp, **options)
    return FlashInferAllGatherMoEPrepareAndFinalize(use_dp, **options)


create_flashinfer_prepare_finalize = create_prepare_finalize
