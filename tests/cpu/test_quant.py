"""moecomm.quant without a GPU: every mode's launch (kernel, work items, struct fields,
returned shapes) and every argument error, with the device boundary replaced by fakes;
the reference's fp32 group scales and the NVFP4 interleave."""

from types import SimpleNamespace

import numpy as np
import pytest

quant = pytest.importorskip("moecomm.quant", reason="CuPy is not installed")
ml_dtypes = pytest.importorskip("ml_dtypes")

from moecomm import reference as ref  # noqa: E402
from moecomm.layouts import pad_up  # noqa: E402
from moecomm.tensors import DeviceArray, check_meta  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
QD, SF = quant.QuantDtype, quant.ScaleFormat


class Arr:
    """A device array as the fakes see it: shape, dtype, address."""

    def __init__(self, shape, dtype, ptr=1 << 20, read_only=False):
        self.shape, self.dtype, self.ptr = tuple(shape), np.dtype(dtype), ptr
        self.read_only = read_only  # as a DLPack export flagged read-only


@pytest.fixture
def launches(monkeypatch):
    """Replace the device boundary: imports check metadata as import_array does, new
    outputs are fake arrays, launches and views are recorded."""
    calls = []

    def fake_import(x, name, *, dtype=None, shape=None, ndim=None, device=None, stream=None,
                    writable=False):
        if not isinstance(x, Arr):
            raise TypeError(f"{name}: expected an array with __dlpack__, got {type(x).__name__}")
        if writable and x.read_only:
            raise ValueError(f"{name}: the array is read-only")
        check_meta(x.shape, x.dtype, name, dtype=dtype, shape=shape, ndim=ndim)
        return DeviceArray(x.ptr, x.shape, x.dtype, x)

    def fake_empty(shape, dtype, stream=None):
        return SimpleNamespace(data=SimpleNamespace(ptr=1 << 24), shape=tuple(shape),
                               dtype=np.dtype(dtype))

    def fake_launch(kernel, fields, units, h, pdl, block=quant._THREADS):
        calls.append(SimpleNamespace(kernel=kernel, units=units, stream=h, pdl=pdl, **fields))

    def fake_view(arr, shape, dtype, strides=None):
        return SimpleNamespace(base=arr.obj, shape=tuple(shape), dtype=np.dtype(dtype),
                               strides=strides)

    monkeypatch.setattr(quant, "import_array", fake_import)
    monkeypatch.setattr(quant, "empty", fake_empty)
    monkeypatch.setattr(quant, "_launch", fake_launch)
    monkeypatch.setattr(quant, "_view", fake_view)
    monkeypatch.setattr(quant, "stream_handle", lambda s=None: 0 if s is None else int(s))
    return calls


def scalar():
    return Arr((1,), np.float32, ptr=1 << 16)


# ------------------------------------------------------------------ modes
@pytest.mark.parametrize("dtype,suffix,vec", [(BF16, "bf16", 8), (np.float16, "fp16", 8),
                                              (np.float32, "fp32", 4)])
def test_fp8_static(launches, dtype, suffix, vec):
    s = scalar()
    q, sc = quant.quantize(Arr((3, 48), dtype), "fp8", scale=s, stream=7)
    (call,) = launches
    assert call.kernel == f"quant_fp8_static_{suffix}" and call.units == 3 * 48 // vec
    assert (call.rows, call.cols, call.scale, call.stream) == (3, 48, s.ptr, 7)
    assert q.shape == (3, 48) and q.dtype == np.uint8 and sc.base is s


def test_fp8_per_token(launches):
    q, sc = quant.quantize(Arr((5, 32), BF16), QD.FP8, per_act_token_quant=True)
    (call,) = launches
    assert call.kernel == "quant_fp8_token_bf16" and call.units == 5
    assert sc.shape == (5, 1) and sc.dtype == np.float32
    quant.quantize(Arr((5, 32), BF16), "fp8", per_act_token_quant=True,
                   scale_out=Arr((5,), np.float32), out=Arr((5, 32), E4M3))
    assert launches[1].scale_out == 1 << 20


