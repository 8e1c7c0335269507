"""Peer bandwidth: a kernel reading or writing a peer's SymmetricBuffer vs cudaMemcpyPeer.

Every rank owns a SymmetricBuffer of ``--bytes`` random bytes; local rank r moves
``--bytes`` between its own memory and the buffer of local rank r+1 (mod n): ``read``, a
kernel (``copy_bytes``) loading through the peer pointer into local memory; ``write``, the
kernel storing local bytes through the peer pointer (the direction a push-based op uses);
``memcpy_peer``, ``cudaMemcpyPeerAsync`` (the copy engines) reading the peer. ``one``: only
local rank 0 copies; ``all``: every rank at once. GB/s = bytes moved / median time. When
ranks share a GPU the "peer" is the same device and this measures a local copy.
"""

from __future__ import annotations

import cupy
import numpy as np

from ..kernel_args import CopyArgs
from ..kernels import get_kernel
from ..launch import Launcher
from ..symmetric import SymmetricBuffer
from .common import environment, median_us, print_table, require_gpu, write_result


def add_arguments(p) -> None:
    p.add_argument("--bytes", type=int, default=256 << 20, help="bytes per copy")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--blocks-per-sm", default="1,2,4", help="grid sizes tried for the kernel")


def run(args) -> int:
    group = require_gpu()
    n = args.bytes
    env = environment(group)
    copy = Launcher(get_kernel("symmetric.cu", "copy_bytes"), CopyArgs)
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    devices = group.local_comm.allgather(group.device_id)
    peer = (group.local_rank + 1) % group.local_size
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    with SymmetricBuffer(group, n) as buf, stream:
        buf.view(np.uint8, (n,))[...] = cupy.random.randint(0, 256, n, dtype=np.uint8)
        cupy.cuda.runtime.deviceSynchronize()
        group.local_barrier()
        dst = cupy.empty(n, np.uint8)
        src = buf.ptrs[peer]

        mine = cupy.random.randint(0, 256, n, dtype=np.uint8)  # what `write` sends

        def via_kernel(blocks, to_peer=False):
            def call():
                a = copy.args
                if to_peer:  # write into the peer's buffer (NVLink stores)
                    a.dst, a.src, a.nbytes = src, mine.data.ptr, n
                else:  # read the peer's buffer (NVLink loads)
                    a.dst, a.src, a.nbytes = dst.data.ptr, src, n
                copy(blocks, 512, stream.ptr)
            return call

        def via_memcpy():
            cupy.cuda.runtime.memcpyPeerAsync(dst.data.ptr, group.device_id, src, devices[peer],
                                              n, stream.ptr)

        per_sm = [int(x) for x in args.blocks_per_sm.split(",")]
        methods = ([(f"read x{b}/SM", via_kernel(b * sms)) for b in per_sm]
                   + [(f"write x{b}/SM", via_kernel(b * sms, True)) for b in per_sm]
                   + [("memcpy_peer", via_memcpy)])
        for mode in ("one", "all"):
            for name, fn in methods:
                dst.fill(0)
                group.local_barrier()
                active = mode == "all" or group.local_rank == 0
                us = median_us(fn, iters=args.iters, stream=stream) if active else None
                cupy.cuda.runtime.deviceSynchronize()
                group.local_barrier()
                moved = mine if name.startswith("write") else dst
                ok = bool(cupy.array_equal(moved, buf.view(np.uint8, (n,), rank=peer))) if active else True
                group.local_barrier()
                results = group.local_comm.allgather((us, ok))
                if not all(r[1] for r in results):
                    raise RuntimeError(f"{name}: copied bytes differ from the peer's buffer")
                times = [r[0] for r in results if r[0] is not None]
                rows.append({"mode": mode, "method": name, "bytes": n,
                             "median_us": max(times),
                             "GB/s": n / (max(times) * 1e-6) / 1e9})
    best_kernel = {m: max(r["GB/s"] for r in rows if r["mode"] == m and r["method"] != "memcpy_peer")
                   for m in ("one", "all")}
    memcpy = {m: next(r["GB/s"] for r in rows if r["mode"] == m and r["method"] == "memcpy_peer")
              for m in ("one", "all")}
    ratio = {m: best_kernel[m] / memcpy[m] for m in ("one", "all")}
    if group.rank == 0:
        print(f"# p2p: {env['ranks']} ranks, {env['gpu_count']} x {env['device']}, {n} bytes")
        print_table(rows, ["mode", "method", "median_us", "GB/s"])
        print("kernel / memcpy_peer: " + ", ".join(f"{m} {r:.3f}" for m, r in ratio.items()))
        path = write_result(args.out, "p2p", env, rows, kernel_over_memcpy=ratio)
        print(f"wrote {path}")
    group.close()
    return 0
