"""CUDA IPC symmetric buffers across real ranks (several ranks may share one GPU)."""

import pytest

from tests.mpi import check_ranks


@pytest.mark.parametrize("n", [2, 4])
def test_symmetric_buffer(n):
    check_ranks(n, "tests/gpu/workers/symmetric_worker.py")
