"""MoeAlltoAll end to end on every rank, against moecomm.reference (ranks may share a GPU).

Every rank builds every rank's inputs from a shared seed, so each can compute the
reference of the whole exchange and check its own part. Outputs are poisoned first; the
workspace is poisoned (``MoeAlltoAll.poison()``) only while no peer uses it (between
barriers). The dispatch/combine cases run in sequence on one workspace, token counts and
payload kinds changing from call to call, as a serving engine's would.
"""

import re

import cupy
import numpy as np
import pytest

import moecomm
from moecomm import reference as ref
from moecomm.errors import PeerTimeoutError
from moecomm.moe import MoeAlltoAll, MoeAlltoAllConfig
from moecomm.op import device_facts
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, main
from tests.mpi import case

EPR = 4  # experts per rank
TOP_K = 4  # ids / weights rows of 16 bytes: the vector path, sanitised per target
H = 256  # bf16 hidden (512 B rows), fp8 hidden (256 B rows)
SCALES = 2  # fp32 scales per token: 8-byte rows, the 4-byte word path
MAX_T = 48
INVALID = -5
ID_PAYLOAD = 3  # [hidden bf16, hidden fp8, scales fp32, ids int32, weights fp32]


# ---------------------------------------------------------------- inputs and reference
class Exchange:
    """Every rank's routing and payloads; ``ep`` ranks, ``num_experts = epr * ep``."""

    def __init__(self, seed, ep, mode="random", rmax_extra=0, T=None, epr=EPR):
        self.ep, self.E = ep, epr * ep
        rng = np.random.default_rng(seed)
        if T is None:
            T = [int(rng.integers(1, MAX_T - rmax_extra + 1)) for _ in range(ep)]
        self.T = list(T)
        if mode == "zero":
            self.T[0] = 0
        if mode == "full":
            self.T = [MAX_T] * ep
        self.rmax = max(1, max(self.T)) + rmax_extra
        self.ids, self.payloads = [], []
        for s in range(ep):
            t = self.T[s]
            ids = rng.integers(0, self.E, (t, TOP_K)).astype(np.int32)
            if mode == "one_rank":
                ids = (ep - 1) * epr + rng.integers(0, epr, (t, TOP_K)).astype(np.int32)
            bad = rng.random((t, TOP_K)) < 0.12
            ids[bad] = rng.choice(np.array([-1, -100, self.E, self.E + 3], np.int32), bad.sum())
            if mode == "all_invalid" and s == min(1, ep - 1):
                ids[:] = -1
            hidden = ref.to_bf16_bits(rng.standard_normal((t, H)).astype(np.float32))
            fp8 = rng.integers(0, 256, (t, H), dtype=np.uint8)
            scales = rng.random((t, SCALES)).astype(np.float32)
            weights = rng.random((t, TOP_K)).astype(np.float32)
            self.ids.append(ids)
            self.payloads.append([hidden, fp8, scales, ids.copy(), weights])

    def reference(self, sanitize):
        return ref.moe_a2a_dispatch(self.ids, self.payloads, self.E, self.ep, self.rmax,
                                    INVALID if sanitize else None,
                                    ID_PAYLOAD if sanitize else None)


COMBINE_DTYPES = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}
NAN_BITS = {np.uint16: 0x7FC1, np.float16: np.float16(np.nan), np.float32: np.float32(np.nan)}


def combine_payloads(exchange, recv_ref, counts_ref, dtype):
    """Rank r's expert output: (r + 1) * hidden + 0.25 * s in `dtype`; padding rows NaN."""
    out = []
    for r in range(exchange.ep):
        x32 = ref.to_float32(recv_ref[r][0]) * np.float32(r + 1)
        x32 += np.float32(0.25) * np.arange(exchange.ep, dtype=np.float32)[:, None, None]
        x = ref.cast_from_float32(x32, dtype)
        for s in range(exchange.ep):
            x[s, counts_ref[r][s]:] = NAN_BITS[dtype]
        out.append(x)
    return out


def workspace_bytes(ep):
    """The dispatch bytes (bf16 + fp8 hidden, scales, ids, weights) and an fp32 combine
    region (twice the bf16 one the default formula reserves)."""
    return MoeAlltoAll.get_moe_workspace_size_per_rank(
        ep, TOP_K, MAX_T, H, extra_payload_bytes_per_token=H + 4 * SCALES + 2 * H)


