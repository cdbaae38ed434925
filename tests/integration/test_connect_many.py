"""Several server addresses: workers, plugins and clients find the leading server by themselves.

On loopback, on LMDB: home A runs `qntx up --bind` on one address; home C (another
host) runs a worker and the remote python plugin and a client, each given a dead
address first and A's second. Then A's `up` stops and home B (its own LMDB, the same
server keys: it stands in for the standby that took over) starts `up` on the first
address: the worker and the plugin join B by themselves, keeping their sessions, and
run B's jobs; a client's next call reaches B. A server stopped with SIGSTOP (silent,
its connections open) is left within the heartbeat window.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time

import pytest

from qntx.bus.pidlock import lock_holder
from qntx.errors import Unavailable
from qntx.join import JOIN_TIMEOUT_S, SILENT_HEARTBEATS
from tests.conftest import fresh_home
from tests.integration.conftest import Bus, Process, wait_for
from tests.integration.test_faults import actor_pids
from tests.integration.test_multihost import free_ports

pytestmark = pytest.mark.timeout(180)

# A python job that takes a moment (the job's record says which session ran it).
WHERE = "import os, time\ntime.sleep(0.3)\n_result = os.getpid()\n"
HEARTBEAT_WINDOW_S = 1.0 * SILENT_HEARTBEATS  # (heartbeat_s is 1 s by default)
RUN_S = 12  # a run that outlasts a server's death, a new `up` and the worker's rejoin


class Hosts:
    """Homes A and B share one key pair (what a standby is given); C is authorised on both."""

    def __init__(self, a: Bus, b: Bus, c: Bus):
        self.a, self.b, self.c = a, b, c
        self.addr_a = f"tcp://127.0.0.1:{free_ports(6)}"
        self.addr_b = f"tcp://127.0.0.1:{free_ports(6)}"
        while self.addr_b.rpartition(":")[2] in {str(int(self.addr_a.rpartition(':')[2]) + n) for n in range(-5, 6)}:
            self.addr_b = f"tcp://127.0.0.1:{free_ports(6)}"
        self.both = f"{self.addr_b},{self.addr_a}"  # the dead (for now) address first

    def up(self, home: Bus, address: str) -> Process:
        up = home.start("up", "--workers", "1", "--python-pool", "1", "--bind", address)
        up.wait_output("handler=python.where", timeout=40)
        return up

    def actors(self, home: Bus) -> set[str]:
        """The sessions ready at ``home``'s server (healthy, with credit)."""
        with home.connect() as bus:
            return {x.name for x in bus.status().actors if x.healthy and x.credit > 0}


@pytest.fixture
def hosts():
    with fresh_home() as home_a, fresh_home() as home_b, fresh_home() as home_c:
        a, b, c = Bus(home_a), Bus(home_b), Bus(home_c)
        try:
            assert a.run("keys").returncode == 0 and c.run("keys").returncode == 0
            key_c = c.run("keys", "show").stdout.strip()
            allowed = a.run("keys", "allow", "host-c", key_c, "--role", "worker", "--role", "plugin", "--role", "client")
            assert allowed.returncode == 0, allowed.stderr
            assert c.run("keys", "server", a.run("keys", "show").stdout.strip()).returncode == 0
            shutil.copytree(home_a / "keys", home_b / "keys")  # the standby's keys: the same server, the same grants
            for home in (a, b):
                assert home.run("handler", "create", "where", "--code", WHERE).returncode == 0
            yield Hosts(a, b, c)
        finally:
            for home in (c, a, b):
                for process in home.processes:
                    if process.alive():
                        os.kill(process.pid, signal.SIGCONT)
                home.stop_all()


def ran_on(bus, count: int) -> dict[str, set]:
    """Who ran ``count`` python jobs and ``count`` built-in sleeps (session name -> results)."""
    handles = [bus.submit("python.where") for _ in range(count)] + [bus.submit("builtin.sleep", 0.2) for _ in range(count)]
    by_worker: dict[str, set] = {}
    for handle in handles:
        job = handle.wait(60)
        assert job.status == "completed", job
        by_worker.setdefault(job.worker, set()).add(str(handle.result()))
    return by_worker


def test_bad_addresses_are_one_line_and_exit_2():
    with fresh_home() as home:
        c = Bus(home)
        for address in ("127.0.0.1:7400", "tcp://127.0.0.1", "tcp://127.0.0.1:7400,http://b:7400", "tcp://a:99999"):
            for argv in (("--connect", address, "pulse", "jobs"), ("worker", "--connect", address), ("plugin", "python", "--connect", address)):
                done = c.run(*argv, timeout=30)
                assert done.returncode == 2, (argv, done.stderr)
                assert done.stderr.count("\n") == 1 and "tcp://HOST:PORT" in done.stderr, done.stderr
        import qntx

        with pytest.raises(Exception, match="tcp://HOST:PORT"):
            qntx.connect(home, connect=["tcp://127.0.0.1:1", "nonsense"])


