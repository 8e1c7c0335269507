"""What the GPU workers share: the case context of a GPU job (its group, stream and
helpers), bit views, and the entry point.

A worker declares its cases with ``tests.mpi.case`` and ends with
``if __name__ == "__main__": main()``. Nothing here touches a GPU at import: pytest imports
the workers to list their cases, also on machines without one.
"""

from __future__ import annotations

import hashlib
import os

import cupy
import numpy as np
import pytest

import moecomm
from moecomm.tensors import bfloat16
from tests.mpi import CaseContext, run_cases

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def unavailable(what: str):
    """Skip a case for a framework (or one of its dtypes) this host lacks, saying what; on
    the GPU check (``MOECOMM_REQUIRE_GPU=1``, set by bench/gpu_suite.sh) fail instead:
    there every case must run, and a skip would count as a pass."""
    if os.environ.get("MOECOMM_REQUIRE_GPU") == "1":
        pytest.fail(f"{what}; MOECOMM_REQUIRE_GPU=1: the GPU check runs every case")
    pytest.skip(what)


def cuda_torch():
    """PyTorch with CUDA (``unavailable`` otherwise)."""
    try:
        import torch
    except ImportError:
        unavailable("PyTorch is not installed")
    if not torch.cuda.is_available():
        unavailable("PyTorch sees no CUDA device")
    return torch


def gpu_jax(device: int):
    """``(jax, jax.numpy, the JAX device of GPU device)`` (``unavailable`` otherwise).
    CuPy's current GPU is set back to ``device``: JAX's start leaves its last one current."""
    try:
        import jax
        import jax.dlpack  # noqa: F401 - the cases use it
        import jax.numpy as jnp

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except Exception as exc:  # not installed, or no GPU backend (jax raises then)
        unavailable(f"no JAX with a GPU backend here ({type(exc).__name__}: {exc})")
    cupy.cuda.Device(device).use()
    mine = [d for d in gpus if d.id == device]
    if not mine:
        unavailable(f"JAX sees no GPU {device}")
    return jax, jnp, mine[0]


def bits(a) -> np.ndarray:
    """The unsigned-integer view of an array (downloaded first if on the device): floats
    compared through it compare bit for bit."""
    a = cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else np.asarray(a)
    return a.view(UINT[a.dtype.itemsize])


def raw(d: cupy.ndarray) -> cupy.ndarray:
    """The unsigned-integer view of a C-contiguous device array (to fill or copy any dtype,
    bf16 included)."""
    assert d.flags.c_contiguous, "raw() needs a C-contiguous array"
    return cupy.ndarray(d.shape, UINT[d.itemsize], d.data)


def zeros(shape, dtype) -> cupy.ndarray:
    """A zeroed device array of any dtype, bf16 included."""
    dtype = np.dtype(dtype)
    d = cupy.zeros(max(1, int(np.prod(shape))) * dtype.itemsize, np.uint8)
    return cupy.ndarray(shape, dtype, d.data)


def host_dtype(dt) -> np.dtype:
    """The NumPy (reference) dtype of a device dtype: bf16 travels as uint16 bits."""
    return np.dtype(np.uint16) if np.dtype(dt) == bfloat16 else np.dtype(dt)


def dtype_label(dt) -> str:
    return {bfloat16: "bf16", np.dtype(np.float16): "fp16",
            np.dtype(np.float32): "fp32"}.get(np.dtype(dt), np.dtype(dt).name)


def reduce_inputs(ctx, shape, dtype) -> list[np.ndarray]:
    """Every rank's all-reduce input (the same list on every rank): standard normals with
    outliers (every 7th x64) and -0.0 (every 11th from 3), in ``dtype``."""
    xs = []
    for rng in ctx.rank_rngs():
        x = rng.standard_normal(shape).astype(np.float32)
        x.reshape(-1)[::7] *= 64.0
        x.reshape(-1)[3::11] = -0.0
        xs.append(x.astype(dtype))
    return xs


class GpuContext(CaseContext):
    """A case's context in a GPU job.

    group: ``moecomm.init()``'s group (made once per job). stream: the job's non-blocking
    stream. exclusive: every rank has a GPU of its own (NCCL works).
    """

    group: moecomm.ProcessGroup
    stream: cupy.cuda.Stream
    exclusive: bool

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each case starts on the rank's GPU, whatever an earlier case left current (JAX's
        # GPU backend switches the current device when it starts).
        cupy.cuda.Device(self.group.device_id).use()

    def rank_rngs(self) -> list[np.random.Generator]:
        """One generator per rank, the same list on every rank, from a fresh seed: every
        rank can build every rank's inputs."""
        seed = self.new_seed()
        return [np.random.default_rng([seed, r]) for r in range(self.world)]

    def device(self, a: np.ndarray, bf16: bool = True) -> cupy.ndarray:
        """Upload on the stream; uint16 arrays become bf16 arrays unless ``bf16=False``."""
        with self.stream:
            d = cupy.asarray(a)
        return cupy.ndarray(d.shape, bfloat16, d.data) if a.dtype == np.uint16 and bf16 else d

    def host(self, d: cupy.ndarray) -> np.ndarray:
        """Download after the stream's work; bf16 comes back as uint16 bit patterns."""
        self.stream.synchronize()
        if d.dtype == bfloat16:
            d = cupy.ndarray(d.shape, np.uint16, d.data) if d.flags.c_contiguous else \
                d.view(np.uint16)
        return d.get()

    def quiesce(self) -> None:
        """No rank has work in flight or touches a peer's buffers after this."""
        self.stream.synchronize()
        cupy.cuda.runtime.deviceSynchronize()
        self.group.barrier()

    def poison(self, layer) -> None:
        """``layer.poison()`` (a MoeAlltoAll's or EPAllToAll's outputs and workspace filled
        with garbage) while no peer writes into them: between two quiesces."""
        self.quiesce()
        layer.poison()
        self.quiesce()

    def ranks_agree(self, arrays) -> bool:
        """Whether every rank holds the same bytes in ``arrays`` (collective: one digest
        per rank gathered, the same answer on every rank)."""
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(cupy.asnumpy(a)).tobytes())
        return len(set(self.group.allgather(h.hexdigest()))) == 1


def all_bytes(a: np.ndarray, value: int) -> bool:
    """Every byte of host array ``a`` is ``value``."""
    return bool(np.all(np.ascontiguousarray(a).view(np.uint8) == value))


def _setup() -> dict:
    group = moecomm.init()
    return {"group": group, "stream": cupy.cuda.Stream(non_blocking=True),
            "exclusive": cupy.cuda.runtime.getDeviceCount() >= group.size}


def main() -> None:
    """Run the calling worker's cases on this rank's GPU (see ``tests.mpi.run_cases``)."""
    run_cases(setup=_setup, context=GpuContext)
