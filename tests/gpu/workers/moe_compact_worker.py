"""EPAllToAll (compact expert-major layout) on every rank, against moecomm.reference.

Every rank builds every rank's inputs from a shared seed, computes the reference of the
whole exchange and checks its own part, bit for bit: the exact combine against
``ep_combine_compact``, the local combine against the two-level sum built from it (each
rank's slots summed and rounded, then the ranks summed in order). Outputs and buffers are
poisoned first, while no peer uses them (between barriers). Ranks may share a GPU.
"""

import cupy
import numpy as np

import moecomm
from moecomm import reference as ref
from moecomm.moe import CapacityError, EPAll2AllLayer, EPAllToAll
from moecomm.tensors import bfloat16
from tests.gpu.workers.moe_io import IO, bits
from tests.mpi import expect_raises, report_pass

group = moecomm.init()
N = group.local_size
EPR = 3  # experts per rank
TOP_K = 6  # not a multiple of 4: padded code rows, 24-byte id rows (MoeAlltoAll word path)
H = 128
MAX_T = 40
stream = cupy.cuda.Stream(non_blocking=True)
io = IO(group, stream)
shared_seed, device, host, quiesce = io.shared_seed, io.device, io.host, io.quiesce
checked = []
NAN = {np.dtype(np.uint16): 0x7FC1, np.dtype(np.float16): np.float16(np.nan),
       np.dtype(np.float32): np.float32(np.nan)}
POISON = {1: 0xA5, 2: 0x7FC1, 4: 0x7FC00001}  # bit patterns: NaN in bf16, fp16 and fp32




def host_dtype(dt) -> np.dtype:
    """The NumPy (reference) dtype of a device dtype: bf16 is uint16 bits."""
    return np.dtype(np.uint16) if np.dtype(dt) == bfloat16 else np.dtype(dt)








def raw(d: cupy.ndarray) -> cupy.ndarray:
    """An unsigned-integer view of a device array (to fill or copy any dtype)."""
    return cupy.ndarray(d.shape, {1: np.uint8, 2: np.uint16, 4: np.uint32}[d.itemsize], d.data)


def zeros(shape, dtype) -> cupy.ndarray:
    """A zeroed device array of any dtype, bf16 included."""
    dtype = np.dtype(dtype)
    d = cupy.zeros(max(1, int(np.prod(shape))) * dtype.itemsize, np.uint8)
    return cupy.ndarray(shape, dtype, d.data)




