"""MoeAlltoAll with FP8 dispatch (``quantize=Fp8Dispatch(...)``) on every rank.

Every rank builds every rank's inputs from a shared seed. The received codes and scales
must equal, bit for bit, the reference quantizer applied to the rows the reference
dispatch delivers: ``reference.quant_fp8_per_token_group(x, 128)`` for ``"ue8m0"``,
:func:`quant_fp8_groups_fp32` below for ``"fp32"``. The other payloads, the counts and the
combine (of the dequantized rows, or of host-made bf16 rows in graph replay) are checked
against the reference too. Outputs and the workspace are poisoned first.
"""

import cupy
import numpy as np

import moecomm
from moecomm import reference as ref
from moecomm.moe import MoeAlltoAll
from moecomm.moe.alltoall import Fp8Dispatch, Fp8Rows
from moecomm.tensors import bfloat16
from tests.gpu.workers.moe_io import IO, bits
from tests.mpi import expect_raises, report_pass

group = moecomm.init()
N = group.local_size
EPR = 4  # experts per rank
TOP_K = 4
MAX_T = 48
H_MAX = 7168
INVALID = -5
G = 128
stream = cupy.cuda.Stream(non_blocking=True)
io = IO(group, stream)
shared_seed, device, host, quiesce = io.shared_seed, io.device, io.host, io.quiesce
checked = []




