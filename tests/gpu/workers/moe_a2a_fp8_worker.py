"""MoeAlltoAll with FP8 dispatch (``quantize=Fp8Dispatch(...)``) on every rank.

Every rank builds every rank's inputs from a shared seed. The received codes and scales
must equal, bit for bit, the reference quantizer applied to the rows the reference
dispatch delivers: ``reference.quant_fp8_per_token_group(x, 128)`` for ``"ue8m0"``,
:func:`quant_fp8_groups_fp32` below for ``"fp32"``. The other payloads, the counts and the
combine (of the dequantized rows, or of host-made bf16 rows in graph replay) are checked
against the reference too. Outputs and the workspace are poisoned first. The cases run in
sequence on one workspace, hidden sizes and formats changing from call to call.
"""

import re

import cupy
import numpy as np
import pytest

from moecomm import reference as ref
from moecomm.constants import GROUP_FP8_MIN_SCALE
from moecomm.moe import Fp8Dispatch, Fp8Rows, MoeAlltoAll
from moecomm.tensors import bfloat16
from tests.gpu.workers.common import bits, main
from tests.mpi import case

EPR = 4  # experts per rank
TOP_K = 4
MAX_T = 48
H_MAX = 7168
INVALID = -5
G = 128


# ---------------------------------------------------------------- reference quantizers
def quant_fp8_groups_fp32(x):
    """The "fp32" format: per 128 elements ``s = max(fp32(amax / 448), 1e-10)``,
    ``q = e4m3_sat(fp32(x * fp32(1 / s)))``. x: bf16 bits [M, H] -> (uint8 [M, H],
    float32 [M, H / 128])."""
    x32 = ref.to_float32(x)
    m, n = x32.shape
    blocks = x32.reshape(m, n // G, G)
    amax = np.abs(blocks).max(axis=-1)
    s = np.maximum(amax / np.float32(448.0), np.float32(GROUP_FP8_MIN_SCALE))
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


class Exchange:
    """Every rank's routing and payloads. layout "A": [hidden, ids, weights] (quantize 0,
    ids 1); "B": [ids, scales fp32 [T, 2], hidden] (ids 0, quantize 2)."""

    def __init__(self, seed, n, h, layout="A", mode="random", rmax_extra=0, T=None):
        self.n, self.h, self.E = n, h, EPR * n
        self.qi, self.id_index = (0, 1) if layout == "A" else (2, 0)
        rng = np.random.default_rng(seed)
        self.T = list(T) if T is not None else [int(rng.integers(1, MAX_T - rmax_extra + 1))
                                                 for _ in range(n)]
        if mode == "zero":
            self.T[0] = 0
        if mode == "full":
            self.T = [MAX_T] * n
        self.rmax = max(1, max(self.T)) + rmax_extra
        self.ids, self.payloads = [], []
        for s in range(n):
            t = self.T[s]
            ids = rng.integers(0, self.E, (t, TOP_K)).astype(np.int32)
            if mode == "one_rank":
                ids = (n - 1) * EPR + rng.integers(0, EPR, (t, TOP_K)).astype(np.int32)
            bad = rng.random((t, TOP_K)) < 0.12
            ids[bad] = rng.choice(np.array([-1, -100, self.E, self.E + 3], np.int32), bad.sum())
            if mode == "all_invalid" and s == min(1, n - 1):
                ids[:] = -1
            hidden = hidden_rows(rng, t, h)
            other = rng.random((t, TOP_K if layout == "A" else 2)).astype(np.float32)
            self.ids.append(ids)
            self.payloads.append([hidden, ids.copy(), other] if layout == "A"
                                 else [ids.copy(), other, hidden])

    def reference(self):
        return ref.moe_a2a_dispatch(self.ids, self.payloads, self.E, self.n, self.rmax, INVALID,
                                    self.id_index)


def workspace(ctx):
    """The job's MoeAlltoAll (fp32 scales are the wider ones; the fp32 combine of H_MAX
    needs 2 * H_MAX more): the cases run in sequence on it."""
    n = ctx.group.local_size
    size = MoeAlltoAll.get_moe_workspace_size_per_rank(
        n, TOP_K, MAX_T, H_MAX, 2 * H_MAX, quantize=Fp8Dispatch(scale_format="fp32"))
    return ctx.shared("a2a", lambda: MoeAlltoAll(ctx.group, MAX_T, TOP_K, EPR * n,
                                                 workspace_size_per_rank=size))


# ---------------------------------------------------------------- checks
def fp8_reference(ctx, exchange, fmt, recv_ref):
    """(codes, scales) this rank must receive for the quantized payload, and every rank's
    dequantized receive ([ep, rmax, H] fp32 each, for the combine reference). Computed
    before the dispatch, so that no rank lingers between its dispatch and combine."""
    r, n, deq_all = ctx.group.local_rank, exchange.n, []
    for q in range(n):
        flat = recv_ref[q][exchange.qi].reshape(n * exchange.rmax, exchange.h)
        codes, scales, deq = quantize_ref(flat, fmt)
        if q == r:
            check_quant_error(flat, deq)
            mine = codes.reshape(n, exchange.rmax, exchange.h), scales.reshape(n, exchange.rmax, -1)
        deq_all.append(deq.reshape(n, exchange.rmax, exchange.h))
    return mine, deq_all


def check_received(ctx, a2a, exchange, recv, recv_ref, counts_ref, fp8_ref, what):
    """Counts, every payload, and the fp8 rows against the reference."""
    r, n = a2a.ep_rank, exchange.n
    counts = ctx.host(a2a.recv_counts)
    assert np.array_equal(counts, counts_ref[r]), (what, counts, counts_ref[r])
    want_codes, want_scales = fp8_ref
    assert len(recv) == len(exchange.payloads[r])
    for p, got in enumerate(recv):
        if p == exchange.qi:
            assert isinstance(got, Fp8Rows), (what, type(got))
            codes, scales = ctx.host(got.codes), ctx.host(got.scales)
            assert codes.dtype == np.uint8 and codes.shape == (n, exchange.rmax, exchange.h), what
            assert scales.dtype == want_scales.dtype and scales.shape == want_scales.shape, \
                (what, scales.dtype, scales.shape, want_scales.shape)
            for s in range(n):
                c = counts_ref[r][s]
                bad = np.argwhere(codes[s, :c] != want_codes[s, :c])
                assert bad.size == 0, f"{what}: codes block {s} (T={exchange.T}) at {bad[:5]}"
                assert np.array_equal(bits(scales[s, :c]), bits(want_scales[s, :c])), \
                    f"{what}: scales block {s} (T={exchange.T})"
            continue
        got, want = ctx.host(got), recv_ref[r][p]
        assert got.shape == want.shape and got.dtype == want.dtype, (what, p, got.shape)
        if p == exchange.id_index:  # sanitised, padding rows included
            assert np.array_equal(got, want), f"{what}: ids (T={exchange.T})"
            continue
        for s in range(n):
            c = counts_ref[r][s]
            assert np.array_equal(got[s, :c], want[s, :c]), f"{what}: payload {p} block {s}"


def dequantize(ctx, rows: Fp8Rows, fmt) -> cupy.ndarray:
    """fp32 [ep, rmax, H] = decode(codes) * scale, on the device (eager)."""
    with ctx.stream:
        lut = cupy.asarray(ref.fp8_e4m3_decode(np.arange(256, dtype=np.uint8)))
        ep, rmax, h = rows.codes.shape
        if fmt == "ue8m0":
            e = rows.scales.view(np.uint8).reshape(ep, rmax, -1)[..., :h // G]
            scale = (e.astype(np.uint32) << 23).view(np.float32)
        else:
            scale = rows.scales
        return (lut[rows.codes.astype(np.int32)].reshape(ep, rmax, h // G, G)
                * scale[..., None]).reshape(ep, rmax, h)


# (hidden, format, Exchange options or a function of the ep size giving them) per
# scenario: 1 to 56 groups per row, both layouts, ragged counts, a rank without tokens,
# full, one target rank, invalid ids, no tokens.
PAIRS = {
    "fp32-h128": (128, "fp32", dict(layout="A")),
    "ue8m0-h384-padded": (384, "ue8m0", dict(layout="B", rmax_extra=5)),
    "fp32-h1280-rank0_no_tokens": (1280, "fp32", dict(layout="B", mode="zero")),
    "ue8m0-h7168-full": (H_MAX, "ue8m0", dict(layout="A", mode="full")),
    "ue8m0-h640-all_to_one_rank": (640, "ue8m0", dict(layout="A", mode="one_rank")),
    "fp32-h384-one_rank_all_invalid": (384, "fp32", dict(layout="A", mode="all_invalid")),
    "fp32-h7168-padded": (H_MAX, "fp32", dict(layout="B", rmax_extra=3)),
    "ue8m0-h512-no_tokens": (512, "ue8m0", lambda n: dict(layout="A", T=[0] * n)),
}


@case
def bad_fp8_dispatches(ctx):
    """Argument errors, raised before any launch; the object stays usable (the cases
    after this one use it)."""
    a2a = workspace(ctx)

    def bf16(shape, offset=0):
        raw = cupy.zeros(int(np.prod(shape)) + 16, np.uint16)
        return cupy.ndarray(shape, bfloat16, raw.data + offset)

    ids = cupy.zeros((4, TOP_K), np.int32)
    q0 = Fp8Dispatch()
    with ctx.stream:
        with pytest.raises(ValueError, match="200 elements per token is not a multiple of the "
                                             "fp8 group"):
            a2a.dispatch(ids, [bf16((4, 200))], 8, quantize=q0)
        with pytest.raises(TypeError, match=re.escape(
                "input_payloads[0] (fp8 dispatch): dtype float16 is not supported, expected "
                "bfloat16")):
            a2a.dispatch(ids, [cupy.zeros((4, 256), np.float16)], 8, quantize=q0)
        with pytest.raises(TypeError, match="expected bfloat16"):
            a2a.dispatch(ids, [cupy.zeros((4, 256), np.float32)], 8, quantize=q0)
        with pytest.raises(ValueError, match=re.escape("expected [T, hidden]")):
            a2a.dispatch(ids, [bf16((4, 2, 128))], 8, quantize=q0)
        with pytest.raises(ValueError,
                           match=re.escape("quantize.payload_index=2 is not in [0, 2)")):
            a2a.dispatch(ids, [bf16((4, 256)), ids], 8, quantize=Fp8Dispatch(2))
        with pytest.raises(TypeError, match="expected bfloat16"):  # the id payload is not bf16
            a2a.dispatch(ids, [bf16((4, 256)), ids], 8, INVALID, 1, quantize=Fp8Dispatch(1))
        with pytest.raises(TypeError, match="quantize: expected an Fp8Dispatch"):
            a2a.dispatch(ids, [bf16((4, 256))], 8, quantize="fp8")
        with pytest.raises(ValueError, match="with quantize at most 7"):
            a2a.dispatch(ids, [bf16((4, 256))] * 8, 8, quantize=q0)
        with pytest.raises(ValueError, match="is not 16-byte aligned"):
            a2a.dispatch(ids, [bf16((4, 256), offset=4)], 8, quantize=q0)
        # the same layout again, once prepared: the address is still checked per call
        a2a.dispatch(ids, [bf16((4, 256))], 8, quantize=q0)
        a2a.combine(bf16((ctx.group.local_size, 8, 256)), 8)
        with pytest.raises(ValueError, match=re.escape(
                "input_payloads[0] (fp8 dispatch): address")):
            a2a.dispatch(ids, [bf16((4, 256), offset=8)], 8, quantize=q0)


@case(variants=PAIRS)
def pair(ctx, scenario):
    """fp8 dispatch, every received row checked, fp32 combine of the dequantized rows."""
    h, fmt, kw = scenario
    a2a, n = workspace(ctx), ctx.group.local_size
    exchange = Exchange(ctx.new_seed(), n, h, **(kw(n) if callable(kw) else kw))
    r, what = a2a.ep_rank, ctx.name
    recv_ref, counts_ref, routing = exchange.reference()
    mine, deq_all = fp8_reference(ctx, exchange, fmt, recv_ref)
    ids, payloads = ctx.device(exchange.ids[r]), [ctx.device(p) for p in exchange.payloads[r]]
    ctx.poison(a2a)
    recv = a2a.dispatch(ids, payloads, exchange.rmax, INVALID, exchange.id_index,
                        stream=ctx.stream, quantize=Fp8Dispatch(exchange.qi, fmt))
    check_received(ctx, a2a, exchange, recv, recv_ref, counts_ref, mine, what)
    got = a2a.combine(dequantize(ctx, recv[exchange.qi], fmt), exchange.rmax, stream=ctx.stream)
    want = ref.moe_a2a_combine(deq_all, routing)[r]
    got = ctx.host(got)
    assert got.shape == want.shape and np.array_equal(bits(got), bits(want)), (
        f"{what}: combine of dequantized rows (T={exchange.T}) at "
        f"{np.argwhere(bits(got) != bits(want))[:5]}")
    a2a.check_error(ctx.stream, synchronize=True)


@case
def plain_bf16_between(ctx):
    """A bf16 dispatch (no quantize) between fp8 ones: the old path is untouched."""
    a2a, n = workspace(ctx), ctx.group.local_size
    exchange = Exchange(ctx.new_seed(), n, 256, "A")
    r = a2a.ep_rank
    ctx.poison(a2a)
    recv_ref, counts_ref, routing = exchange.reference()
    recv = a2a.dispatch(ctx.device(exchange.ids[r]), [ctx.device(p) for p in exchange.payloads[r]],
                        exchange.rmax, INVALID, exchange.id_index, stream=ctx.stream)
    assert np.array_equal(ctx.host(a2a.recv_counts), counts_ref[r])
    for p, (got, want) in enumerate(zip(recv, recv_ref[r])):
        got = ctx.host(got)
        for s in range(n):
            c = counts_ref[r][s]
            assert np.array_equal(got[s, :c], want[s, :c]), f"plain payload {p} block {s}"
    out = ctx.host(a2a.combine(recv[exchange.qi], exchange.rmax, stream=ctx.stream))
    want = ref.moe_a2a_combine([recv_ref[q][exchange.qi] for q in range(n)], routing)[r]
    assert np.array_equal(out, want), "plain round trip"


@case(variants={"ue8m0": ("ue8m0", 640), "fp32": ("fp32", 1152)})
def graph_replay(ctx, variant):
    """fp8 dispatch + bf16 combine captured once, replayed with new routings and rows."""
    fmt, h = variant
    a2a, n, stream = workspace(ctx), ctx.group.local_size, ctx.stream
    r, seed = a2a.ep_rank, ctx.new_seed()
    base = Exchange(seed, n, h, layout="B")
    ids = ctx.device(base.ids[r])
    payloads = [ctx.device(p) for p in base.payloads[r]]
    comb = ctx.device(np.zeros((n, base.rmax, h), np.uint16))
    out = ctx.device(np.zeros((base.T[r], h), np.uint16))
    quant = Fp8Dispatch(base.qi, fmt)
    ctx.poison(a2a)
    with stream:
        stream.begin_capture()
        recv = a2a.dispatch(ids, payloads, base.rmax, INVALID, base.id_index, stream=stream,
                            quantize=quant)
        res = a2a.combine(comb, base.rmax, stream=stream, out=out)
        graph = stream.end_capture()
    assert res is out or res.data.ptr == out.data.ptr
    for i in range(3):
        exchange = Exchange(seed + 100 + i, n, h, layout="B", T=base.T)
        recv_ref, counts_ref, routing = exchange.reference()
        mine, _ = fp8_reference(ctx, exchange, fmt, recv_ref)
        # rank q's expert output: (q + 1) * its received bf16 rows + 0.25 * s
        rows = [ref.to_bf16_bits(ref.to_float32(recv_ref[q][exchange.qi]) * np.float32(q + 1)
                                 + np.float32(0.25) * np.arange(n, dtype=np.float32)[:, None, None])
                for q in range(n)]
        ctx.poison(a2a)
        with stream:
            for d, x in zip([ids, *payloads, comb], [exchange.ids[r], *exchange.payloads[r],
                                                     rows[r]]):
                cupy.ndarray(d.shape, x.dtype, d.data)[...] = cupy.asarray(x)
            cupy.ndarray(out.shape, np.uint16, out.data).fill(0x7FC1)
        graph.launch(stream)
        check_received(ctx, a2a, exchange, recv, recv_ref, counts_ref, mine,
                       f"graph {fmt} replay {i}")
        want = ref.moe_a2a_combine(rows, routing)[r]
        assert np.array_equal(ctx.host(out), want), f"graph {fmt} replay {i}: combine"
    a2a.check_error(stream, synchronize=True)


if __name__ == "__main__":
    main()
