"""The case harness of tests/mpi.py (which runs every GPU test) on real 2-rank MPI jobs of
tests/cpu/workers/harness_worker.py, no GPU needed: the case list, what the ranks print,
how a test reads it, and what a failing, crashing, hanging or timed-out job becomes."""

import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tests.mpi import jobs  # noqa: F401 - the fixture
from tests.mpi import (ROOT, SEED_ENV, Job, JobResult, Jobs, case_params, import_worker,
                       mpiexec, parse_cases, run_job, worker_cases)

pytestmark = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the test extra)")

WORKER = "tests/cpu/workers/harness_worker.py"
DEFAULT = ["passes", "typed[bf16]", "typed[fp16]", "typed[fp32]", "variant[one]",
           "variant[two-and-a-half]", "shared_kept",
           "fails_on_last_rank", "after_failure_fresh", "raises_everywhere",
           "pytest_raises_matches", "pytest_raises_missing", "skipped", "still_in_step"]
PASSING = ["passes", "typed[bf16]", "typed[fp16]", "typed[fp32]", "variant[one]",
           "variant[two-and-a-half]", "shared_kept",
           "after_failure_fresh", "pytest_raises_matches", "still_in_step"]
OWN_JOB = ["needs_env", "hangs", "exits", "close_fails", "sleeps"]


@pytest.fixture(scope="module")
def default_run() -> JobResult:
    return run_job(Job(WORKER, 2, timeout=120))


def failure(result: JobResult, name: str) -> str:
    with pytest.raises(AssertionError) as info:
        result.check(name)
    return str(info.value)


# ---------------------------------------------------------------- declaring cases
def test_case_list_is_read_without_running_anything():
    cases = worker_cases(import_worker(WORKER))
    assert [c.name for c in cases] == DEFAULT + OWN_JOB
    assert [c.name for c in cases if c.own_job] == OWN_JOB
    env = {c.name: c for c in cases}["needs_env"]
    assert env.ranks == (2, 3) and env.env == (("HARNESS_FLAG", "on"),)
    assert {c.name: c for c in cases}["hangs"].timeout == 2


def test_params_one_job_per_rank_count_and_per_own_job_case():
    params = case_params(WORKER, ranks=(2, 4))
    ids = [p.id for p in params]
    assert ids == ([f"2-{n}" for n in DEFAULT] + [f"4-{n}" for n in DEFAULT]
                   + ["2-needs_env", "3-needs_env", "2-hangs", "4-hangs", "2-exits", "4-exits",
                      "2-close_fails", "4-close_fails", "2-sleeps", "4-sleeps"])
    by_id = {p.id: p.values[0] for p in params}
    assert all(p.values[1] == p.id.split("-", 1)[1] for p in params)
    # Every ordinary case of a rank count shares one job: the fixture runs it once.
    assert len({by_id[f"2-{n}"] for n in DEFAULT}) == 1
    assert by_id["2-passes"] == Job(WORKER, 2) and by_id["4-passes"] == Job(WORKER, 4)
    assert by_id["3-needs_env"] == Job(WORKER, 3, ("needs_env",), (("HARNESS_FLAG", "on"),))
    assert by_id["4-hangs"] == Job(WORKER, 4, ("hangs",))


def test_worker_without_cupy_is_skipped_but_a_broken_one_fails(monkeypatch):
    import tests.mpi

    def no_cupy(script):
        raise ImportError("No module named 'cupy'", name="cupy")

    monkeypatch.setattr(tests.mpi, "import_worker", no_cupy)
    (param,) = case_params(WORKER)
    assert param.id == "unavailable" and "needs CuPy" in param.marks[0].kwargs["reason"]

    def renamed(script):
        raise ImportError("cannot import name 'Gone' from 'moecomm.moe'", name="moecomm.moe")

    monkeypatch.setattr(tests.mpi, "import_worker", renamed)
    with pytest.raises(ImportError, match="Gone"):
        case_params(WORKER)


