"""Fused all-reduce vs NCCL all-reduce + a separate residual/RMSNorm(/quant) kernel.

For each pattern, hidden size and token count: the graph-replayed time per call of
``allreduce_fusion`` (one-shot, two-shot, and what "auto" picks), of NCCL's all-reduce
alone, and of NCCL's all-reduce followed by ``rmsnorm_fusion`` (the same epilogue as one
local kernel), all in the same run; the ratio fused(auto) / best unfused-or-NCCL-alone.
NCCL needs one rank per GPU: where ranks share a GPU those columns are empty.
"""

from __future__ import annotations

import cupy
import numpy as np

from ..constants import PATTERNS, Quant
from ..constants import AllReduceFusionPattern as P
from ..fusion import (AllReduceFusionOptions, AllReduceFusionOutputs, allreduce_fusion,
                      create_allreduce_fusion_workspace, rmsnorm_fusion)
from ..layouts import compute_fp4_swizzled_layout_sf_size, ue8m0_mn_major_storage_size
from ..tensors import bfloat16
from .common import environment, graph_median_us, print_table, require_gpu, write_result

DEFAULT_PATTERNS = ["kARResidualRMSNorm", "kARResidualRMSNormFP8Quant",
                    "kARResidualRMSNormOutFP8Quant", "kARResidualRMSNormFP4Quant",
                    "kARResidualRMSNormPerTokenGroupFP8PackedQuant",
                    "kARResidualRMSNormDynamicFP8Quant"]


def add_arguments(p) -> None:
    p.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS))
    p.add_argument("--hidden", default="4096,7168")
    p.add_argument("--tokens", default="1,8,32,128,512,2048")
    p.add_argument("--iters", type=int, default=20)


def _outputs(pattern: P, tokens: int, hidden: int) -> AllReduceFusionOutputs:
    outs = AllReduceFusionOutputs()
    spec = PATTERNS[pattern]
    quant = spec.quant
    for f in ("residual_out", "norm_out"):
        if f in spec.outputs:
            setattr(outs, f, cupy.empty((tokens, hidden), bfloat16))
    if quant == Quant.NVFP4:
        outs.quant_out = cupy.empty((tokens, hidden // 2), np.uint8)
        outs.scale_out = cupy.empty(compute_fp4_swizzled_layout_sf_size(tokens, hidden // 16),
                                    np.uint8)
    elif quant != Quant.NONE:
        outs.quant_out = cupy.empty((tokens, hidden), np.uint8)
        if quant == Quant.GROUP_FP8:
            outs.scale_out = cupy.empty(ue8m0_mn_major_storage_size(tokens, hidden // 128),
                                        np.int32)
        elif quant == Quant.DYNAMIC_FP8:
            outs.scale_out = cupy.empty(tokens, np.float32)
    return outs


def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    world = group.size
    exclusive = env["gpu_count"] == world
    patterns = [P[name] for name in args.patterns.split(",")]
    hiddens = [int(h) for h in args.hidden.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    for hidden in hiddens:
        ws = create_allreduce_fusion_workspace(group, max(token_counts), hidden, bfloat16)
        nccl = ws.allreduce.nccl if exclusive else None
        for tokens in token_counts:
            x = (cupy.random.standard_normal((tokens, hidden), np.float32)).astype(bfloat16)
            reduced = cupy.empty_like(x)
            opts = AllReduceFusionOptions(
                residual=cupy.random.standard_normal((tokens, hidden), np.float32).astype(bfloat16),
                rms_gamma=cupy.ones(hidden, bfloat16), scale_factor=cupy.ones(1, np.float32))
            nccl_alone = None
            if nccl is not None:
                nccl_alone = graph_median_us(lambda: nccl.all_reduce(x, reduced, stream=stream),
                                             iters=args.iters, stream=stream)
            for pattern in patterns:
                outs = _outputs(pattern, tokens, hidden)
                times = {}
                for name, one in (("oneshot", True), ("twoshot", False), ("auto", None)):
                    if one and x.nbytes > ws.allreduce.max_oneshot_bytes:
                        continue
                    opts.use_oneshot = one
                    group.barrier()
                    times[name] = graph_median_us(
                        lambda: allreduce_fusion(x, ws, pattern, opts, outs, stream=stream),
                        iters=args.iters, stream=stream)
                opts.use_oneshot = None
                unfused = None
                if nccl is not None:
                    def two_kernels():
                        nccl.all_reduce(x, reduced, stream=stream)
                        rmsnorm_fusion(reduced, pattern, opts, outs, stream=stream)
                    group.barrier()
                    unfused = graph_median_us(two_kernels, iters=args.iters, stream=stream)
                ws.check(stream)
                # every column the slowest rank's, the baselines' too
                *fused, unfused, nccl_alone = (max(v) for v in zip(*group.allgather(
                    [*times.values(), unfused or 0.0, nccl_alone or 0.0])))
                times = dict(zip(times, fused))
                unfused, nccl_alone = (unfused or None), (nccl_alone or None)
                others = [t for t in (unfused, nccl_alone) if t is not None]
                rows.append({
                    "pattern": pattern.name, "hidden": hidden, "tokens": tokens,
                    "oneshot_us": times.get("oneshot"), "twoshot_us": times["twoshot"],
                    "auto_us": times["auto"],
                    "auto_runs": ws.choose(tokens).value,
                    "nccl_plus_norm_us": unfused, "nccl_alone_us": nccl_alone,
                    "vs_best_baseline": times["auto"] / min(others) if others else None,
                })
        ws.close()
    if group.rank == 0:
        print(f"# allreduce_fusion bf16: {world} ranks on {env['gpu_count']} x {env['device']}"
              + ("" if exclusive else " (ranks share GPUs: timings are not meaningful, no NCCL)"))
        print_table(rows, ["pattern", "hidden", "tokens", "oneshot_us", "twoshot_us", "auto_us",
                           "auto_runs", "nccl_plus_norm_us", "nccl_alone_us", "vs_best_baseline"])
        print(f"wrote {write_result(args.out, 'fusion', env, rows, shared_gpu=not exclusive)}")
    group.close()
    return 0
