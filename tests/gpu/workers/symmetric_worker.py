"""SymmetricBuffer end to end on every rank: every byte written by one rank read by all."""

import cupy
import numpy as np
import pytest

import moecomm
from moecomm.kernel_args import CopyArgs, GatherArgs
from moecomm.kernels import get_kernel
from moecomm.launch import Launcher
from moecomm.symmetric import SymmetricBuffer, create_shared_buffer, free_shared_buffer
from tests.gpu.workers.common import main
from tests.mpi import case


def gather_peers(peer_ptrs, out, offset: int, nbytes: int) -> None:
    """out[p * nbytes + i] = byte offset + i of every peer's buffer (gather_peers kernel)."""
    launch = Launcher(get_kernel("symmetric.cu", "gather_peers"), GatherArgs)
    a = launch.args
    a.peer_ptrs, a.out, a.offset, a.nbytes = peer_ptrs.data.ptr, out.data.ptr, offset, nbytes
    a.num_peers = peer_ptrs.size
    launch(64, 256, cupy.cuda.get_current_stream().ptr)


def copy_bytes(dst, src_ptr: int, nbytes: int) -> None:
    """dst[:nbytes] = bytes at src_ptr (copy_bytes kernel)."""
    launch = Launcher(get_kernel("symmetric.cu", "copy_bytes"), CopyArgs)
    launch.args.dst, launch.args.src, launch.args.nbytes = dst.data.ptr, src_ptr, nbytes
    launch(8, 128, cupy.cuda.get_current_stream().ptr)


def rank_bytes(seed: int, r: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, r]).integers(0, 256, size, dtype=np.uint8)