def test_list_option_needs_no_mpi():
    out = subprocess.run([sys.executable, str(ROOT / WORKER), "--list"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:len(DEFAULT)] == DEFAULT
    assert lines[len(DEFAULT)] == "needs_env  (own job; ranks 2,3; HARNESS_FLAG=on)"
    assert lines[len(DEFAULT) + 1:] == ["hangs  (own job)", "exits  (own job)",
                                        "close_fails  (own job)", "sleeps  (own job)"]


def test_bad_declarations():
    from tests.mpi import case

    def wide(ctx, dtype):
        pass

    with pytest.raises(ValueError, match="unknown dtype 'fp64'"):
        case(dtypes=("fp64",))(wide)
    with pytest.raises(ValueError, match="dtypes or variants"):
        case(dtypes=("fp32",), variants={"a": 1})(wide)
    with pytest.raises(ValueError, match="case name"):
        case(variants={"a b": 1})(wide)
    with pytest.raises(ValueError, match="case name"):
        case(lambda ctx: None)  # '<lambda>' is no case name


# ---------------------------------------------------------------- one job, every outcome
def test_default_run_reports_every_case_on_every_rank(default_run):
    r = default_run
    assert r.problem is None, r.tail()
    assert r.order == DEFAULT  # own-job cases only run when named
    assert sorted(r.cases) == sorted(DEFAULT), "a marker inside a message was taken for a case"
    assert all(sorted(r.cases[n]) == [0, 1] for n in DEFAULT)
    assert r.returncode == 1  # some case failed
    assert r.ended == {0: 2, 1: 3}  # failures per rank: fails_on_last_rank only on rank 1
    assert "<PASS " not in r.stdout
    assert r.seed is not None and f"<JOB seed={r.seed} ranks=2 " in r.stdout


@pytest.mark.parametrize("name", PASSING)
def test_passing_cases_pass(default_run, name):
    default_run.check(name)


def test_failure_on_one_rank_is_reported_with_its_message(default_run):
    text = failure(default_run, "fails_on_last_rank")
    assert "rank 0: PASS" in text
    assert 'rank 1: FAIL' in text
    # The message survives intact: quotes, '>', a marker look-alike, a backslash, a newline.
    assert ('AssertionError: x > 3 "quoted" <CASE fake 9 PASS 0.00s> back\\slash\n'
            'second line [é]') in text
    assert "at harness_worker.py:" in text and "in fails_on_last_rank" in text
    assert "raise AssertionError(TRICKY)" in text  # rank 1's traceback
    assert (f"rerun: {SEED_ENV}={default_run.seed} mpiexec -n 2 python {WORKER} "
            "fails_on_last_rank") in text


def test_rerun_command_quotes_case_names():
    assert Job(WORKER, 4, ("typed[bf16]",), (("A", "1"),)).command(7) == (
        f"A=1 {SEED_ENV}=7 mpiexec -n 4 python {WORKER} 'typed[bf16]'")


def test_errors_of_every_rank_are_reported(default_run):
    text = failure(default_run, "raises_everywhere")
    assert "rank 0: FAIL" in text and "ValueError: bad value on rank 0" in text
    assert "rank 1: FAIL" in text and "ValueError: bad value on rank 1" in text


def test_pytest_raises_without_an_error_fails(default_run):
    text = failure(default_run, "pytest_raises_missing")
    assert text.count("Failed: DID NOT RAISE ValueError") >= 2
    assert "harness_worker.py:" in text and "in pytest_raises_missing" in text


def test_skip_on_every_rank_skips(default_run):
    with pytest.raises(pytest.skip.Exception, match="nothing to do on 2 ranks"):
        default_run.check("skipped")


def test_unknown_case_name_fails_its_test(default_run):
    text = failure(default_run, "not_a_case")
    assert "rank 0: no result" in text and "rank 1: no result" in text


# ---------------------------------------------------------------- the fixture
LAUNCHED = []
# Selected alone, without the failing case before it, after_failure_fresh would fail.
ALONE = [n for n in PASSING if n != "after_failure_fresh"]


@pytest.mark.parametrize("job, name", [p for p in case_params(WORKER) if p.values[1] in ALONE])
def test_fixture_gives_each_case_its_test(jobs, job, name):
    jobs.check(job, name)
    result = jobs.result(job)
    assert result.order == ALONE, "the job runs the selected cases only"
    LAUNCHED.append(id(result))


def test_fixture_ran_the_job_once():
    assert len(LAUNCHED) == len(ALONE) and len(set(LAUNCHED)) == 1


def test_selected_cases_alone_run_in_a_narrowed_job():
    def item(job, name):
        return SimpleNamespace(callspec=SimpleNamespace(params={"job": job, "name": name}))

    default, own = Job(WORKER, 2, timeout=120), Job(WORKER, 2, ("needs_env",))
    picked = Jobs([item(default, "still_in_step"), item(default, "passes"), item(own, "needs_env"),
                   SimpleNamespace()])
    assert picked.narrowed(default) == Job(WORKER, 2, ("passes", "still_in_step"), timeout=120)
    assert picked.narrowed(own) == own
    assert picked.result(default).order == ["passes", "still_in_step"]
    picked.check(default, "passes")
    everything = Jobs([item(default, name) for name in DEFAULT])
    assert everything.narrowed(default) == default


# ---------------------------------------------------------------- own jobs, bad jobs
def test_own_job_gets_its_environment_and_rank_count():
    params = {p.id: p.values[0] for p in case_params(WORKER)}
    result = run_job(params["3-needs_env"])
    assert result.problem is None, result.tail()
    result.check("needs_env")
    assert "<PASS 2>" in result.stdout
    # Run without its environment, it says what is missing.
    text = failure(run_job(Job(WORKER, 2, ("needs_env",), timeout=120)), "needs_env")
    assert "needs_env needs HARNESS_FLAG=on in the environment" in text


def test_cases_run_in_declared_order_and_setup_failure_fails_each():
    result = run_job(Job(WORKER, 2, ("still_in_step", "passes"),
                         (("HARNESS_SETUP_FAIL", "1"),), timeout=120))
    assert result.order == ["passes", "still_in_step"]
    assert result.problem is None, result.tail()
    for name in ("passes", "still_in_step"):
        text = failure(result, name)
        assert text.count("job setup failed on rank 1: RuntimeError: no device for rank 1") == 2


def test_hang_fails_every_case_of_the_job():
    started = time.monotonic()
    result = run_job(Job(WORKER, 2, ("passes", "hangs"), timeout=120))
    assert time.monotonic() - started < 60, "the case timeout did not end the job"
    assert not result.timed_out
    assert "never reached the end during case hangs" in result.problem
    text = failure(result, "hangs")
    assert "every case of the job fails" in text and "Timeout (0:00:02)!" in text
    assert "in hangs" in text  # the stack dump names the hung case
    text = failure(result, "passes")  # passed on every rank, yet the job crashed
    assert "rank 0: PASS" in text and "rank 1: PASS" in text
    assert "never reached the end during case hangs" in text


def test_a_shared_object_that_fails_to_close_fails_the_job():
    """The case passed everywhere, but closing its shared object raised on one rank at
    the end: the job fails (exit 1, no <PASS>), saying so, and so does the case."""
    result = run_job(Job(WORKER, 2, ("close_fails",), timeout=120))
    assert result.returncode == 1 and "<PASS" not in result.stdout
    assert result.problem == ("rank 1 failed at the end, closing shared 'leaky': "
                              "RuntimeError: handles still open"), result.problem
    text = failure(result, "close_fails")
    assert "rank 0: PASS" in text and "handles still open" in text


def test_dead_rank_fails_the_job():
    result = run_job(Job(WORKER, 2, ("exits",), timeout=120))
    assert "never reached the end during case exits" in result.problem
    assert "rank 1: no result" in failure(result, "exits")


def test_unknown_name_on_the_command_line():
    result = run_job(Job(WORKER, 2, ("nosuch",), timeout=120))
    assert result.problem is not None
    assert "unknown case(s) nosuch; known: passes, typed[bf16]" in failure(result, "nosuch")


def test_job_timeout_kills_every_rank():
    result = run_job(Job(WORKER, 2, ("sleeps",), timeout=5))
    assert result.timed_out and result.problem == ("the job was killed after 5 s during case "
                                                   "sleeps")
    pids = [int(p) for p in re.findall(r"<PID \d (\d+)>", result.stdout)]
    assert len(pids) == 2, result.tail()
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.2)
    assert not alive, f"ranks {alive} outlived the killed job"
    assert "killed after 5 s" in failure(result, "sleeps")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- reading output
