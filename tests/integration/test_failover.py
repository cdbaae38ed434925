"""A standby that takes over: two `qntx up --store URL` on two homes sharing one real
PostgreSQL database (tests/pg.py), each serving tcp on loopback on its own ports, as
two hosts would. One leads, the other stands by (binding nothing) until the lease
expires; every write is fenced by the lease's epoch.

* kill -9 of the leader with 2,000 jobs in flight, a remote worker and a remote
  python plugin joined with both servers' addresses: the standby leads within 10 s,
  they find it by themselves and it adopts their runs in flight, every accepted job
  ends with its own result, and every run a stored handler started is one its job
  counts.
* SIGSTOP of the leader past its lease, then SIGCONT: its writes are refused by
  epoch (its server exits fenced, its `up` stands by again), and the jobs' states in
  the database are the new leader's only.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import fresh_home
from tests.integration.conftest import Bus, Process, wait_for
from tests.integration.test_faults import actor_pids
from tests.integration.test_multihost import free_ports
from tests.pg import pg_empty_url, pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(240)

TAKEOVER_S = 10.0
# Marks each run with a file <dir>/<n>/run-<home>-<pid>-<ns>, sleeps, and says which
# run and which home's plugin ran it.
HOSTED = """
import os, time
runs = os.path.join(upstream['dir'], str(upstream['n']))
os.makedirs(runs, exist_ok=True)
home = os.path.basename(os.environ.get('QNTX_HOME', ''))
mine = os.path.join(runs, f"run-{home}-{os.getpid()}-{time.monotonic_ns()}")
open(mine, 'w').close()
time.sleep(upstream['sleep'])
_result = {'n': upstream['n'], 'run': os.path.basename(mine), 'home': os.environ.get('QNTX_HOME', '')}
"""


def rows(url: str, statement: str, params=()) -> list[tuple]:
    import psycopg  # here: the fixtures have skipped the test where it is missing

    with psycopg.connect(url) as conn:
        return conn.execute(statement, params).fetchall()


def runs_of(directory: Path, n: int) -> list[str]:
    path = directory / str(n)
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


class Pair:
    """Hosts A and B (an `up` each, on one database) and C (a remote worker and plugin)."""

    def __init__(self, url: str, a: Bus, b: Bus, c: Bus):
        self.url, self.a, self.b, self.c = url, a, b, c
        first = free_ports(6)
        second = free_ports(6)
        while abs(second - first) < 6:  # (nothing is bound yet: the two ranges must not overlap)
            second = free_ports(6)
        self.address = {a: f"tcp://127.0.0.1:{first}", b: f"tcp://127.0.0.1:{second}"}
        self.up: dict[Bus, Process] = {}
        self.remote: list[Process] = []

    def start_up(self, bus: Bus) -> Process:
        self.up[bus] = bus.start("up", "--workers", "1", "--python-pool", "4", "--bind", self.address[bus])
        return self.up[bus]

    def join_remote(self) -> None:
        """C's worker and python plugin, given both servers' addresses: they find the leader."""
        both = f"{self.address[self.a]},{self.address[self.b]}"
        self.remote = [
            self.c.start("plugin", "python", "--connect", both, "--name", "plugin-c"),
            self.c.start("worker", "--connect", both, "--name", "worker-c"),
        ]

    def joined(self, leader: Bus) -> None:
        with leader.connect() as bus:
            wait_for(lambda: {"plugin-c", "worker-c"} <= {x.name for x in bus.status().actors}, 60, what="C joined")

    def pids(self, bus: Bus) -> list[int]:
        """The `up` of ``bus`` and every actor it runs."""
        return [self.up[bus].pid, *actor_pids(bus).values()]

    def epoch(self) -> int:
        return rows(self.url, "SELECT epoch FROM qntx_leader")[0][0]


@pytest.fixture
def pair(pg_url):  # noqa: F811
    with fresh_home() as home_a, fresh_home() as home_b, fresh_home() as home_c:
        a, b, c = Bus(home_a), Bus(home_b), Bus(home_c)
        try:
            for bus in (a, b):
                bus.env["QNTX_STORE"] = pg_url
            assert a.run("keys").returncode == 0 and c.run("keys").returncode == 0
            key = lambda bus: bus.run("keys", "show").stdout.strip()  # noqa: E731
            allowed = a.run("keys", "allow", "host-c", key(c), "--role", "worker", "--role", "plugin")
            assert allowed.returncode == 0, allowed.stderr
            assert c.run("keys", "server", key(a)).returncode == 0
            # The two servers are one bus to the others: B serves with A's key pair and
            # the keys A allows.
            shutil.copytree(home_a / "keys", home_b / "keys", dirs_exist_ok=True)
            created = a.run("handler", "create", "hosted", "--code", HOSTED)
            assert created.returncode == 0, created.stderr
            yield Pair(pg_url, a, b, c)
        finally:
            for bus in (c, b, a):
                bus.stop_all()


def lead_and_stand_by(pair: Pair) -> tuple[Process, Process]:
    up_a = pair.start_up(pair.a)
    up_a.wait_output("handler=python.hosted", timeout=60)
    up_b = pair.start_up(pair.b)
    up_b.wait_output("standby: ", timeout=30)
    return up_a, up_b


def test_a_standby_takes_over_a_killed_leader_and_every_accepted_job_ends_with_its_own_result(pair, tmp_path):
    up_a, up_b = lead_and_stand_by(pair)
    assert f"leading the bus at epoch {pair.epoch()}" in up_a.output()
    assert f"{pair.address[pair.a]} (home {pair.a.home}" in up_b.output()  # who leads, in its one line
    assert not any(actor_pids(pair.b).values())  # a standby runs no actor and binds nothing
    on_standby = pair.b.run("status")  # no server here: it says who leads
    assert on_standby.returncode == 3 and "the bus is led by " in on_standby.stderr, on_standby.stderr
    assert f"{pair.address[pair.a]} (home {pair.a.home}" in on_standby.stderr
    pair.join_remote()
    pair.joined(pair.a)

    status = pair.a.run("status")
    assert status.returncode == 0, status.stderr
    leader_line = next(line for line in status.stdout.splitlines() if line.startswith("Leader: "))
    assert f"{pair.address[pair.a]} (home {pair.a.home}" in leader_line and f"epoch {pair.epoch()}" in leader_line
    standby_line = next(line for line in status.stdout.splitlines() if line.startswith("Standby: "))
    assert f"{pair.address[pair.b]} (home {pair.b.home}" in standby_line

    with pair.a.connect() as bus:
        hosted = [
            bus.submit("python.hosted", {"n": n, "dir": str(tmp_path), "sleep": 8.0}, max_attempts=5) for n in range(12)
        ]
        echoes = [bus.submit("builtin.echo", {"i": i}, max_attempts=5) for i in range(2_000 - len(hosted))]
        bus.flush()  # every one accepted: in the database
        on_c = f"run-{pair.c.home.name}-"
        wait_for(
            lambda: any(run.startswith(on_c) for n in range(len(hosted)) for run in runs_of(tmp_path, n)),
            30, what="a hosted run started on C",
        )  # fmt: skip

    before = pair.epoch()
    for pid in pair.pids(pair.a):
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: "QNTX is up" in up_b.output(), TAKEOVER_S, interval=0.02, what="B leading and serving")
    took = time.monotonic() - killed
    assert f"leading the bus at epoch {before + 1}" in up_b.output()
    assert pair.epoch() == before + 1
    print(f"takeover after kill -9: {took:.2f}s")

    pair.joined(pair.b)  # C found the new leader by itself, through both addresses
    # C's runs in flight are adopted by the new leader, as after a restart.
    up_b.wait_output("): adopted", timeout=30)
    with pair.b.connect() as bus:
        for i, handle in enumerate(echoes):
            job = bus.wait(handle.id, timeout=90)
            assert job.status == "completed" and job.result == {"i": i}, (job.status, job.error)
        for n, handle in enumerate(hosted):
            job = bus.wait(handle.id, timeout=90)
            assert job.status == "completed", (job.status, job.error)
            runs = runs_of(tmp_path, n)
            assert job.result["n"] == n and job.result["run"] in runs  # its own result, from a run it started
            assert len(runs) <= job.runs, (n, runs, job.runs)  # no run went unrecorded
    wait_for(
        lambda: rows(pair.url, "SELECT status, count(*) FROM pulse_jobs GROUP BY status") == [("completed", 2_000)],
        what="2,000 completed rows",
    )


def stopped_or_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie while its stopped parent cannot reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_a_paused_leader_that_wakes_past_its_lease_is_fenced_and_stands_by(pair, tmp_path):
    up_a, up_b = lead_and_stand_by(pair)
    first = pair.epoch()
    with pair.a.connect() as bus:
        hosted = [
            bus.submit("python.hosted", {"n": n, "dir": str(tmp_path), "sleep": 4.0}, max_attempts=5) for n in range(4)
        ]
        bus.flush()
        wait_for(lambda: all(runs_of(tmp_path, n) for n in range(4)), 30, what="4 runs started on A")
    actors = actor_pids(pair.a)
    for pid in pair.pids(pair.a):
        os.kill(pid, signal.SIGSTOP)  # A pauses mid-run, holding its lease
    try:
        wait_for(lambda: "QNTX is up" in up_b.output(), 30, what="B taking over")
        assert pair.epoch() == first + 1
        # A's actors wake first (its `up` still paused, so nothing stops them but the
        # fence): its runs end and its server commits them, under epoch `first`.
        for pid in actors.values():
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: stopped_or_gone(actors["server"]), 30, what="A's server to exit")
    finally:
        os.kill(up_a.pid, signal.SIGCONT)
    up_a.wait_output("lost the lead: ", timeout=30)
    up_a.wait_output("standby: ", timeout=30)  # A stands by again; B leads
    up_a.wait_output("fenced: job store ", timeout=10)  # the server's one line (echoed a moment later)

    with pair.b.connect() as bus:
        for n, handle in enumerate(hosted):
            job = bus.wait(handle.id, timeout=90)
            assert job.status == "completed", (job.status, job.error)
            # The state stored is B's: A's completion of its own run was refused.
            assert job.result["home"] == str(pair.b.home) and job.result["n"] == n, job.result
            runs = runs_of(tmp_path, n)
            assert job.result["run"] in runs and len(runs) >= 2, runs  # A's run (fenced) and B's
    assert pair.epoch() == first + 1  # A never took the lease back
    assert f"leading the bus at epoch {first + 1}" in up_b.output()


def test_a_paused_leader_inside_a_transaction_cannot_block_a_takeover(pg_url):  # noqa: F811
    """A leader stopped mid-transaction holds the lease row's share lock; the database
    ends its idle transaction, so the standby's takeover goes through."""
    from qntx import db
    from qntx.errors import Unavailable
    from qntx.leader import IDLE_IN_TRANSACTION_MS, LEASE_TTL_S, Lease

    old, new = Lease(pg_url, home="/a", address="tcp://a:7400"), Lease(pg_url, home="/b", address="tcp://b:7400")
    try:
        epoch = old.try_take()
        assert epoch is not None and new.try_take() is None  # held: the other stands by
        store = db.open_store_connection(pg_url, "pulse", application="paused leader", readonly=False)
        store.execute("BEGIN")
        store.execute("SELECT qntx_fence(%s)", (epoch,))  # ...and the process stops here
        began = time.monotonic()

        def took() -> bool:
            try:
                return new.try_take() is not None
            except Unavailable:  # waited for the lock LOCK_TIMEOUT_MS: the standby tries again
                return False

        wait_for(took, LEASE_TTL_S + IDLE_IN_TRANSACTION_MS / 1000 + 5, what="takeover")
        assert new.epoch == epoch + 1 and time.monotonic() - began >= LEASE_TTL_S - 0.5
        assert not old.renew()  # the old one learns it lost the lease
        import psycopg

        with pytest.raises(psycopg.Error, match="idle-in-transaction timeout"):
            store.execute("SELECT 1")  # its session was ended by the database
        store.close()
    finally:
        old.close()
        new.close()


