"""Overlap options without a GPU: event handles accepted by previous_event, async_op
validation, CommHandle bookkeeping and the MOECOMM_DEBUG missing-wait reports, the SM
budget options, the barrier's error code."""

import gc

import numpy as np
import pytest

from moecomm import events
from moecomm import group as _group
from moecomm.allreduce import AllReduceConfig
from moecomm.constants import ErrorCode, kernel_defines
from moecomm.moe.alltoall import MoeAlltoAllConfig


class FakeEvent:
    """What events needs of a cupy.cuda.Event: ptr, done, synchronize()."""

    def __init__(self, ptr=0x1234, done=True):
        self.ptr, self.done, self.synced = ptr, done, False

    def synchronize(self):
        self.synced = True


class TorchLikeEvent:
    cuda_event = 0x77


def test_event_handle_accepts_events_handles_and_ints():
    assert events.event_handle(FakeEvent(0x10)) == 0x10
    assert events.event_handle(TorchLikeEvent()) == 0x77
    assert events.event_handle(0x99) == 0x99
    assert events.event_handle(np.uint64(0x98)) == 0x98
    assert events.event_handle(events.CommHandle(FakeEvent(0x11))) == 0x11


@pytest.mark.parametrize("bad, error", [("event", TypeError), (True, TypeError),
                                        (object(), TypeError), (0, ValueError),
                                        (-3, ValueError), (2.5, TypeError)])
def test_event_handle_refuses(bad, error):
    with pytest.raises(error, match="previous_event"):
        events.event_handle(bad)


@pytest.mark.parametrize("bad", [1, "yes", None, 0.0])
def test_async_op_must_be_bool(bad):
    with pytest.raises(TypeError, match="async_op must be a bool"):
        events.issue(0, None, bad)


def test_issue_without_options_touches_no_stream():
    assert events.issue(0, None, False) is False
    assert events.issue(0, None, np.bool_(True)) is True


def test_finish_returns_result_unchanged_without_async():
    result = object()
    assert events.finish(result, 0, False) is result


def test_comm_handle_consumption():
    ev = FakeEvent(done=False)
    h = events.CommHandle(ev, "all_reduce", keep=(np.zeros(3),))
    assert not h.consumed and "pending" in repr(h)
    assert h.done() is False and h.consumed
    h2 = events.CommHandle(ev, "x")
    assert h2.event is ev and h2.consumed
    h3 = events.CommHandle(ev, "x")
    h3.synchronize()
    assert ev.synced and h3.consumed


class Owner:
    pass


@pytest.fixture
def debug(monkeypatch):
    monkeypatch.setattr(_group, "DEBUG", True)
    events._unwaited.clear()
    yield
    events._unwaited.clear()


def test_debug_reports_a_pending_handle_of_the_same_op(debug):
    import weakref

    owner, other = Owner(), Owner()
    h = events.CommHandle(FakeEvent(), "all_reduce")
    events._pending[owner] = weakref.ref(h)
    events.issue(0, None, False, owner=other, op="all_reduce")  # another op: fine
    with pytest.raises(RuntimeError, match="never waited for"):
        events.issue(0, None, False, owner=owner, op="all_reduce")
    events.issue(0, None, False, owner=owner, op="all_reduce")  # reported once
    h2 = events.CommHandle(FakeEvent(), "all_reduce")
    events._pending[owner] = weakref.ref(h2)
    h2.done()
    events.issue(0, None, False, owner=owner, op="all_reduce")  # consumed: fine


def test_debug_reports_a_handle_dropped_unwaited(debug):
    h = events.CommHandle(FakeEvent(), "MoeAlltoAll.combine")
    del h
    gc.collect()
    with pytest.raises(RuntimeError, match="MoeAlltoAll.combine was dropped without"):
        events.issue(0, None, False, owner=Owner(), op="all_reduce")
    events.issue(0, None, False, owner=Owner(), op="all_reduce")  # reported once


def test_no_reports_without_debug(monkeypatch):
    monkeypatch.setattr(_group, "DEBUG", False)
    events._unwaited.clear()
    h = events.CommHandle(FakeEvent(), "all_reduce")
    del h
    gc.collect()
    assert not events._unwaited


@pytest.mark.parametrize("config", [AllReduceConfig, MoeAlltoAllConfig])
def test_num_sms_option(config):
    assert config().num_sms is None
    assert config(num_sms=8).num_sms == 8
    with pytest.raises(ValueError, match="num_sms must be >= 1"):
        config(num_sms=0)
    with pytest.raises(TypeError, match="num_sms must be an int"):
        config(num_sms="8")
    with pytest.raises(TypeError, match="num_sms must be an int"):
        config(num_sms=True)


