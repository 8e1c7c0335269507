"""Peer bandwidth: a kernel reading a peer's SymmetricBuffer vs cudaMemcpyPeer.

Every rank owns a SymmetricBuffer of ``--bytes`` random bytes; local rank r copies the
buffer of local rank r+1 (mod n) into its own memory, either with ``copy_bytes`` (a kernel
dereferencing the peer pointer: the path every moecomm op uses) or with
``cudaMemcpyPeerAsync`` (the copy engines). ``one``: only local rank 0 copies;
``all``: every rank at once. GB/s = bytes copied / median time (bytes read once).
When ranks share a GPU the "peer" is the same device and this measures a local copy.
"""

from __future__ import annotations

import cupy
import numpy as np

from ..kernels import get_kernel
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
    kernel = get_kernel("symmetric.cu", "copy_bytes")
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

        def via_kernel(blocks):
            return lambda: kernel((blocks,), (512,), (np.uint64(src), dst, np.uint64(n)),
                                  stream=stream)

        def via_memcpy():
            cupy.cuda.runtime.memcpyPeerAsync(dst.data.ptr, group.device_id, src, devices[peer],
                                              n, stream.ptr)

        methods = [(f"kernel x{b}/SM", via_kernel(b * sms)) for b in
                   (int(x) for x in args.blocks_per_sm.split(","))] + [("memcpy_peer", via_memcpy)]
        for mode in ("one", "all"):
            for name, fn in methods:
                dst.fill(0)
                group.local_barrier()
                active = mode == "all" or group.local_rank == 0
                us = median_us(fn, iters=args.iters, stream=stream) if active else None
                ok = bool(cupy.array_equal(dst, buf.view(np.uint8, (n,), rank=peer))) if active else True
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
