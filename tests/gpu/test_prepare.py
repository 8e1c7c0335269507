"""MoE prepare/finalize and the v-collectives under it, across real ranks (several ranks
may share one GPU; the NCCL cases need one GPU per rank and skip otherwise)."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/collectives_worker.py",
                                                  ranks=(2, 3)))
def test_vcollectives(jobs, job, name):
    """all_gatherv / reduce_scatterv against the reference: every copy path, ragged and
    empty ranks, graph replay, NCCL vs IPC bits, bad input, timeouts."""
    jobs.check(job, name)


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/prepare_worker.py",
                                                  ranks=(2, 4)))
def test_prepare_finalize(jobs, job, name):
    """Both paths end to end against a one-process MoE layer, each step against its
    reference, graph replay, NCCL vs IPC bits, bad input."""
    jobs.check(job, name)
