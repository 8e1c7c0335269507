"""Overlap across real ranks: collectives on a communication stream ordered by events
(eager and in CUDA graphs), SM budgets, MoE routing handles, the device barrier, and
MOECOMM_DEBUG=1 catching a CommHandle never waited for. One test per case of
tests/gpu/workers/overlap_worker.py."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/overlap_worker.py",
                                                  ranks=(2,)))
def test_overlap(jobs, job, name):
    jobs.check(job, name)
