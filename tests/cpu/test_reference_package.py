"""The reference package: what it imports and what it re-exports."""

import ast
import pathlib
import subprocess
import sys

from moecomm import constants, layouts
from moecomm import reference as ref
from tests.mpi import ROOT

PACKAGE = pathlib.Path(ref.__file__).parent
STDLIB = {"__future__", "dataclasses", "typing", "math", "enum", "operator"}


def _imports(path):
    """(absolute top-level modules, relative (level, module) pairs) imported by a file."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names = [node.module] if node.module else [a.name for a in node.names]
                relative |= {(node.level, n) for n in names}
            else:
                absolute.add(node.module.split(".")[0])
    return absolute, relative


def test_reference_imports_only_numpy_and_moecomm_facts():
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.stem for f in files} >= {"__init__", "formats", "layouts", "quant", "allreduce", "moe"}
    for f in files:
        absolute, relative = _imports(f)
        assert absolute <= STDLIB | {"numpy"}, (f.name, absolute)
        # inside the package anything; above it only the pure-Python facts
        assert {m for lvl, m in relative if lvl > 1} <= {"constants", "layouts"}, (f.name, relative)
        assert all(lvl <= 2 for lvl, _ in relative), (f.name, relative)


def test_layouts_is_pure_python():
    absolute, relative = _imports(ROOT / "moecomm" / "layouts.py")
    assert absolute <= STDLIB and not relative, (absolute, relative)


def test_reference_and_layouts_load_without_cupy():
    code = ("import sys, moecomm.layouts, moecomm.reference; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_submodule_name_is_reexported_once():
    names = []
    for mod in (ref.formats, ref.layouts, ref.quant, ref.allreduce, ref.moe, ref.prepare):
        for name in mod.__all__:
            assert getattr(ref, name) is getattr(mod, name), name
        names += mod.__all__
    assert len(names) == len(set(names))
    assert sorted(ref.__all__) == sorted(names)


def test_facts_come_from_the_runtime():
    assert ref.FP8_E4M3_MAX is constants.FP8_E4M3_MAX
    assert ref.NVFP4_BLOCK is constants.NVFP4_BLOCK
    assert ref.GROUP_FP8_MIN_SCALE is constants.GROUP_FP8_MIN_SCALE
    assert ref.DYNAMIC_FP8_MIN_SCALE is constants.DYNAMIC_FP8_MIN_SCALE
    assert ref.compute_fp4_swizzled_layout_sf_size is layouts.compute_fp4_swizzled_layout_sf_size
    assert ref.ue8m0_mn_major_storage_size is layouts.ue8m0_mn_major_storage_size