def test_allreduce_grids_stay_within_the_budget():
    cfg = AllReduceConfig(num_sms=8)
    for nvec in (1, 1000, 1 << 16, 1 << 22):
        blocks, _ = cfg.oneshot_grid(nvec, 8)
        assert blocks <= 8 * cfg.oneshot_blocks_per_sm
        # under a budget: one block per SM of oneshot_blocks_per_sm x oneshot_threads
        blocks, threads = cfg.oneshot_grid(nvec, 8, budgeted=True)
        assert blocks <= 8 and threads == min(512, -(-nvec // 32) * 32)
        assert blocks * threads >= min(nvec, 8 * 512)
        blocks, threads, chunk = cfg.twoshot_grid(nvec, 2, 8)
        assert blocks <= 8 * cfg.twoshot_blocks_per_sm
        assert blocks * chunk * 4095 >= -(-nvec // 2)  # every vector in some chunk
    # two-shot under a budget: one block per SM whatever twoshot_blocks_per_sm says
    cfg = AllReduceConfig(num_sms=8, twoshot_blocks_per_sm=3)
    for nvec in (1, 1000, 1 << 16, 1 << 22):
        assert cfg.twoshot_grid(nvec, 2, 8)[0] <= 24
        blocks, threads, chunk = cfg.twoshot_grid(nvec, 2, 8, budgeted=True)
        assert blocks <= 8 and blocks * chunk * 4095 >= -(-nvec // 2)
    assert cfg.twoshot_grid(1 << 22, 2, 8)[0] == 24


def test_twoshot_chunks_are_balanced():
    """Every two-shot block gets the same number of equal chunks (the last block may get
    less): at most twoshot_chunk_bytes each with every SM, one chunk per block under a
    budget."""
    cfg = AllReduceConfig()
    for nvec, sms in ((1 << 20, 132), (1 << 23, 132), (1 << 24, 132), (1000, 132),
                      ((1 << 23) + 17, 100)):
        seg = -(-nvec // 2)
        blocks, threads, chunk = cfg.twoshot_grid(nvec, 2, sms)
        assert chunk % threads == 0 and chunk * 16 <= max(cfg.twoshot_chunk_bytes, 16 * threads)
        nchunks = -(-seg // chunk)
        assert blocks == min(sms, nchunks)
        per_block = -(-nchunks // blocks)  # chunk j goes to block j % blocks
        assert per_block * chunk <= -(-seg // blocks) + per_block * threads
    # 256 MiB of bf16 on 132 SMs: chunks of at most 256 KiB, the same count per block
    blocks, _, chunk = cfg.twoshot_grid((256 << 20) // 16, 2, 132)
    assert chunk * 16 <= 256 << 10 and -(-((128 << 20) // 16 // chunk) // blocks) == 4
    with pytest.raises(TypeError, match="twoshot_copy_engine must be a bool or None"):
        AllReduceConfig(twoshot_copy_engine=1)
    # a two-shot block is alone on its SM: by default it takes a full SM's 1024 threads
    assert cfg.twoshot_threads == 1024 and cfg.twoshot_blocks_per_sm == 1
    # under a budget: one chunk per block, every block busy
    for sms in (8, 12, 16, 24):
        budgeted = AllReduceConfig(num_sms=sms)
        nvec = (16 << 20) // 16
        blocks, threads, chunk = budgeted.twoshot_grid(nvec, 2, sms, budgeted=True)
        assert blocks == sms and blocks * chunk >= nvec // 2 > (blocks - 1) * chunk


def test_allreduce_split_rule():
    """The one-shot's SM split: the measured table by world size, an explicit threshold,
    and never when the budget leaves no more reducing than pushing SMs."""
    assert AllReduceConfig().split_from(2, 132) == 2 << 20
    assert AllReduceConfig().split_from(4, 132) == float("inf")  # not measured
    assert AllReduceConfig(split_min_bytes=0).split_from(4, 132) == 0
    assert AllReduceConfig(split_min_bytes=0).split_from(2, 24) == float("inf")
    assert AllReduceConfig(split_min_bytes=0, split_push_sms=3).split_from(2, 8) == 0
    # auto's crossover follows the split: 16 MiB with it, the plain one-shot's 4 MiB under
    # a budget that rules it out
    assert AllReduceConfig().crossover(2, 132) == 16 << 20
    assert AllReduceConfig(num_sms=16).crossover(2, 16) == 4 << 20
    assert AllReduceConfig().crossover(4, 132) == 512 << 10
    assert AllReduceConfig(oneshot_max_bytes=1000).crossover(2, 132) == 1000
    assert AllReduceConfig(num_sms=16).measured_crossover(2, 16) == 4 << 20
    assert AllReduceConfig(num_sms=16).budget(132) == 16 and AllReduceConfig().budget(132) == 132
    for bad in (dict(split_push_sms=0), dict(split_threads=48), dict(split_threads=2048),
                dict(split_min_bytes=-1), dict(twoshot_threads=2048),
                dict(twoshot_chunk_bytes=24 << 10)):
        with pytest.raises(ValueError):
            AllReduceConfig(**bad)


def test_barrier_error_code_reaches_the_kernels():
    assert ErrorCode.BARRIER.op == "barrier"
    defines = kernel_defines()
    assert defines["MOECOMM_ERR_BARRIER"] == int(ErrorCode.BARRIER)
    assert defines["MOECOMM_BARRIER_MAX_RANKS"] >= 8


def test_bench_overlap_is_registered():
    from moecomm.bench import overlap
    from moecomm.bench.__main__ import SUITES

    assert SUITES["overlap"] is overlap
    import argparse

    p = argparse.ArgumentParser()
    overlap.add_arguments(p)
    args = p.parse_args([])
    assert args.num_sms.split(",") == ["8", "16", "24", "32", "all"]
    assert (args.tokens, args.hidden, args.experts, args.top_k) == (4096, 7168, 256, 8)
    assert args.ar_bytes == 16 << 20
    assert args.gemm_sms == "rest"  # the GEMM leaves the budget's SMs to the communication


def test_bench_overlap_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from moecomm.bench import overlap

    rows = [{"comm": c, "num_sms": s, "hidden": 0.5, "gemm_keep": 0.9}
            for c in ("moe", "allreduce") for s in (8, 16, "all")]
    path = tmp_path / "o.png"
    overlap._plot(rows, path, {"ranks": 2, "device": "X"})
    assert path.stat().st_size > 0


def test_barrier_refuses_a_non_group():
    from moecomm.barrier import DeviceBarrier

    with pytest.raises(TypeError, match="expected a ProcessGroup"):
        DeviceBarrier("group")


def test_bench_overlap_gemm_shape_follows_the_target():
    from moecomm.bench.overlap import M_STEP, gemm_shape

    assert gemm_shape(1000.0, 340.0, 8192) == (8064, 3)   # three GEMMs share the target
    assert gemm_shape(340.0, 340.0, 8192) == (8192, 1)
    assert gemm_shape(350.0, 340.0, 8192) == (8192, 1)    # within 5% of one GEMM
    rows, reps = gemm_shape(482.0, 337.0, 8192)            # 1.4 GEMMs: two shorter ones
    assert reps == 2 and abs(rows * reps - 8192 * 482 / 337) <= 2 * M_STEP
    rows, reps = gemm_shape(68.0, 340.0, 8192)             # shorter than one GEMM
    assert reps == 1 and rows % M_STEP == 0 and abs(rows - 8192 * 68 / 340) <= M_STEP
    assert gemm_shape(0.01, 340.0, 8192) == (M_STEP, 1)   # at least one step of M
    assert gemm_shape(0.01, 340.0, 64) == (64, 1)
    with pytest.raises(ValueError, match="positive"):
        gemm_shape(0.0, 340.0, 8192)


def test_bench_overlap_hidden_fraction():
    from moecomm.bench.overlap import hidden_fraction

    assert hidden_fraction(400.0, 100.0, 400.0) == 1.0    # comm fully hidden
    assert hidden_fraction(400.0, 100.0, 500.0) == 0.0    # serialized
    assert hidden_fraction(100.0, 400.0, 450.0) == 0.5


def test_bench_overlap_gemm_runs_on_the_given_stream():
    """CuPy's cuBLAS wrappers bind the handle to CuPy's current stream on every call, so
    the GEMM must be issued with the timed stream current (else it runs elsewhere and
    the compute timing measures nothing)."""
    from moecomm.bench import overlap

    current = []
    calls = []

    class FakeStream:
        def __enter__(self):
            current.append(self)

        def __exit__(self, *exc):
            current.pop()

    class FakeCublas:
        @staticmethod
        def setPointerMode(handle, mode):
            pass

        @staticmethod
        def gemmEx(handle, ta, tb, n, m, k, *rest):
            calls.append((current[-1] if current else None, n, m, k))

    class Arr:
        def __init__(self):
            self.data = type("D", (), {"ptr": 1})()

    g = object.__new__(overlap.Gemm)
    g._cublas, g._handle = FakeCublas, 0
    g.m, g.n, g.k, g.rows, g.reps = 8192, 2048, 7168, 1024, 3
    g.a = g.b = g.c = Arr()
    g._alpha = g._beta = np.ones(1, np.float32)
    s = FakeStream()
    g(s)
    assert calls == [(s, 2048, 1024, 7168)] * 3
    assert g.tflops == pytest.approx(2 * 1024 * 2048 * 7168 * 3 / 1e12)
