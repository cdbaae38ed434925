"""Shared fixtures: a short temporary QNTX home (ipc paths must stay short), and one
seed for every random generator the tests use.

pytest-randomly picks the run's seed (or takes ``--randomly-seed=N``), prints it in the
header and re-seeds ``random`` before each test; the same seed drives Hypothesis, so a
failure seen once is replayed with ``bin/test --randomly-seed=N``. Keys and ids the bus
makes itself come from the OS's secure source on purpose: tests that need a particular
key build it deterministically (``tests/integration/test_keys_cli.py``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # pytest-randomly resolved its seed in its own pytest_configure; hand it to Hypothesis
    # unless --hypothesis-seed was given.
    seed = config.getoption("randomly_seed", None)
    if isinstance(seed, int) and config.getoption("hypothesis_seed", None) is None:
        from hypothesis import core

        core.global_force_seed = seed


def pytest_report_header(config):
    seed = config.getoption("randomly_seed", None)
    return f"qntx: Hypothesis runs under the same seed; replay with bin/test --randomly-seed={seed}"


@contextlib.contextmanager
def fresh_home():
    path = Path(tempfile.mkdtemp(prefix="qx-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home():
    with fresh_home() as path:
        yield path