# ---------------------------------------------------------------- inputs and reference
class Case:
    """Every rank's tokens, routing and weights for ``ep`` ranks (``EPR * ep`` experts).

    mode: random | zero (rank 0 has no tokens) | none (no rank has tokens) | one_expert
    (every valid id is the last expert) | dup (slots 1 and 3 repeat slots 0 and 2) |
    all_invalid (one rank routes nowhere) | full (MAX_T tokens everywhere).
    weights: all | none | mixed (even ranks only).
    """

    def __init__(self, seed, ep=None, mode="random", weights="all", x_dtype=np.uint16, T=None):
        ep = N if ep is None else ep
        self.ep, self.E = ep, EPR * ep
        rng = np.random.default_rng(seed)
        if T is None:
            T = [int(rng.integers(1, MAX_T + 1)) for _ in range(ep)]
        T = list(T)
        if mode == "zero":
            T[0] = 0
        if mode == "none":
            T = [0] * ep
        if mode == "full":
            T = [MAX_T] * ep
        self.T = T
        self.ids, self.x, self.w, self.w_given = [], [], [], []
        for s in range(ep):
            t = T[s]
            ids = rng.integers(0, self.E, (t, TOP_K)).astype(np.int32)
            if mode == "one_expert":
                ids[:] = self.E - 1
            if mode == "dup":
                ids[:, 1], ids[:, 3] = ids[:, 0], ids[:, 2]
            bad = rng.random((t, TOP_K)) < 0.12
            ids[bad] = rng.choice(np.array([-1, -100, self.E, self.E + 7], np.int32), bad.sum())
            if mode == "all_invalid" and s == min(1, ep - 1):
                ids[:] = -1
            x32 = rng.standard_normal((t, H)).astype(np.float32)
            x = ref.cast_from_float32(x32, x_dtype)
            w = rng.standard_normal((t, TOP_K)).astype(np.float32)
            given = weights == "all" or (weights == "mixed" and s % 2 == 0)
            self.ids.append(ids)
            self.x.append(x)
            self.w.append(w if given else np.ones_like(w))
            self.w_given.append(given)
        # weights=None means weight 1.0: the reference gets ones for those ranks
        self.xr, self.wr, self.lay = ref.ep_dispatch_compact(self.x, self.ids, self.w, self.E, ep)

    def inputs(self, r):
        ids, x = device(self.ids[r]), device(self.x[r])
        w = device(self.w[r]) if self.w_given[r] else None
        return x, ids, w

    def outputs(self, dtype, cap):
        """Expert outputs per rank: (device-side [cap, H] with NaN rows past what is held,
        reference-side [R, H] with the dropped rows zeroed, i.e. contributing nothing)."""
        dtype = host_dtype(dtype)
        dev, refs = [], []
        for r in range(self.ep):
            R = self.xr[r].shape[0]
            S = min(R, cap)
            ge = (self.lay.local_expert[r] + r * EPR).astype(np.float32)[:, None]
            slot = self.lay.src[r][:, 2:3].astype(np.float32)
            y32 = ref.to_float32(self.xr[r]) * (np.float32(0.75) + np.float32(0.125) * ge)
            y32 = y32 + np.float32(0.01) * slot
            y = ref.cast_from_float32(y32, dtype)
            full = np.full((cap, H), NAN[dtype], dtype)
            full[:S] = y[:S]
            y[S:] = 0
            dev.append(full)
            refs.append(y)
        return dev, refs

    def combine_ref(self, ys, apply, local):
        if not local:
            return ref.ep_combine_compact(ys, self.lay, apply_weights=apply)
        outs = []
        for s in range(self.ep):
            acc = np.zeros((self.T[s], H), np.float32)
            for r in range(self.ep):  # rank r's slots alone, rounded: its partial
                masked = [y if q == r else np.zeros_like(y) for q, y in enumerate(ys)]
                part = ref.ep_combine_compact(masked, self.lay, apply_weights=apply)[s]
                acc = acc + ref.to_float32(part)
            outs.append(ref.cast_from_float32(acc, ys[0].dtype))
        return outs


def poison(layer):
    quiesce()
    raw(layer._recv_x_buf).fill(POISON[layer.dtype.itemsize])
    layer._src_buf.fill(-9)
    layer._recv_w_buf.fill(np.nan)
    layer._tpe.fill(-7)
    layer._offsets.fill(-7)
    layer._stats[1:4] = -7  # not the arrival counter (0) nor the sticky record (4, 5)
    io.poison_workspace(layer._a2a)
    if not layer.local_combine:
        raw(layer.get_combine_input_tensor_in_workspace()).fill(
            POISON[layer.combine_dtype.itemsize])
        layer._codes_out.fill(np.nan)
    quiesce()


def check_dispatch(layer, case, out, what):
    """recv_x, weights, src, tokens_per_expert, offsets, counts and the guard rows."""
    r, cap = layer.ep_rank, layer.capacity
    recv_x, recv_w, lay = out
    R = case.xr[r].shape[0]
    S = min(R, cap)
    assert lay.num_rows_host(stream) == S, (what, lay.num_rows_host(stream), S)
    assert (int(host(lay.num_needed)[0]), int(host(lay.num_dropped)[0])) == (R, R - S), what
    assert recv_x.shape == (cap, H) and recv_w.shape == (cap,), what
    assert np.array_equal(bits(host(recv_x)[:S]), bits(case.xr[r][:S])), f"{what}: recv_x"
    assert np.array_equal(bits(host(recv_w)[:S]), bits(case.wr[r][:S])), f"{what}: weights"
    assert np.array_equal(host(lay.src)[:S], case.lay.src[r][:S]), f"{what}: src"
    tpe = np.bincount(case.lay.local_expert[r][:S], minlength=EPR).astype(np.int32)
    assert np.array_equal(lay.tokens_per_expert_host(stream), tpe), (what, tpe)
    assert np.array_equal(host(out.tokens_per_expert), tpe), what
    assert np.array_equal(host(lay.expert_offsets), np.concatenate([[0], np.cumsum(tpe)])), what
    guard = bits(host(layer._recv_x_buf[cap:]))
    assert np.all(guard == POISON[layer.dtype.itemsize]), f"{what}: row past the capacity written"
    assert np.all(host(layer._src_buf[cap:]) == -9), f"{what}: src past the capacity written"
    assert np.isnan(host(layer._recv_w_buf[cap:])[0]), f"{what}: weight past the capacity"


