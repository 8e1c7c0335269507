"""Fused all-reduce (residual + RMSNorm + quantization, MoE reductions) on real ranks. One
test per case of tests/gpu/workers/fusion_worker.py."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/fusion_worker.py",
                                                  ranks=(2, 4)))
def test_allreduce_fusion(jobs, job, name):
    jobs.check(job, name)
