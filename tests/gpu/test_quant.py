"""moecomm.quant (standalone FP8 / NVFP4 quantizers, the NVFP4 scale interleave) against
moecomm.reference, bit for bit, on one rank. One test per case of
tests/gpu/workers/quant_worker.py."""

import pytest

from tests.mpi import case_params


@pytest.mark.parametrize("job, name", case_params("tests/gpu/workers/quant_worker.py",
                                                  ranks=(1,)))
def test_quant(jobs, job, name):
    jobs.check(job, name)