# ---------------------------------------------------------------- one dispatch + combine
def run_pair(layer, case, *, apply=False, zero_copy=False, use_out=False, between=None,
             rmax=None):
    r, cap = layer.ep_rank, layer.capacity
    what = (f"T={case.T} local={layer.local_combine} apply={apply} zero_copy={zero_copy} "
            f"cap={cap}")
    poison(layer)
    x, ids, w = case.inputs(r)
    out = layer.dispatch(x, ids, w, stream=stream, runtime_max_tokens_per_rank=rmax)
    lay = out.layout
    check_dispatch(layer, case, out, what)
    if between is not None:
        between(layer, out)

    ys_dev, ys_ref = case.outputs(layer.combine_dtype, cap)
    want = case.combine_ref(ys_ref, apply, layer.local_combine)[r]
    if zero_copy:
        y = layer.get_combine_input_tensor_in_workspace()
        with stream:
            raw(y)[...] = cupy.asarray(bits(ys_dev[r]))
    else:
        y = device(ys_dev[r], bf16=layer.combine_dtype == bfloat16)
    dst = None
    if use_out:
        dst = zeros((case.T[r], H), layer.combine_dtype)
        raw(dst).fill(POISON[dst.itemsize])
    got = layer.combine(y, lay, apply_weights=apply, stream=stream, out=dst)
    if dst is not None:
        assert got.data.ptr == dst.data.ptr, what
    got = host(got)
    assert got.shape == (case.T[r], H) and got.dtype == want.dtype, (what, got.shape, got.dtype)
    diff = np.argwhere(bits(got) != bits(want))
    assert diff.size == 0, f"combine {what}: {diff.shape[0]} differ, first {diff[:4].tolist()}"
    layer.check_error(stream, synchronize=True)
    return lay


def bad_calls_between(layer, out):
    """Wrong calls between a dispatch and its combine: clear errors, nothing launched."""
    lay, cap = out.layout, layer.capacity
    x, ids = zeros((1, H), layer.dtype), cupy.zeros((1, TOP_K), np.int32)
    yd = layer.combine_dtype
    ok = cupy.zeros((cap, H), np.float32 if yd != np.float32 else np.float16)
    with stream:
        expect_raises(RuntimeError, "twice without combine", lambda: layer.dispatch(x, ids))
        expect_raises(ValueError, "y: shape",
                      lambda: layer.combine(zeros((cap + 1, H), yd), lay))
        expect_raises(ValueError, "y: shape",
                      lambda: layer.combine(zeros((cap, H + 8), yd), lay))
        expect_raises(TypeError, "y: dtype", lambda: layer.combine(ok, lay))
        expect_raises(TypeError, "apply_weights must be a bool",
                      lambda: layer.combine(layer.recv_x, lay, apply_weights=1))
        expect_raises(TypeError, "EPLayout", lambda: layer.combine(layer.recv_x, None))
        expect_raises(ValueError, "out: shape",
                      lambda: layer.combine(layer.get_combine_input_tensor_in_workspace(), lay,
                                            out=zeros((lay.num_tokens + 1, H), yd)))
        if not layer.local_combine:  # a view 16 bytes into the exchange buffer
            part = layer.get_combine_input_tensor_in_workspace()
            shifted = cupy.ndarray((cap, H), yd, part.data + 16)
            expect_raises(ValueError, "overlaps", lambda: layer.combine(shifted, lay))
    checked.append("bad calls between")


