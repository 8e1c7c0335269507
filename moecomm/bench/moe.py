"""MoE all-to-all: MoeAlltoAll dispatch/combine vs the same exchange on NCCL all-to-all-v.

Setup (defaults; options change them): ep = the group size (ranks of one node), 256
experts, top_k 8; each rank dispatches T tokens (the same T on every rank,
``runtime_max_tokens_per_rank = T``) with three payloads: bf16 hidden ``[T, 7168]``, int32
expert ids ``[T, top_k]`` and fp32 scales ``[T, top_k]`` (``--no-extra-payloads``: hidden
only); combine returns bf16 ``[T, 7168]``. T runs over ``--tokens`` (1 ... 4096).

Routing, seeded per (seed, rank, T, routing), each token's experts distinct:

* ``uniform``: each token picks top_k experts uniformly at random out of all of them.
* ``skewed`` (one hot rank, rank 0): each token, with probability ``--hot`` (0.9), picks
  its top_k experts uniformly among rank 0's experts ``[0, E/ep)`` and so goes to rank 0
  only; otherwise it picks as in ``uniform``. Every other rank sends most of its rows to
  rank 0, whose inbound traffic is the bottleneck; rank 0 keeps most of its own tokens.

Timing (microseconds; CUDA events, medians after warm-up; each figure the slowest rank's):

* ``graph_us``: a CUDA graph of ``calls`` dispatch+combine pairs (10; 2 where ranks share
  a GPU), replayed (``graph_median_us``), per pair. Dispatch and combine must alternate,
  so the pair is the unit a graph can repeat.
* ``dispatch_us``, ``combine_us``, ``eager_us``: eager pairs, events before dispatch,
  between dispatch and combine, after combine. A spin kernel of ``SPIN_US`` (500 us)
  precedes each pair on the stream, so the host has enqueued the pair before the GPU
  reaches it: the events time GPU work, not Python's launch cost. ``eager_us`` is the
  pair.
* ``compact_graph_us``: the compact expert-major layer (``EPAllToAll``) at the same
  routing, graph-replayed pairs of ``dispatch(hidden, ids, scales as weights)`` and
  ``combine`` of its workspace-backed expert outputs; ``compact_vs_static`` is its ratio
  to ``graph_us``. ``compact_local_graph_us`` / ``compact_local_vs_static``: the same layer
  built with ``local_combine=True`` (each rank sums its rows of a token before the
  exchange: one row per token and rank on the links, other rounding). ``--no-compact``
  skips both.
* Combine takes the zero-copy path (expert outputs already in
  ``get_combine_payload_tensor_in_workspace``, ``payload_in_workspace=True``, ``out=``).
* ``GBps``: effective bandwidth = (bytes of token rows dispatched to OTHER ranks + bytes
  of the rows combined back from them) / ``graph_us``, counted on the host from the
  routing: rank r's remote rows = sum over its tokens of the distinct target ranks other
  than r; bytes = remote rows x (dispatch row bytes, all payloads + hidden x 2). The mean
  over ranks of these bytes is divided by the (slowest rank's) time.

NCCL baseline (same run, one rank per GPU only), from host-computed counts (excluded from
the timing): dispatch = a gather kernel packing each token's row once per distinct target
rank, grouped by target (own rank included, as MoeAlltoAll does), then ``all_to_all_v``;
its rows come from one ``[T, row_bytes]`` buffer holding the payloads side by side (built
beforehand: one gather, a slight advantage to NCCL). Combine = ``all_to_all_v`` of the
expert outputs ``[rows, hidden]`` back, then a kernel summing each token's returned rows
(fp32, rank order) to bf16. Timed the same ways; ``vs_nccl`` = graph time ratio
(``dispatch_vs_nccl``, ``combine_vs_nccl``: eager ratios, in the JSON).

Three more sections (one rank per GPU only; ``--no-extras`` skips them), at
``--sweep-tokens`` (4096) tokens, uniform routing, unless said otherwise:

* ``sms``: ``graph_us`` and ``GBps`` of MoeAlltoAll built with
  ``MoeAlltoAllConfig(num_sms=n)`` for n in ``--sms`` (8,16,24,32 and every SM), and
  ``of_best`` (its bandwidth over the best n's).
* ``fp8``: eager ``dispatch_us`` of the bf16 hidden payload vs the same dispatch with
  ``quantize=Fp8Dispatch()`` (fp32 scales, 128-element groups), and their ratio.
* ``host``: the eager cost of a call as a user sees it: wall time per dispatch+combine pair
  over ``--host-calls`` (500) back-to-back pairs at ``--host-tokens`` (128), one
  synchronisation at the end, the slowest rank's; ``host_us`` is the host time alone: the
  enqueue time per pair of 100 pairs issued while the GPU runs a 40 ms spin kernel (no
  launch waits for the GPU). Both are medians of 5 batches, each row's batches taken in
  turn with the other rows' (a drift of the host moves every row alike); ``best_wall_us``
  is the fastest batch's wall (host noise only adds time). ``wall_us`` is about
  max(``host_us``, the GPU's eager time per pair). Rows: CuPy arrays with the stream omitted
  (CuPy's current stream), given as a CuPy stream and as a raw handle; torch tensors (when
  torch is importable) with the stream omitted, a torch Stream and a raw handle; and the
  compact ``EPAllToAll`` pair, exact and with ``local_combine``, with CuPy arrays on a CuPy
  stream.
* ``host_speed``: each rank's bare launch and allocation cost in this run (the host's
  state; ``bench.common.host_speed``), next to the ``host`` rows it explains.

Validation, once per configuration before timing, on both paths: hidden values are small
integers (exact in bf16); the receive counts equal the host's; every received id row holds
one of this rank's experts; the combine of the received hidden rows equals, bit for bit,
hidden x (number of distinct target ranks). A failure on any rank raises on all.

Where ranks share a GPU the timings are not meaningful (the GPU time-slices between the
processes, each cross-process wait costs milliseconds) and NCCL is left out.
"""

