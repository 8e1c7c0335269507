"""Standalone quantizers: static / dynamic per-token / per-token-group FP8 and NVFP4, and the
NVFP4 scale-factor interleave (reference document 002: ``moe_kernel_quantize_input``,
``nvfp4_block_scale_interleave``).

``quantize(x, quant_dtype, ...)`` takes ``x`` [M, K] (bf16, fp16 or fp32, C-contiguous rows,
a 16-byte aligned address, ``K`` a positive multiple of 16) through DLPack and returns
``(codes, scales)`` as ``cupy.ndarray`` views (of ``out`` / ``scale_out`` when given, which
may be CuPy arrays, PyTorch tensors or any DLPack producer; codes come back as uint8 also
where ``out`` is a float8 tensor). Modes, each bit-exact with ``moecomm.reference``:

* **FP8 static per-tensor** (``scale``: the dequantization scale, fp32 ``[1]``, finite and
  > 0): codes uint8 [M, K], ``q = e4m3(v * fp32(1 / scale))`` (``reference.quant_fp8``);
  returns ``(codes, scale)``, the scale passed through.
* **FP8 dynamic per-token** (``per_act_token_quant=True``): codes + fp32 [M, 1],
  ``s = max(amax / 448, 2^-9 / 448)``, ``q = e4m3(v / s)``
  (``reference.quant_fp8_dynamic_per_token``).
* **FP8 per-token-group** (``block_shape=[bn, G]``): codes + per-group scales.
  ``ScaleFormat.FP32``: fp32 [M, K/G], ``s = max(amax / 448, 1e-10)``,
  ``q = e4m3(v * fp32(1 / s))`` (``reference.quant_fp8_per_token_group_fp32``, the MoE FP8
  dispatch's "fp32" format). ``ScaleFormat.UE8M0``: power-of-two scales
  (``reference.quant_fp8_per_token_group``), four exponent bytes per int32 in the MN-major
  TMA-aligned storage of ``ue8m0_mn_major_storage_size(M, K/G)`` words (gaps and unused
  bytes 0), returned as the int32 [M, ceil(K/G/4)] view with strides (1, align4(M)).
* **NVFP4** (``scale``: the global scale, fp32 ``[1]``, finite and > 0; like every
  device scalar here it is not checked, being on the device): packed e2m1 uint8 [M, K/2] (even
  element in the low nibble) + e4m3 block scales (``reference.quant_nvfp4``): swizzled
  128x4, flat uint8 of ``compute_fp4_swizzled_layout_sf_size(M, K/16)`` bytes with the
  padding written 0 (``scale_out`` may be larger, e.g. sized for a maximum token count),
  or linear uint8 [M, K/16] (``is_fp4_scale_swizzled=False``).

Choices, as vLLM's ``moe_kernel_quantize_input``: ``quant_dtype=None`` returns ``(x, None)``
untouched; the activation groups of ``block_shape=[bn, G]`` are ``G`` elements of one token
(``bn``, the weights' block rows, does not apply to activations); ``is_fp4_scale_swizzled``
only concerns NVFP4. ``G`` must be a multiple of 16 dividing ``K``. Dynamic per-tensor FP8
(no scale, no per-token, no groups) is not offered: pass ``per_act_token_quant=True`` or a
scale. NaN inputs are outside every quantizer's contract.

Rules of the house: every check raises ``TypeError``/``ValueError`` naming the argument
before any launch; no host synchronisation, no allocation when ``out`` and ``scale_out``
are given, no data-dependent Python: calls can be captured in a CUDA graph and replayed
(``scale`` is read on the device, so a graph sees its updates). ``stream=`` as everywhere.

Kernels: ``kernels_cu/quant.cu`` (formulas from ``kernels_cu/quant.cuh``, shared with the
fused all-reduce), launched through ``moecomm.launch.Launcher`` with ``QuantArgs`` and, by
default (``enable_pdl=True``, as FlashInfer's ``fp4_quantize`` offers it), programmatic
dependent launch: a kernel reads nothing before the previous kernel of the stream has
completed, but its launch overlaps that kernel's tail, and the next kernel's launch
overlaps its own (back to back on H200, about 0.3 us of a small call; a no-op before
sm_90).
"""

