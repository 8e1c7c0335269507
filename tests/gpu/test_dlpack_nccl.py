"""DLPack round trips (CuPy, PyTorch, JAX) and the NCCL communicator, on real ranks. With
fewer GPUs than ranks the NCCL worker checks that NCCL is refused with a clear error; with
one rank per GPU it checks every collective against NumPy."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/dlpack_worker.py",
                                                  ranks=(1, 2)))
def test_dlpack(jobs, job, name):
    jobs.check(job, name)


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/nccl_worker.py",
                                                  ranks=(1, 2, 4)))
def test_nccl(jobs, job, name):
    jobs.check(job, name)
