"""Decode CP all-to-all: DcpAlltoAll (and its LSE combine) vs NCCL all_to_all, same run.

Shapes (defaults; options change them): the CP group is every rank; each rank exchanges
``partial_o [batch, heads, cp, 128]`` bf16 and ``softmax_stats [batch, heads, cp, 2]``
fp32 for batch in ``--batch`` (1 ... 256) and heads in ``--heads`` (32, 64, 128).

Timing (microseconds, medians of CUDA events after warm-up, each figure the slowest
rank's): ``graph_us``, a CUDA graph of ``--calls`` (10) exchanges replayed, per call;
``eager_us``, one call per launch; ``combine_graph_us``, exchange + ``lse_combine`` per
call, graph-replayed. NCCL (one rank per GPU only): ``nccl_graph_us``, one
``NcclCommunicator.all_to_all`` of the same bytes per peer (partial output and stats rows,
``rows * (D * itemsize + S * 4)`` bytes, packed beforehand: NCCL's best case), graph-
replayed; ``vs_nccl`` = ``graph_us / nccl_graph_us``. ``MBps_peer``: the bytes sent to
each peer over ``graph_us``, in MB/s.

Validation before timing: slice p of rank r holds the value ``r * cp + p`` (exact in
bf16); after the exchange slice s must hold ``s * cp + rank`` everywhere, stats likewise.
Where ranks share a GPU the timings are not speed and NCCL is left out.
"""

from __future__ import annotations

import cupy
import numpy as np

from ..dcp import DcpAlltoAll, DcpConfig, lse_combine
from ..op import empty
from ..tensors import bfloat16
from .common import (environment, graph_median_us, median_us, parse_config, print_table,
                     require_gpu, write_result)

BATCH = [1, 8, 32, 64, 128, 256]
HEADS = [32, 64, 128]
DTYPES = {"bf16": bfloat16, "fp16": np.dtype(np.float16)}


def add_arguments(p) -> None:
    p.add_argument("--batch", default=",".join(map(str, BATCH)), help="comma-separated")
    p.add_argument("--heads", default=",".join(map(str, HEADS)), help="comma-separated")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--stats-dim", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=10, help="exchanges per captured graph")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--config", default="", help="DcpConfig fields, e.g. threads=512,pdl=0")


def _slices(shape, dtype, values) -> np.ndarray:
    """A host array of ``shape`` ``[..., cp, n]`` whose slice p holds ``values[p]``, as the
    bits of ``dtype`` (bf16 through ml_dtypes)."""
    a = np.broadcast_to(np.asarray(values, np.float32)[:, None], shape).astype(dtype)
    return np.ascontiguousarray(a).view({2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize])


def _device(bits: np.ndarray, dtype) -> cupy.ndarray:
    d = cupy.asarray(bits)
    return cupy.ndarray(d.shape, dtype, d.data)


def _bits(a: cupy.ndarray) -> np.ndarray:
    return cupy.ndarray(a.shape, {2: np.uint16, 4: np.uint32}[a.itemsize], a.data).get()


def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    exclusive = env["gpu_count"] == group.size
    cp, rank = group.size, group.rank
    dtype = DTYPES[args.dtype]
    d, s = args.head_dim, args.stats_dim
    batches = [int(b) for b in args.batch.split(",")]
    heads = [int(h) for h in args.heads.split(",")]
    config = parse_config(DcpConfig, args.config)
    ws = DcpAlltoAll(group, max_rows=max(batches) * max(heads), head_dim=d, stats_dim=s,
                     dtype=dtype, config=config)
    nccl = None
    if exclusive:
        from ..nccl import NcclCommunicator

        nccl = NcclCommunicator(group)
    stream = cupy.cuda.Stream(non_blocking=True)
    rows_out = []
    for b in batches:
        for h in heads:
            sent = np.arange(cp) + rank * cp          # slice p: rank * cp + p
            received = np.arange(cp) * cp + rank      # slice s: s * cp + rank
            o = _device(_slices((b, h, cp, d), dtype, sent), dtype)
            st = _device(_slices((b, h, cp, s), np.float32, sent), np.dtype(np.float32))
            o_out, st_out = empty(o.shape, dtype), empty(st.shape, np.float32)
            comb, lse = empty((b, h, d), dtype), empty((b, h), np.float32)
            cupy.cuda.runtime.deviceSynchronize()
            ws.alltoall(o, st, out=(o_out, st_out), stream=stream)
            stream.synchronize()
            ok = group.allgather(
                bool(np.array_equal(_bits(o_out), _slices((b, h, cp, d), dtype, received)))
                and bool(np.array_equal(_bits(st_out), _slices((b, h, cp, s), np.float32,
                                                               received))))
            if not all(ok):
                raise RuntimeError(f"batch {b} heads {h}: wrong exchange on ranks "
                                   f"{[r for r, k in enumerate(ok) if not k]}")

            def exchange():
                ws.alltoall(o, st, out=(o_out, st_out), stream=stream)

            def with_combine():
                exchange()
                lse_combine(o_out, st_out, out=comb, lse_out=lse, stream=stream)

            group.barrier()
            eager = median_us(exchange, iters=args.iters, stream=stream)
            group.barrier()
            graph = graph_median_us(exchange, calls=args.calls, iters=max(5, args.iters // 5),
                                    stream=stream)
            group.barrier()
            graph_c = graph_median_us(with_combine, calls=args.calls,
                                      iters=max(5, args.iters // 5), stream=stream)
            ws.check(stream)
            per_peer = b * h * (d * np.dtype(dtype).itemsize + s * 4)
            nccl_graph = None
            if nccl is not None:
                with stream:
                    x = cupy.zeros((cp, per_peer), np.uint8)
                    y = cupy.zeros_like(x)
                group.barrier()
                nccl_graph = graph_median_us(lambda: nccl.all_to_all(x, y, stream=stream),
                                             calls=args.calls, iters=max(5, args.iters // 5),
                                             stream=stream)
            eager, graph, graph_c = (max(v) for v in zip(*group.allgather((eager, graph, graph_c))))
            if nccl_graph is not None:
                nccl_graph = max(group.allgather(nccl_graph))
            rows_out.append({
                "batch": b, "heads": h, "rows": b * h, "bytes_per_peer": per_peer,
                "graph_us": graph, "eager_us": eager, "combine_graph_us": graph_c,
                "nccl_graph_us": nccl_graph,
                "vs_nccl": graph / nccl_graph if nccl_graph else None,
                "MBps_peer": per_peer / graph if graph else None,
            })
    ws.close()
    if nccl is not None:
        nccl.close()
    if rank == 0:
        print(f"# DCP all-to-all {args.dtype} D={d} S={s}: {cp} ranks on {env['gpu_count']} x "
              f"{env['device']}" + ("" if exclusive else
                                    " (ranks share GPUs: timings are not meaningful, no NCCL)"))
        print_table(rows_out, ["batch", "heads", "bytes_per_peer", "graph_us", "eager_us",
                               "combine_graph_us", "nccl_graph_us", "vs_nccl"])
        path = write_result(args.out, f"dcp-{args.dtype}", env, rows_out,
                            head_dim=d, stats_dim=s, shared_gpu=not exclusive,
                            config=repr(config))
        print(f"wrote {path}")
    group.close()
    return 0
