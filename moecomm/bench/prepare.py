"""Prepare/finalize and its v-collectives against NCCL, graph-replayed.

Part 1, per message size (bytes per rank): IPC ``all_gatherv`` (one uint8 tensor, even
sizes) against NCCL's ``all_gather`` of the same bytes, and IPC ``reduce_scatterv`` (bf16,
each rank keeps its size) against NCCL's ``reduce_scatter``: median time per call
(eager and graph-replayed), bus bandwidth ``(n-1)/n * total bytes / time`` (total: the
gathered output, the reduce-scatter input), and the ratio to NCCL's graph time. ``ipc``
is the default configuration (its row names the kernel the byte model picked); up to
``_FORCED_MAX`` bytes per rank, ``ipc_lamport`` and ``ipc_pipelined`` force each kernel,
the data to place the crossover (``VCollectiveConfig.lamport_max_bytes``) by.

Part 2, the full prepare + finalize of one MoE layer (default hidden 7168, top-8 of 256,
NVFP4 when ``moecomm.quant`` is present, else bf16) at 128 and 4096 tokens per rank: the
all-gather-v path and the all-to-all-v path over CUDA IPC, each against the same flow from
NCCL collectives (the same classes over a group cut into one-rank nodes: NCCL all-gather-v,
grouped send/recv + rank-order sum), and the all-gather path also against NCCL's native
``all_gather_v`` + ``reduce_scatter_v``. The expert computation is left out (a fixed
expert output). NCCL needs one rank per GPU: where ranks share a GPU its rows are left
out.
"""

from __future__ import annotations

import cupy
import numpy as np

from ..collectives import VCollectiveConfig, VCollectiveWorkspace
from ..layouts import compute_fp4_swizzled_layout_sf_size
from ..tensors import bfloat16
from .common import (environment, graph_median_us, median_us, print_table, require_gpu,
                     write_result)

SIZES = [8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
TOKENS = [128, 4096]
_FORCED_MAX = 4 << 20  # bytes per rank up to which both IPC kernels are timed as well


def add_arguments(p) -> None:
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                   help="bytes per rank, comma-separated")
    p.add_argument("--tokens", default=",".join(str(t) for t in TOKENS),
                   help="tokens per rank of the prepare/finalize flows")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--quant", choices=("auto", "nvfp4", "none"), default="auto",
                   help="auto: NVFP4 when moecomm.quant is present")
    p.add_argument("--iters", type=int, default=50)


def _zeros_bf16(shape) -> cupy.ndarray:
    return cupy.ndarray(shape, bfloat16, cupy.zeros(shape, np.uint16).data)


