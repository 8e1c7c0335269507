"""NcclCommunicator against NumPy on fresh random data, or its refusal on a shared GPU."""

import sys

import cupy
import numpy as np

import moecomm
from moecomm.nccl import NcclCommunicator
from moecomm.tensors import bfloat16
from tests.mpi import report_pass

group = moecomm.init()
rank, n = group.rank, group.size
shared = cupy.cuda.runtime.getDeviceCount() < n

if shared:
    try:
        NcclCommunicator(group)
    except ValueError as exc:
        assert "share GPU" in str(exc) and "one rank per GPU" in str(exc), exc
    else:
        raise AssertionError("NCCL on a shared GPU was not refused")
    report_pass(rank)
    sys.exit(0)

seed = group.bcast(int(np.random.SeedSequence().entropy % (1 << 63)))


def data(r, shape, dtype, salt=0):
    x = np.random.default_rng([seed, r, salt]).standard_normal(shape).astype(np.float32)
    return x.astype(dtype)


def check(got, want, dtype, what):
    got = cupy.asnumpy(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    tol = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, bfloat16: 2e-2}.get(
        np.dtype(dtype), 0)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.allclose(got, want, rtol=tol, atol=tol * 4), f"{what} {np.dtype(dtype).name}"


with NcclCommunicator(group) as comm:
    for dtype in (np.float32, np.float16, bfloat16):
        for shape in ((1,), (127,), (33, 65)):
            x = cupy.asarray(data(rank, shape, dtype))
            want = sum(data(r, shape, dtype).astype(np.float32) for r in range(n))
            out = cupy.full(shape, np.nan, dtype)
            check(comm.all_reduce(x, out=out), want, dtype, f"all_reduce {shape}")
            check(comm.all_reduce(x), want, dtype, "all_reduce (new out)")
            g = comm.all_gather(x)
            check(g, np.stack([data(r, shape, dtype) for r in range(n)]), dtype, "all_gather")
        blocks = cupy.asarray(data(rank, (n, 9, 4), dtype))
        want = sum(data(r, (n, 9, 4), dtype).astype(np.float32) for r in range(n))[rank]
        check(comm.reduce_scatter(blocks), want, dtype, "reduce_scatter")
    # exchanges of raw bytes work for any dtype (fp8 codes as uint8 here)
    x = cupy.asarray(np.random.default_rng([seed, rank]).integers(0, 256, (n, 5, 3), np.uint8))
    got = comm.all_to_all(x).get()
    for s in range(n):
        src = np.random.default_rng([seed, s]).integers(0, 256, (n, 5, 3), np.uint8)
        assert np.array_equal(got[s], src[rank]), "all_to_all"
    # ragged: rank s sends (s + p) % 3 rows to rank p, including zero rows
    counts = [[(s + p) % 3 for p in range(n)] for s in range(n)]
    rows = [data(s, (sum(counts[s]), 6), np.float32, salt=7) for s in range(n)]
    out = cupy.full((sum(counts[s][rank] for s in range(n)), 6), np.nan, np.float32)
    comm.all_to_all_v(cupy.asarray(rows[rank]), counts[rank], [counts[s][rank] for s in range(n)],
                      out=out)
    want = np.concatenate([rows[s][sum(counts[s][:rank]):sum(counts[s][:rank + 1])]
                           for s in range(n)])
    assert np.array_equal(out.get(), want), "all_to_all_v"
    # a rank with no rows of its own still receives
    empty = cupy.zeros((0, 6), np.float32)
    got = comm.all_to_all_v(cupy.asarray(rows[rank]) if rank else empty,
                            counts[rank] if rank else [0] * n,
                            [counts[s][rank] if s else 0 for s in range(n)])
    want = np.concatenate([rows[s][sum(counts[s][:rank]):sum(counts[s][:rank + 1])]
                           for s in range(1, n)] or [np.zeros((0, 6), np.float32)])
    assert np.array_equal(got.get(), want), "all_to_all_v with an empty sender"
    sizes = [r + 1 for r in range(n)]
    gv = comm.all_gather_v(cupy.asarray(data(rank, (sizes[rank], 3), np.float32)), sizes)
    assert np.array_equal(gv.get(), np.concatenate([data(r, (sizes[r], 3), np.float32)
                                                    for r in range(n)])), "all_gather_v"
    full = [data(r, (sum(sizes), 3), np.float32, salt=3) for r in range(n)]
    rv = comm.reduce_scatter_v(cupy.asarray(full[rank]), sizes)
    total = sum(full)
    check(rv, total[sum(sizes[:rank]):sum(sizes[:rank + 1])], np.float32, "reduce_scatter_v")
    # bad input
    for fn, exc, text in (
        (lambda: comm.reduce_scatter(cupy.zeros((n + 1, 2), np.float32)), ValueError, "axis 0"),
        (lambda: comm.all_reduce(cupy.zeros(3, np.complex64)), TypeError, "cannot reduce"),
        (lambda: comm.all_to_all_v(cupy.zeros((1, 2)), [5] * n, [0] * n), ValueError, "send_counts"),
        (lambda: comm.all_reduce(cupy.zeros(3, np.float32), op="avg"), ValueError, "op must be"),
    ):
        try:
            fn()
        except exc as e:
            assert text in str(e), e
        else:
            raise AssertionError(text)
    cupy.cuda.runtime.deviceSynchronize()

report_pass(rank)