from __future__ import annotations

import contextlib
import functools

import cupy
import numpy as np

from ..kernels import get_kernel
from ..moe import EPAllToAll, Fp8Dispatch, MoeAlltoAll, MoeAlltoAllConfig
from ..reference import moe_a2a_target_ranks
from ..tensors import bfloat16
from .common import (batch_wall_us, environment, graph_median_us, host_speed, in_turn,
                     print_table, pyplot, require_gpu, write_result)

TOKENS = [1, 32, 128, 512, 1024, 4096]
ROUTINGS = ("uniform", "skewed")
SPIN_US = 500  # GPU head start before each eager pair, longer than its host launch cost
EAGER_WARMUP = 5
BATCHES = 5  # batches of the eager host-cost measurement (medians)
HOST_CALLS = 100  # pairs enqueued behind a HOST_SPIN_US spin to time the host alone
HOST_SPIN_US = 40_000
THREADS = 256
_KERNELS = "bench_moe.cu"  # kernels_cu/: the benchmark's own kernels


def add_arguments(p) -> None:
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                   help="tokens per rank, comma-separated")
    p.add_argument("--routing", default=",".join(ROUTINGS), help="uniform, skewed or both")
    p.add_argument("--experts", type=int, default=256, help="total experts (multiple of ep)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token")
    p.add_argument("--hidden", type=int, default=7168,
                   help="bf16 elements per hidden row (a multiple of 8)")
    p.add_argument("--no-extra-payloads", action="store_true",
                   help="dispatch the hidden rows only (no int32 ids, no fp32 scales)")
    p.add_argument("--hot", type=float, default=0.9,
                   help="skewed routing: fraction of tokens sent only to rank 0")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of routings and payloads")
    p.add_argument("--plot", action="store_true", help="write a PNG (needs matplotlib)")
    p.add_argument("--no-compact", action="store_true",
                   help="skip the compact expert-major layer (EPAllToAll) timing")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the num_sms sweep, the fp8 dispatch and the host cost sections")
    p.add_argument("--sms", default="8,16,24,32,all", help="num_sms values of the sweep")
    p.add_argument("--sweep-tokens", type=int, default=4096,
                   help="tokens per rank of the num_sms sweep and the fp8 dispatch")
    p.add_argument("--host-tokens", type=int, default=128,
                   help="tokens per rank of the host cost pairs")
    p.add_argument("--host-calls", type=int, default=500,
                   help="back-to-back pairs timed for the host cost")


# ---------------------------------------------------------------------- host routing
def make_routing(kind: str, tokens: int, experts: int, top_k: int, ep: int, hot: float,
                 rng: np.random.Generator) -> np.ndarray:
    """int32 ``[tokens, top_k]`` expert ids, distinct per token (see the module doc)."""
    ids = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]
    if kind == "skewed":
        per_rank = experts // ep
        to_hot = rng.random(tokens) < hot
        ids[to_hot] = np.argsort(rng.random((int(to_hot.sum()), per_rank)), axis=1)[:, :top_k]
    elif kind != "uniform":
        raise ValueError(f"routing {kind!r}: expected uniform or skewed")
    return ids.astype(np.int32)


