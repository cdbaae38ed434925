"""Big payloads and results against a real `qntx up`: the server lets a big payload
go once it is on disk and its job is out on a lease, reads it back for a retry and
for GetJob, and holds at most about two copies of a 10 MB payload at any instant."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time

import msgspec
import pytest

import qntx
from qntx.errors import Conflict
from qntx.protocol import GetJob, Submit, WaitJob
from tests.integration.conftest import wait_for
from tests.integration.test_faults import actor_pids
from tests.integration.test_pg_jobs import on_database
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(180)

# Its first attempt fails; the second waits for a file named ``go``, then returns
# the payload's blob reversed (a big result).
BIG = """
import os, time
runs = os.path.join(upstream['dir'], 'runs')
os.makedirs(runs, exist_ok=True)
attempt = len(os.listdir(runs)) + 1
open(os.path.join(runs, str(attempt)), 'w').close()
if attempt == 1:
    raise RuntimeError('the first attempt fails on purpose')
while not os.path.exists(os.path.join(upstream['dir'], 'go')):
    time.sleep(0.02)
_result = {'attempt': attempt, 'blob': upstream['blob'][::-1]}
"""


def stored_payload(bus, job_id: str) -> bytes:
    """The payload GetJob gives, as raw bytes (never decoded)."""
    return bytes(bus.server.request(GetJob(id=job_id), timeout_s=30).job.payload)


@pytest.fixture(params=["lmdb", "postgresql"])
def store(request, bus):
    """The bus's job store: LMDB in its home, or a fresh PostgreSQL database."""
    if request.param == "postgresql":
        on_database(bus, request.getfixturevalue("pg_url"))
    return request.param


def test_a_big_payload_and_result_survive_a_retry_and_a_server_kill_9_byte_for_byte(bus, store, tmp_path):
    assert bus.run("handler", "create", "big", "--code", BIG).returncode == 0
    up = bus.start_up()
    up.wait_output("handler=python.big")
    blob = secrets.token_hex(3 << 19)  # 3 MiB, none of it repeated: a torn or shifted copy shows
    payload = msgspec.msgpack.encode({"dir": str(tmp_path), "blob": blob})
    job_id = "JB-BIGPAY---22222222"
    runs = tmp_path / "runs"
    with qntx.connect(bus.home) as b:
        b.server.request(Submit(handler="python.big", payload=msgspec.Raw(payload), id=job_id, max_attempts=3), timeout_s=60)
        # The second attempt got its payload back from the store (the first let it go).
        wait_for(lambda: (runs / "2").exists(), 60, what="the second attempt running")
        wait_for(lambda: b.job(job_id).status == "running", 10, what="its JobStarted (sent once it ran 0.1 s)")
        assert stored_payload(b, job_id) == payload  # GetJob reads it back too
        # Submitted again with its id: the same payload is the same job; another is refused.
        again = b.server.request(Submit(handler="python.big", payload=msgspec.Raw(payload), id=job_id), timeout_s=60)
        assert again.job.id == job_id and again.job.attempts == 2
        with pytest.raises(Conflict):
            b.server.request(Submit(handler="python.big", payload=msgspec.Raw(payload[:-1] + b"x"), id=job_id), timeout_s=60)
    server = actor_pids(bus)["server"]
    os.kill(server, signal.SIGKILL)
    up.wait_output("server exited with code -9")
    wait_for(lambda: up.output().count("QNTX server serving") == 2, 30, what="the new server serving")
    with qntx.connect(bus.home) as b:
        assert stored_payload(b, job_id) == payload
        (tmp_path / "go").touch()  # the run the plugin kept through the crash ends now
        job = b.wait(job_id, timeout=60)
        assert job.status == "completed", (job.status, job.error)
        assert job.result == {"attempt": 2, "blob": blob[::-1]} and job.attempts == 2
        assert stored_payload(b, job_id) == payload  # and from the store once it left memory
    assert sorted(p.name for p in runs.iterdir()) == ["1", "2"]  # the crash cost no run


def rss_anon_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError(f"no RssAnon for pid {pid}")


def test_a_10_mb_echo_costs_the_server_about_two_copies_at_its_peak(bus):
    """Sampled every half millisecond (a copy lives a few): the server's own memory
    (RssAnon) grows by well under three copies of the payload at any instant."""
    bus.start_up()
    server = actor_pids(bus)["server"]
    payload = msgspec.Raw(msgspec.msgpack.encode([[]] * 10_000_000))  # 10 MB, carried raw
    with qntx.connect(bus.home) as b:
        assert b.submit("builtin.echo", "warm").result(timeout=20) == "warm"
        before = rss_anon_kb(server)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon_kb(server))
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            b.server.request(Submit(handler="builtin.echo", payload=payload, id="JB-PEAK---22222222"), timeout_s=60)
            wait_for(
                lambda: b.server.request(WaitJob(id="JB-PEAK---22222222", timeout_ms=20), timeout_s=30).job.status == "completed",
                60, interval=0, what="the echo completed",
            )  # fmt: skip
            time.sleep(0.3)  # what the end left counts too
        finally:
            done.set()
            sampler.join()
        job = b.server.request(GetJob(id="JB-PEAK---22222222"), timeout_s=30).job
        assert bytes(job.result) == bytes(payload)
    copies = (peak[0] - before) * 1024 / len(payload)
    print(f"server RssAnon: {before} kB before, {peak[0]} kB at the peak: {copies:.2f} copies of the payload")
    assert copies < 2.5
