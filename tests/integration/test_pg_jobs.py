"""Pulse's jobs in PostgreSQL, against a real `qntx up --store URL` and the real
server of tests/pg.py: an older schema refused until `qntx db upgrade`, the seed
flow's jobs kept in the database (and read from it with no server up), and a
kill -9 of the server mid-load after which every accepted job reaches its final
state with its own result.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

import qntx
from tests.integration.conftest import wait_for
from tests.integration.test_faults import actor_pids
from tests.integration.test_leases import MARKED, runs_of
from tests.pg import pg_empty_url, pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(180)


def on_database(bus, url: str):
    """Every qntx command of this bus (clients included) uses the database."""
    bus.env["QNTX_STORE"] = url
    return bus


def rows(url: str, statement: str) -> list[tuple]:
    import psycopg  # here: the fixtures have skipped the test where it is missing

    with psycopg.connect(url) as conn:
        return conn.execute(statement).fetchall()


def test_a_database_without_the_jobs_schema_is_refused_until_upgraded(bus, pg_empty_url):  # noqa: F811
    import psycopg

    from qntx.ats.sql import MIGRATIONS

    with psycopg.connect(pg_empty_url, autocommit=True) as conn:  # as an older qntx left it: the ATS only
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("CREATE TABLE qntx_schema (component text PRIMARY KEY, version integer NOT NULL, upgraded_at timestamptz)")
        conn.execute("INSERT INTO qntx_schema VALUES ('ats', 1, now())")
    refused = bus.run("up", "--store", pg_empty_url, timeout=30)
    assert refused.returncode == 3 and refused.stderr.count("\n") == 1, refused.stderr
    assert "has no pulse schema (an older qntx's): run `qntx db upgrade --store URL` first" in refused.stderr
    assert rows(pg_empty_url, "SELECT to_regclass('pulse_jobs')") == [(None,)]  # up created nothing

    upgraded = bus.run("db", "upgrade", "--store", pg_empty_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout == "upgraded pulse schema 0 -> 1\nupgraded leader schema 0 -> 1\n"
    check = bus.run("db", "check", "--store", pg_empty_url)
    assert check.returncode == 0 and "pulse version 1 of 1 (current)" in check.stdout, check.stdout


def test_seed_flow_jobs_are_kept_in_postgresql(bus, pg_url):  # noqa: F811
    on_database(bus, pg_url)
    up = bus.start_up()
    created = bus.run("handler", "create", "vacancies", "--code", "print('Hello from vacancies handler')")
    assert created.returncode == 0, created.stderr
    up.wait_output("handler=python.vacancies", timeout=10)
    ran = bus.run("ix", "vacancies", "some", "args")
    assert ran.returncode == 0 and ran.stdout == "Hello from vacancies handler\n", ran.stderr

    listed = bus.run("pulse", "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    [job] = json.loads(listed.stdout)
    assert job["handler"] == "python.vacancies" and job["status"] == "completed"
    wait_for(lambda: rows(pg_url, "SELECT id, status FROM pulse_jobs") == [(job["id"], "completed")], what="the job's row")
    assert not (bus.home / "pulse" / "data.mdb").exists()  # nothing of Pulse in the home

    # With no server up, the jobs are read from the database itself.
    assert up.stop() == 0
    offline = bus.run("pulse", "show", job["id"], "--json")
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["status"] == "completed"

    # A restart loads Pulse's state from the database: the sequence goes on.
    again = bus.start_up()
    again.wait_output("handler=python.vacancies", timeout=10)
    assert bus.run("ix", "vacancies").returncode == 0
    seqs = [seq for (seq,) in rows(pg_url, "SELECT seq FROM pulse_jobs ORDER BY seq")]
    assert len(seqs) == 2 and seqs[1] > seqs[0]
    assert rows(pg_url, "SELECT count FROM pulse_counts WHERE status = 'completed'") == [(2,)]


def test_server_kill_9_mid_load_on_postgresql_loses_and_repeats_nothing(bus, pg_url, tmp_path):  # noqa: F811
    on_database(bus, pg_url)
    assert bus.run("handler", "create", "marked", "--code", MARKED).returncode == 0
    up = bus.start_up()
    up.wait_output("handler=python.marked")
    with qntx.connect(bus.home) as b:
        marked = [
            b.submit("python.marked", {"n": n, "dir": str(tmp_path), "sleep": 2.5}, max_attempts=1) for n in range(6)
        ]
        b.flush()
        wait_for(lambda: all(runs_of(tmp_path, n) for n in range(6)), 20, what="all 6 running")
        echoes = [b.submit("builtin.echo", {"i": i}) for i in range(600)]
        b.flush()  # accepted: each is in the database
    server = actor_pids(bus)["server"]
    os.kill(server, signal.SIGKILL)  # while the echoes are being worked through
    up.wait_output("server exited with code -9")
    wait_for(lambda: actor_pids(bus).get("server", server) != server, 20, what="a new server")
    wait_for(lambda: up.output().count("QNTX server serving") == 2, 30, what="the new server serving")
    with qntx.connect(bus.home) as b:
        for i, handle in enumerate(echoes):
            job = b.wait(handle.id, timeout=60)
            assert job.status == "completed" and job.result == {"i": i}, (job.status, job.error)
        for n, handle in enumerate(marked):
            job = b.wait(handle.id, timeout=60)
            assert job.status == "completed", (job.status, job.error)
            assert job.result["n"] == n and job.attempts == 1 and job.runs == 1
            assert runs_of(tmp_path, n) == [job.result["run"]]  # one run, and its own result
    assert "adopted" in up.output()
    # (A completion is announced before its lazy commit: the rows follow within moments.)
    wait_for(
        lambda: dict(rows(pg_url, "SELECT status, count FROM pulse_counts WHERE count > 0")) == {"completed": 606},
        what="606 completed in pulse_counts and no other status",
    )
    assert rows(pg_url, "SELECT status, count(*) FROM pulse_jobs GROUP BY status") == [("completed", 606)]


def test_pipelined_submissions_keep_their_order_while_their_lookups_are_batched(bus, pg_url):  # noqa: F811
    """On PostgreSQL a submission whose id the server does not hold in memory waits
    for one lookup shared by its read pass: a request right behind it on the same
    connection still finds it, and a stored job's id or key still names that job."""
    import msgspec

    from qntx.protocol import CancelJob, ErrorReply, GetJob, JobReply, Submit

    def raw(value) -> msgspec.Raw:
        return msgspec.Raw(msgspec.msgpack.encode(value))

    on_database(bus, pg_url)
    up = bus.start_up()
    with qntx.connect(bus.home) as b:
        kept = b.submit("builtin.echo", "kept", id="JB-KEPT", idempotency_key="order-kept")
        assert kept.result(timeout=10) == "kept"
    assert up.stop() == 0
    bus.start_up()  # the ended job is in the database only now
    with qntx.connect(bus.home) as b:
        client = b.server
        asked = []
        for n in range(300):  # each submission with the request that names it right behind
            asked.append(("submit", n, client.send(Submit(handler="builtin.echo", payload=raw(n), id=f"JB-PIPE-{n}"))))
            follow = GetJob(id=f"JB-PIPE-{n}") if n % 2 else CancelJob(id=f"JB-PIPE-{n}")
            asked.append(("follow", n, client.send(follow)))
        same = client.send(Submit(handler="builtin.echo", payload=raw("kept"), id="JB-KEPT"))
        clash = client.send(Submit(handler="builtin.echo", payload=raw("other"), id="JB-KEPT"))
        keyed = client.send(Submit(handler="builtin.echo", payload=raw("again"), idempotency_key="order-kept"))
        for kind, n, correlation in asked:
            reply = client.take(correlation, 30)
            if kind == "follow" and isinstance(reply, ErrorReply) and reply.code == "conflict":
                # A cancel that came after the echo ended (the server read it in a later
                # pass): it found the job all the same, which is what is checked here.
                assert reply.message == f"job JB-PIPE-{n} is already completed", reply
                continue
            assert isinstance(reply, JobReply), (kind, n, reply)
            assert reply.job.id == f"JB-PIPE-{n}"
        assert client.take(same, 30).job.id == "JB-KEPT"
        refused = client.take(clash, 30)
        assert isinstance(refused, ErrorReply) and refused.code == "conflict", refused
        assert client.take(keyed, 30).job.id == "JB-KEPT"
        for n in range(300):  # a cancel may come after its job's dispatch: it completes then
            assert b.wait(f"JB-PIPE-{n}", timeout=30).status in (("cancelled", "completed") if n % 2 == 0 else ("completed",))
        assert b.job("JB-KEPT").result == "kept"
