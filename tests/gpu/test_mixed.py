"""Mixed TP/DP communication on real ranks: every op and mode bit for bit against the
reference, graphs, declared nodes, bad input; in jobs of their own, a missing peer's
timeout and MOECOMM_GPUS_PER_NODE. One test per case of tests/gpu/workers/mixed_worker.py
(4 ranks share the GPUs: the TP x DP = 2 x 2 layout runs there)."""

import pytest

from tests.mpi import case_params

WORKER = "tests/gpu/workers/mixed_worker.py"


@pytest.mark.parametrize("job, name", case_params(WORKER, ranks=(2, 4)))
def test_mixed(jobs, job, name):
    jobs.check(job, name)