# ---------------------------------------------------------------- reference quantizers
def quant_fp8_groups_fp32(x):
    """The "fp32" format: per 128 elements ``s = max(fp32(amax / 448), 1e-10)``,
    ``q = e4m3_sat(fp32(x * fp32(1 / s)))``. x: bf16 bits [M, H] -> (uint8 [M, H],
    float32 [M, H / 128])."""
    x32 = ref.to_float32(x)
    m, n = x32.shape
    blocks = x32.reshape(m, n // G, G)
    amax = np.abs(blocks).max(axis=-1)
    s = np.maximum(amax / np.float32(448.0), ref.GROUP_FP8_MIN_SCALE).astype(np.float32)
    inv = (np.float32(1.0) / s).astype(np.float32)
    return ref.fp8_e4m3_encode(blocks * inv[..., None]).reshape(m, n), s


def quantize_ref(x, fmt):
    """(codes, scales as stored, dequantized fp32) of bf16 bits x [M, H]."""
    if fmt == "ue8m0":
        q, packed = ref.quant_fp8_per_token_group(x, G)
        return q, packed, ref.dequant_fp8_per_token_group(q, packed, G)
    q, s = quant_fp8_groups_fp32(x)
    deq = (ref.fp8_e4m3_decode(q).reshape(len(q), -1, G) * s[..., None]).reshape(q.shape)
    return q, s, deq


def check_quant_error(x, deq):
    """The reference itself is sane: per element, error <= half an e4m3 step: 2^-4
    relative (normals) or 2^-10 * scale (subnormals), scale <= 2 * max(amax / 448, 1e-10)."""
    x32 = ref.to_float32(x).reshape(len(x), -1, G)
    amax = np.abs(x32).max(axis=-1, keepdims=True)
    scale = 2.0 * np.maximum(amax / 448.0, 1e-10)
    err = np.abs(deq.reshape(x32.shape).astype(np.float64) - x32)
    assert np.all(err <= np.maximum(np.abs(x32) * 2.0 ** -4, scale * 2.0 ** -10) * 1.001), \
        "reference quantizer error"


# ---------------------------------------------------------------- inputs
def hidden_rows(rng, t, h):
    """bf16 bits [t, h]: groups of very different magnitudes, zero groups (+0 and -0),
    groups whose amax / 448 is an exact power of two, tiny (subnormal) and huge groups."""
    x = rng.standard_normal((t, h // G, G)).astype(np.float32)
    kind = rng.integers(0, 12, (t, h // G))
    x *= np.exp2(rng.integers(-30, 31, (t, h // G, 1))).astype(np.float32)
    x[kind == 0] = 0.0
    x[kind == 1] = -0.0
    x[kind == 2] *= np.float32(2.0 ** -100)  # amax / 448 below the 1e-10 clamp
    x[kind == 3] = rng.standard_normal((int((kind == 3).sum()), G)).astype(np.float32) * 2.0 ** 110
    exact = kind == 4
    x[exact, 0] = np.float32(448.0) * np.exp2(rng.integers(-20, 20, int(exact.sum())))
    x[exact, 1:] = np.clip(x[exact, 1:], -1.0, 1.0) * x[exact, :1] * np.float32(0.9)
    return ref.to_bf16_bits(x.reshape(t, h))


class Case:
    """Every rank's routing and payloads. layout "A": [hidden, ids, weights] (quantize 0,
    ids 1); "B": [ids, scales fp32 [T, 2], hidden] (ids 0, quantize 2)."""

    def __init__(self, seed, h, layout="A", mode="random", rmax_extra=0, T=None):
        self.h, self.E = h, EPR * N
        self.qi, self.id_index = (0, 1) if layout == "A" else (2, 0)
        rng = np.random.default_rng(seed)
        self.T = list(T) if T is not None else [int(rng.integers(1, MAX_T - rmax_extra + 1))
                                                 for _ in range(N)]
        if mode == "zero":
            self.T[0] = 0
        if mode == "full":
            self.T = [MAX_T] * N
        self.rmax = max(1, max(self.T)) + rmax_extra
        self.ids, self.payloads = [], []
        for s in range(N):
            t = self.T[s]
            ids = rng.integers(0, self.E, (t, TOP_K)).astype(np.int32)
            if mode == "one_rank":
                ids = (N - 1) * EPR + rng.integers(0, EPR, (t, TOP_K)).astype(np.int32)
            bad = rng.random((t, TOP_K)) < 0.12
            ids[bad] = rng.choice(np.array([-1, -100, self.E, self.E + 3], np.int32), bad.sum())
            if mode == "all_invalid" and s == min(1, N - 1):
                ids[:] = -1
            hidden = hidden_rows(rng, t, h)
            other = rng.random((t, TOP_K if layout == "A" else 2)).astype(np.float32)
            self.ids.append(ids)
            self.payloads.append([hidden, ids.copy(), other] if layout == "A"
                                 else [ids.copy(), other, hidden])

    def reference(self):
        return ref.moe_a2a_dispatch(self.ids, self.payloads, self.E, N, self.rmax, INVALID,
                                    self.id_index)










def poison(a2a: MoeAlltoAll):
    quiesce()
    io.poison_workspace(a2a)
    quiesce()


# ---------------------------------------------------------------- checks
def fp8_reference(case, fmt, recv_ref):
    """(codes, scales) this rank must receive for the quantized payload, and every rank's
    dequantized receive ([ep, rmax, H] fp32 each, for the combine reference). Computed
    before the dispatch, so that no rank lingers between its dispatch and combine."""
    r, deq_all = group.local_rank, []
    for q in range(N):
        flat = recv_ref[q][case.qi].reshape(N * case.rmax, case.h)
        codes, scales, deq = quantize_ref(flat, fmt)
        if q == r:
            check_quant_error(flat, deq)
            mine = codes.reshape(N, case.rmax, case.h), scales.reshape(N, case.rmax, -1)
        deq_all.append(deq.reshape(N, case.rmax, case.h))
    return mine, deq_all


def check_received(a2a, case, recv, recv_ref, counts_ref, fp8_ref, what):
    """Counts, every payload, and the fp8 rows against the reference."""
    r = a2a.ep_rank
    counts = host(a2a.recv_counts)
    assert np.array_equal(counts, counts_ref[r]), (what, counts, counts_ref[r])
    want_codes, want_scales = fp8_ref
    assert len(recv) == len(case.payloads[r])
    for p, got in enumerate(recv):
        if p == case.qi:
            assert isinstance(got, Fp8Rows), (what, type(got))
            codes, scales = host(got.codes), host(got.scales)
            assert codes.dtype == np.uint8 and codes.shape == (N, case.rmax, case.h), what
            assert scales.dtype == want_scales.dtype and scales.shape == want_scales.shape, \
                (what, scales.dtype, scales.shape, want_scales.shape)
            for s in range(N):
                c = counts_ref[r][s]
                bad = np.argwhere(codes[s, :c] != want_codes[s, :c])
                assert bad.size == 0, f"{what}: codes block {s} (T={case.T}) at {bad[:5]}"
                assert np.array_equal(bits(scales[s, :c]), bits(want_scales[s, :c])), \
                    f"{what}: scales block {s} (T={case.T})"
            continue
        got, want = host(got), recv_ref[r][p]
        assert got.shape == want.shape and got.dtype == want.dtype, (what, p, got.shape)
        if p == case.id_index:  # sanitised, padding rows included
            assert np.array_equal(got, want), f"{what}: ids (T={case.T})"
            continue
        for s in range(N):
            c = counts_ref[r][s]
            assert np.array_equal(got[s, :c], want[s, :c]), f"{what}: payload {p} block {s}"


def dequantize(rows: Fp8Rows, fmt) -> cupy.ndarray:
    """fp32 [ep, rmax, H] = decode(codes) * scale, on the device (eager)."""
    with stream:
        lut = cupy.asarray(ref.fp8_e4m3_decode(np.arange(256, dtype=np.uint8)))
        ep, rmax, h = rows.codes.shape
        if fmt == "ue8m0":
            e = rows.scales.view(np.uint8).reshape(ep, rmax, -1)[..., :h // G]
            scale = (e.astype(np.uint32) << 23).view(np.float32)
        else:
            scale = rows.scales
        return (lut[rows.codes.astype(np.int32)].reshape(ep, rmax, h // G, G) * scale[..., None]).reshape(ep, rmax, h)


def run_pair(a2a, case, fmt, what):
    """fp8 dispatch, check every received row, fp32 combine of the dequantized rows."""
    r = a2a.ep_rank
    recv_ref, counts_ref, routing = case.reference()
    mine, deq_all = fp8_reference(case, fmt, recv_ref)
    ids, payloads = device(case.ids[r]), [device(p) for p in case.payloads[r]]
    poison(a2a)
    recv = a2a.dispatch(ids, payloads, case.rmax, INVALID, case.id_index, stream=stream,
                        quantize=Fp8Dispatch(case.qi, fmt))
    check_received(a2a, case, recv, recv_ref, counts_ref, mine, what)
    got = a2a.combine(dequantize(recv[case.qi], fmt), case.rmax, stream=stream)
    want = ref.moe_a2a_combine(deq_all, routing)[r]
    got = host(got)
    assert got.shape == want.shape and np.array_equal(bits(got), bits(want)), (
        f"{what}: combine of dequantized rows (T={case.T}) at "
        f"{np.argwhere(bits(got) != bits(want))[:5]}")
    a2a.check_error(stream, synchronize=True)
    checked.append(what)


def plain_pair(a2a, case):
    """A bf16 dispatch (no quantize) between fp8 ones: the old path is untouched."""
    r = a2a.ep_rank
    poison(a2a)
    recv_ref, counts_ref, routing = case.reference()
    recv = a2a.dispatch(device(case.ids[r]), [device(p) for p in case.payloads[r]], case.rmax,
                        INVALID, case.id_index, stream=stream)
    assert np.array_equal(host(a2a.recv_counts), counts_ref[r])
    for p, (got, want) in enumerate(zip(recv, recv_ref[r])):
        got = host(got)
        for s in range(N):
            c = counts_ref[r][s]
            assert np.array_equal(got[s, :c], want[s, :c]), f"plain payload {p} block {s}"
    out = host(a2a.combine(recv[case.qi], case.rmax, stream=stream))
    want = ref.moe_a2a_combine([recv_ref[q][case.qi] for q in range(N)], routing)[r]
    assert np.array_equal(out, want), "plain round trip"
    checked.append("plain bf16 between")


def bad_fp8_dispatches(a2a):
    """Argument errors, raised before any launch; the object stays usable."""
    def bf16(shape, offset=0):
        raw = cupy.zeros(int(np.prod(shape)) + 16, np.uint16)
        return cupy.ndarray(shape, bfloat16, raw.data + offset)

    ids = cupy.zeros((4, TOP_K), np.int32)
    q0 = Fp8Dispatch()
    with stream:
        expect_raises(ValueError, "200 elements per token is not a multiple of the fp8 group",
                      lambda: a2a.dispatch(ids, [bf16((4, 200))], 8, quantize=q0))
        expect_raises(TypeError, "input_payloads[0] (fp8 dispatch): dtype float16 is not "
                      "supported, expected bfloat16",
                      lambda: a2a.dispatch(ids, [cupy.zeros((4, 256), np.float16)], 8,
                                           quantize=q0))
        expect_raises(TypeError, "expected bfloat16",
                      lambda: a2a.dispatch(ids, [cupy.zeros((4, 256), np.float32)], 8,
                                           quantize=q0))
        expect_raises(ValueError, "expected [T, hidden]",
                      lambda: a2a.dispatch(ids, [bf16((4, 2, 128))], 8, quantize=q0))
        expect_raises(ValueError, "quantize.payload_index=2 is not in [0, 2)",
                      lambda: a2a.dispatch(ids, [bf16((4, 256)), ids], 8,
                                           quantize=Fp8Dispatch(2)))
        expect_raises(TypeError, "expected bfloat16",  # the id payload is not bf16
                      lambda: a2a.dispatch(ids, [bf16((4, 256)), ids], 8, INVALID, 1,
                                           quantize=Fp8Dispatch(1)))
        expect_raises(TypeError, "quantize: expected an Fp8Dispatch",
                      lambda: a2a.dispatch(ids, [bf16((4, 256))], 8, quantize="fp8"))
        expect_raises(ValueError, "with quantize at most 7",
                      lambda: a2a.dispatch(ids, [bf16((4, 256))] * 8, 8, quantize=q0))
        expect_raises(ValueError, "is not 16-byte aligned",
                      lambda: a2a.dispatch(ids, [bf16((4, 256), offset=4)], 8, quantize=q0))
    checked.append("bad fp8 dispatch")


def graph_replay(a2a, seed, fmt, h):
    """fp8 dispatch + bf16 combine captured once, replayed with new routings and rows."""
    r = a2a.ep_rank
    base = Case(seed, h, layout="B")
    ids = device(base.ids[r])
    payloads = [device(p) for p in base.payloads[r]]
    comb = device(np.zeros((N, base.rmax, h), np.uint16))
    out = device(np.zeros((base.T[r], h), np.uint16))
    quant = Fp8Dispatch(base.qi, fmt)
    poison(a2a)
    with stream:
        stream.begin_capture()
        recv = a2a.dispatch(ids, payloads, base.rmax, INVALID, base.id_index, stream=stream,
                            quantize=quant)
        res = a2a.combine(comb, base.rmax, stream=stream, out=out)
        graph = stream.end_capture()
    assert res is out or res.data.ptr == out.data.ptr
    for i in range(3):
        case = Case(seed + 100 + i, h, layout="B", T=base.T)
        recv_ref, counts_ref, routing = case.reference()
        mine, _ = fp8_reference(case, fmt, recv_ref)
        # rank q's expert output: (q + 1) * its received bf16 rows + 0.25 * s
        rows = [ref.to_bf16_bits(ref.to_float32(recv_ref[q][case.qi]) * np.float32(q + 1)
                                 + np.float32(0.25) * np.arange(N, dtype=np.float32)[:, None, None])
                for q in range(N)]
        poison(a2a)
        with stream:
            for d, x in zip([ids, *payloads, comb], [case.ids[r], *case.payloads[r], rows[r]]):
                cupy.ndarray(d.shape, x.dtype, d.data)[...] = cupy.asarray(x)
            cupy.ndarray(out.shape, np.uint16, out.data).fill(0x7FC1)
        graph.launch(stream)
        check_received(a2a, case, recv, recv_ref, counts_ref, mine, f"graph {fmt} replay {i}")
        want = ref.moe_a2a_combine(rows, routing)[r]
        assert np.array_equal(host(out), want), f"graph {fmt} replay {i}: combine"
    a2a.check_error(stream, synchronize=True)
    checked.append(f"graph replay {fmt}")


# ---------------------------------------------------------------- the tests
def main():
    # fp32 scales are the wider ones; the fp32 combine of H_MAX needs 2 * H_MAX more.
    ws = MoeAlltoAll.get_moe_workspace_size_per_rank(
        N, TOP_K, MAX_T, H_MAX, 2 * H_MAX, quantize=Fp8Dispatch(scale_format="fp32"))
    with MoeAlltoAll(group, MAX_T, TOP_K, EPR * N, workspace_size_per_rank=ws) as a2a:
        bad_fp8_dispatches(a2a)
        seed = shared_seed()
        run_pair(a2a, Case(seed + 1, 128, "A"), "fp32", "fp32 H=128")
        run_pair(a2a, Case(seed + 2, 384, "B", rmax_extra=5), "ue8m0", "ue8m0 H=384 (3 groups)")
        run_pair(a2a, Case(seed + 3, 1280, "B", mode="zero"), "fp32", "fp32 zero tokens")
        run_pair(a2a, Case(seed + 4, H_MAX, "A", mode="full"), "ue8m0", "ue8m0 H=7168 full")
        run_pair(a2a, Case(seed + 5, 640, "A", mode="one_rank"), "ue8m0", "ue8m0 one rank")
        run_pair(a2a, Case(seed + 6, 384, "A", mode="all_invalid"), "fp32", "fp32 all invalid")
        plain_pair(a2a, Case(seed + 7, 256, "A"))
        run_pair(a2a, Case(seed + 8, H_MAX, "B", rmax_extra=3), "fp32", "fp32 H=7168")
        run_pair(a2a, Case(seed + 9, 512, "A", T=[0] * N), "ue8m0", "ue8m0 no tokens")
        graph_replay(a2a, shared_seed(), "ue8m0", 640)
        graph_replay(a2a, shared_seed(), "fp32", 1152)
    return checked


if __name__ == "__main__":
    done = main()
    assert done[-1] == "graph replay fp32", done
    print(f"rank {group.rank}: {', '.join(done)}", flush=True)
    report_pass(group.rank)
