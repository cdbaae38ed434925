"""The headline flow of SPEC §2, end to end: handler create, up, ix, live discovery."""

from __future__ import annotations

import json
import re

import pytest

import qntx
from tests.integration.conftest import Bus, wait_for

pytestmark = pytest.mark.timeout(120)

PLUGIN_LINES = [
    "[Python plugin] Initializing Python plugin",
    "[Python plugin] ATSStore endpoint: {ats}",
    "[Python plugin] Discovering Python handlers from ATS store",
    '[Python plugin] Discovered 3 handler(s) from ATS store: ["test1", "test2", "vacancies"]',
    '[Python plugin] Announcing async handlers: ["python.script", "python.test1", "python.test2", "python.vacancies"]',
    "[QNTX Server] Registering plugin async handler plugin=python handler=python.script",
    "[QNTX Server] Registering plugin async handler plugin=python handler=python.test1",
    "[QNTX Server] Registering plugin async handler plugin=python handler=python.test2",
    "[QNTX Server] Registering plugin async handler plugin=python handler=python.vacancies",
]


# Stored before the shared `up` starts (``shared``: the tests that need a bus but
# not its whole log or its life to themselves).
HANDLERS = {
    "boom": "def f():\n    raise ValueError('bad thing')\nf()\n",
    "chatty": "import sys, time\nprint('first', flush=True)\nprint('oops', file=sys.stderr)\ntime.sleep(1.5)\nprint('last')\n",
    "both": "import sys\nprint('out')\nprint('err', file=sys.stderr)",
    "steps": "for i in range(1, 21):\n    progress(i, 20)\n_result = 'done'",
}


def _messages(output: str) -> list[str]:
    """Log lines without their time and level prefix."""
    return [m.group(1) for m in re.finditer(r"^\S+ +\w+ +(\[.*)$", output, re.M)]


def test_handler_create_prints_the_attestation(bus):
    result = bus.run("handler", "create", "vacancies", "--code", "print('Hello from vacancies handler')")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "✓ Handler 'vacancies' created"
    assert re.fullmatch(r"  ASID: AS-VACANCIE-HANDLER-PYTHON-[2-9A-Z]{8}", lines[1])
    assert lines[2:] == [
        "  Subject: [vacancies]",
        "  Predicate: [handler]",
        "  Context: [python]",
        "  Actor: [vacancies] (self-certifying)",
        "  Attributes:",
        "  {",
        '    "code": "print(\'Hello from vacancies handler\')"',
        "  }",
    ]