def test_stores_without_an_epoch_write_only_while_no_up_leads(pg_url):  # noqa: F811
    from qntx.ats.store_pg import PgAttestationStore
    from qntx.leader import Fenced, Lease
    from qntx.protocol import NewAttestation
    from qntx.pulse.commands import Changes
    from qntx.pulse.jobstore_pg import PgJobStore

    jobs, ats = PgJobStore(pg_url), PgAttestationStore(pg_url)  # a tool's stores: no epoch
    lease = Lease(pg_url, home="/a", address="tcp://a:7400")
    one = [[NewAttestation(subjects=["s"])]]
    try:
        empty = Changes(next_seq=5, lease_ceiling=1)
        jobs.save(empty)  # nobody leads: written
        assert not isinstance(ats.put_batches(one)[0], Exception)
        assert rows(pg_url, "SELECT seq FROM pulse_meta") == [(5,)] and ats.count() == 1
        assert lease.try_take() is not None
        with pytest.raises(Fenced, match="the bus is led by an `up` on this database"):
            jobs.save(replace(empty, next_seq=9))
        with pytest.raises(Fenced, match="the bus is led by an `up` on this database"):
            ats.put_batches(one)
        assert rows(pg_url, "SELECT seq FROM pulse_meta") == [(5,)] and ats.count() == 1  # nothing written
        lease.release()
        jobs.save(replace(empty, next_seq=9))
        assert not isinstance(ats.put_batches(one)[0], Exception)
        assert rows(pg_url, "SELECT seq FROM pulse_meta") == [(9,)] and ats.count() == 2
    finally:
        jobs.close()
        ats.close()
        lease.close()


