"""DLPack boundary on a GPU: zero-copy round trips with CuPy, PyTorch and JAX, clear
errors. The PyTorch and JAX cases skip, saying so, where those are not installed."""

import ctypes
import os
import re

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside CuPy's pool

import cupy
import numpy as np
import pytest

from moecomm import quant
from moecomm.allreduce import all_reduce, create_allreduce_workspace
from moecomm.fusion import (AllReduceFusionOptions, AllReduceFusionOutputs,
                            AllReduceFusionPattern, allreduce_fusion,
                            create_allreduce_fusion_workspace)
from moecomm.tensors import as_array, bfloat16
from tests.gpu.workers.common import cuda_torch, gpu_jax, main
from tests.mpi import case


@case
def cupy_arrays(ctx):
    """CuPy arrays pass through untouched; wrong dtype, shape, rank or layout are refused."""
    c = cupy.random.standard_normal((3, 5), dtype=np.float32)
    assert as_array(c, "c", dtype=np.float32, shape=(None, 5)) is c
    with pytest.raises(TypeError,
                       match="dtype float32 is not supported, expected float16 or bfloat16"):
        as_array(c, "c", dtype=(np.float16, bfloat16))
    with pytest.raises(ValueError, match=re.escape("shape (3, 5) does not match (*, 4)")):
        as_array(c, "c", shape=(None, 4))
    with pytest.raises(ValueError, match="expected 3 dimensions"):
        as_array(c, "c", ndim=3)
    with pytest.raises(ValueError, match="C-contiguous"):
        as_array(c.T, "c")


@case(dtypes=("bf16", "fp16", "fp32", "int32", "uint8"))
def torch_roundtrip(ctx, dtype):
    """torch -> cupy and moecomm outputs -> torch, both zero-copy, values intact."""
    torch = cuda_torch()
    tdt = {bfloat16: torch.bfloat16, np.dtype(np.float16): torch.float16,
           np.dtype(np.float32): torch.float32, np.dtype(np.int32): torch.int32,
           np.dtype(np.uint8): torch.uint8}[dtype]
    dev = ctx.group.device_id
    t = (torch.randn(7, 33, device=f"cuda:{dev}") * 50).to(tdt)
    a = as_array(t, "t", dtype=dtype, shape=(7, 33))
    assert a.data.ptr == t.data_ptr(), "torch -> cupy copied"
    assert a.dtype == dtype
    back = torch.from_dlpack(a)
    assert back.data_ptr() == t.data_ptr() and torch.equal(back, t)
    # outputs made by moecomm import zero-copy into torch
    out = cupy.arange(12, dtype=dtype).reshape(3, 4)
    tout = torch.from_dlpack(out)
    assert tout.data_ptr() == out.data.ptr and tout.dtype == tdt
    assert np.array_equal(tout.cpu().numpy().astype(np.float64) if tdt != torch.bfloat16
                          else tout.float().cpu().numpy(), cupy.asnumpy(out).astype(np.float64))


@case
def torch_errors_and_streams(ctx):
    """Bad torch tensors are refused; a torch stream is accepted as ``stream=``."""
    torch = cuda_torch()
    dev = ctx.group.device_id
    t = torch.randn(4, 6, device=f"cuda:{dev}")
    with pytest.raises(ValueError, match="C-contiguous"):
        as_array(t.t(), "w")
    with pytest.raises(ValueError, match="array is on cpu"):
        as_array(torch.zeros(3), "w")
    with pytest.raises(TypeError, match="dtype float32 is not supported"):
        as_array(t, "w", dtype=bfloat16)
    # the producer's stream: a torch stream object is accepted as `stream=`
    s = torch.cuda.Stream()
    a = as_array(t, "t", stream=s)
    assert a.data.ptr == t.data_ptr()
    if torch.cuda.device_count() > 1:
        other = (dev + 1) % torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"on cuda:{other}, expected cuda:{dev}"):
            as_array(torch.zeros(2, device=f"cuda:{other}"), "w")


@case
def jax_arrays(ctx):
    """jax -> cupy and cupy -> jax, zero-copy."""
    jax, jnp, mine = gpu_jax(ctx.group.device_id)
    j = jax.device_put(jnp.arange(24, dtype=jnp.bfloat16).reshape(4, 6), mine)
    a = as_array(j, "j", dtype=bfloat16, shape=(4, 6), device=mine.id)
    assert a.data.ptr == j.unsafe_buffer_pointer(), "jax -> cupy copied"
    assert np.array_equal(cupy.asnumpy(a).astype(np.float32), np.arange(24).reshape(4, 6))
    with cupy.cuda.Device(mine.id):
        out = cupy.arange(10, dtype=np.float32) * 3
        jj = jax.dlpack.from_dlpack(out)
        assert np.array_equal(np.asarray(jj), np.arange(10) * 3)


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_get_pointer.restype = ctypes.c_void_p


