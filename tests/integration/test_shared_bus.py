"""A bus many hosts share, on loopback (issue: results only to whoever may see them,
runs bound to the session that holds them, one address for remote clients).

One bus per module: home A runs `qntx up --bind`; keys of their own stand in for a
client, a developer, a worker and a plugin host elsewhere.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import msgspec
import pytest
import zmq

from qntx.bus.client import Client
from qntx.bus.codec import encode
from qntx.errors import Forbidden, NotFound, Timeout
from qntx.protocol import (
    AtsReply,
    Attest,
    EndedJobs,
    HandlersChanged,
    JobDone,
    JobOutput,
    JobProgress,
    NewAttestation,
    RegisterPlugin,
    ServerReply,
    WaitJob,
)
from qntx.stored_handlers import handler_attestation, tombstone_attestation
from tests.conftest import fresh_home
from tests.integration.conftest import Bus, wait_for
from tests.integration.test_multihost import Hosts, free_ports

pytestmark = pytest.mark.timeout(120)

YEAR_MS = 365 * 24 * 3600 * 1000


class Shared(Hosts):
    def __init__(self, a: Bus, port: int):
        super().__init__(a, a, port)
        self.port = port
        self.results = f"tcp://127.0.0.1:{port + 2}"
        self.events = f"tcp://127.0.0.1:{port + 3}"
        self.ats_events = f"tcp://127.0.0.1:{port + 5}"
        self.keys = {}

    def key(self, role: str):
        if role not in self.keys:
            self.keys[role] = self.stranger(f"k-{role}")
            self.allow(f"k-{role}", self.keys[role], role)
        return self.keys[role]


@pytest.fixture(scope="module")
def shared():
    with fresh_home() as home:
        a = Bus(home)
        try:
            assert a.run("keys").returncode == 0
            shared = Shared(a, free_ports(6))
            assert a.run("handler", "create", "hello", "--code", "print('hello'); _result = 'v1'").returncode == 0
            up = a.start("up", "--workers", "1", "--bind", shared.server)
            up.wait_output("handler=python.hello", timeout=40)
            yield shared
        finally:
            a.stop_all()


def server_log(shared: Shared) -> str:
    return (shared.a.home / "logs" / "server.log").read_text()


def subscribe(security, endpoint: str, prefix: bytes = b"") -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, prefix)
    security.connect(sub, endpoint)
    return sub


def drain(sub: zmq.Socket, wait_ms: int) -> list[list[bytes]]:
    got = []
    while sub.poll(wait_ms):
        got.append(sub.recv_multipart())
        wait_ms = 50
    return got


def test_events_carry_notices_to_whom_roles_allow(shared):
    as_worker = subscribe(shared.key("worker"), shared.events)
    as_worker_ats = subscribe(shared.key("worker"), shared.ats_events)
    as_client = subscribe(shared.key("client"), shared.events, b"job.")
    try:
        with shared.a.connect() as bus:

            def client_hears() -> bool:
                bus.submit("builtin.echo", "warm").wait(10)
                return bool(drain(as_client, 300))

            wait_for(client_hears, 20, what="the client key's subscription")
            drain(as_client, 100)
            secret = "a result only its submitter may read"
            job = bus.submit("builtin.echo", secret).wait(10)
            bus.attest(["confidential"], ["is"], ["kept"], attributes={"body": secret})
            heard = drain(as_client, 1000)
            assert any(job.id.encode() in frames[0] for frames in heard)
            assert not any(secret.encode() in b"".join(frames) for frames in heard)  # a notice, no result
            assert drain(as_worker, 500) == [] and drain(as_worker_ats, 200) == []
    finally:
        for sock in (as_worker, as_worker_ats, as_client):
            sock.close(0)
    assert "refused the subscription b'' of key k-worker" in server_log(shared)


def running_sleep(bus, seconds: float):
    handle = bus.submit("builtin.sleep", seconds, max_attempts=1)
    job = wait_for(lambda: (j := bus.job(handle.id)).status == "running" and j, 20, what="the job running")
    return handle, job


def test_reports_from_a_key_that_does_not_hold_the_run_are_discarded(shared):
    # The keys first (each is a `keys allow` run, seconds on a busy machine): the forged
    # reports must reach the server while the job still runs.
    shared.key("worker"), shared.key("plugin")
    with shared.a.connect() as bus:
        handle, job = running_sleep(bus, 1.5)
        forged_result = encode("forged")
        pipe = zmq.Context.instance().socket(zmq.PUSH)
        pipe.setsockopt(zmq.LINGER, 2000)
        shared.key("worker").connect(pipe, shared.results)
        try:
            pipe.send(encode(JobDone(job_id=job.id, lease=job.lease, success=True, result=msgspec.Raw(forged_result))))
            pipe.send(encode(JobProgress(job_id=job.id, current=9, total=9, lease=job.lease)))
        finally:
            pipe.close()
        with Client(shared.server, ServerReply, security=shared.key("plugin"), timeout_s=5) as plugin:
            plugin.notify(JobProgress(job_id=job.id, current=7, total=9, lease=job.lease))
            plugin.notify(JobOutput(job_id=job.id, stream="stdout", text="forged output", lease=job.lease))
            plugin.notify(JobProgress(job_id=job.id, current=5, total=9, lease=0))
        wait_for(lambda: server_log(shared).count(f"for job {job.id}") >= 4, 10, what="the discards logged")
        final = handle.wait(20)
        assert final.status == "completed" and final.result == {"slept": 1.5} and final.runs == 1
        assert final.progress is None or final.progress.current not in (5, 7, 9)
        assert "forged output" not in final.logs
        log = server_log(shared)
        assert f"discarded a JobDone for job {job.id} lease {job.lease} from key k-worker" in log
        assert f"discarded a JobProgress for job {job.id} without a lease" in log


def test_a_plugin_key_cannot_speak_for_another_plugin(shared):
    with Client(shared.server, ServerReply, security=shared.key("plugin"), timeout_s=5) as plugin:
        with pytest.raises(Forbidden):
            plugin.request(HandlersChanged(plugin="python", handler_names=[]))
        with pytest.raises(Forbidden):
            endpoint = shared.a.settings.plugin_endpoint("python")
            plugin.request(RegisterPlugin(name="python", endpoint=endpoint, pid=1))
    with shared.a.connect() as bus:
        assert bus.submit("python.hello").result(timeout=20) == "v1"  # nothing was dropped or failed
    assert "re-registered" not in server_log(shared)


def test_writing_what_runs_needs_the_developer_role(shared):
    code = handler_attestation("sneaky", "print('owned')")
    with Client(shared.ats, AtsReply, security=shared.key("client"), timeout_s=5) as client:
        with pytest.raises(Forbidden, match="developer"):
            client.request(Attest(items=[code]))
        shouted = NewAttestation(subjects=["sneaky"], predicates=["HANDLER"], contexts=["Python"], attributes={"code": "1"})
        with pytest.raises(Forbidden):  # matched as queries match: case-insensitively
            client.request(Attest(items=[shouted]))
        assert client.request(Attest(items=[NewAttestation(subjects=["fine"])])).records  # other claims: yes
    with Client(shared.ats, AtsReply, security=shared.key("developer"), timeout_s=5) as developer:
        assert developer.request(Attest(items=[handler_attestation("dev", "_result = 'dev'")])).records
    with shared.a.connect() as bus:
        wait_for(lambda: "python.dev" in bus.status().handlers, 10, what="the developer's handler")
        assert bus.submit("python.dev").result(timeout=20) == "dev"


def test_a_future_timestamp_does_not_hide_later_handlers(shared):
    ahead = handler_attestation("clock", "_result = 'from the future'")
    ahead.timestamp = int(time.time() * 1000) + YEAR_MS
    with shared.a.connect() as bus:
        bus.attest_many([ahead])
        wait_for(lambda: "python.clock" in bus.status().handlers, 10, what="the handler")
        assert shared.a.run("handler", "create", "clock", "--code", "_result = 'today'").returncode == 0
        wait_for(lambda: bus.submit("python.clock").result(timeout=20) == "today", 10, what="the newer code")
        bus.attest_many([tombstone_attestation("clock")])
        wait_for(lambda: "python.clock" not in bus.status().handlers, 10, what="the handler deleted")


def test_one_address_for_remote_clients(shared):
    with fresh_home() as home:
        remote = Bus(home)
        assert remote.run("keys").returncode == 0
        assert remote.run("keys", "server", shared.key_of(shared.a)).returncode == 0
        allowed = shared.a.run("keys", "allow", "remote-dev", shared.key_of(remote), "--role", "developer")
        assert allowed.returncode == 0, allowed.stderr
        ran = remote.run("--connect", shared.server, "ix", "hello")
        assert ran.returncode == 0 and ran.stdout.startswith("hello"), ran.stderr
        assert remote.run("--connect", shared.server, "as", "remote", "is", "here").returncode == 0
        found = remote.run("ax", "remote is here", "--json", "--connect", shared.server)
        assert found.returncode == 0 and '"remote"' in found.stdout
        listed = remote.run("--connect", shared.server, "pulse", "jobs", "--limit", "3")
        assert listed.returncode == 0 and "python.hello" in listed.stdout
        assert not (home / "ats").exists()  # nothing went to an embedded store here
        script = (
            "import qntx\n"
            f"with qntx.connect({shared.server!r}) as bus:  # this home's keys: $QNTX_HOME\n"
            "    print(bus.submit('python.hello').result(timeout=20), bus.ax('remote is here')[0].subjects)\n"
        )
        env = {**remote.env, "QNTX_HOME": str(home)}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0 and "v1 ['remote']" in done.stdout, done.stderr


def test_a_remote_bus_that_is_down_is_one_line_within_5s():
    with fresh_home() as home:
        bus = Bus(home)
        assert bus.run("keys").returncode == 0
        nobody = f"tcp://127.0.0.1:{free_ports(1)}"
        for argv in (("ix", "hello"), ("ax", "x", "is", "y"), ("pulse", "jobs")):
            started = time.monotonic()
            done = bus.run("--connect", nobody, *argv)
            assert time.monotonic() - started < 5 + 1.5  # (the interpreter's start included)
            assert done.returncode != 0 and done.stderr.count("\n") == 1 and "no QNTX server answers" in done.stderr
        assert not (home / "ats").exists()
        import qntx
        from qntx.errors import Unavailable

        started = time.monotonic()
        with pytest.raises(Unavailable):
            qntx.connect(home, connect=nobody)
        assert time.monotonic() - started < 5


def test_wait_job_answers_the_asker_only(shared):
    with shared.a.connect() as bus:
        handle = bus.submit("builtin.echo", {"k": 1})
        with Client(shared.server, ServerReply, security=shared.key("client"), timeout_s=5) as other:
            update = other.request(WaitJob(id=handle.id, timeout_ms=5000))
            assert update.job.status == "completed" and msgspec.msgpack.decode(update.job.result) == {"k": 1}
            with pytest.raises(NotFound):
                other.request(WaitJob(id="JB-NOPE", timeout_ms=10))
        with Client(shared.server, ServerReply, security=shared.key("worker"), timeout_s=5) as worker:
            with pytest.raises(Forbidden):
                worker.request(WaitJob(id=handle.id))


def test_ended_jobs_waits_for_the_first_to_end_and_tells_all_that_did(shared):
    """The protocol as another language's client sees it: one waiting EndedJobs for
    many jobs is answered when one of them ends, with what ended; at its deadline
    with nothing; at once for ids the server does not hold (``gone``)."""
    import threading

    with shared.a.connect() as bus:
        gate = bus.submit("builtin.sleep", 60, max_attempts=1)
        behind = bus.submit("builtin.echo", 1, after=[gate.id])  # ends only once the gate does
        ids = [gate.id, behind.id]
        for handle in (gate, behind):
            handle.accepted()
        with Client(shared.server, ServerReply, security=shared.key("client"), timeout_s=20) as other:
            started = time.monotonic()
            assert other.request(EndedJobs(ids=ids, wait_ms=300)).jobs == []  # nothing ended: at its deadline
            assert 0.25 < time.monotonic() - started < 5
            threading.Timer(1.0, lambda: shared.a.run("pulse", "cancel", gate.id)).start()
            started = time.monotonic()
            reply = other.request(EndedJobs(ids=ids, wait_ms=15_000))
            assert 0.9 < time.monotonic() - started < 12  # answered when the gate was cancelled
            told = {job.id: job.status for job in reply.jobs}
            assert told.get(gate.id) == "cancelled" and set(told) <= set(ids)
            started = time.monotonic()
            assert other.request(EndedJobs(ids=["JB-NOPE"], wait_ms=5_000)).gone == ["JB-NOPE"]
            assert time.monotonic() - started < 2  # at once: waiting could not tell


def test_a_loop_of_results_asks_once_per_answer_not_once_per_job(shared, monkeypatch):
    jobs, sent = 600, []
    real_send = Client.send
    monkeypatch.setattr(Client, "send", lambda self, message: sent.append(type(message).__name__) or real_send(self, message))
    with shared.a.connect() as bus:
        handles = [bus.submit("builtin.echo", n) for n in range(jobs)]
        assert [h.result(timeout=60) for h in handles] == list(range(jobs))
    asks = sum(1 for kind in sent if kind in ("WaitJob", "EndedJobs"))
    assert asks <= jobs // 3, f"{asks} requests for {jobs} results: {sent.count('WaitJob')} WaitJob"


def test_a_loop_of_results_asks_for_about_as_many_ids_as_end(shared, monkeypatch):
    """Each id in an EndedJobs is encoded by the client and looked up by the server,
    and one not ended is asked for again: a loop asks for a few ids per result, not
    the whole read-ahead window on every answer."""
    jobs, ids = 600, []
    real_send = Client.send

    def counted(self, message):
        if isinstance(message, EndedJobs):
            ids.append(len(message.ids))
        return real_send(self, message)

    monkeypatch.setattr(Client, "send", counted)
    with shared.a.connect() as bus:
        handles = [bus.submit("builtin.echo", n) for n in range(jobs)]
        assert [h.result(timeout=60) for h in handles] == list(range(jobs))
    assert ids, "the loop asked for its results together"
    assert sum(ids) <= 8 * jobs, f"{sum(ids)} ids asked in {len(ids)} EndedJobs for {jobs} results"


def test_a_gather_of_results_asks_once_per_answer_and_each_keeps_its_own_outcome(shared, monkeypatch):
    import asyncio

    import qntx.aio
    from qntx.bus.async_client import AsyncClient

    jobs, sent = 600, []
    real_send = AsyncClient.send

    async def counted(self, message):
        sent.append(type(message).__name__)
        return await real_send(self, message)

    monkeypatch.setattr(AsyncClient, "send", counted)

    async def run():
        async with await qntx.aio.connect(shared.a.home) as bus:
            handles = [await bus.submit("builtin.echo", n) for n in range(jobs)]
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            assert results == list(range(jobs))
            long = await bus.submit("builtin.sleep", 30, max_attempts=1)
            started = time.monotonic()
            with pytest.raises(Timeout):
                await long.result(timeout=0.5)
            assert time.monotonic() - started < 3
            with pytest.raises(NotFound):
                await bus.wait("JB-NO-SUCH-JOB", timeout=10)  # not held by the server: asked alone
            await bus.cancel(long.id)

    asyncio.run(run())
    asks = sum(1 for kind in sent if kind in ("WaitJob", "EndedJobs"))
    assert asks <= jobs // 3, f"{asks} requests for {jobs} results: {sent.count('WaitJob')} WaitJob"


def test_big_results_reach_every_kind_of_waiter_once_their_commit_is_done(shared):
    """A result over 1 MiB is told once its commit is on disk (so the server never
    holds the answer's copy beside the commit's): alone, in a loop, and in a gather."""
    import asyncio

    import qntx.aio

    big = "b" * (3 << 20)
    with shared.a.connect() as bus:
        assert bus.submit("builtin.echo", big).result(timeout=60) == big  # alone (WaitJob)
        handles = [bus.submit("builtin.echo", big if n % 2 else n) for n in range(6)]
        assert [h.result(timeout=60) for h in handles] == [big if n % 2 else n for n in range(6)]  # EndedJobs

    async def gather():
        async with await qntx.aio.connect(shared.a.home) as bus:
            handles = [await bus.submit("builtin.echo", big) for _ in range(3)]
            return await asyncio.gather(*(h.result(timeout=60) for h in handles))

    assert asyncio.run(gather()) == [big] * 3


def rss_kb(pid: int, kind: str = "VmRSS") -> int:
    """Resident memory of ``pid``: all of it, or RssAnon (the process's own, without
    the pages of the LMDB files it maps, which the kernel may drop at will)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(f"{kind}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {kind} for pid {pid}")


