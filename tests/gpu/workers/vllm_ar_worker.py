"""vLLM's custom all-reduce lifecycle (moecomm.vllm_ar) on every rank, bit for bit against
the NumPy all-reduce reference.

Per dtype, on one object: the staging-buffer path (vllm_all_reduce with reg_buffer),
inputs read in place from registered buffers (a SymmetricBuffer, and per-rank addresses as
vLLM passes them), CUDA-graph inputs recorded at capture and registered after (replayed
on new inputs, twice registered), calls of all paths interleaved, bad input. In a job of
its own: a rank that skips a call (the others time out naming it).

Inputs and poisoned outputs are made on the stream the op runs on (``with ctx.stream``):
CuPy's current stream is otherwise the legacy default stream, which the job's non-blocking
stream does not wait for, so an upload, copy or NaN fill could land after the op read or
wrote.
"""

import cupy
import numpy as np
import pytest

import moecomm
from moecomm import reference
from moecomm.errors import PeerTimeoutError
from moecomm.symmetric import SymmetricBuffer
from moecomm.vllm_ar import (CustomAllReduce, meta_size, vllm_all_reduce, vllm_dispose,
                             vllm_get_graph_buffer_ipc_meta, vllm_init_custom_ar,
                             vllm_meta_size, vllm_register_buffer, vllm_register_graph_buffers)
from tests.gpu.workers.common import bits, dtype_label, main, reduce_inputs
from tests.mpi import case

DTYPES = ("bf16", "fp16", "fp32")
STAGING = 1 << 20


class Setup:
    """A CustomAllReduce with a registered staging buffer and a second buffer registered by
    its per-rank addresses, as vLLM passes them (closed together)."""

    def __init__(self, group, dtype):
        self.fa = vllm_init_custom_ar(group, dtype)
        self.buf = SymmetricBuffer(group, STAGING)
        self.extra = SymmetricBuffer(group, 1 << 16)
        vllm_register_buffer(self.fa, self.buf)
        vllm_register_buffer(self.fa, list(self.extra.ptrs))

    def close(self):
        vllm_dispose(self.fa)
        self.buf.close()
        self.extra.close()


def setup(ctx, dtype) -> Setup:
    return ctx.shared(("vllm", dtype.name), lambda: Setup(ctx.group, dtype))



def check(out, xs, what):
    cupy.cuda.runtime.deviceSynchronize()
    got, want = bits(out), bits(reference.all_reduce(xs))
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} of {got.size} elements differ, first at {bad[:5]}"


SHAPES = ((1,), (127,), (8, 16), (3, 1001), (50000,))


@case(dtypes=DTYPES)
def staging(ctx, dtype):
    """Out of place through the registered staging buffer (vLLM's eager path), given as
    the buffer and as this rank's address; in place (out = inp) is fine here."""
    s = setup(ctx, dtype)
    with ctx.stream:
        for shape in SHAPES:
            xs = reduce_inputs(ctx, shape, dtype)
            mine = cupy.asarray(xs[ctx.rank])
            for reg in (s.buf, s.buf.ptr):
                out = cupy.full(shape, np.nan, dtype)
                assert vllm_all_reduce(s.fa, mine, out, reg, stream=ctx.stream) is out
                check(out, xs, f"{dtype_label(dtype)} {shape} staging")
            inplace = mine.copy()
            vllm_all_reduce(s.fa, inplace, inplace, s.buf, stream=ctx.stream)
            check(inplace, xs, f"{shape} staging in place")
            assert np.array_equal(bits(mine), bits(xs[ctx.rank])), "input modified"
    s.fa.check(ctx.stream)


@case(dtypes=DTYPES)
def registered_inputs(ctx, dtype):
    """Inputs that live in a registered buffer are read in place at their offset; a buffer
    registered by per-rank addresses (vLLM's fake_ipc_ptrs) works the same."""
    s = setup(ctx, dtype)
    for buf, offset, shape in ((s.buf, 0, (1000,)), (s.buf, 4096, (3, 77)),
                               (s.extra, 256, (64, 8)), (s.extra, 0, (5,))):
        xs = reduce_inputs(ctx, shape, dtype)
        inp = buf.view(dtype, shape, offset=offset)
        with ctx.stream:
            inp.set(xs[ctx.rank])
            out = cupy.full(shape, np.nan, dtype)
        ctx.stream.synchronize()
        ctx.barrier()
        vllm_all_reduce(s.fa, inp, out, stream=ctx.stream)
        check(out, xs, f"{dtype_label(dtype)} registered at {offset} {shape}")
        ctx.barrier()  # no rank rewrites its input while a peer may still read it