from __future__ import annotations

import enum
import threading

import cupy
import numpy as np

from . import kernels
from .constants import NVFP4_BLOCK, VECTOR_BYTES
from .kernel_args import QuantArgs
from .launch import Launcher
from .layouts import compute_fp4_swizzled_layout_sf_size, pad_up, ue8m0_mn_major_storage_size, \
    ue8m0_words_per_row
from .op import bool_option, device_facts, empty, require_aligned
from .tensors import FLOAT_DTYPES, DeviceArray, import_array, stream_handle

__all__ = ["QuantDtype", "ScaleFormat", "quantize", "nvfp4_block_scale_interleave",
           "moe_kernel_quantize_input", "compute_fp4_swizzled_layout_sf_size",
           "ue8m0_mn_major_storage_size"]

_SOURCE = "quant.cu"
_THREADS = 256
_MAX_UNITS = 1 << 31  # work items of one launch (32-bit indexing in the kernels)


class QuantDtype(enum.Enum):
    """What ``quantize`` produces: e4m3 codes or NVFP4 (e2m1 + e4m3 block scales)."""

    FP8 = "fp8"
    NVFP4 = "nvfp4"


class ScaleFormat(enum.Enum):
    """Scales of per-token-group FP8: fp32 per group, or UE8M0 exponents packed four per
    int32 in the MN-major TMA-aligned storage (DeepGEMM's)."""

    FP32 = "fp32"
    UE8M0 = "ue8m0"


_SUFFIX = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32"}
if FLOAT_DTYPES and len(FLOAT_DTYPES) == 3:
    _SUFFIX[FLOAT_DTYPES[1]] = "bf16"

_CODE_DTYPES = (np.dtype(np.uint8),)
try:
    import ml_dtypes

    _CODE_DTYPES += (np.dtype(ml_dtypes.float8_e4m3fn),)
except ImportError:  # pragma: no cover - ml-dtypes is a core dependency
    pass
_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)
_U8 = np.dtype(np.uint8)


def _quant_dtype(value) -> QuantDtype | None:
    """A QuantDtype from the enum, "fp8"/"nvfp4", an e4m3 float8 dtype (NumPy/ml_dtypes or
    torch.float8_e4m3fn, as vLLM passes it), or None."""
    if value is None or isinstance(value, QuantDtype):
        return value
    if isinstance(value, str):
        try:
            return QuantDtype(value)
        except ValueError:
            pass
    elif str(value) == "torch.float8_e4m3fn":
        return QuantDtype.FP8
    else:
        try:
            if np.dtype(value) == _CODE_DTYPES[-1] and len(_CODE_DTYPES) > 1:
                return QuantDtype.FP8
        except TypeError:
            pass
    raise ValueError(f"quant_dtype={value!r}: expected a QuantDtype, 'fp8', 'nvfp4', "
                     f"float8_e4m3fn or None")


def _scale_format(value) -> ScaleFormat:
    if isinstance(value, ScaleFormat):
        return value
    try:
        return ScaleFormat(value)
    except ValueError:
        raise ValueError(f"scale_format={value!r}: expected ScaleFormat.FP32, "
                         f"ScaleFormat.UE8M0, 'fp32' or 'ue8m0'") from None