class Plan:
    """Host view of one rank's routing: who gets which token, and the NCCL indices.

    mask: bool ``[T, ep]`` token -> target rank; send_counts: rows per target rank;
    pack_idx: int32 ``[rows]`` token of each packed row (grouped by target, token order);
    slot: int32 ``[T, ep]`` packed row of (token, target) or -1; targets: ``[T]`` distinct
    target ranks per token; remote_rows: rows sent to ranks other than ``rank``.
    """

    def __init__(self, ids: np.ndarray, experts: int, ep: int, rank: int):
        self.mask = moe_a2a_target_ranks(ids, experts, ep)
        self.send_counts = self.mask.sum(axis=0).astype(np.int64)
        self.pack_idx = np.concatenate(
            [np.nonzero(self.mask[:, r])[0] for r in range(ep)]).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(self.send_counts)[:-1]])
        self.slot = np.where(self.mask, offsets + np.cumsum(self.mask, axis=0) - 1,
                             -1).astype(np.int32)
        self.targets = self.mask.sum(axis=1).astype(np.int32)
        self.remote_rows = int(self.send_counts.sum() - self.send_counts[rank])


# ---------------------------------------------------------------------- device helpers
def _u16(a: cupy.ndarray) -> cupy.ndarray:
    """A contiguous 2-byte array (bf16) seen as uint16 bits."""
    return cupy.ndarray(a.shape, np.uint16, a.data)


def _bf16(a: cupy.ndarray) -> cupy.ndarray:
    return cupy.ndarray(a.shape, bfloat16, a.data)


def _small_int_bf16(shape, rs) -> cupy.ndarray:
    """uint16 bf16 bits of integers in [-4, 4]: sums of a few stay exact in bf16."""
    vals = rs.randint(-4, 5, size=shape, dtype=np.int32).astype(np.float32)
    return (vals.view(np.uint32) >> 16).astype(np.uint16)


