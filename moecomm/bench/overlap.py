"""Communication hidden behind a GEMM: MoE dispatch + combine and all-reduce, by SM budget.

A bf16 GEMM (cuBLAS through CuPy, ``--gemm M,N,K``, default an expert/TP matmul of 8192 x
2048 x 7168) runs on the compute stream while, on a communication stream forked from it
by an event (``previous_event``) and joined by the op's ``CommHandle``:

* ``moe``: ``MoeAlltoAll`` dispatch (bf16 hidden + int32 ids + fp32 weights, ``--tokens``
  4096 per rank, hidden 7168, top-8 of 256 experts, uniform routing) + combine of the
  received rows, ``MoeAlltoAllConfig(num_sms=...)``;
* ``allreduce``: a 16 MiB bf16 ``all_reduce`` (``AllReduceConfig(num_sms=...)``),

for ``num_sms`` in 8, 16, 24, 32 and all; the communication stream has the highest
priority. A cuBLAS GEMM on Hopper holds its SMs' registers and shared memory until it
ends, so nothing runs beside it on them: with ``--gemm-sms rest`` (the default) the GEMM
is told to target the SMs the budget leaves (``cublasSetSmCountTarget``, every SM for
"all"), as an engine partitions its SMs; ``--gemm-sms all`` lets it take every SM.

The GEMM is sized per case to last about as long as that case's communication alone
(``--compute-us``: a fixed duration instead; ``--reps``: a fixed number of full GEMMs):
``gemm_reps`` GEMMs of the first ``gemm_m`` rows of A (M shrunk, in multiples of 128,
when one full GEMM outlasts the target), then refined once from its measured time. Its
result is checked once against NumPy on a sample of entries, so a GEMM that did not run
fails the benchmark.

Timing (CUDA events, median of ``--iters`` runs, each behind a GPU head start long enough
for the host to issue every launch first, ranks aligned by a barrier): ``start`` on the
compute stream is the fork; ``gemm_end`` is recorded on the compute stream after the
GEMMs, ``comm_end`` on the communication stream after the op. compute = start ->
gemm_end alone; comm = start -> comm_end alone; overlapped = start -> the later of
gemm_end and comm_end with both running (from the start of both to the end of both).
Every time is the maximum over ranks. Reported per case: the hidden fraction
``(compute + comm - overlapped) / min(compute, comm)`` (1: the shorter one fully hidden,
0: serialized; compute is the GEMM alone on its SMs) and ``gemm_keep``, the same GEMMs'
standalone time on every SM (``compute_all_us``) over their time while overlapped (1.0:
neither the SMs given up nor the overlap slowed them). Target on 2 x H200:
``hidden >= 0.85`` at some ``num_sms <= 24`` with ``gemm_keep >= 0.85``, for each
communication (``target_met`` in the JSON, by communication).

The GEMM needs cuBLAS (``pip install nvidia-cublas-cu12``, or ``-cu13``).
"""

from __future__ import annotations

import ctypes
import math

import cupy
import numpy as np

from ..allreduce import AllReduceConfig, all_reduce, create_allreduce_workspace
from ..kernels import get_kernel
from ..moe.alltoall import MoeAlltoAll, MoeAlltoAllConfig
from ..reference import to_float32
from ..tensors import bfloat16
from .common import environment, print_table, pyplot, require_gpu, write_result

NUM_SMS = ("8", "16", "24", "32", "all")
SPIN_US = 300           # GPU head start before each timed run ...
SPIN_PER_LAUNCH_US = 20  # ... plus this per GEMM launch the host issues behind it
M_STEP = 128            # granularity of a shrunk GEMM's M
_CUDA_R_16BF = 14       # cudaDataType
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_HIGHEST_PRIORITY = -1000  # lower is higher; clamped to the device's range


