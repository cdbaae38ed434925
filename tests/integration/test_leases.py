"""Runs have identities: leases across server crashes, stalled workers, big stores
and big payloads, against a real `qntx up`.

Handlers mark every run they start with a file, so the tests count runs exactly.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import msgspec
import pytest

import qntx
from qntx.protocol import GetJob, Job, JobProgress, ListJobs, Submit
from qntx.pulse.commands import Changes
from qntx.pulse.jobstore import JobStore
from tests.integration.conftest import wait_for
from tests.integration.test_faults import actor_pids

pytestmark = pytest.mark.timeout(180)

# Marks each run with a file runs/<n>-<pid>, sleeps, and returns which run it was.
MARKED = """
import os, time
runs = os.path.join(upstream['dir'], str(upstream['n']))
os.makedirs(runs, exist_ok=True)
mine = os.path.join(runs, f"run-{os.getpid()}-{time.monotonic_ns()}")
open(mine, 'w').close()
time.sleep(upstream['sleep'])
_result = {'n': upstream['n'], 'run': os.path.basename(mine)}
"""


def runs_of(directory: Path, n: int) -> list[str]:
    path = directory / str(n)
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def marked(bus):
    assert bus.run("handler", "create", "marked", "--code", MARKED).returncode == 0
    up = bus.start_up()
    up.wait_output("handler=python.marked")
    return up


def test_server_kill_9_with_jobs_running_loses_and_repeats_nothing(bus, marked, tmp_path):
    with qntx.connect(bus.home) as b:
        handles = [b.submit("python.marked", {"n": n, "dir": str(tmp_path), "sleep": 2.5}, max_attempts=1) for n in range(8)]
        b.flush()
        wait_for(lambda: all(runs_of(tmp_path, n) for n in range(8)), 20, what="all 8 running")
    server = actor_pids(bus)["server"]
    os.kill(server, signal.SIGKILL)
    marked.wait_output("server exited with code -9")
    wait_for(lambda: actor_pids(bus).get("server", server) != server, 20, what="a new server")
    # (its pid is known before it binds: on a loaded machine a client can come first)
    wait_for(lambda: marked.output().count("QNTX server serving") == 2, 30, what="the new server serving")
    with qntx.connect(bus.home) as b:
        for n, handle in enumerate(handles):
            job = b.wait(handle.id, timeout=60)
            assert job.status == "completed", (job.status, job.error)
            assert job.result["n"] == n and job.attempts == 1 and job.runs == 1
            assert runs_of(tmp_path, n) == [job.result["run"]]  # one run, and its own result
            assert job.worker == "plugin-python"  # the plugin takes its jobs itself
    assert "adopted" in marked.output()


def test_a_stopped_worker_loses_its_run_and_its_late_result_is_discarded(bus):
    up = bus.start_up("--workers", "2")
    with qntx.connect(bus.home) as b:
        handle = b.submit("builtin.sleep", {"seconds": 1.5}, max_attempts=1)  # built-ins run on workers
        handle.accepted()
        wait_for(lambda: b.job(handle.id).status == "running", 20, what="the job running")
        first = b.job(handle.id)
        worker_pid = actor_pids(bus)[first.worker]
        os.kill(worker_pid, signal.SIGSTOP)
        try:
            # Its heartbeats stop: the session is declared gone and the run goes to the other worker.
            up.wait_output(f"worker {first.worker} stopped responding", timeout=20)
            job = handle.wait(timeout=60)
        finally:
            os.kill(worker_pid, signal.SIGCONT)
        assert job.status == "completed" and job.worker != first.worker and job.lease > first.lease
        assert job.runs == 2 and job.attempts == 1  # the lost run used no attempt
        # The stopped worker wakes up and reports its stale run: it is discarded.
        up.wait_output(f"worker {first.worker} (pid {worker_pid}) joined", timeout=20)

        def stale_run_over() -> bool:
            [woken] = [a for a in b.status().actors if a.name == first.worker]
            return woken.leases == 0  # it reported the run and stopped listing it

        wait_for(stale_run_over, 20, what="the woken worker's stale run to end")
        again = b.job(handle.id)
        assert (again.status, again.lease, again.worker, again.runs) == ("completed", job.lease, job.worker, 2)
        assert b.submit("builtin.echo", "alive").result(timeout=20) == "alive"


def test_a_huge_store_and_big_listings_do_not_stall_workers(bus, tmp_path):
    # 300,000 finished jobs written straight into the store before the server starts.
    store = JobStore(bus.settings.pulse_path)
    try:
        batch, seq = 50_000, 0
        for _ in range(6):
            rows = []
            for _ in range(batch):
                job = Job(id=f"JB-OLD---{seq:08d}", handler="builtin.echo", status="completed", created_at=1_000 + seq, attempts=1, runs=1)
                rows.append((seq, job, None))
                seq += 1
            store.save(Changes(rows=rows, next_seq=seq, counts={"completed": seq}, lease_ceiling=1))
    finally:
        store.close()
    assert bus.run("handler", "create", "marked", "--code", MARKED).returncode == 0
    up = bus.start_up()
    up.wait_output("handler=python.marked")
    with qntx.connect(bus.home) as b:
        handle = b.submit("python.marked", {"n": 1, "dir": str(tmp_path), "sleep": 3}, max_attempts=1)
        wait_for(lambda: b.job(handle.id).status == "running", 20, what="the job running")
        started = time.monotonic()
        page = b.server.request(ListJobs(limit=300_000))
        assert len(page.jobs) == 1000 and page.cursor  # capped, with the next page's cursor
        seen = {j.id for j in page.jobs}
        for _ in range(20):
            page = b.server.request(ListJobs(limit=1000, cursor=page.cursor))
            assert not seen & {j.id for j in page.jobs}
            seen |= {j.id for j in page.jobs}
        listed = b.jobs(status="completed", limit=2500)  # the API pages by itself
        assert len(listed) == 2500 and len({j.id for j in listed}) == 2500
        assert time.monotonic() - started < 10
        job = handle.wait(timeout=30)
        assert job.status == "completed" and job.runs == 1
    assert "stopped responding" not in up.output()


def test_plugin_kill_9_uses_no_attempt(bus, marked, tmp_path):
    with qntx.connect(bus.home) as b:
        handles = [b.submit("python.marked", {"n": n, "dir": str(tmp_path), "sleep": 1.0}, max_attempts=1) for n in range(6)]
        b.flush()
        wait_for(lambda: sum(bool(runs_of(tmp_path, n)) for n in range(6)) >= 4, 20, what="jobs running")
        os.kill(actor_pids(bus)["plugin-python"], signal.SIGKILL)
        for n, handle in enumerate(handles):
            job = handle.wait(timeout=60)
            assert job.status == "completed", (job.status, job.error)
            assert job.result["n"] == n and job.attempts == 1


def test_progress_of_an_abandoned_run_never_reaches_the_new_one(bus, marked):
    """Cancel, then retry: whatever the first run still says is not the second run's."""
    with qntx.connect(bus.home) as b:
        handle = b.submit("builtin.sleep", {"seconds": 30})
        wait_for(lambda: b.job(handle.id).status == "running", 20, what="running")
        first = b.job(handle.id)
        b.cancel(handle.id)
        retried = b.retry(handle.id)
        assert retried.status == "queued"
        wait_for(lambda: b.job(handle.id).status == "running", 20, what="running again")
        second = b.job(handle.id)
        assert second.lease > first.lease
        b.server.notify(JobProgress(job_id=handle.id, current=1, total=9, lease=second.lease))
        wait_for(lambda: b.job(handle.id).progress is not None, 10, what="progress")
        # A late progress report of the first run (as a plugin would send it), after the
        # current run's, is ignored: the GetJob behind it on the same connection shows it.
        b.server.notify(JobProgress(job_id=handle.id, current=9, total=9, lease=first.lease))
        assert b.job(handle.id).progress.current == 1
        b.cancel(handle.id)


