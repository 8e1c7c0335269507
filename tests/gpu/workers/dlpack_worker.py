"""DLPack boundary on a GPU: zero-copy round trips with CuPy, PyTorch and JAX, clear
errors. The PyTorch and JAX cases skip, saying so, where those are not installed."""

import os
import re

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside CuPy's pool

import cupy
import numpy as np
import pytest

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


if __name__ == "__main__":
    main()
