"""Mixed TP/DP communication and the vLLM-style all-reduce, each against NCCL doing the job.

Mixed: for each layout of the ranks (``tp``: TP = world; ``dp``: DP = world; ``tp2dp2`` at
4 ranks), each ``MixedCommOp`` and each token count (rows of ``hidden`` bf16 per rank; the
reduce-scatter ops take ``dp_size`` times the rows), the median time per call of
``run_mixed_comm`` in each mode (FUSED, NCCL_ONE, NCCL_TP_DP), graph-replayed (10 calls
captured) and eager, next to ``nccl_flow``: NCCL's own collectives doing the same job
(all-reduce over TP, all-gather / reduce-scatter over DP, in sequence; not bitwise equal
to the other modes: NCCL picks its reduction order); ``vs_nccl`` = graph time / nccl_flow's.

vLLM all-reduce: ``CustomAllReduce`` through the staging buffer (eager and graph), from
graph inputs registered after capture (replay only), and NCCL's all-reduce, per size.
NCCL needs one rank per GPU; where ranks share a GPU its rows are left out.
"""

from __future__ import annotations

import cupy
import numpy as np

from ..mixed import MixedCommHandler, MixedCommMode, MixedCommOp, run_mixed_comm
from ..symmetric import SymmetricBuffer
from ..tensors import bfloat16
from ..vllm_ar import CustomAllReduce
from .common import environment, graph_median_us, median_us, print_table, require_gpu, write_result

TOKENS = [1, 8, 32, 128, 512]
AR_SIZES = [8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
_RS = (MixedCommOp.REDUCESCATTER, MixedCommOp.REDUCESCATTER_ALLREDUCE)


def add_arguments(p) -> None:
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="rows per rank")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ar-sizes", default=",".join(map(str, AR_SIZES)),
                   help="vLLM all-reduce message bytes, comma-separated")
    p.add_argument("--iters", type=int, default=50)


def _layouts(world: int) -> dict:
    out = {"tp": {"tp_size": world}, "dp": {"dp_size": world}}
    if world == 4:
        out["tp2dp2"] = {"tp_size": 2, "dp_size": 2}
    return out


