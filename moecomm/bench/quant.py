"""Standalone quantizers (``moecomm.quant``): time and achieved bandwidth on one GPU.

For each mode and row count (bf16 rows of ``--hidden`` elements): the graph-replayed and
eager time per ``quantize`` call, the bytes it must move (bf16 read + codes + scales
written), that over the graph time in GB/s, and its fractions of two ceilings:
``of_ceiling``, the device memory bandwidth measured in the same run (a 256 MiB
device-to-device copy, bytes read plus written: about 4.2 TB/s on an H200), and
``of_peak``, the datasheet's ``--peak`` (4.8 TB/s by default). ``copy_GBps`` is a copy of
the input's own bytes (the traffic a perfect kernel of that size moves), for the fixed
cost a kernel of that size pays. The calls use programmatic dependent launch (the default);
``nopdl_us`` and ``nopdl_of_ceiling`` are the same graph with ``enable_pdl=False``.
Run it with one rank: ``python -m moecomm.bench quant``.
"""

from __future__ import annotations

import cupy
import numpy as np

from ..layouts import compute_fp4_swizzled_layout_sf_size, ue8m0_mn_major_storage_size
from ..quant import ScaleFormat, nvfp4_block_scale_interleave, quantize
from ..tensors import bfloat16
from .common import (environment, graph_median_us, median_us, print_table, require_gpu,
                     write_result)

MODES = ("nvfp4", "nvfp4_linear", "fp8_static", "fp8_token", "fp8_group", "fp8_group_ue8m0",
         "interleave")


def add_arguments(p) -> None:
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--tokens", default="1,128,1024,4096,16384")
    p.add_argument("--peak", type=float, default=4800.0, help="HBM peak, GB/s")
    p.add_argument("--iters", type=int, default=50)


def _call(mode: str, x, scale, stream, pdl: bool = True):
    """A zero-allocation call of ``mode`` on ``x`` (its outputs made once) and the bytes
    it moves."""
    m, k = x.shape
    read = x.nbytes
    if mode.startswith("nvfp4") or mode == "interleave":
        q = cupy.empty((m, k // 2), np.uint8)
        swizzled = mode != "nvfp4_linear"
        sf = cupy.empty(compute_fp4_swizzled_layout_sf_size(m, k // 16) if swizzled
                        else (m, k // 16), np.uint8)
        if mode == "interleave":
            lin = cupy.zeros((m, k // 16), np.uint8)
            return (lambda: nvfp4_block_scale_interleave(lin, out=sf, stream=stream,
                                                         enable_pdl=pdl),
                    lin.nbytes + sf.nbytes)
        return (lambda: quantize(x, "nvfp4", scale=scale, is_fp4_scale_swizzled=swizzled,
                                 out=q, scale_out=sf, stream=stream, enable_pdl=pdl),
                read + q.nbytes + sf.nbytes)
    q = cupy.empty((m, k), np.uint8)
    if mode == "fp8_static":
        return (lambda: quantize(x, "fp8", scale=scale, out=q, stream=stream, enable_pdl=pdl),
                read + q.nbytes)
    if mode == "fp8_token":
        s = cupy.empty((m, 1), np.float32)
        return (lambda: quantize(x, "fp8", per_act_token_quant=True, out=q, scale_out=s,
                                 stream=stream, enable_pdl=pdl), read + q.nbytes + s.nbytes)
    fmt = ScaleFormat.UE8M0 if mode == "fp8_group_ue8m0" else ScaleFormat.FP32
    s = (cupy.empty(ue8m0_mn_major_storage_size(m, k // 128), np.int32) if fmt == ScaleFormat.UE8M0
         else cupy.empty((m, k // 128), np.float32))
    return (lambda: quantize(x, "fp8", block_shape=[1, 128], scale_format=fmt, out=q,
                             scale_out=s, stream=stream, enable_pdl=pdl),
            read + q.nbytes + s.nbytes)


_CEILING_BYTES = 256 << 20


def _copy_GBps(nbytes: int, iters: int, stream) -> float:
    """Bytes read plus written per second of a graph-replayed device-to-device copy of
    ``nbytes`` bytes, in GB/s."""
    src = cupy.empty(nbytes, np.uint8)
    dst = cupy.empty_like(src)
    us = graph_median_us(lambda: cupy.cuda.runtime.memcpyAsync(
        dst.data.ptr, src.data.ptr, nbytes, cupy.cuda.runtime.memcpyDeviceToDevice, stream.ptr),
        iters=iters, stream=stream)
    return 2 * nbytes / us / 1e3


def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; known: {', '.join(MODES)}")
    stream = cupy.cuda.Stream(non_blocking=True)
    k = args.hidden
    ceiling = _copy_GBps(_CEILING_BYTES, args.iters, stream)
    rows = []
    for m in [int(t) for t in args.tokens.split(",")]:
        x = cupy.random.standard_normal((m, k), np.float32).astype(bfloat16)
        scale = cupy.asarray([448.0 * 6.0 / 4.0], np.float32)
        copy = _copy_GBps(m * k * 2, args.iters, stream)
        for mode in modes:
            fn, nbytes = _call(mode, x, scale, stream)
            graph = graph_median_us(fn, iters=args.iters, stream=stream)
            plain = graph_median_us(_call(mode, x, scale, stream, pdl=False)[0],
                                    iters=args.iters, stream=stream)
            with stream:
                eager = median_us(fn, iters=args.iters, stream=stream)
            gbps = nbytes / graph / 1e3
            rows.append({"mode": mode, "tokens": m, "hidden": k, "bytes": nbytes,
                         "graph_us": graph, "eager_us": eager, "GBps": gbps,
                         "of_ceiling": gbps / ceiling, "of_peak": gbps / args.peak,
                         "copy_GBps": copy, "nopdl_us": plain,
                         "nopdl_of_ceiling": nbytes / plain / 1e3 / ceiling})
    if group.rank == 0:
        print(f"# moecomm.quant, bf16 [tokens, {k}], {env['device']}, ceiling "
              f"{ceiling:.0f} GB/s (256 MiB copy), peak {args.peak:.0f} GB/s")
        print_table(rows, ["mode", "tokens", "graph_us", "eager_us", "GBps", "of_ceiling",
                           "of_peak", "copy_GBps", "nopdl_us", "nopdl_of_ceiling"])
        path = write_result(args.out, "quant", env, rows, peak_GBps=args.peak,
                            ceiling_GBps=ceiling)
        print(f"wrote {path}")
    group.close()
    return 0
