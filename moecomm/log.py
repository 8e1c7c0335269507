"""The ``moecomm`` logger: the library's only voice (it never prints).

``logging.getLogger("moecomm")``, level from ``MOECOMM_LOG_LEVEL`` (a level name such as
``INFO``/``DEBUG`` or a number; default ``WARNING``). The library logs:

- INFO: one line per NVRTC compile (module, arch, seconds, where the cubin went);
- WARNING: the first compile of a process that runs longer than 5 s, saying how to
  compile ahead of time (``python -m moecomm.precompile``); a shipped cubin the driver
  refused;
- DEBUG: every kernel lookup (shipped cubin, disk cache, waiting for another process).

Where the records go: an application that configured logging (handlers on the root
logger) receives them through propagation, formatted its way. Otherwise moecomm writes
them to stderr itself, one line each, tagged with the MPI rank when the process was
started by ``mpiexec``/``srun`` -- so a WARNING is seen without any setup, and an INFO
line is one environment variable away. ``python -m moecomm.bench`` and
``python -m moecomm.precompile`` show INFO unless ``MOECOMM_LOG_LEVEL`` says otherwise.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_LEVEL_ENV = "MOECOMM_LOG_LEVEL"

logger = logging.getLogger("moecomm")

# Launchers' rank variables: MPICH/Hydra, Open MPI, PMIx, MVAPICH, Slurm.
_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
             "SLURM_PROCID")


def launcher_rank() -> int | None:
    """This process's rank as its launcher announced it (no MPI call), else None."""
    for name in _RANK_ENV:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def _parse_level(text: str) -> int | None:
    text = text.strip().upper()
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text)
    return level if isinstance(level, int) else None


class _StderrHandler(logging.StreamHandler):
    """stderr, unless the application configured the root logger (it then gets the records
    by propagation, and a second copy here would duplicate every line)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        rank = launcher_rank()
        tag = "moecomm" if rank is None else f"moecomm[rank {rank}]"
        self.setFormatter(logging.Formatter(f"{tag} %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # follow redirections made after import
        super().emit(record)


def _configure() -> None:
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    logger.addHandler(_StderrHandler())
    raw = os.environ.get(LOG_LEVEL_ENV)
    level = _parse_level(raw) if raw else logging.WARNING
    logger.setLevel(logging.WARNING if level is None else level)
    if raw and level is None:
        logger.warning("%s=%r is not a logging level (DEBUG, INFO, WARNING, ERROR); "
                       "using WARNING", LOG_LEVEL_ENV, raw)


def show_info() -> None:
    """For commands (benchmarks, precompile): INFO and up, unless ``MOECOMM_LOG_LEVEL``
    is set, which always wins."""
    if not os.environ.get(LOG_LEVEL_ENV):
        logger.setLevel(logging.INFO)


_configure()