def _time(group, fn, stream, iters):
    group.barrier()
    eager = median_us(fn, iters=iters, stream=stream)
    group.barrier()
    graph = graph_median_us(fn, iters=max(5, iters // 5), stream=stream)
    return tuple(max(v) for v in zip(*group.allgather((eager, graph))))


def _collectives(group, sizes, exclusive, stream, iters) -> list[dict]:
    world = group.size
    big = max(sizes)
    ws = VCollectiveWorkspace(group, world * big)  # the gathered bytes = the scattered input
    small = min(big, _FORCED_MAX)
    forced = {"ipc_lamport": VCollectiveWorkspace(group, world * small, config=VCollectiveConfig(
                  lamport_max_bytes=1 << 30)),
              "ipc_pipelined": VCollectiveWorkspace(group, world * small, config=VCollectiveConfig(
                  lamport_max_bytes=0))}
    nccl = None
    if exclusive:
        from ..nccl import NcclCommunicator

        nccl = NcclCommunicator(group)
    rows = []
    for size in sizes:
        n_iters = iters if size <= (16 << 20) else max(10, iters // 5)
        x = cupy.random.randint(0, 255, size, dtype=np.uint8).reshape(1, size)
        counts = [1] * world
        out = cupy.empty((world, size), np.uint8)
        spaces = {"ipc": ws, **(forced if size <= _FORCED_MAX else {})}
        cases = {impl: (lambda w=w: w.all_gatherv([x], counts, outs=[out], stream=stream))
                 for impl, w in spaces.items()}
        if nccl is not None:
            cases["nccl"] = lambda: nccl.all_gather(x[0], out=out, stream=stream)
        for impl, fn in cases.items():
            eager, graph = _time(group, fn, stream, n_iters)
            path = spaces[impl].gather_path(counts, [size]) if impl in spaces else None
            rows.append({"op": "all_gatherv", "bytes": size, "impl": impl, "path": path,
                         "eager_us": eager, "graph_us": graph,
                         "busbw_GBps": (world - 1) / world * world * size / (graph * 1e-6) / 1e9})
        elems = size // 2
        y = cupy.random.standard_normal(world * elems, dtype=np.float32).astype(bfloat16)
        y2 = y.reshape(world, elems)
        r_out = cupy.empty(elems, bfloat16)
        cases = {impl: (lambda w=w: w.reduce_scatterv(y2, counts, out=r_out.reshape(1, elems),
                                                      stream=stream))
                 for impl, w in spaces.items()}
        if nccl is not None:
            cases["nccl"] = lambda: nccl.reduce_scatter(y2, out=r_out, stream=stream)
        for impl, fn in cases.items():
            eager, graph = _time(group, fn, stream, n_iters)
            path = spaces[impl].scatter_path(counts, 2 * elems) if impl in spaces else None
            rows.append({"op": "reduce_scatterv", "bytes": size, "impl": impl, "path": path,
                         "eager_us": eager, "graph_us": graph,
                         "busbw_GBps": (world - 1) / world * world * size / (graph * 1e-6) / 1e9})
        del x, out, y, y2, r_out
    ws.check(stream)
    _ratios(rows, ("op", "bytes"))
    ws.close()
    for w in forced.values():
        w.check(stream)
        w.close()
    if nccl is not None:
        nccl.close()
    return rows


def _ratios(rows, key) -> None:
    for row in rows:
        base = next((r["graph_us"] for r in rows if r["impl"] == "nccl"
                     and all(r[k] == row[k] for k in key)), None)
        row["vs_nccl"] = row["graph_us"] / base if base else None


def _flow_rows(group, args, exclusive, stream, quant) -> list[dict]:
    from ..moe.prepare_finalize import (FlashInferAllGatherMoEPrepareAndFinalize,
                                        FlashInferAllToAllMoEPrepareAndFinalize,
                                        FusedMoEQuantConfig)
    from ..group import ProcessGroup

    H, k, E = args.hidden, args.top_k, args.experts
    tokens = [int(t) for t in args.tokens.split(",")]
    max_t = max(tokens)
    world = group.size
    nccl_group = ProcessGroup(gpus_per_node=1) if exclusive else None
    groups = {"ipc": group, **({"nccl": nccl_group} if nccl_group is not None else {})}
    qc = FusedMoEQuantConfig(quant, a1_gscale=cupy.full(1, 64.0, np.float32)
                             if quant == "nvfp4" else None)
    rows = []
    native = None
    if exclusive:
        from ..nccl import NcclCommunicator

        native = NcclCommunicator(group)
    for path in ("allgather", "alltoall"):
        for impl, g in groups.items():
            if path == "allgather":
                pf = FlashInferAllGatherMoEPrepareAndFinalize(True, group=g, max_num_tokens=max_t,
                                                              top_k=k, hidden_size=H)
            else:
                pf = FlashInferAllToAllMoEPrepareAndFinalize(True, group=g, max_num_tokens=max_t,
                                                             top_k=k, num_experts=E,
                                                             hidden_size=H)
            for T in tokens:
                rng = cupy.random.default_rng(T)
                a1 = rng.standard_normal((T, H), dtype=np.float32).astype(bfloat16)
                ids = rng.integers(0, E, (T, k)).astype(np.int32)
                w = rng.random((T, k), dtype=np.float32)
                sizes = [T] * world
                rows_out = world * T
                fused = _zeros_bf16((rows_out, H))
                out = cupy.empty((T, H), bfloat16)

                def flow():
                    pf.prepare(a1, w, ids, E, None, False, qc, sizes=sizes, stream=stream)
                    pf.finalize(out, fused, w, ids, False, stream=stream)

                eager, graph = _time(group, flow, stream, args.iters)
                rows.append({"flow": path, "tokens": T, "impl": impl, "eager_us": eager,
                             "graph_us": graph})
            pf.close()
    if native is not None:
        rows += _native_allgather(group, native, args, tokens, stream, qc, quant)
        native.close()
    for row in rows:
        base = next((r["graph_us"] for r in rows if r["flow"] == row["flow"]
                     and r["tokens"] == row["tokens"] and r["impl"] == "nccl"), None)
        row["vs_nccl_flow"] = row["graph_us"] / base if base else None
        nat = next((r["graph_us"] for r in rows if r["flow"] == "allgather"
                    and r["tokens"] == row["tokens"] and r["impl"] == "nccl_native"), None)
        row["vs_nccl_native_allgather"] = row["graph_us"] / nat if nat else None
    if nccl_group is not None:
        nccl_group.close()
    return rows


def _native_allgather(group, nccl, args, tokens, stream, qc, quant) -> list[dict]:
    """quantize + NCCL all_gather_v of the four tensors + interleave, NCCL's own
    reduce_scatter_v back: the all-gather flow from NCCL's collectives."""
    H, k, E = args.hidden, args.top_k, args.experts
    world = group.size
    rows = []
    for T in tokens:
        rng = cupy.random.default_rng(T)  # the inputs of the flows it is compared with
        a1 = rng.standard_normal((T, H), dtype=np.float32).astype(bfloat16)
        ids = rng.integers(0, E, (T, k)).astype(np.int32)
        w = rng.random((T, k), dtype=np.float32)
        counts = [T] * world
        fused = _zeros_bf16((world * T, H))
        out = cupy.empty((T, H), bfloat16)
        if quant == "nvfp4":
            from .. import quant as q

            a1q = cupy.empty((T, H // 2), np.uint8)
            sf = cupy.empty((T, H // 16), np.uint8)
            tensors = [w, ids, a1q, sf]
            swizzled = cupy.empty(compute_fp4_swizzled_layout_sf_size(world * T, H // 16),
                                  np.uint8)
        else:
            tensors = [w, ids, a1]
        outs = [cupy.empty((world * T, *t.shape[1:]), t.dtype) for t in tensors]

        def flow():
            if quant == "nvfp4":
                q.quantize(a1, "nvfp4", scale=qc.a1_gscale, is_fp4_scale_swizzled=False,
                           out=a1q, scale_out=sf, stream=stream)
            nccl.all_gather_v_list(tensors, counts, outs=outs, stream=stream)
            if quant == "nvfp4":
                q.nvfp4_block_scale_interleave(outs[3], out=swizzled, stream=stream)
            nccl.reduce_scatter_v(fused, counts, out=out, stream=stream)

        eager, graph = _time(group, flow, stream, args.iters)
        rows.append({"flow": "allgather", "tokens": T, "impl": "nccl_native", "eager_us": eager,
                     "graph_us": graph})
    return rows


def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    exclusive = env["gpu_count"] == group.size
    stream = cupy.cuda.Stream(non_blocking=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    quant = None if args.quant == "none" else "nvfp4"
    if args.quant == "auto":
        try:
            from .. import quant as _  # noqa: F401
        except ImportError:
            quant = None
    coll = _collectives(group, sizes, exclusive, stream, args.iters)
    flows = _flow_rows(group, args, exclusive, stream, quant)
    if group.rank == 0:
        print(f"# v-collectives: {group.size} ranks on {env['gpu_count']} x {env['device']}"
              + ("" if exclusive else " (ranks share GPUs: timings are not meaningful, no NCCL)"))
        print_table(coll, ["op", "bytes", "impl", "path", "eager_us", "graph_us", "busbw_GBps",
                           "vs_nccl"])
        print(f"# prepare + finalize: hidden {args.hidden}, top-{args.top_k} of "
              f"{args.experts}, {quant or 'bf16'} activations")
        print_table(flows, ["flow", "tokens", "impl", "eager_us", "graph_us", "vs_nccl_flow",
                            "vs_nccl_native_allgather"])
        path = write_result(args.out, "prepare", env, coll + flows, quant=quant or "none",
                            hidden=args.hidden, top_k=args.top_k, experts=args.experts,
                            shared_gpu=not exclusive)
        print(f"wrote {path}")
    group.close()
    return 0