def add_arguments(p) -> None:
    p.add_argument("--comm", default="moe,allreduce", help="moe, allreduce or both")
    p.add_argument("--num-sms", default=",".join(NUM_SMS),
                   help="SM budgets, comma-separated ('all': every SM)")
    p.add_argument("--gemm", default="8192,2048,7168", help="M,N,K of the bf16 GEMM")
    p.add_argument("--gemm-sms", choices=("rest", "all"), default="rest",
                   help="SMs the GEMM targets: those the budget leaves, or every SM")
    p.add_argument("--compute-us", type=float, default=0.0,
                   help="GEMM duration per run (0: each case's communication time)")
    p.add_argument("--reps", type=int, default=0,
                   help="full GEMMs per run, overriding --compute-us (0: sized by time)")
    p.add_argument("--tokens", type=int, default=4096, help="MoE tokens per rank")
    p.add_argument("--hidden", type=int, default=7168, help="MoE hidden size (bf16)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--ar-bytes", type=int, default=16 << 20, help="all-reduce message bytes")
    p.add_argument("--iters", type=int, default=20, help="timed runs per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", action="store_true", help="write a PNG (needs matplotlib)")


def gemm_shape(target_us: float, full_us: float, m: int) -> tuple[int, int]:
    """(rows, reps): ``reps`` GEMMs of ``rows`` <= ``m`` rows of A lasting about
    ``target_us`` when one full GEMM lasts ``full_us``: as few GEMMs as reach the target,
    each shrunk to share it (time taken as proportional to M; multiples of ``M_STEP``, at
    least one step)."""
    if target_us <= 0 or full_us <= 0:
        raise ValueError(f"gemm_shape: durations must be positive, got target {target_us} "
                         f"and GEMM {full_us} us")
    reps = max(1, math.ceil(target_us / full_us - 0.05))  # 5% over one GEMM: still one
    rows = int(round(m * target_us / (reps * full_us) / M_STEP)) * M_STEP
    return max(min(M_STEP, m), min(m, rows)), reps


def hidden_fraction(compute: float, comm: float, overlapped: float) -> float:
    """Share of the shorter of compute and communication that overlapping hid:
    ``(compute + comm - overlapped) / min(compute, comm)``."""
    return (compute + comm - overlapped) / min(compute, comm)


class Gemm:
    """``c = a[:rows] @ b`` in bf16 with fp32 accumulation (cuBLAS), ``reps`` times on a
    stream."""

    def __init__(self, m: int, n: int, k: int, rng: np.random.Generator):
        try:
            from cupy_backends.cuda.libs import cublas

            self._handle = cupy.cuda.device.get_cublas_handle()
        except Exception as exc:  # ImportError or a missing library
            raise SystemExit(f"bench overlap: the GEMM needs cuBLAS ({exc}); install "
                             "nvidia-cublas-cu12 (or -cu13)") from None
        self._cublas = cublas
        self.m, self.n, self.k = m, n, k
        self.a = _bf16(rng.standard_normal((m, k), np.float32) * 0.1)
        self.b = _bf16(rng.standard_normal((k, n), np.float32) * 0.1)
        self.c = cupy.empty((m, n), bfloat16)
        self._alpha = np.ones(1, np.float32)
        self._beta = np.zeros(1, np.float32)
        self.rows, self.reps = m, 1
        self._set_sm_count = _cublas_function("cublasSetSmCountTarget")

    def target_sms(self, sms: int) -> None:
        """Make the GEMM target ``sms`` SMs (0: every SM; cuBLAS treats it as a hint)."""
        status = self._set_sm_count(ctypes.c_void_p(self._handle), int(sms))
        if status:
            raise SystemExit(f"bench overlap: cublasSetSmCountTarget returned {status}")

    def __call__(self, stream) -> None:
        cb = self._cublas
        # CuPy's cuBLAS wrappers bind the handle to CuPy's *current* stream before every
        # call (a setStream of ours would be overridden): make `stream` current.
        with stream:
            cb.setPointerMode(self._handle, 0)  # alpha and beta on the host
            for _ in range(self.reps):
                # Row-major c[rows, n] = a[rows, k] b[k, n] is column-major c^T = b^T a^T.
                cb.gemmEx(self._handle, 0, 0, self.n, self.rows, self.k,
                          self._alpha.ctypes.data, self.b.data.ptr, _CUDA_R_16BF, self.n,
                          self.a.data.ptr, _CUDA_R_16BF, self.k, self._beta.ctypes.data,
                          self.c.data.ptr, _CUDA_R_16BF, self.n, _CUBLAS_COMPUTE_32F,
                          _CUBLAS_GEMM_DEFAULT)

    def check(self, stream, rng: np.random.Generator, samples: int = 64) -> str | None:
        """Run once on ``stream`` over a poisoned ``c`` and compare sampled entries with
        NumPy (fp32 dot products, bf16 output: relative 2^-7 plus a small absolute);
        what is wrong, or None."""
        reps = self.reps
        with stream:
            self.c.view(np.uint16).fill(0x7FC0)  # NaN
        self.reps = 1
        try:
            self(stream)
        finally:
            self.reps = reps
        i = rng.integers(0, self.rows, samples)
        j = rng.integers(0, self.n, samples)
        a = to_float32(cupy.asnumpy(self.a[:self.rows], stream=stream)[i])
        b = to_float32(cupy.asnumpy(self.b, stream=stream)[:, j])
        got = to_float32(cupy.asnumpy(self.c[:self.rows], stream=stream)[i, j])
        stream.synchronize()
        want = np.einsum("sk,ks->s", a, b)
        tol = 2.0 ** -7 * np.abs(want) + 1e-2
        bad = np.flatnonzero(~(np.abs(got - want) <= tol))
        if not bad.size:
            return None
        return (f"the GEMM's result is wrong at {bad.size} of {samples} sampled entries "
                f"(e.g. c[{i[bad[0]]}, {j[bad[0]]}] = {got[bad[0]]}, expected {want[bad[0]]})")

    @property
    def tflops(self) -> float:
        """Tera-FLOPs of one run (``reps`` GEMMs)."""
        return 2.0 * self.rows * self.n * self.k * self.reps / 1e12


