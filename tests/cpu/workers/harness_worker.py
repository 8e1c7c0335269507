"""Cases with no GPU work, run by tests/cpu/test_harness.py to check the case harness of
tests/mpi.py end to end under a real MPI job: cases that pass, fail on one rank, raise,
skip, expand over dtypes, share objects, need their own job, hang or kill their rank.

The default run's expectations (``after_failure_fresh`` sees the object closed after
``fails_on_last_rank``) assume the default order; own-job cases run only when named.
"""

import os
import re
import time

import pytest

from tests.mpi import case, run_cases

TRICKY = 'x > 3 "quoted" <CASE fake 9 PASS 0.00s> back\\slash\nsecond line [é]'


class Resource:
    """A shared object that records when it is closed."""

    made: list = []

    def __init__(self):
        self.serial = len(Resource.made) + 1
        self.closed = False
        Resource.made.append(self)

    def close(self):
        self.closed = True


@case
def passes(ctx):
    assert ctx.name == "passes" and ctx.world == 2 and ctx.rank in (0, 1)
    assert ctx.flavour == "cpu"  # from setup()
    draws = ctx.rng.integers(0, 1 << 30, 4).tolist()
    assert ctx.allgather(draws) == [draws] * ctx.world, "rng differs across ranks"
    assert ctx.allgather(ctx.seed) == [ctx.seed] * ctx.world
    assert len(set(ctx.allgather(ctx.new_seed()))) == 1
    assert ctx.shared("res", Resource).serial == 1


@case(dtypes=("bf16", "fp16", "fp32"))
def typed(ctx, dtype):
    import ml_dtypes
    import numpy as np

    want = {"typed[bf16]": np.dtype(ml_dtypes.bfloat16), "typed[fp16]": np.dtype(np.float16),
            "typed[fp32]": np.dtype(np.float32)}[ctx.name]
    assert dtype == want, (ctx.name, dtype)


@case(variants={"one": 1, "two-and-a-half": 2.5})
def variant(ctx, value):
    assert value == {"variant[one]": 1, "variant[two-and-a-half]": 2.5}[ctx.name]


@case
def shared_kept(ctx):
    res = ctx.shared("res", Resource)
    assert res.serial == 1 and not res.closed, "the shared object of `passes` is kept"


@case
def fails_on_last_rank(ctx):
    ctx.barrier()
    if ctx.rank == ctx.world - 1:
        raise AssertionError(TRICKY)


@case
def after_failure_fresh(ctx):
    assert Resource.made[0].closed, "shared objects are closed after a failed case"
    assert ctx.shared("res", Resource).serial == 2, "and made again on next use"


@case
def raises_everywhere(ctx):
    raise ValueError(f"bad value on rank {ctx.rank}")


@case
def pytest_raises_matches(ctx):
    with pytest.raises(ValueError, match=re.escape("limit (16) [bytes]")):
        raise ValueError("over the limit (16) [bytes] of the workspace")


@case
def pytest_raises_missing(ctx):
    with pytest.raises(ValueError):
        pass


@case
def skipped(ctx):
    pytest.skip(f"nothing to do on {ctx.world} ranks")


@case
def still_in_step(ctx):
    assert ctx.allgather(ctx.rank) == list(range(ctx.world))


@case(own_job=True, ranks=(2, 3), env={"HARNESS_FLAG": "on"})
def needs_env(ctx):
    assert os.environ["HARNESS_FLAG"] == "on"
    assert ctx.allgather(ctx.rank) == list(range(ctx.world))


@case(own_job=True, timeout=2)
def hangs(ctx):
    if ctx.rank == ctx.world - 1:
        time.sleep(120)
    ctx.barrier()


@case(own_job=True)
def exits(ctx):
    if ctx.rank == 1:
        os._exit(3)
    ctx.barrier()


class FailsToClose:
    """A shared object whose close() raises on the last rank."""

    def __init__(self, rank, world):
        self.last = rank == world - 1

    def close(self):
        if self.last:
            raise RuntimeError("handles still open")


@case(own_job=True)
def close_fails(ctx):
    ctx.shared("leaky", lambda: FailsToClose(ctx.rank, ctx.world))


@case(own_job=True, timeout=600)
def sleeps(ctx):
    print(f"<PID {ctx.rank} {os.getpid()}>", flush=True)
    time.sleep(600)


def setup():
    from mpi4py import MPI

    if os.environ.get("HARNESS_SETUP_FAIL") == "1" and MPI.COMM_WORLD.Get_rank() == 1:
        raise RuntimeError("no device for rank 1")
    return {"flavour": "cpu"}


if __name__ == "__main__":
    run_cases(setup=setup)
