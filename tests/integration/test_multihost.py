"""Beyond one machine, on loopback: a second home stands in for a second host.

One bus per module: home A runs `qntx up --bind tcp://127.0.0.1:PORT`; home B, with
its own key pair authorised on A for the worker and plugin roles, runs
`qntx plugin python --connect` and `qntx worker --connect`. Python jobs run on both
hosts, handler code attests into A's ATS over CURVE, strangers get nothing, roles
hold per message, and a plugin host that dies or stalls gives its runs back.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
from collections import Counter
from pathlib import Path

import pytest
import zmq.auth

from qntx.bus.client import Client
from qntx.bus.security import Security
from qntx.errors import Forbidden, Timeout, Unavailable
from qntx.protocol import (
    AtsReply,
    GetEndpoints,
    Ping,
    Query,
    RegisterPlugin,
    ServerReply,
    Submit,
    WorkerReady,
)
from qntx.stored_handlers import HANDLER_FILTER
from tests.conftest import fresh_home
from tests.integration.conftest import Bus, wait_for

pytestmark = pytest.mark.timeout(120)

# Marks each run with a file, attests from handler code, sleeps, and says where it ran.
MARKED = """
import os, socket, time
runs = os.path.join(upstream['dir'], str(upstream['n']))
os.makedirs(runs, exist_ok=True)
mine = os.path.join(runs, f"run-{os.getpid()}-{time.monotonic_ns()}")
open(mine, 'w').close()
record = attest([f"job-{upstream['n']}"], ["ran"], ["multihost"], attributes={"run": os.path.basename(mine)})
time.sleep(upstream['sleep'])
_result = {'n': upstream['n'], 'run': os.path.basename(mine), 'attestation': record['id']}
"""


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count >= 65535:
            continue
        ok = True
        for port in range(first, first + count):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return first


class Hosts:
    def __init__(self, a: Bus, b: Bus, port: int):
        self.a, self.b = a, b
        self.server = f"tcp://127.0.0.1:{port}"
        self.workers = f"tcp://127.0.0.1:{port + 1}"
        self.ats = f"tcp://127.0.0.1:{port + 4}"

    def key_of(self, bus: Bus) -> str:
        return bus.run("keys", "show").stdout.strip()

    def stranger(self, name: str, *, server_key: str | None = None) -> Security:
        """A key pair of its own (authorised nowhere yet) that trusts A's server key."""
        keys = self.a.home / name
        keys.mkdir()
        zmq.auth.create_certificates(str(keys), "host")
        server = server_key or self.key_of(self.a)
        (keys / "server.key").write_text(f'metadata\ncurve\n    public-key = "{server}"\n')
        return Security(keys_dir=keys)

    def public(self, security: Security) -> str:
        return zmq.auth.load_certificate(str(security.keys_dir / "host.key"))[0].decode()

    def allow(self, name: str, security: Security, *roles: str) -> None:
        flags = [arg for role in roles for arg in ("--role", role)]
        done = self.a.run("keys", "allow", name, self.public(security), *flags)
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def hosts():
    with fresh_home() as home_a, fresh_home() as home_b:
        a, b = Bus(home_a), Bus(home_b)
        try:
            assert a.run("keys").returncode == 0 and b.run("keys").returncode == 0
            hosts = Hosts(a, b, free_ports(6))
            allowed = a.run("keys", "allow", "host-b", hosts.key_of(b), "--role", "worker", "--role", "plugin")
            assert allowed.returncode == 0, allowed.stderr
            assert b.run("keys", "server", hosts.key_of(a)).returncode == 0
            assert a.run("handler", "create", "marked", "--code", MARKED).returncode == 0
            up = a.start("up", "--workers", "1", "--bind", hosts.server)
            up.wait_output("handler=python.marked", timeout=40)
            hosts.plugin_b = b.start("plugin", "python", "--connect", hosts.server, "--name", "plugin-b")
            hosts.worker_b = b.start("worker", "--connect", hosts.server, "--name", "worker-b")
            with a.connect() as bus:
                wait_for(lambda: {"plugin-b", "worker-b"} <= {x.name for x in bus.status().actors}, 40, what="B joined")
            yield hosts
        finally:
            b.stop_all()
            a.stop_all()


def submit_marked(bus, directory: Path, count: int, sleep: float, **kw) -> list:
    return [bus.submit("python.marked", {"n": n, "dir": str(directory), "sleep": sleep}, **kw) for n in range(count)]