@pytest.mark.parametrize("rows", [0, 1, 3, 129])
def test_fp8_group(launches, rows):
    x = Arr((rows, 384), BF16)
    q, sc = quant.quantize(x, "fp8", block_shape=[128, 128])  # bn: the weights' rows
    assert launches[0].kernel == "quant_fp8_group_bf16" and launches[0].group_size == 128
    assert launches[0].ue8m0 == 0 and launches[0].units == rows * 24  # 16-element chunks
    assert sc.shape == (rows, 3) and sc.dtype == np.float32
    q, sc = quant.quantize(x, "fp8", block_shape=(1, 32), scale_format="ue8m0")
    call = launches[1]
    assert (call.group_size, call.ue8m0) == (32, 1)
    assert call.units == rows * 24
    assert sc.shape == (rows, 3) and sc.dtype == np.int32
    assert sc.strides == (4, 4 * pad_up(rows, 4))
    need = ref.ue8m0_mn_major_storage_size(rows, 12)
    quant.quantize(x, "fp8", block_shape=[1, 32], scale_format=SF.UE8M0,
                   scale_out=Arr((need,), np.int32))
    if need:
        with pytest.raises(ValueError, match="scale_out: .* at least"):
            quant.quantize(x, "fp8", block_shape=[1, 32], scale_format=SF.UE8M0,
                           scale_out=Arr((need - 1,), np.int32))


@pytest.mark.parametrize("dtype", [BF16, np.float32])
@pytest.mark.parametrize("rows", [1, 128, 129])
def test_nvfp4(launches, dtype, rows):
    x, gs = Arr((rows, 96), dtype), scalar()
    q, sf = quant.quantize(x, "nvfp4", scale=gs)
    call = launches[0]
    need = ref.compute_fp4_swizzled_layout_sf_size(rows, 6)
    assert call.kernel.startswith("quant_nvfp4_") and call.swizzled == 1
    assert call.units == need // 2 and call.scale == gs.ptr  # a thread per 2 scale bytes
    assert q.shape == (rows, 48) and sf.shape == (need,) and sf.dtype == np.uint8
    q, sf = quant.quantize(x, QD.NVFP4, scale=gs, is_fp4_scale_swizzled=False,
                           scale_out=Arr((rows, 6), E4M3))
    assert launches[1].swizzled == 0 and launches[1].units == rows * 3
    quant.quantize(Arr((rows, 80), dtype), "nvfp4", scale=gs, is_fp4_scale_swizzled=False)
    assert launches[2].units == rows * 3  # 5 blocks a row: two pairs and a half
    assert sf.shape == (rows, 6)
    # a larger swizzled buffer (say sized for the maximum token count) is fine
    quant.quantize(x, "nvfp4", scale=gs, scale_out=Arr((need + 512,), np.uint8))


def test_interleave(launches):
    sf = quant.nvfp4_block_scale_interleave(Arr((130, 7), np.uint8))
    need = ref.compute_fp4_swizzled_layout_sf_size(130, 7)
    (call,) = launches
    assert call.kernel == "nvfp4_sf_interleave" and call.units == need // 4
    assert (call.rows, call.cols) == (130, 7 * 16) and sf.shape == (need,)
    with pytest.raises(ValueError, match="out: 10 elements"):
        quant.nvfp4_block_scale_interleave(Arr((130, 7), np.uint8), out=Arr((10,), np.uint8))
    with pytest.raises(TypeError, match="sf_linear: dtype float32"):
        quant.nvfp4_block_scale_interleave(Arr((4, 4), np.float32))
    with pytest.raises(ValueError, match="out: address .* not 4-byte aligned"):
        quant.nvfp4_block_scale_interleave(Arr((4, 4), np.uint8),
                                           out=Arr((512,), np.uint8, ptr=(1 << 20) + 2))


def test_no_quant_returns_input(launches):
    x = Arr((3, 16), BF16)
    assert quant.quantize(x, None) == (x, None)
    assert not launches
    with pytest.raises(ValueError, match="out and scale_out must be None"):
        quant.quantize(x, None, out=Arr((3, 16), np.uint8))


