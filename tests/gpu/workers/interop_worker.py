"""Framework interop on real ranks: FP8 / FP4 codes and scales written into, and payloads
read from, CuPy, PyTorch and JAX arrays of every accepted dtype, compared bit for bit with
the same call on plain CuPy uint8 arrays; arrays on the host or on another GPU refused with
a ValueError naming the argument before any launch. PyTorch and JAX cases skip, saying so,
where those are not installed, and fail instead under MOECOMM_REQUIRE_GPU=1 (the GPU check)."""

import os
import re

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside CuPy's pool

import cupy  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from moecomm import reference  # noqa: E402
from moecomm.allreduce import all_reduce, create_allreduce_workspace  # noqa: E402
from moecomm.fusion import (AllReduceFusionOptions, AllReduceFusionOutputs,  # noqa: E402
                            AllReduceFusionPattern as P, allreduce_fusion,
                            compute_fp4_swizzled_layout_sf_size,
                            create_allreduce_fusion_workspace)
from moecomm.layouts import ue8m0_mn_major_storage_size  # noqa: E402
from moecomm.moe import EPAllToAll, MoeAlltoAll  # noqa: E402
from moecomm.symmetric import SymmetricBuffer  # noqa: E402
from moecomm.tensors import (as_array, bfloat16, float8_e4m3fn, float8_e5m2,  # noqa: E402
                             float8_e8m0fnu)
from tests.gpu.workers.common import (cuda_torch, gpu_jax, main, unavailable,  # noqa: E402
                                      zeros)
from tests.mpi import case  # noqa: E402

T, H = 5, 2048
FRAMEWORKS = {"cupy": "cupy", "torch": "torch", "jax": "jax"}
POISON = 0xA5


class Framework:
    """Makes poisoned arrays of one framework on this rank's GPU and reads their bytes."""

    def __init__(self, ctx, name):
        self.name, self.dev, self.ctx = name, ctx.group.device_id, ctx
        if name == "torch":
            self.torch = cuda_torch()
        elif name == "jax":
            self.jax, self.jnp, self.jdev = gpu_jax(self.dev)

    def make(self, shape, kind):
        """A poisoned array; kind: 'u8', 'e4m3', 'e8m0', 'fp4x2', 'i32'."""
        n = int(np.prod(shape))
        if self.name == "cupy":
            dtype = {"u8": np.uint8, "e4m3": float8_e4m3fn, "e8m0": float8_e8m0fnu,
                     "fp4x2": np.uint8, "i32": np.int32}[kind]
            buf = cupy.full(n * np.dtype(dtype).itemsize, POISON, np.uint8)
            return cupy.ndarray(shape, dtype, buf.data)
        if self.name == "torch":
            t = self.torch
            dtype = {"u8": t.uint8, "e4m3": t.float8_e4m3fn, "i32": t.int32,
                     "e8m0": getattr(t, "float8_e8m0fnu", None),
                     "fp4x2": getattr(t, "float4_e2m1fn_x2", None)}[kind]
            if dtype is None:
                unavailable(f"this PyTorch has no dtype for {kind}")
            size = 4 if kind == "i32" else 1
            raw = t.full((*shape[:-1], shape[-1] * size), POISON, dtype=t.uint8,
                         device=f"cuda:{self.dev}")
            return raw.view(dtype)
        jnp = self.jnp
        dtype = {"u8": jnp.uint8, "e4m3": jnp.float8_e4m3fn, "fp4x2": jnp.uint8,
                 "e8m0": getattr(jnp, "float8_e8m0fnu", None), "i32": jnp.int32}[kind]
        if dtype is None:
            unavailable(f"this JAX has no dtype for {kind}")
        size = np.dtype(dtype).itemsize
        raw = self.jax.device_put(np.full((*shape, size), POISON, np.uint8), self.jdev)
        out = self.jax.lax.bitcast_convert_type(raw, dtype) if size > 1 else \
            self.jax.lax.bitcast_convert_type(raw[..., 0], dtype)
        return out.block_until_ready()

    def bytes(self, a) -> np.ndarray:
        """The array's bytes, after the op's stream has finished."""
        self.ctx.stream.synchronize()
        if self.name == "cupy":
            return cupy.asnumpy(cupy.ndarray((a.nbytes,), np.uint8, a.data))
        if self.name == "torch":
            return a.contiguous().view(self.torch.uint8).cpu().numpy().reshape(-1)
        return np.asarray(a).view(np.uint8).reshape(-1)


