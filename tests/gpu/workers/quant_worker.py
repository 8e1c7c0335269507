"""moecomm.quant on one GPU against moecomm.reference, bit for bit.

Every mode on fresh random inputs (rows of very different magnitudes, outliers, all-zero
blocks and rows, subnormal and negative-zero elements) at ragged row counts, outputs
poisoned first; exact ties of the e4m3 and e2m1 roundings; repeated calls on the same
buffers; graph capture and replay with new inputs and a new scale; bad input. Runs on any
number of ranks (each checks its own GPU's results); the test uses one.
"""

import cupy
import numpy as np
import pytest

from moecomm import reference
from moecomm.quant import (QuantDtype, ScaleFormat, moe_kernel_quantize_input,
                           nvfp4_block_scale_interleave, quantize)
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import cuda_torch, main, raw, unavailable, zeros
from tests.mpi import case, dtype_of

ROWS = (1, 3, 127, 128, 129, 1000)
COLS = {1: 7168, 3: 16, 127: 112, 128: 2048, 129: 48, 1000: 256}  # K per row count
POISON = 0xA5


# ---------------------------------------------------------------- inputs
def make_x(rng, m, k, dtype) -> np.ndarray:
    """[m, k] of ``dtype`` (bf16 as uint16 bits, the reference's form)."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    x *= np.exp(rng.uniform(-5, 5, (m, 1))).astype(np.float32)  # rows of other magnitudes
    flat = x.reshape(-1)
    n = flat.size
    pick = lambda count: rng.choice(n, size=min(n, count), replace=False)  # noqa: E731
    flat[pick(max(1, n // 97))] *= 300.0                                   # outliers
    sub = pick(max(1, n // 89))                       # subnormal in fp32 (and bf16), tiny
    flat[sub] = rng.choice([1e-39, -1e-39, 3e-42, 1e-7, -6e-8], size=sub.size)
    flat[pick(max(1, n // 83))] = -0.0
    blocks = x.reshape(m, k // 16, 16)
    zero = rng.random((m, k // 16)) < 0.05
    blocks[zero] = 0.0                                                     # all-zero blocks
    if m >= 3:
        x[1] = 0.0                                                         # an all-zero row
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        x = np.clip(x, -6e4, 6e4)
    if dtype == bfloat16:
        return x.astype(bfloat16).view(np.uint16)
    return x.astype(dtype)


def to_f32(x) -> np.ndarray:
    return reference.to_float32(x)


# Helpers that write device memory on CuPy's current stream finish before returning: the
# quantizers run on the job's non-blocking stream, which does not wait for that one.
def poisoned(shape, dtype, value=POISON) -> cupy.ndarray:
    """A device array of garbage: every byte ``value``."""
    dtype = np.dtype(dtype)
    data = cupy.full(max(1, int(np.prod(shape))) * dtype.itemsize, value, np.uint8)
    cupy.cuda.runtime.deviceSynchronize()
    return cupy.ndarray(tuple(shape), dtype, data.data)


def poison(buf: cupy.ndarray, value=POISON) -> None:
    """Every byte of the C-contiguous ``buf`` := ``value``."""
    cupy.ndarray((buf.nbytes,), np.uint8, buf.data).fill(value)
    cupy.cuda.runtime.deviceSynchronize()


def device_scale(value) -> cupy.ndarray:
    d = cupy.asarray([value], np.float32)
    cupy.cuda.runtime.deviceSynchronize()
    return d


def same(got, want, what):
    """Bitwise equality of a device (or host) array with the reference."""
    if isinstance(got, cupy.ndarray):
        cupy.cuda.runtime.deviceSynchronize()  # whatever stream wrote it
    got = cupy.asnumpy(got) if isinstance(got, cupy.ndarray) else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    g = np.ascontiguousarray(got).view(np.uint8)
    w = np.ascontiguousarray(want).view(np.uint8)
    if not np.array_equal(g, w):
        bad = np.flatnonzero(g.reshape(-1) != w.reshape(-1))
        raise AssertionError(f"{what}: {bad.size} of {g.size} bytes differ, first at byte "
                             f"{bad[0]}: got {g.reshape(-1)[bad[0]]:#x}, expected "
                             f"{w.reshape(-1)[bad[0]]:#x}")


# ---------------------------------------------------------------- the modes
class Mode:
    """One quantize configuration: how to call it with fresh poisoned outputs and what the
    reference says it writes."""

    def __init__(self, kind, fmt=None, g=None, swizzled=True):
        self.kind, self.fmt, self.g, self.swizzled = kind, fmt, g, swizzled

    def __repr__(self):
        return f"{self.kind}/{self.fmt}/{self.g}/{'sw' if self.swizzled else 'lin'}"

    def outputs(self, m, k):
        """Poisoned (out, scale_out)."""
        if self.kind == "static":
            return poisoned((m, k), np.uint8), None
        if self.kind == "token":
            return poisoned((m, k), np.uint8), poisoned((m, 1), np.float32)
        if self.kind == "group":
            if self.fmt == ScaleFormat.UE8M0:
                need = reference.ue8m0_mn_major_storage_size(m, k // self.g)
                return poisoned((m, k), np.uint8), poisoned((max(need, 1),), np.int32)
            return poisoned((m, k), np.uint8), poisoned((m, k // self.g), np.float32)
        if self.swizzled:
            need = reference.compute_fp4_swizzled_layout_sf_size(m, k // 16)
            return poisoned((m, k // 2), np.uint8), poisoned((need,), np.uint8)
        return poisoned((m, k // 2), np.uint8), poisoned((m, k // 16), np.uint8)

    @property
    def takes_scale(self) -> bool:
        return self.kind in ("static", "nvfp4")

    def call(self, x, scale, out=None, scale_out=None, stream=None):
        kw = dict(out=out, scale_out=scale_out, stream=stream)
        if self.kind == "static":
            return quantize(x, "fp8", scale=scale, out=out, stream=stream)
        if self.kind == "token":
            return quantize(x, QuantDtype.FP8, per_act_token_quant=True, **kw)
        if self.kind == "group":
            return quantize(x, "fp8", block_shape=[1, self.g], scale_format=self.fmt, **kw)
        return quantize(x, "nvfp4", scale=scale, is_fp4_scale_swizzled=self.swizzled, **kw)

    def scale_value(self, xh) -> float:
        """A scale that makes the largest values saturate (static FP8) or the usual global
        scale (NVFP4); None for the computed scales."""
        amax = float(np.max(np.abs(to_f32(xh)))) or 1.0
        if self.kind == "static":
            return amax / 448.0 * 0.25
        if self.kind == "nvfp4":
            return 448.0 * 6.0 / amax
        return None

    def reference(self, xh, scale):
        """(codes, scales) as the device should hold them: scales in the storage the
        kernel writes (UE8M0: the whole MN-major storage)."""
        m, k = xh.shape
        if self.kind == "static":
            return reference.quant_fp8(xh, scale), None
        if self.kind == "token":
            q, s = reference.quant_fp8_dynamic_per_token(xh)
            return q, s.reshape(m, 1)
        if self.kind == "group":
            if self.fmt == ScaleFormat.UE8M0:
                q, packed = reference.quant_fp8_per_token_group(xh, self.g)
                return q, reference.ue8m0_to_mn_major_storage(packed)
            return reference.quant_fp8_per_token_group_fp32(xh, self.g)
        return reference.quant_nvfp4(xh, scale, "swizzled" if self.swizzled else "linear")

    def check(self, xh, scale, q, sf, q_ret, sf_ret, what):
        """Compare the buffers (``q``; ``sf``: the caller's scale buffer, or None when the
        call allocated it) and the returned arrays with the reference."""
        want_q, want_sf = self.reference(xh, scale)
        same(q, want_q, f"{what}: codes")
        same(q_ret, want_q, f"{what}: returned codes")
        if self.kind == "static":
            assert sf_ret is not None and float(cupy.asnumpy(sf_ret).reshape(-1)[0]) == \
                np.float32(scale), f"{what}: static scale not passed through"
            return
        if self.kind == "group" and self.fmt == ScaleFormat.UE8M0:
            if sf is not None:
                same(sf.reshape(-1)[:want_sf.size], want_sf, f"{what}: UE8M0 storage")
            packed = reference.quant_fp8_per_token_group(xh, self.g)[1]
            same(sf_ret, packed, f"{what}: returned MN-major view")
            return
        if sf is not None:
            same(sf.reshape(-1)[:want_sf.size].reshape(want_sf.shape), want_sf,
                 f"{what}: scales")
        same(sf_ret, want_sf, f"{what}: returned scales")


MODES = {
    "static": Mode("static"),
    "token": Mode("token"),
    "group-fp32-128": Mode("group", ScaleFormat.FP32, 128),
    "group-fp32-16": Mode("group", ScaleFormat.FP32, 16),
    "group-ue8m0-128": Mode("group", ScaleFormat.UE8M0, 128),
    "group-ue8m0-16": Mode("group", ScaleFormat.UE8M0, 16),
    "group-ue8m0-48": Mode("group", ScaleFormat.UE8M0, 48),
    "nvfp4-swizzled": Mode("nvfp4", swizzled=True),
    "nvfp4-linear": Mode("nvfp4", swizzled=False),
}


def shapes_for(mode):
    for m in ROWS:
        k = COLS[m]
        if mode.g and k % mode.g:
            k = mode.g * max(1, k // mode.g)
        yield m, k


def run_mode(ctx, mode, dtype, what):
    for m, k in shapes_for(mode):
        xh = make_x(ctx.rng, m, k, dtype)
        x = ctx.device(xh)
        sv = mode.scale_value(xh)
        scale = None if sv is None else device_scale(sv)
        # into poisoned caller buffers
        out, sout = mode.outputs(m, k)
        q_ret, sf_ret = mode.call(x, scale, out, sout, stream=ctx.stream)
        ctx.stream.synchronize()
        mode.check(xh, sv, out, sout, q_ret, sf_ret, f"{what} {mode} [{m}, {k}] out=")
        # and into arrays it allocates
        q_ret, sf_ret = mode.call(x, scale, stream=ctx.stream)
        ctx.stream.synchronize()
        mode.check(xh, sv, q_ret, None, q_ret, sf_ret, f"{what} {mode} [{m}, {k}]")


@case(variants={f"{name}-{d}": (name, d) for name in MODES
                for d in (("bf16", "fp16", "fp32") if name in ("static", "token",
                                                               "nvfp4-swizzled")
                          else ("bf16",))})
def modes(ctx, variant):
    """Each mode at M in (1, 3, 127, 128, 129, 1000), bitwise against the reference."""
    name, d = variant
    run_mode(ctx, MODES[name], dtype_of(d), d)


@case(dtypes=("fp16", "fp32"))
def group_other_dtypes(ctx, dtype):
    """Per-token-group FP8 (both scale formats) from fp16 and fp32 rows."""
    for name in ("group-fp32-128", "group-ue8m0-16"):
        run_mode(ctx, MODES[name], dtype, dtype.name)


@case
def nvfp4_saturating_scale(ctx):
    """A global scale so large that the block scales saturate at 448 (codes at +-6), and so
    small that they round to 0 (codes +-0)."""
    mode = MODES["nvfp4-swizzled"]
    for factor in (1e4, 1e-6):
        xh = make_x(ctx.rng, 129, 256, bfloat16)
        sv = mode.scale_value(xh) * factor
        out, sout = mode.outputs(129, 256)
        q, sf = mode.call(ctx.device(xh), device_scale(sv), out, sout, stream=ctx.stream)
        ctx.stream.synchronize()
        mode.check(xh, sv, out, sout, q, sf, f"factor {factor}")


@case
def nvfp4_global_scale_range(ctx):
    """Global scales from 2^-110 to 2^120, each on rows whose amax puts the block scales
    inside the e4m3 range (at 2^120 the output scale gs / sf overflows to inf for the
    smallest block scales); bf16 rows into swizzled scales, fp32 rows into linear ones."""
    for log2, mant in ((-110, 1.37), (-101, 1.5), (-100, 1.0), (-99, 1.37), (-30, 1.37),
                       (0, 1.0), (45, 1.9), (99, 1.37), (100, 1.0), (100, 1.37), (120, 1.37)):
        gs = float(np.float32(mant * 2.0 ** log2))
        for dtype, mode in ((bfloat16, MODES["nvfp4-swizzled"]),
                            (np.float32, MODES["nvfp4-linear"])):
            base = make_x(ctx.rng, 129, 256, np.float32)
            x = (base / np.abs(base).max() * np.float32(1200.0 / gs)).astype(np.float32)
            xh = x.astype(bfloat16).view(np.uint16) if dtype == bfloat16 else x
            out, sout = mode.outputs(129, 256)
            q, sf = mode.call(ctx.device(xh), device_scale(gs), out, sout, stream=ctx.stream)
            ctx.stream.synchronize()
            mode.check(xh, gs, out, sout, q, sf, f"gs {mant} x 2^{log2}, {mode}")


@case(dtypes=("bf16", "fp32"))
def nvfp4_grid_stride(ctx, dtype):
    """Matrices with more scale bytes than the resident grid takes in one step (each warp
    walks several), at odd and even numbers of scale columns, so that the linear walk's
    (row, block) stepping wraps at every offset and the swizzled one crosses bands."""
    for m, k in ((6000, 2064), (4099, 4096)):
        xh = make_x(ctx.rng, m, k, dtype)
        sv = MODES["nvfp4-linear"].scale_value(xh)
        for name in ("nvfp4-swizzled", "nvfp4-linear"):
            mode = MODES[name]
            out, sout = mode.outputs(m, k)
            q, sf = mode.call(ctx.device(xh), device_scale(sv), out, sout, stream=ctx.stream)
            ctx.stream.synchronize()
            mode.check(xh, sv, out, sout, q, sf, f"grid stride {mode} [{m}, {k}]")


@case
def nvfp4_unaligned_outputs(ctx):
    """Codes into a buffer 8 bytes past a 16-byte boundary and linear scales at an odd
    address (the kernel's narrow stores), at even and odd numbers of scale columns."""
    for m, k in ((129, 256), (127, 112), (3, 16)):
        xh = make_x(ctx.rng, m, k, bfloat16)
        sv = MODES["nvfp4-linear"].scale_value(xh)
        for swizzled in (True, False):
            mode = MODES["nvfp4-swizzled" if swizzled else "nvfp4-linear"]
            out, sout = mode.outputs(m, k)
            q_buf = poisoned((out.size + 8,), np.uint8)
            out = q_buf[8:].reshape(out.shape)
            if not swizzled:
                s_buf = poisoned((sout.size + 1,), np.uint8)
                sout = s_buf[1:].reshape(sout.shape)
            q, sf = mode.call(ctx.device(xh), device_scale(sv), out, sout, stream=ctx.stream)
            ctx.stream.synchronize()
            mode.check(xh, sv, out, sout, q, sf, f"unaligned {mode} [{m}, {k}]")
            assert int(cupy.asnumpy(q_buf[:8]).max()) == POISON == int(cupy.asnumpy(q_buf[:8]).min())
            if not swizzled:
                assert int(cupy.asnumpy(s_buf[:1])[0]) == POISON


def _e4m3_midpoints() -> np.ndarray:
    """Every midpoint between neighbouring positive e4m3 values (and past 448)."""
    vals = np.sort(np.unique(np.abs(reference.fp8_e4m3_decode(np.arange(256, dtype=np.uint8)))))
    vals = vals[np.isfinite(vals)]
    mids = (vals[:-1] + vals[1:]) / 2
    return np.concatenate([mids, [448.0, 464.0, 480.0, 1e4]]).astype(np.float32)


@case(dtypes=("bf16", "fp32"))
def ties(ctx, dtype):
    """Exact rounding ties: static FP8 with scale 1 on every e4m3 midpoint (both signs);
    NVFP4 with global scale 1 on blocks of amax 6 (sf = 1) holding every e2m1 tie."""
    mids = _e4m3_midpoints()
    row = np.concatenate([mids, -mids])
    k = -(-row.size // 16) * 16
    x = np.zeros((3, k), np.float32)
    x[:, :row.size] = row
    xh = x.astype(bfloat16).view(np.uint16) if dtype == bfloat16 else x.astype(dtype)
    mode = MODES["static"]
    q, s = mode.call(ctx.device(xh), device_scale(1.0), stream=ctx.stream)
    ctx.stream.synchronize()
    mode.check(xh, 1.0, q, None, q, s, "e4m3 ties")
    tie = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    block = np.array(tie + [-t for t in tie[1:]] + [0.0], np.float32)
    x = np.tile(block, (130, 8))
    x[::2] = -x[::2]
    xh = x.astype(bfloat16).view(np.uint16) if dtype == bfloat16 else x.astype(dtype)
    for swizzled in (True, False):
        mode = MODES["nvfp4-swizzled" if swizzled else "nvfp4-linear"]
        out, sout = mode.outputs(*x.shape)
        q, sf = mode.call(ctx.device(xh), device_scale(1.0), out, sout, stream=ctx.stream)
        ctx.stream.synchronize()
        mode.check(xh, 1.0, out, sout, q, sf, f"e2m1 ties swizzled={swizzled}")
        assert np.all(cupy.asnumpy(sf).reshape(-1)[:(130 * 8) if not swizzled else 1] == 0x38)


@case
def interleave(ctx):
    """nvfp4_block_scale_interleave at ragged rows and scale columns (not multiples of 4),
    into poisoned and allocated outputs; equals the quantizer's own swizzled scales."""
    for m, c in ((1, 1), (3, 7), (127, 4), (128, 448), (129, 9), (1000, 3)):
        sf = ctx.rng.integers(0, 256, (m, c), dtype=np.uint8)
        want = reference.nvfp4_block_scale_interleave(sf)
        d = cupy.asarray(sf)
        cupy.cuda.runtime.deviceSynchronize()
        out = poisoned((want.size,), np.uint8)
        got = nvfp4_block_scale_interleave(d, out=out, stream=ctx.stream)
        ctx.stream.synchronize()
        same(out, want, f"interleave [{m}, {c}] out=")
        same(got, want, f"interleave [{m}, {c}] returned")
        same(nvfp4_block_scale_interleave(d, stream=ctx.stream), want, f"interleave [{m}, {c}]")
    xh = make_x(ctx.rng, 129, 512, bfloat16)
    x, gs = ctx.device(xh), device_scale(7.0)
    _, lin = quantize(x, "nvfp4", scale=gs, is_fp4_scale_swizzled=False, stream=ctx.stream)
    _, sw = quantize(x, "nvfp4", scale=gs, stream=ctx.stream)
    ctx.stream.synchronize()
    same(nvfp4_block_scale_interleave(lin, stream=ctx.stream), cupy.asnumpy(sw), "quantizer")


@case
def repeated_calls(ctx):
    """Twenty calls cycling through the modes on the same output buffers, fresh data and
    sizes each time (a smaller call after a larger one must leave nothing stale that the
    reference would see)."""
    names = list(MODES)
    bufs = {}
    for i in range(20):
        mode = MODES[names[i % len(names)]]
        m = (1000, 129, 3)[i % 3]
        k = 256 if not mode.g or 256 % mode.g == 0 else 2 * mode.g
        xh = make_x(ctx.rng, m, k, bfloat16)
        sv = mode.scale_value(xh)
        scale = None if sv is None else device_scale(sv)
        if names[i % len(names)] not in bufs:
            bufs[names[i % len(names)]] = mode.outputs(1000, 256 if mode.g != 48 else 288)
        big_q, big_s = bufs[names[i % len(names)]]
        out, sout = mode.outputs(m, k)
        # the caller's buffers are views of the first bytes of the big ones
        out = big_q.reshape(-1)[:out.size].reshape(out.shape)
        poison(out)
        if sout is not None:
            sout = big_s.reshape(-1)[:sout.size].reshape(sout.shape)
            poison(sout)
        q, sf = mode.call(ctx.device(xh), scale, out, sout, stream=ctx.stream)
        ctx.stream.synchronize()
        mode.check(xh, sv, out, sout, q, sf, f"call {i} {mode} [{m}, {k}]")


@case
def graph_replay(ctx):
    """Every mode (and the interleave) captured in one CUDA graph, replayed three times on
    new inputs with new scale values and poisoned outputs."""
    m, k = 129, 384  # K divisible by every group size of MODES
    stream = cupy.cuda.Stream(non_blocking=True)
    xs = {n: zeros((m, k), bfloat16) for n in MODES}
    scales = {n: device_scale(1.0) for n in MODES}
    outs = {n: MODES[n].outputs(m, k) for n in MODES}
    sf_lin = outs["nvfp4-linear"][1]
    inter = poisoned((reference.compute_fp4_swizzled_layout_sf_size(m, k // 16),), np.uint8)
    arg = {n: scales[n] if mode.takes_scale else None for n, mode in MODES.items()}
    for n, mode in MODES.items():  # load the kernels outside the capture
        mode.call(xs[n], arg[n], *outs[n], stream=stream)
    nvfp4_block_scale_interleave(sf_lin, out=inter, stream=stream)
    stream.synchronize()
    with stream:
        stream.begin_capture()
        rets = {n: mode.call(xs[n], arg[n], *outs[n], stream=stream)
                for n, mode in MODES.items()}
        nvfp4_block_scale_interleave(sf_lin, out=inter, stream=stream)
        graph = stream.end_capture()
    for replay in range(3):
        inputs = {}
        for n, mode in MODES.items():
            xh = make_x(ctx.rng, m, k, bfloat16)
            sv = mode.scale_value(xh)
            inputs[n] = (xh, sv)
            raw(xs[n]).set(xh)
            if sv is not None:
                scales[n].set(np.array([sv], np.float32))
            for buf in outs[n]:
                if buf is not None:
                    poison(buf)
        poison(inter)
        cupy.cuda.runtime.deviceSynchronize()
        graph.launch(stream)
        stream.synchronize()
        for n, mode in MODES.items():
            xh, sv = inputs[n]
            out, sout = outs[n]
            mode.check(xh, sv, out, sout, *rets[n], f"replay {replay} {n}")
        xh, sv = inputs["nvfp4-linear"]
        same(inter, reference.quant_nvfp4(xh, sv, "swizzled")[1], f"replay {replay} interleave")


@case
def pdl_chain(ctx):
    """Programmatic dependent launch: a chain whose kernels each read what the one before
    wrote, big enough that a kernel launched early overlaps its predecessor (1024 x 7168):
    static FP8 of x into q8, NVFP4 (linear scales) of x, the interleave of those scales,
    with PDL (the default) and without, eagerly and replayed in a graph, outputs poisoned
    before each run."""
    m, k = 1024, 7168
    stream = cupy.cuda.Stream(non_blocking=True)
    x = zeros((m, k), bfloat16)
    gs, s8 = device_scale(1.0), device_scale(1.0)
    q8 = poisoned((m, k), np.uint8)
    q4, lin = poisoned((m, k // 2), np.uint8), poisoned((m, k // 16), np.uint8)
    sw = poisoned((reference.compute_fp4_swizzled_layout_sf_size(m, k // 16),), np.uint8)

    def chain(pdl):
        quantize(x, "fp8", scale=s8, out=q8, stream=stream, enable_pdl=pdl)
        quantize(x, "nvfp4", scale=gs, is_fp4_scale_swizzled=False, out=q4, scale_out=lin,
                 stream=stream, enable_pdl=pdl)
        nvfp4_block_scale_interleave(lin, out=sw, stream=stream, enable_pdl=pdl)

    graphs = {}
    for pdl in (True, False):
        chain(pdl)  # load the kernels outside the capture
        stream.synchronize()
        with stream:
            stream.begin_capture()
            chain(pdl)
            graphs[pdl] = stream.end_capture()
    for run in range(4):
        pdl, replay = run % 2 == 0, run >= 2
        xh = make_x(ctx.rng, m, k, bfloat16)
        gv, sv = float(ctx.rng.uniform(100, 3000)), float(ctx.rng.uniform(0.01, 2))
        raw(x).set(xh)
        gs.set(np.array([gv], np.float32))
        s8.set(np.array([sv], np.float32))
        for buf in (q8, q4, lin, sw):
            poison(buf)
        cupy.cuda.runtime.deviceSynchronize()
        if replay:
            graphs[pdl].launch(stream)
        else:
            chain(pdl)
        stream.synchronize()
        what = f"pdl={pdl} {'graph' if replay else 'eager'}"
        same(q8, reference.quant_fp8(xh, sv), f"{what} fp8 codes")
        want_q, want_lin = reference.quant_nvfp4(xh, gv, "linear")
        same(q4, want_q, f"{what} nvfp4 codes")
        same(lin, want_lin, f"{what} nvfp4 linear scales")
        same(sw, reference.nvfp4_block_scale_interleave(want_lin), f"{what} interleave")


@case
def vllm_entry_point(ctx):
    """moe_kernel_quantize_input with vLLM's arguments: NVFP4 with linear scales (then the
    interleave, as the all-gather path does), a static scale beside per_act_token_quant,
    dynamic per-token, block_shape=[128, 128] (groups of 128), no quantization."""
    xh = make_x(ctx.rng, 129, 1024, bfloat16)
    x = ctx.device(xh)
    gs, s = 448.0 * 6.0 / 50.0, 0.05
    q, sf = moe_kernel_quantize_input(x, device_scale(gs), "nvfp4", False, None, False,
                                      stream=ctx.stream)
    want_q, want_sf = reference.quant_nvfp4(xh, gs, "linear")
    same(q, want_q, "nvfp4 codes")
    same(sf, want_sf, "nvfp4 linear sf")
    same(nvfp4_block_scale_interleave(sf, stream=ctx.stream),
         reference.quant_nvfp4(xh, gs, "swizzled")[1], "interleaved")
    q, scale = moe_kernel_quantize_input(x, device_scale(s), QuantDtype.FP8, True, None,
                                         stream=ctx.stream)
    same(q, reference.quant_fp8(xh, s), "static fp8")
    q, scale = moe_kernel_quantize_input(x, None, "fp8", True, None, stream=ctx.stream)
    want_q, want_s = reference.quant_fp8_dynamic_per_token(xh)
    same(q, want_q, "per-token codes")
    same(scale, want_s.reshape(-1, 1), "per-token scales")
    q, scale = moe_kernel_quantize_input(x, device_scale(s), "fp8", False, [128, 128],
                                         stream=ctx.stream)
    want_q, want_s = reference.quant_fp8_per_token_group_fp32(xh, 128)
    same(q, want_q, "group codes")
    same(scale, want_s, "group scales")
    assert moe_kernel_quantize_input(x, None, None, False) == (x, None)


@case
def zero_rows(ctx):
    """M = 0: empty outputs, nothing launched, no error."""
    x = zeros((0, 384), bfloat16)
    for name, mode in MODES.items():
        scale = device_scale(1.0) if mode.takes_scale else None
        q, sf = mode.call(x, scale, stream=ctx.stream)
        assert q.shape[0] == 0, name
    assert nvfp4_block_scale_interleave(cupy.empty((0, 4), np.uint8)).size == 0


@case
def bad_input(ctx):
    """Clear errors before any launch, from real device arrays."""
    x = zeros((4, 64), bfloat16)
    gs = device_scale(1.0)
    with pytest.raises(ValueError, match="x: array is on cpu"):
        quantize(np.zeros((4, 64), np.float32), "nvfp4", scale=gs)
    with pytest.raises(ValueError, match="x: array must be C-contiguous"):
        quantize(cupy.zeros((64, 4), np.float32).T, "fp8", scale=gs)
    flat = cupy.zeros(4 * 64 + 8, np.float16)
    with pytest.raises(ValueError, match="x: address .* not 16-byte aligned"):
        quantize(flat[4:4 + 4 * 64].reshape(4, 64), "fp8", scale=gs)
    with pytest.raises(TypeError, match="x: dtype int32"):
        quantize(cupy.zeros((4, 64), np.int32), "fp8", scale=gs)
    with pytest.raises(ValueError, match="K=40"):
        quantize(zeros((4, 40), bfloat16), "nvfp4", scale=gs)
    with pytest.raises(ValueError, match="scale: expected a one-element"):
        quantize(x, "nvfp4", scale=cupy.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"out: shape \(4, 64\)"):
        quantize(x, "nvfp4", scale=gs, out=cupy.zeros((4, 64), np.uint8))
    with pytest.raises(ValueError, match="scale_out: .* at least 512"):
        quantize(x, "nvfp4", scale=gs, scale_out=cupy.zeros(511, np.uint8))
    with pytest.raises(ValueError, match="divides K=64"):
        quantize(x, "fp8", block_shape=[1, 128])
    # a row of 2^31 elements (a view over 32 bytes: refused before anything reads it)
    huge = cupy.ndarray((1, 1 << 31), np.float16, cupy.zeros(16, np.float16).data)
    for kw in ({"scale": gs}, {"per_act_token_quant": True}, {"block_shape": [1, 128]}):
        with pytest.raises(ValueError, match="K=2147483648 elements per row is too large"):
            quantize(huge, "fp8", **kw)
    with pytest.raises(ValueError, match="sf_linear: expected 2"):
        nvfp4_block_scale_interleave(cupy.zeros(16, np.uint8))
    with pytest.raises(TypeError, match="enable_pdl must be a bool"):
        quantize(x, "nvfp4", scale=gs, enable_pdl=1)


@case
def torch_interop(ctx):
    """PyTorch tensors in and out: bf16 rows, float8_e4m3fn codes, fp32 scales."""
    torch = cuda_torch()
    if not hasattr(torch, "float8_e4m3fn"):
        unavailable("this PyTorch has no float8_e4m3fn")
    dev = torch.device("cuda", cupy.cuda.runtime.getDevice())
    xh = make_x(ctx.rng, 129, 256, bfloat16)
    x = torch.from_numpy(xh.view(np.int16)).to(dev).view(torch.bfloat16)
    out = torch.empty((129, 256), dtype=torch.float8_e4m3fn, device=dev)
    s = torch.empty((129, 1), dtype=torch.float32, device=dev)
    q, sf = quantize(x, "fp8", per_act_token_quant=True, out=out, scale_out=s)
    torch.cuda.synchronize()
    want_q, want_s = reference.quant_fp8_dynamic_per_token(xh)
    same(out.view(torch.uint8).cpu().numpy(), want_q, "torch out")
    same(q, want_q, "returned view")
    same(s.cpu().numpy().reshape(-1), want_s, "torch scale_out")
    gs = torch.tensor([3.0], dtype=torch.float32, device=dev)
    q, sf = quantize(x, "nvfp4", scale=gs)
    cupy.cuda.runtime.deviceSynchronize()
    want = reference.quant_nvfp4(xh, 3.0)
    same(q, want[0], "torch nvfp4 codes")
    same(sf, want[1], "torch nvfp4 sf")


if __name__ == "__main__":
    main()
