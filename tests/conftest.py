"""Shared fixtures: a short temporary QNTX home (ipc paths must stay short)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest


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
