"""Prometheus metrics of a running bus (``qntx up``): the counters move by exactly
the jobs run, failed and retried; the text passes ``promtool check metrics``; a real
Prometheus scrapes it; the dashboard serves it; the alert rules of
docs/OPERATIONS.md pass ``promtool check rules``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, wait_for
from tests.integration.promtool import PROMETHEUS, PROMTOOL, need

pytestmark = pytest.mark.timeout(120)

ECHOES = 7
LIMIT = 1 << 20  # max_message_bytes of the bus whose refusals are counted
FAILS = 3  # each with max_attempts=2: one retry, then failed for good
ATTESTS = 5  # one at a time: one group commit, one notice each


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(4))
    return total


def metrics_url(bus) -> str:
    address = wait_for(lambda: _read(bus.home / "run" / "metrics.address"), what="metrics.address")
    return f"http://{address.strip()}/metrics"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def send_too_large(bus) -> bytes:
    """One request past max_message_bytes, straight on the server's socket; its reply."""
    import zmq

    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(bus.settings.server_endpoint)
        sock.send_multipart([b"c1", b"x" * (LIMIT + 1)])
        assert sock.poll(10_000), "no reply to a too large message"
        return sock.recv_multipart()[1]
    finally:
        context.destroy(linger=0)


def test_counters_move_by_exactly_the_jobs_run(bus, tmp_path):
    bus.env["QNTX_MAX_MESSAGE_BYTES"] = str(LIMIT)
    bus.start_up()
    url = metrics_url(bus)
    before = scrape(url)
    assert b"too_large" in send_too_large(bus)
    with bus.connect() as api:
        echoes = [api.submit("builtin.echo", n) for n in range(ECHOES)]
        fails = [api.submit("builtin.fail", f"boom {n}", max_attempts=2) for n in range(FAILS)]
        assert [h.result(timeout=30) for h in echoes] == list(range(ECHOES))
        for handle in fails:
            wait_for(lambda h=handle: api.job(h.id).status == "failed", timeout=30, what="the failures")

    def moved(name: str, handler: str) -> float:
        return value(scrape(url), name, handler=handler) - value(before, name, handler=handler)

    wanted = {
        ("qntx_jobs_submitted_total", "builtin.echo"): ECHOES,
        ("qntx_jobs_completed_total", "builtin.echo"): ECHOES,
        ("qntx_jobs_started_total", "builtin.echo"): ECHOES,
        ("qntx_jobs_submitted_total", "builtin.fail"): FAILS,
        ("qntx_jobs_started_total", "builtin.fail"): 2 * FAILS,
        ("qntx_jobs_retried_total", "builtin.fail"): FAILS,
        ("qntx_jobs_failed_total", "builtin.fail"): FAILS,
        ("qntx_jobs_completed_total", "builtin.fail"): 0,
        ("qntx_job_queue_wait_seconds_count", "builtin.fail"): 2 * FAILS,
        ("qntx_job_run_duration_seconds_count", "builtin.echo"): ECHOES,
    }
    # Snapshots are up to a second old: wait until every figure is what it must be.
    wait_for(lambda: all(moved(*key) == n for key, n in wanted.items()), timeout=10, what="the counters")
    text = scrape(url)
    assert {key: moved(*key) for key in wanted} == wanted
    assert value(text, "qntx_jobs", status="failed") >= FAILS
    assert value(text, "qntx_worker_sessions", kind="worker") == 2
    assert value(text, "qntx_worker_slots_free", kind="worker") == value(text, "qntx_worker_slots", kind="worker") > 0
    assert value(text, "qntx_requests_total", type="Submit", code="ok") >= ECHOES + FAILS
    for actor in ("ats", "server", "worker-1", "worker-2", "plugin-python"):
        assert value(text, "qntx_process_resident_memory_bytes", actor=actor) > 1e6, actor
    assert value(text, "qntx_pulse_commit_duration_seconds_count") > 0
    assert value(text, "qntx_refused_messages_total", actor="server", reason="too_large") == 1
    assert value(text, "qntx_requests_total", actor="server", type="undecoded", code="too_large") == 1

    # Every notice the ATS sends is numbered and counted by topic family; the server's
    # directives feed counts what it missed (nothing here).
    from qntx.bus.client import Client
    from qntx.protocol import AtsReply, Attest, NewAttestation

    def notices() -> float:
        return value(scrape(url), "qntx_notices_published_total", actor="ats", family="att.")

    wait_for(lambda: notices() == value(text, "qntx_notices_published_total", actor="ats", family="att."), timeout=10)
    first = notices()
    with Client(bus.settings.ats_endpoint, AtsReply, timeout_s=10) as ats:
        for n in range(ATTESTS):
            ats.request(Attest(items=[NewAttestation(subjects=[f"metered{n}"], predicates=["metered"])]))
    wait_for(lambda: notices() == first + ATTESTS, timeout=10, what="the notices counted")
    missed = 'qntx_notices_missed_total{actor="server",family="att."} 0.0'
    text = wait_for(lambda: (lambda t: t if missed in t else None)(scrape(url)), timeout=10, what="the feed's count")
    assert value(text, "qntx_notices_oversized_total", actor="ats") == 0

    promtool = need(PROMTOOL, "promtool")
    (tmp_path / "scrape.txt").write_text(text)
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_serves_the_same_metrics(bus):
    bus.start_up()
    with bus.connect() as api:
        api.submit("builtin.echo", 1).result(timeout=30)
    process = bus.start("ui", "--port", "0")
    process.wait_output("Dashboard: http://", timeout=20)
    port = re.search(r"Dashboard: http://\S+:(\d+)/", process.output()).group(1)
    text = wait_for(
        lambda: (t := scrape(f"http://127.0.0.1:{port}/metrics")) and value(t, "qntx_jobs_completed_total") == 1 and t,
        timeout=10, what="the dashboard's /metrics",
    )  # fmt: skip
    assert value(text, "qntx_actor_up", actor="server") == 1
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Host": "evil.example:80"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # the dashboard's own access rules hold
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 403


