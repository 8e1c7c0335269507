"""The wheel carries the CUDA sources, and the kernel library finds them when installed."""

import os
import subprocess
import sys
import zipfile

import pytest

from tests.mpi import ROOT

pytestmark = pytest.mark.needs_registry


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}")
    (path,) = out.glob("moecomm-*.whl")
    return path


def test_wheel_ships_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in (ROOT / "kernels_cu").iterdir():
        assert f"moecomm/kernels_cu/{src.name}" in names, src.name


def test_installed_wheel_finds_its_kernels(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("import moecomm.kernels as k; d = k.source_dir(); print(d); "
            "assert 'symmetric.cu' in k.list_sources()")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "site") in proc.stdout, proc.stdout