def _cublas_function(name: str):
    """A function of the cuBLAS library CuPy loaded (not every one has a CuPy wrapper)."""
    for soname in ("libcublas.so.13", "libcublas.so.12"):
        try:
            fn = getattr(ctypes.CDLL(soname), name)
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        return fn
    raise SystemExit(f"bench overlap: {name} not found in libcublas.so.13 or .12")


def _bf16(x32: np.ndarray) -> cupy.ndarray:
    return cupy.asarray(x32.astype(bfloat16))


class Timer:
    """Timed runs on every rank: [barrier, head start] start (compute stream) | fork ->
    comm op on the comm stream, comm_end | GEMMs on the compute stream, gemm_end | join.
    Medians in microseconds."""

    def __init__(self, iters: int, barrier=None):
        self.iters = iters
        self._barrier = barrier
        self.compute = cupy.cuda.Stream(non_blocking=True)
        # The communication stream at the highest priority: blocks of its kernels are
        # scheduled first whenever the GEMM frees an SM (what serving engines do).
        # CUDA clamps a priority beyond the device's range to its greatest.
        self.comm = cupy.cuda.Stream(non_blocking=True, priority=_HIGHEST_PRIORITY)
        self._spin = get_kernel("bench_moe.cu", "bench_spin")
        self._start, self._gemm_end, self._comm_end = (cupy.cuda.Event() for _ in range(3))

    def run(self, gemm: Gemm | None, comm_op) -> dict:
        """Medians of ``compute`` (start -> gemm_end), ``comm`` (start -> comm_end) and
        ``total`` (start -> the later end); absent parts are None. ``comm_op(stream,
        previous_event)`` issues the op on ``stream`` and returns its CommHandle."""
        start, gemm_end, comm_end = self._start, self._gemm_end, self._comm_end
        spin_ns = 1000 * (SPIN_US + (SPIN_PER_LAUNCH_US * gemm.reps if gemm else 0))
        samples = {"compute": [], "comm": [], "total": []}
        for i in range(self.iters + 3):  # 3 warm-up runs
            if self._barrier is not None:
                self._barrier()
            self._spin((1,), (1,), (np.uint64(spin_ns),), stream=self.compute)
            start.record(self.compute)
            handle = None
            if comm_op is not None:
                handle = comm_op(self.comm, start)
                comm_end.record(self.comm)
            if gemm is not None:
                gemm(self.compute)
                gemm_end.record(self.compute)
            if handle is not None:
                handle.wait(self.compute)
            self.compute.synchronize()
            self.comm.synchronize()
            if i < 3:
                continue
            ends = []
            if gemm is not None:
                ends.append(cupy.cuda.get_elapsed_time(start, gemm_end) * 1e3)
                samples["compute"].append(ends[-1])
            if comm_op is not None:
                ends.append(cupy.cuda.get_elapsed_time(start, comm_end) * 1e3)
                samples["comm"].append(ends[-1])
            samples["total"].append(max(ends))
        return {k: float(np.median(v)) if v else None for k, v in samples.items()}


