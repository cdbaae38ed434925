"""``qntx up``'s console: a console that goes away stops the echo, not the bus."""

from __future__ import annotations

import os
import sys

import pytest

from qntx.settings import load_settings
from qntx.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)


def test_a_console_whose_reader_is_gone_is_no_longer_echoed_to(tmp_path, monkeypatch):
    """``qntx up | head``, or a ``tee`` that was killed: writing the console raises
    BrokenPipeError. The echo stops (it held every actor line for a console that
    never takes them), and nothing is raised to the thread that writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    console = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stderr", console)
    supervisor = Supervisor(load_settings(tmp_path), [])
    try:
        supervisor._write([(b"", 0, 0.0, b"a line for nobody\n")])
        assert supervisor.echo is False
        supervisor._write([(b"", 1, 0.0, b"and the next\n")])  # not tried again
    finally:
        monkeypatch.undo()
        try:
            console.close()
        except BrokenPipeError:
            pass
