"""Shared fixtures: a short temporary QNTX home (ipc paths must stay short)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def home():
    path = Path(tempfile.mkdtemp(prefix="qx-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
