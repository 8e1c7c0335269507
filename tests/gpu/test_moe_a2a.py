"""MoeAlltoAll dispatch/combine across real ranks (several ranks may share one GPU)."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/moe_a2a_worker.py",
                                                  ranks=(2, 4)))
def test_moe_alltoall(jobs, job, name):
    jobs.check(job, name)


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/moe_a2a_fp8_worker.py",
                                                  ranks=(2, 4)))
def test_moe_alltoall_fp8_dispatch(jobs, job, name):
    """dispatch(quantize=Fp8Dispatch(...)): codes and scales bit-exact with the reference
    quantizers, fp8 dispatch + combine in graph replay, bad fp8 inputs."""
    jobs.check(job, name)