@case(variants={"1": 1, "15": 15, "4097": 4097, "3145733": (3 << 20) + 5})
def buffer(ctx, size):
    """Odd sizes and a large one, two rounds of rewritten data: a kernel reading every peer
    through the pointer table, host views of each peer, a copy from each peer, an
    unaligned sub-range; typed views and their errors; closing."""
    group, rank, n = ctx.group, ctx.group.local_rank, ctx.group.local_size
    with SymmetricBuffer(group, size) as buf:
        assert buf.view(np.uint8, (size,)).get().max() == 0, "buffer is not zero-initialised"
        assert buf.ptrs[rank] == buf.ptr and buf.ptr % 256 == 0
        assert buf.peer_ptrs.get().tolist() == buf.ptrs
        for round_ in range(2):
            seed = ctx.new_seed()
            buf.view(np.uint8, (size,))[...] = cupy.asarray(rank_bytes(seed, rank, size))
            cupy.cuda.runtime.deviceSynchronize()
            group.local_barrier()
            expected = np.concatenate([rank_bytes(seed, r, size) for r in range(n)])
            # (a) a kernel reading every peer through the device pointer table
            out = cupy.full(n * size, 0xAB, np.uint8)
            gather_peers(buf.peer_ptrs, out, 0, size)
            assert np.array_equal(out.get(), expected), f"gather_peers size={size} round={round_}"
            # (b) host views of each peer's memory, and the copy kernel from each peer
            for r in range(n):
                assert np.array_equal(buf.view(np.uint8, (size,), rank=r).get(),
                                      expected[r * size:(r + 1) * size])
                dst = cupy.full(size, 0xCD, np.uint8)
                copy_bytes(dst, buf.ptrs[r], size)
                assert np.array_equal(dst.get(), expected[r * size:(r + 1) * size]), "copy_bytes"
            # (c) an unaligned sub-range through the kernel
            if size > 64:
                out = cupy.full(n * (size - 37), 0xEF, np.uint8)
                gather_peers(buf.peer_ptrs, out, 37, size - 37)
                sub = np.concatenate([rank_bytes(seed, r, size)[37:] for r in range(n)])
                assert np.array_equal(out.get(), sub), "offset gather"
            cupy.cuda.runtime.deviceSynchronize()
            group.local_barrier()  # nobody rewrites before every peer has read
        # typed views
        floats = buf.view(np.float32, (size // 4,))
        assert floats.shape == (size // 4,)
        with pytest.raises(ValueError, match="exceeds"):
            buf.view(np.uint8, (size + 1,))
        with pytest.raises(ValueError, match="multiple of 4"):
            buf.view(np.float32, (1,), offset=2)
        with pytest.raises(ValueError, match="rank"):
            buf.view(np.uint8, (1,), rank=n)
    with pytest.raises(RuntimeError, match="closed"):
        buf.view(np.uint8, (1,))
    buf.close()  # closing twice is harmless


@case
def pointer_list_api(ctx):
    """create_shared_buffer / free_shared_buffer of the reference documents."""
    n = ctx.group.local_size
    ptrs = create_shared_buffer(1 << 16, ctx.group)
    assert len(ptrs) == n and all(p % 256 == 0 for p in ptrs)
    free_shared_buffer(ptrs, ctx.group)
    with pytest.raises(ValueError, match="not a buffer"):
        free_shared_buffer(ptrs, ctx.group)


@case
def bad_input(ctx):
    """Clear errors, raised on every rank, before anything is allocated."""
    with pytest.raises(ValueError, match="nbytes must be > 0"):
        SymmetricBuffer(ctx.group, 0)
    with pytest.raises(ValueError, match="differs across ranks"):
        SymmetricBuffer(ctx.group, 1024 + ctx.rank)


@case
def no_leak(ctx):
    """Repeated create/close returns the device memory."""
    group, n = ctx.group, ctx.group.local_size
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.cuda.runtime.deviceSynchronize()
    group.barrier()
    free_before = cupy.cuda.runtime.memGetInfo()[0]
    for _ in range(5):
        with SymmetricBuffer(group, 64 << 20):
            pass
    cupy.get_default_memory_pool().free_all_blocks()
    group.barrier()
    free_after = cupy.cuda.runtime.memGetInfo()[0]
    # Ranks sharing a GPU see each other's allocations; allow one buffer per rank of slack.
    assert free_before - free_after < n * (64 << 20) // 2, (free_before, free_after)


def _injected(*args, **kwargs):
    raise MemoryError("injected failure")


@case
def construction_fails_on_one_rank(ctx):
    """A local step of a constructor that fails on one rank only (an error word or a
    launcher it cannot make) raises on every rank, that rank its own error and the others
    one naming it, instead of leaving them in a collective; what was made is freed
    collectively and the next construction succeeds."""
    import importlib

    from moecomm.allreduce import create_allreduce_workspace
    from moecomm.barrier import DeviceBarrier
    from moecomm.collectives import VCollectiveWorkspace
    from moecomm.dcp import DcpAlltoAll
    from moecomm.mixed import MixedCommHandler
    from moecomm.moe import EPAllToAll, MoeAlltoAll
    from moecomm.vllm_ar import CustomAllReduce

    g, n = ctx.group, ctx.group.size
    bad = n - 1
    makers = [
        ("moecomm.allreduce", "ErrorWord", lambda: create_allreduce_workspace(g, 1 << 16,
                                                                              np.float32)),
        ("moecomm.barrier", "ErrorWord", lambda: DeviceBarrier(g)),
        ("moecomm.collectives", "ErrorWord", lambda: VCollectiveWorkspace(g, 1 << 16)),
        ("moecomm.dcp", "ErrorWord", lambda: DcpAlltoAll(g, 64)),
        ("moecomm.vllm_ar", "Launcher", lambda: CustomAllReduce(g)),
        ("moecomm.mixed", "Launcher", lambda: MixedCommHandler(g, 1 << 16, tp_size=n)),
        ("moecomm.moe.alltoall", "ErrorWord", lambda: MoeAlltoAll(g, 8, 2, 4 * n,
                                                                  hidden_size=256)),
        ("moecomm.moe.compact", "Launcher", lambda: EPAllToAll(g, 8, 2, 4 * n, 256,
                                                               np.float32)),
    ]
    for module, name, make in makers:
        mod = importlib.import_module(module)
        real = getattr(mod, name)
        if g.rank == bad:
            setattr(mod, name, _injected)
        try:
            if g.rank == bad:
                with pytest.raises(MemoryError, match="injected failure"):
                    make()
            else:
                with pytest.raises(RuntimeError, match=rf"failed on rank\(s\) \[{bad}\]"):
                    make()
        finally:
            setattr(mod, name, real)
        g.barrier()
        make().close()  # every rank is in step: the next one is made and closed


@case
def spanning_group_refused(ctx):
    """A group that spans (declared) nodes cannot use CUDA IPC."""
    if ctx.world == 1:
        pytest.skip("one rank spans no nodes")
    split = moecomm.ProcessGroup(gpus_per_node=1)
    split.device_id = ctx.group.device_id
    try:
        with pytest.raises(ValueError, match="spans"):
            SymmetricBuffer(split, 1024)
    finally:
        split.close()


if __name__ == "__main__":
    main()
