"""The Launcher's launch configurations (no GPU: the driver call is recorded)."""

import ctypes
import types

import pytest

from moecomm import launch
from moecomm.kernel_args import CopyArgs


class _Recorder:
    """Stands in for cuLaunchKernelEx: keeps what each call's configuration said."""

    def __init__(self):
        self.calls = []

    def __call__(self, config_ref, fn, params, extra):
        c = ctypes.cast(config_ref, ctypes.POINTER(launch._LaunchConfig)).contents
        attrs = [(c.attrs[i].id, tuple(c.attrs[i].value)) for i in range(c.numAttrs)]
        self.calls.append(dict(grid=c.gridDimX, block=c.blockDimX, smem=c.sharedMemBytes,
                               stream=c.hStream or 0, attrs=attrs,
                               dims=(c.gridDimY, c.gridDimZ, c.blockDimY, c.blockDimZ),
                               arg=params[0], fn=fn.value))
        return 0


@pytest.fixture
def make(monkeypatch):
    def make(pdl):
        rec = _Recorder()
        monkeypatch.setattr(launch, "_launch_kernel_ex", lambda: rec)
        kernel = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=0x1234))
        return launch.Launcher(kernel, CopyArgs, pdl=pdl), rec
    return make


@pytest.mark.parametrize("pdl", [False, True])
def test_each_geometry_and_stream_gets_its_own_configuration(make, pdl):
    launcher, rec = make(pdl)
    pdl_attr = [(launch._ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, (1, 0, 0))] if pdl else []
    cluster_attr = [(launch._ATTR_CLUSTER_DIMENSION, (4, 1, 1))]
    launcher(8, 256, 0x77)
    launcher(132, 512, 0x99, 4096, cluster=4)
    launcher(8, 256, 0x77)  # the first configuration again, unchanged by the second
    first, second, third = rec.calls
    assert first == third
    assert (first["grid"], first["block"], first["smem"], first["stream"]) == (8, 256, 0, 0x77)
    assert first["attrs"] == pdl_attr
    assert (second["grid"], second["block"], second["smem"], second["stream"]) == (
        132, 512, 4096, 0x99)
    assert second["attrs"] == pdl_attr + cluster_attr
    assert all(c["dims"] == (1, 1, 1, 1) for c in rec.calls)
    assert all(c["arg"] == ctypes.addressof(launcher.args) for c in rec.calls)
    assert all(c["fn"] == 0x1234 for c in rec.calls)
    assert len(launcher._configs) == 2


def test_configurations_are_bounded(make):
    launcher, rec = make(True)
    for s in range(3 * launch._MAX_CONFIGS):
        launcher(1, 32, s + 1)
    assert len(launcher._configs) <= launch._MAX_CONFIGS
    assert [c["stream"] for c in rec.calls] == [s + 1 for s in range(3 * launch._MAX_CONFIGS)]

