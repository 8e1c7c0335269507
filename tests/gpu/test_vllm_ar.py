"""vLLM's custom all-reduce lifecycle on real ranks: staging buffer, registered inputs,
graph inputs registered after capture, bad input, timeouts. One test per case of
tests/gpu/workers/vllm_ar_worker.py."""

import pytest

from tests.mpi import case_params

WORKER = "tests/gpu/workers/vllm_ar_worker.py"


@pytest.mark.parametrize("job, name", case_params(WORKER, ranks=(2, 4)))
def test_vllm_ar(jobs, job, name):
    jobs.check(job, name)
