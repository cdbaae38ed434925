"""kill -9 of each actor while 300 jobs run: every accepted job completes with its own result.

Nothing here waits on a fixed sleep to "let things settle": each test kills once
jobs are demonstrably in flight, then waits for the outcome it asserts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

import qntx
from qntx.errors import QntxError
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(240)

JOBS = 300
WORK = "import time\ntime.sleep(0.02)\n_result = {'n': upstream['n'], 'pid': __import__('os').getpid()}\n"


def actor_pids(bus) -> dict[str, int]:
    path = bus.home / "run" / "actors"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {name: int(pid) for name, pid in (line.split() for line in lines if line)}


def interpreter_pids(plugin_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(plugin_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def submit_all(bus, handler: str = "python.work", max_attempts: int = 1, payload=None) -> dict[str, int]:
    """Submit the jobs; one attempt each unless said otherwise: losing a worker, a
    plugin or the server uses no attempt, so none is needed to come through."""
    with qntx.connect(bus.home) as b:
        handles = {
            b.submit(handler, payload or {"n": n}, max_attempts=max_attempts): n for n in range(JOBS)
        }
        b.flush()
        return {handle.id: n for handle, n in handles.items()}


def wait_in_flight(bus, minimum: int = 20) -> None:
    """Block until some jobs have finished and some are still to do."""

    def progressing():
        try:
            with qntx.connect(bus.home) as b:
                counts = b.status().queue
        except QntxError:
            return False
        return counts["completed"] >= minimum and counts["queued"] + counts["running"] > 0

    wait_for(progressing, 60, 0.01, what="jobs in flight")
    with qntx.connect(bus.home) as b:
        left = b.status().queue
    assert left["queued"] + left["running"] >= JOBS // 2, left  # the kill lands mid-run


def assert_all_completed(bus, jobs: dict[str, int], timeout: float = 150, result=lambda n: n) -> int:
    """Every accepted job ends completed with its own result; none lost, none stuck.

    Returns how many jobs needed more than one run (the kill's victims).
    """
    deadline = time.monotonic() + timeout
    pending = dict(jobs)
    retried = 0
    while pending and time.monotonic() < deadline:
        try:
            with qntx.connect(bus.home) as b:
                for job_id, n in list(pending.items()):
                    job = b.job(job_id)
                    if job.status in ("completed", "failed", "cancelled"):
                        assert job.status == "completed", (job.status, job.error)
                        assert (job.result["n"] if "n" in job.result else job.result) == result(n)
                        retried += job.runs > 1
                        del pending[job_id]
        except QntxError:
            pass  # the server is restarting
        if pending:
            time.sleep(0.2)
    assert not pending, f"{len(pending)} jobs never finished, e.g. {next(iter(pending))}"
    with qntx.connect(bus.home) as b:
        counts = b.status().queue
    assert counts["running"] == 0 and counts["queued"] == 0
    assert counts["completed"] == len(jobs)
    return retried


@pytest.fixture
def working(bus):
    assert bus.run("handler", "create", "work", "--code", WORK).returncode == 0
    up = bus.start_up()
    up.wait_output("handler=python.work")
    return up


def test_kill_9_worker(bus, working):
    # Workers run the built-ins (the python plugin takes its jobs itself).
    jobs = submit_all(bus, "builtin.sleep", payload={"seconds": 0.05})
    wait_in_flight(bus)
    os.kill(actor_pids(bus)["worker-1"], signal.SIGKILL)
    assert assert_all_completed(bus, jobs, result=lambda n: {"slept": 0.05}) >= 1  # its jobs ran again
    assert "worker-1 exited with code -9" in working.output()


def test_kill_9_plugin_interpreter(bus, working):
    jobs = submit_all(bus, max_attempts=3)  # a dead interpreter is the handler's crash: an attempt
    wait_in_flight(bus)
    plugin = actor_pids(bus)["plugin-python"]
    victims = interpreter_pids(plugin)
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert assert_all_completed(bus, jobs) >= 1
    assert set(interpreter_pids(plugin)).isdisjoint(victims)


def test_kill_9_python_plugin(bus, working):
    jobs = submit_all(bus)
    wait_in_flight(bus)
    plugin = actor_pids(bus)["plugin-python"]
    os.kill(plugin, signal.SIGKILL)
    assert assert_all_completed(bus, jobs) >= 1
    assert actor_pids(bus)["plugin-python"] != plugin


def test_kill_9_server(bus, working):
    jobs = submit_all(bus)
    wait_in_flight(bus)
    server = actor_pids(bus)["server"]
    os.kill(server, signal.SIGKILL)
    assert_all_completed(bus, jobs)  # running ones were adopted by their workers, not lost
    assert actor_pids(bus)["server"] != server


def test_kill_9_everything_then_a_fresh_up(bus, working):
    jobs = submit_all(bus)
    wait_in_flight(bus)
    pids = actor_pids(bus)
    working.stop(signal.SIGKILL)
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone with its supervisor
    bus.start_up()
    assert assert_all_completed(bus, jobs) >= 1


def test_sigterm_gives_running_jobs_their_grace_period(bus):
    assert bus.run("handler", "create", "nap", "--code", "import time\ntime.sleep(1)\n_result = upstream['n']").returncode == 0
    up = bus.start_up()
    up.wait_output("handler=python.nap")
    with qntx.connect(bus.home) as b:
        handles = [b.submit("python.nap", {"n": n}) for n in range(3)]
        wait_for(lambda: b.status().queue["running"] >= 2, 20, what="jobs running")
    assert up.stop() == 0  # SIGTERM, then the supervisor stops its actors in stages
    assert not actor_pids(bus)
    bus.start_up()
    with qntx.connect(bus.home) as b:
        for n, handle in enumerate(handles):
            job = b.wait(handle.id, timeout=30)
            assert job.status == "completed" and job.result == n
            # Finished inside the grace period: one attempt, no retry needed.
            assert job.attempts == 1


def test_handler_deleted_while_its_plugin_is_down(bus):
    assert bus.run("handler", "create", "slowish", "--code", "import time\ntime.sleep(0.3)").returncode == 0
    up = bus.start_up()
    up.wait_output("handler=python.slowish")
    with qntx.connect(bus.home) as b:
        handles = [b.submit("python.slowish", {"n": n}, max_attempts=5) for n in range(20)]
        wait_for(lambda: b.status().queue["completed"] >= 1, 30, what="a first job done")
        os.kill(actor_pids(bus)["plugin-python"], signal.SIGKILL)
        assert bus.run("handler", "delete", "slowish").returncode == 0
        jobs = [b.wait(h.id, timeout=60) for h in handles]
    assert all(j.status in ("completed", "failed") for j in jobs), [j.status for j in jobs]
    assert any("was deleted" in (j.error.message if j.error else "") for j in jobs)


SITECUSTOMIZE = """
import os, sys
flag = os.environ.get("QNTX_TEST_FAIL_ONCE")
if flag and "plugins.python.forkserver" in sys.orig_argv:
    try:
        os.unlink(flag)  # only the first interpreter to start finds it
    except FileNotFoundError:
        pass
    else:
        os._exit(3)
"""


def test_an_interpreter_that_dies_as_the_plugin_starts_costs_no_job_an_attempt(bus, tmp_path):
    """The plugin's pool fails to start (one interpreter dies as it comes up, as a kill
    in a chaos run can make it): the plugin starts a new pool at its next Initialize,
    and no job is run on the closed one, where each would fail at once."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag = tmp_path / "fail-once"
    flag.touch()
    bus.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "site"), bus.env.get("PYTHONPATH")]))
    bus.env["QNTX_TEST_FAIL_ONCE"] = str(flag)
    assert bus.run("handler", "create", "work", "--code", WORK).returncode == 0
    up = bus.start("up")
    up.wait_output("python interpreter failed to start", timeout=30)
    assert not flag.exists()
    up.wait_output("handler=python.work", timeout=60)  # the plugin initialized at last
    with qntx.connect(bus.home) as b:
        handles = [b.submit("python.work", {"n": n}, max_attempts=1) for n in range(20)]
        jobs = [h.wait(timeout=60) for h in handles]
    assert [(j.status, j.result["n"] if j.result else None) for j in jobs] == [("completed", n) for n in range(20)], [
        j.error for j in jobs
    ]
    assert all(j.attempts == 1 for j in jobs)