def runs_of(directory: Path, n: int) -> list[str]:
    path = directory / str(n)
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_python_jobs_run_on_both_hosts_and_attest_into_the_servers_ats(hosts, tmp_path):
    with hosts.a.connect() as bus:
        handles = submit_marked(bus, tmp_path, 24, 0.3)
        jobs = [h.wait(60) for h in handles]
        assert [j.status for j in jobs] == ["completed"] * 24
        where = Counter(j.worker for j in jobs)
        assert set(where) == {"plugin-python", "plugin-b"}, where  # both hosts took python jobs
        assert "worker-b" not in where  # a plain worker on another host never gets plugin jobs
        for n, handle in enumerate(handles):
            result = handle.result()
            record = bus.get(result["attestation"])  # handler code on B attested into A's ATS
            assert record.subjects == [f"job-{n}"] and record.attributes["run"] == result["run"]
            assert runs_of(tmp_path, n) == [result["run"]]  # one run each


def test_builtin_jobs_reach_the_remote_worker(hosts):
    with hosts.a.connect() as bus:
        # worker-1 (capacity 8) and worker-b (8): 16 sleeping jobs fill both.
        handles = [bus.submit("builtin.sleep", 1.0) for _ in range(16)]
        jobs = [h.wait(60) for h in handles]
    assert Counter(j.worker for j in jobs) == {"worker-1": 8, "worker-b": 8}
    # Its jobs pipe took a port of the known range (PORT+6 on), not any ephemeral one.
    port = int(hosts.server.rsplit(":", 1)[1])
    pipes = re.findall(r"of key host-b gets its jobs pipe at tcp://[^:]+:(\d+)", (hosts.a.home / "logs" / "server.log").read_text())
    assert pipes and all(port + 6 <= int(p) < port + 106 for p in pipes), pipes


def test_status_names_remote_actors_with_host_role_key_and_leases(hosts):
    with hosts.a.connect() as bus:
        actors = {a.name: a for a in bus.status().actors}
    host = socket.gethostname()
    assert (actors["worker-b"].key, actors["worker-b"].role, actors["worker-b"].host) == ("host-b", "worker", host)
    assert (actors["plugin-b"].key, actors["plugin-b"].role, actors["plugin-b"].credit) == ("host-b", "plugin", 8)
    assert actors["worker-b"].leases == 0
    remote = [a for a in actors.values() if a.endpoint == "(remote)"]
    assert remote and remote[0].key == "host-b" and remote[0].pid == hosts.plugin_b.pid
    shown = hosts.a.run("status").stdout
    assert "worker-b" in shown and "key host-b" in shown and "role worker" in shown


def test_strangers_get_nothing(hosts):
    def answers(security: Security, endpoint: str = hosts.server) -> bool:
        try:
            with Client(endpoint, ServerReply, security=security, timeout_s=1) as client:
                client.request(Ping())
            return True
        except (Timeout, Unavailable):  # no handshake ever completes, or no reply comes
            return False

    assert not answers(Security(insecure=True))  # plaintext
    assert not answers(hosts.stranger("unknown"))  # a key nobody authorised
    wrong_server = hosts.stranger("wrong-server", server_key=hosts.public(hosts.stranger("fake-server")))
    hosts.allow("wrong-server", wrong_server, "client")
    assert not answers(wrong_server)  # authorised, but it talks to the wrong server key
    revoked = hosts.stranger("revoked")
    hosts.allow("revoked", revoked, "client")
    with Client(hosts.ats, AtsReply, security=revoked, timeout_s=2) as open_before:
        assert open_before.request(Ping()).actor == "ats"
        assert hosts.a.run("keys", "revoke", "revoked").returncode == 0

        def refused() -> bool:  # (the keyring looks at authorized.json twice a second)
            try:
                open_before.request(Ping(), timeout_s=0.5)
            except Timeout:
                return True
            return False

        wait_for(refused, 10, what="the revoked key's open connection to be refused")
        with pytest.raises(Timeout):
            open_before.request(Ping(), timeout_s=1)  # its open connection gets nothing now
    assert not answers(revoked)  # nor does a new one
    assert "is not authorised" in (hosts.a.home / "logs" / "server.log").read_text()


def test_a_revoked_key_loses_its_events_subscription(hosts):
    keys = hosts.stranger("listener")
    hosts.allow("listener", keys, "client")
    events = hosts.server.rsplit(":", 1)[0] + f":{int(hosts.server.rsplit(':', 1)[1]) + 3}"
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"job.")
    keys.connect(sub, events)
    try:
        with hosts.a.connect() as bus:

            def heard() -> bool:
                bus.submit("builtin.echo", 1).wait(10)
                return bool(sub.poll(500))

            wait_for(heard, 15, what="events over tcp")
            assert hosts.a.run("keys", "revoke", "listener").returncode == 0

            def deaf() -> bool:  # the events socket is opened anew within a keyring check
                while sub.poll(0):
                    sub.recv_multipart()
                return not heard()

            wait_for(deaf, 15, what="the revoked subscriber to hear nothing")
            bus.submit("builtin.echo", 2).wait(10)
            assert not sub.poll(2000)  # dropped, and refused when it reconnects
            with hosts.a.connect() as other:  # (this host's own subscribers carry on)
                assert other.submit("builtin.echo", 3).result(timeout=10) == 3
    finally:
        sub.close(0)