def _moe_op(group, args, budget, rng):
    """(comm_op, close) of MoE dispatch + combine with SM budget ``budget`` (None: all)."""
    T, H, k = args.tokens, args.hidden, args.top_k
    a2a = MoeAlltoAll(group, T, k, args.experts, hidden_size=H,
                      config=MoeAlltoAllConfig(num_sms=budget))
    ids = np.argsort(rng.random((T, args.experts)), axis=1)[:, :k].astype(np.int32)
    d_ids = cupy.asarray(ids)
    x = _bf16(rng.standard_normal((T, H), np.float32))
    w = cupy.asarray(rng.random((T, k), np.float32))
    out = cupy.empty((T, H), bfloat16)
    cupy.cuda.runtime.deviceSynchronize()

    def op(stream, previous_event):
        recv, h = a2a.dispatch(d_ids, [x, d_ids, w], T, stream=stream,
                               previous_event=previous_event, async_op=True)
        _, h2 = a2a.combine(recv[0], T, stream=stream, out=out, previous_event=h,
                            async_op=True)
        return h2

    return op, a2a.close


def _allreduce_op(group, args, budget, rng):
    n = args.ar_bytes // 2
    ws = create_allreduce_workspace(group, max_bytes=args.ar_bytes, dtype=bfloat16,
                                    config=AllReduceConfig(num_sms=budget))
    x = _bf16(rng.standard_normal(n, np.float32))
    out = cupy.empty(n, bfloat16)
    cupy.cuda.runtime.deviceSynchronize()

    def op(stream, previous_event):
        _, h = all_reduce(x, ws, out=out, stream=stream, previous_event=previous_event,
                          async_op=True)
        return h

    return op, ws.close


_COMMS = {"moe": _moe_op, "allreduce": _allreduce_op}


