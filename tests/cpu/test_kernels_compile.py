"""Every kernel source compiles with NVRTC for every supported arch, without a GPU; the
cache, its per-entry lock and atomic writes; shipped-cubin lookup; compile logging."""

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from moecomm import kernels, precompile
from tests.mpi import ROOT


def plain_kernel_names(source: str) -> set[str]:
    """Kernels the source names literally (macro-made names aside)."""
    text = (kernels.source_dir() / source).read_text()
    found = re.findall(r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)[\s\\]*)?'
                       r'(\w+)\(', text)
    return {name for name in found if not name.startswith("__")}


def test_sources_found():
    names = kernels.list_sources()
    assert "symmetric.cu" in names
    assert (kernels.source_dir() / "common.cuh").is_file()


@pytest.mark.parametrize("arch", kernels.SUPPORTED_ARCHS)
@pytest.mark.parametrize("source", kernels.list_sources())
def test_compiles(source, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    cubin = kernels.compile_cubin(source, arch)
    assert cubin[:4] == b"\x7fELF", "NVRTC output is not a cubin"
    assert len(list(tmp_path.rglob("*.cubin"))) == 1
    names = kernels.cubin_kernels(cubin)
    assert names and plain_kernel_names(source) <= set(names), names
    # A second request is served from the disk cache, byte for byte.
    assert kernels.compile_cubin(source, arch) == cubin


def test_defines_change_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    a = kernels.cubin_path("symmetric.cu", "sm_90")
    b = kernels.cubin_path("symmetric.cu", "sm_90", {"MOECOMM_UNUSED": 3})
    assert a != b


def test_compile_error_carries_the_log(tmp_path, monkeypatch):
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "common.cuh").write_text("#pragma once\n")
    (bad / "broken.cu").write_text('extern "C" __global__ void k() { undefined_symbol(); }\n')
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "source_dir", lambda: bad)
    kernels._tree_digest.cache_clear()
    try:
        with pytest.raises(kernels.KernelCompileError, match="undefined_symbol"):
            kernels.compile_cubin("broken.cu", "sm_80")
    finally:
        kernels._tree_digest.cache_clear()


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        kernels.normalize_arch("hopper")
    assert kernels.normalize_arch((9, 0)) == "sm_90"
    assert kernels.normalize_arch(100) == "sm_100"
    with pytest.raises(FileNotFoundError):
        kernels.compile_cubin("missing.cu", "sm_90")
    with pytest.raises(ValueError, match="identifier"):
        kernels.compile_cubin("symmetric.cu", "sm_90", {"not valid": 1})


def test_cubin_kernels_rejects_other_files():
    with pytest.raises(ValueError, match="ELF"):
        kernels.cubin_kernels(b"not a cubin")


# ------------------------------------------------------------------ cache: lock, atomic writes

def _suffixes(root):
    return sorted(p.name.rsplit(".", 1)[1] for p in (root / "kernels").iterdir())


