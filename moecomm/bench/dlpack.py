"""Host cost of the DLPack boundary: microseconds per ``as_array`` (import + validate).

Times ``moecomm.tensors.as_array`` on a [128, 4096] bf16 array made by CuPy, PyTorch and
JAX (those installed), plus ``stream=`` given, over many calls; median of 20 batches.
"""

from __future__ import annotations

import time

import cupy
import numpy as np

from ..tensors import as_array, bfloat16
from .common import environment, print_table, require_gpu, write_result


def add_arguments(p) -> None:
    p.add_argument("--calls", type=int, default=2000)


def _per_call_us(fn, calls: int) -> float:
    for _ in range(100):
        fn()
    batches = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(calls // 20):
            fn()
        batches.append((time.perf_counter() - t0) / (calls // 20) * 1e6)
    return float(np.median(batches))


def _producers(shape):
    yield "cupy", cupy.zeros(shape, bfloat16)
    try:
        import torch

        yield "torch", torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    except Exception:  # not installed, or no CUDA build
        pass
    try:
        import jax
        import jax.numpy as jnp

        if any(d.platform == "gpu" for d in jax.devices()):
            yield "jax", jnp.zeros(shape, jnp.bfloat16)
    except Exception:
        pass


def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    shape = (128, 4096)
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    for name, x in _producers(shape):
        plain = _per_call_us(lambda: as_array(x, "x", dtype=bfloat16, shape=(None, 4096)),
                             args.calls)
        streamed = _per_call_us(
            lambda: as_array(x, "x", dtype=bfloat16, shape=(None, 4096), stream=stream),
            args.calls)
        rows.append({"producer": name, "us_per_call": plain, "us_per_call_with_stream": streamed})
    if group.rank == 0:
        print(f"# dlpack boundary, {env['device']}")
        print_table(rows, ["producer", "us_per_call", "us_per_call_with_stream"])
        print(f"wrote {write_result(args.out, 'dlpack', env, rows)}")
    group.close()
    return 0