def test_quant_dtype_spellings(launches):
    for spelling in ("fp8", QD.FP8, E4M3):
        quant.quantize(Arr((1, 16), BF16), spelling, scale=scalar())
    assert [c.kernel for c in launches] == ["quant_fp8_static_bf16"] * 3

    class TorchDtype:  # str() of torch.float8_e4m3fn
        def __str__(self):
            return "torch.float8_e4m3fn"

    assert quant._quant_dtype(TorchDtype()) is QD.FP8
    for bad in ("int8", "fp4", 3, np.float16):
        with pytest.raises(ValueError, match="quant_dtype"):
            quant.quantize(Arr((1, 16), BF16), bad, scale=scalar())


def test_moe_kernel_quantize_input(launches):
    x, s = Arr((2, 32), BF16), scalar()
    assert quant.moe_kernel_quantize_input(x, s, None, False) == (x, s)
    quant.moe_kernel_quantize_input(x, s, "fp8", True, None)   # a given scale is static
    quant.moe_kernel_quantize_input(x, None, "fp8", True, None)
    quant.moe_kernel_quantize_input(x, s, "fp8", False, [128, 16])  # groups: scale unused
    quant.moe_kernel_quantize_input(x, s, "nvfp4", False, None, False)
    assert [c.kernel for c in launches] == ["quant_fp8_static_bf16", "quant_fp8_token_bf16",
                                            "quant_fp8_group_bf16", "quant_nvfp4_bf16"]
    assert launches[3].swizzled == 0
    assert all(c.pdl for c in launches)  # programmatic dependent launch by default


def test_grid():
    """One wave: a block per item group; beyond, two or three items a thread."""
    assert quant._grid(112, 1056) == 112 and quant._grid(1056, 1056) == 1056
    assert quant._grid(1795, 1056) == 1795          # 1.7 waves: one item a thread
    assert quant._grid(3584, 1056) == 1792          # 3.4 waves: two
    assert quant._grid(14336, 1056) == 4779         # 13.6 waves: three at most
    assert quant._grid(1, 1) == 1


def test_enable_pdl(launches):
    quant.quantize(Arr((2, 32), BF16), "nvfp4", scale=scalar(), enable_pdl=False)
    quant.nvfp4_block_scale_interleave(Arr((2, 2), np.uint8), enable_pdl=False)
    quant.nvfp4_block_scale_interleave(Arr((2, 2), np.uint8))
    assert [c.pdl for c in launches] == [False, False, True]