@case(dtypes=DTYPES)
def graph_buffers(ctx, dtype):
    """Calls captured on plain arrays (one input used twice, one empty), their IPC metadata
    exchanged after capture (by the caller, as vLLM does), replayed three times on new
    inputs; a second capture registered with the exchange done inside."""
    s = setup(ctx, dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    for round_ in range(2):
        shapes = [(33 + 100 * i,) if i % 2 else (4096 + 8 * i,) for i in range(5)]
        ins = [cupy.zeros(sh, dtype) for sh in shapes]
        outs = [cupy.zeros(sh, dtype) for sh in shapes]
        twice = cupy.zeros(shapes[0], dtype)
        cupy.cuda.runtime.deviceSynchronize()
        with stream:
            stream.begin_capture()
            for i in range(5):
                vllm_all_reduce(s.fa, ins[i], outs[i], stream=stream)
            vllm_all_reduce(s.fa, ins[0], twice, stream=stream)
            empty = cupy.empty(0, dtype)  # nothing to register: no table row
            vllm_all_reduce(s.fa, empty, empty, stream=stream)
            graph = stream.end_capture()
        handles, offsets = vllm_get_graph_buffer_ipc_meta(s.fa)
        assert len(offsets) == 5 and len(handles) == 5 * 64, "one entry per distinct input"
        if round_ == 0:
            gathered = ctx.group.allgather((handles, offsets))
            vllm_register_graph_buffers(s.fa, [g[0] for g in gathered], [g[1] for g in gathered])
        else:
            vllm_register_graph_buffers(s.fa)
        assert vllm_get_graph_buffer_ipc_meta(s.fa) == (b"", []), "nothing left pending"
        for replay in range(3):
            data = [reduce_inputs(ctx, sh, dtype) for sh in shapes]
            for i in range(5):
                ins[i].set(data[i][ctx.rank])
                outs[i].fill(np.nan)
            twice.fill(np.nan)
            cupy.cuda.runtime.deviceSynchronize()
            ctx.barrier()
            graph.launch(stream)
            stream.synchronize()
            for i in range(5):
                check(outs[i], data[i], f"round {round_} replay {replay} call {i}")
            check(twice, data[0], f"round {round_} replay {replay} input used twice")
            ctx.barrier()
    s.fa.check(stream)


@case(dtypes=("bf16",))
def interleaved(ctx, dtype):
    """Staging, registered and eager calls alternate on one call sequence."""
    s = setup(ctx, dtype)
    for i in range(9):
        shape = (100 + 37 * i,)
        xs = reduce_inputs(ctx, shape, dtype)
        with ctx.stream:
            out = cupy.full(shape, np.nan, dtype)
        if i % 2:
            with ctx.stream:
                vllm_all_reduce(s.fa, cupy.asarray(xs[ctx.rank]), out, s.buf, stream=ctx.stream)
        else:
            inp = s.buf.view(dtype, shape, offset=8192)
            with ctx.stream:
                inp.set(xs[ctx.rank])
            ctx.stream.synchronize()
            ctx.barrier()
            vllm_all_reduce(s.fa, inp, out, stream=ctx.stream)
        check(out, xs, f"call {i}")
        ctx.barrier()


@case
def bad_input(ctx):
    """Clear errors before any launch."""
    dtype = np.dtype(np.float32)
    s = setup(ctx, dtype)
    x = cupy.ones(64, dtype)
    with pytest.raises(ValueError, match="is not in a registered buffer"):
        vllm_all_reduce(s.fa, x, cupy.empty_like(x))
    with pytest.raises(ValueError, match="is not a registered buffer"):
        vllm_all_reduce(s.fa, x, cupy.empty_like(x), reg_buffer=x.data.ptr)
    with pytest.raises(TypeError, match="does not match the object's"):
        vllm_all_reduce(s.fa, x.astype(np.float16), None, s.buf)
    with pytest.raises(ValueError, match="exceed the registered buffer"):
        vllm_all_reduce(s.fa, cupy.ones(STAGING // 4 + 4, dtype), None, s.buf)
    with pytest.raises(ValueError, match="does not match"):
        vllm_all_reduce(s.fa, x, cupy.ones(63, dtype), s.buf)
    with pytest.raises(ValueError, match="16-byte aligned"):
        vllm_all_reduce(s.fa, cupy.ones(65, dtype)[1:], None, s.buf)
    inp = s.buf.view(dtype, (64,), offset=0)
    with pytest.raises(ValueError, match="overlaps inp"):
        vllm_all_reduce(s.fa, inp, s.buf.view(dtype, (64,), offset=128))
    with pytest.raises(ValueError, match="already registered"):
        vllm_register_buffer(s.fa, s.buf)
    with pytest.raises(ValueError, match="rank 0 recorded 1 graph inputs"):
        s.fa.register_graph_buffers([b"\0" * 64] * ctx.world, [[0]] * ctx.world)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(ValueError, match="pass the output when capturing"):
                vllm_all_reduce(s.fa, x, None, stream=stream)
        finally:
            stream.end_capture()
    assert vllm_meta_size() == meta_size() > 0
    out = vllm_all_reduce(s.fa, cupy.full(64, ctx.rank + 1, dtype), None, s.buf)
    cupy.cuda.runtime.deviceSynchronize()
    assert cupy.all(out == ctx.world * (ctx.world + 1) // 2), "usable after refused calls"


@case
def spanning_group_refused(ctx):
    if ctx.world == 1:
        pytest.skip("one rank spans no nodes")
    split = ctx.shared("nodes", lambda: moecomm.ProcessGroup(gpus_per_node=1))
    with pytest.raises(ValueError, match="needs CUDA IPC"):
        CustomAllReduce(split, np.float32)


@case(own_job=True, ranks=(2, 4))
def missing_peer_times_out(ctx):
    """Rank 1 skips one call: the others give up and name rank 1."""
    fa = CustomAllReduce(ctx.group, np.float32, timeout_s=0.5)
    buf = SymmetricBuffer(ctx.group, 1 << 16)
    fa.register_buffer(buf)
    x = cupy.ones(1000, np.float32)
    fa.all_reduce(x, None, buf)
    fa.check()
    if ctx.rank != 1:
        fa.all_reduce(x, None, buf)
        with pytest.raises(PeerTimeoutError, match="rank 1 never arrived") as info:
            fa.check()
        assert info.value.rank == 1
    ctx.group.barrier()
    fa.close()
    buf.close()


if __name__ == "__main__":
    main()