def run(args) -> int:
    group = require_gpu()
    env = environment(group)
    exclusive = env["gpu_count"] == group.size
    rng = np.random.default_rng([args.seed, group.rank])
    comms = [c for c in args.comm.split(",") if c]
    for c in comms:
        if c not in _COMMS:
            raise SystemExit(f"--comm: {c!r} is not one of {sorted(_COMMS)}")
    budgets = [None if b == "all" else int(b) for b in args.num_sms.split(",") if b]
    if args.compute_us < 0 or args.reps < 0:
        raise SystemExit("--compute-us and --reps must be >= 0")
    m, n, k = (int(v) for v in args.gemm.split(","))
    gemm = Gemm(m, n, k, rng)
    timer = Timer(args.iters, group.barrier)
    errors = [e for e in group.allgather(gemm.check(timer.compute, rng)) if e]
    if errors:
        raise SystemExit(f"bench overlap: {errors[0]}")

    def slowest(value: float) -> float:
        return max(group.allgather(value))

    full_us = slowest(timer.run(gemm, None)["compute"])  # one GEMM of all M rows

    def size_gemm(target_us: float) -> float:
        """Shape the GEMM to last about ``target_us`` (every rank the same); its time."""
        if args.reps:
            gemm.rows, gemm.reps = m, args.reps
            return slowest(timer.run(gemm, None)["compute"])
        gemm.rows, gemm.reps = gemm_shape(target_us, full_us, m)
        compute = slowest(timer.run(gemm, None)["compute"])
        if abs(compute - target_us) > 0.25 * target_us:  # GEMM time is not linear in M
            gemm.rows, gemm.reps = gemm_shape(target_us, compute / (gemm.rows * gemm.reps) * m, m)
            compute = slowest(timer.run(gemm, None)["compute"])
        return compute

    device_sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    rows = []
    for comm in comms:
        for budget in sorted(budgets, key=lambda b: b is not None):  # "all" first
            op, close = _COMMS[comm](group, args, budget, rng)
            gemm_sms = 0 if budget is None or args.gemm_sms == "all" else device_sms - budget
            try:
                comm_alone = slowest(timer.run(None, op)["comm"])
                gemm.target_sms(gemm_sms)
                compute = size_gemm(args.compute_us or comm_alone)
                both = timer.run(gemm, op)
                total, gemm_in = slowest(both["total"]), slowest(both["compute"])
                gemm.target_sms(0)
                compute_all = compute if gemm_sms == 0 else slowest(
                    timer.run(gemm, None)["compute"])
            finally:
                gemm.target_sms(0)
                cupy.cuda.runtime.deviceSynchronize()
                close()
            rows.append({"comm": comm, "num_sms": "all" if budget is None else budget,
                         "gemm_sms": gemm_sms or device_sms, "gemm_reps": gemm.reps,
                         "gemm_m": gemm.rows, "compute_us": compute,
                         "compute_all_us": compute_all, "comm_us": comm_alone,
                         "overlapped_us": total,
                         "hidden": hidden_fraction(compute, comm_alone, total),
                         "gemm_keep": compute_all / gemm_in,
                         "gemm_TFLOPS": gemm.tflops / (compute * 1e-6)})
    met = {c: any(r["hidden"] >= 0.85 and r["gemm_keep"] >= 0.85 and r["num_sms"] != "all"
                  and r["num_sms"] <= 24 for r in rows if r["comm"] == c) for c in comms}
    if group.rank == 0:
        print(f"# overlap: {group.size} ranks on {env['gpu_count']} x {env['device']}, GEMM "
              f"{m}x{n}x{k} bf16" + ("" if exclusive else
                                      " (ranks share GPUs: timings are not meaningful)"))
        print_table(rows, ["comm", "num_sms", "gemm_sms", "gemm_reps", "compute_us",
                           "compute_all_us", "comm_us", "overlapped_us", "hidden",
                           "gemm_keep", "gemm_TFLOPS"])
        print("target (hidden >= 0.85 at some num_sms <= 24, gemm_keep >= 0.85): " +
              ", ".join(f"{c} {'met' if ok else 'not met'}" for c, ok in met.items()))
        path = write_result(args.out, "overlap", env, rows, gemm=[m, n, k],
                            tokens=args.tokens, hidden=args.hidden, experts=args.experts,
                            top_k=args.top_k, allreduce_bytes=args.ar_bytes,
                            compute_us=args.compute_us or None, gemm_sms=args.gemm_sms,
                            target_met=met,
                            shared_gpu=not exclusive)
        print(f"wrote {path}")
        if args.plot:
            _plot(rows, path.with_suffix(".png"), env)
    group.close()
    return 0


def _plot(rows, path, env) -> None:
    plt = pyplot()
    if plt is None:
        return
    comms = sorted({r["comm"] for r in rows})
    fig, axes = plt.subplots(1, len(comms), figsize=(5.5 * len(comms), 4), squeeze=False)
    for ax, comm in zip(axes[0], comms):
        pts = [r for r in rows if r["comm"] == comm]
        labels = [str(r["num_sms"]) for r in pts]
        ax.plot(labels, [r["hidden"] for r in pts], marker="o", label="hidden fraction")
        ax.plot(labels, [r["gemm_keep"] for r in pts], marker="s", label="GEMM speed kept")
        ax.axhline(0.85, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("num_sms of the communication")
        ax.set_title(comm)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"overlap with a bf16 GEMM, {env['ranks']} ranks, {env['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
