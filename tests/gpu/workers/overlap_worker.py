"""Overlap on every rank: ops on a communication stream ordered by events, SM budgets,
routing handles, the device barrier; against the NumPy reference and against the same op
run plainly.

Ordering tests make a race likely if an edge is missing: the producer of an op's input
runs after a spin of several milliseconds on the compute stream, and the consumer of its
output is issued right after ``handle.wait``, so a missing wait reads poison.
"""

import re

import cupy
import numpy as np
import pytest

from moecomm import events
from moecomm import reference as ref
from moecomm.allreduce import AllReduceConfig, all_reduce, create_allreduce_workspace
from moecomm.barrier import DeviceBarrier, barrier, close_barriers
from moecomm.constants import AllReduceFusionPattern
from moecomm.errors import PeerTimeoutError
from moecomm.fusion import (AllReduceFusionOptions, AllReduceFusionOutputs, allreduce_fusion,
                            create_allreduce_fusion_workspace)
from moecomm.moe import EPAllToAll, MoeAlltoAll
from moecomm.moe.alltoall import MoeAlltoAllConfig
from moecomm.moe.alltoall import RoutingHandle
from moecomm.op import device_facts
from moecomm.symmetric import SymmetricBuffer
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, main
from tests.mpi import case

_SPIN = None


def spin(stream, ms: float) -> None:
    """A one-thread kernel that busy-waits ``ms`` milliseconds on ``stream``."""
    global _SPIN
    if _SPIN is None:
        _SPIN = cupy.RawKernel(r"""
extern "C" __global__ void spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}""", "spin")
    with stream:
        _SPIN((1,), (1,), (np.uint64(int(ms * 1e6)),))


def inputs(ctx, shape, dtype=np.float32):
    return [rng.standard_normal(shape).astype(dtype) for rng in ctx.rank_rngs()]


def exact(got, want, what):
    got, want = bits(got), bits(want)
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert got.shape == want.shape and bad.size == 0, f"{what}: {bad.size} differ at {bad[:5]}"


def streams():
    return cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)


def produce(compute, dst, host, ms=5.0):
    """On ``compute``: a spin, then ``dst`` := ``host``; returns an event recorded after."""
    spin(compute, ms)
    with compute:
        dst[...] = cupy.asarray(host)
    ev = cupy.cuda.Event(disable_timing=True)
    ev.record(compute)
    return ev


# ---------------------------------------------------------------- all-reduce
ALGOS = {"oneshot": "oneshot", "twoshot": "twoshot"}


def ar_workspace(ctx, num_sms=None):
    return ctx.shared(("ar", num_sms), lambda: create_allreduce_workspace(
        ctx.group, max_bytes=4 << 20, dtype=np.float32, max_oneshot_bytes=1 << 20,
        config=AllReduceConfig(num_sms=num_sms)))


@case(variants=ALGOS)
def allreduce_async(ctx, algo):
    """previous_event orders the op after its producer, handle.wait orders the consumer
    after the op; the result equals the reference and the plain call, bit for bit; the
    return value without async_op is unchanged."""
    ws = ar_workspace(ctx)
    compute, comm = streams()
    for i, n in enumerate((1000, 70001, 200003)):
        xs = inputs(ctx, (n,))
        want = ref.all_reduce(xs)
        with compute:
            x = cupy.full(n, np.nan, np.float32)
            out = cupy.full(n, np.nan, np.float32)
        ev = produce(compute, x, xs[ctx.rank])
        res, h = all_reduce(x, ws, out=out, algorithm=algo, stream=comm,
                            previous_event=ev if i % 2 else events.CommHandle(ev),
                            async_op=True)
        assert res is out and isinstance(h, events.CommHandle)
        h.wait(compute)
        with compute:
            seen = out.copy()  # issued before the op can have finished
        compute.synchronize()
        exact(seen.get(), want, f"{algo} async n={n}")
        plain = all_reduce(cupy.asarray(xs[ctx.rank]), ws, algorithm=algo)
        assert isinstance(plain, cupy.ndarray)
        exact(plain.get(), want, f"{algo} plain n={n}")
    ws.check(comm)


