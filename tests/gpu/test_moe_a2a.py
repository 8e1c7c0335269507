"""MoeAlltoAll dispatch/combine across real ranks (several ranks may share one GPU)."""

import pytest

from tests.mpi import check_ranks


@pytest.mark.parametrize("n", [2, 4])
def test_moe_alltoall(n):
    check_ranks(n, "tests/gpu/workers/moe_a2a_worker.py", timeout=600)


@pytest.mark.parametrize("n", [2, 4])
def test_moe_alltoall_fp8_dispatch(n):
    """dispatch(quantize=Fp8Dispatch(...)): codes and scales bit-exact with the reference
    quantizers, fp8 dispatch + combine in graph replay, bad fp8 inputs."""
    check_ranks(n, "tests/gpu/workers/moe_a2a_fp8_worker.py", timeout=600)
