"""DLPack round trips (PyTorch, JAX) and the NCCL communicator, on real ranks."""

import pytest

from tests.mpi import check_ranks


@pytest.mark.parametrize("n", [1, 2])
def test_dlpack(n):
    out = check_ranks(n, "tests/gpu/workers/dlpack_worker.py")
    assert "dlpack producers checked: cupy" in out


@pytest.mark.parametrize("n", [1, 2, 4])
def test_nccl(n, gpu_count):
    # With fewer GPUs than ranks the worker checks that NCCL is refused with a clear error;
    # with one rank per GPU it checks every collective against NumPy.
    check_ranks(n, "tests/gpu/workers/nccl_worker.py")
