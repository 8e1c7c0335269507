"""Every kernel argument struct of kernels_cu/args.cuh has its exact ctypes mirror."""

import ctypes

import pytest

from moecomm import constants, kernel_args
from tests.cuda_source import kernel_source, layout, structs

_TABLE = structs(kernel_source("args.cuh"), constants.kernel_defines())
_KINDS = {ctypes.c_void_p: "ptr", ctypes.c_float: "float", ctypes.c_double: "float",
          ctypes.c_int8: "int", ctypes.c_int16: "int", ctypes.c_int32: "int", ctypes.c_int64: "int",
          ctypes.c_uint8: "uint", ctypes.c_uint16: "uint", ctypes.c_uint32: "uint",
          ctypes.c_uint64: "uint"}


def _python_fields(cls):
    """[(cuda field name, kind, count, nested struct name)] of a ctypes Structure."""
    out = []
    for name, ctype in cls._fields_:
        count = 1
        if issubclass(ctype, ctypes.Array):
            count, ctype = ctype._length_, ctype._type_
        name = kernel_args.CUDA_NAMES.get(name, name)
        if issubclass(ctype, ctypes.Structure):
            out.append((name, "struct", count, ctype.__name__))
        else:
            out.append((name, _KINDS[ctype], count, None if ctype is ctypes.c_void_p
                        else ctypes.sizeof(ctype)))
    return out


def test_args_header_declares_structs():
    assert {"ArWorkspace", "AllReduceArgs", "FusionArgs", "A2aWorkspace", "DispatchArgs",
            "CombineArgs", "CompactDispatchArgs"} <= set(_TABLE)


@pytest.mark.parametrize("name", sorted(_TABLE))
def test_mirror_matches_cuda(name):
    cls = getattr(kernel_args, name, None)
    assert cls is not None, f"moecomm.kernel_args has no mirror of {name}"
    assert _python_fields(cls) == _TABLE[name]
    size, _, offsets = layout(name, _TABLE)
    assert ctypes.sizeof(cls) == size
    assert [(kernel_args.CUDA_NAMES.get(f, f), getattr(cls, f).offset)
            for f, _ in cls._fields_] == offsets


def test_no_mirror_without_cuda_struct():
    mirrors = {n for n, v in vars(kernel_args).items()
               if isinstance(v, type) and issubclass(v, ctypes.Structure) and v.__module__ == kernel_args.__name__}
    assert mirrors == set(_TABLE)


def test_every_define_is_used_and_every_used_define_exists():
    import re

    from moecomm import kernels

    used = set()
    for path in kernels.source_dir().glob("*.cu*"):
        used |= set(re.findall(r"\bMOECOMM_[A-Z0-9_]+\b", path.read_text()))
    used = {u for u in used if not u.endswith("_KERNEL") and not u.endswith("_KERNELS")}
    defines = set(constants.kernel_defines())
    macros = {u for u in used if u not in defines}
    # what remains are function-like macros the sources define themselves
    for m in macros:
        assert any(re.search(r"#define %s\b" % m, p.read_text())
                   for p in kernels.source_dir().glob("*.cu*")), f"{m} is used but never defined"
    assert defines <= used, f"defines no kernel reads: {sorted(defines - used)}"
