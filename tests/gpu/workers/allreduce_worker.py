"""all_reduce on every rank against the NumPy reference, bit for bit.

Modes: ``correct`` (sizes x dtypes x algorithms, in place, rotation, graph replay, bad
input, NCCL where each rank has its own GPU) and ``timeout`` (a rank skips a call).
"""

import hashlib
import sys

import cupy
import numpy as np

import moecomm
from moecomm import reference
from moecomm.allreduce import Algorithm, all_reduce, create_allreduce_workspace
from moecomm.errors import PeerTimeoutError
from moecomm.tensors import bfloat16
from tests.mpi import expect_raises, report_pass

group = moecomm.init()
rank, world = group.rank, group.size
exclusive = cupy.cuda.runtime.getDeviceCount() >= world
mode = sys.argv[1]


def fresh_inputs(shape, dtype):
    """Every rank's input (same on every rank), with outliers, zeros and -0.0."""
    seed = group.bcast(int(np.random.SeedSequence().entropy % (1 << 63)))
    xs = []
    for r in range(world):
        rng = np.random.default_rng([seed, r])
        x = rng.standard_normal(shape).astype(np.float32)
        x.reshape(-1)[:: 7] *= 64.0
        x.reshape(-1)[3:: 11] = -0.0
        xs.append(x.astype(dtype))
    return xs


def bits(a):
    a = cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def check_exact(out, xs, what):
    want = bits(reference.all_reduce(xs))
    got = bits(out)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} elements differ, first at {bad[:5]}"
    # and every rank holds the same bytes
    digests = group.allgather(hashlib.sha256(got.tobytes()).hexdigest())
    assert len(set(digests)) == 1, f"{what}: ranks disagree"


def poisoned(shape, dtype):
    return cupy.full(shape, np.nan, dtype)


