"""Host cost of the DLPack boundary: an eager 8 KiB ``all_reduce`` per framework and stream.

``mpiexec -n 2 python -m moecomm.bench dlpack`` times ``all_reduce(x, ws, stream=s)`` on
a 4096-element bf16 ``x`` (8 KiB, one-shot): wall time per call over ``--calls``
back-to-back eager calls, the device synchronised at the end, median of ``--repeats``
(the rows' batches interleaved: round r times every row once); ``best_us`` is the fastest
batch (host noise only adds time: the cost the code itself sets, as ``timeit`` advises).
Rows: ``x`` a CuPy array, a PyTorch tensor and a JAX array, with a new output per call
(``out`` False) or, in one row for CuPy and one for PyTorch, a preallocated ``out=`` (a
JAX array is immutable, never an output); ``s`` omitted, a
``torch.cuda.Stream`` (made torch's current stream for the torch rows, as torch code
runs), its raw handle, or a ``cupy.cuda.Stream`` (torch's current stream is then another
one, so the torch rows include the event that orders it first). ``delta_us`` is the
difference to the CuPy row with the same stream (and ``out``); ``import_us`` the cost of
``tensors.import_array`` alone; ``host_us`` the host time of a whole call alone, the
slowest rank's (200 calls enqueued while the op's stream runs a 30 ms spin kernel: no
launch waits for the GPU or the peer), so ``us_per_call`` above ``host_us`` is time the
GPU sets. ``host_speed`` (printed after the table, kept in the result) is each rank's
bare launch and allocation cost, the host's state: without it eager numbers of different
runs do not compare (``bench.common.host_speed``). Targets: CuPy <= 12 us, torch <=
CuPy + 3 us.

``python -m moecomm.bench dlpack --cpu`` needs no GPU and no MPI: a micro-profile of the
host-side pieces of that path (stream handles, checks, the DLPack capsule consumer on
host capsules, a whole ``as_array`` of a DLPack producer that reports a CUDA device).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, NamedTuple

import numpy as np

from .common import (batch_wall_us, environment, host_speed, in_turn, print_table, require_gpu,
                     write_result)

NBYTES = 8192


def add_arguments(p) -> None:
    p.add_argument("--calls", type=int, default=500, help="calls per timed batch")
    p.add_argument("--repeats", type=int, default=7, help="timed batches (median)")
    p.add_argument("--cpu", action="store_true",
                   help="the CPU-side micro-profile only (no GPU, no MPI)")


# ---------------------------------------------------------------------------- GPU
class _Case(NamedTuple):
    """One row: ``x`` of ``framework`` reduced on ``stream`` (named ``mode``), with torch's
    current stream set to ``current`` meanwhile, into ``out`` (None: a new array)."""

    framework: str
    mode: str
    x: Any
    stream: Any
    current: Any = None
    out: Any = None


def _warm(fn) -> None:
    """50 calls, then a device synchronisation: the next row may use another stream, and
    calls on one workspace must not overlap."""
    import cupy

    for _ in range(50):
        fn()
    cupy.cuda.runtime.deviceSynchronize()


ENQUEUE_CALLS = 200  # calls enqueued behind a spin kernel to time the host alone
ENQUEUE_SPIN_NS = 30_000_000


def _enqueue_us(fn, stream: int, group) -> float:
    """Host time per ``fn()`` alone: ``ENQUEUE_CALLS`` calls enqueued while ``stream``
    (the op's stream) runs a 30 ms spin kernel, so that no launch waits for the GPU."""
    import cupy

    from ..kernels import get_kernel

    spin = get_kernel("bench_moe.cu", "bench_spin")
    cupy.cuda.runtime.deviceSynchronize()
    group.barrier()
    spin((1,), (1,), (np.uint64(ENQUEUE_SPIN_NS),), stream=cupy.cuda.ExternalStream(stream))
    t0 = time.perf_counter()
    for _ in range(ENQUEUE_CALLS):
        fn()
    us = (time.perf_counter() - t0) / ENQUEUE_CALLS * 1e6
    cupy.cuda.runtime.deviceSynchronize()
    return us


def _host_us(fn, calls: int) -> float:
    for _ in range(100):
        fn()
    batches = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - t0) / calls * 1e6)
    return float(np.median(batches))