@case(variants={"8": 8, "16": 16, "1": 1})
def allreduce_num_sms(ctx, num_sms):
    """AllReduceConfig.num_sms: grids within the budget (one block per budgeted SM),
    results identical to the full grid for one-shot and two-shot."""
    ws = ar_workspace(ctx, num_sms)
    full = ar_workspace(ctx)
    assert ws.sms == min(num_sms, full.sms)
    for n in (4096, 1 << 18, (4 << 20) // 4):
        xs = inputs(ctx, (n,))
        want = ref.all_reduce(xs)
        for algo in ("oneshot", "twoshot") if n * 4 <= 1 << 20 else ("twoshot",):
            got = all_reduce(cupy.asarray(xs[ctx.rank]), ws, algorithm=algo)
            exact(got.get(), want, f"num_sms={num_sms} {algo} n={n}")
            geometry = [g for (nbytes, a), g in ws._geometry.items()
                        if nbytes == n * 4 and a.value == algo]
            budgeted = ws.sms < full.sms
            blocks_per_sm = 1 if budgeted else (ws.config.oneshot_blocks_per_sm
                                                if algo == "oneshot"
                                                else ws.config.twoshot_blocks_per_sm)
            assert geometry and geometry[0][0] <= ws.sms * blocks_per_sm, geometry
            if budgeted and algo == "oneshot":  # one block of 4 x 128 threads per SM
                assert geometry[0][1] == min(512, n * 4 // 16), geometry
    ws.check()


def fusion_call(ws, x, res, gamma, stream, use_oneshot=None, **kw):
    t, h = x.shape
    with stream:
        outs = AllReduceFusionOutputs(residual_out=cupy.full((t, h), np.nan, bfloat16),
                                      norm_out=cupy.full((t, h), np.nan, bfloat16))
    opts = AllReduceFusionOptions(residual=res, rms_gamma=gamma, rms_eps=1e-5,
                                  use_oneshot=use_oneshot)
    return allreduce_fusion(x, ws, AllReduceFusionPattern.kARResidualRMSNorm, opts, outs,
                            stream=stream, **kw), outs


@case
def fusion_async_num_sms(ctx):
    """allreduce_fusion with num_sms and on a communication stream: residual and norm
    outputs equal the reference and the full-grid plain call bit for bit."""
    H = 2048
    budget = ctx.shared("fus8", lambda: create_allreduce_fusion_workspace(
        ctx.group, 256, H, bfloat16, config=AllReduceConfig(num_sms=8)))
    full = ctx.shared("fus", lambda: create_allreduce_fusion_workspace(ctx.group, 256, H,
                                                                      bfloat16))
    compute, comm = streams()
    for tokens in (1, 37, 256):
        xs = [x.astype(bfloat16) for x in inputs(ctx, (tokens, H))]
        rng = np.random.default_rng(ctx.new_seed())
        residual = rng.standard_normal((tokens, H)).astype(np.float32).astype(bfloat16)
        gamma = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32).astype(bfloat16)
        want = ref.allreduce_fusion(xs, "kARResidualRMSNorm", residual=residual,
                                          rms_gamma=gamma, rms_eps=1e-5, dtype=bfloat16)
        res, gam, mine = cupy.asarray(residual), cupy.asarray(gamma), cupy.asarray(xs[ctx.rank])
        x = cupy.full((tokens, H), np.nan, bfloat16)
        cupy.cuda.runtime.deviceSynchronize()
        ev = produce(compute, x, xs[ctx.rank])
        (outs, h), _ = fusion_call(budget, x, res, gam, comm, previous_event=ev,
                                   async_op=True)
        h.wait(compute)
        with compute:
            got = {k: getattr(outs, k).copy() for k in ("residual_out", "norm_out")}
        plain, _ = fusion_call(full, mine, res, gam, compute)
        compute.synchronize()
        # The budget and async issue change nothing: the same bits as the plain call (at
        # hidden 2048 every token count takes the same row plan, hence the same fp32 sum
        # tree). Against the reference: residual_out exactly, norm_out within the fused
        # all-reduce's contract (its fp32 sum of squares vs the reference's float64).
        for k, v in got.items():
            exact(v, getattr(plain, k), f"fusion {k} tokens={tokens} (budget, async vs plain)")
        _, two = fusion_call(budget, mine, res, gam, compute, use_oneshot=False)
        compute.synchronize()
        for k in got:
            exact(getattr(two, k), getattr(plain, k), f"fusion {k} tokens={tokens} (budget, "
                  "two-shot vs plain)")
        exact(got["residual_out"], want["residual_out"], f"fusion residual_out tokens={tokens}")
        w32 = ref.to_float32(want["norm_out"])
        err = (np.abs(ref.to_float32(cupy.asnumpy(got["norm_out"])) - w32)
               / np.maximum(np.abs(w32), 1e-3))
        assert np.all(err <= 2 * 2.0 ** -7), f"fusion norm_out tokens={tokens}: off by {err.max()}"
    # one block per budgeted SM in every grid: more would spread over more SMs
    grids = {key: entry[1] for key, entry in budget._geometry.items()}
    assert len(grids) >= 4 and max(grids.values()) <= 8, grids
    budget.check(comm)


# ---------------------------------------------------------------- MoE all-to-all
EPR, TOP_K, H, MAX_T = 8, 4, 256, 64


def a2a(ctx, num_sms):
    n = ctx.group.local_size
    return ctx.shared(("a2a", num_sms), lambda: MoeAlltoAll(
        ctx.group, MAX_T, TOP_K, EPR * n, hidden_size=H,
        config=MoeAlltoAllConfig(num_sms=num_sms)))


def routing(ctx, T):
    """Every rank's ids (some invalid) and a bf16 hidden payload, from a fresh seed."""
    n = ctx.group.local_size
    ids, xs = [], []
    for rng in ctx.rank_rngs():
        i = rng.integers(0, EPR * n, (T, TOP_K)).astype(np.int32)
        i[rng.random((T, TOP_K)) < 0.1] = -1
        ids.append(i)
        xs.append(ref.to_bf16_bits(rng.standard_normal((T, H)).astype(np.float32)))
    return ids, xs


def new_payloads(ctx, T):
    return [ref.to_bf16_bits(rng.standard_normal((T, H)).astype(np.float32))
            for rng in ctx.rank_rngs()]


def check_dispatch(ctx, op, recv, ids, xs, rmax, what):
    n, r = op.ep_size, op.ep_rank
    recv_ref, counts_ref, rt = ref.moe_a2a_dispatch(ids, [[x] for x in xs], EPR * n, n, rmax)
    counts = ctx.host(op.recv_counts)
    assert np.array_equal(counts, counts_ref[r]), (what, counts, counts_ref[r])
    got = ctx.host(recv[0])
    for s in range(n):
        assert np.array_equal(got[s, :counts[s]], recv_ref[r][0][s, :counts[s]]), (what, s)
    return recv_ref, rt


@case(variants={"all": None, "4": 4})
def a2a_handle_async(ctx, num_sms):
    """A routing handle recorded by the first dispatch, replayed by three more (new
    payloads, same ids: the layers of one step), on a communication stream with events;
    every dispatch and round-trip combine equals the reference."""
    op, stream = a2a(ctx, num_sms), ctx.stream
    compute, comm = streams()
    n, r = op.ep_size, op.ep_rank
    if num_sms is None:  # every SM, no budget
        assert op.num_sms == device_facts().sms and not op.budgeted, (op.num_sms, op.budgeted)
    else:
        assert op.num_sms == num_sms and op.budgeted, (op.num_sms, op.budgeted)
    T = [int(v) for v in np.random.default_rng(ctx.new_seed()).integers(0, MAX_T + 1, n)]
    ids, _ = routing(ctx, MAX_T)
    ids = [i[:t] for i, t in zip(ids, T)]
    rmax = max(1, max(T))
    d_ids = cupy.asarray(ids[r])
    cupy.cuda.runtime.deviceSynchronize()  # uploads on the legacy stream, before comm
    handle = None
    for layer in range(4):
        xs = [x[:t] for x, t in zip(new_payloads(ctx, MAX_T), T)]
        ctx.poison(op)
        with compute:
            x = cupy.ndarray((T[r], H), bfloat16, cupy.full((T[r], H), 0x7FC1, np.uint16).data)
        ev = produce(compute, x.view(np.uint16), xs[r], ms=2.0)
        if handle is None:
            (recv, handle), h = op.dispatch(d_ids, [x], rmax, stream=comm, return_handle=True,
                                            previous_event=ev, async_op=True)
            assert isinstance(handle, RoutingHandle) and handle.num_tokens == T[r]
        else:
            recv, h = op.dispatch(d_ids, [x], rmax, stream=comm, handle=handle,
                                  previous_event=ev, async_op=True)
        h.wait(stream)
        if num_sms is not None:  # MoeAlltoAllConfig.num_sms bounds both grids
            assert op._dispatched.grid <= num_sms * op.config.dispatch_blocks_per_sm
            assert all(p.grid <= num_sms * op._combine_blocks_per_sm
                       for p in op._prepared_combine.values())
        recv_ref, rt = check_dispatch(ctx, op, recv, ids, xs, rmax, f"layer {layer}")
        want = ref.moe_a2a_combine([recv_ref[q][0] for q in range(n)], rt)[r]
        out, h = op.combine(recv[0], rmax, stream=comm, previous_event=h, async_op=True)
        h.wait(compute)
        with compute:
            seen = out.copy()
        compute.synchronize()
        exact(seen, want, f"combine layer {layer}")
    with pytest.raises(ValueError, match="recorded for"):
        op.dispatch(d_ids[:0] if T[r] else cupy.zeros((1, TOP_K), np.int32),
                    [cupy.zeros((0 if T[r] else 1, H), bfloat16)], rmax, handle=handle)
    op.check_error(comm, synchronize=True)


@case
def a2a_handle_graph(ctx):
    """Record outside, then [dispatch(handle) + combine] x2 captured with the comm stream
    forked from and joined to the capturing stream by events; replays with new payloads
    equal the reference."""
    op = a2a(ctx, 8)
    n, r = op.ep_size, op.ep_rank
    main_s, comm = streams()
    ids, xs0 = routing(ctx, 40)
    T, rmax = 40, 40
    d_ids = cupy.asarray(ids[r])
    x = cupy.ndarray((T, H), bfloat16, cupy.asarray(xs0[r]).data)
    cupy.cuda.runtime.deviceSynchronize()
    recv, handle = op.dispatch(d_ids, [x], rmax, stream=main_s, return_handle=True)
    op.combine(recv[0], rmax, stream=main_s)
    main_s.synchronize()
    out = [cupy.ndarray((T, H), bfloat16, cupy.zeros((T, H), np.uint16).data) for _ in range(2)]
    with main_s:
        main_s.begin_capture()
        fork = cupy.cuda.Event(disable_timing=True)
        fork.record(main_s)
        h = fork
        for layer in range(2):
            recv, h = op.dispatch(d_ids, [x], rmax, stream=comm, handle=handle,
                                  previous_event=h, async_op=True)
            _, h = op.combine(recv[0], rmax, stream=comm, out=out[layer], previous_event=h,
                              async_op=True)
        h.wait(main_s)
        graph = main_s.end_capture()
    for replay in range(3):
        xs = new_payloads(ctx, T)
        ctx.quiesce()
        x.view(np.uint16)[...] = cupy.asarray(xs[r])
        for o in out:
            o.view(np.uint16).fill(0x7FC1)
        cupy.cuda.runtime.deviceSynchronize()
        graph.launch(main_s)
        main_s.synchronize()
        recv_ref, _, rt = ref.moe_a2a_dispatch(ids, [[v] for v in xs], EPR * n, n, rmax)
        want = ref.moe_a2a_combine([recv_ref[q][0] for q in range(n)], rt)[r]
        for layer in range(2):
            exact(out[layer], want, f"graph replay {replay} layer {layer}")
    op.check_error(main_s, synchronize=True)


@case
def a2a_handle_errors(ctx):
    """Bad handles and options are refused before any launch."""
    op, other = a2a(ctx, None), a2a(ctx, 4)
    ids = cupy.zeros((4, TOP_K), np.int32)
    pay = [cupy.zeros((4, H), bfloat16)]
    with pytest.raises(TypeError, match="expected a RoutingHandle"):
        op.dispatch(ids, pay, 8, handle="h")
    with pytest.raises(ValueError, match="another MoeAlltoAll"):
        op.dispatch(ids, pay, 8, handle=other.routing_handle())
    with pytest.raises(ValueError, match="not both"):
        op.dispatch(ids, pay, 8, handle=op.routing_handle(), return_handle=True)
    with pytest.raises(TypeError, match="return_handle must be a bool"):
        op.dispatch(ids, pay, 8, return_handle=1)
    with pytest.raises(TypeError, match="async_op must be a bool"):
        op.dispatch(ids, pay, 8, async_op="yes")
    with pytest.raises(TypeError, match="previous_event"):
        op.dispatch(ids, pay, 8, previous_event="event")
    with pytest.raises(TypeError, match="previous_event"):
        all_reduce(cupy.ones(16, np.float32), ar_workspace(ctx), previous_event=object())
    assert op.phase.value == "idle", "a refused dispatch left the op dispatched"


@case(variants={"exact": False, "local": True})
def compact_handle_async(ctx, local):
    """EPAllToAll with an SM budget, a routing handle and async dispatch/combine: every
    output identical to the plain layer's on the same inputs."""
    n = ctx.group.local_size
    make = lambda sms: EPAllToAll(ctx.group, MAX_T, TOP_K, EPR * n, H,  # noqa: E731
                                  local_combine=local, config=MoeAlltoAllConfig(num_sms=sms))
    budget = ctx.shared(("ep4", local), lambda: make(4))
    plain = ctx.shared(("ep", local), lambda: make(None))
    compute, comm = streams()
    assert budget._max_grid == 4 and budget._a2a.num_sms == 4  # one block per budgeted SM
    r = ctx.group.local_rank
    ids, _ = routing(ctx, 33)
    d_ids = cupy.asarray(ids[r])
    handle = None
    for layer in range(3):
        xs = new_payloads(ctx, 33)
        x = cupy.ndarray((33, H), bfloat16, cupy.asarray(xs[r]).data)
        w = cupy.asarray(np.random.default_rng(ctx.new_seed() + r).random((33, TOP_K)),
                         np.float32)
        cupy.cuda.runtime.deviceSynchronize()  # uploads on the legacy stream, before comm
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(compute)
        if handle is None:
            (got, handle), h = budget.dispatch(x, d_ids, w, stream=comm, return_handle=True,
                                               previous_event=ev, async_op=True)
        else:
            got, h = budget.dispatch(x, d_ids, w, stream=comm, handle=handle,
                                     previous_event=ev, async_op=True)
        want = plain.dispatch(x, d_ids, w, stream=compute)
        h.wait(compute)
        rows = int(want.layout.num_rows_host(compute))
        assert int(got.layout.num_rows_host(compute)) == rows
        for a, b in ((got.recv_x[:rows], want.recv_x[:rows]),
                     (got.recv_weights[:rows], want.recv_weights[:rows]),
                     (got.layout.tokens_per_expert, want.layout.tokens_per_expert),
                     (got.layout.src[:rows], want.layout.src[:rows])):
            exact(a, b, f"compact dispatch layer {layer}")
        y = budget.get_combine_input_tensor_in_workspace()
        y2 = plain.get_combine_input_tensor_in_workspace()
        with compute:
            y[:rows] = got.recv_x[:rows]
            y2[:rows] = want.recv_x[:rows]
        ev.record(compute)
        out, h = budget.combine(y, got.layout, apply_weights=True, stream=comm,
                                previous_event=ev, async_op=True)
        ref_out = plain.combine(y2, want.layout, apply_weights=True, stream=compute)
        h.wait(compute)
        compute.synchronize()
        exact(out, ref_out, f"compact combine layer {layer}")
    budget.check_error(comm, synchronize=True)


# ---------------------------------------------------------------- barrier
@case
def barrier_orders_ranks(ctx):
    """Each rank writes its buffer after a rank-dependent spin, then barrier, then reads
    every peer's: the reads see this round's values (eager and in a CUDA graph)."""
    group, n, r = ctx.group, ctx.group.local_size, ctx.group.local_rank
    stream = ctx.stream
    with SymmetricBuffer(group, 4096) as buf, DeviceBarrier(group, timeout_s=5) as bar:
        mine = buf.view(np.int32, (1024,))
        seen = cupy.zeros((n, 1024), np.int32)
        cupy.cuda.runtime.deviceSynchronize()

        def step(value):
            spin(stream, 10.0 if r == 0 else 0.1)
            with stream:
                mine.fill(value)
            bar(stream)
            with stream:
                for p in range(n):
                    seen[p] = buf.view(np.int32, (1024,), rank=p)
            bar(stream)  # nobody rewrites before every peer has read

        for rnd in range(1, 4):
            step(rnd)
            got = ctx.host(seen)
            assert (got == rnd).all(), f"round {rnd}: {np.unique(got)}"
        value = cupy.zeros(1, np.int32)
        with stream:
            stream.begin_capture()
            spin(stream, 10.0 if r == 0 else 0.1)
            mine[...] = value
            bar(stream)
            for p in range(n):
                seen[p] = buf.view(np.int32, (1024,), rank=p)
            bar(stream)
            graph = stream.end_capture()
        for rnd in range(10, 13):
            value.fill(rnd)
            cupy.cuda.runtime.deviceSynchronize()
            graph.launch(stream)
            got = ctx.host(seen)
            assert (got == rnd).all(), f"graph round {rnd}: {np.unique(got)}"
        bar.check(stream)
        h = bar(stream, async_op=True)
        h.synchronize()
    # closed (its error word freed): every entry refuses, check() included
    for call in (bar, bar.check):
        with pytest.raises(RuntimeError, match="DeviceBarrier.* is closed"):
            call()
    # the function form keeps one barrier per group
    barrier(group, stream)
    barrier(group, stream)
    stream.synchronize()
    close_barriers()


@case(own_job=True, ranks=(2, 3))
def barrier_missing_peer_times_out(ctx):
    """Rank 1 skips one barrier: the others give up and name it."""
    with DeviceBarrier(ctx.group, timeout_s=0.5) as bar:
        bar()
        bar.check()
        if ctx.group.local_rank != 1:
            bar()
            with pytest.raises(PeerTimeoutError, match="barrier: rank 1 never arrived"):
                bar.check()
            with pytest.raises(PeerTimeoutError, match="rank 1"):
                bar()
        ctx.group.barrier()


@case
def graph_event_ordering(ctx):
    """Producer (compute stream) -> all_reduce (comm stream, previous_event) -> consumer
    (compute stream, handle.wait) captured as one graph; replays see fresh inputs and give
    the reference."""
    ws = ar_workspace(ctx)
    main_s, comm = streams()
    n = 50000
    algos = ("oneshot", "twoshot")
    src = cupy.zeros(n, np.float32)
    x = cupy.zeros(n, np.float32)
    out = {a: cupy.zeros(n, np.float32) for a in algos}  # each algorithm's own, checked
    seen = {a: cupy.zeros(n, np.float32) for a in algos}
    with main_s:  # every kernel loaded before the capture
        spin(main_s, 0.0)
        x[...] = src
        cupy.multiply(out["oneshot"], 2, out=seen["oneshot"])
    main_s.synchronize()
    with main_s:
        main_s.begin_capture()
        spin(main_s, 3.0)
        x[...] = src
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(main_s)
        for algo in algos:
            _, h = all_reduce(x, ws, out=out[algo], algorithm=algo, stream=comm,
                              previous_event=ev, async_op=True)
            h.wait(main_s)
            cupy.multiply(out[algo], 2, out=seen[algo])
            ev = cupy.cuda.Event(disable_timing=True)
            ev.record(main_s)
        graph = main_s.end_capture()
    for replay in range(3):
        xs = inputs(ctx, (n,))
        src.set(xs[ctx.rank])
        for algo in algos:
            out[algo].fill(np.nan)
            seen[algo].fill(np.nan)
        cupy.cuda.runtime.deviceSynchronize()
        graph.launch(main_s)
        main_s.synchronize()
        want = ref.all_reduce(xs)
        for algo in algos:
            exact(seen[algo].get(), (want * np.float32(2)).astype(np.float32),
                  f"graph replay {replay} {algo}")
    ws.check(main_s)


@case(own_job=True, ranks=(2,), env={"MOECOMM_DEBUG": "1"})
def debug_mode_catches_missing_wait(ctx):
    """MOECOMM_DEBUG=1: a CommHandle never waited for is reported by the next call of
    the op (and one dropped unwaited by the next call of any op); a routing handle
    replayed with other ids is refused."""
    import moecomm

    assert moecomm.group.DEBUG
    with create_allreduce_workspace(ctx.group, max_bytes=1 << 16, dtype=np.float32) as ws:
        x = cupy.ones(100, np.float32)
        _, h = all_reduce(x, ws, async_op=True)
        with pytest.raises(RuntimeError, match=re.escape("never waited for")):
            all_reduce(x, ws)
        out, h = all_reduce(x, ws, async_op=True)
        h.wait()
        assert cupy.all(all_reduce(x, ws) == ctx.world)
        all_reduce(x, ws, async_op=True)  # handle dropped at once
        with pytest.raises(RuntimeError, match="dropped without"):
            all_reduce(x, ws)
        out, h = all_reduce(x, ws, async_op=True)
        h.synchronize()
        assert cupy.all(out == ctx.world), "the workspace is usable after the reports"
    # A routing handle replayed with other ids is refused (the ids are compared).
    n = ctx.group.local_size
    with MoeAlltoAll(ctx.group, MAX_T, TOP_K, EPR * n, hidden_size=H) as op:
        ids = cupy.asarray(np.arange(8 * TOP_K, dtype=np.int32).reshape(8, TOP_K) % (EPR * n))
        pay = [cupy.zeros((8, H), bfloat16)]
        recv, handle = op.dispatch(ids, pay, 8, return_handle=True)
        op.combine(recv[0], 8)
        recv = op.dispatch(ids, pay, 8, handle=handle)  # the same ids: accepted
        op.combine(recv[0], 8)
        with pytest.raises(ValueError, match="differ from the ids"):
            op.dispatch(ids[::-1].copy(), pay, 8, handle=handle)
        cupy.cuda.runtime.deviceSynchronize()


if __name__ == "__main__":
    main()
