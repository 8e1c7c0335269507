"""Multi-rank test jobs: start them under the ``mpiexec`` that matches this Python's
mpi4py, and run named test cases inside them.

Launching
    ``run_ranks`` runs ``python script args`` on N ranks; ``check_ranks`` also fails unless
    every rank ended with ``report_pass`` (for scripts that are one check from top to end).

Cases, inside a job (the worker side)
    A worker script declares case functions and ends by running them::

        @case
        def roundtrip(ctx): ...

        @case(dtypes=("bf16", "fp16"))        # two cases: exact[bf16], exact[fp16]
        def exact(ctx, dtype): ...

        @case(variants={"small": 16, "large": 1 << 20})     # sizes[small], sizes[large]
        def sizes(ctx, n): ...

        if __name__ == "__main__":
            run_cases()

    ``mpiexec -n 2 python worker.py [CASE ...]`` runs the named cases (default: every case
    not declared ``own_job``), always in declaration order, each inside try/except on every
    rank; ``python worker.py --list`` prints the cases. A case gets a :class:`CaseContext`:
    rank, world size, a NumPy generator seeded identically on every rank (from the job's seed
    and the case's name, so one case reruns alone on the same data), and the job's shared
    objects. It fails by raising (``assert``, ``pytest.raises``) and skips with
    ``pytest.skip(reason)``. After each case the ranks exchange their outcomes (a host
    allgather on a communicator of the harness's own), so every rank knows whether the case
    passed everywhere; after a failure anywhere the job's shared objects are closed, so the
    next case starts from fresh ones. Each rank prints one line per case::

        <CASE exact[bf16] 0 PASS 1.52s>
        <CASE exact[bf16] 1 FAIL 1.49s {"error": "AssertionError: ...", "where": ..., ...}>

    (the details are one JSON object), then ``<END rank passed=P failed=F skipped=S>`` and,
    when no case failed on any rank, the usual ``<PASS rank>``. The exit status is 0 when
    nothing failed, 1 otherwise. A case that runs longer than its ``timeout`` makes its rank
    dump every thread's stack and exit (a hung peer wait cannot stall the job forever).
    Rank 0 first prints ``<JOB seed=S ...>``; ``MOECOMM_TEST_SEED=S`` reruns with that seed.

    Cases that may leave the ranks out of step (a peer that never arrives, arguments that
    differ across ranks) are declared ``own_job=True`` (with their own ``ranks`` and ``env``
    if needed) and run only when named.

Jobs, from pytest (the test side)
    ``case_params(script, ranks)`` imports a worker (which does nothing at import) for its
    case list and returns pytest parameters ``(Job, case name)``: one job per rank count for
    the ordinary cases, one job per own-job case and rank count. The module-scoped fixture
    ``jobs`` (:class:`Jobs`) runs each job once, when its first test needs it; each test
    then passes, skips, or fails with its case's messages from every rank
    (``JobResult.check``) and the command that reruns it alone. A job that did not end
    cleanly (crash, timeout, missing ``<END>``) fails every one of its tests, with its
    output tail. When only some of a job's cases are selected (``-k``, node ids), the job
    runs just those.

By hand (from the checkout, with it on PYTHONPATH)::

    python tests/gpu/workers/allreduce_worker.py --list
    mpiexec -n 2 python tests/gpu/workers/allreduce_worker.py 'exact[bf16]' rotation[fp16]
    MOECOMM_TEST_SEED=123 mpiexec -n 4 python tests/gpu/workers/moe_a2a_worker.py graph_replay
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


# ======================================================================== launching
def mpiexec() -> str | None:
    """The mpiexec next to this interpreter (pip's mpich), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return str(beside)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _is_open_mpi(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def run_ranks(n: int, script: str, *args: str, env: dict | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python script args`` on ``n`` ranks; returns the finished process.

    The job's environment is this one plus ``env``, with the checkout on PYTHONPATH and
    NVLink multicast kept off. Past ``timeout`` seconds the whole job (mpiexec and every
    rank: they run in a process group of their own) is killed and
    ``subprocess.TimeoutExpired`` raised, carrying the output so far.
    """
    exe = mpiexec()
    if exe is None:
        raise RuntimeError("no mpiexec found: install the test extra (pip's mpich)")
    cmd = [exe]
    if _is_open_mpi(exe):
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    cmd += ["-n", str(n), sys.executable, str(ROOT / script), *args]
    full_env = dict(os.environ)
    full_env.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                     "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"})
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [full_env.get("PYTHONPATH")])])
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _kill_job(proc)
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except BaseException:  # Ctrl-C: the job is in a session of its own, end it too
        _kill_job(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_job(proc: subprocess.Popen) -> tuple[str, str]:
    """Terminate mpiexec and its ranks (its process group); the output they left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
    try:  # ranks that outlived mpiexec
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # something outside the group holds the pipes
        proc.kill()
        return "", "(the job's output could not be collected)"


def check_ranks(n: int, script: str, *args: str, env: dict | None = None,
                timeout: float = 240) -> str:
    """``run_ranks`` that fails the test with the job's output unless every rank passed.

    Each worker calls ``report_pass(rank)`` as its last act; all ``n`` must appear.
    """
    proc = run_ranks(n, script, *args, env=env, timeout=timeout)
    out = proc.stdout + proc.stderr
    # Ranks' lines may arrive glued together, so match the marker anywhere.
    passed = set(re.findall(r"<PASS (\d+)>", proc.stdout))
    if proc.returncode != 0 or len(passed) != n:
        raise AssertionError(f"{script} {' '.join(args)} on {n} ranks: exit {proc.returncode}, "
                             f"passed ranks {sorted(passed)}\n{out[-6000:]}")
    return out


def report_pass(rank: int) -> None:
    """A worker's last line: this rank ran every check."""
    _emit(f"<PASS {rank}>")


def _emit(line: str, stream=None) -> None:
    """One line in one write, so lines of different ranks do not interleave mid-line."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


# ======================================================================== cases (worker side)
SEED_ENV = "MOECOMM_TEST_SEED"
DEFAULT_CASE_TIMEOUT = 300.0
_NAME = re.compile(r"[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_.\-]+\])?")
# Names of dtypes=(...) and their NumPy dtypes (bf16: ml_dtypes' bfloat16).
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "int32": "int32",
               "uint8": "uint8"}


def dtype_of(name: str) -> np.dtype:
    """The NumPy dtype called ``name`` in ``DTYPE_NAMES``."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_NAMES)}")
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPE_NAMES[name])


