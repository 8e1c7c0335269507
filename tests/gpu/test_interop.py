"""Framework interop (CuPy, PyTorch, JAX): quantized outputs and payloads of every accepted
dtype, device errors. One test per case of tests/gpu/workers/interop_worker.py."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/interop_worker.py",
                                                  ranks=(2,)))
def test_interop(jobs, job, name):
    jobs.check(job, name)