@pytest.mark.parametrize(
    "args",
    [["handler", "create", "x"], ["handler", "create", "x", "--code", "1", "--file", "f.py"]],
)
def test_handler_create_needs_exactly_one_source(bus, args):
    result = bus.run(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: give exactly one of --code or --file"
    assert "Traceback" not in result.stderr


def test_headline_flow(bus):
    for name in ("vacancies", "test2", "test1"):
        created = bus.run("handler", "create", name, "--code", f"print('Hello from {name} handler')")
        assert created.returncode == 0, created.stderr
    up = bus.start_up()
    output = up.wait_output("handler=python.vacancies")
    messages = _messages(output)
    expected = [line.format(ats=bus.settings.ats_endpoint) for line in PLUGIN_LINES]
    positions = [messages.index(line) for line in expected]
    assert positions == sorted(positions), "headline log lines out of order"

    ran = bus.run("ix", "vacancies", "some", "args")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "Hello from vacancies handler\n"

    # A second `up` on the same home is refused with one clear line.
    second = bus.run("up")
    assert second.returncode != 0
    assert "already up" in second.stderr and "Traceback" not in second.stderr
    assert second.stderr.count("\n") == 1 and second.stdout == "", second.stderr

    # Live discovery: a handler created while up is registered within a second or so.
    created = bus.run("handler", "create", "live", "--code", "_result = {'args': args, 'up': upstream}")
    assert created.returncode == 0, created.stderr
    up.wait_output("Registering plugin async handler plugin=python handler=python.live", timeout=5)
    assert '[Python plugin] Discovered 4 handler(s) from ATS store: ["live", "test1", "test2", "vacancies"]' in _messages(up.output())

    with qntx.connect(bus.home) as b:
        handle = b.submit("python.live", {"args": ["x", "y"]})
        assert handle.result(timeout=30) == {"args": ["x", "y"], "up": {"args": ["x", "y"]}}
        assert b.job(handle.id).status == "completed"

    # Unknown handler: one line naming the known ones.
    unknown = bus.run("ix", "nope")
    assert unknown.returncode != 0
    assert unknown.stderr.count("\n") == 1 and "python.vacancies" in unknown.stderr

    # Deleting unregisters it live.
    assert bus.run("handler", "delete", "live").returncode == 0
    up.wait_output("Unregistering plugin async handler plugin=python handler=python.live", timeout=5)

    status = bus.run("status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    names = {a["name"] for a in data["actors"]}
    assert {"ats", "server", "worker-1", "worker-2", "plugin:python"} <= names
    assert all(a["healthy"] and a["pid"] for a in data["actors"])
    assert data["queue"]["completed"] >= 2
    assert "python.vacancies" in data["handlers"] and "python.live" not in data["handlers"]


def test_failing_handler_shows_its_traceback_and_exits_non_zero(shared):
    ran = shared.run("ix", "boom", "--max-attempts", "1")
    assert ran.returncode == 1
    assert "ValueError: bad thing" in ran.stderr
    assert "<handler boom>" in ran.stderr and "line 2" in ran.stderr


def test_no_wait_prints_the_job_id(shared):
    ran = shared.run("ix", "builtin.echo", "--no-wait")
    assert ran.returncode == 0, ran.stderr
    job_id = ran.stdout.strip()
    assert job_id.startswith("JB-")
    with qntx.connect(shared.home) as b:
        assert b.wait(job_id, timeout=20).status == "completed"
    shown = shared.run("pulse", "show", job_id, "--json")
    assert json.loads(shown.stdout)["id"] == job_id
    listed = shared.run("pulse", "jobs", "--status", "completed", "--json")
    assert job_id in [j["id"] for j in json.loads(listed.stdout)]


def test_up_stops_cleanly_on_sigterm(bus):
    up = bus.start_up()
    pids = [int(line.split()[1]) for line in (bus.home / "run" / "actors").read_text().split("\n") if line]
    assert len(pids) == 5
    assert up.stop() == 0
    import os

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: all(gone(p) for p in pids), 10, what="actors to exit")


def test_ix_streams_the_output_of_a_long_job(shared):
    import subprocess
    import time

    process = subprocess.Popen(
        shared.qntx_argv("ix", "chatty"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=shared.env
    )
    try:
        started = time.monotonic()
        first = process.stdout.readline()
        seen_after = time.monotonic() - started
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert first == "first\n"
    assert seen_after < 1.4, "the first line came only with the result"  # the job sleeps 1.5 s after it
    assert out == "last\n" and "oops" in err and err.count("oops") == 1
    assert process.returncode == 0


def test_quick_jobs_show_their_output_once(shared):
    ran = shared.run("ix", "both")
    assert ran.returncode == 0 and ran.stdout == "out\n" and ran.stderr.count("err") == 1


def test_jobs_can_be_inspected_while_the_bus_is_down(bus):
    up = bus.start_up()
    failed = bus.run("ix", "builtin.fail", "--max-attempts", "1")
    assert failed.returncode == 1
    up.stop()
    listed = bus.run("pulse", "jobs", "--status", "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)
    assert [j["handler"] for j in jobs] == ["builtin.fail"]
    shown = bus.run("pulse", "show", jobs[0]["id"])
    assert shown.returncode == 0 and "failed" in shown.stdout
    assert bus.run("pulse", "cancel", jobs[0]["id"]).returncode == 3  # steering needs the server
    empty = Bus(bus.home / "fresh")
    assert empty.run("pulse", "jobs").stdout.strip() == "(no jobs)"


def test_a_codeless_handler_attestation_is_skipped_with_a_warning(bus):
    assert bus.run("handler", "create", "foo", "--code", "print('the real foo')").returncode == 0
    up = bus.start_up()
    # Not a handler version: it has no code. It must not hide the real one.
    made = bus.run("as", "foo", "is", "handler", "of", "python", "--json")
    assert made.returncode == 0, made.stderr
    asid = json.loads(made.stdout)["id"]
    up.wait_output(f'skipped handler attestation {asid} for ["foo"]: it has no attributes.code', timeout=5)
    ran = bus.run("ix", "foo")
    assert ran.returncode == 0 and ran.stdout == "the real foo\n", ran.stderr
    assert "python.foo" in bus.run("handler", "list").stdout
    shown = bus.run("handler", "show", "foo").stdout
    assert "print('the real foo')" in shown and "no code (skipped)" in shown
    # A restart discovers the same.
    up.stop()
    up = bus.start_up()
    assert bus.run("ix", "foo").stdout == "the real foo\n"


def test_ix_always_shows_the_last_progress(shared):
    """The final progress comes with the result (WaitJob's last answer), so `ix` never
    stops at 19/20 however quickly the handler ran."""
    for _ in range(6):
        ran = shared.run("ix", "steps")
        assert ran.returncode == 0, ran.stderr
        lines = ran.stderr.splitlines()
        assert lines and lines[-1] == "progress 20/20", ran.stderr