def workspace(ctx):
    """The job's MoeAlltoAll: the dispatch/combine cases run in sequence on it."""
    n = ctx.group.local_size
    return ctx.shared("a2a", lambda: MoeAlltoAll(ctx.group, MAX_T, TOP_K, EPR * n,
                                                 workspace_size_per_rank=workspace_bytes(n)))


# ---------------------------------------------------------------- one dispatch + combine
def run_pair(ctx, a2a, exchange, *, sanitize=True, combine="bf16", zero_copy=False,
             use_out=False, roundtrip=False, between=None, before=None):
    """Dispatch the exchange's inputs, check every received row, combine, check the sum.
    ``before(ctx)`` runs after the workspace is poisoned, right before the dispatch."""
    r, stream = a2a.ep_rank, ctx.stream
    ctx.poison(a2a)
    if before is not None:
        before(ctx)
    recv_ref, counts_ref, routing = exchange.reference(sanitize)
    ids = ctx.device(exchange.ids[r])
    payloads = [ctx.device(p) for p in exchange.payloads[r]]
    recv = a2a.dispatch(ids, payloads, exchange.rmax,
                        invalid_token_expert_id=INVALID if sanitize else None,
                        expert_id_payload_index=ID_PAYLOAD if sanitize else None, stream=stream)
    assert len(recv) == 5
    check_received(ctx, a2a, recv, recv_ref, counts_ref, sanitize, f"T={exchange.T}")
    if between is not None:
        between(ctx, a2a, recv, recv_ref, counts_ref)

    dtype = COMBINE_DTYPES[combine]
    if roundtrip:  # the received hidden states themselves, straight from the workspace
        comb = [recv_ref[q][0] for q in range(exchange.ep)]
        payload = recv[0]
    else:
        comb = combine_payloads(exchange, recv_ref, counts_ref, dtype)
        if zero_copy:
            payload = a2a.get_combine_payload_tensor_in_workspace(
                exchange.rmax, H, bfloat16 if dtype == np.uint16 else dtype)
            with stream:
                cupy.ndarray(payload.shape, dtype, payload.data)[...] = cupy.asarray(comb[r])
        else:
            payload = ctx.device(comb[r])
    want = ref.moe_a2a_combine(comb, routing)[r]
    out = None
    if use_out:
        with stream:
            raw = cupy.full((exchange.T[r], H), NAN_BITS[dtype], dtype)
        out = cupy.ndarray(raw.shape, bfloat16, raw.data) if dtype == np.uint16 else raw
    got = a2a.combine(payload, exchange.rmax, payload_in_workspace=zero_copy, stream=stream,
                      out=out)
    if out is not None:
        assert got is out or got.data.ptr == out.data.ptr
    got = ctx.host(got)
    assert got.shape == (exchange.T[r], H) and got.dtype == want.dtype
    assert np.array_equal(bits(got), bits(want)), (
        f"combine {combine} zero_copy={zero_copy} roundtrip={roundtrip} T={exchange.T}: "
        f"{np.argwhere(bits(got) != bits(want))[:5]}")
    a2a.check_error(stream, synchronize=True)


def check_received(ctx, a2a, recv, recv_ref, counts_ref, sanitize, what):
    """The receive counts and every received row (with sanitised ids: the padding rows
    too) against the reference."""
    r = a2a.ep_rank
    counts = ctx.host(a2a.recv_counts)
    assert np.array_equal(counts, counts_ref[r]), (what, counts, counts_ref[r])
    for p, (got, want) in enumerate(zip(recv, recv_ref[r])):
        got = ctx.host(got)
        assert got.shape == want.shape and got.dtype == want.dtype, (p, got.shape, got.dtype)
        if sanitize and p == ID_PAYLOAD:  # padding rows included
            assert np.array_equal(got, want), f"sanitised ids differ ({what})"
            continue
        for s in range(len(counts)):
            c = counts_ref[r][s]
            assert np.array_equal(got[s, :c], want[s, :c]), f"payload {p} block {s} ({what})"


