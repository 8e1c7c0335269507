"""Wheel build hook: ship NVRTC-built cubins of every kernel (all metadata is in pyproject.toml).

A wheel gets ``moecomm/kernels_prebuilt/``: every ``kernels_cu/*.cu`` compiled for
sm_80, sm_90 and sm_100 by NVRTC -- no GPU needed -- with exactly the options the runtime
compiles with, and a manifest that ``moecomm.kernels`` checks them against
(``moecomm.precompile.build_prebuilt``). NVRTC and the CUDA headers come from the build
requirements (NVIDIA's wheels, found by cuda.pathfinder); CuPy is not needed.

An editable install (``pip install -e``) builds no cubins: it compiles on first use into
the kernel cache, like a source checkout. ``MOECOMM_BUILD_CUBINS=0`` builds a wheel
without them (the runtime then compiles too); otherwise a failing compile fails the build.
``MOECOMM_BUILD_JOBS`` caps the parallel compiles (default: CPU count, at most 8).
"""

import importlib
import os
import shutil
import sys
import types
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _build_cubins(folder: Path) -> None:
    # moecomm/__init__.py imports mpi4py and numpy, which a build environment lacks: load
    # the kernel modules under a bare package object instead (they need neither).
    saved = {k: v for k, v in sys.modules.items() if k == "moecomm" or k.startswith("moecomm.")}
    package = types.ModuleType("moecomm")
    package.__path__ = [str(ROOT / "moecomm")]
    sys.modules["moecomm"] = package
    try:
        import logging

        precompile = importlib.import_module("moecomm.precompile")
        precompile.logger.setLevel(logging.INFO)
        jobs = int(os.environ.get("MOECOMM_BUILD_JOBS", "0")) or None
        precompile.build_prebuilt(folder, jobs=jobs)
    finally:
        for name in [k for k in sys.modules if k == "moecomm" or k.startswith("moecomm.")]:
            del sys.modules[name]
        sys.modules.update(saved)


class BuildPyWithCubins(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        folder = Path(self.build_lib) / "moecomm" / "kernels_prebuilt"
        shutil.rmtree(folder, ignore_errors=True)  # never ship a previous build's cubins
        if os.environ.get("MOECOMM_BUILD_CUBINS", "1") == "0":
            print("moecomm: MOECOMM_BUILD_CUBINS=0, building the wheel without cubins")
            return
        _build_cubins(folder)


setup(cmdclass={"build_py": BuildPyWithCubins})
