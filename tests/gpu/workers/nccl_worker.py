"""NcclCommunicator against NumPy on fresh random data where each rank has a GPU of its
own, or its refusal where ranks share one (the other cases skip there, and the other way
round)."""

import cupy
import numpy as np
import pytest

from moecomm.nccl import NcclCommunicator
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, main
from tests.mpi import case

DTYPES = ("fp32", "fp16", "bf16")


def communicator(ctx):
    """The job's communicator (one rank per GPU only); the cases run in sequence on it."""
    if not ctx.exclusive:
        pytest.skip("ranks share a GPU: NCCL needs one rank per GPU")
    return ctx.shared("nccl", lambda: NcclCommunicator(ctx.group))


def data(seed, r, shape, dtype, salt=0):
    """Rank ``r``'s input (any rank can make any rank's)."""
    x = np.random.default_rng([seed, r, salt]).standard_normal(shape).astype(np.float32)
    return x.astype(dtype)


def check(got, want, dtype, what):
    got = cupy.asnumpy(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    tol = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, bfloat16: 2e-2}.get(
        np.dtype(dtype), 0)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.allclose(got, want, rtol=tol, atol=tol * 4), f"{what} {np.dtype(dtype).name}"


@case
def refused_on_a_shared_gpu(ctx):
    if ctx.exclusive:
        pytest.skip("every rank has a GPU of its own")
    with pytest.raises(ValueError, match="share GPU") as info:
        NcclCommunicator(ctx.group)
    assert "one rank per GPU" in str(info.value), info.value


@case(dtypes=DTYPES)
def all_reduce_and_all_gather(ctx, dtype):
    comm, rank, n, seed = communicator(ctx), ctx.rank, ctx.world, ctx.new_seed()
    for shape in ((1,), (127,), (33, 65)):
        x = cupy.asarray(data(seed, rank, shape, dtype))
        want = sum(data(seed, r, shape, dtype).astype(np.float32) for r in range(n))
        out = cupy.full(shape, np.nan, dtype)
        assert comm.all_reduce(x, out=out) is out, "out= not returned"
        check(out, want, dtype, f"all_reduce {shape}")
        check(comm.all_reduce(x), want, dtype, "all_reduce (new out)")
        g = comm.all_gather(x)  # a copy: bit for bit
        gathered = np.stack([data(seed, r, shape, dtype) for r in range(n)])
        assert np.array_equal(bits(g), bits(gathered)), f"all_gather {shape}"


@case(dtypes=DTYPES)
def reduce_scatter(ctx, dtype):
    comm, rank, n, seed = communicator(ctx), ctx.rank, ctx.world, ctx.new_seed()
    blocks = cupy.asarray(data(seed, rank, (n, 9, 4), dtype))
    want = sum(data(seed, r, (n, 9, 4), dtype).astype(np.float32) for r in range(n))[rank]
    check(comm.reduce_scatter(blocks), want, dtype, "reduce_scatter")


@case
def all_to_all_bytes(ctx):
    """Exchanges of raw bytes work for any dtype (fp8 codes as uint8 here)."""
    comm, rank, n, seed = communicator(ctx), ctx.rank, ctx.world, ctx.new_seed()
    x = cupy.asarray(np.random.default_rng([seed, rank]).integers(0, 256, (n, 5, 3), np.uint8))
    got = comm.all_to_all(x).get()
    for s in range(n):
        src = np.random.default_rng([seed, s]).integers(0, 256, (n, 5, 3), np.uint8)
        assert np.array_equal(got[s], src[rank]), "all_to_all"


def ragged(seed, n):
    """Rank s sends (s + p) % 3 rows to rank p, zero rows included: (counts, rows)."""
    counts = [[(s + p) % 3 for p in range(n)] for s in range(n)]
    rows = [data(seed, s, (sum(counts[s]), 6), np.float32, salt=7) for s in range(n)]
    return counts, rows


@case
def all_to_all_v(ctx):
    comm, rank, n, seed = communicator(ctx), ctx.rank, ctx.world, ctx.new_seed()
    counts, rows = ragged(seed, n)
    out = cupy.full((sum(counts[s][rank] for s in range(n)), 6), np.nan, np.float32)
    comm.all_to_all_v(cupy.asarray(rows[rank]), counts[rank], [counts[s][rank] for s in range(n)],
                      out=out)
    want = np.concatenate([rows[s][sum(counts[s][:rank]):sum(counts[s][:rank + 1])]
                           for s in range(n)])
    assert np.array_equal(out.get(), want), "all_to_all_v"


@case
def all_to_all_v_empty_sender(ctx):
    """A rank with no rows of its own still receives."""
    comm, rank, n, seed = communicator(ctx), ctx.rank, ctx.world, ctx.new_seed()
    counts, rows = ragged(seed, n)
    empty = cupy.zeros((0, 6), np.float32)
    got = comm.all_to_all_v(cupy.asarray(rows[rank]) if rank else empty,
                            counts[rank] if rank else [0] * n,
                            [counts[s][rank] if s else 0 for s in range(n)])
    want = np.concatenate([rows[s][sum(counts[s][:rank]):sum(counts[s][:rank + 1])]
                           for s in range(1, n)] or [np.zeros((0, 6), np.float32)])
    assert np.array_equal(got.get(), want), "all_to_all_v with an empty sender"


@case
def all_gather_v(ctx):
    comm, rank, n, seed = communicator(ctx), ctx.rank, ctx.world, ctx.new_seed()
    sizes = [r + 1 for r in range(n)]
    gv = comm.all_gather_v(cupy.asarray(data(seed, rank, (sizes[rank], 3), np.float32)), sizes)
    assert np.array_equal(gv.get(), np.concatenate([data(seed, r, (sizes[r], 3), np.float32)
                                                    for r in range(n)])), "all_gather_v"


@case
def reduce_scatter_v(ctx):
    comm, rank, n, seed = communicator(ctx), ctx.rank, ctx.world, ctx.new_seed()
    sizes = [r + 1 for r in range(n)]
    full = [data(seed, r, (sum(sizes), 3), np.float32, salt=3) for r in range(n)]
    rv = comm.reduce_scatter_v(cupy.asarray(full[rank]), sizes)
    total = sum(full)
    check(rv, total[sum(sizes[:rank]):sum(sizes[:rank + 1])], np.float32, "reduce_scatter_v")


@case
def bad_input(ctx):
    comm, n = communicator(ctx), ctx.world
    with pytest.raises(ValueError, match="axis 0"):
        comm.reduce_scatter(cupy.zeros((n + 1, 2), np.float32))
    with pytest.raises(TypeError, match="cannot reduce"):
        comm.all_reduce(cupy.zeros(3, np.complex64))
    with pytest.raises(ValueError, match="send_counts"):
        comm.all_to_all_v(cupy.zeros((1, 2)), [5] * n, [0] * n)
    with pytest.raises(ValueError, match="op must be"):
        comm.all_reduce(cupy.zeros(3, np.float32), op="avg")
    cupy.cuda.runtime.deviceSynchronize()


if __name__ == "__main__":
    main()