def fusion_case(ctx):
    ws = ctx.shared("fusion_ws", lambda: create_allreduce_fusion_workspace(
        ctx.group, max_token_num=T, hidden_dim=H))
    r = ctx.rng

    def bf16(a):
        d = cupy.asarray(a.astype(bfloat16).view(np.uint16))
        return cupy.ndarray(d.shape, bfloat16, d.data)

    x = bf16(r.standard_normal((T, H)) * (1 + ctx.rank))
    return ws, x, bf16(r.standard_normal((T, H))), bf16(1 + 0.1 * r.standard_normal(H))


def run_fusion(ctx, ws, x, res, gamma, pattern, quant_out, scale_out=None, **opts):
    outs = AllReduceFusionOutputs(residual_out=zeros((T, H), bfloat16),
                                  quant_out=quant_out, scale_out=scale_out)
    options = AllReduceFusionOptions(residual=res, rms_gamma=gamma, **opts)
    cupy.cuda.runtime.deviceSynchronize()  # inputs made on other streams are ready
    allreduce_fusion(x, ws, pattern, options, outs, stream=ctx.stream)
    ctx.stream.synchronize()
    return outs


@case(variants=FRAMEWORKS)
def import_8bit_floats(ctx, name):
    """float8_e4m3fn / e5m2 / e8m0fnu arrays of each framework import zero-copy as their
    ml_dtypes dtype, with the producer's bytes."""
    fw = Framework(ctx, name)
    for dtype in (float8_e4m3fn, float8_e5m2, float8_e8m0fnu):
        codes = ctx.rng.integers(0, 256, (3, 40)).astype(np.uint8)
        if name == "cupy":
            raw = cupy.asarray(codes)
            a, ptr = cupy.ndarray(raw.shape, dtype, raw.data), raw.data.ptr
        elif name == "torch":
            tdt = getattr(fw.torch, dtype.name, None)
            if tdt is None:
                continue  # this torch has no such dtype
            a = fw.torch.from_numpy(codes).to(f"cuda:{fw.dev}").view(tdt)
            ptr = a.data_ptr()
        else:
            a = fw.jax.device_put(codes.view(dtype), fw.jdev).block_until_ready()
            ptr = a.unsafe_buffer_pointer()
            cupy.cuda.Device(fw.dev).use()  # JAX's first transfer may switch the device
        cupy.cuda.runtime.deviceSynchronize()
        arr = as_array(a, "a", dtype=dtype, shape=(3, 40), stream=ctx.stream)
        assert arr.data.ptr == ptr, f"{name} {dtype.name}: imported by a copy"
        ctx.stream.synchronize()
        got = cupy.asnumpy(cupy.ndarray(arr.shape, np.uint8, arr.data))
        assert np.array_equal(got, codes), f"{name} {dtype.name}: bytes differ"


@case(variants=FRAMEWORKS)
def fp8_quant_out(ctx, name):
    """Static FP8 codes into uint8 and float8_e4m3fn arrays of each framework: the same
    bytes as into a CuPy uint8 array."""
    fw = Framework(ctx, name)
    ws, x, res, gamma = fusion_case(ctx)
    scale = cupy.asarray([2.5], np.float32)
    base = cupy.full((T, H), POISON, np.uint8)
    run_fusion(ctx, ws, x, res, gamma, P.kARResidualRMSNormFP8Quant, base, scale_factor=scale)
    want = cupy.asnumpy(base).reshape(-1)
    assert not np.all(want == POISON)
    for kind in ("u8", "e4m3"):
        q = fw.make((T, H), kind)
        run_fusion(ctx, ws, x, res, gamma, P.kARResidualRMSNormFP8Quant, q, scale_factor=scale)
        assert np.array_equal(fw.bytes(q), want), f"{name} {kind}: FP8 codes differ"
    with pytest.raises(TypeError, match=r"outputs\.quant_out: dtype int8 is not supported"):
        run_fusion(ctx, ws, x, res, gamma, P.kARResidualRMSNormFP8Quant,
                   cupy.zeros((T, H), np.int8), scale_factor=scale)