def block_group_size(block_shape, cols: int) -> int:
    """G of ``block_shape=[bn, G]`` (checked: two positive ints, 16 | G, G | K)."""
    try:
        dims = [int(d) for d in block_shape]
        ok = len(dims) == 2 and all(d == b and not isinstance(b, bool)
                                    for d, b in zip(dims, block_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok or min(dims) < 1:
        raise ValueError(f"block_shape={block_shape!r}: expected [rows, G], two positive ints")
    g = dims[1]
    if g % NVFP4_BLOCK or cols % g:
        raise ValueError(f"block_shape={block_shape!r}: the group size G={g} must be a "
                         f"multiple of 16 that divides K={cols}")
    return g


def _view(arr: DeviceArray, shape, dtype, strides=None) -> cupy.ndarray:
    """A cupy.ndarray over ``arr``'s memory (``arr.obj`` itself when it already is one of
    that shape and dtype), keeping the caller's object alive."""
    obj = arr.obj
    shape, dtype = tuple(shape), np.dtype(dtype)
    if (type(obj) is cupy.ndarray and strides is None and obj.shape == shape
            and obj.dtype == dtype):
        return obj
    nbytes = max(arr.nbytes, 1)
    if type(obj) is cupy.ndarray:
        mem = obj.data
    else:
        mem = cupy.cuda.MemoryPointer(
            cupy.cuda.UnownedMemory(arr.ptr, nbytes, obj, cupy.cuda.runtime.getDevice()), 0)
    return cupy.ndarray(shape, dtype, mem, strides=strides)


def _output(value, name: str, shape, dtypes, h: int, dtype=None,
            alignment: int = VECTOR_BYTES) -> DeviceArray:
    """The caller's output checked for dtype, shape and alignment, or a new array."""
    if value is None:
        return _wrap(empty(shape, dtype or dtypes[0], h))
    arr = import_array(value, name, dtype=dtypes, shape=shape, stream=h, writable=True)
    require_aligned(name, arr.ptr, alignment)
    return arr


def _sized_output(value, name: str, need: int, dtypes, h: int, alignment: int,
                  exact: bool = False) -> DeviceArray:
    """A flat output of at least ``need`` elements (exactly, with ``exact``), any shape."""
    if value is None:
        return _wrap(empty((need,), dtypes[0], h))
    arr = import_array(value, name, dtype=dtypes, stream=h, writable=True)
    if arr.size < need or (exact and arr.size != need):
        raise ValueError(f"{name}: {arr.size} elements, the layout needs "
                         f"{'exactly ' if exact else 'at least '}{need}")
    require_aligned(name, arr.ptr, alignment)
    return arr


def _wrap(a: cupy.ndarray) -> DeviceArray:
    return DeviceArray(a.data.ptr, a.shape, a.dtype, a)


def _device_scale(scale, h: int) -> DeviceArray:
    arr = import_array(scale, "scale", dtype=_F32, stream=h)
    if arr.size != 1:
        raise ValueError(f"scale: expected a one-element fp32 array, got shape {arr.shape}")
    return arr


# ------------------------------------------------------------------------ launching
_local = threading.local()


def _launch(kernel: str, fields: dict, units: int, h: int, pdl: bool,
            block: int = _THREADS) -> None:
    """Launch ``kernel`` of quant.cu over ``units`` work items (threads, or rows for the
    per-token kernel where ``block`` threads share one), the grid sized by ``_grid`` (the
    kernels stride over the items the grid does not cover), with programmatic dependent
    launch if ``pdl``; one Launcher per thread, kernel, device and ``pdl``."""
    if units <= 0:
        return
    dev = cupy.cuda.runtime.getDevice()
    cache = getattr(_local, "launchers", None)
    if cache is None:
        cache = _local.launchers = {}
    entry = cache.get((dev, kernel, block, pdl))
    if entry is None:
        raw = kernels.get_kernel(_SOURCE, kernel)
        facts = device_facts(dev)
        entry = cache[(dev, kernel, block, pdl)] = (
            Launcher(raw, QuantArgs, pdl=pdl), facts.sms * facts.blocks_per_sm(raw, block))
    launcher, resident = entry
    args = launcher.args
    for name, value in fields.items():
        setattr(args, name, value)
    per_block = 1 if kernel.startswith("quant_fp8_token") else block
    launcher(_grid(-(-units // per_block), resident), block, h)


def _grid(blocks: int, resident: int) -> int:
    """Blocks of a launch with work for ``blocks`` blocks on a device that keeps
    ``resident`` at once. Up to one wave, one item per thread; beyond, two or three items
    a thread (waves / 2, rounded) in blocks the scheduler hands out as others finish. A
    resident grid striding over the items instead gives some threads one item more than
    others (at 3.4 items a thread, some run the last quarter alone). Measured on H200,
    7168-wide bf16 rows (bench/results/quant-grid-1xH200-20261130T1622.txt): NVFP4 4096
    rows 22.0-22.3 against 22.6 us, 16384 rows 75.0 against 79.5; 128 rows unchanged."""
    if blocks <= resident:
        return blocks
    items = min(3, max(1, round(blocks / resident / 2)))
    return -(-blocks // items)


def _fields(x_ptr=0, q_ptr=0, sf_ptr=0, scale_ptr=0, rows=0, cols=0, group_size=0,
            swizzled=0, ue8m0=0) -> dict:
    return {"x": x_ptr, "q": q_ptr, "scale_out": sf_ptr, "scale": scale_ptr, "rows": rows,
            "cols": cols, "group_size": group_size, "swizzled": swizzled, "ue8m0": ue8m0}


# ------------------------------------------------------------------------ the API
def quantize(x, quant_dtype, *, scale=None, per_act_token_quant=False, block_shape=None,
             is_fp4_scale_swizzled=True, scale_format=ScaleFormat.FP32, out=None,
             scale_out=None, stream=None, enable_pdl: bool = True):
    """Quantize ``x`` [M, K] (bf16, fp16 or fp32) -> ``(codes, scales)``; see the module doc.

    Args:
        x: [M, K] rows, C-contiguous, 16-byte aligned, ``K % 16 == 0``.
        quant_dtype: ``QuantDtype`` / ``"fp8"`` / ``"nvfp4"`` / float8_e4m3fn, or None
            (returns ``(x, None)``).
        scale: fp32 device array of one element: the FP8 dequantization scale (static
            per-tensor) or the NVFP4 global scale; None for dynamic FP8 modes.
        per_act_token_quant: FP8 dynamic per-token scales (fp32 [M, 1]).
        block_shape: ``[bn, G]``: FP8 per-token-group scales of G elements.
        is_fp4_scale_swizzled: NVFP4 scales in the 128x4 swizzled layout (else linear).
        scale_format: per-token-group FP8 scales: ``ScaleFormat.FP32`` or ``UE8M0``.
        out: codes, uint8 (or float8_e4m3fn) [M, K]; NVFP4: uint8 [M, K/2].
        scale_out: FP8 per-token: fp32 [M, 1] or [M]; group fp32: [M, K/G]; group UE8M0:
            int32, at least ``ue8m0_mn_major_storage_size(M, K/G)`` elements; NVFP4
            swizzled: uint8/float8, at least ``compute_fp4_swizzled_layout_sf_size(M, K/16)``
            bytes (any shape); NVFP4 linear: [M, K/16].
        stream: as every op (default: CuPy's current stream).
        enable_pdl: launch with programmatic dependent launch (see the module doc).
    """
    pdl = bool_option("enable_pdl", enable_pdl)
    qd = _quant_dtype(quant_dtype)
    fmt = _scale_format(scale_format)
    if qd is None:
        if out is not None or scale_out is not None:
            raise ValueError("quant_dtype=None does not quantize: out and scale_out must be None")
        return x, None
    h = stream_handle(stream)
    xa = import_array(x, "x", dtype=FLOAT_DTYPES, ndim=2, stream=h)
    rows, cols = xa.shape
    if cols <= 0 or cols % NVFP4_BLOCK:
        raise ValueError(f"x: K={cols} elements per row must be a positive multiple of 16")
    if cols >= _MAX_UNITS:  # the kernels' row length is 32-bit
        raise ValueError(f"x: K={cols} elements per row is too large (at most {_MAX_UNITS - 16})")
    require_aligned("x", xa.ptr)
    suffix = _SUFFIX[xa.dtype]
    if fmt != ScaleFormat.FP32 and (qd != QuantDtype.FP8 or block_shape is None):
        raise ValueError(f"scale_format={fmt.value!r} applies to per-token-group FP8 only "
                         f"(block_shape=[1, G])")

    if qd == QuantDtype.NVFP4:
        if per_act_token_quant or block_shape is not None:
            raise ValueError("NVFP4 has 16-element block scales: per_act_token_quant and "
                             "block_shape must be unset")
        if scale is None:
            raise ValueError("NVFP4 needs scale: the global scale, an fp32 device array of "
                             "one element")
        gs = _device_scale(scale, h)
        kcols = cols // NVFP4_BLOCK
        if pad_up(rows, 128) * pad_up(kcols, 4) >= _MAX_UNITS:
            raise ValueError(f"x: {rows} x {cols} is too large for one launch")
        q = _output(out, "out", (rows, cols // 2), (_U8,), h, alignment=8)
        swizzled = bool(is_fp4_scale_swizzled)
        if swizzled:
            need = compute_fp4_swizzled_layout_sf_size(rows, kcols)
            sf = _sized_output(scale_out, "scale_out", need, _CODE_DTYPES, h, 4)
            sf_view = (need,)
            units = need // 2  # one thread per pair of scale bytes, padding included
        else:
            sf = _output(scale_out, "scale_out", (rows, kcols), _CODE_DTYPES, h, alignment=1)
            sf_view = (rows, kcols)
            units = rows * ((kcols + 1) // 2)
        _launch(f"quant_nvfp4_{suffix}",
                _fields(xa.ptr, q.ptr, sf.ptr, gs.ptr, rows, cols, swizzled=int(swizzled)),
                units, h, pdl)
        return _view(q, (rows, cols // 2), _U8), _view(sf, sf_view, _U8)

    # FP8
    vec = VECTOR_BYTES // xa.itemsize  # elements per 16-byte vector
    if block_shape is not None:
        if per_act_token_quant:
            raise ValueError("FP8: per_act_token_quant and block_shape exclude each other")
        if scale is not None:
            raise ValueError("FP8 per-token-group scales are computed: scale must be None")
        g = block_group_size(block_shape, cols)
        groups = cols // g
        q = _output(out, "out", (rows, cols), _CODE_DTYPES, h)
        if fmt == ScaleFormat.UE8M0:
            need = ue8m0_mn_major_storage_size(rows, groups)
            sf = _sized_output(scale_out, "scale_out", need, (_I32,), h, 4)
            k4 = ue8m0_words_per_row(groups)
            scales = _view(sf, (rows, k4), _I32, strides=(4, 4 * pad_up(rows, 4)))
        else:
            sf = _output(scale_out, "scale_out", (rows, groups), (_F32,), h, alignment=4)
            scales = _view(sf, (rows, groups), _F32)
        units = rows * (cols // NVFP4_BLOCK)  # 16-element chunks (the storage padding is less)
        if units >= _MAX_UNITS:
            raise ValueError(f"x: {rows} x {cols} is too large for one launch")
        _launch(f"quant_fp8_group_{suffix}",
                _fields(xa.ptr, q.ptr, sf.ptr, 0, rows, cols, group_size=g,
                        ue8m0=int(fmt == ScaleFormat.UE8M0)), units, h, pdl)
        return _view(q, (rows, cols), _U8), scales
    if per_act_token_quant:
        if scale is not None:
            raise ValueError("FP8 per-token scales are computed: scale must be None")
        q = _output(out, "out", (rows, cols), _CODE_DTYPES, h)
        if scale_out is None:
            sf = _wrap(empty((rows, 1), _F32, h))
        else:
            sf = import_array(scale_out, "scale_out", dtype=_F32, stream=h, writable=True)
            if sf.shape not in ((rows,), (rows, 1)):
                raise ValueError(f"scale_out: expected fp32 [{rows}, 1] or [{rows}], got "
                                 f"shape {sf.shape}")
            require_aligned("scale_out", sf.ptr, 4)
        _launch(f"quant_fp8_token_{suffix}", _fields(xa.ptr, q.ptr, sf.ptr, 0, rows, cols),
                rows, h, pdl)
        return _view(q, (rows, cols), _U8), _view(sf, sf.shape, _F32)
    if scale is None:
        raise ValueError("FP8 needs scale (static per-tensor dequantization scale, fp32 [1]), "
                         "per_act_token_quant=True or block_shape=[1, G]")
    if scale_out is not None:
        raise ValueError("static FP8 returns scale itself: scale_out must be None")
    s = _device_scale(scale, h)
    q = _output(out, "out", (rows, cols), _CODE_DTYPES, h)
    units = rows * cols // vec
    if units >= _MAX_UNITS:
        raise ValueError(f"x: {rows} x {cols} is too large for one launch")
    _launch(f"quant_fp8_static_{suffix}", _fields(xa.ptr, q.ptr, 0, s.ptr, rows, cols),
            units, h, pdl)
    return _view(q, (rows, cols), _U8), _view(s, s.shape, _F32)


def nvfp4_block_scale_interleave(sf_linear, *, out=None, stream=None,
                                 enable_pdl: bool = True) -> cupy.ndarray:
    """Linear NVFP4 scale factors [M, C] (uint8 or float8_e4m3fn e4m3 codes, C = K // 16)
    -> the flat 128x4 swizzled uint8 array of ``compute_fp4_swizzled_layout_sf_size(M, C)``
    bytes, padding 0 (``reference.nvfp4_block_scale_interleave``). ``out``: at least that
    many bytes, 4-byte aligned, any shape; must not overlap ``sf_linear``. ``enable_pdl``
    as ``quantize``'s."""
    pdl = bool_option("enable_pdl", enable_pdl)
    h = stream_handle(stream)
    src = import_array(sf_linear, "sf_linear", dtype=_CODE_DTYPES, ndim=2, stream=h)
    rows, kcols = src.shape
    need = compute_fp4_swizzled_layout_sf_size(rows, kcols)
    if need // 4 >= _MAX_UNITS:
        raise ValueError(f"sf_linear: {rows} x {kcols} is too large for one launch")
    dst = _sized_output(out, "out", need, _CODE_DTYPES, h, 4)
    _launch("nvfp4_sf_interleave",
            _fields(src.ptr, 0, dst.ptr, 0, rows, kcols * NVFP4_BLOCK), need // 4, h, pdl)
    return _view(dst, (need,), _U8)


def moe_kernel_quantize_input(A, A_scale, quant_dtype, per_act_token_quant, block_shape=None,
                              is_fp4_scale_swizzled=True, *, stream=None):
    """vLLM's ``moe_kernel_quantize_input`` (reference document 002): ``quantize`` with
    vLLM's positional arguments. ``A_scale`` is the FP8 static scale or the NVFP4 global
    scale; with ``quant_dtype=None`` it returns ``(A, A_scale)`` as vLLM does."""
    qd = _quant_dtype(quant_dtype)
    if qd is None:
        return A, A_scale
    if qd == QuantDtype.FP8:
        if block_shape is not None:
            A_scale = None              # group scales are computed
        elif A_scale is not None:
            per_act_token_quant = False  # a given scale is static, whatever the flag says
    return quantize(A, quant_dtype, scale=A_scale, per_act_token_quant=per_act_token_quant,
                    block_shape=block_shape, is_fp4_scale_swizzled=is_fp4_scale_swizzled,
                    stream=stream)
