"""Fused all-reduce (residual + RMSNorm + quantization) on real ranks."""

import pytest

from tests.mpi import check_ranks


@pytest.mark.parametrize("n", [2, 4])
def test_allreduce_fusion(n):
    check_ranks(n, "tests/gpu/workers/fusion_worker.py", timeout=600)
