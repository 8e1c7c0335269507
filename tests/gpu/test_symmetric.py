"""CUDA IPC symmetric buffers across real ranks (several ranks may share one GPU)."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/symmetric_worker.py",
                                                  ranks=(2, 4)))
def test_symmetric_buffer(jobs, job, name):
    jobs.check(job, name)