def test_roles_hold_per_message(hosts):
    client_key = hosts.stranger("just-a-client")
    hosts.allow("just-a-client", client_key, "client")
    with Client(hosts.server, ServerReply, security=client_key, timeout_s=5) as client:
        assert client.request(GetEndpoints()).ats_endpoint == hosts.ats
        with pytest.raises(Forbidden, match="RegisterPlugin needs role"):
            client.request(RegisterPlugin(name="python", endpoint="", pid=1))
    with Client(hosts.workers, ServerReply, security=client_key, timeout_s=5) as as_worker:
        with pytest.raises(Forbidden, match="WorkerReady needs role"):
            as_worker.request(WorkerReady(worker="thief", credit=8, session="thief"))
    worker_key = hosts.stranger("just-a-worker")
    hosts.allow("just-a-worker", worker_key, "worker")
    with Client(hosts.server, ServerReply, security=worker_key, timeout_s=5) as worker:
        with pytest.raises(Forbidden, match="Submit needs role"):
            worker.request(Submit(handler="builtin.echo"))
    with Client(hosts.workers, ServerReply, security=worker_key, timeout_s=5) as as_plugin:
        with pytest.raises(Forbidden, match="a plugin session needs role plugin"):
            as_plugin.request(WorkerReady(worker="fake-plugin", credit=8, session="fake", plugin="python"))
    with Client(hosts.ats, AtsReply, security=worker_key, timeout_s=5) as reader, pytest.raises(Forbidden):
        reader.request(Query(filter=HANDLER_FILTER))
    assert "refused RegisterPlugin from just-a-client" in (hosts.a.home / "logs" / "server.log").read_text()


@pytest.mark.parametrize("how", ["kill -9", "SIGSTOP past its lease"])
def test_a_plugin_host_that_dies_or_stalls_gives_its_runs_back(hosts, tmp_path, how, home):
    host_c = Bus(home)  # a third host (one python plugin per home)
    try:
        check_plugin_host_fault(hosts, host_c, tmp_path, how)
    finally:
        host_c.stop_all()


def check_plugin_host_fault(hosts: Hosts, host_c: Bus, tmp_path: Path, how: str) -> None:
    assert host_c.run("keys").returncode == 0
    assert host_c.run("keys", "server", hosts.key_of(hosts.a)).returncode == 0
    allowed = hosts.a.run("keys", "allow", f"host-c-{how[:4]}", hosts.key_of(host_c), "--role", "plugin")
    assert allowed.returncode == 0, allowed.stderr
    other = host_c.start("plugin", "python", "--connect", hosts.server, "--name", "plugin-c")
    with hosts.a.connect() as bus:
        wait_for(lambda: "plugin-c" in {x.name for x in bus.status().actors}, 30, what="plugin-c joined")
        # Three python sessions of 8: plugin-c gets a share.
        handles = submit_marked(bus, tmp_path, 24, 2.0, max_attempts=1)
        wait_for(lambda: any(bus.job(h.id).worker == "plugin-c" for h in handles), 20, what="plugin-c running jobs")
        on_c = {h.id for h in handles if bus.job(h.id).worker == "plugin-c"}
        if how == "kill -9":
            other.stop(signal.SIGKILL)
        else:
            other.popen.send_signal(signal.SIGSTOP)
            wait_for(lambda: all(bus.job(i).worker != "plugin-c" for i in on_c), 30, what="runs taken back")
            other.popen.send_signal(signal.SIGCONT)  # its interpreters finished meanwhile: stale results
        jobs = {h.id: h.wait(90) for h in handles}
        if how != "kill -9":

            def stale_runs_over() -> bool:  # the resumed plugin reported them (they must change nothing)
                return all(a.leases == 0 for a in bus.status().actors if a.name == "plugin-c")

            wait_for(stale_runs_over, 30, what="plugin-c's stale runs to end")
            other.stop()
        results = [h.result() for h in handles]
        records = [bus.job(h.id) for h in handles]
    assert all(j.status == "completed" for j in jobs.values())
    assert [r.status for r in records] == ["completed"] * 24
    if how == "kill -9":
        assert "plugin-c" not in {r.worker for r in records}
    for job_id in on_c:  # given back: a second run, no attempt used
        assert (jobs[job_id].attempts, jobs[job_id].runs) == (1, 2), jobs[job_id]
    for n, (record, result) in enumerate(zip(records, results, strict=True)):
        # The result is the latest run's (names end in a monotonic clock reading):
        # a stalled run that finished later was discarded.
        assert result["run"] == max(runs_of(tmp_path, n), key=lambda name: int(name.rsplit("-", 1)[1]))
        # (on plugin-c a run may have waited for an interpreter and never started)
        assert len(runs_of(tmp_path, n)) in ((1, 2) if record.id in on_c else (1,))