BIG_RESULTS = 2_000  # jobs of 40 KB results run by another client while the watchers wait
WAITING = """
import sys, threading, qntx
bus = qntx.connect()
handle = bus.submit("builtin.sleep", 120, max_attempts=1)
handle.accepted()
print("waiting", flush=True)
# It waits for its own job (WaitJob long-polls on its connection) the whole time;
# a line on stdin asks it how that job is doing.
line = threading.Thread(target=sys.stdin.readline)
line.start()
while line.is_alive():
    try:
        handle.wait(timeout=0.5)
    except qntx.errors.Timeout:
        pass
print(bus.job(handle.id).status, flush=True)
"""
SUBSCRIBER = """
import zmq, qntx.settings
s = qntx.settings.load_settings()
sub = zmq.Context.instance().socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(s.events_endpoint)
sub.recv_multipart()
print("subscribed", flush=True)
while True:
    sub.recv_multipart()
"""


def test_memory_stays_bounded_for_watchers_and_stalled_subscribers(shared):
    """A client that submitted one job holds nothing of others' results while it waits
    for its own; a subscriber stopped with SIGSTOP costs the server bounded memory."""
    import signal

    env = {**shared.a.env}
    watcher = subprocess.Popen(
        [sys.executable, "-c", WAITING], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    subscriber = subprocess.Popen([sys.executable, "-c", SUBSCRIBER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        with shared.a.connect() as bus:
            server_pid = next(a.pid for a in bus.status().actors if a.name == "server")
            assert watcher.stdout.readline().strip() == "waiting"

            # A subscriber hears only what is published once its connection is up:
            # jobs go on until it has heard one (a single one can come too early).
            deadline = time.monotonic() + 30
            while not select.select([subscriber.stdout], [], [], 0.1)[0]:
                assert time.monotonic() < deadline, "the subscriber heard no event in 30 s"
                bus.submit("builtin.echo", 1).wait(10)
            assert subscriber.stdout.readline().strip() == "subscribed"
            blob = "x" * 40_000

            def load() -> None:  # 100 at a time: the server's own share stays the same each time
                for _ in range(BIG_RESULTS // 100):
                    handles = [bus.submit("builtin.echo", blob) for _ in range(100)]
                    for handle in handles:
                        assert len(handle.result(timeout=60)) == 40_000

            load()  # once first: the server's allocator reaches the size this load needs
            os.kill(subscriber.pid, signal.SIGSTOP)
            watcher_before, server_before = rss_kb(watcher.pid), rss_kb(server_pid, "RssAnon")
            load()
            watcher_growth = rss_kb(watcher.pid) - watcher_before
            server_growth = rss_kb(server_pid, "RssAnon") - server_before
            assert watcher_growth < 20_000, f"the waiting client grew by {watcher_growth} KB"
            assert server_growth < 50_000, f"the server grew by {server_growth} KB with a stalled subscriber"
            watcher.stdin.write("\n")
            watcher.stdin.flush()
            assert watcher.stdout.readline().strip() == "running"
    finally:
        for process in (watcher, subscriber):
            try:
                os.kill(process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            process.kill()
            process.wait(10)
