"""All-reduce latency and bus bandwidth: one-shot, two-shot, auto and NCCL, same run.

For each message size: the median time per call of each algorithm, eager (a call per
launch) and graph-replayed (10 calls captured, replayed); bus bandwidth
``2 (n-1)/n * bytes / time``; the ratio to NCCL's graph-replayed time. The host cost of
an eager call (Python + launch, GPU idle) is measured on a small message. NCCL needs one
rank per GPU; where ranks share a GPU its rows are left out.
"""

from __future__ import annotations

import time

import cupy
import numpy as np

from ..allreduce import Algorithm, AllReduceConfig, all_reduce, create_allreduce_workspace
from ..tensors import bfloat16
from .common import (environment, graph_median_us, median_us, parse_config, print_table, pyplot,
                     require_gpu, write_result)

SIZES = [1 << 10, 8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
DTYPES = {"bf16": bfloat16, "fp16": np.float16, "fp32": np.float32}


def add_arguments(p) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="bytes, comma-separated")
    p.add_argument("--max-oneshot", type=int, default=64 << 20,
                   help="Lamport buffer bytes (one-shot is timed up to this size)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--config", default="",
                   help="AllReduceConfig fields, e.g. oneshot_threads=512,pdl=0")
    p.add_argument("--plot", action="store_true", help="write a PNG (needs matplotlib)")


def _host_us(fn, calls: int = 200) -> float:
    """Host time per call with the GPU never the bottleneck (small message)."""
    fn()
    cupy.cuda.get_current_stream().synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        cupy.cuda.get_current_stream().synchronize()
    return best


def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    dtype = DTYPES[args.dtype]
    sizes = [int(s) for s in args.sizes.split(",")]
    world = group.size
    exclusive = env["gpu_count"] == world
    config = parse_config(AllReduceConfig, args.config)
    ws = create_allreduce_workspace(group, max_bytes=max(sizes), dtype=dtype,
                                    max_oneshot_bytes=min(args.max_oneshot, max(sizes)),
                                    config=config)
    algos = [Algorithm.ONESHOT, Algorithm.TWOSHOT, Algorithm.AUTO]
    if exclusive:
        algos.append(Algorithm.NCCL)
        ws.nccl  # create the communicator outside the timed region
    rows = []
    stream = cupy.cuda.Stream(non_blocking=True)
    for size in sizes:
        n = size // np.dtype(dtype).itemsize
        x = cupy.random.standard_normal(n, dtype=np.float32).astype(dtype)
        out = cupy.empty_like(x)
        iters = args.iters if size <= (16 << 20) else max(10, args.iters // 5)
        for algo in algos:
            if algo == Algorithm.ONESHOT and size > ws.max_oneshot_bytes:
                continue
            chosen = ws.choose(size, algo)

            def call(algo=algo):
                all_reduce(x, ws, out=out, algorithm=algo, stream=stream)

            group.barrier()
            eager = median_us(call, iters=iters, stream=stream)
            group.barrier()
            graph = graph_median_us(call, iters=max(5, iters // 5), stream=stream)
            ws.check(stream)
            eager, graph = (max(v) for v in zip(*group.allgather((eager, graph))))
            rows.append({"bytes": size, "algorithm": algo.value, "runs": chosen.value,
                         "eager_us": eager, "graph_us": graph,
                         "busbw_GBps": 2 * (world - 1) / world * size / (graph * 1e-6) / 1e9})
    for row in rows:
        nccl = next((r["graph_us"] for r in rows
                     if r["bytes"] == row["bytes"] and r["algorithm"] == "nccl"), None)
        row["vs_nccl"] = row["graph_us"] / nccl if nccl else None
    small = cupy.ones(4096 // np.dtype(dtype).itemsize, dtype)
    small_out = cupy.empty_like(small)
    group.barrier()
    host = _host_us(lambda: all_reduce(small, ws, out=small_out, stream=stream))
    host = max(group.allgather(host))
    ws.check(stream)
    crossover = {}
    for size in sizes:
        pair = {r["algorithm"]: r["graph_us"] for r in rows if r["bytes"] == size}
        if "oneshot" in pair:
            crossover[size] = "oneshot" if pair["oneshot"] <= pair["twoshot"] else "twoshot"
    ws.close()
    if group.rank == 0:
        print(f"# all_reduce {args.dtype}: {world} ranks on {env['gpu_count']} x {env['device']}"
              + ("" if exclusive else " (ranks share GPUs: timings are not meaningful, no NCCL)"))
        print_table(rows, ["bytes", "algorithm", "runs", "eager_us", "graph_us", "busbw_GBps",
                           "vs_nccl"])
        print(f"host cost of an eager call: {host:.1f} us; faster algorithm by size: {crossover}")
        path = write_result(args.out, f"allreduce-{args.dtype}", env, rows,
                            host_us_per_eager_call=host, faster_by_size=crossover,
                            shared_gpu=not exclusive, config=repr(config))
        print(f"wrote {path}")
        if args.plot:
            _plot(rows, path.with_suffix(".png"), env)
    group.close()
    return 0


def _plot(rows, path, env) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (lat, bw) = plt.subplots(1, 2, figsize=(11, 4))
    for algo in sorted({r["algorithm"] for r in rows}):
        pts = [r for r in rows if r["algorithm"] == algo]
        lat.plot([r["bytes"] for r in pts], [r["graph_us"] for r in pts], marker="o", label=algo)
        bw.plot([r["bytes"] for r in pts], [r["busbw_GBps"] for r in pts], marker="o", label=algo)
    for ax, label in ((lat, "latency (us, graph)"), (bw, "bus bandwidth (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message bytes")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    lat.set_yscale("log")
    fig.suptitle(f"all_reduce, {env['ranks']} ranks, {env['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