def test_up_restarts_an_actor_when_it_cannot_write_its_pid_file(bus, working):
    """The pid file is for tools: a write of it that fails (here its temporary file is
    a directory; a full disk does the same) is logged, and ``up`` goes on restarting
    the actor that died rather than stopping the whole bus."""
    pids = actor_pids(bus)
    (bus.home / "run" / "actors.tmp").mkdir()
    os.kill(pids["worker-1"], signal.SIGKILL)

    def restarted() -> bool:
        try:
            with qntx.connect(bus.home) as b:
                return any(a.name == "worker-1" and a.healthy and a.pid != pids["worker-1"] for a in b.status().actors)
        except QntxError:
            return False  # the bus is going down

    wait_for(restarted, 30, 0.1, what="worker-1 restarted")
    assert working.alive()
    assert "cannot write" in working.output()
    with qntx.connect(bus.home) as b:
        assert b.submit("builtin.echo", 7).result(timeout=30) == 7


def test_a_plugin_that_fails_a_restarted_servers_initialize_is_asked_again(bus, working):
    """The server restarts while ATS does not answer: the plugin cannot discover its
    handlers, so it fails the new server's Initialize. Once ATS answers again, the
    server asks again (the plugin registers afresh) and python jobs run."""
    pids = actor_pids(bus)
    os.kill(pids["ats"], signal.SIGSTOP)
    try:
        os.kill(pids["server"], signal.SIGKILL)
        working.wait_output("failed to initialize", timeout=60)
    finally:
        os.kill(pids["ats"], signal.SIGCONT)
    with qntx.connect(bus.home) as b:
        assert b.submit("python.work", {"n": 5}).result(timeout=60)["n"] == 5


def test_an_actor_restarted_after_its_logs_directory_was_removed_logs_again(bus, working):
    """The logs directory removed (to make room, say) while ``up`` runs: the actor it
    restarts gets its log file again, and its output is read as before."""
    import shutil

    pids = actor_pids(bus)
    shutil.rmtree(bus.home / "logs")
    os.kill(pids["worker-1"], signal.SIGKILL)
    log = bus.home / "logs" / "worker-1.log"
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 30, 0.1, what="worker-1's log written again")
    with qntx.connect(bus.home) as b:
        assert b.submit("builtin.echo", 8).result(timeout=30) == 8
