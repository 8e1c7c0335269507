"""EPAllToAll (compact expert-major layout) across real ranks (several may share one GPU)."""

import pytest

from tests.mpi import check_ranks


@pytest.mark.parametrize("n", [2, 4])
def test_moe_compact(n):
    check_ranks(n, "tests/gpu/workers/moe_compact_worker.py", timeout=600)