def _owns_expert(ids: cupy.ndarray, rank: int, per_rank: int) -> bool:
    """Every row of ``ids`` ``[rows, top_k]`` holds an expert of ``rank``."""
    return not ids.shape[0] or bool(((ids // per_rank) == rank).any(axis=1).all())


def _eager_us(first, second, spin, stream, iters: int) -> tuple[float, float, float]:
    """Median GPU time (us) of ``first()``, ``second()`` and both, over alternating eager
    pairs, each behind a spin kernel; one synchronisation at the end."""
    events = [[cupy.cuda.Event() for _ in range(3)] for _ in range(EAGER_WARMUP + iters)]
    for e0, e1, e2 in events:
        spin()
        e0.record(stream)
        first()
        e1.record(stream)
        second()
        e2.record(stream)
    events[-1][2].synchronize()
    ms = np.array([[cupy.cuda.get_elapsed_time(e0, e1), cupy.cuda.get_elapsed_time(e1, e2)]
                   for e0, e1, e2 in events[EAGER_WARMUP:]])
    return (float(np.median(ms[:, 0]) * 1e3), float(np.median(ms[:, 1]) * 1e3),
            float(np.median(ms.sum(axis=1)) * 1e3))


class Kernels:
    """The benchmark's own kernels (``kernels_cu/bench_moe.cu``: spin, NCCL pack gather,
    NCCL combine sum)."""

    def __init__(self, stream):
        self.stream = stream
        self._spin = get_kernel(_KERNELS, "bench_spin")
        self._gather = {16: get_kernel(_KERNELS, "bench_gather16"),
                        4: get_kernel(_KERNELS, "bench_gather4")}
        self._sum = get_kernel(_KERNELS, "bench_combine_sum")
        self._max_blocks = 8 * cupy.cuda.Device().attributes["MultiProcessorCount"]

    def _grid(self, n: int) -> tuple[int]:
        return (max(1, min(self._max_blocks, -(-n // THREADS))),)

    def spin(self, us: int = SPIN_US) -> None:
        self._spin((1,), (1,), (np.uint64(us * 1000),), stream=self.stream)

    def gather(self, dst: cupy.ndarray, src: cupy.ndarray, idx: cupy.ndarray) -> None:
        """``dst[j] = src[idx[j]]`` for rows of bytes a multiple of 4."""
        row = src.nbytes // max(1, src.shape[0])
        word = 16 if row % 16 == 0 else 4
        n = dst.shape[0] * (row // word)
        self._gather[word](self._grid(n), (THREADS,),
                           (dst, src, idx, np.int64(dst.shape[0]), np.int64(row // word)),
                           stream=self.stream)

    def combine_sum(self, out: cupy.ndarray, back: cupy.ndarray, slot: cupy.ndarray) -> None:
        """``out`` bf16 bits ``[T, H]``: per token the fp32 sum of its rows of ``back``."""
        tokens, ep = slot.shape
        vecs = out.nbytes // max(1, tokens) // 16
        self._sum(self._grid(tokens * vecs), (THREADS,),
                  (out, back, slot, np.int64(tokens), np.int64(ep), np.int64(vecs)),
                  stream=self.stream)


# ---------------------------------------------------------------------- one configuration
class Case:
    """One (routing, T) on this rank: inputs, expected combine, both paths' callables."""

    def __init__(self, args, kind: str, T: int, group, a2a: MoeAlltoAll, nccl, kernels, stream):
        ep, rank = a2a.ep_size, a2a.ep_rank
        self.a2a, self.nccl, self.k, self.stream, self.T = a2a, nccl, kernels, stream, T
        self.H, self.rank, self.per_rank = args.hidden, rank, a2a.experts_per_rank
        kind_index = ROUTINGS.index(kind)
        rng = np.random.default_rng([args.seed, rank, T, kind_index])
        ids = make_routing(kind, T, args.experts, args.top_k, ep, args.hot, rng)
        self.plan = Plan(ids, args.experts, ep, rank)
        matrix = np.array(group.allgather(self.plan.send_counts.tolist()))  # [source, target]
        self.remote_rows = [int(matrix[s].sum() - matrix[s, s]) for s in range(ep)]
        self.recv_counts = matrix[:, rank]
        H, k = self.H, args.top_k
        rs = cupy.random.RandomState(args.seed * 1000003 + rank * 7919 + T * 2 + kind_index)
        self.hidden = _small_int_bf16((T, H), rs)
        self.ids = cupy.asarray(ids)
        self.payloads = [_bf16(self.hidden)]
        if not args.no_extra_payloads:
            self.scales = rs.random_sample((T, k), dtype=np.float32)
            self.payloads += [self.ids, self.scales]
        self.row_bytes = sum(p.nbytes for p in self.payloads) // T
        f = (self.hidden.astype(np.uint32) << 16).view(np.float32)
        targets = cupy.asarray(self.plan.targets).astype(np.float32)[:, None]
        self.expected = ((f * targets).view(np.uint32) >> 16).astype(np.uint16)
        self.out = cupy.empty((T, H), np.uint16)
        if nccl is not None:
            self._nccl_buffers(ep, k)

    # -- MoeAlltoAll ----------------------------------------------------------------
    def dispatch(self):
        return self.a2a.dispatch(self.ids, self.payloads, self.T, stream=self.stream)

    def combine(self):
        comb = self.a2a.get_combine_payload_tensor_in_workspace(self.T, self.H, bfloat16)
        return self.a2a.combine(comb, self.T, payload_in_workspace=True, stream=self.stream,
                                out=_bf16(self.out))

    def pair(self):
        self.dispatch()
        self.combine()

    # -- EPAllToAll (compact expert-major layer) at the same routing -----------------
    def compact_pair(self, layer):
        """dispatch(x, ids, weights) + combine of the workspace-backed expert outputs."""
        if not hasattr(self, "_compact_out"):
            self._compact_out = cupy.empty((self.T, self.H), bfloat16)
        weights = getattr(self, "scales", None)
        _, _, layout = layer.dispatch(self.payloads[0], self.ids, weights, stream=self.stream,
                                      runtime_max_tokens_per_rank=self.T)
        layer.combine(layer.get_combine_input_tensor_in_workspace(), layout, stream=self.stream,
                      out=self._compact_out)

    def check(self) -> list[str]:
        """One validated pair; what is wrong on this rank."""
        bad = []
        self.out.fill(0xFFFF)
        recv = self.dispatch()
        comb = self.a2a.get_combine_payload_tensor_in_workspace(self.T, self.H, bfloat16)
        _u16(comb)[...] = _u16(recv[0])  # expert output = the received hidden row
        self.stream.synchronize()
        counts = self.a2a.recv_counts.get()
        if not np.array_equal(counts, self.recv_counts):
            bad.append(f"recv_counts {counts.tolist()} != {self.recv_counts.tolist()}")
        elif len(recv) > 1 and not all(_owns_expert(recv[1][s, :c], self.rank, self.per_rank)
                                       for s, c in enumerate(counts)):
            bad.append("a received id row holds none of this rank's experts")
        self.combine()
        if not bool((self.out == self.expected).all()):
            bad.append("combine of the dispatched rows != hidden x distinct targets")
        self.a2a.check_error(self.stream, synchronize=True)
        return bad

    # -- NCCL -----------------------------------------------------------------------
    def _nccl_buffers(self, ep: int, k: int) -> None:
        T, H, words = self.T, self.H, self.row_bytes // 4
        self.tok = cupy.empty((T, words), np.uint32)  # payloads side by side per token
        self.tok[:, :H // 2] = self.hidden.view(np.uint32)
        if len(self.payloads) > 1:
            self.tok[:, H // 2:H // 2 + k] = self.ids.view(np.uint32)
            self.tok[:, H // 2 + k:] = self.scales.view(np.uint32)
        self.send_counts = [int(c) for c in self.plan.send_counts]
        self.recv_list = [int(c) for c in self.recv_counts]
        self.pack_idx = cupy.asarray(self.plan.pack_idx)
        self.slot = cupy.asarray(self.plan.slot)
        self.send = cupy.empty((sum(self.send_counts), words), np.uint32)
        self.recv = cupy.empty((sum(self.recv_list), words), np.uint32)
        # At least one row: all_to_all_v takes the row size from x's first row.
        self.expert_out = cupy.zeros((max(1, sum(self.recv_list)), H // 2), np.uint32)
        self.back = cupy.empty((sum(self.send_counts), H // 2), np.uint32)

    def nccl_dispatch(self):
        self.k.gather(self.send, self.tok, self.pack_idx)
        self.nccl.all_to_all_v(self.send, self.send_counts, self.recv_list, out=self.recv,
                               stream=self.stream)

    def nccl_combine(self):
        self.nccl.all_to_all_v(self.expert_out, self.recv_list, self.send_counts,
                               out=self.back, stream=self.stream)
        self.k.combine_sum(self.out, self.back, self.slot)

    def nccl_pair(self):
        self.nccl_dispatch()
        self.nccl_combine()

    def nccl_check(self) -> list[str]:
        bad = []
        self.out.fill(0xFFFF)
        self.nccl_dispatch()
        H, k = self.H, self.a2a.top_k
        self.expert_out[:self.recv.shape[0]] = self.recv[:, :H // 2]
        if len(self.payloads) > 1:
            ids = cupy.ascontiguousarray(self.recv[:, H // 2:H // 2 + k]).view(np.int32)
            if not _owns_expert(ids, self.rank, self.per_rank):
                bad.append("nccl: a received id row holds none of this rank's experts")
        self.nccl_combine()
        if not bool((self.out == self.expected).all()):
            bad.append("nccl: combine of the dispatched rows != hidden x distinct targets")
        return bad


def _validate(group, bad: list[str], what: str) -> None:
    """Raise on every rank if any rank found a problem."""
    everyone = group.allgather(bad)
    problems = [f"rank {r}: {p}" for r, b in enumerate(everyone) for p in b]
    if problems:
        raise RuntimeError(f"moe bench {what}: wrong results, not timing them:\n"
                           + "\n".join(problems))


# ---------------------------------------------------------------------- extra sections
def _sms_sweep(args, group, kernels, stream, calls: int) -> list[dict]:
    """Bandwidth of the dispatch+combine pair against the SM budget (see the module doc)."""
    T, rows = args.sweep_tokens, []
    for text in args.sms.split(","):
        n = None if text.strip() == "all" else int(text)
        config = MoeAlltoAllConfig(num_sms=n)
        with MoeAlltoAll(group, T, args.top_k, args.experts, hidden_size=args.hidden,
                         config=config) as a2a:
            case = Case(args, "uniform", T, group, a2a, None, kernels, stream)
            _validate(group, case.check(), f"num_sms={n}")
            group.barrier()
            us = graph_median_us(case.pair, calls=calls, iters=args.iters, stream=stream)
            a2a.check_error(stream, synchronize=True)
            us = max(group.allgather(us))
            mean_bytes = float(np.mean(case.remote_rows)) * (case.row_bytes + 2 * args.hidden)
            rows.append({"num_sms": a2a.num_sms, "all": n is None,
                         "tokens": T, "graph_us": us, "GBps": mean_bytes / (us * 1e-6) / 1e9})
            del case
    best = max(r["GBps"] for r in rows)
    for r in rows:  # one rank moves no remote rows: no bandwidth to compare
        r["of_best"] = r["GBps"] / best if best > 0 else None
    return rows


def _fp8_dispatch(args, group, a2a, kernels, stream) -> dict:
    """Eager dispatch time, bf16 hidden rows vs Fp8Dispatch (see the module doc)."""
    T = min(args.sweep_tokens, a2a.max_num_tokens)
    case = Case(args, "uniform", T, group, a2a, None, kernels, stream)
    _validate(group, case.check(), "fp8 dispatch (bf16 pass)")
    quant = Fp8Dispatch()

    def fp8_dispatch():
        a2a.dispatch(case.ids, case.payloads, T, stream=stream, quantize=quant)

    times = {}
    group.barrier()
    times["bf16_dispatch_us"] = _eager_us(case.dispatch, case.combine, kernels.spin, stream,
                                          args.iters)[0]
    group.barrier()
    times["fp8_dispatch_us"] = _eager_us(fp8_dispatch, case.combine, kernels.spin, stream,
                                         args.iters)[0]
    a2a.check_error(stream, synchronize=True)
    slowest = {key: max(t[key] for t in group.allgather(times)) for key in times}
    return {"tokens": T, **slowest,
            "speedup": slowest["bf16_dispatch_us"] / slowest["fp8_dispatch_us"]}


def _wall_batch(fn, group, calls: int, spin) -> tuple[float, float]:
    """One batch of the host-cost measurement, microseconds per ``fn()``: (wall of
    ``calls`` back-to-back calls and one synchronisation, host enqueue time per call of
    ``HOST_CALLS`` calls issued while the GPU runs a long spin kernel, so that no launch
    waits for the GPU)."""
    import time

    wall = batch_wall_us(fn, calls, group.barrier)
    group.barrier()
    spin(HOST_SPIN_US)
    t0 = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    host = (time.perf_counter() - t0) / HOST_CALLS * 1e6
    cupy.cuda.runtime.deviceSynchronize()
    return wall, host


def _host_cost(args, group, a2a, layers: dict, kernels, stream) -> list[dict]:
    """Eager wall time per dispatch+combine pair as a user calls it (see the module doc);
    ``layers``: the compact layers to time too, by the name their rows carry."""
    T = min(args.host_tokens, a2a.max_num_tokens)
    case = Case(args, "uniform", T, group, a2a, None, kernels, stream)
    _validate(group, case.check(), "host cost")
    H = args.hidden
    out = _bf16(case.out)

    def pair(ids, payloads, out, stream=None):
        a2a.dispatch(ids, payloads, T, stream=stream)
        comb = a2a.get_combine_payload_tensor_in_workspace(T, H, bfloat16)
        a2a.combine(comb, T, payload_in_workspace=True, stream=stream, out=out)

    op = "MoeAlltoAll"
    ways = [(op, "cupy", "omitted", lambda: pair(case.ids, case.payloads, out)),
            (op, "cupy", "cupy Stream", lambda: pair(case.ids, case.payloads, out, stream)),
            (op, "cupy", "raw handle", lambda: pair(case.ids, case.payloads, out, stream.ptr))]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        tids = torch.from_dlpack(case.ids)
        tpay = [torch.from_dlpack(p) for p in case.payloads]
        tout = torch.from_dlpack(out)
        ts = torch.cuda.ExternalStream(stream.ptr)
        ways += [(op, "torch", "omitted", lambda: pair(tids, tpay, tout)),
                 (op, "torch", "torch Stream", lambda: pair(tids, tpay, tout, ts)),
                 (op, "torch", "raw handle", lambda: pair(tids, tpay, tout, ts.cuda_stream))]
    ways += [(name, "cupy", "cupy Stream", functools.partial(case.compact_pair, layer))
             for name, layer in layers.items()]

    def scope(framework):  # torch code runs on its current stream, the same stream
        return torch.cuda.stream(ts) if framework == "torch" else contextlib.nullcontext()

    def warm(fn):
        for _ in range(EAGER_WARMUP):
            fn()

    with stream:  # "omitted" runs on CuPy's current stream, this one
        batches = in_turn([w[3] for w in ways], BATCHES,
                          lambda fn: _wall_batch(fn, group, args.host_calls, kernels.spin),
                          warm=warm, scopes=[functools.partial(scope, w[1]) for w in ways])
    rows = []
    for (op, framework, given, _), b in zip(ways, batches):
        walls, hosts = np.array(b).T
        slow = group.allgather((float(np.median(walls)), float(np.median(hosts)),
                                float(walls.min())))
        rows.append({"op": op, "arrays": framework, "stream": given, "tokens": T,
                     "wall_us": max(t[0] for t in slow), "host_us": max(t[1] for t in slow),
                     "best_wall_us": max(t[2] for t in slow)})
    a2a.check_error(stream, synchronize=True)
    return rows


# ---------------------------------------------------------------------- the suite
def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    world = group.size
    exclusive = env["gpu_count"] == world
    tokens = [int(t) for t in args.tokens.split(",")]
    routings = [r.strip() for r in args.routing.split(",")]
    bad = [r for r in routings if r not in ROUTINGS]
    if bad or min(tokens) < 1 or args.hidden % 8 or args.iters < 1:
        raise ValueError(f"moe bench: routing in {ROUTINGS}, tokens >= 1, hidden a multiple "
                         f"of 8, iters >= 1 (got {args.routing!r}, {tokens}, {args.hidden}, "
                         f"{args.iters})")
    if "skewed" in routings and args.experts // world < args.top_k:
        raise ValueError(f"skewed routing needs top_k={args.top_k} <= experts per rank "
                         f"{args.experts // world}")
    calls = 10 if exclusive else 2
    stream = cupy.cuda.Stream(non_blocking=True)
    a2a = MoeAlltoAll(group, max(tokens), args.top_k, args.experts, hidden_size=args.hidden)
    nccl = None
    if exclusive:
        from ..nccl import NcclCommunicator  # cupy's NCCL: only where it is used

        nccl = NcclCommunicator(group)
    kernels = Kernels(stream)
    ep = a2a.ep_size
    compact = compact_local = None
    if not args.no_compact:
        compact = EPAllToAll(group, max(tokens), args.top_k, args.experts, args.hidden,
                             bfloat16)
        compact_local = EPAllToAll(group, max(tokens), args.top_k, args.experts, args.hidden,
                                   bfloat16, local_combine=True)
    rows = []
    with stream:
        for kind in routings:
            for T in tokens:
                case = Case(args, kind, T, group, a2a, nccl, kernels, stream)
                stream.synchronize()
                what = f"{kind}, {T} tokens/rank"
                _validate(group, case.check(), what)
                if nccl is not None:
                    _validate(group, case.nccl_check(), what)
                times = {}
                group.barrier()
                times["graph_us"] = graph_median_us(case.pair, calls=calls, iters=args.iters,
                                                    stream=stream)
                group.barrier()
                times["dispatch_us"], times["combine_us"], times["eager_us"] = _eager_us(
                    case.dispatch, case.combine, kernels.spin, stream, args.iters)
                if nccl is not None:
                    group.barrier()
                    times["nccl_graph_us"] = graph_median_us(case.nccl_pair, calls=calls,
                                                             iters=args.iters, stream=stream)
                    group.barrier()
                    (times["nccl_dispatch_us"], times["nccl_combine_us"],
                     times["nccl_eager_us"]) = _eager_us(case.nccl_dispatch, case.nccl_combine,
                                                         kernels.spin, stream, args.iters)
                if compact is not None:
                    for key, layer in (("compact_graph_us", compact),
                                       ("compact_local_graph_us", compact_local)):
                        group.barrier()
                        times[key] = graph_median_us(
                            functools.partial(case.compact_pair, layer), calls=calls,
                            iters=args.iters, stream=stream)
                        layer.check_error(stream, synchronize=True)
                a2a.check_error(stream, synchronize=True)
                slowest = {key: max(t[key] for t in group.allgather(times)) for key in times}
                remote = float(np.mean(case.remote_rows))
                mean_bytes = remote * (case.row_bytes + 2 * args.hidden)
                row = {"routing": kind, "tokens": T, "remote_rows": remote,
                       "remote_rows_per_rank": case.remote_rows, "MB": mean_bytes / 1e6,
                       **{k: slowest[k] for k in ("dispatch_us", "combine_us", "eager_us",
                                                  "graph_us")},
                       "GBps": mean_bytes / (slowest["graph_us"] * 1e-6) / 1e9}
                if compact is not None:
                    for name in ("compact", "compact_local"):
                        row[f"{name}_graph_us"] = slowest[f"{name}_graph_us"]
                        row[f"{name}_vs_static"] = (slowest[f"{name}_graph_us"]
                                                    / slowest["graph_us"])
                if nccl is not None:
                    row.update({k: slowest[k] for k in ("nccl_dispatch_us", "nccl_combine_us",
                                                        "nccl_eager_us", "nccl_graph_us")})
                    row["nccl_GBps"] = mean_bytes / (slowest["nccl_graph_us"] * 1e-6) / 1e9
                    row["vs_nccl"] = slowest["graph_us"] / slowest["nccl_graph_us"]
                    row["dispatch_vs_nccl"] = slowest["dispatch_us"] / slowest["nccl_dispatch_us"]
                    row["combine_vs_nccl"] = slowest["combine_us"] / slowest["nccl_combine_us"]
                rows.append(row)
                del case
        extras = {}
        if exclusive and not args.no_extras:
            layers = {} if compact is None else {
                "EPAllToAll": compact, "EPAllToAll(local_combine)": compact_local}
            extras["host"] = _host_cost(args, group, a2a, layers, kernels, stream)
            extras["host_speed"] = host_speed(group)
            extras["fp8"] = _fp8_dispatch(args, group, a2a, kernels, stream)
            extras["sms"] = _sms_sweep(args, group, kernels, stream, calls)
    a2a.check_error(stream, synchronize=True)
    a2a.close()
    if compact is not None:
        compact.close()
        compact_local.close()
    if nccl is not None:
        nccl.close()
    if group.rank == 0:
        payloads = "bf16 hidden" + ("" if args.no_extra_payloads else " + int32 ids + fp32 scales")
        print(f"# moe all-to-all: ep={ep} ranks on {env['gpu_count']} x {env['device']}, "
              f"{args.experts} experts, top-{args.top_k}, hidden {args.hidden}, {payloads}"
              + ("" if exclusive else " (ranks share GPUs: timings are not meaningful, no NCCL)"))
        columns = ["routing", "tokens", "remote_rows", "MB", "dispatch_us", "combine_us",
                   "eager_us", "graph_us", "GBps"]
        if compact is not None:
            columns += ["compact_graph_us", "compact_vs_static", "compact_local_vs_static"]
        if exclusive:
            columns += ["nccl_dispatch_us", "nccl_combine_us", "nccl_graph_us", "nccl_GBps",
                        "vs_nccl"]
        print_table(rows, columns)
        setup = {"ep": ep, "experts": args.experts, "top_k": args.top_k, "hidden": args.hidden,
                 "payloads": payloads, "hot_fraction": args.hot, "hot_rank": 0,
                 "seed": args.seed, "iters": args.iters, "graph_calls": calls,
                 "eager_spin_us": SPIN_US, "combine": "zero-copy (payload_in_workspace)"}
        if extras:
            print("# num_sms sweep (graph-replayed pairs)")
            print_table(extras["sms"], ["num_sms", "tokens", "graph_us", "GBps", "of_best"])
            f = extras["fp8"]
            print(f"# fp8 dispatch at {f['tokens']} tokens: bf16 {f['bf16_dispatch_us']:.1f} us, "
                  f"fp8 {f['fp8_dispatch_us']:.1f} us, {f['speedup']:.2f}x")
            print("# eager cost per dispatch+combine pair (wall over back-to-back pairs)")
            print_table(extras["host"], ["op", "arrays", "stream", "tokens", "wall_us",
                                         "best_wall_us", "host_us"])
            print("# host speed per rank (bench.common.host_speed)")
            print_table(extras["host_speed"], ["rank", "launch_us", "alloc_us"])
        setup.update(sms_sweep_tokens=args.sweep_tokens, host_tokens=args.host_tokens,
                     host_calls=args.host_calls)
        path = write_result(args.out, "moe", env, rows, setup=setup, shared_gpu=not exclusive,
                            **extras)
        print(f"wrote {path}")
        if args.plot:
            _plot(rows, path.with_suffix(".png"), env, ep)
    group.close()
    return 0


def _plot(rows, path, env, ep) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (lat, bw) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in sorted({r["routing"] for r in rows}):
        pts = [r for r in rows if r["routing"] == kind]
        x = [r["tokens"] for r in pts]
        for prefix, name in (("", "MoeAlltoAll"), ("nccl_", "NCCL a2a-v")):
            if pts[0].get(prefix + "graph_us") is None:
                continue
            style = "-" if not prefix else "--"
            lat.plot(x, [r[prefix + "graph_us"] for r in pts], style, marker="o",
                     label=f"{name}, {kind}")
            bw.plot(x, [r[prefix + "GBps"] for r in pts], style, marker="o",
                    label=f"{name}, {kind}")
    for ax, label in ((lat, "dispatch + combine (us, graph)"), (bw, "effective GB/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    lat.set_yscale("log")
    fig.suptitle(f"MoE all-to-all, ep={ep}, {env['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
