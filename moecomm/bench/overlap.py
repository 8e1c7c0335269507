"""Communication hidden behind a GEMM: MoE dispatch + combine and all-reduce, by SM budget.

A bf16 GEMM (cuBLAS through CuPy, ``--gemm M,N,K``, default an expert/TP matmul of 8192 x
2048 x 7168, repeated ``reps`` times so that compute lasts at least as long as the
communication at full width) runs on the compute stream while, on a communication stream
forked from it by an event (``previous_event``) and joined by the op's ``CommHandle``:

* ``moe``: ``MoeAlltoAll`` dispatch (bf16 hidden + int32 ids + fp32 weights, ``--tokens``
  4096 per rank, hidden 7168, top-8 of 256 experts, uniform routing) + combine of the
  received rows, ``MoeAlltoAllConfig(num_sms=...)``;
* ``allreduce``: a 16 MiB bf16 ``all_reduce`` (``AllReduceConfig(num_sms=...)``),

for ``num_sms`` in 8, 16, 24, 32 and all; the communication stream has the highest
priority. Per case: compute alone, communication alone,
both overlapped (median of CUDA-event timings, each behind a GPU head start so that the
host has issued every launch first), the hidden fraction
``(compute + comm - overlapped) / min(compute, comm)`` and ``gemm_keep``, the GEMM's
standalone time over its time while overlapped (1.0: unslowed). Target on 2 x H200:
``hidden >= 0.85`` at some ``num_sms <= 24`` with ``gemm_keep >= 0.85``.

The GEMM needs cuBLAS (``pip install nvidia-cublas-cu12``, or ``-cu13``).
"""

from __future__ import annotations

import cupy
import numpy as np

from ..allreduce import AllReduceConfig, all_reduce, create_allreduce_workspace
from ..kernels import get_kernel
from ..moe.alltoall import MoeAlltoAll, MoeAlltoAllConfig
from ..tensors import bfloat16
from .common import environment, print_table, pyplot, require_gpu, write_result

NUM_SMS = ("8", "16", "24", "32", "all")
SPIN_US = 300           # GPU head start before each timed run
_CUDA_R_16BF = 14       # cudaDataType
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_HIGHEST_PRIORITY = -1000  # lower is higher; clamped to the device's range


def add_arguments(p) -> None:
    p.add_argument("--comm", default="moe,allreduce", help="moe, allreduce or both")
    p.add_argument("--num-sms", default=",".join(NUM_SMS),
                   help="SM budgets, comma-separated ('all': every SM)")
    p.add_argument("--gemm", default="8192,2048,7168", help="M,N,K of the bf16 GEMM")
    p.add_argument("--reps", type=int, default=0,
                   help="GEMMs per run (0: enough to outlast the communication)")
    p.add_argument("--tokens", type=int, default=4096, help="MoE tokens per rank")
    p.add_argument("--hidden", type=int, default=7168, help="MoE hidden size (bf16)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--ar-bytes", type=int, default=16 << 20, help="all-reduce message bytes")
    p.add_argument("--iters", type=int, default=20, help="timed runs per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", action="store_true", help="write a PNG (needs matplotlib)")


class Gemm:
    """``c = a @ b`` in bf16 with fp32 accumulation (cuBLAS), ``reps`` times on a stream."""

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
        self.reps = 1

    def __call__(self, stream) -> None:
        cb = self._cublas
        cb.setStream(self._handle, stream.ptr)
        cb.setPointerMode(self._handle, 0)  # alpha and beta on the host
        for _ in range(self.reps):
            # Row-major c[m, n] = a[m, k] b[k, n] is column-major c^T = b^T a^T.
            cb.gemmEx(self._handle, 0, 0, self.n, self.m, self.k, self._alpha.ctypes.data,
                      self.b.data.ptr, _CUDA_R_16BF, self.n, self.a.data.ptr, _CUDA_R_16BF,
                      self.k, self._beta.ctypes.data, self.c.data.ptr, _CUDA_R_16BF, self.n,
                      _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)

    @property
    def tflops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.reps / 1e12


def _bf16(x32: np.ndarray) -> cupy.ndarray:
    return cupy.asarray(x32.astype(bfloat16))