@case(variants=FRAMEWORKS)
def nvfp4_outputs(ctx, name):
    """NVFP4 packed codes (uint8, torch float4_e2m1fn_x2) and e4m3 block scales (uint8,
    float8_e4m3fn) of each framework: the same bytes as CuPy uint8 arrays."""
    fw = Framework(ctx, name)
    ws, x, res, gamma = fusion_case(ctx)
    gs = cupy.asarray([448 * 6 / 12.0], np.float32)
    nsf = compute_fp4_swizzled_layout_sf_size(T, H // 16)
    base_q, base_sf = cupy.full((T, H // 2), POISON, np.uint8), cupy.full(nsf, POISON, np.uint8)
    run_fusion(ctx, ws, x, res, gamma, P.kARResidualRMSNormFP4Quant, base_q, base_sf,
               scale_factor=gs)
    want_q, want_sf = cupy.asnumpy(base_q).reshape(-1), cupy.asnumpy(base_sf)
    # the baseline was written (fusion_worker checks its bytes against the reference)
    assert not np.all(want_q == POISON) and not np.all(want_sf == POISON), "nothing written"
    kinds = [("u8", "u8"), ("u8", "e4m3")] + ([("fp4x2", "e4m3")] if name == "torch" else [])
    for qk, sk in kinds:
        q, sf = fw.make((T, H // 2), qk), fw.make((nsf,), sk)
        run_fusion(ctx, ws, x, res, gamma, P.kARResidualRMSNormFP4Quant, q, sf, scale_factor=gs)
        assert np.array_equal(fw.bytes(q), want_q), f"{name} {qk}: NVFP4 codes differ"
        assert np.array_equal(fw.bytes(sf), want_sf), f"{name} {sk}: NVFP4 scales differ"


@case(variants=FRAMEWORKS)
def group_fp8_scales(ctx, name):
    """Per-token-group FP8: UE8M0 scales into int32 words or their bytes (uint8,
    float8_e8m0fnu) of each framework, codes into float8_e4m3fn."""
    fw = Framework(ctx, name)
    ws, x, res, gamma = fusion_case(ctx)
    words = ue8m0_mn_major_storage_size(T, H // 128)
    base_q, base_sf = cupy.full((T, H), POISON, np.uint8), cupy.full(words, -1, np.int32)
    pattern = P.kARResidualRMSNormPerTokenGroupFP8PackedQuant
    run_fusion(ctx, ws, x, res, gamma, pattern, base_q, base_sf, block_quant_group_size=128)
    want_q = cupy.asnumpy(base_q).reshape(-1)
    want_sf = cupy.asnumpy(base_sf).view(np.uint8)
    # every byte of the storage is written, padding included (0), and no scale is 0xFF
    assert not np.any(want_sf == 0xFF), "scale storage left unwritten"
    assert not np.all(want_q == POISON), "codes left unwritten"
    for sk, shape in (("i32", (words,)), ("u8", (4 * words,)), ("e8m0", (4 * words,))):
        q, sf = fw.make((T, H), "e4m3"), fw.make(shape, sk)
        run_fusion(ctx, ws, x, res, gamma, pattern, q, sf, block_quant_group_size=128)
        assert np.array_equal(fw.bytes(q), want_q), f"{name}: group FP8 codes differ"
        assert np.array_equal(fw.bytes(sf), want_sf), f"{name} {sk}: scales differ"


@case(variants=FRAMEWORKS)
def fp8_payload(ctx, name):
    """A float8_e4m3fn payload of each framework travels through MoeAlltoAll.dispatch
    bit for bit: it arrives equal to the same bytes sent as uint8."""
    fw = Framework(ctx, name)
    n = ctx.group.local_size
    a2a = ctx.shared("a2a", lambda: MoeAlltoAll(
        ctx.group, 8, 2, 4 * n, workspace_size_per_rank=MoeAlltoAll.get_moe_workspace_size_per_rank(
            n, 2, 8, 256, extra_payload_bytes_per_token=512)))
    r = ctx.rng
    ids = cupy.asarray(r.integers(0, 4 * n, (6, 2)).astype(np.int32))
    codes = r.integers(0, 256, (6, 256)).astype(np.uint8)
    ctx.poison(a2a)
    f8 = fw.make((6, 256), "e4m3")
    if name == "cupy":
        cupy.ndarray((6, 256), np.uint8, f8.data).set(codes)
    elif name == "torch":
        f8.view(fw.torch.uint8).copy_(fw.torch.from_numpy(codes).to(f"cuda:{fw.dev}"))
    else:
        f8 = fw.jax.device_put(codes.view(float8_e4m3fn), fw.jdev)
    plain = cupy.asarray(codes)
    cupy.cuda.runtime.deviceSynchronize()  # inputs made on other streams are ready
    got8, gotu = a2a.dispatch(ids, [f8, plain], 8, stream=ctx.stream)
    assert got8.dtype == float8_e4m3fn and gotu.dtype == np.uint8
    counts = ctx.host(a2a.recv_counts)
    got8 = cupy.asnumpy(cupy.ndarray(got8.shape, np.uint8, got8.data))
    gotu = cupy.asnumpy(gotu)
    assert counts.sum() > 0 or ctx.world == 1
    for s, c in enumerate(counts):
        assert np.array_equal(got8[s, :c], gotu[s, :c]), f"{name}: block {s} differs"
    payload = zeros((n, 8, 256), bfloat16)
    cupy.cuda.runtime.deviceSynchronize()
    a2a.combine(payload, 8, stream=ctx.stream)  # dispatch and combine alternate
    ctx.stream.synchronize()


@case(variants=FRAMEWORKS)
def compact_layer(ctx, name):
    """EPAllToAll given a framework's arrays (x, topk_ids, weights, y, and out= where the
    framework has mutable arrays): the same bits as the same calls on CuPy arrays, and a
    PyTorch ``out`` comes back as the tensor passed."""
    fw = Framework(ctx, name)
    n, k, h = ctx.world, 2, 256
    layer = ctx.shared("compact", lambda: EPAllToAll(ctx.group, 8, k, 4 * n, h, np.float32))
    r = ctx.rng
    x = r.standard_normal((6, h)).astype(np.float32)
    ids = r.integers(-1, 4 * n, (6, k)).astype(np.int32)
    w = r.random((6, k)).astype(np.float32)
    if name == "cupy":
        put = cupy.asarray
    elif name == "torch":
        put = lambda a: fw.torch.from_numpy(a).to(f"cuda:{fw.dev}")  # noqa: E731
    else:
        put = lambda a: fw.jax.device_put(a, fw.jdev)  # noqa: E731

    def pair(conv, out=None):
        inputs = conv(x), conv(ids), conv(w)
        cupy.cuda.runtime.deviceSynchronize()  # inputs made on other streams are ready
        recv_x, recv_w, lay = layer.dispatch(*inputs, stream=ctx.stream)
        rows = int(lay.num_rows_host(ctx.stream))
        got = (cupy.asnumpy(recv_x[:rows]), cupy.asnumpy(recv_w[:rows]))
        y = np.zeros(recv_x.shape, np.float32)  # a separate array: staged into the layer
        y[:rows] = got[0] * 2
        y = conv(y)
        cupy.cuda.runtime.deviceSynchronize()
        res = layer.combine(y, lay, apply_weights=True, stream=ctx.stream, out=out)
        ctx.stream.synchronize()
        return got, res

    (want_x, want_w), want = pair(cupy.asarray)
    want = cupy.asnumpy(want)
    out = None
    if name == "torch":
        out = fw.torch.full((6, h), float("nan"), device=f"cuda:{fw.dev}")
    (got_x, got_w), res = pair(put, out)
    if out is not None:
        assert res is out, "a PyTorch out= comes back as the tensor passed"
    res = res.cpu().numpy() if out is not None else cupy.asnumpy(res)
    for what, a, b in (("recv_x", got_x, want_x), ("recv_weights", got_w, want_w),
                       ("combine", res, want)):
        assert a.shape == b.shape, f"{name}: {what} shape {a.shape}, the CuPy call's {b.shape}"
        bad = np.argwhere(a.view(np.uint32) != b.view(np.uint32))
        assert bad.size == 0, (f"{name}: {what}: {len(bad)} of {a.size} values differ from the "
                               f"CuPy call's, first at {bad[:3].tolist()}")


def _host_arrays(name, fw):
    if name == "cupy":
        return [np.zeros(1024, np.float32)]
    if name == "torch":
        return [fw.torch.zeros(1024)]
    return [fw.jax.device_put(np.zeros(1024, np.float32), fw.jax.devices("cpu")[0])]


def _other_gpu_array(name, fw, other):
    if name == "cupy":
        with cupy.cuda.Device(other):
            return cupy.zeros(1024, np.float32)
    if name == "torch":
        return fw.torch.zeros(1024, device=f"cuda:{other}")
    gpus = [d for d in fw.jax.devices() if d.platform == "gpu" and d.id == other]
    if not gpus:
        pytest.skip(f"JAX sees no GPU {other}")
    return fw.jax.device_put(np.zeros(1024, np.float32), gpus[0])


@case(variants=FRAMEWORKS)
def devices(ctx, name):
    """Host arrays and arrays on the other GPU raise ValueError naming the argument, its
    device and this rank's, in all_reduce (input and out=) and allreduce_fusion."""
    fw = Framework(ctx, name)
    dev = ctx.group.device_id
    ws = ctx.shared("ar_ws", lambda: create_allreduce_workspace(ctx.group, 1 << 16, np.float32))
    good = cupy.ones(1024, np.float32)
    for host in _host_arrays(name, fw):
        with pytest.raises(ValueError, match=rf"^x: array is on cpu, expected cuda:{dev}$"):
            all_reduce(host, ws, stream=ctx.stream)
        with pytest.raises(ValueError, match=rf"^out: array is on cpu, expected cuda:{dev}$"):
            all_reduce(good, ws, out=host, stream=ctx.stream)
    count = cupy.cuda.runtime.getDeviceCount()
    if count > 1:
        other = (dev + 1) % count
        far = _other_gpu_array(name, fw, other)
        msg = re.escape(f"array is on cuda:{other}, expected cuda:{dev}")
        with pytest.raises(ValueError, match=f"^x: {msg}$"):
            all_reduce(far, ws, stream=ctx.stream)
        fws, x, res, gamma = fusion_case(ctx)
        with pytest.raises(ValueError, match=f"^options.residual: {msg}$"):
            allreduce_fusion(x, fws, P.kARResidualRMSNorm,
                             AllReduceFusionOptions(residual=far, rms_gamma=gamma),
                             AllReduceFusionOutputs(residual_out=res, norm_out=zeros((T, H), bfloat16)))
    # nothing was launched: the workspace still works, on every rank alike (fresh data
    # into a poisoned output)
    xs = [rng.standard_normal(1024).astype(np.float32) for rng in ctx.rank_rngs()]
    y = cupy.full(1024, np.nan, np.float32)
    mine = cupy.asarray(xs[ctx.rank])
    cupy.cuda.runtime.deviceSynchronize()
    all_reduce(mine, ws, out=y, stream=ctx.stream)
    ctx.stream.synchronize()
    assert np.array_equal(cupy.asnumpy(y).view(np.uint32),
                          reference.all_reduce(xs).view(np.uint32)), "usable after refusals"


@case
def other_gpu_current(ctx):
    """Ops made on this rank's GPU run there while another GPU is current (JAX's start
    leaves its last GPU current): all_reduce, allreduce_fusion, MoeAlltoAll and EPAllToAll
    accept this GPU's arrays, give the bits the same calls give with this GPU current, and
    leave it current."""
    count = cupy.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip("one GPU: no other GPU to make current")
    dev, other = ctx.group.device_id, (ctx.group.device_id + 1) % count
    n = ctx.group.local_size
    ar = ctx.shared("ar_ws", lambda: create_allreduce_workspace(ctx.group, 1 << 16, np.float32))
    fws, fx, res, gamma = fusion_case(ctx)
    a2a = ctx.shared("a2a_h256", lambda: MoeAlltoAll(ctx.group, 8, 2, 4 * n, hidden_size=256))
    layer = ctx.shared("compact", lambda: EPAllToAll(ctx.group, 8, 2, 4 * n, 256, np.float32))
    r = ctx.rng
    x = cupy.asarray(r.standard_normal(1024).astype(np.float32))
    ids = cupy.asarray(r.integers(-1, 4 * n, (6, 2)).astype(np.int32))
    rows = cupy.asarray(r.standard_normal((6, 256)).astype(np.float32))
    half = cupy.asarray(r.standard_normal((6, 256)).astype(bfloat16).view(np.uint16))
    half = cupy.ndarray(half.shape, bfloat16, half.data)  # the exchange's sizing: bf16 rows

    def calls(current):
        """Every op, each called with ``current`` made the current GPU first."""
        def call(fn, *args, **kw):
            cupy.cuda.runtime.setDevice(current)
            result = fn(*args, stream=ctx.stream, **kw)
            assert cupy.cuda.runtime.getDevice() == dev, f"{fn.__name__}: cuda:{dev} current after"
            return result

        outs = AllReduceFusionOutputs(residual_out=zeros((T, H), bfloat16),
                                      norm_out=zeros((T, H), bfloat16))
        got = [call(all_reduce, x, ar)]
        call(allreduce_fusion, fx, fws, P.kARResidualRMSNorm,
             AllReduceFusionOptions(residual=res, rms_gamma=gamma), outs)
        got += [outs.residual_out, outs.norm_out]
        (recv,) = call(a2a.dispatch, ids, [half], 8)
        got.append(call(a2a.combine, recv, 8))
        recv_x, _, lay = call(layer.dispatch, rows, ids)
        got.append(call(layer.combine, recv_x, lay))
        ctx.stream.synchronize()
        return [cupy.asnumpy(a).view(np.uint8) for a in got]

    want = calls(dev)
    for step in range(2):
        got = calls(other)
        for i, (g, w) in enumerate(zip(got, want)):
            assert np.array_equal(g, w), f"call {i} differs with cuda:{other} current"


@case
def close_with_other_gpu_current(ctx):
    """A SymmetricBuffer's views name its GPU, and it and an all-reduce workspace close on
    their GPU, with another GPU current (JAX's start leaves its last GPU current): the
    kernels waited for are theirs, and the current GPU stays the caller's."""
    count = cupy.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip("one GPU: no other GPU to make current")
    dev, other = ctx.group.device_id, (ctx.group.device_id + 1) % count
    buf = SymmetricBuffer(ctx.group, 1 << 16)
    ws = create_allreduce_workspace(ctx.group, 1 << 16, np.float32)
    x = cupy.ones(1024, np.float32)
    cupy.cuda.runtime.setDevice(other)
    views = [buf.view(np.float32, (16,)), buf.strided_view(np.float32, 64, 128, 4),
             buf.peer_view(np.float32, (16,)) if ctx.group.local_size == 1 else None]
    for v in views:
        if v is not None:
            assert v.device.id == dev and v.__dlpack_device__() == (2, dev), v.device
    y = all_reduce(x, ws, stream=ctx.stream)  # leaves this rank's GPU current
    cupy.cuda.runtime.setDevice(other)
    ws.close()
    buf.close()
    assert cupy.cuda.runtime.getDevice() == other, "close() changed the current GPU"
    cupy.cuda.runtime.setDevice(dev)
    assert float(y[0]) == ctx.group.local_size


if __name__ == "__main__":
    main()
