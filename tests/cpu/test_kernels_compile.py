"""Every kernel source compiles with NVRTC for every supported arch, without a GPU."""

import pytest

from moecomm import kernels


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
