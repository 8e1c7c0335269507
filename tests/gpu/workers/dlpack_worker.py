"""DLPack boundary on a GPU: zero-copy round trips with PyTorch and JAX, clear errors."""

import cupy
import numpy as np

import moecomm
from moecomm.tensors import as_array, bfloat16
from tests.mpi import expect_raises, report_pass

group = moecomm.init()
dev = group.device_id


checked = []

# CuPy itself: passes through untouched.
c = cupy.random.standard_normal((3, 5), dtype=np.float32)
assert as_array(c, "c", dtype=np.float32, shape=(None, 5)) is c
expect_raises(TypeError, "dtype float32 is not supported, expected float16 or bfloat16",
              lambda: as_array(c, "c", dtype=(np.float16, bfloat16)))
expect_raises(ValueError, "shape (3, 5) does not match (*, 4)", lambda: as_array(c, "c", shape=(None, 4)))
expect_raises(ValueError, "expected 3 dimensions", lambda: as_array(c, "c", ndim=3))
expect_raises(ValueError, "C-contiguous", lambda: as_array(c.T, "c"))
checked.append("cupy")

try:
    import torch
except ImportError:
    torch = None
if torch is not None and torch.cuda.is_available():
    for tdt, ndt in ((torch.bfloat16, bfloat16), (torch.float16, np.float16),
                     (torch.float32, np.float32), (torch.int32, np.int32), (torch.uint8, np.uint8)):
        t = (torch.randn(7, 33, device=f"cuda:{dev}") * 50).to(tdt)
        a = as_array(t, "t", dtype=ndt, shape=(7, 33))
        assert a.data.ptr == t.data_ptr(), "torch -> cupy copied"
        assert a.dtype == ndt
        back = torch.from_dlpack(a)
        assert back.data_ptr() == t.data_ptr() and torch.equal(back, t)
        # outputs made by moecomm import zero-copy into torch
        out = cupy.arange(12, dtype=ndt).reshape(3, 4)
        tout = torch.from_dlpack(out)
        assert tout.data_ptr() == out.data.ptr and tout.dtype == tdt
        assert np.array_equal(tout.cpu().numpy().astype(np.float64) if tdt != torch.bfloat16
                              else tout.float().cpu().numpy(), cupy.asnumpy(out).astype(np.float64))
    t = torch.randn(4, 6, device=f"cuda:{dev}")
    expect_raises(ValueError, "C-contiguous", lambda: as_array(t.t(), "w"))
    expect_raises(ValueError, "array is on cpu", lambda: as_array(torch.zeros(3), "w"))
    expect_raises(TypeError, "dtype float32 is not supported", lambda: as_array(t, "w", dtype=bfloat16))
    # the producer's stream: a torch stream object is accepted as `stream=`
    s = torch.cuda.Stream()
    a = as_array(t, "t", stream=s)
    assert a.data.ptr == t.data_ptr()
    if torch.cuda.device_count() > 1:
        other = (dev + 1) % torch.cuda.device_count()
        expect_raises(ValueError, f"on cuda:{other}, expected cuda:{dev}",
                      lambda: as_array(torch.zeros(2, device=f"cuda:{other}"), "w"))
    checked.append("torch")

try:
    import jax
    import jax.numpy as jnp

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
except Exception:
    gpus = []
if gpus:
    mine = [d for d in gpus if d.id == dev] or gpus[:1]
    j = jax.device_put(jnp.arange(24, dtype=jnp.bfloat16).reshape(4, 6), mine[0])
    a = as_array(j, "j", dtype=bfloat16, shape=(4, 6), device=mine[0].id)
    assert a.data.ptr == j.unsafe_buffer_pointer(), "jax -> cupy copied"
    assert np.array_equal(cupy.asnumpy(a).astype(np.float32), np.arange(24).reshape(4, 6))
    with cupy.cuda.Device(mine[0].id):
        out = cupy.arange(10, dtype=np.float32) * 3
        jj = jax.dlpack.from_dlpack(out)
        assert np.array_equal(np.asarray(jj), np.arange(10) * 3)
    checked.append("jax")

if group.rank == 0:
    print("dlpack producers checked:", ", ".join(checked), flush=True)
report_pass(group.rank)
