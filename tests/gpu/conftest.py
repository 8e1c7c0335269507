"""GPU tests start real multi-rank jobs; without a CUDA device they are skipped, saying so.

``MOECOMM_REQUIRE_GPU=1`` (set by bench/gpu_suite.sh) turns that skip into a failure, so a
GPU run can never pass by skipping.

Each test is one case of a worker in tests/gpu/workers/ (``tests.mpi.case_params``); the
``jobs`` fixture runs each job of a module once, for all of its cases.
"""

import os

import pytest

from tests.mpi import jobs  # noqa: F401 - the fixture of every GPU test


def _gpu_count() -> tuple[int, str]:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount(), ""
    except Exception as exc:  # ImportError or CuPy's no-driver / no-device errors
        return 0, f"{type(exc).__name__}: {exc}"


GPU_COUNT, _WHY = _gpu_count()


def pytest_collection_modifyitems(config, items):
    if GPU_COUNT > 0:
        return
    reason = f"no CUDA device on this machine ({_WHY or '0 devices'})"
    if os.environ.get("MOECOMM_REQUIRE_GPU") == "1":
        raise pytest.UsageError(f"MOECOMM_REQUIRE_GPU=1 but {reason}")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=reason))