def bad_dispatches(layer):
    """Argument errors before any launch."""
    dt = layer.dtype
    ids = cupy.zeros((4, TOP_K), np.int32)
    x = zeros((4, H), dt)
    other = np.float32 if dt != np.float32 else np.float16
    with stream:
        expect_raises(TypeError, "x: dtype", lambda: layer.dispatch(zeros((4, H), other), ids))
        expect_raises(ValueError, "x: shape", lambda: layer.dispatch(zeros((4, H + 8), dt), ids))
        expect_raises(ValueError, "x: shape", lambda: layer.dispatch(zeros((5, H), dt), ids))
        expect_raises(ValueError, "exceed max_num_tokens",
                      lambda: layer.dispatch(zeros((MAX_T + 1, H), dt),
                                             cupy.zeros((MAX_T + 1, TOP_K), np.int32)))
        expect_raises(TypeError, "topk_ids: dtype int64",
                      lambda: layer.dispatch(x, ids.astype(np.int64)))
        expect_raises(ValueError, f"top_k={TOP_K}",
                      lambda: layer.dispatch(x, cupy.zeros((4, TOP_K - 1), np.int32)))
        expect_raises(ValueError, "weights: shape",
                      lambda: layer.dispatch(x, ids, cupy.zeros((4, TOP_K + 1), np.float32)))
        expect_raises(TypeError, "weights: dtype float16",
                      lambda: layer.dispatch(x, ids, cupy.zeros((4, TOP_K), np.float16)))
        expect_raises(ValueError, "exceed runtime_max_tokens_per_rank",
                      lambda: layer.dispatch(x, ids, runtime_max_tokens_per_rank=3))
        expect_raises(ValueError, "exceeds max_num_tokens",
                      lambda: layer.dispatch(x, ids, runtime_max_tokens_per_rank=MAX_T + 1))
        expect_raises(ValueError, "array is on cpu",
                      lambda: layer.dispatch(x, np.zeros((4, TOP_K), np.int32)))
        expect_raises(TypeError, "EPLayout", lambda: layer.combine(layer.recv_x, "layout"))
    checked.append("bad dispatch")


# ---------------------------------------------------------------- the layers
def exact_layer():
    """Exact combine, bf16 in and out, worst-case capacity: every routing kind."""
    with EPAll2AllLayer(group, MAX_T, TOP_K, EPR * N, H) as layer:
        assert isinstance(layer, EPAllToAll) and layer.capacity == N * MAX_T * TOP_K
        assert (layer.ep_rank, layer.ep_size, layer.experts_per_rank) == (group.local_rank, N, EPR)
        bad_dispatches(layer)
        seed = shared_seed()
        lay = run_pair(layer, Case(seed + 1), apply=True, between=bad_calls_between)
        # the combine consumed the layout: it is not accepted twice
        expect_raises(RuntimeError, "dispatch just before",
                      lambda: layer.combine(layer.recv_x, lay))
        run_pair(layer, Case(seed + 2, weights="mixed"), apply=True, zero_copy=True, use_out=True)
        run_pair(layer, Case(seed + 3, mode="zero", weights="none"), apply=True)
        run_pair(layer, Case(seed + 4, mode="one_expert"), apply=False, zero_copy=True)
        run_pair(layer, Case(seed + 5, mode="dup"), apply=True, use_out=True)
        case = Case(seed + 6, mode="all_invalid", weights="mixed")
        run_pair(layer, case, apply=False, rmax=min(max(case.T) + 3, MAX_T))
        run_pair(layer, Case(seed + 7, mode="full"), apply=True, zero_copy=True)
        stale = run_pair(layer, Case(seed + 8, mode="none"), apply=True, use_out=True)
        graph_replay(layer, shared_seed(), zero_copy=True)
        expect_raises(RuntimeError, "stale", lambda: stale.tokens_per_expert)
        layer.check_capacity(stream)  # nothing dropped
        layer.check_error(stream, synchronize=True)
    expect_raises(RuntimeError, "closed", lambda: layer.dispatch(None, None))
    layer.close()  # closing twice is harmless
    checked.append("exact bf16")


def local_layer():
    """local_combine: two-level sum, bf16 in and out."""
    with EPAllToAll(group, MAX_T, TOP_K, EPR * N, H, local_combine=True) as layer:
        seed = shared_seed()
        run_pair(layer, Case(seed + 1), apply=True, between=bad_calls_between)
        run_pair(layer, Case(seed + 2, mode="dup", weights="mixed"), apply=True, use_out=True)
        case = Case(seed + 3, mode="zero")
        run_pair(layer, case, apply=False, zero_copy=True, rmax=max(case.T))
        run_pair(layer, Case(seed + 4, mode="one_expert", weights="none"), apply=True)
        graph_replay(layer, shared_seed(), zero_copy=False)
    checked.append("local bf16")