def test_killed_writer_leaves_no_entry(tmp_path, monkeypatch):
    """A process killed after writing its temporary file, before the rename: no cubin
    appears under the entry's name, and the next process compiles a good one (the OS
    released the dead process's lock) and clears the leftover."""
    env = dict(os.environ, MOECOMM_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    code = ("import os, signal; from moecomm import kernels\n"
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "kernels.cubin_path('symmetric.cu', 'sm_90')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _suffixes(tmp_path) == ["lock", "tmp"]  # the lock file and the dead one's data

    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    path = kernels.cubin_path("symmetric.cu", "sm_90")
    assert path.read_bytes()[:4] == b"\x7fELF"
    assert not list((tmp_path / "kernels").glob("*.tmp"))


def test_killed_compiler_does_not_block_the_next(tmp_path, monkeypatch):
    """A process that dies while compiling (holding the lock) is no deadlock: the waiter
    gets the lock, finds no entry, and compiles it itself."""
    env = dict(os.environ, MOECOMM_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    code = ("import sys, time; from moecomm import kernels\n"
            "kernels.nvrtc_compile = lambda *a: (print('compiling', flush=True), "
            "time.sleep(600))\n"
            "kernels.cubin_path('symmetric.cu', 'sm_90')\n")
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "compiling"  # it holds the lock now
        monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
        threading.Timer(1.0, holder.kill).start()
        start = time.perf_counter()
        path = kernels.cubin_path("symmetric.cu", "sm_90")
        assert time.perf_counter() - start >= 0.9, "did not wait for the lock holder"
        assert path.read_bytes()[:4] == b"\x7fELF"
        assert "symmetric.cu/sm_90" in kernels.stats()["compiled"]
    finally:
        holder.kill()
        holder.wait()


def test_corrupt_entry_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    path = kernels.cubin_path("symmetric.cu", "sm_80")
    good = path.read_bytes()
    path.write_bytes(b"garbage")
    assert kernels.cubin_path("symmetric.cu", "sm_80") == path
    assert path.read_bytes() == good


def test_compile_logs_and_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "SLOW_COMPILE_S", 0.01)
    monkeypatch.setattr(kernels, "_warned_slow", False)
    caplog.set_level(logging.INFO, logger="moecomm")
    kernels.cubin_path("allreduce.cu", "sm_80")
    kernels.cubin_path("allreduce.cu", "sm_90")
    kernels.cubin_path("allreduce.cu", "sm_90")  # cached: no line
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 2, infos
    assert re.match(r"compiled allreduce.cu for sm_80 in \d+\.\d s \(NVRTC \d+\.\d+\) -> ",
                    infos[0]), infos[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "python -m moecomm.precompile" in warnings[0]
    assert "allreduce.cu for sm_80" in warnings[0]


# ------------------------------------------------------------------ shipped cubins

@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A shipped-cubin folder with symmetric.cu for every arch, as a wheel has it."""
    folder = tmp_path / "prebuilt"
    precompile.build_prebuilt(folder, sources=["symmetric.cu"], jobs=1)
    monkeypatch.setattr(kernels, "prebuilt_dir", lambda: folder)
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path / "cache"))
    return folder


def test_prebuilt_lookup(shipped):
    for arch in kernels.SUPPORTED_ARCHS:
        path = kernels.prebuilt_cubin("symmetric.cu", arch)
        assert path == shipped / arch / "symmetric.cubin"
        # What the runtime would compile, byte for byte (same NVRTC, same options).
        assert path.read_bytes() == kernels.nvrtc_compile("symmetric.cu", arch)
    assert kernels.prebuilt_cubin("allreduce.cu", "sm_90") is None   # not shipped
    assert kernels.prebuilt_cubin("symmetric.cu", "sm_86") is None   # other arch: JIT
    assert kernels.prebuilt_cubin("symmetric.cu", "sm_90", {"MOECOMM_EXTRA": 1}) is None


def test_prebuilt_needs_the_same_sources(shipped, monkeypatch):
    monkeypatch.setattr(kernels, "_tree_digest", lambda: "0" * 64)
    assert kernels.prebuilt_cubin("symmetric.cu", "sm_90") is None


def test_prebuilt_needs_the_same_defines(shipped, monkeypatch):
    changed = {**kernels.kernel_defines(), "MOECOMM_AR_MAX_RANKS": 32}
    monkeypatch.setattr(kernels, "kernel_defines", lambda: changed)
    assert kernels.prebuilt_cubin("symmetric.cu", "sm_90") is None


def test_damaged_prebuilt_is_ignored(shipped):
    (shipped / "sm_90" / "symmetric.cubin").write_bytes(b"")
    assert kernels.prebuilt_cubin("symmetric.cu", "sm_90") is None
    (shipped / kernels.MANIFEST_NAME).write_text("{")
    kernels._read_manifest.cache_clear()
    try:
        assert kernels.prebuilt_cubin("symmetric.cu", "sm_80") is None
    finally:
        kernels._read_manifest.cache_clear()


def test_force_jit(monkeypatch):
    for value, expected in (("", False), ("0", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("MOECOMM_FORCE_JIT", value)
        assert kernels.force_jit() is expected


def test_checkout_has_no_shipped_cubins():
    """A source checkout (and so an editable install) compiles: no cubins in the tree."""
    assert not (ROOT / "moecomm" / kernels.PREBUILT_DIRNAME).exists()
    assert kernels.prebuilt_manifest() is None
