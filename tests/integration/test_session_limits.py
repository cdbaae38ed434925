"""A server with few open files: worker sessions past its room are refused, and the
bus keeps serving the sessions it has (real processes, a real swarm of sessions)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.integration.conftest import Process, wait_for

pytestmark = pytest.mark.timeout(120)

OPEN_FILES = 300
MORE = 30  # swarm sessions beyond the room


def limited(argv: list[str], files: int) -> list[str]:
    """``argv`` run with an open-file limit of ``files`` (soft and hard: nothing to raise it to)."""
    code = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({files}, {files})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code, *argv]


def swarm_counts(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_sessions_past_the_open_file_limit_are_refused_and_the_others_keep_working(bus):
    bus.start_ats()
    server = Process(limited(bus.qntx_argv("server"), OPEN_FILES), bus.home / "server.out", bus.env)
    bus.processes.append(server)
    room = int(re.search(r"room for (\d+) worker sessions", server.wait_output("room for")).group(1))
    assert 10 < room < OPEN_FILES // 5, room
    bus.start("worker", "--name", "real")
    with bus.connect() as client:
        wait_for(lambda: any(a.name == "real" and a.healthy for a in client.status().actors), what="the real worker")

        stats = bus.home / "swarm.json"
        swarm = Process(
            [sys.executable, "-m", "bench.swarm_sessions", "--workers", bus.settings.workers_endpoint,
             "--sessions", str(room + MORE), "--stats", str(stats)],
            bus.home / "swarm.out", bus.env,
        )  # fmt: skip
        bus.processes.append(swarm)
        # The real worker holds one place; the swarm fills the rest and the others are refused.
        wait_for(
            lambda: swarm_counts(stats).get("ready") == room - 1 and swarm_counts(stats).get("refused") == MORE + 1,
            timeout=30, what=f"{room - 1} swarm sessions in and {MORE + 1} refused: {swarm_counts(stats)}",
        )  # fmt: skip
        assert server.alive(), server.output()[-3000:]
        status = client.status()
        assert status.sessions_free == 0
        assert sum(1 for a in status.actors if a.name.startswith("swarm-")) == room - 1
        assert len(re.findall(r"refused worker swarm-\d+", server.output())) == MORE + 1  # once each
        assert "no room for another worker session" in server.output()
        assert "Sessions: room for 0 more worker session(s)" in bus.run("status").stdout

        # The bus still serves every session it took: jobs run on the real worker and the swarm.
        handles = [client.submit("builtin.echo", {"n": n}) for n in range(300)]
        assert [h.result(timeout=30) for h in handles] == [{"n": n} for n in range(300)]
        wait_for(lambda: swarm_counts(stats).get("jobs", 0) > 0, timeout=5, what="jobs run by swarm sessions")
        assert server.alive()
        assert client.status().sessions_free == 0

        # A real worker that comes now is refused too: it hangs up (holding none of the
        # server's files) and says hello again a little later.
        late = bus.start("worker", "--name", "late")
        late.wait_output("the server refused this session: no room for another worker session", timeout=15)
        assert late.alive() and server.alive()

        # Sessions that go free their places (the server gives them up after 3
        # heartbeats), and the late worker gets in at its next try.
        swarm.stop()
        wait_for(lambda: any(a.name == "late" and a.healthy for a in client.status().actors), timeout=20, what="the late worker in")
        assert "the server took this session after" in late.output()
        assert client.status().sessions_free == room - 2
        assert [h.result(timeout=30) for h in [client.submit("builtin.echo", n) for n in range(50)]] == list(range(50))