def bad_combines(ctx, a2a, recv, recv_ref, counts_ref):
    """Wrong combine / dispatch calls between a dispatch and its combine: clear errors."""
    n, rmax = a2a.ep_size, recv[0].shape[1]
    with ctx.stream:
        ok = cupy.zeros((n, rmax, H), np.float32)
        with pytest.raises(RuntimeError, match="twice without combine"):
            a2a.dispatch(cupy.zeros((1, TOP_K), np.int32), [cupy.zeros((1, 4), np.float32)],
                         rmax)
        with pytest.raises(ValueError, match=re.escape("expected [ep_size")):
            a2a.combine(cupy.zeros((n, rmax + 1, H), np.float32), rmax)
        with pytest.raises(ValueError, match=re.escape("expected [ep_size")):
            a2a.combine(ok[:1], rmax)
        with pytest.raises(ValueError, match="differs from the dispatch"):
            a2a.combine(ok, rmax + 1)
        with pytest.raises(TypeError, match="dtype int32 is not supported"):
            a2a.combine(cupy.zeros((n, rmax, H), np.int32), rmax)
        with pytest.raises(ValueError, match="multiple of 16"):
            a2a.combine(cupy.zeros((n, rmax, 2), np.float32), rmax)
        with pytest.raises(ValueError,
                           match="not the array of get_combine_payload_tensor_in_workspace"):
            a2a.combine(ok, rmax, payload_in_workspace=True)
        # rows of a 16-byte multiple, wider than the whole workspace
        huge = (a2a.workspace_size_per_rank // (n * rmax * 4) + 8) // 4 * 4
        with pytest.raises(ValueError, match="the combine region needs"):
            a2a.combine(cupy.zeros((n, rmax, huge), np.float32), rmax)
        with pytest.raises(ValueError, match="does not match"):
            a2a.combine(ok, rmax, out=cupy.zeros((3, H + 4), np.float32))
        with pytest.raises(TypeError, match="dtype float16 is not supported"):
            a2a.combine(ok, rmax, out=cupy.zeros((3, H), np.float16))
        with pytest.raises(ValueError, match="differs from the dispatch"):
            a2a.get_combine_payload_tensor_in_workspace(rmax + 1, H, np.float32)
        with pytest.raises(TypeError, match="not supported"):
            a2a.get_combine_payload_tensor_in_workspace(rmax, H, np.int32)


def standalone_sanitize(ctx, a2a, recv, recv_ref, counts_ref):
    """sanitize_expert_ids as a call equals the reference on the (unsanitised) ids."""
    r = a2a.ep_rank
    ids = a2a.sanitize_expert_ids(recv[ID_PAYLOAD], INVALID, stream=ctx.stream)
    want = ref.sanitize_expert_ids(recv_ref[r][ID_PAYLOAD], r, EPR, INVALID, counts_ref[r])
    assert np.array_equal(ctx.host(ids), want), "sanitize_expert_ids"


# ---------------------------------------------------------------- the cases
@case
def constructor_errors(ctx):
    """Raised on every rank before any collective step."""
    n = ctx.group.local_size
    with pytest.raises(ValueError, match="not a multiple of the ep size"):
        MoeAlltoAll(ctx.group, MAX_T, TOP_K, EPR * n + 1, hidden_size=H)
    with pytest.raises(ValueError, match="pass workspace_size_per_rank or hidden_size"):
        MoeAlltoAll(ctx.group, MAX_T, TOP_K, EPR * n)
    split = moecomm.ProcessGroup(gpus_per_node=1)
    split.device_id = ctx.group.device_id
    try:
        with pytest.raises(ValueError, match="spans"):
            MoeAlltoAll(split, MAX_T, TOP_K, EPR * n, hidden_size=H)
    finally:
        split.close()


@case
def bad_dispatches(ctx):
    """Attributes, and argument errors before any launch (and before any dispatch)."""
    a2a, n, stream = workspace(ctx), ctx.group.local_size, ctx.stream
    assert (a2a.ep_rank, a2a.ep_size) == (ctx.group.local_rank, n)
    assert a2a.workspace_size_per_rank == workspace_bytes(n) and a2a.recv_counts.shape == (n,)
    ids = cupy.zeros((4, TOP_K), np.int32)
    pay = [cupy.zeros((4, 8), np.float32)]
    with stream:
        with pytest.raises(RuntimeError, match="needs a dispatch first"):
            a2a.combine(cupy.zeros((n, 4, H), np.float32), 4)
        with pytest.raises(RuntimeError, match="needs a dispatch first"):
            a2a.get_combine_payload_tensor_in_workspace(4, H, np.float32)
        big = cupy.zeros((MAX_T + 1, TOP_K), np.int32)
        with pytest.raises(ValueError, match="exceed max_num_tokens"):
            a2a.dispatch(big, [cupy.zeros((MAX_T + 1, 4), np.float32)], MAX_T)
        with pytest.raises(ValueError, match="exceed runtime_max_tokens_per_rank"):
            a2a.dispatch(ids, pay, 3)
        with pytest.raises(ValueError, match="exceeds max_num_tokens"):
            a2a.dispatch(ids, pay, MAX_T + 1)
        with pytest.raises(ValueError, match="top_k=4"):
            a2a.dispatch(cupy.zeros((4, TOP_K + 1), np.int32), pay, 8)
        with pytest.raises(TypeError, match="dtype int64 is not supported"):
            a2a.dispatch(ids.astype(np.int64), pay, 8)
        with pytest.raises(ValueError, match=re.escape("input_payloads[0]: shape (5, 8)")):
            a2a.dispatch(ids, [cupy.zeros((5, 8), np.float32)], 8)
        with pytest.raises(ValueError, match="multiple of 4"):
            a2a.dispatch(ids, [cupy.zeros((4, 3), np.uint8)], 8)
        with pytest.raises(ValueError, match="expected 1 to 8"):
            a2a.dispatch(ids, pay * 9, 8)
        with pytest.raises(ValueError, match="expected 1 to 8"):
            a2a.dispatch(ids, [], 8)
        with pytest.raises(ValueError, match="needs expert_id_payload_index"):
            a2a.dispatch(ids, pay, 8, invalid_token_expert_id=-1)
        with pytest.raises(ValueError, match="expert_id_payload_index=1"):
            a2a.dispatch(ids, pay, 8, -1, expert_id_payload_index=1)
        with pytest.raises(TypeError, match="expected int32"):
            a2a.dispatch(ids, pay, 8, -1, expert_id_payload_index=0)
        wide = (a2a.workspace_size_per_rank // (n * 8) + 16) // 4 * 4
        with pytest.raises(ValueError, match="workspace bytes needed"):
            a2a.dispatch(ids, [cupy.zeros((4, wide), np.uint8)], 8)
        with pytest.raises(ValueError, match="array is on cpu"):
            a2a.dispatch(np.zeros((4, TOP_K), np.int32), pay, 8)


# Random routings (duplicate ranks inside a token's top-k, invalid ids), token counts
# changing from call to call, every payload kind and combine flavour: (Exchange options,
# a function of the ep size where they depend on it; run_pair options) per scenario.
PAIRS = {
    "random-bf16": ({}, dict(combine="bf16", between=bad_combines)),
    "padded-unsanitised-fp32-zero_copy-out": (
        dict(rmax_extra=5), dict(sanitize=False, combine="fp32", zero_copy=True, use_out=True,
                                 between=standalone_sanitize)),
    "rank0_no_tokens-fp16-out": (dict(mode="zero"), dict(combine="fp16", use_out=True)),
    "all_to_one_rank-bf16-zero_copy": (dict(mode="one_rank"),
                                       dict(combine="bf16", zero_copy=True)),
    "full-bf16-out": (dict(mode="full"), dict(combine="bf16", use_out=True)),
    "one_rank_all_invalid-fp32": (dict(mode="all_invalid"), dict(combine="fp32")),
    "padded-roundtrip": (dict(rmax_extra=7), dict(roundtrip=True)),
    "one_or_two_tokens-fp16-zero_copy": (lambda n: dict(T=[1 + (s % 2) for s in range(n)]),
                                         dict(combine="fp16", zero_copy=True)),
    "no_tokens-bf16-out": (lambda n: dict(mode="zero", T=[0] * n),
                           dict(combine="bf16", use_out=True)),
}


@case(variants=PAIRS)
def pair(ctx, scenario):
    """One dispatch and its combine, checked row by row against the reference."""
    exchange_kw, pair_kw = scenario
    n = ctx.group.local_size
    if callable(exchange_kw):
        exchange_kw = exchange_kw(n)
    run_pair(ctx, workspace(ctx), Exchange(ctx.new_seed(), n, **exchange_kw), **pair_kw)


@case
def experts_per_rank(ctx):
    """Owner ranks for 1, 3 and 7 experts per rank (the layout pass maps ids to ranks by a
    multiply-high, exact only under its bound; 1 takes its own branch)."""
    n = ctx.group.local_size
    for epr in (1, 3, 7):
        with MoeAlltoAll(ctx.group, MAX_T, TOP_K, epr * n,
                         workspace_size_per_rank=workspace_bytes(n)) as a2a:
            run_pair(ctx, a2a, Exchange(ctx.new_seed(), n, epr=epr))


@case
def sm_budget(ctx):
    """num_sms=1: one dispatch block walks all 48 tokens and one combine block covers every
    row (through the ring: a budget below the device's SMs picks it). num_sms=3 with two
    dispatch blocks per SM: grids of at most 3 blocks (one per budgeted SM, the dispatch's
    of twice the threads), so that the block scheduler cannot spread them over more SMs;
    num_sms=6: grids of three thread block clusters of 2 blocks (sm_90+)."""
    n = ctx.group.local_size
    for sms, per_sm in ((1, 1), (3, 2), (6, 1)):
        config = MoeAlltoAllConfig(num_sms=sms, dispatch_blocks_per_sm=per_sm)
        with MoeAlltoAll(ctx.group, MAX_T, TOP_K, EPR * n,
                         workspace_size_per_rank=workspace_bytes(n), config=config) as a2a:
            assert a2a.num_sms == sms and a2a._combine_ring and a2a.budgeted
            seed = ctx.new_seed()
            run_pair(ctx, a2a, Exchange(seed, n, mode="full"), combine="bf16", use_out=True)
            run_pair(ctx, a2a, Exchange(seed + 1, n), combine="fp32", zero_copy=True)
            launches = list(a2a._prepared_dispatch.values()) + list(a2a._prepared_combine.values())
            assert launches and all(p.grid <= sms for p in launches), \
                [(p.grid, p.block) for p in launches]
            assert {p.block for p in a2a._prepared_dispatch.values()} == {512 * per_sm}
            # sm_90+: thread block clusters of 2 blocks where the grid is even
            hopper = device_facts().arch >= (9, 0)
            assert all(p.cluster == (2 if hopper and p.grid % 2 == 0 else 1)
                       for p in launches), \
                [(p.grid, p.cluster) for p in launches]


@case
def dispatch_sub_chunks(ctx):
    """One dispatch block of 512 and of 64 threads walks 300 tokens per rank in sub-chunks
    (128 or 64 tokens: 32 per assigning warp), the next free slot of each target carried
    from one to the next; then 8 blocks of 64 threads, too few warps to scan every token
    in one pass, so each counts its own chunk and sums the counts the blocks before it
    published (the last one writing the totals and the id padding). Each: a pair, a
    dispatch recorded into a routing handle and one replayed from it, and a graph
    replay."""
    n = ctx.group.local_size
    T = 300
    size = MoeAlltoAll.get_moe_workspace_size_per_rank(
        n, TOP_K, T, H, extra_payload_bytes_per_token=H + 4 * SCALES + 2 * H)
    seed = ctx.new_seed()
    for threads, sms, per_sm in ((512, 1, 1), (64, 1, 1), (64, 8, 1)):
        config = MoeAlltoAllConfig(num_sms=sms, dispatch_blocks_per_sm=per_sm,
                                   dispatch_threads=threads)
        with MoeAlltoAll(ctx.group, T, TOP_K, EPR * n, workspace_size_per_rank=size,
                         config=config) as a2a:
            seed += 10
            run_pair(ctx, a2a, Exchange(seed, n, T=[T - 7 * s for s in range(n)]),
                     combine="fp32", use_out=True)
            exchange = Exchange(seed + 1, n, T=[T - 3 * s for s in range(n)])
            recv_ref, counts_ref, _ = exchange.reference(True)
            r = a2a.ep_rank
            ids = ctx.device(exchange.ids[r])
            payloads = [ctx.device(x) for x in exchange.payloads[r]]
            handle = None
            for step in ("recorded", "replayed"):
                ctx.poison(a2a)
                if handle is None:
                    recv, handle = a2a.dispatch(ids, payloads, exchange.rmax, INVALID,
                                                ID_PAYLOAD, stream=ctx.stream, return_handle=True)
                else:
                    recv = a2a.dispatch(ids, payloads, exchange.rmax, INVALID, ID_PAYLOAD,
                                        stream=ctx.stream, handle=handle)
                check_received(ctx, a2a, recv, recv_ref, counts_ref, True,
                               f"{sms * per_sm} blocks of {threads} threads, {step}")
                a2a.combine(recv[0], exchange.rmax, stream=ctx.stream)
            a2a.check_error(ctx.stream, synchronize=True)
            replay(ctx, a2a, T=[T - 5 * s for s in range(n)])


@case
def combine_paths(ctx):
    """Both pulls of the combine against the reference, whatever the SM budget: the
    shared-memory ring with every SM, with 32-thread blocks on 2 SMs (many pieces per
    warp, the ring wrapping), and register loads under a budget of 1 SM; ragged and empty
    ranks, staged, in-place and round-trip payloads, every dtype, and a graph replay. With
    an odd ep the ring's last rank group copies zeros past ep."""
    n = ctx.group.local_size
    seed = ctx.new_seed()
    for ring, threads, sms in ((True, None, None), (True, 32, 2), (False, None, 1)):
        config = MoeAlltoAllConfig(combine_ring=ring, combine_threads=threads, num_sms=sms)
        with MoeAlltoAll(ctx.group, MAX_T, TOP_K, EPR * n, config=config,
                         workspace_size_per_rank=workspace_bytes(n)) as a2a:
            assert a2a._combine_ring == ring
            seed += 10
            run_pair(ctx, a2a, Exchange(seed, n, mode="full"), combine="bf16", use_out=True)
            run_pair(ctx, a2a, Exchange(seed + 1, n), combine="fp32", zero_copy=True)
            run_pair(ctx, a2a, Exchange(seed + 2, n, mode="zero"), combine="fp16")
            run_pair(ctx, a2a, Exchange(seed + 3, n, mode="one_rank"), roundtrip=True)
            replay(ctx, a2a)


# Compute on another stream that holds SMs: one block per SM with all of the SM's shared
# memory (nothing runs beside it), spinning for `ns`; the gate, on the stream of the
# exchange, lets later work start only once every holding block is resident.
_HOLD_SOURCE = r'''
extern "C" __global__ void hold_sms(unsigned int* started, unsigned long long ns) {
  if (threadIdx.x == 0) atomicAdd(started, 1u);
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
extern "C" __global__ void gate(const volatile unsigned int* started, unsigned int n) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); }
  while (*started < n && t - t0 < 5000000000ull);
}
'''


@case
def busy_sms(ctx):
    """Compute on another stream holds every SM but two for 1.5 s, three times the
    exchange's wait timeout: dispatch and combine, their grids sized for every SM, run on
    the two SMs left in turns (a combine waits for each peer's first signal, not for every
    block of it) and match the reference, staged and in place."""
    if not ctx.exclusive:
        pytest.skip("ranks share a GPU: one rank's held SMs would starve the other's")
    n = ctx.group.local_size
    facts = device_facts()
    module = cupy.RawModule(code=_HOLD_SOURCE)
    hold, gate = module.get_function("hold_sms"), module.get_function("gate")
    hold.max_dynamic_shared_size_bytes = facts.max_shared_per_block
    blocks = facts.sms - 2
    started = cupy.zeros(1, np.uint32)
    side = cupy.cuda.Stream(non_blocking=True)

    def busy(ctx):
        started.fill(0)
        cupy.cuda.runtime.deviceSynchronize()
        hold((blocks,), (32,), (started, np.uint64(1_500_000_000)), stream=side,
             shared_mem=facts.max_shared_per_block)
        gate((1,), (1,), (started, np.uint32(blocks)), stream=ctx.stream)

    with MoeAlltoAll(ctx.group, MAX_T, TOP_K, EPR * n, workspace_size_per_rank=workspace_bytes(n),
                     timeout_s=0.5) as a2a:
        assert not a2a._combine_ring  # every SM: the register path, one 512-thread block per SM
        seed = ctx.new_seed()
        for i, kw in enumerate((dict(use_out=True), dict(roundtrip=True))):
            run_pair(ctx, a2a, Exchange(seed + i, n, mode="full"), before=busy, **kw)
            assert int(started.get()[0]) == blocks
            side.synchronize()


@case
def graph_replay(ctx):
    """dispatch + round-trip combine captured once, replayed with new routings/payloads."""
    replay(ctx, workspace(ctx))


def replay(ctx, a2a, T=None):
    """Capture a dispatch + round-trip combine on ``a2a``, replay it three times with new
    routings and payloads of the same token counts (``T`` per rank, default random), check
    each against the reference."""
    n, stream = ctx.group.local_size, ctx.stream
    r, seed = a2a.ep_rank, ctx.new_seed()
    base = Exchange(seed, n, T=T)
    ids = ctx.device(base.ids[r])
    payloads = [ctx.device(p) for p in base.payloads[r]]
    out = ctx.device(np.zeros((base.T[r], H), np.uint16))
    ctx.poison(a2a)
    with stream:
        stream.begin_capture()
        recv = a2a.dispatch(ids, payloads, base.rmax, INVALID, ID_PAYLOAD, stream=stream)
        res = a2a.combine(recv[0], base.rmax, stream=stream, out=out)
        graph = stream.end_capture()
    assert res is out or res.data.ptr == out.data.ptr
    for i in range(3):
        exchange = Exchange(seed + 100 + i, n, T=base.T)  # same token counts, new everything else
        assert exchange.rmax == base.rmax
        ctx.poison(a2a)
        with stream:
            for d, h in zip([ids, *payloads], [exchange.ids[r], *exchange.payloads[r]]):
                cupy.ndarray(d.shape, h.dtype, d.data)[...] = cupy.asarray(h)
            cupy.ndarray(out.shape, np.uint16, out.data).fill(0x7FC1)
        graph.launch(stream)
        recv_ref, counts_ref, routing = exchange.reference(True)
        assert np.array_equal(ctx.host(a2a.recv_counts), counts_ref[r]), "graph recv_counts"
        for p, (got, want) in enumerate(zip(recv, recv_ref[r])):
            got = ctx.host(got)
            if p == ID_PAYLOAD:
                assert np.array_equal(got, want), f"graph replay {i}: ids"
                continue
            for s in range(n):
                c = counts_ref[r][s]
                assert np.array_equal(got[s, :c], want[s, :c]), f"graph replay {i}: payload {p}"
        want = ref.moe_a2a_combine([recv_ref[q][0] for q in range(n)], routing)[r]
        assert np.array_equal(ctx.host(out), want), f"graph replay {i}: combine"
    a2a.check_error(stream, synchronize=True)


@case
def closed(ctx):
    """After close(), calls are refused; closing twice is harmless."""
    a2a = workspace(ctx)
    ctx.drop("a2a")
    a2a.close()
    with pytest.raises(RuntimeError, match="closed"):
        a2a.combine(None, 1)
    a2a.close()


@case
def mapping_groups(ctx):
    """A Mapping's moe_ep groups (two of 2 ranks with 4 ranks) run side by side."""
    n = ctx.group.local_size
    ep = n // 2 if n % 4 == 0 else n
    mapping = moecomm.Mapping.from_group(ctx.group, moe_ep_size=ep)
    ws = MoeAlltoAll.get_moe_workspace_size_per_rank(ep, TOP_K, MAX_T, H, H + 4 * SCALES)
    with MoeAlltoAll(mapping, MAX_T, TOP_K, EPR * ep, workspace_size_per_rank=ws) as a2a:
        assert (a2a.ep_rank, a2a.ep_size) == (mapping.moe_ep_rank, ep)
        seed = ctx.new_seed() + mapping.moe_ep_group[0]  # one exchange per ep group
        run_pair(ctx, a2a, Exchange(seed, ep), combine="bf16")


@case(own_job=True)
def missing_peer_times_out(ctx):
    """The last rank never dispatches: the others raise PeerTimeoutError naming it."""
    n = ctx.group.local_size
    missing = n - 1  # local rank == group rank: the group is one host's COMM_WORLD
    with MoeAlltoAll(ctx.group, 8, TOP_K, EPR * n, hidden_size=64, timeout_s=1.0) as a2a:
        ctx.quiesce()
        if ctx.group.local_rank != missing:
            a2a.dispatch(cupy.zeros((2, TOP_K), np.int32), [cupy.zeros((2, 64), np.float32)], 2,
                         stream=ctx.stream)
            with pytest.raises(PeerTimeoutError, match=f"rank {missing} never arrived") as info:
                a2a.check_error(ctx.stream, synchronize=True)
            assert info.value.rank == missing, info.value.rank
            with pytest.raises(PeerTimeoutError, match=f"rank {missing} never arrived"):
                a2a.combine(cupy.zeros((n, 2, 64), np.float32), 2)


if __name__ == "__main__":
    main()
