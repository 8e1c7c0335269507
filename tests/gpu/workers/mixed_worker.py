"""run_mixed_comm on every rank against the NumPy reference, bit for bit, in every mode.

Layouts by world size: "tp" (TP = world), "dp" (DP = world), "mixed" (TP 2 x DP 2, 4
ranks). Per layout, on one handler: every op x shapes x modes (poisoned outputs), calls
interleaved with the handler's all-reduce workspace, graph replay, bad input. Then groups
cut into declared nodes (NCCL modes; FUSED refused) and other dtypes. In jobs of their own:
a rank that skips a call (the others time out naming it) and MOECOMM_GPUS_PER_NODE.
NCCL modes need one rank per GPU: with ranks sharing a GPU they are skipped per call.

Inputs and poisoned outputs are made on the stream the op runs on (``with ctx.stream``):
CuPy's current stream is otherwise the legacy default stream, which the job's non-blocking
stream does not wait for, so an upload or NaN fill could land after the op read or wrote.
"""

import cupy
import numpy as np
import pytest

import moecomm
from moecomm import reference
from moecomm.allreduce import all_reduce
from moecomm.errors import PeerTimeoutError
from moecomm.mixed import (MixedCommConfig, MixedCommHandler, MixedCommMode, MixedCommOp,
                           run_mixed_comm)
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, dtype_label, main, reduce_inputs
from tests.mpi import case