@dataclass(frozen=True)
class Case:
    """One declared case: ``fn(ctx)``, or ``fn(ctx, value)`` for a variant."""

    name: str
    fn: Callable
    args: tuple = ()
    own_job: bool = False
    ranks: tuple[int, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_CASE_TIMEOUT


_REGISTRY: dict[str, dict[str, Case]] = {}


def case(fn: Callable | None = None, *, dtypes=None, variants: dict | None = None,
         own_job: bool = False, ranks=None, env: dict | None = None,
         timeout: float = DEFAULT_CASE_TIMEOUT):
    """Declare a case of this worker: ``@case`` or ``@case(...)``.

    dtypes: names of ``DTYPE_NAMES``: one case per dtype, named ``fn[name]``, called as
        ``fn(ctx, numpy_dtype)``.
    variants: ``{tag: value}``: one case per entry, named ``fn[tag]``, called as
        ``fn(ctx, value)`` (for other parameters: sizes, formats, scenarios).
    own_job: run only when named, in a job of its own (pytest does so): for cases that
        may leave the ranks out of step. ``ranks`` (rank counts, default the test's) and
        ``env`` (variables the job needs; checked when it runs) describe that job.
    timeout: seconds before the rank dumps its stacks and exits.
    """
    if dtypes is not None:
        if variants is not None:
            raise ValueError("pass dtypes or variants, not both")
        variants = {d: dtype_of(d) for d in dtypes}

    def register(f: Callable) -> Callable:
        module = _REGISTRY.setdefault(f.__module__, {})
        named = [(f.__name__, ())] if variants is None else [
            (f"{f.__name__}[{tag}]", (value,)) for tag, value in variants.items()]
        for name, args in named:
            if not _NAME.fullmatch(name):
                raise ValueError(f"case name {name!r}: letters, digits, _.- and one [tag]")
            if name in module:
                raise ValueError(f"case {name} declared twice")
            module[name] = Case(name, f, args, own_job, None if ranks is None else tuple(ranks),
                                tuple(sorted((env or {}).items())), float(timeout))
        return f

    return register if fn is None else register(fn)


def worker_cases(module: str = "__main__") -> list[Case]:
    """The cases a module declared, in declaration order."""
    return list(_REGISTRY.get(module, {}).values())


class CaseContext:
    """What a case sees.

    name, rank, world: the case and this rank's place in COMM_WORLD.
    seed, rng: a seed and a NumPy generator, identical on every rank, derived from the
        job's seed and the case's name. Draw from ``rng`` the same way on every rank.
    Attributes returned by the worker's ``setup`` (e.g. ``group``, ``stream``) are set
    on every context.
    """

    def __init__(self, job: "_JobState", name: str, seed: int, extras: dict):
        self._job = job
        self.name, self.rank, self.world = name, job.rank, job.world
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.__dict__.update(extras)

    def new_seed(self) -> int:
        """A fresh seed, the same on every rank (drawn from ``rng``)."""
        return int(self.rng.integers(1 << 62))

    def shared(self, key, make: Callable):
        """The job's object under ``key``, made by ``make()`` on first use (on every rank:
        collective if ``make`` is). Cases that share one make their calls in sequence on
        one object, as a user would; run alone, a case makes its own. Shared objects are
        closed (``close()``, in reverse order of creation) at the end of the job and after
        a case that failed on any rank."""
        if key not in self._job.shared:
            self._job.shared[key] = make()
        return self._job.shared[key]

    def drop(self, key):
        """Forget the shared object ``key`` and return it (None if there is none): the
        caller closes it."""
        return self._job.shared.pop(key, None)

    def allgather(self, obj) -> list:
        """Every rank's ``obj`` (the harness's own communicator)."""
        return self._job.comm.allgather(obj)

    def barrier(self) -> None:
        self._job.comm.Barrier()


@dataclass
class _JobState:
    comm: object
    rank: int
    world: int
    seed: int
    shared: dict = field(default_factory=dict)


def case_seed(job_seed: int, name: str) -> int:
    """The seed of case ``name`` in a job seeded ``job_seed`` (the same on every rank)."""
    return int(np.random.SeedSequence([job_seed, zlib.crc32(name.encode())])
               .generate_state(1, np.uint64)[0] >> 2)


def _details(exc: BaseException) -> dict:
    """One failure as JSON-able text: the error, where in the tests it happened (innermost
    first) and the end of the traceback."""
    error = f"{type(exc).__name__}: {exc}".strip()
    here = Path(__file__).resolve()
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve() != here
              and str(Path(f.filename).resolve()).startswith(str(ROOT / "tests"))]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}"
                        for f in reversed(frames[-4:]))
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"error": error[:2000], "where": where, "traceback": text[-3000:]}


