"""ProcessGroup bootstrap over real MPI jobs of 1-4 ranks (no GPU needed)."""

import pytest

from tests.mpi import check_ranks, mpiexec

pytestmark = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the test extra)")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_group_whole_host(n):
    check_ranks(n, "tests/cpu/workers/group_worker.py", timeout=120)


@pytest.mark.parametrize("n,gpus_per_node", [(4, 2), (3, 2), (2, 1)])
def test_group_declared_nodes(n, gpus_per_node):
    check_ranks(n, "tests/cpu/workers/group_worker.py",
                env={"MOECOMM_GPUS_PER_NODE": str(gpus_per_node)}, timeout=120)
