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


def test_a_console_slower_than_the_actors_drops_lines_instead_of_holding_them(tmp_path):
    """Nothing reads the console queue (a console that blocks): an actor's 5,000 lines,
    some of 100 KB, leave at most ECHO_QUEUE_LINES in it, each cut to ECHO_LINE_BYTES;
    the rest are counted, and all of them reach the actor's log file."""
    import subprocess

    from qntx.supervisor import ECHO_LINE_BYTES, ECHO_QUEUE_LINES, Child

    supervisor = Supervisor(load_settings(tmp_path), [])
    talker = "for i in range(5000): print(('x' * 100_000) if i % 100 == 0 else i)"
    process = subprocess.Popen([sys.executable, "-c", talker], stdout=subprocess.PIPE)
    log = tmp_path / "talker.log"
    try:
        supervisor._pump(Child("talker", []), process, log)
    finally:
        process.wait(30)
    assert supervisor._console.qsize() == ECHO_QUEUE_LINES
    assert supervisor._dropped == 5000 - ECHO_QUEUE_LINES
    held = [supervisor._console.get_nowait()[1] for _ in range(ECHO_QUEUE_LINES)]
    assert max(len(line) for line in held) < ECHO_LINE_BYTES + 100
    assert log.read_text().count("\n") == 5000