if mode == "correct":
    for dtype in (bfloat16, np.float16, np.float32):
        item = np.dtype(dtype).itemsize
        ws = create_allreduce_workspace(group, max_bytes=(1 << 20) + 4096, dtype=dtype,
                                        max_oneshot_bytes=64 << 10)
        lamport_elems = (64 << 10) // item
        for shape in ((1,), (127,), (8, 16), (3, 1001), (lamport_elems + 40,), (1 << 20) // item):
            xs = fresh_inputs(shape, dtype)
            mine = cupy.asarray(xs[rank])
            size = int(np.prod(shape)) * item
            algos = [Algorithm.AUTO, Algorithm.TWOSHOT]
            if size <= 64 << 10:
                algos.append(Algorithm.ONESHOT)
            for algo in algos:
                out = poisoned(shape, dtype)
                assert all_reduce(mine, ws, out=out, algorithm=algo) is not None
                check_exact(out, xs, f"{np.dtype(dtype).name} {shape} {algo.value}")
            inplace = mine.copy()
            all_reduce(inplace, ws, out=inplace)
            check_exact(inplace, xs, f"in place {shape}")
            assert cupy.array_equal(mine, cupy.asarray(xs[rank])), "input was modified"
        # Rotation: many calls in a row, alternating algorithms, fresh data each time.
        for i in range(7):
            shape = (97 + 31 * i,)
            xs = fresh_inputs(shape, dtype)
            algo = (Algorithm.ONESHOT, Algorithm.TWOSHOT, Algorithm.ONESHOT)[i % 3]
            out = all_reduce(cupy.asarray(xs[rank]), ws, algorithm=algo)
            check_exact(out, xs, f"rotation {i} {algo.value}")
        # Graph: capture 10 calls (both algorithms), replay 3 times on new inputs.
        stream = cupy.cuda.Stream(non_blocking=True)
        shapes = [(33 + 100 * i,) if i % 2 else (5000 + i,) for i in range(10)]
        ins = [cupy.empty(s, dtype) for s in shapes]
        outs = [cupy.empty(s, dtype) for s in shapes]
        with stream:
            stream.begin_capture()
            for i in range(10):
                all_reduce(ins[i], ws, out=outs[i],
                           algorithm=Algorithm.ONESHOT if i % 2 else Algorithm.TWOSHOT,
                           stream=stream)
            graph = stream.end_capture()
        for replay in range(3):
            data = [fresh_inputs(s, dtype) for s in shapes]
            for i in range(10):
                ins[i].set(data[i][rank])
                outs[i].fill(np.nan)
            cupy.cuda.runtime.deviceSynchronize()
            graph.launch(stream)
            stream.synchronize()
            for i in range(10):
                check_exact(outs[i], data[i], f"graph replay {replay} call {i}")
        ws.check(stream)
        # Bad input: clear errors before any launch.
        x = cupy.ones(16, dtype)
        other = np.float32 if np.dtype(dtype) != np.float32 else np.float16
        expect_raises(TypeError, "does not match the workspace", lambda: all_reduce(x.astype(other), ws))
        expect_raises(ValueError, "exceeds the workspace's max_bytes",
                      lambda: all_reduce(cupy.ones((2 << 20) // item, dtype), ws))
        expect_raises(ValueError, "max_oneshot_bytes",
                      lambda: all_reduce(cupy.ones((128 << 10) // item, dtype), ws, algorithm="oneshot"))
        expect_raises(ValueError, "16-byte aligned", lambda: all_reduce(cupy.ones(64, dtype)[1:], ws))
        expect_raises(ValueError, "does not match", lambda: all_reduce(x, ws, out=cupy.ones(15, dtype)))
        expect_raises(ValueError, "'fastest' is not a valid Algorithm",
                      lambda: all_reduce(x, ws, algorithm="fastest"))
        if exclusive:
            xs = fresh_inputs((4099,), dtype)
            got = cupy.asnumpy(all_reduce(cupy.asarray(xs[rank]), ws, algorithm="nccl"))
            want = reference.to_float32(reference.all_reduce(xs))
            tol = 1e-5 if dtype == np.float32 else 2e-2
            assert np.allclose(reference.to_float32(got), want, rtol=tol, atol=tol), "nccl"
        ws.close()
        expect_raises(RuntimeError, "closed", lambda: all_reduce(x, ws))

    # A group spanning (declared) nodes goes through NCCL; one-shot is refused.
    split = moecomm.ProcessGroup(gpus_per_node=1)
    if world > 1:
        with create_allreduce_workspace(split, max_bytes=1 << 16, dtype=np.float32) as ws:
            assert not ws.ipc and ws.choose(1024) == Algorithm.NCCL
            expect_raises(ValueError, "needs CUDA IPC", lambda: ws.choose(1024, "oneshot"))
            if exclusive:
                xs = fresh_inputs((1000,), np.float32)
                got = all_reduce(cupy.asarray(xs[rank]), ws).get()
                assert np.allclose(got, reference.all_reduce(xs), rtol=1e-5, atol=1e-5)
    split.close()
    if rank == 0:
        print(f"nccl comparisons: {'run' if exclusive else 'not run (ranks share a GPU)'}")

elif mode == "timeout":
    # Rank 1 skips one call: rank 0's kernel must give up and name rank 1.
    for algo in ("oneshot", "twoshot"):
        ws = create_allreduce_workspace(group, max_bytes=1 << 16, dtype=np.float32, timeout_s=0.5)
        x = cupy.ones(1000, np.float32)
        all_reduce(x, ws, algorithm=algo)
        ws.check()
        if rank != 1:
            all_reduce(x, ws, algorithm=algo)
            try:
                ws.check()
            except PeerTimeoutError as exc:
                assert exc.rank == 1 and "rank 1 never arrived" in str(exc), exc
            else:
                raise AssertionError(f"{algo}: the missing rank went unnoticed")
            expect_raises(PeerTimeoutError, "rank 1", lambda: all_reduce(x, ws, algorithm=algo))
        group.barrier()
        ws.close()
elif mode == "debug":
    # MOECOMM_DEBUG=1: arguments that differ across ranks raise on every rank.
    assert moecomm.group.DEBUG
    with create_allreduce_workspace(group, max_bytes=1 << 16, dtype=np.float32) as ws:
        out = all_reduce(cupy.ones(100, np.float32), ws)
        assert cupy.all(out == world)
        expect_raises(ValueError, "differ across ranks", lambda: all_reduce(
            cupy.ones(100 + rank, np.float32), ws))
        expect_raises(ValueError, "rank 1: ((101,)", lambda: all_reduce(
            cupy.ones(100 + rank, np.float32), ws))
        out = all_reduce(cupy.ones(64, np.float32), ws, algorithm="twoshot")
        assert cupy.all(out == world), "the workspace is usable after a refused call"
else:
    raise SystemExit(f"unknown mode {mode}")

report_pass(rank)
