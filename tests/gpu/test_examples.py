"""The examples in examples/ run as users run them (``mpiexec -n 2 python examples/X.py``)
and must exit 0: each checks its own result against a one-GPU / NumPy reference and exits
non-zero on a mismatch. Skipped without a GPU (conftest); the PyTorch / JAX examples skip
where the framework is not installed, and fail then under MOECOMM_REQUIRE_GPU=1 (the GPU
check)."""

import importlib.util
import os

import pytest

from tests.mpi import mpiexec, run_ranks

EXAMPLES = {"cupy_allreduce.py": None, "torch_tp_mlp.py": "torch", "jax_moe_layer.py": "jax"}


@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example(script):
    needs = EXAMPLES[script]
    if needs and importlib.util.find_spec(needs) is None:
        why = f"examples/{script} needs {needs}, which is not installed here"
        if os.environ.get("MOECOMM_REQUIRE_GPU") == "1":  # the GPU check runs every example
            pytest.fail(f"{why}; MOECOMM_REQUIRE_GPU=1")
        pytest.skip(why)
    if mpiexec() is None:
        pytest.skip("no mpiexec (install the test extra)")
    proc = run_ranks(2, f"examples/{script}", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"examples/{script} exited {proc.returncode}:\n{out[-6000:]}"
    assert ": OK" in proc.stdout, out[-6000:]