def test_a_database_without_the_lease_is_refused_until_upgraded(bus, pg_empty_url):  # noqa: F811
    import psycopg

    from qntx.ats.sql import MIGRATIONS as ATS
    from qntx.pulse.jobstore_pg import MIGRATIONS as PULSE

    with psycopg.connect(pg_empty_url, autocommit=True) as conn:  # as the qntx before the lease left it
        for statement in (*ATS[0], *PULSE[0]):
            conn.execute(statement)
        conn.execute("CREATE TABLE qntx_schema (component text PRIMARY KEY, version integer NOT NULL, upgraded_at timestamptz)")
        conn.execute("INSERT INTO qntx_schema VALUES ('ats', 1, now()), ('pulse', 1, now())")
    refused = bus.run("up", "--store", pg_empty_url, timeout=30)
    assert refused.returncode == 3 and refused.stderr.count("\n") == 1, refused.stderr
    assert "has no leader schema (an older qntx's): run `qntx db upgrade --store URL` first" in refused.stderr
    assert rows(pg_empty_url, "SELECT to_regclass('qntx_leader')") == [(None,)]  # up created nothing

    upgraded = bus.run("db", "upgrade", "--store", pg_empty_url)
    assert upgraded.returncode == 0 and upgraded.stdout == "upgraded leader schema 0 -> 1\n", upgraded.stderr
    check = bus.run("db", "check", "--store", pg_empty_url)
    assert check.returncode == 0, check.stdout
    assert "leader     none (epoch 0, the lease has expired)" in check.stdout, check.stdout
