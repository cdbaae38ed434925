"""Debian's ``prometheus`` package (``promtool`` and ``prometheus``) for the metrics
tests: without it they skip with one line, unless ``QNTX_REQUIRE_PROMTOOL=1`` (set by
CI, which installs it) makes that a failure."""

from __future__ import annotations

import os
import shutil

import pytest

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
REQUIRED = os.environ.get("QNTX_REQUIRE_PROMTOOL") == "1"


def need(tool: str | None, name: str) -> str:
    if tool is None:
        message = f"{name} is not installed (Debian package prometheus)"
        if REQUIRED:
            pytest.fail(f"required by QNTX_REQUIRE_PROMTOOL=1: {message}")
        pytest.skip(message)
    return tool