MAX_BYTES = 1 << 20
LAYOUTS = {"tp": lambda w: {"tp_size": w}, "dp": lambda w: {"dp_size": w},
           "mixed": lambda w: {"tp_size": 2, "dp_size": w // 2}}
FUSED, ONE, TP_DP, AUTO = (MixedCommMode.FUSED, MixedCommMode.NCCL_ONE,
                           MixedCommMode.NCCL_TP_DP, MixedCommMode.AUTO)


def layout_sizes(ctx, name):
    if name == "mixed" and ctx.world != 4:
        pytest.skip("TP x DP = 2 x 2 needs 4 ranks")
    return LAYOUTS[name](ctx.world)


def handler(ctx, name, dtype=bfloat16):
    """The layout's handler; where NCCL cannot run (ranks share a GPU), AUTO stays FUSED."""
    sizes = layout_sizes(ctx, name)
    config = MixedCommConfig() if ctx.exclusive else MixedCommConfig(fused_max_bytes=MAX_BYTES)
    h = ctx.shared(("mixed", name, np.dtype(dtype).name), lambda: MixedCommHandler(
        ctx.group, MAX_BYTES, dtype, config=config, **sizes))
    # one node: FUSED must be there (else every case would test the NCCL modes only)
    assert h.fused or ctx.group.spans_nodes, h.no_fused_reason
    return h


def modes(ctx, h):
    """The modes this job can run: FUSED where IPC works, NCCL with one rank per GPU."""
    out = [FUSED] if h.fused else []
    if ctx.exclusive:
        out += [ONE, TP_DP]
    return out + ([AUTO] if h.fused or ctx.exclusive else [])



def expected(h, op, xs):
    lay = h.layout
    coords = [lay.coords(r) for r in range(lay.world_size)]
    return reference.mixed_comm(op, xs, [c[0] for c in coords], [c[1] for c in coords])


def check(ctx, h, out, want, what):
    """This rank's ``out`` equals its reference output bit for bit (after all work)."""
    cupy.cuda.runtime.deviceSynchronize()
    got, want = bits(out), bits(want[h.rank])
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} of {got.size} elements differ, first at {bad[:5]}"


def shapes(h, op):
    D = h.layout.dp_size
    rows = [1, 3, 5, 64] if op not in (MixedCommOp.REDUCESCATTER,
                                       MixedCommOp.REDUCESCATTER_ALLREDUCE) else [1, 2, 7]
    k = D if op in (MixedCommOp.REDUCESCATTER, MixedCommOp.REDUCESCATTER_ALLREDUCE) else 1
    return [(r * k, hidden) for r, hidden in zip(rows, (8, 136, 24, 1024))]


@case(variants={n: n for n in LAYOUTS})
def exact(ctx, name):
    """Every op, shapes from one row to 64 x 1024, every mode; NaN-poisoned outputs; the
    input is left untouched."""
    h = handler(ctx, name)
    with ctx.stream:
        for op in MixedCommOp:
            for shape in shapes(h, op):
                xs = reduce_inputs(ctx, shape, bfloat16)
                want = expected(h, op, xs)
                mine = cupy.asarray(xs[ctx.rank])
                for mode in modes(ctx, h):
                    out = cupy.full(h.output_shape(op, shape), np.nan, bfloat16)
                    got = run_mixed_comm(op, h, mine, out, mode=mode, stream=ctx.stream)
                    assert got is out
                    check(ctx, h, out, want, f"{name} {op.name} {shape} {mode.name}")
                new = run_mixed_comm(op, h, mine, stream=ctx.stream)  # allocated output
                ctx.stream.synchronize()
                check(ctx, h, new, want, f"{name} {op.name} {shape} allocated")
                assert np.array_equal(bits(mine), bits(xs[ctx.rank])), "input modified"
    h.check(ctx.stream)


@case(variants={n: n for n in LAYOUTS})
def interleaved(ctx, name):
    """Many calls in a row, ops and modes alternating with plain all-reduces on the
    handler's workspace (one Lamport call sequence), fresh data each time."""
    h = handler(ctx, name)
    ms = modes(ctx, h)
    ops = list(MixedCommOp)
    for i in range(12):
        op = ops[i % len(ops)]
        shape = (h.layout.dp_size * (1 + i % 3), 8 * (1 + i))
        xs = reduce_inputs(ctx, shape, bfloat16)
        with ctx.stream:
            out = run_mixed_comm(op, h, cupy.asarray(xs[ctx.rank]), mode=ms[i % len(ms)],
                                 stream=ctx.stream)
        ctx.stream.synchronize()
        check(ctx, h, out, expected(h, op, xs), f"call {i} {op.name} {ms[i % len(ms)].name}")
        if h.fused and i % 2:
            ys = reduce_inputs(ctx, (40 + i,), bfloat16)
            with ctx.stream:
                r = all_reduce(cupy.asarray(ys[ctx.rank]), h.workspace, stream=ctx.stream)
            ctx.stream.synchronize()
            assert np.array_equal(bits(r), bits(reference.all_reduce(ys))), f"all_reduce {i}"


@case(variants={n: n for n in LAYOUTS})
def graph_replay(ctx, name):
    """Every op in every mode captured once (NCCL modes warmed up first), replayed three
    times on new inputs into poisoned outputs."""
    h = handler(ctx, name)
    stream = cupy.cuda.Stream(non_blocking=True)
    calls = []
    for op in MixedCommOp:
        shape = (2 * h.layout.dp_size, 64)
        for mode in modes(ctx, h):
            if mode == AUTO:
                continue
            x = cupy.empty(shape, bfloat16)
            out = cupy.empty(h.output_shape(op, shape), bfloat16)
            calls.append((op, mode, x, out))
    with stream:
        for op, mode, x, out in calls:  # the first NCCL call makes communicators
            x.fill(0)
            run_mixed_comm(op, h, x, out, mode=mode, stream=stream)
    stream.synchronize()
    with stream:
        stream.begin_capture()
        for op, mode, x, out in calls:
            run_mixed_comm(op, h, x, out, mode=mode, stream=stream)
        graph = stream.end_capture()
    for replay in range(3):
        data = [reduce_inputs(ctx, x.shape, bfloat16) for _, _, x, _ in calls]
        for (op, mode, x, out), xs in zip(calls, data):
            x.set(xs[ctx.rank])
            out.fill(np.nan)
        cupy.cuda.runtime.deviceSynchronize()
        ctx.barrier()
        graph.launch(stream)
        stream.synchronize()
        for (op, mode, x, out), xs in zip(calls, data):
            check(ctx, h, out, expected(h, op, xs), f"replay {replay} {op.name} {mode.name}")
    h.check(stream)


@case(dtypes=("fp16", "fp32"))
def dtypes(ctx, dtype):
    """The other dtypes on the richest layout of this world size."""
    name = "mixed" if ctx.world == 4 else "dp"
    h = handler(ctx, name, dtype)
    for op in MixedCommOp:
        shape = (3 * h.layout.dp_size, 40)
        xs = reduce_inputs(ctx, shape, dtype)
        want = expected(h, op, xs)
        for mode in modes(ctx, h):
            with ctx.stream:
                out = cupy.full(h.output_shape(op, shape), np.nan, dtype)
                run_mixed_comm(op, h, cupy.asarray(xs[ctx.rank]), out, mode=mode,
                               stream=ctx.stream)
            ctx.stream.synchronize()
            check(ctx, h, out, want, f"{dtype_label(dtype)} {op.name} {mode.name}")


@case
def bad_input(ctx):
    """Clear errors before any launch; the handler stays usable."""
    name = "mixed" if ctx.world == 4 else "dp"
    h = handler(ctx, name)
    D = h.layout.dp_size
    x = cupy.zeros((2 * D, 64), bfloat16)
    with pytest.raises(TypeError, match="does not match the handler's"):
        run_mixed_comm(MixedCommOp.ALLREDUCE, h, x.astype(np.float32))
    with pytest.raises(ValueError, match="do not split into dp_size"):
        run_mixed_comm(MixedCommOp.REDUCESCATTER, h, cupy.zeros((2 * D + 1, 64), bfloat16))
    with pytest.raises(ValueError, match="exceed the handler's max_bytes"):
        run_mixed_comm(MixedCommOp.ALLGATHER, h, cupy.zeros((MAX_BYTES // 128, 64), bfloat16))
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        run_mixed_comm(MixedCommOp.ALLREDUCE, h, cupy.zeros((2 * D, 3), bfloat16))
    with pytest.raises(ValueError, match="16-byte aligned"):
        run_mixed_comm(MixedCommOp.ALLREDUCE, h, cupy.zeros(2 * D * 64 + 1, bfloat16)[1:]
                       .reshape(2 * D, 64))
    with pytest.raises(ValueError, match="does not match"):
        run_mixed_comm(MixedCommOp.ALLGATHER, h, x, cupy.zeros((2, 64), bfloat16))
    with pytest.raises(ValueError, match="overlaps x_in"):
        run_mixed_comm(MixedCommOp.ALLREDUCE, h, x, x)
    with pytest.raises(ValueError, match="not a MixedCommOp"):
        run_mixed_comm(9, h, x)
    with pytest.raises(ValueError, match="not a MixedCommMode"):
        run_mixed_comm(MixedCommOp.ALLREDUCE, h, x, mode=3)
    with pytest.raises(ValueError, match="does not match its"):
        MixedCommHandler(ctx.group, 1 << 16, tp_size=ctx.world, dp_size=2)
    with pytest.raises(ValueError, match="does not divide"):
        MixedCommHandler(ctx.group, 1 << 16, tp_size=3)
    xs = reduce_inputs(ctx, (2 * D, 64), bfloat16)  # fresh data into a poisoned output
    with ctx.stream:
        out = cupy.full((2 * D, 64), np.nan, bfloat16)
        run_mixed_comm(MixedCommOp.ALLREDUCE, h, cupy.asarray(xs[ctx.rank]), out, mode=FUSED,
                       stream=ctx.stream)
    ctx.stream.synchronize()
    check(ctx, h, out, expected(h, MixedCommOp.ALLREDUCE, xs), "usable after refused calls")


@case
def declared_nodes(ctx):
    """Groups cut into declared nodes: TP and DP across nodes through NCCL, bit for bit
    like the fused mode; FUSED refused."""
    if ctx.world == 1:
        pytest.skip("one rank spans no nodes")
    split = ctx.shared("nodes", lambda: moecomm.ProcessGroup(gpus_per_node=ctx.world // 2))
    assert split.num_nodes == 2
    layouts = [{"inter_tp_size": 2}, {"inter_dp_size": 2}]
    if ctx.world == 4:
        layouts.append({"local_tp_size": 1, "inter_tp_size": 2})  # DP inside, TP across
    for i, sizes in enumerate(layouts):
        with MixedCommHandler(split, 1 << 18, bfloat16, **sizes) as h:
            assert not h.fused
            with pytest.raises(ValueError, match="spans 2 nodes"):
                run_mixed_comm(MixedCommOp.ALLREDUCE, h, cupy.zeros((2, 64), bfloat16),
                               mode=FUSED)
            if not ctx.exclusive:
                continue
            for op in MixedCommOp:
                shape = (3 * h.layout.dp_size, 72)
                xs = reduce_inputs(ctx, shape, bfloat16)
                want = expected(h, op, xs)
                for mode in (ONE, TP_DP, AUTO):
                    with ctx.stream:
                        out = cupy.full(h.output_shape(op, shape), np.nan, bfloat16)
                        run_mixed_comm(op, h, cupy.asarray(xs[ctx.rank]), out, mode=mode,
                                       stream=ctx.stream)
                    ctx.stream.synchronize()
                    check(ctx, h, out, want, f"{sizes} {op.name} {mode.name}")
    if not ctx.exclusive:
        pytest.skip("NCCL needs one rank per GPU: only the refusals were checked")


@case
def nccl_setup_refused_in_capture(ctx):
    """The first NCCL-mode call makes communicators: refused inside a capture."""
    if not ctx.exclusive:
        pytest.skip("NCCL needs one rank per GPU")
    with MixedCommHandler(ctx.group, 1 << 16, tp_size=ctx.world) as h:
        stream = cupy.cuda.Stream(non_blocking=True)
        x, out = cupy.zeros((1, 64), bfloat16), cupy.zeros((1, 64), bfloat16)
        with stream:
            stream.begin_capture()
            try:
                with pytest.raises(RuntimeError, match="before capturing"):
                    run_mixed_comm(MixedCommOp.ALLREDUCE, h, x, out, mode=ONE, stream=stream)
            finally:
                stream.end_capture()


@case(own_job=True, ranks=(2, 4))
def missing_peer_times_out(ctx):
    """Rank 1 skips one FUSED call: the ranks that read from it time out naming rank 1."""
    h = MixedCommHandler(ctx.group, 1 << 16, tp_size=ctx.world, timeout_s=0.5)
    x = cupy.ones((2, 64), bfloat16)
    run_mixed_comm(MixedCommOp.ALLREDUCE_ALLGATHER, h, x, mode=FUSED)
    h.check()
    if ctx.rank != 1:
        run_mixed_comm(MixedCommOp.ALLREDUCE_ALLGATHER, h, x, mode=FUSED)
        with pytest.raises(PeerTimeoutError, match="rank 1 never arrived") as info:
            h.check()
        assert info.value.rank == 1
    ctx.group.barrier()
    h.close()


@case(own_job=True, ranks=(2,), env={"MOECOMM_GPUS_PER_NODE": "1"})
def gpus_per_node_env(ctx):
    """MOECOMM_GPUS_PER_NODE=1: the default group spans nodes; TP across them via NCCL."""
    assert ctx.group.num_nodes == ctx.world
    with MixedCommHandler(ctx.group, 1 << 16, bfloat16) as h:
        assert not h.fused and h.layout.inter_tp_size == ctx.world
        if not ctx.exclusive:
            pytest.skip("NCCL needs one rank per GPU")
        xs = reduce_inputs(ctx, (4, 16), bfloat16)
        out = run_mixed_comm(MixedCommOp.ALLREDUCE, h, cupy.asarray(xs[ctx.rank]))
        cupy.cuda.runtime.deviceSynchronize()
        check(ctx, h, out, expected(h, MixedCommOp.ALLREDUCE, xs), "env nodes")


if __name__ == "__main__":
    main()