def test_the_leader_is_found_and_found_again_after_a_takeover(hosts):
    a, b, c = hosts.a, hosts.b, hosts.c
    up_a = hosts.up(a, hosts.addr_a)
    worker = c.start("worker", "--connect", hosts.both, "--name", "worker-c")
    plugin = c.start("plugin", "python", "--connect", hosts.both, "--name", "plugin-c")
    wait_for(lambda: {"worker-c", "plugin-c"} <= hosts.actors(a), 40, what="C's worker and plugin joined A")

    # The CLI with both addresses runs `ix` and `pulse jobs` on A.
    ran = c.run("--connect", hosts.both, "ix", "where")
    assert ran.returncode == 0, ran.stderr
    listed = c.run("--connect", hosts.both, "pulse", "jobs", "--limit", "5")
    assert listed.returncode == 0 and "python.where" in listed.stdout, listed.stderr
    assert not (c.home / "ats").exists()  # nothing went to an embedded store here

    import qntx.aio

    loop = asyncio.new_event_loop()  # an asyncio client too, kept across the takeover
    aclient = loop.run_until_complete(qntx.aio.connect(c.home, connect=hosts.both))
    notices = aclient.events()  # subscribed at A now

    def a_notice_while_jobs_run_at(home: Bus):
        """The first notice about a job submitted at ``home`` (while they keep coming)."""
        stop, submitted = threading.Event(), set()

        def keep_submitting() -> None:
            with home.connect() as bus:
                while not stop.is_set():
                    handle = bus.submit("builtin.echo", 1)
                    submitted.add(handle.id)
                    handle.wait(10)

        async def heard():
            async for notice in notices:
                if getattr(notice, "id", None) in submitted:
                    return notice

        thread = threading.Thread(target=keep_submitting)
        thread.start()
        try:
            return loop.run_until_complete(asyncio.wait_for(heard(), 20))
        finally:
            stop.set()
            thread.join(20)

    assert a_notice_while_jobs_run_at(a) is not None
    with c.connect(connect=[hosts.addr_b, hosts.addr_a]) as client, c.connect(connect=hosts.both) as reader:
        assert client.settings.server_endpoint == aclient.settings.server_endpoint == hosts.addr_a
        with a.connect() as bus_a:
            assert {"worker-c", "plugin-c"} & set(ran_on(bus_a, 6)), "C's sessions ran none of A's jobs"

        # A goes away; B (the standby that took over) starts on the other address.
        up_a.stop()
        up_b = hosts.up(b, hosts.addr_b)
        serving = time.monotonic()
        wait_for(lambda: {"worker-c", "plugin-c"} <= hosts.actors(b), 30, what="C's worker and plugin joined B by themselves")
        print(f"C's worker and plugin ready at B {time.monotonic() - serving:.1f}s after it serves")
        assert worker.alive() and plugin.alive()  # the same processes: nothing restarted them
        with b.connect() as bus_b:
            ran_b = ran_on(bus_b, 12)
        assert "worker-c" in ran_b and "plugin-c" in ran_b, ran_b  # C's sessions ran B's jobs

        # The clients' next calls reach B: a read (asked again of B), a submission (it was not sent anywhere before
        # the client found B), a status (B's handlers and sessions).
        assert "python.where" in reader.status().handlers and reader.settings.server_endpoint == hosts.addr_b
        assert client.submit("python.where").wait(30).status == "completed"
        assert client.settings.server_endpoint == hosts.addr_b
        status = client.status()
        assert "python.where" in status.handlers and "worker-c" in {x.name for x in status.actors}
        # Its events subscription finds B by itself (a quiet spell, no answer from A) and hears B.
        assert a_notice_while_jobs_run_at(b) is not None and aclient.settings.server_endpoint == hosts.addr_b
        ajob = loop.run_until_complete(loop.run_until_complete(aclient.submit("builtin.echo", 1)).wait(30))
        assert ajob.status == "completed" and aclient.settings.server_endpoint == hosts.addr_b
        astatus = loop.run_until_complete(aclient.status())
        assert "python.where" in astatus.handlers
        loop.run_until_complete(notices.aclose())
        loop.run_until_complete(aclient.close())
        loop.close()

        # With neither up, the CLI fails in one line within the join timeout, naming both.
        up_b.stop()
    started = time.monotonic()
    down = c.run("--connect", hosts.both, "pulse", "jobs")
    assert time.monotonic() - started < JOIN_TIMEOUT_S + 1.5  # (the interpreter's start included)
    assert down.returncode == Unavailable.exit_code and down.stderr.count("\n") == 1, down.stderr
    assert hosts.addr_a in down.stderr and hosts.addr_b in down.stderr, down.stderr


