"""Decode CP all-to-all and LSE combine on real ranks (exact against the reference,
ragged batches, graph replay, every stats format, bad input, torch) and strided views of
symmetric buffers; in a job of its own, a missing peer's timeout. One test per case of
tests/gpu/workers/dcp_worker.py."""

import pytest

from tests.mpi import case_params

WORKER = "tests/gpu/workers/dcp_worker.py"


@pytest.mark.parametrize("job, name", case_params(WORKER, ranks=(2, 3)))
def test_dcp(jobs, job, name):
    jobs.check(job, name)