# ------------------------------------------------------------------ errors
ERRORS = [
    (dict(x=Arr((4, 24), BF16), quant_dtype="fp8", scale=True), ValueError, "K=24"),
    (dict(x=Arr((4, 0), BF16), quant_dtype="fp8", scale=True), ValueError, "K=0"),
    (dict(x=Arr((4, 32), np.int32), quant_dtype="fp8", scale=True), TypeError, "x: dtype int32"),
    (dict(x=Arr((4, 32, 1), BF16), quant_dtype="fp8", scale=True), ValueError, "x: expected 2"),
    (dict(x=Arr((4, 32), BF16, ptr=(1 << 20) + 8), quant_dtype="fp8", scale=True), ValueError,
     "x: address .* not 16-byte aligned"),
    (dict(x=[[1.0] * 16], quant_dtype="fp8", scale=True), TypeError, "x: expected an array"),
    (dict(quant_dtype="fp8"), ValueError, "FP8 needs scale"),
    (dict(quant_dtype="fp8", scale=Arr((2,), np.float32)), ValueError, "scale: expected a one"),
    (dict(quant_dtype="fp8", scale=Arr((1,), np.float16)), TypeError, "scale: dtype float16"),
    (dict(quant_dtype="fp8", scale=True, scale_out=Arr((4, 1), np.float32)), ValueError,
     "static FP8 returns scale itself"),
    (dict(quant_dtype="fp8", scale=True, out=Arr((4, 16), np.uint8)), ValueError,
     r"out: shape \(4, 16\)"),
    (dict(quant_dtype="fp8", scale=True, out=Arr((4, 32), np.int8)), TypeError,
     "out: dtype int8"),
    (dict(quant_dtype="fp8", scale=True, out=Arr((4, 32), np.uint8, ptr=(1 << 20) + 4)),
     ValueError, "out: address"),
    (dict(quant_dtype="fp8", per_act_token_quant=True, scale=True), ValueError,
     "per-token scales are computed"),
    (dict(quant_dtype="fp8", per_act_token_quant=True, scale_out=Arr((4, 2), np.float32)),
     ValueError, r"scale_out: expected fp32 \[4, 1\]"),
    (dict(quant_dtype="fp8", per_act_token_quant=True, block_shape=[1, 16]), ValueError,
     "exclude each other"),
    (dict(quant_dtype="fp8", block_shape=[1, 16], scale=True), ValueError,
     "group scales are computed"),
    (dict(quant_dtype="fp8", block_shape=[1, 24]), ValueError, "G=24 must be a multiple"),
    (dict(quant_dtype="fp8", block_shape=[1, 64]), ValueError, "divides K=32"),
    (dict(quant_dtype="fp8", block_shape=[16]), ValueError, "expected \\[rows, G\\]"),
    (dict(quant_dtype="fp8", block_shape=[1, 0]), ValueError, "expected \\[rows, G\\]"),
    (dict(quant_dtype="fp8", block_shape=[1, 16.5]), ValueError, "expected \\[rows, G\\]"),
    (dict(quant_dtype="fp8", block_shape="ab"), ValueError, "expected \\[rows, G\\]"),
    (dict(quant_dtype="fp8", block_shape=[1, 16], scale_out=Arr((4, 3), np.float32)),
     ValueError, "scale_out: shape"),
    (dict(quant_dtype="fp8", scale=True, scale_format="ue8m0"), ValueError,
     "per-token-group FP8 only"),
    (dict(quant_dtype="fp8", block_shape=[1, 16], scale_format="e8m0"), ValueError,
     "scale_format='e8m0'"),
    (dict(quant_dtype="nvfp4"), ValueError, "NVFP4 needs scale"),
    (dict(quant_dtype="nvfp4", scale=True, per_act_token_quant=True), ValueError,
     "must be unset"),
    (dict(quant_dtype="nvfp4", scale=True, block_shape=[1, 16]), ValueError, "must be unset"),
    (dict(quant_dtype="nvfp4", scale=True, out=Arr((4, 32), np.uint8)), ValueError,
     r"out: shape \(4, 32\)"),
    (dict(quant_dtype="nvfp4", scale=True, scale_out=Arr((100,), np.uint8)), ValueError,
     "scale_out: 100 elements, the layout needs at least 512"),
    (dict(quant_dtype="nvfp4", scale=True, scale_out=Arr((512,), np.float32)), TypeError,
     "scale_out: dtype float32"),
    (dict(quant_dtype="nvfp4", scale=True, is_fp4_scale_swizzled=False,
          scale_out=Arr((4, 4), np.uint8)), ValueError, "scale_out: shape"),
    (dict(quant_dtype="nvfp4", scale=True, scale_format=SF.UE8M0), ValueError,
     "per-token-group FP8 only"),
    (dict(quant_dtype="nvfp4", scale=True, enable_pdl=None), TypeError,
     "enable_pdl must be a bool"),
    (dict(quant_dtype="fp8", scale=True, out=Arr((4, 32), np.uint8, read_only=True)),
     ValueError, "out: the array is read-only"),
    (dict(quant_dtype="fp8", per_act_token_quant=True,
          scale_out=Arr((4, 1), np.float32, read_only=True)), ValueError,
     "scale_out: the array is read-only"),
    (dict(quant_dtype="fp8", block_shape=[1, 16],
          scale_out=Arr((4, 2), np.float32, read_only=True)), ValueError,
     "scale_out: the array is read-only"),
    (dict(quant_dtype="nvfp4", scale=True, scale_out=Arr((512,), np.uint8, read_only=True)),
     ValueError, "scale_out: the array is read-only"),
]


@pytest.mark.parametrize("kwargs,exc,match", ERRORS,
                         ids=[f"{i}-{e[2][:24]}" for i, e in enumerate(ERRORS)])