def _nccl_flow(h: MixedCommHandler, op: MixedCommOp, x, out, tmp, stream):
    """NCCL's collectives doing ``op``'s job (the baseline)."""
    _, tp, dp = h.nccl(stream)
    rows = x.shape[0]
    if op == MixedCommOp.ALLREDUCE:
        tp.all_reduce(x, out, stream=stream)
    elif op == MixedCommOp.ALLGATHER:
        dp.all_gather(x, out.reshape(dp.size, *x.shape), stream=stream)
    elif op == MixedCommOp.REDUCESCATTER:
        dp.reduce_scatter(x.reshape(dp.size, rows // dp.size, -1), out, stream=stream)
    elif op == MixedCommOp.ALLREDUCE_ALLGATHER:
        tp.all_reduce(x, tmp, stream=stream)
        dp.all_gather(tmp, out.reshape(dp.size, *x.shape), stream=stream)
    else:
        dp.reduce_scatter(x.reshape(dp.size, rows // dp.size, -1), out, stream=stream)
        tp.all_reduce(out, out, stream=stream)


def _time(group, call, iters, stream, graph_only=False):
    group.barrier()
    eager = None if graph_only else median_us(call, iters=iters, stream=stream)
    group.barrier()
    graph = graph_median_us(call, iters=max(5, iters // 5), stream=stream)
    values = group.allgather((eager or 0.0, graph))
    return (None if graph_only else max(v[0] for v in values)), max(v[1] for v in values)


def _mixed_rows(group, args, exclusive, stream) -> list[dict]:
    tokens = [int(t) for t in args.tokens.split(",")]
    item = np.dtype(bfloat16).itemsize
    rows = []
    for name, sizes in _layouts(group.size).items():
        dp_size = group.size if name == "dp" else (2 if name == "tp2dp2" else 1)
        max_bytes = max(tokens) * args.hidden * item * dp_size
        h = MixedCommHandler(group, max_bytes, bfloat16, **sizes)
        modes = [MixedCommMode.FUSED] if h.fused else []
        if exclusive:
            modes += [MixedCommMode.NCCL_ONE, MixedCommMode.NCCL_TP_DP]
            h.nccl(stream)
        for op in MixedCommOp:
            for t in tokens:
                shape = (t * (dp_size if op in _RS else 1), args.hidden)
                x = cupy.random.standard_normal(shape, dtype=np.float32).astype(bfloat16)
                out = cupy.empty(h.output_shape(op, shape), bfloat16)
                tmp = cupy.empty(shape, bfloat16)
                found = {}
                for mode in modes:
                    def call(mode=mode):
                        run_mixed_comm(op, h, x, out, mode=mode, stream=stream)
                    found[mode.name] = _time(group, call, args.iters, stream)
                    h.check(stream)
                if exclusive:
                    found["nccl_flow"] = _time(
                        group, lambda: _nccl_flow(h, op, x, out, tmp, stream), args.iters, stream)
                base = found.get("nccl_flow", (None, None))[1]
                for mode, (eager, graph) in found.items():
                    rows.append({"layout": name, "op": op.name, "tokens": t,
                                 "bytes": x.nbytes, "mode": mode, "eager_us": eager,
                                 "graph_us": graph, "vs_nccl": graph / base if base else None})
        h.close()
    return rows


def _vllm_rows(group, args, exclusive, stream) -> list[dict]:
    sizes = [int(s) for s in args.ar_sizes.split(",")]
    fa = CustomAllReduce(group, bfloat16)
    buf = SymmetricBuffer(group, max(sizes))
    fa.register_buffer(buf)
    nccl = None
    if exclusive:
        from ..nccl import NcclCommunicator

        nccl = NcclCommunicator(group)
    rows = []
    for size in sizes:
        n = size // 2
        x = cupy.random.standard_normal(n, dtype=np.float32).astype(bfloat16)
        out = cupy.empty_like(x)
        found = {"staging": _time(group, lambda: fa.all_reduce(x, out, buf, stream=stream),
                                  args.iters, stream)}
        # graph inputs registered after capture: replay only
        with stream:
            stream.begin_capture()
            for _ in range(10):
                fa.all_reduce(x, out, stream=stream)
            graph = stream.end_capture()
        fa.register_graph_buffers()
        group.barrier()
        t = median_us(lambda: graph.launch(stream), iters=max(5, args.iters // 5),
                      stream=stream) / 10
        found["graph_registered"] = (None, max(group.allgather(t)))
        if nccl is not None:
            found["nccl"] = _time(group, lambda: nccl.all_reduce(x, out, stream=stream),
                                  args.iters, stream)
        fa.check(stream)
        base = found.get("nccl", (None, None))[1]
        for path, (eager, g) in found.items():
            rows.append({"bytes": size, "path": path, "eager_us": eager, "graph_us": g,
                         "vs_nccl": g / base if base else None})
    if nccl is not None:
        nccl.close()
    fa.close()
    buf.close()
    return rows


def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    exclusive = env["gpu_count"] == group.size
    stream = cupy.cuda.Stream(non_blocking=True)
    mixed = _mixed_rows(group, args, exclusive, stream)
    vllm = _vllm_rows(group, args, exclusive, stream)
    if group.rank == 0:
        note = "" if exclusive else " (ranks share GPUs: timings are not meaningful, no NCCL)"
        print(f"# mixed communication, bf16 hidden {args.hidden}: {group.size} ranks on "
              f"{env['gpu_count']} x {env['device']}{note}")
        print_table(mixed, ["layout", "op", "tokens", "bytes", "mode", "eager_us", "graph_us",
                            "vs_nccl"])
        print("# vLLM-style all-reduce, bf16")
        print_table(vllm, ["bytes", "path", "eager_us", "graph_us", "vs_nccl"])
        path = write_result(args.out, "mixed", env, mixed, vllm_allreduce=vllm,
                            hidden=args.hidden, shared_gpu=not exclusive)
        print(f"wrote {path}")
    group.close()
    return 0