def _torch(device: int):
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(device)
            return torch
    except Exception:  # not installed, or no CUDA build
        pass
    return None


def _jax(device: int):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax

        mine = [d for d in jax.devices() if d.platform == "gpu" and d.id == device]
        import cupy

        cupy.cuda.Device(device).use()  # JAX's start leaves the last GPU it set up current
        return (jax, mine[0]) if mine else None
    except Exception:  # not installed, or no GPU backend
        return None


def run(args) -> int:
    if args.cpu:
        return cpu_profile(args)
    import cupy

    from ..allreduce import all_reduce, create_allreduce_workspace
    from ..tensors import FLOAT_DTYPES, bfloat16, import_array, stream_handle

    group = require_gpu()
    env = environment(group)
    dev = group.device_id
    ws = create_allreduce_workspace(group, NBYTES, bfloat16)
    values = np.random.default_rng(group.rank).standard_normal(NBYTES // 2).astype(bfloat16)
    torch = _torch(dev)
    jax = _jax(dev)
    # every rank runs the same rows (all_reduce is collective)
    have_torch = group.comm.allreduce(torch is not None, op=_min())
    have_jax = group.comm.allreduce(jax is not None, op=_min())

    cs = cupy.cuda.Stream(non_blocking=True)
    xc = cupy.asarray(values.view(np.uint16)).view(bfloat16)
    streams = {"omitted": None, "cupy Stream": cs}
    if have_torch:
        ts = torch.cuda.Stream()
        xt = torch.from_numpy(values.view(np.int16)).to(f"cuda:{dev}").view(torch.bfloat16)
        streams = {"omitted": None, "torch Stream": ts, "raw handle": ts.cuda_stream,
                   "cupy Stream": cs}

    # The rows' batches are taken in turn (in_turn), so the deltas compare like with like.
    cases = [_Case("cupy", mode, xc, stream) for mode, stream in streams.items()]
    cases.append(_Case("cupy", "omitted", xc, None, out=cupy.empty_like(xc)))
    if have_torch:
        cases += [_Case("torch", mode, xt, stream,
                        current=ts if mode in ("torch Stream", "raw handle") else None)
                  for mode, stream in streams.items()]
        cases.append(_Case("torch", "omitted", xt, None, out=torch.empty_like(xt)))
    if have_jax:
        jx = jax[0].device_put(values, jax[1]).block_until_ready()
        cases.append(_Case("jax", "omitted", jx, None))

    def scope(case):  # torch code runs on its current stream
        return (torch.cuda.stream(case.current) if case.current is not None
                else contextlib.nullcontext())

    calls = [(lambda c=c: all_reduce(c.x, ws, out=c.out, stream=c.stream)) for c in cases]
    batches = in_turn(calls, args.repeats,
                      lambda call: batch_wall_us(call, args.calls, group.barrier), warm=_warm,
                      scopes=[(lambda c=c: scope(c)) for c in cases])
    rows, base = [], {}
    for case, call, b in zip(cases, calls, batches):
        handle = stream_handle(case.stream)
        with scope(case):
            imp = _host_us(lambda: import_array(case.x, "x", dtype=FLOAT_DTYPES, device=dev,
                                                stream=handle), args.calls)
            host = max(group.allgather(_enqueue_us(call, handle, group)))
        us = float(np.median(b))
        key = (case.mode, case.out is not None)
        if case.framework == "cupy":
            base[key] = us
        rows.append({"framework": case.framework, "stream": case.mode,
                     "out": case.out is not None, "us_per_call": us, "best_us": min(b),
                     "delta_us": us - base[key], "import_us": imp, "host_us": host})
    ws.close()
    speed = host_speed(group)
    if group.rank == 0:
        print(f"# eager all_reduce of {NBYTES} B bf16, {group.size} ranks, {env['device']}: "
              f"wall us per call ({args.calls} calls, median of {args.repeats})")
        print_table(rows, ["framework", "stream", "out", "us_per_call", "best_us", "delta_us",
                           "import_us", "host_us"])
        print("# host speed per rank (bench.common.host_speed)")
        print_table(speed, ["rank", "launch_us", "alloc_us"])
        path = write_result(args.out, "dlpack", env, rows, nbytes=NBYTES, host_speed=speed)
        print(f"wrote {path}")
    group.close()
    return 0


def _min():
    from mpi4py import MPI

    return MPI.MIN


# ---------------------------------------------------------------------------- CPU
class _CudaLooking:
    """A DLPack producer over host memory that reports CUDA device 0: the whole import
    path (device check, export, parse, wrap, checks) runs without a GPU."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, max_version=None):
        from .. import tensors

        cap = self.a.__dlpack__(max_version=max_version)
        info = tensors._parse(cap, "x")
        kind = tensors._DLManagedTensorVersioned if info.versioned else tensors._DLManagedTensor
        kind.from_address(info.managed).dl_tensor.device.device_type = 2
        return cap


def cpu_profile(args) -> int:
    """Microseconds per call of the host-side pieces of an op's import path."""
    import datetime
    import platform

    from .. import tensors

    calls = max(1000, args.calls * 10)
    a = np.zeros((1, 4096), tensors.bfloat16)

    class TorchLikeStream:
        cuda_stream = 1234

    class ProtocolStream:
        def __cuda_stream__(self):
            return (0, 77)

    tls, pst, i64 = TorchLikeStream(), ProtocolStream(), np.int64(5)
    fake = _CudaLooking(np.zeros((1, 4096), np.uint16))
    import cupy  # a CuPy array over host memory: reading it needs no GPU

    host = np.zeros(4096, np.uint16)
    mem = cupy.cuda.UnownedMemory(host.ctypes.data, host.nbytes, host, 0)
    cx = cupy.ndarray((1, 4096), tensors.bfloat16, cupy.cuda.MemoryPointer(mem, 0))
    pieces = {
        "import_array(cupy)": lambda: tensors.import_array(
            cx, "x", dtype=tensors.FLOAT_DTYPES, device=0, stream=0),
        "import_array(cupy, shape checked)": lambda: tensors.import_array(
            cx, "out", dtype=cx.dtype, shape=cx.shape, device=0, stream=0),
        "stream_handle(int)": lambda: tensors.stream_handle(5),
        "stream_handle(np.int64)": lambda: tensors.stream_handle(i64),
        "stream_handle(.cuda_stream)": lambda: tensors.stream_handle(tls),
        "stream_handle(__cuda_stream__)": lambda: tensors.stream_handle(pst),
        "check_meta": lambda: tensors.check_meta(
            a.shape, a.dtype, "x", dtype=tensors.FLOAT_DTYPES, shape=(None, 4096)),
        "DeviceArray": lambda: tensors.DeviceArray(0, a.shape, a.dtype, a),
        "numpy __dlpack__ (legacy)": lambda: a.view(np.uint16).__dlpack__(),
        "numpy __dlpack__ (versioned)": lambda: a.view(np.uint16).__dlpack__(max_version=(1, 0)),
        "parse capsule": lambda: tensors._parse(a.view(np.uint16).__dlpack__(), "x"),
        "consume capsule (export+parse+wrap)": lambda: tensors._consume(
            a.view(np.uint16).__dlpack__(max_version=(1, 0)), "x", None, cuda=False),
        "as_array(DLPack producer on cuda:0)": lambda: tensors.as_array(
            fake, "x", dtype=np.uint16, shape=(None, 4096), device=0, stream=7),
        "import_array(DLPack producer on cuda:0)": lambda: tensors.import_array(
            fake, "x", dtype=np.uint16, shape=(None, 4096), device=0, stream=7),
        "ctypes call (PyCapsule_IsValid)": lambda: tensors._capsule_is_valid(a, b"x"),
    }
    rows = [{"piece": k, "us_per_call": _host_us(fn, calls)} for k, fn in pieces.items()]
    print(f"# CPU micro-profile of the import path ({platform.processor() or platform.machine()})")
    print_table(rows, ["piece", "us_per_call"])
    env = {"device": "cpu", "gpu_count": 0, "ranks": 1, "host": platform.node(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("MOECOMM_COMMIT", "unknown")}
    if args.out:
        print(f"wrote {write_result(args.out, 'dlpack-cpu', env, rows)}")
    return 0