def test_metrics_off_serves_nothing(bus):
    bus.env["QNTX_METRICS"] = ""
    (bus.home / "config.toml").write_text('metrics = ""\n')
    bus.start_up()
    with bus.connect() as api:
        api.submit("builtin.echo", 1).result(timeout=30)
    assert not (bus.home / "run" / "metrics").exists()
    assert not (bus.home / "run" / "metrics.address").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_real_prometheus_scrapes_the_bus(bus, tmp_path):
    prometheus = need(PROMETHEUS, "prometheus")
    bus.start_up()
    target = metrics_url(bus)[len("http://") : -len("/metrics")]
    with bus.connect() as api:
        for handle in [api.submit("builtin.echo", n) for n in range(5)]:
            handle.result(timeout=30)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: qntx\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = _free_port()
    bus.processes.append(_Foreign([
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ], tmp_path / "prometheus.out"))  # fmt: skip
    query = urllib.parse.urlencode({"query": 'sum(qntx_jobs_completed_total{handler="builtin.echo"})'})

    def answered() -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5) as response:
                result = json.load(response)["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    assert wait_for(lambda: answered() == 5, timeout=30, what="Prometheus to scrape 5 completed jobs")


class _Foreign:
    """A process that is not a qntx command, stopped with the bus's."""

    def __init__(self, argv: list[str], log: Path):
        self._log = open(log, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


def test_the_alert_rules_in_operations_md_pass_promtool(tmp_path):
    promtool = need(PROMTOOL, "promtool")
    text = (REPO / "docs" / "OPERATIONS.md").read_text()
    rules = [block for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if block.startswith("groups:")]
    assert len(rules) == 1
    path = tmp_path / "rules.yml"
    path.write_text(rules[0])
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "3 rules found" in checked.stdout