def test_a_stopped_server_is_left_within_the_heartbeat_window(hosts):
    a, b, c = hosts.a, hosts.b, hosts.c
    hosts.up(a, hosts.addr_a)
    worker = c.start("worker", "--connect", hosts.both, "--name", "worker-c")
    plugin = c.start("plugin", "python", "--connect", hosts.both, "--name", "plugin-c")
    wait_for(lambda: {"worker-c", "plugin-c"} <= hosts.actors(a), 40, what="C's worker and plugin joined A")
    hosts.up(b, hosts.addr_b)  # (a standby binds nothing; here B just waits to be found)
    assert not {"worker-c", "plugin-c"} & hosts.actors(b)

    server_a = lock_holder(a.settings.lock_path("server"))
    os.kill(server_a, signal.SIGSTOP)  # silent, its connections open
    try:
        stopped = time.monotonic()
        wait_for(lambda: {"worker-c", "plugin-c"} <= hosts.actors(b), 30, what="C's worker and plugin at B")
        moved_s = time.monotonic() - stopped
        print(f"left the stopped server in {moved_s:.1f}s (heartbeat window {HEARTBEAT_WINDOW_S:g}s)")
        assert moved_s < HEARTBEAT_WINDOW_S + 2.5  # the window, then one join, a welcome and a status
        with b.connect() as bus_b:
            ran_b = ran_on(bus_b, 8)
        assert "worker-c" in ran_b and "plugin-c" in ran_b, ran_b
        assert worker.alive() and plugin.alive()
    finally:
        os.kill(server_a, signal.SIGCONT)


def runs_on_c_then_a_dies(hosts, run_s: float):
    """C's worker joined with both addresses runs some of 10 sleeps of ``run_s`` for A;
    then A's whole host dies (kill -9 of its supervisor and every actor). Returns C's
    worker and the ids of the jobs it was running."""
    a, c = hosts.a, hosts.c
    up_a = hosts.up(a, hosts.addr_a)
    worker = c.start("worker", "--connect", hosts.both, "--name", "worker-c", "--capacity", "4")
    wait_for(lambda: "worker-c" in hosts.actors(a), 40, what="C's worker joined A")
    with a.connect() as bus_a:
        handles = [bus_a.submit("builtin.sleep", run_s, max_attempts=1) for _ in range(10)]
        wait_for(lambda: sum(bus_a.job(h.id).worker == "worker-c" for h in handles) >= 2, 20, what="runs on worker-c")
        on_c = {h.id for h in handles if bus_a.job(h.id).worker == "worker-c"}
    pids = actor_pids(a)
    up_a.stop(signal.SIGKILL)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    return worker, on_c


def each_ran_once_on_c(bus, on_c, run_s: float) -> None:
    for job_id in on_c:
        job = bus.wait(job_id, timeout=60)
        assert (job.status, job.worker, job.runs, job.attempts) == ("completed", "worker-c", 1, 1), job
        assert job.result == {"slept": run_s}


def test_runs_in_flight_are_adopted_by_the_server_that_takes_over(hosts):
    """The server comes back elsewhere on the same store (home A on the second address:
    what a standby on the shared database is): the worker rejoins it as the same session
    and its runs in flight are adopted, each run once, with its own result."""
    # Runs long enough to be still running when the worker has found the new server.
    worker, on_c = runs_on_c_then_a_dies(hosts, RUN_S)
    up_b = hosts.up(hosts.a, hosts.addr_b)
    with hosts.a.connect() as bus_b:
        wait_for(lambda: "worker-c" in {x.name for x in bus_b.status().actors}, 40, what="worker-c at the new address")
        each_ran_once_on_c(bus_b, on_c, RUN_S)
    assert "adopted" in up_b.output() and worker.alive()


def test_a_run_that_ends_while_no_server_leads_counts_once_its_result_reaches_the_new_one(hosts):
    """Runs end on the remote worker while no server is up; the worker sends their
    results again to the server that comes back elsewhere on the same store, naming its
    session, which claims each run: every job completes on the first run, none runs twice."""
    short_s = 1.0
    worker, on_c = runs_on_c_then_a_dies(hosts, short_s)
    # No server anywhere until every run on C has ended (each started before the kill).
    ends = time.time() + short_s + 0.5
    wait_for(lambda: time.time() > ends, 10, what="the runs on worker-c to end with no server up")
    up_b = hosts.up(hosts.a, hosts.addr_b)
    with hosts.a.connect() as bus_b:
        each_ran_once_on_c(bus_b, on_c, short_s)
    up_b.wait_output("adopted", timeout=10)  # (the server's log reaches up's output a moment later)
    assert worker.alive()
