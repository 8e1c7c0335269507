"""Custom all-reduce on real ranks: exact against the reference, graphs, timeouts."""

import pytest

from tests.mpi import check_ranks


@pytest.mark.parametrize("n", [2, 4])
def test_allreduce_correct(n):
    check_ranks(n, "tests/gpu/workers/allreduce_worker.py", "correct", timeout=400)


@pytest.mark.parametrize("n", [2, 3])
def test_allreduce_missing_peer_times_out(n):
    check_ranks(n, "tests/gpu/workers/allreduce_worker.py", "timeout", timeout=200)


def test_allreduce_debug_mode_catches_mismatched_arguments():
    check_ranks(2, "tests/gpu/workers/allreduce_worker.py", "debug", env={"MOECOMM_DEBUG": "1"})
