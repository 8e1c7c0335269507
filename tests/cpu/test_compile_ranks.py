"""One compile per module and host: 4 ranks start on an empty kernel cache at once (NVRTC
only, no GPU), and each module is compiled by one of them while the others wait."""

import re

import pytest

from moecomm import kernels
from tests.mpi import check_ranks, mpiexec

pytestmark = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the test extra)")


def test_four_ranks_compile_each_module_once(tmp_path):
    (tmp_path / "tmp").mkdir()
    # An empty cache, and an empty fallback folder (the temp dir) behind it.
    env = {"MOECOMM_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp"),
           "MOECOMM_LOG_LEVEL": "INFO"}
    out = check_ranks(4, "tests/cpu/workers/compile_worker.py", "sm_90", env=env, timeout=600)
    # The log agrees: one INFO line per module, from whichever rank compiled it.
    for source in kernels.list_sources():
        lines = re.findall(rf"INFO: compiled {re.escape(source)} for sm_90 in", out)
        assert len(lines) == 1, (source, out[-3000:])
    assert len(list((tmp_path / "cache" / "kernels").glob("*.cubin"))) == \
        len(kernels.list_sources())
    assert not list((tmp_path / "cache" / "kernels").glob("*.tmp"))