def test_parse_glued_and_broken_lines():
    text = ('noise<CASE a 0 PASS 0.10s><CASE a 1 FAIL 0.20s {"error": "x > y", "where": ""}>'
            '<CASE b[fp16] 1 SKIP 0.00s {"error": "why"}>\n<CASE c 0 FAIL 1.00s {"error": "cut')
    cases = parse_cases(text)
    assert cases["a"][0].status == "PASS" and cases["a"][0].seconds == 0.1
    assert cases["a"][1].status == "FAIL" and cases["a"][1].details["error"] == "x > y"
    assert cases["b[fp16]"][1].status == "SKIP"
    assert cases["c"][0].status == "FAIL"
    assert "unreadable CASE line" in cases["c"][0].details["error"]


def test_exit_status_must_match_the_reports():
    out = ("<JOB seed=5 ranks=2 cases=a>\n<CASE a 0 PASS 0.10s>\n<CASE a 1 PASS 0.10s>\n"
           "<END 0 passed=1 failed=0 skipped=0>\n<END 1 passed=1 failed=0 skipped=0>\n")
    assert JobResult(Job(WORKER, 2), 0, out, "").problem is None
    JobResult(Job(WORKER, 2), 0, out, "").check("a")
    bad = JobResult(Job(WORKER, 2), 139, out, "segfault at exit")
    assert bad.problem == "exit status 139 after every rank reached the end"
    assert "segfault at exit" in failure(bad, "a")
    cut = out.replace("<END 1 passed=1 failed=0 skipped=0>\n", "")
    half = JobResult(Job(WORKER, 2), 1, cut, "")
    assert half.problem == "ranks [1] never reached the end (exit status 1)"