def test_errors_before_launch(launches, kwargs, exc, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", Arr((4, 32), BF16))
    if kwargs.get("scale") is True:
        kwargs["scale"] = scalar()
    with pytest.raises(exc, match=match):
        quant.quantize(x, kwargs.pop("quant_dtype"), **kwargs)
    assert not launches


# ------------------------------------------------------------------ reference additions
def _f32(v):
    return np.asarray(v, np.float64).astype(np.float32)


@pytest.mark.parametrize("g", [16, 128])
def test_reference_group_fp32(g):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((7, 256)) * np.exp(rng.uniform(-8, 8, (7, 1)))).astype(np.float32)
    x[0, :g] = 0.0                      # scale 1e-10, codes 0
    x[1, :g] *= np.float32(2.0 ** -120)  # amax / 448 under the clamp
    x[2, 0] = 1e30                      # one huge element: the rest of its group underflows
    q, s = ref.quant_fp8_per_token_group_fp32(x, g)
    assert q.shape == x.shape and q.dtype == np.uint8 and s.shape == (7, 256 // g)
    # independent: float64 arithmetic rounded to fp32 after each step, ml_dtypes' e4m3
    b = x.reshape(7, -1, g).astype(np.float64)
    want_s = np.maximum(_f32(np.abs(b).max(-1) / 448.0), np.float32(1e-10))
    inv = _f32(1.0 / want_s.astype(np.float64))
    prod = _f32(b * inv.astype(np.float64)[..., None])
    want_q = np.clip(prod, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(q, want_q.reshape(7, 256))
    assert s[0, 0] == np.float32(1e-10) and not q[0, :g].any()
    # a finite group never saturates past 448 and dequantizes within an e4m3 step
    d = ref.dequant_fp8_per_token_group_fp32(q, s, g)
    err = np.abs(d - x) / np.maximum(np.abs(x), np.repeat(s, g, 1) * 2.0 ** -6)
    assert np.all(err <= 2.0 ** -4 + 1e-6)
    with pytest.raises(ValueError, match="divide"):
        ref.quant_fp8_per_token_group_fp32(x, 48)


@pytest.mark.parametrize("rows,kcols", [(1, 1), (3, 7), (128, 4), (129, 9), (300, 448)])
def test_reference_interleave(rows, kcols):
    rng = np.random.default_rng(rows * 1000 + kcols)
    sf = rng.integers(1, 256, (rows, kcols), dtype=np.uint8)
    out = ref.nvfp4_block_scale_interleave(sf)
    assert out.shape == (ref.compute_fp4_swizzled_layout_sf_size(rows, kcols),)
    np.testing.assert_array_equal(ref.unswizzle_sf(out, rows, 16 * kcols), sf)
    assert np.count_nonzero(out) == sf.size  # padding is 0, every scale nonzero
    np.testing.assert_array_equal(ref.nvfp4_block_scale_interleave(sf.view(E4M3)), out)
    # the quantizer's swizzled scales are the interleave of its linear ones
    x = rng.standard_normal((rows, 16 * kcols)).astype(np.float32)
    _, lin = ref.quant_nvfp4(x, 300.0, "linear")
    _, sw = ref.quant_nvfp4(x, 300.0, "swizzled")
    np.testing.assert_array_equal(ref.nvfp4_block_scale_interleave(lin), sw)
    with pytest.raises(ValueError, match="2-D"):
        ref.nvfp4_block_scale_interleave(sf.reshape(-1))


# ------------------------------------------------------------------ quant.cuh's e2m1 encoder
def _e2m1_fused_sum(x):
    """``f + (f >> 22)`` of ``e2m1_pack8``, f = ``e2m1_fused_add(x)`` of
    kernels_cu/quant.cuh in NumPy fp32 (one rounding per operation; its fma is a plain add
    here, since ``t * 2^22`` is exact): its low byte is the magnitude code + 42."""
    x = np.asarray(x, np.float32)
    a = np.fmin(np.abs(x), np.float32(6.0))
    t = np.maximum(a.view(np.uint32), np.uint32(0x3F800000)) & np.uint32(0x7F800000)
    f = (t.view(np.float32) * np.float32(2.0 ** 22) + a).astype(np.float32).view(np.uint32)
    return f + (f >> np.uint32(22))


def _e2m1_code(x):
    """One element's code as ``e2m1_pack8`` forms it: the magnitude byte less 42, the sign
    bit above it."""
    x = np.asarray(x, np.float32)
    return (((_e2m1_fused_sum(x) & 0xFF) - 42) | ((x.view(np.uint32) >> 28) & 8)).astype(np.uint8)


def _prmt(a, b, selector):
    """PTX ``prmt.b32`` (default mode) on uint32 arrays: byte i of the result is byte
    ``n & 7`` of b:a for selector nibble n, or that byte's sign replicated when n & 8."""
    src = (np.asarray(b, np.uint64) << np.uint64(32)) | np.asarray(a, np.uint64)
    out = np.zeros(src.shape, np.uint64)
    for i in range(4):
        n = (selector >> (4 * i)) & 0xF
        byte = (src >> np.uint64(8 * (n & 7))) & np.uint64(0xFF)
        if n & 8:
            byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= byte << np.uint64(8 * i)
    return out.astype(np.uint32)


def _gather4(a, b, c, d, lo):
    return _prmt(_prmt(a, b, lo), _prmt(c, d, lo << 8), 0x7610)


def _e2m1_pack8(x):
    """``e2m1_pack8`` of kernels_cu/quant.cuh on x [N, 8] -> uint32 [N] (mod 2^32)."""
    x = np.asarray(x, np.float32)
    r = [_e2m1_fused_sum(x[:, k]) for k in range(8)]
    s = [x[:, k].view(np.uint32) for k in range(8)]
    even, odd = _gather4(*r[0::2], 0x40), _gather4(*r[1::2], 0x40)
    signs = ((_gather4(*s[0::2], 0xFB) & np.uint32(0x08080808))
             | (_gather4(*s[1::2], 0xFB) & np.uint32(0x80808080)))
    packed = (even.astype(np.uint64) + (odd.astype(np.uint64) << np.uint64(4))
              - np.uint64(0x2A2A2A2A * 17)) & np.uint64(0xFFFFFFFF)
    return (packed.astype(np.uint32) | signs).astype(np.uint32)


def test_e2m1_encoder_algorithm():
    """The branch-free encoder equals the reference on every bf16 value, on every fp32
    value within 4096 ulps of each rounding tie and binade edge, and on random fp32
    values (run once over every fp32 value with |x| <= 8: equal)."""
    assert "4194304.f" in (quant.kernels.source_dir() / "quant.cuh").read_text()
    every_bf16 = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    edges = np.array([0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8],
                     np.float32).view(np.uint32)
    near = (edges[:, None] + np.arange(-4096, 4097, dtype=np.int64)[None]).astype(np.uint32)
    rng = np.random.default_rng(7)
    rand = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    for bits in (every_bf16.view(np.uint32), near.reshape(-1), rand):
        for sign in (0, 0x80000000):
            x = (bits | np.uint32(sign)).view(np.float32)
            x = x[~np.isnan(x)]  # NaN: 0x7 for the positive NaN the GPU's products give
            np.testing.assert_array_equal(_e2m1_code(x), ref.fp4_e2m1_encode(x))
    assert _e2m1_code(np.float32(np.nan)) == ref.fp4_e2m1_encode(np.float32(np.nan))
    # eight codes a word, the low nibble first: the reference's packing, as little-endian
    x = (rng.standard_normal((4096, 8)) * np.exp(rng.uniform(-4, 3, (4096, 1)))).astype(np.float32)
    x[::7] = -0.0
    want = ref.pack_fp4(ref.fp4_e2m1_encode(x)).view("<u4").reshape(-1)
    np.testing.assert_array_equal(_e2m1_pack8(x), want)


def test_e4m3_decoder_algorithm():
    """quant.cuh's ``e4m3_decode`` (the code's bits placed in an fp32, a denormal for
    exponent 0, times 2^120) equals the reference on every code but the two NaNs."""
    assert "0x1p120f" in (quant.kernels.source_dir() / "quant.cuh").read_text()
    c = np.arange(256, dtype=np.uint32)
    bits = ((c & 0x7F) << 20) | ((c & 0x80) << 24)
    ours = bits.astype(np.uint32).view(np.float32) * np.float32(2.0 ** 120)
    want = ref.fp8_e4m3_decode(c.astype(np.uint8))
    finite = (c & 0x7F) != 0x7F
    np.testing.assert_array_equal(ours[finite].view(np.uint32),
                                  want[finite].astype(np.float32).view(np.uint32))
    assert ours[0x7F] == 480.0 and ours[0xFF] == -480.0