def _close_shared(job: _JobState) -> list[str]:
    """Close the job's shared objects, newest first (collective, like their close());
    what failed to close, as messages."""
    faulthandler.dump_traceback_later(DEFAULT_CASE_TIMEOUT, exit=True)
    failures = []
    while job.shared:
        key, obj = job.shared.popitem()
        try:
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 - report and go on closing the rest
            failures.append(f"closing shared {key!r}: {type(exc).__name__}: {exc}")
            _emit(f"[rank {job.rank}] {failures[-1]}", sys.stderr)
    faulthandler.cancel_dump_traceback_later()
    return failures


def _select(cases: list[Case], argv: list[str]) -> list[Case]:
    if not argv:
        return [c for c in cases if not c.own_job]
    known = [c.name for c in cases]
    unknown = [a for a in argv if a not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    wanted = set(argv)
    return [c for c in cases if c.name in wanted]


def _list(cases: list[Case]) -> None:
    for c in cases:
        extra = []
        if c.own_job:
            extra.append("own job")
            if c.ranks:
                extra.append(f"ranks {','.join(map(str, c.ranks))}")
            extra += [f"{k}={v}" for k, v in c.env]
        print(c.name + (f"  ({'; '.join(extra)})" if extra else ""))


def run_cases(*, setup: Callable[[], dict] | None = None, context: type = CaseContext,
              module: str = "__main__", argv: list[str] | None = None) -> None:
    """Run the selected cases of ``module`` on this rank (see the module doc); exits.

    setup: called once on every rank before the first case; the dict it returns becomes
        attributes of every case's context. If it fails on any rank, every case fails
        with its error.
    context: the class of the contexts (a :class:`CaseContext` with helper methods).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    cases = worker_cases(module)
    if argv[:1] == ["--list"]:
        _list(cases)
        sys.exit(0)
    selected = _select(cases, argv)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD.Dup()
    rank, world = comm.Get_rank(), comm.Get_size()
    seed = os.environ.get(SEED_ENV)
    seed = comm.bcast(int(seed) if seed else int.from_bytes(os.urandom(7), "little"))
    job = _JobState(comm, rank, world, seed)
    if rank == 0:
        _emit(f"<JOB seed={seed} ranks={world} cases={','.join(c.name for c in selected)}>")

    faulthandler.dump_traceback_later(DEFAULT_CASE_TIMEOUT, exit=True)
    try:
        extras, setup_error = (setup() if setup else {}), None
    except Exception as exc:  # noqa: BLE001 - reported as every case's failure
        extras, setup_error = {}, _details(exc)
        _emit(f"[rank {rank}] job setup failed:\n{setup_error['traceback']}", sys.stderr)
    finally:
        faulthandler.cancel_dump_traceback_later()
    setup_errors = [(r, e) for r, e in enumerate(comm.allgather(setup_error)) if e]

    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    failed_anywhere = []
    for c in selected:
        if setup_errors:  # this rank's own error, else the first rank's
            where, error = next(((r, e) for r, e in setup_errors if r == rank), setup_errors[0])
            status, details, seconds = "FAIL", dict(error), 0.0
            details["error"] = f"job setup failed on rank {where}: {error['error']}"
        else:
            status, details, seconds = _run_one(job, c, context, extras)
        counts[status] += 1
        tail = "" if status == "PASS" else " " + json.dumps(details)
        _emit(f"<CASE {c.name} {rank} {status} {seconds:.2f}s{tail}>")
        if "FAIL" in comm.allgather(status):
            failed_anywhere.append(c.name)
            _close_shared(job)  # the next case starts from fresh objects

    for failure in _close_shared(job):  # a close that fails fails the job
        _emit(f"<CLOSE-FAIL {rank} {json.dumps(failure)}>")
        failed_anywhere.append("closing the shared objects")
    if any(comm.allgather(bool(failed_anywhere))):
        failed_anywhere = failed_anywhere or ["closing the shared objects (another rank)"]
    _emit(f"<END {rank} passed={counts['PASS']} failed={counts['FAIL']} "
          f"skipped={counts['SKIP']}>")
    if not failed_anywhere:
        report_pass(rank)
    elif rank == 0:
        _emit(f"failed on some rank: {', '.join(failed_anywhere)}", sys.stderr)
    comm.Barrier()
    sys.exit(1 if failed_anywhere else 0)


def _run_one(job: _JobState, c: Case, context: type, extras: dict):
    """(status, details, seconds) of one case on this rank."""
    started = time.perf_counter()
    faulthandler.dump_traceback_later(c.timeout, exit=True)
    try:
        missing = [f"{k}={v}" for k, v in c.env if os.environ.get(k) != v]
        if missing:
            raise RuntimeError(f"{c.name} needs {' '.join(missing)} in the environment")
        ctx = context(job, c.name, case_seed(job.seed, c.name), extras)
        c.fn(ctx, *c.args)
        status, details = "PASS", {}
    except pytest.skip.Exception as exc:
        status, details = "SKIP", {"error": getattr(exc, "msg", None) or str(exc)}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - AssertionError, pytest's Failed, anything
        status, details = "FAIL", _details(exc)
        _emit(f"[rank {job.rank}] case {c.name} failed:\n{details['traceback']}", sys.stderr)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return status, details, time.perf_counter() - started


# ======================================================================== jobs (pytest side)
@dataclass(frozen=True)
class Job:
    """One run of a worker script: rank count, the cases named (empty: the default set),
    extra environment, and a wall-clock bound for the whole job."""

    script: str
    ranks: int
    cases: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    timeout: float = 1200.0

    def command(self, seed: int | None = None) -> str:
        """The shell command that reruns this job (or one case of it) by hand."""
        env = [f"{k}={v}" for k, v in self.env]
        if seed is not None:
            env.append(f"{SEED_ENV}={seed}")
        return " ".join([*env, f"mpiexec -n {self.ranks} python {self.script}",
                         *map(shlex.quote, self.cases)])

    def __str__(self) -> str:
        what = " ".join(self.cases) or "(default cases)"
        return f"{self.script} {what} on {self.ranks} ranks"


@dataclass
class Outcome:
    """One rank's result of one case."""

    status: str
    seconds: float
    details: dict


_CASE_LINE = re.compile(r"<CASE ([^\s<>\"]+) (\d+) (PASS|FAIL|SKIP) ([0-9.]+)s")
_END_LINE = re.compile(r"<END (\d+) passed=(\d+) failed=(\d+) skipped=(\d+)>")
_CLOSE_LINE = re.compile(r'<CLOSE-FAIL (\d+) (".*")>$', re.M)
_JOB_LINE = re.compile(r"<JOB seed=(\d+) ranks=(\d+) cases=([^\s<>]*)>")


def parse_cases(stdout: str) -> dict[str, dict[int, Outcome]]:
    """Every ``<CASE ...>`` line of a job's output: case name -> rank -> Outcome. Lines
    may arrive glued to others, so markers are found anywhere; details are read as one
    JSON value (and skipped: text inside them is never taken for a marker)."""
    decoder = json.JSONDecoder()
    found: dict[str, dict[int, Outcome]] = {}
    pos = 0
    while (m := _CASE_LINE.search(stdout, pos)) is not None:
        name, rank, status, seconds = m.group(1), int(m.group(2)), m.group(3), float(m.group(4))
        details, pos = {}, m.end()
        if stdout.startswith(" ", pos):
            try:
                details, end = decoder.raw_decode(stdout, pos + 1)
                if not stdout.startswith(">", end) or not isinstance(details, dict):
                    raise ValueError("no '>' after the details")
                pos = end + 1
            except ValueError as exc:
                status, details = "FAIL", {"error": f"unreadable CASE line ({exc}): "
                                                    f"{stdout[m.start():m.start() + 300]!r}"}
        found.setdefault(name, {})[rank] = Outcome(status, seconds, details)
    return found


@dataclass
class JobResult:
    """What one job reported, and the verdict for each of its cases."""

    job: Job
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0

    def __post_init__(self):
        self.cases = parse_cases(self.stdout)
        m = _JOB_LINE.search(self.stdout)
        self.seed = int(m.group(1)) if m else None
        self.order = m.group(3).split(",") if m and m.group(3) else []
        self.ended = {int(e.group(1)): int(e.group(3)) for e in _END_LINE.finditer(self.stdout)}

    @property
    def problem(self) -> str | None:
        """Why the job did not end cleanly, or None."""
        stuck = next((c for c in self.order if len(self.cases.get(c, {})) < self.job.ranks),
                     None)
        during = f" during case {stuck}" if stuck else ""
        if self.timed_out:
            return f"the job was killed after {self.job.timeout:.0f} s{during}"
        missing = sorted(set(range(self.job.ranks)) - set(self.ended))
        if missing:
            return (f"ranks {missing} never reached the end{during} (exit status "
                    f"{self.returncode})")
        closing = _CLOSE_LINE.search(self.stdout)
        if closing:
            return f"rank {closing.group(1)} failed at the end, {json.loads(closing.group(2))}"
        failed = any(self.ended.values())
        if self.returncode != (1 if failed else 0):
            return f"exit status {self.returncode} after every rank reached the end"
        return None

    def tail(self, chars: int = 6000) -> str:
        out, err = self.stdout[-chars // 3:], self.stderr[-(chars - chars // 3):]
        return f"--- stdout (end) ---\n{out}\n--- stderr (end) ---\n{err}"

    def describe(self, name: str) -> str:
        """One line per rank: this case's outcome and messages."""
        outcomes = self.cases.get(name, {})
        lines = []
        for r in range(self.job.ranks):
            o = outcomes.get(r)
            if o is None:
                lines.append(f"rank {r}: no result")
                continue
            line = f"rank {r}: {o.status} ({o.seconds:.2f} s)"
            if o.details.get("error"):
                line += f" {o.details['error']}"
            if o.details.get("where"):
                line += f"\n    at {o.details['where']}"
            lines.append(line)
        return "\n".join(lines)

    def check(self, name: str) -> None:
        """Pass, skip (every rank skipped), or fail with the case's messages."""
        alone = Job(self.job.script, self.job.ranks, (name,), self.job.env)
        rerun = f"rerun: {alone.command(self.seed)}"
        problem = self.problem
        if problem is not None:
            raise AssertionError(f"{self.job}: {problem}; every case of the job fails.\n"
                                 f"{name}:\n{self.describe(name)}\n{rerun}\n{self.tail()}")
        outcomes = self.cases.get(name, {})
        statuses = [outcomes[r].status if r in outcomes else None
                    for r in range(self.job.ranks)]
        if None in statuses or "FAIL" in statuses:
            tracebacks = "\n".join(
                f"--- rank {r} ---\n{o.details['traceback']}" for r, o in sorted(outcomes.items())
                if o.status == "FAIL" and o.details.get("traceback"))
            raise AssertionError(f"{name} on {self.job.ranks} ranks (job seed {self.seed}):\n"
                                 f"{self.describe(name)}\n{rerun}\n{tracebacks}")
        if "SKIP" in statuses:
            reasons = sorted({o.details.get("error", "") for o in outcomes.values()
                              if o.status == "SKIP"})
            pytest.skip("; ".join(reasons))


def run_job(job: Job) -> JobResult:
    """Run ``job`` to its end (or its timeout) and parse what it reported."""
    started = time.perf_counter()
    try:
        proc = run_ranks(job.ranks, job.script, *job.cases, env=dict(job.env),
                         timeout=job.timeout)
    except subprocess.TimeoutExpired as exc:
        return JobResult(job, None, _text(exc.output), _text(exc.stderr), timed_out=True,
                         seconds=time.perf_counter() - started)
    return JobResult(job, proc.returncode, proc.stdout, proc.stderr,
                     seconds=time.perf_counter() - started)


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def import_worker(script: str) -> str:
    """Import a worker script by its path in the checkout (it does nothing at import);
    the module's name, the key of its cases."""
    name = str(Path(script).with_suffix("")).replace(os.sep, ".").replace("/", ".")
    importlib.import_module(name)
    return name


def case_params(script: str, ranks=(2,), *, timeout: float = 1200.0) -> list:
    """pytest parameters ``(job, name)`` for every case of the worker ``script``: the
    ordinary cases in one job per rank count of ``ranks``, each own-job case in a job of
    its own per rank count (its declared ``ranks`` or these). Test ids:
    ``<ranks>-<case>``. A test checks its case with the :func:`jobs` fixture::

        @pytest.mark.parametrize("job, name", case_params(WORKER, ranks=(2, 4)))
        def test_worker(jobs, job, name):
            jobs.check(job, name)
    """
    try:
        module = import_worker(script)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "cupy":
            raise  # a worker that cannot import the runtime is broken, not unsupported
        return [pytest.param(None, None, id="unavailable", marks=pytest.mark.skip(
            reason=f"{script} needs CuPy, which is not installed here ({exc})"))]
    cases = worker_cases(module)
    if not cases:
        raise ValueError(f"{script} declares no cases")
    params = []
    for n in ranks:
        job = Job(script, n, timeout=timeout)
        params += [pytest.param(job, c.name, id=f"{n}-{c.name}") for c in cases if not c.own_job]
    for c in cases:
        if c.own_job:
            for n in c.ranks or ranks:
                job = Job(script, n, (c.name,), c.env, timeout=timeout)
                params.append(pytest.param(job, c.name, id=f"{n}-{c.name}"))
    return params


class Jobs:
    """Runs each :class:`Job` once, on first demand, and keeps its result: the tests of
    one job's cases share one run whatever order they run in.

    items: the session's selected tests. When only some of a job's ordinary cases are
    selected (``-k``, node ids), the job runs just those.
    """

    def __init__(self, items=()):
        self._results: dict[Job, JobResult] = {}
        self._wanted: dict[Job, set[str]] = {}
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if isinstance(params.get("job"), Job) and params.get("name"):
                self._wanted.setdefault(params["job"], set()).add(params["name"])

    def result(self, job: Job) -> JobResult:
        if job not in self._results:
            self._results[job] = run_job(self.narrowed(job))
        return self._results[job]

    def narrowed(self, job: Job) -> Job:
        """``job``, or a job of only its selected cases when some are not selected."""
        wanted = self._wanted.get(job)
        if job.cases or not wanted:
            return job
        ordinary = [c.name for c in worker_cases(import_worker(job.script)) if not c.own_job]
        if wanted.issuperset(ordinary):
            return job
        return replace(job, cases=tuple(n for n in ordinary if n in wanted))

    def check(self, job: Job, name: str) -> None:
        """The verdict of case ``name`` of ``job`` (see :meth:`JobResult.check`)."""
        self.result(job).check(name)


@pytest.fixture(scope="module")
def jobs(request) -> Jobs:
    """The jobs of one test module, each run once (:class:`Jobs`)."""
    return Jobs(request.session.items)