class Timer:
    """Timed runs: [head start] start | fork -> comm op on the comm stream | GEMMs on the
    compute stream, gemm_end | join | stop; medians in microseconds."""

    def __init__(self, iters: int):
        self.iters = iters
        self.compute = cupy.cuda.Stream(non_blocking=True)
        # The communication stream at the highest priority: blocks of its kernels are
        # scheduled first whenever the GEMM frees an SM (what serving engines do).
        # CUDA clamps a priority beyond the device's range to its greatest.
        self.comm = cupy.cuda.Stream(non_blocking=True, priority=_HIGHEST_PRIORITY)
        self._spin = get_kernel("bench_moe.cu", "bench_spin")
        self._events = [cupy.cuda.Event() for _ in range(3)]

    def run(self, gemm: Gemm | None, comm_op) -> tuple[float, float]:
        """(total, gemm) medians; ``comm_op(stream, previous_event)`` returns a CommHandle."""
        start, gemm_end, stop = self._events
        totals, gemms = [], []
        for i in range(self.iters + 3):  # 3 warm-up runs
            self._spin((1,), (1,), (np.uint64(SPIN_US * 1000),), stream=self.compute)
            start.record(self.compute)
            handle = comm_op(self.comm, start) if comm_op is not None else None
            if gemm is not None:
                gemm(self.compute)
            gemm_end.record(self.compute)
            if handle is not None:
                handle.wait(self.compute)
            stop.record(self.compute)
            stop.synchronize()
            if i >= 3:
                totals.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
                gemms.append(cupy.cuda.get_elapsed_time(start, gemm_end) * 1e3)
        return float(np.median(totals)), float(np.median(gemms))


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
    m, n, k = (int(v) for v in args.gemm.split(","))
    gemm = Gemm(m, n, k, rng)
    timer = Timer(args.iters)
    gemm_one, _ = timer.run(gemm, None)
    rows = []
    for comm in comms:
        comm_full = None
        for budget in sorted(budgets, key=lambda b: b is not None):  # "all" first
            op, close = _COMMS[comm](group, args, budget, rng)
            try:
                group.barrier()
                comm_alone, _ = timer.run(None, op)
                comm_alone = max(group.allgather(comm_alone))
                if comm_full is None:
                    comm_full = comm_alone
                    gemm.reps = args.reps or max(1, int(np.ceil(comm_full / gemm_one)))
                    gemm.reps = max(group.allgather(gemm.reps))
                    compute, _ = timer.run(gemm, None)
                    compute = max(group.allgather(compute))
                group.barrier()
                both, gemm_in = timer.run(gemm, op)
                both, gemm_in = (max(v) for v in zip(*group.allgather((both, gemm_in))))
            finally:
                cupy.cuda.runtime.deviceSynchronize()
                close()
            hidden = (compute + comm_alone - both) / min(compute, comm_alone)
            rows.append({"comm": comm, "num_sms": "all" if budget is None else budget,
                         "gemm_reps": gemm.reps, "compute_us": compute, "comm_us": comm_alone,
                         "overlapped_us": both, "hidden": hidden,
                         "gemm_keep": compute / gemm_in if gemm_in else None,
                         "gemm_TFLOPS": gemm.tflops / (compute * 1e-6)})
    met = any(r["hidden"] >= 0.85 and r["gemm_keep"] >= 0.85 and r["num_sms"] != "all"
              and r["num_sms"] <= 24 for r in rows if r["comm"] == "moe")
    if group.rank == 0:
        print(f"# overlap: {group.size} ranks on {env['gpu_count']} x {env['device']}, GEMM "
              f"{m}x{n}x{k} bf16" + ("" if exclusive else
                                      " (ranks share GPUs: timings are not meaningful)"))
        print_table(rows, ["comm", "num_sms", "gemm_reps", "compute_us", "comm_us",
                           "overlapped_us", "hidden", "gemm_keep", "gemm_TFLOPS"])
        print(f"target (moe: hidden >= 0.85 at num_sms <= 24, gemm_keep >= 0.85): "
              f"{'met' if met else 'not met'}")
        path = write_result(args.out, "overlap", env, rows, gemm=[m, n, k],
                            tokens=args.tokens, hidden=args.hidden, experts=args.experts,
                            top_k=args.top_k, allreduce_bytes=args.ar_bytes,
                            target_met=met, shared_gpu=not exclusive)
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