def test_a_10_mb_payload_is_carried_not_decoded(bus):
    bus.start_up()
    server = actor_pids(bus)["server"]
    with qntx.connect(bus.home) as b:
        assert b.submit("builtin.echo", "warm").result(timeout=20) == "warm"
        before = rss_kb(server)
        payload = msgspec.Raw(msgspec.msgpack.encode([[]] * 10_000_000))  # 10 MB of nested arrays
        reply = b.server.request(Submit(handler="builtin.echo", payload=payload, id="JB-BIG---22222222"), timeout_s=60)
        assert reply.job.id == "JB-BIG---22222222"
        peak = before
        deadline = time.monotonic() + 60
        while b.status().queue["completed"] < 2 and time.monotonic() < deadline:
            peak = max(peak, rss_kb(server))
            time.sleep(0.02)
        # Once it has let the payload go (what it keeps after, it keeps for good).
        wait_for(lambda: rss_kb(server) - before < 35_000, 10, what="the server's memory back down")
        after = rss_kb(server)
        print([line for line in Path(f"/proc/{server}/status").read_text().splitlines() if line.startswith("Rss")])
        job = b.server.request(GetJob(id="JB-BIG---22222222"), timeout_s=30)  # raw: not decoded here either
        assert job.job.status == "completed" and bytes(job.job.result) == bytes(payload)
    print(f"server RSS: {before} kB before, {peak} kB peak, {after} kB after")
    assert peak - before < 60_000  # about twice the payload, not tens of times
    assert after - before < 35_000
