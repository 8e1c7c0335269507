"""The wheel carries the CUDA sources and NVRTC-built cubins of every kernel for every
supported arch, and the kernel library finds both when installed."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from moecomm import kernels
from tests.cpu.test_kernels_compile import plain_kernel_names
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


def test_wheel_ships_every_module(wheel):
    """Every Python file of the package is in the wheel (``moecomm.reference`` was not, so
    every ``python -m moecomm.bench`` suite failed to import from a wheel install)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (ROOT / "moecomm").rglob("*.py"):
        assert path.relative_to(ROOT).as_posix() in names, path


def test_installed_wheel_imports_every_module(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("import pkgutil, importlib, moecomm; "
            "mods = [m.name for m in pkgutil.walk_packages(moecomm.__path__, 'moecomm.')]; "
            "[importlib.import_module(m) for m in mods]; "
            "assert moecomm.__file__.startswith(%r), moecomm.__file__; "
            "assert 'moecomm.reference.moe' in mods and 'moecomm.bench.__main__' in mods; "
            "print(len(mods))" % str(tmp_path / "site"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr


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


def test_wheel_ships_cubins_for_every_kernel_and_arch(wheel):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    manifest = json.loads(z.read("moecomm/kernels_prebuilt/manifest.json"))
    assert manifest["tree_digest"] == kernels._tree_digest()
    shipped = {(e["source"], e["arch"]): e for e in manifest["cubins"].values()}
    for arch in kernels.SUPPORTED_ARCHS:
        for source in kernels.list_sources():
            entry = shipped[(source, arch)]
            assert f"moecomm/kernels_prebuilt/{entry['file']}" in names, entry["file"]
            assert list(entry["options"]) == list(kernels._key_options(arch, None))
            assert plain_kernel_names(source) <= set(entry["kernels"]), (source, arch)


RESOLVE = """
import json, sys
from pathlib import Path
import moecomm.kernels as k
site = Path(sys.argv[1])
out = {}
for arch in k.SUPPORTED_ARCHS:
    for source in k.list_sources():
        path = k.prebuilt_cubin(source, arch)
        assert path is not None, (source, arch)
        assert site in path.parents, path
        out[f"{source}/{arch}"] = k.cubin_kernels(path.read_bytes())
assert k.prebuilt_cubin("fusion.cu", "sm_89") is None
print(json.dumps(out))
"""


def test_installed_wheel_resolves_its_cubins(wheel, tmp_path):
    """In an installed wheel, the runtime's lookup finds a cubin for every kernel source and
    arch, built with the options it would compile with, defining the kernels a JIT compile
    defines (what RawModule.get_function resolves by name)."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-c", RESOLVE, str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    for source in kernels.list_sources():
        for arch in kernels.SUPPORTED_ARCHS:
            assert plain_kernel_names(source) <= set(found[f"{source}/{arch}"]), (source, arch)
    for source in ("symmetric.cu", "allreduce.cu"):  # the quick ones: against a JIT compile
        jit = kernels.cubin_kernels(kernels.nvrtc_compile(source, "sm_90"))
        assert sorted(found[f"{source}/sm_90"]) == sorted(jit)
