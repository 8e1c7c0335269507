"""MoeAlltoAll end to end on every rank, against moecomm.reference (ranks may share a GPU).

Every rank builds every rank's inputs from a shared seed, so each can compute the
reference of the whole exchange and check its own part. Outputs are poisoned first; the
workspace is poisoned only while no peer uses it (between barriers).
"""


import cupy
import numpy as np

import moecomm
from moecomm import reference as ref
from moecomm.errors import PeerTimeoutError
from moecomm.moe import MoeAlltoAll
from moecomm.tensors import bfloat16
from tests.gpu.workers.moe_io import IO, bits
from tests.mpi import expect_raises, report_pass

group = moecomm.init()
N = group.local_size
EPR = 4  # experts per rank
TOP_K = 4  # ids / weights rows of 16 bytes: the vector path, sanitised per target
H = 256  # bf16 hidden (512 B rows), fp8 hidden (256 B rows)
SCALES = 2  # fp32 scales per token: 8-byte rows, the 4-byte word path
MAX_T = 48
INVALID = -5
ID_PAYLOAD = 3  # [hidden bf16, hidden fp8, scales fp32, ids int32, weights fp32]
stream = cupy.cuda.Stream(non_blocking=True)
io = IO(group, stream)
shared_seed, device, host, quiesce = io.shared_seed, io.device, io.host, io.quiesce
checked = []




# ---------------------------------------------------------------- inputs and reference
class Case:
    """Every rank's routing and payloads; ``ep`` ranks, ``num_experts = EPR * ep``."""

    def __init__(self, seed, ep, mode="random", rmax_extra=0, T=None):
        self.ep, self.E = ep, EPR * ep
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
                ids = (ep - 1) * EPR + rng.integers(0, EPR, (t, TOP_K)).astype(np.int32)
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










def poison(a2a: MoeAlltoAll):
    quiesce()
    io.poison_workspace(a2a)
    quiesce()


COMBINE_DTYPES = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}
NAN_BITS = {np.uint16: 0x7FC1, np.float16: np.float16(np.nan), np.float32: np.float32(np.nan)}


def combine_payloads(case, recv_ref, counts_ref, dtype):
    """Rank r's expert output: (r + 1) * hidden + 0.25 * s in `dtype`; padding rows NaN."""
    out = []
    for r in range(case.ep):
        x32 = ref.to_float32(recv_ref[r][0]) * np.float32(r + 1)
        x32 += np.float32(0.25) * np.arange(case.ep, dtype=np.float32)[:, None, None]
        x = ref.cast_from_float32(x32, dtype)
        for s in range(case.ep):
            x[s, counts_ref[r][s]:] = NAN_BITS[dtype]
        out.append(x)
    return out


# ---------------------------------------------------------------- one dispatch + combine
def run_pair(a2a, case, *, sanitize=True, combine="bf16", zero_copy=False, use_out=False,
             roundtrip=False, between=None):
    """Dispatch case's inputs, check every received row, combine, check the sum."""
    r = a2a.ep_rank
    poison(a2a)
    recv_ref, counts_ref, routing = case.reference(sanitize)
    ids = device(case.ids[r])
    payloads = [device(p) for p in case.payloads[r]]
    recv = a2a.dispatch(ids, payloads, case.rmax,
                        invalid_token_expert_id=INVALID if sanitize else None,
                        expert_id_payload_index=ID_PAYLOAD if sanitize else None, stream=stream)
    assert len(recv) == 5
    counts = host(a2a.recv_counts)
    assert np.array_equal(counts, counts_ref[r]), (counts, counts_ref[r])
    for p, (got, want) in enumerate(zip(recv, recv_ref[r])):
        got = host(got)
        assert got.shape == want.shape and got.dtype == want.dtype, (p, got.shape, got.dtype)
        if sanitize and p == ID_PAYLOAD:  # padding rows included
            assert np.array_equal(got, want), f"sanitised ids differ (T={case.T})"
            continue
        for s in range(case.ep):
            c = counts_ref[r][s]
            assert np.array_equal(got[s, :c], want[s, :c]), f"payload {p} block {s} (T={case.T})"
    if between is not None:
        between(a2a, recv, recv_ref, counts_ref)

    dtype = COMBINE_DTYPES[combine]
    if roundtrip:  # the received hidden states themselves, straight from the workspace
        comb = [recv_ref[q][0] for q in range(case.ep)]
        payload = recv[0]
    else:
        comb = combine_payloads(case, recv_ref, counts_ref, dtype)
        if zero_copy:
            payload = a2a.get_combine_payload_tensor_in_workspace(
                case.rmax, H, bfloat16 if dtype == np.uint16 else dtype)
            with stream:
                cupy.ndarray(payload.shape, dtype, payload.data)[...] = cupy.asarray(comb[r])
        else:
            payload = device(comb[r])
    want = ref.moe_a2a_combine(comb, routing)[r]
    out = None
    if use_out:
        with stream:
            raw = cupy.full((case.T[r], H), NAN_BITS[dtype], dtype)
        out = cupy.ndarray(raw.shape, bfloat16, raw.data) if dtype == np.uint16 else raw
    got = a2a.combine(payload, case.rmax, payload_in_workspace=zero_copy, stream=stream, out=out)
    if out is not None:
        assert got is out or got.data.ptr == out.data.ptr
    got = host(got)
    assert got.shape == (case.T[r], H) and got.dtype == want.dtype
    assert np.array_equal(bits(got), bits(want)), (
        f"combine {combine} zero_copy={zero_copy} roundtrip={roundtrip} T={case.T}: "
        f"{np.argwhere(bits(got) != bits(want))[:5]}")
    a2a.check_error(stream, synchronize=True)


