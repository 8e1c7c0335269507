"""The ``moecomm`` logger: level from MOECOMM_LOG_LEVEL, stderr unless the application
configured logging, the launcher's rank in each line."""

import os
import subprocess
import sys

from tests.mpi import ROOT

CODE = ("import moecomm.log as l; l.logger.debug('d'); l.logger.info('i'); "
        "l.logger.warning('w')")


def _run(code=CODE, **env):
    full = {k: v for k, v in os.environ.items()
            if k != "MOECOMM_LOG_LEVEL" and not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    full.update(PYTHONPATH=str(ROOT), **env)
    proc = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", "the library printed"
    return proc.stderr.splitlines()


def test_default_is_warning():
    assert _run() == ["moecomm WARNING: w"]


def test_level_from_the_environment():
    assert _run(MOECOMM_LOG_LEVEL="info") == ["moecomm INFO: i", "moecomm WARNING: w"]
    assert len(_run(MOECOMM_LOG_LEVEL="DEBUG")) == 3
    assert _run(MOECOMM_LOG_LEVEL="ERROR") == []
    lines = _run(MOECOMM_LOG_LEVEL="chatty")
    assert "not a logging level" in lines[0] and lines[1:] == ["moecomm WARNING: w"]


def test_rank_tag():
    assert _run(PMI_RANK="3") == ["moecomm[rank 3] WARNING: w"]


def test_application_logging_gets_the_records_once():
    code = ("import logging, sys; logging.basicConfig(stream=sys.stderr, "
            "format='app %(name)s %(levelname)s %(message)s'); " + CODE)
    assert _run(code, MOECOMM_LOG_LEVEL="INFO") == ["app moecomm INFO i",
                                                     "app moecomm WARNING w"]


def test_commands_show_info():
    code = "import moecomm.log as l; l.show_info(); l.logger.info('i')"
    assert _run(code) == ["moecomm INFO: i"]
    assert _run(code, MOECOMM_LOG_LEVEL="WARNING") == []