def overflow_layers():
    """Small capacities: the tail is dropped, counted, raised on request; combine skips it."""
    cap = MAX_T * TOP_K // 2
    for local, x_dtype, y_dtype in ((False, np.float32, np.float16), (True, bfloat16, np.float32)):
        with EPAllToAll(group, MAX_T, TOP_K, EPR * N, H, x_dtype, max_recv_rows=cap,
                        combine_dtype=y_dtype, local_combine=local) as layer:
            assert layer.capacity == cap
            r, hx = layer.ep_rank, host_dtype(x_dtype)
            seed = shared_seed()
            for i, (mode, T) in enumerate((("one_expert", None), ("full", None),
                                            ("random", [2] * N))):  # the last one fits
                case = Case(seed + i, mode=mode, x_dtype=hx, T=T)
                lay = run_pair(layer, case, apply=i != 1, zero_copy=not local and i == 0,
                               use_out=i == 1)
                R = case.xr[r].shape[0]
                if R > cap:
                    exc = expect_raises(CapacityError, f"the capacity is {cap}",
                                        lambda lay=lay: lay.check_capacity(stream))
                    assert (exc.needed, exc.capacity) == (R, cap), (exc.needed, R)
                    expect_raises(CapacityError, "were dropped",
                                  lambda: layer.check_capacity(stream))
                else:
                    lay.check_capacity(stream)
                layer.check_capacity(stream)  # nothing since the last check (record reset)
    checked.append("overflow")


def mapping_layer():
    """A Mapping's moe_ep groups (two of 2 ranks with 4 ranks) side by side."""
    ep = N // 2 if N % 4 == 0 else N
    mapping = moecomm.Mapping.from_group(group, moe_ep_size=ep)
    with EPAllToAll(mapping, MAX_T, TOP_K, EPR * ep, H) as layer:
        assert (layer.ep_rank, layer.ep_size) == (mapping.moe_ep_rank, ep)
        seed = shared_seed() + mapping.moe_ep_group[0]
        run_pair(layer, Case(seed, ep=ep, mode="dup"), apply=True)
    checked.append(f"mapping ep={ep}")


def graph_replay(layer, seed, zero_copy):
    """dispatch + round-trip combine captured once, replayed with new routings."""
    r = layer.ep_rank
    base = Case(seed)
    x, ids, w = (device(a) for a in (base.x[r], base.ids[r], base.w[r]))
    out = device(np.zeros((base.T[r], H), np.uint16))
    y_ws = layer.get_combine_input_tensor_in_workspace()
    with stream:  # compile CuPy's copy kernel outside the capture (peers may read y_ws)
        a = cupy.zeros(4, np.uint16)
        a[...] = cupy.ones(4, np.uint16)
    poison(layer)
    with stream:
        stream.begin_capture()
        res = layer.dispatch(x, ids, w, stream=stream)
        y = res.recv_x
        if zero_copy:
            raw(y_ws)[...] = raw(res.recv_x)
            y = y_ws
        got = layer.combine(y, res.layout, apply_weights=True, stream=stream, out=out)
        graph = stream.end_capture()
    assert got.data.ptr == out.data.ptr
    for i in range(3 if not layer.local_combine else 2):
        case = Case(seed + 100 + i, T=base.T)  # same token counts, new everything else
        poison(layer)
        with stream:
            for d, h in zip((x, ids, w), (case.x[r], case.ids[r], case.w[r])):
                raw(d)[...] = cupy.asarray(bits(h))
            raw(out).fill(POISON[2])
        graph.launch(stream)
        check_dispatch(layer, case, res, f"graph replay {i}")
        ys = case.xr  # the round trip: y is recv_x itself
        want = case.combine_ref(ys, True, layer.local_combine)[r]
        assert np.array_equal(host(out), want), f"graph replay {i}: combine"
    checked.append(f"graph {'local' if layer.local_combine else 'exact'}")


def main():
    expect_raises(ValueError, "not a multiple of the ep size",
                  lambda: EPAllToAll(group, MAX_T, TOP_K, EPR * N + 1, H))
    expect_raises(ValueError, "experts per rank exceed",
                  lambda: EPAllToAll(group, MAX_T, TOP_K, 1025 * N, H))
    split = moecomm.ProcessGroup(gpus_per_node=1)  # every rank its own declared node
    split.device_id = group.device_id
    expect_raises(ValueError, "spans", lambda: EPAllToAll(split, MAX_T, TOP_K, EPR * N, H))
    split.close()
    exact_layer()
    local_layer()
    overflow_layers()
    mapping_layer()
    return checked


if __name__ == "__main__":
    done = main()
    print(f"rank {group.rank}: {', '.join(done)}", flush=True)
    report_pass(group.rank)
