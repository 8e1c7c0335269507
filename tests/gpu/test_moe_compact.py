"""EPAllToAll (compact expert-major layout) across real ranks (several may share one GPU)."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/moe_compact_worker.py",
                                                  ranks=(2, 4)))
def test_moe_compact(jobs, job, name):
    jobs.check(job, name)