class ReadOnly:
    """A CuPy array exported as a versioned DLPack capsule flagged read-only."""

    def __init__(self, a):
        self.a = a

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()

    def __dlpack__(self, stream=None, max_version=None, **kw):
        cap = self.a.__dlpack__(stream=stream, max_version=(1, 0))
        managed = _get_pointer(cap, b"dltensor_versioned")
        flags = ctypes.c_uint64.from_address(managed + 24)  # after version, ctx, deleter
        flags.value |= 1  # DLPACK_FLAG_BITMASK_READ_ONLY
        return cap


@case
def read_only_exports(ctx):
    """A DLPack export flagged read-only is read zero-copy as an input, and refused as an
    output before anything is launched: the array keeps its bytes."""
    host = np.random.default_rng(7).standard_normal(4096).astype(bfloat16)  # same on every rank
    x = cupy.ndarray(host.shape, bfloat16, cupy.asarray(host.view(np.uint16)).data)
    assert as_array(ReadOnly(x), "x").data.ptr == x.data.ptr
    with pytest.raises(ValueError, match="^w: the array is read-only"):
        as_array(ReadOnly(x), "w", writable=True)
    ws = ctx.shared("ar_ws", lambda: create_allreduce_workspace(ctx.group, max_bytes=1 << 16))
    out = cupy.full(4096 // 2, 0x7FC1_7FC1, np.uint32)  # bf16 NaN pairs
    poisoned = out.copy()
    with pytest.raises(ValueError, match="^out: the array is read-only"):
        all_reduce(x, ws, out=ReadOnly(cupy.ndarray((4096,), bfloat16, out.data)))
    got = all_reduce(ReadOnly(x), ws)  # an input: read in place
    cupy.cuda.runtime.deviceSynchronize()
    assert bool((out == poisoned).all()), "a refused output was written"
    want = (host.astype(np.float32) * ctx.world).astype(bfloat16)  # exact: a power of 2
    assert np.array_equal(cupy.asnumpy(got.view(np.uint16)), want.view(np.uint16))
    codes = cupy.full((16, 64), 0xA5, np.uint8)
    scale = cupy.ones(1, np.float32)
    xs = cupy.ndarray((16, 64), bfloat16, x.data)
    with pytest.raises(ValueError, match="^out: the array is read-only"):
        quant.quantize(xs, "fp8", scale=scale, out=ReadOnly(codes))
    fws = ctx.shared("fusion_ws", lambda: create_allreduce_fusion_workspace(
        ctx.group, max_token_num=16, hidden_dim=64))
    res = cupy.full(16 * 64 // 2, 0x7FC1_7FC1, np.uint32)
    norm = res.copy()
    options = AllReduceFusionOptions(residual=ReadOnly(xs), rms_gamma=ReadOnly(xs[0]),
                                     scale_factor=ReadOnly(scale))  # read-only inputs
    bf = lambda a: cupy.ndarray((16, 64), bfloat16, a.data)  # noqa: E731
    with pytest.raises(ValueError, match=r"^outputs.norm_out: the array is read-only"):
        allreduce_fusion(ReadOnly(xs), fws, AllReduceFusionPattern.kARResidualRMSNormOutFP8Quant,
                         options, AllReduceFusionOutputs(
                             residual_out=bf(res), norm_out=ReadOnly(bf(norm)),
                             quant_out=codes))
    cupy.cuda.runtime.deviceSynchronize()
    assert bool((codes == 0xA5).all()), "a refused output was written"
    assert bool((res == poisoned[:res.size]).all()) and bool((norm == res).all()), \
        "a refused call wrote its outputs"
    allreduce_fusion(ReadOnly(xs), fws, AllReduceFusionPattern.kARResidualRMSNormOutFP8Quant,
                     options, AllReduceFusionOutputs(residual_out=bf(res), norm_out=bf(norm),
                                                     quant_out=codes))
    cupy.cuda.runtime.deviceSynchronize()
    rows = host[:16 * 64].astype(np.float32)
    want = ((rows * ctx.world).astype(bfloat16).astype(np.float32) + rows).astype(bfloat16)
    assert np.array_equal(cupy.asnumpy(res).view(np.uint16), want.view(np.uint16)), \
        "residual_out from read-only inputs"


if __name__ == "__main__":
    main()