def bad_combines(a2a, recv, recv_ref, counts_ref):
    """Wrong combine / dispatch calls between a dispatch and its combine: clear errors."""
    rmax = recv[0].shape[1]
    with stream:
        ok = cupy.zeros((N, rmax, H), np.float32)
        expect_raises(RuntimeError, "twice without combine",
                      lambda: a2a.dispatch(cupy.zeros((1, TOP_K), np.int32),
                                           [cupy.zeros((1, 4), np.float32)], rmax))
        expect_raises(ValueError, "expected [ep_size",
                      lambda: a2a.combine(cupy.zeros((N, rmax + 1, H), np.float32), rmax))
        expect_raises(ValueError, "expected [ep_size", lambda: a2a.combine(ok[:1], rmax))
        expect_raises(ValueError, "differs from the dispatch", lambda: a2a.combine(ok, rmax + 1))
        expect_raises(TypeError, "dtype int32 is not supported",
                      lambda: a2a.combine(cupy.zeros((N, rmax, H), np.int32), rmax))
        expect_raises(ValueError, "multiple of 16",
                      lambda: a2a.combine(cupy.zeros((N, rmax, 2), np.float32), rmax))
        expect_raises(ValueError, "not the array of get_combine_payload_tensor_in_workspace",
                      lambda: a2a.combine(ok, rmax, payload_in_workspace=True))
        huge = (a2a._ws.nbytes // (N * rmax * 4) + 8) // 4 * 4  # 16-byte multiple rows
        expect_raises(ValueError, "the combine region needs",
                      lambda: a2a.combine(cupy.zeros((N, rmax, huge), np.float32), rmax))
        expect_raises(ValueError, "does not match",
                      lambda: a2a.combine(ok, rmax, out=cupy.zeros((3, H + 4), np.float32)))
        expect_raises(TypeError, "dtype float16 is not supported",
                      lambda: a2a.combine(ok, rmax, out=cupy.zeros((3, H), np.float16)))
        expect_raises(ValueError, "differs from the dispatch",
                      lambda: a2a.get_combine_payload_tensor_in_workspace(rmax + 1, H, np.float32))
        expect_raises(TypeError, "not supported",
                      lambda: a2a.get_combine_payload_tensor_in_workspace(rmax, H, np.int32))
    checked.append("bad combine")


def standalone_sanitize(a2a, recv, recv_ref, counts_ref):
    """sanitize_expert_ids as a call equals the reference on the (unsanitised) ids."""
    r = a2a.ep_rank
    ids = a2a.sanitize_expert_ids(recv[ID_PAYLOAD], INVALID, stream=stream)
    want = ref.sanitize_expert_ids(recv_ref[r][ID_PAYLOAD], r, EPR, INVALID, counts_ref[r])
    assert np.array_equal(host(ids), want), "sanitize_expert_ids"
    checked.append("sanitize call")


def bad_dispatches(a2a):
    """Argument errors before any launch (and before any dispatch)."""
    ids = cupy.zeros((4, TOP_K), np.int32)
    pay = [cupy.zeros((4, 8), np.float32)]
    with stream:
        expect_raises(RuntimeError, "needs a dispatch first",
                      lambda: a2a.combine(cupy.zeros((N, 4, H), np.float32), 4))
        expect_raises(RuntimeError, "needs a dispatch first",
                      lambda: a2a.get_combine_payload_tensor_in_workspace(4, H, np.float32))
        big = cupy.zeros((MAX_T + 1, TOP_K), np.int32)
        expect_raises(ValueError, "exceed max_num_tokens",
                      lambda: a2a.dispatch(big, [cupy.zeros((MAX_T + 1, 4), np.float32)], MAX_T))
        expect_raises(ValueError, "exceed runtime_max_tokens_per_rank",
                      lambda: a2a.dispatch(ids, pay, 3))
        expect_raises(ValueError, "exceeds max_num_tokens",
                      lambda: a2a.dispatch(ids, pay, MAX_T + 1))
        expect_raises(ValueError, "top_k=4",
                      lambda: a2a.dispatch(cupy.zeros((4, TOP_K + 1), np.int32), pay, 8))
        expect_raises(TypeError, "dtype int64 is not supported",
                      lambda: a2a.dispatch(ids.astype(np.int64), pay, 8))
        expect_raises(ValueError, "input_payloads[0]: shape (5, 8)",
                      lambda: a2a.dispatch(ids, [cupy.zeros((5, 8), np.float32)], 8))
        expect_raises(ValueError, "multiple of 4",
                      lambda: a2a.dispatch(ids, [cupy.zeros((4, 3), np.uint8)], 8))
        expect_raises(ValueError, "expected 1 to 8", lambda: a2a.dispatch(ids, pay * 9, 8))
        expect_raises(ValueError, "expected 1 to 8", lambda: a2a.dispatch(ids, [], 8))
        expect_raises(ValueError, "needs expert_id_payload_index",
                      lambda: a2a.dispatch(ids, pay, 8, invalid_token_expert_id=-1))
        expect_raises(ValueError, "expert_id_payload_index=1",
                      lambda: a2a.dispatch(ids, pay, 8, -1, expert_id_payload_index=1))
        expect_raises(TypeError, "expected int32",
                      lambda: a2a.dispatch(ids, pay, 8, -1, expert_id_payload_index=0))
        wide = (a2a._ws.nbytes // (N * 8) + 16) // 4 * 4
        expect_raises(ValueError, "workspace bytes needed",
                      lambda: a2a.dispatch(ids, [cupy.zeros((4, wide), np.uint8)], 8))
        expect_raises(ValueError, "array is on cpu",
                      lambda: a2a.dispatch(np.zeros((4, TOP_K), np.int32), pay, 8))
    checked.append("bad dispatch")


# ---------------------------------------------------------------- the tests
def main():
    # Sizing: the dispatch bytes (bf16 + fp8 hidden, scales, ids, weights) and an fp32
    # combine region (twice the bf16 one the default formula reserves).
    ws = MoeAlltoAll.get_moe_workspace_size_per_rank(
        N, TOP_K, MAX_T, H, extra_payload_bytes_per_token=H + 4 * SCALES + 2 * H)

    # Errors raised on every rank before any collective step.
    expect_raises(ValueError, "not a multiple of the ep size",
                  lambda: MoeAlltoAll(group, MAX_T, TOP_K, EPR * N + 1, hidden_size=H))
    expect_raises(ValueError, "pass workspace_size_per_rank or hidden_size",
                  lambda: MoeAlltoAll(group, MAX_T, TOP_K, EPR * N))
    split = moecomm.ProcessGroup(gpus_per_node=1)
    split.device_id = group.device_id
    expect_raises(ValueError, "spans",
                  lambda: MoeAlltoAll(split, MAX_T, TOP_K, EPR * N, hidden_size=H))
    split.close()

    with MoeAlltoAll(group, MAX_T, TOP_K, EPR * N, workspace_size_per_rank=ws) as a2a:
        assert (a2a.ep_rank, a2a.ep_size) == (group.local_rank, N)
        assert a2a.workspace_size_per_rank == ws and a2a.recv_counts.shape == (N,)
        bad_dispatches(a2a)

        seed = shared_seed()
        # Random routings (duplicate ranks inside a token's top-k, invalid ids), token
        # counts changing from call to call, every payload kind and combine flavour.
        run_pair(a2a, Case(seed + 1, N), combine="bf16", between=bad_combines)
        run_pair(a2a, Case(seed + 2, N, rmax_extra=5), sanitize=False, combine="fp32",
                 zero_copy=True, use_out=True, between=standalone_sanitize)
        run_pair(a2a, Case(seed + 3, N, mode="zero"), combine="fp16", use_out=True)
        run_pair(a2a, Case(seed + 4, N, mode="one_rank"), combine="bf16", zero_copy=True)
        run_pair(a2a, Case(seed + 5, N, mode="full"), combine="bf16", use_out=True)
        run_pair(a2a, Case(seed + 6, N, mode="all_invalid"), combine="fp32")
        run_pair(a2a, Case(seed + 7, N, rmax_extra=7), roundtrip=True)
        run_pair(a2a, Case(seed + 8, N, T=[1 + (s % 2) for s in range(N)]), combine="fp16",
                 zero_copy=True)
        run_pair(a2a, Case(seed + 9, N, mode="zero", T=[0] * N), combine="bf16", use_out=True)
        checked.append("eager pairs")

        graph_replay(a2a, shared_seed())
        a2a.check_error(stream, synchronize=True)
    expect_raises(RuntimeError, "closed", lambda: a2a.combine(None, 1))
    a2a.close()  # closing twice is harmless

    mapping_group()
    timeout()
    return checked


def graph_replay(a2a, seed):
    """dispatch + round-trip combine captured once, replayed with new routings/payloads."""
    r = a2a.ep_rank
    base = Case(seed, N)
    ids = device(base.ids[r])
    payloads = [device(p) for p in base.payloads[r]]
    out = device(np.zeros((base.T[r], H), np.uint16))
    poison(a2a)
    with stream:
        stream.begin_capture()
        recv = a2a.dispatch(ids, payloads, base.rmax, INVALID, ID_PAYLOAD, stream=stream)
        res = a2a.combine(recv[0], base.rmax, stream=stream, out=out)
        graph = stream.end_capture()
    assert res is out or res.data.ptr == out.data.ptr
    for i in range(3):
        case = Case(seed + 100 + i, N, T=base.T)  # same token counts, new everything else
        assert case.rmax == base.rmax
        poison(a2a)
        with stream:
            for d, h in zip([ids, *payloads], [case.ids[r], *case.payloads[r]]):
                cupy.ndarray(d.shape, h.dtype, d.data)[...] = cupy.asarray(h)
            cupy.ndarray(out.shape, np.uint16, out.data).fill(0x7FC1)
        graph.launch(stream)
        recv_ref, counts_ref, routing = case.reference(True)
        assert np.array_equal(host(a2a.recv_counts), counts_ref[r]), "graph recv_counts"
        for p, (got, want) in enumerate(zip(recv, recv_ref[r])):
            got = host(got)
            if p == ID_PAYLOAD:
                assert np.array_equal(got, want), f"graph replay {i}: ids"
                continue
            for s in range(N):
                c = counts_ref[r][s]
                assert np.array_equal(got[s, :c], want[s, :c]), f"graph replay {i}: payload {p}"
        want = ref.moe_a2a_combine([recv_ref[q][0] for q in range(N)], routing)[r]
        assert np.array_equal(host(out), want), f"graph replay {i}: combine"
    checked.append("graph replay")


def mapping_group():
    """A Mapping's moe_ep groups (two of 2 ranks with 4 ranks) run side by side."""
    ep = N // 2 if N % 4 == 0 else N
    mapping = moecomm.Mapping.from_group(group, moe_ep_size=ep)
    ws = MoeAlltoAll.get_moe_workspace_size_per_rank(ep, TOP_K, MAX_T, H, H + 4 * SCALES)
    with MoeAlltoAll(mapping, MAX_T, TOP_K, EPR * ep, workspace_size_per_rank=ws) as a2a:
        assert (a2a.ep_rank, a2a.ep_size) == (mapping.moe_ep_rank, ep)
        seed = shared_seed() + mapping.moe_ep_group[0]  # one case per ep group
        run_pair(a2a, Case(seed, ep), combine="bf16")
    checked.append(f"mapping ep={ep}")


def timeout():
    """The last rank never dispatches: the others raise PeerTimeoutError naming it."""
    missing = N - 1  # local rank == group rank: the group is one host's COMM_WORLD
    with MoeAlltoAll(group, 8, TOP_K, EPR * N, hidden_size=64, timeout_s=1.0) as a2a:
        quiesce()
        if group.local_rank != missing:
            a2a.dispatch(cupy.zeros((2, TOP_K), np.int32), [cupy.zeros((2, 64), np.float32)], 2,
                         stream=stream)
            exc = expect_raises(PeerTimeoutError, f"rank {missing} never arrived",
                                lambda: a2a.check_error(stream, synchronize=True))
            assert exc.rank == missing, exc.rank
            expect_raises(PeerTimeoutError, f"rank {missing} never arrived",
                          lambda: a2a.combine(cupy.zeros((N, 2, 64), np.float32), 2))
    checked.append("timeout")


if __name__ == "__main__":
    done = main()
    assert done[-1] == "timeout", done
    print(f"rank {group.rank}: {', '.join(done)}", flush=True)
    report_pass(group.rank)
