"""Hung peers: a plugin or worker that is stopped (SIGSTOP), not dead.

The server health-checks plugins with a deadline and kills a hung one on this host so
that ``qntx up`` restarts it; ``qntx status`` shows real health, and a clear line when
the server itself is down or not answering.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import qntx
from tests.integration.conftest import wait_for
from tests.integration.test_faults import actor_pids

pytestmark = pytest.mark.timeout(180)

HEARTBEAT_S = 0.3
# A first run parks until its job is re-run elsewhere; a second run returns at once.
PARK_ONCE = (
    "import os, time\n"
    "mark = os.path.join(upstream['dir'], str(upstream['n']))\n"
    "os.makedirs(mark, exist_ok=True)\n"
    "first = not os.listdir(mark)\n"
    "open(os.path.join(mark, str(os.getpid())), 'w').close()\n"
    "if first:\n"
    "    time.sleep(60)\n"
    "_result = upstream['n']\n"
)


@pytest.fixture
def quick_bus(bus):
    """A bus whose heartbeats (and so health deadlines) are short."""
    bus.home.mkdir(parents=True, exist_ok=True)
    (bus.home / "config.toml").write_text(f"heartbeat_s = {HEARTBEAT_S}\nrequest_timeout_s = 2.0\n")
    return bus


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def health(b, name: str) -> bool | None:
    """The health ``status`` reports for an actor; None if it is not listed."""
    return next((a.healthy for a in b.status().actors if a.name == name), None)


def test_a_hung_plugin_is_killed_restarted_and_its_jobs_go_on(quick_bus, tmp_path):
    bus = quick_bus
    up = bus.start_up()
    plugin = actor_pids(bus)["plugin-python"]
    with qntx.connect(bus.home) as b:
        handles = [
            b.submit("python.script", {"content": PARK_ONCE, "dir": str(tmp_path), "n": n}, max_attempts=1)
            for n in range(2)
        ]
        wait_for(lambda: all((tmp_path / str(n)).exists() for n in range(2)), 30, what="every job running")
        os.kill(plugin, signal.SIGSTOP)
        try:
            # Three Health checks with no reply within their deadline, then a kill and a restart.
            up.wait_output(f"plugin python (pid {plugin}) is hung", timeout=20)
            wait_for(lambda: gone(plugin), 10, what="the hung plugin killed")
            wait_for(lambda: actor_pids(bus).get("plugin-python", plugin) != plugin, 20, what="a new plugin")
        finally:
            if not gone(plugin):
                os.kill(plugin, signal.SIGCONT)
        jobs = [b.wait(h.id, timeout=60) for h in handles]
        for n, job in enumerate(jobs):
            assert job.status == "completed" and job.result == n
            # Runs lost with the plugin use no attempt (one may also be lost on its way to
            # it through a worker before the kill); the handler itself ran exactly twice.
            assert job.attempts == 1 and job.runs == job.lost + 1 >= 2
            assert len(list((tmp_path / str(n)).iterdir())) == 2
        wait_for(lambda: health(b, "plugin:python") is True, 20, what="the new plugin healthy")


def test_the_plugin_takes_a_pid_lock(bus):
    bus.start_up()
    plugin = actor_pids(bus)["plugin-python"]
    second = bus.run("plugin", "python", timeout=60)
    assert second.returncode == 3
    assert second.stderr.strip().splitlines() == [
        f"error: a python plugin already runs on {bus.home} (pid {plugin})"
    ]
    assert actor_pids(bus)["plugin-python"] == plugin  # the first one was not disturbed


def test_status_shows_a_stopped_worker_unhealthy_and_a_resumed_one_healthy(quick_bus):
    bus = quick_bus
    bus.start_up("--workers", "2")
    worker = actor_pids(bus)["worker-1"]
    with qntx.connect(bus.home) as b:
        wait_for(lambda: health(b, "worker-1") is True and health(b, "worker-2") is True, 20, what="workers healthy")
        os.kill(worker, signal.SIGSTOP)
        try:
            wait_for(lambda: health(b, "worker-1") is False, 20, what="worker-1 unhealthy")
            assert health(b, "worker-2") is True
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_for(lambda: health(b, "worker-1") is True, 20, what="worker-1 healthy again")
    shown = bus.run("status")
    assert shown.returncode == 0, shown.stderr
    assert any(line.split()[:1] == ["worker-1"] and "healthy" in line.split() for line in shown.stdout.splitlines())


def test_status_with_the_server_down_or_hung_says_so_in_one_line(quick_bus):
    bus = quick_bus
    down = bus.run("status")
    assert down.returncode == 3
    assert down.stderr.strip().splitlines() == [
        f"error: the server is down: none runs on {bus.home} (start it with `qntx up`)"
    ]
    assert down.stdout == ""

    bus.start_up()
    server = actor_pids(bus)["server"]
    os.kill(server, signal.SIGSTOP)
    try:
        hung = bus.run("status")
    finally:
        os.kill(server, signal.SIGCONT)
    assert hung.returncode == 3
    lines = hung.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the server (pid {server}) is not answering: ")