def test_files_are_private(hosts):
    for home in (hosts.a.home, hosts.b.home):
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE((home / "keys" / "host.key_secret").stat().st_mode) == 0o600
    for path in ("ats/data.mdb", "pulse/data.mdb", "logs/server.log", "keys/authorized.json"):
        assert stat.S_IMODE((hosts.a.home / path).stat().st_mode) == 0o600, path


def test_an_older_home_is_made_private(home):
    bus = Bus(home)
    os.chmod(home, 0o755)
    (home / "logs").mkdir(mode=0o755)
    old_log = home / "logs" / "server.log"
    old_log.write_text("from an older version\n")
    os.chmod(old_log, 0o644)
    assert bus.run("keys").returncode == 0
    secret = home / "keys" / "host.key_secret"
    os.chmod(secret, 0o644)
    ats = bus.start_ats()
    ats.stop()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(old_log.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "ats" / "data.mdb").stat().st_mode) == 0o600


def test_keys_commands(home):
    bus = Bus(home)
    made = bus.run("keys")
    assert made.returncode == 0 and "host.key_secret" in made.stdout
    key = bus.run("keys", "show").stdout.strip()
    assert len(key) == 40
    other = zmq.auth.create_certificates(str(home), "other")[0]
    other_key = zmq.auth.load_certificate(other)[0].decode()
    allowed = bus.run("keys", "allow", "box-2", other_key, "--role", "worker", "--role", "plugin")
    assert allowed.returncode == 0, allowed.stderr
    listed = bus.run("keys", "list").stdout
    assert "box-2" in listed and "worker,plugin" in listed and "host" in listed
    bad = bus.run("keys", "allow", "box-3", other_key + "x", "--role", "worker")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    no_role = bus.run("keys", "allow", "box-3", key, "--role", "boss")
    assert no_role.returncode == 2 and "--role must be" in no_role.stderr
    assert bus.run("keys", "revoke", "box-2").returncode == 0
    assert "box-2" not in bus.run("keys", "list").stdout
    gone = bus.run("keys", "revoke", "box-2")
    assert gone.returncode != 0 and "no key is authorised as 'box-2'" in gone.stderr


def test_a_remote_plugin_whose_interpreters_fail_to_start_joins_again(hosts, tmp_path, home):
    """One interpreter of a remote plugin dies as its pool comes up: the plugin tries
    to join again, with a fresh pool, and takes its share of the python jobs."""
    from tests.integration.test_faults import SITECUSTOMIZE

    host_d = Bus(home)
    try:
        assert host_d.run("keys").returncode == 0
        assert host_d.run("keys", "server", hosts.key_of(hosts.a)).returncode == 0
        allowed = hosts.a.run("keys", "allow", "host-d", hosts.key_of(host_d), "--role", "plugin")
        assert allowed.returncode == 0, allowed.stderr
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (tmp_path / "fail-once").touch()
        host_d.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "site"), host_d.env.get("PYTHONPATH")]))
        host_d.env["QNTX_TEST_FAIL_ONCE"] = str(tmp_path / "fail-once")
        plugin = host_d.start("plugin", "python", "--connect", hosts.server, "--name", "plugin-d")
        runs = tmp_path / "runs"
        runs.mkdir()
        with hosts.a.connect() as bus:

            def ran_on_d() -> bool:  # a batch at a time, until plugin-d has taken some
                jobs = [h.wait(60) for h in submit_marked(bus, runs, 24, 0.2)]
                assert all(j.status == "completed" for j in jobs), [j.error for j in jobs]
                return any(j.worker == "plugin-d" for j in jobs)

            wait_for(ran_on_d, 60, 0.1, what="plugin-d running python jobs")
        assert not (tmp_path / "fail-once").exists()  # its first interpreter did die
        assert "python interpreter failed to start" in plugin.output()
    finally:
        host_d.stop_all()
