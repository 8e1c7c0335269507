"""Custom all-reduce on real ranks: exact against the reference, graphs, bad input; in
jobs of their own, a missing peer's timeout and MOECOMM_DEBUG=1. One test per case of
tests/gpu/workers/allreduce_worker.py."""

import pytest

from tests.mpi import case_params

WORKER = "tests/gpu/workers/allreduce_worker.py"


@pytest.mark.parametrize("job, name", case_params(WORKER, ranks=(2, 4)))
def test_allreduce(jobs, job, name):
    jobs.check(job, name)
