"""``qntx ui`` over HTTP, without a browser: who may reach it, who may act, bad input.

Real processes: the bus (``up``) where a test needs one, and the dashboard itself.
"""

from __future__ import annotations

import json
import re
import socket
import stat
import urllib.error
import urllib.request

import pytest

from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(90)

# The tests that need a bus share one `up` (``shared``); those about a dashboard with
# no bus, or that list every job on it, keep a private one (``bus``).
HANDLERS = {"nap": "import time\ntime.sleep(30)"}
SHARED_UP = ("--workers", "1")


def start_ui(bus, *args: str) -> tuple[object, str]:
    process = bus.start("ui", "--port", "0", *args)
    process.wait_output("Dashboard: http://", timeout=20)
    port = re.search(r"Dashboard: http://\S+:(\d+)/", process.output()).group(1)
    return process, f"http://127.0.0.1:{port}"


def call(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict | str, dict]:
    """Status, body (JSON decoded if it is JSON) and headers of one request."""
    request = urllib.request.Request(
        url, method=method, headers=headers or {}, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), dict(error.headers)
    kind = got.get("Content-Type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode(), got


def page_value(base: str, headers: dict[str, str] | None = None) -> str:
    status, page, _ = call(base + "/", headers=headers)
    assert status == 200
    return re.search(r'name="qntx-csrf" content="([^"]+)"', page).group(1)


def test_a_non_loopback_address_is_refused_without_the_flag(bus):
    result = bus.run("ui", "--host", "0.0.0.0", "--port", "0", timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--allow-remote" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_remote_dashboard_needs_the_token_which_is_printed_once(bus):
    process, base = start_ui(bus, "--host", "0.0.0.0", "--allow-remote")
    token_file = bus.home / "ui.token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"(made now, kept in {token_file}): {token}" in process.output()

    assert call(base + "/")[0] == 401
    assert call(base + "/", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(base + "/", headers={"Authorization": f"Bearer {token}"})[0] == 200
    status, _, headers = call(base + f"/?token={token}")
    assert status == 200 and f"qntx_ui={token}" in headers.get("Set-Cookie", "")
    assert call(base + "/static/app.js", headers={"Cookie": f"qntx_ui={token}"})[0] == 200
    process.stop()

    again, _ = start_ui(bus, "--host", "0.0.0.0", "--allow-remote")
    assert token not in again.output() and f"Access token: in {token_file}" in again.output()


def test_actions_need_the_page_value_and_this_origin(shared):
    _, base = start_ui(shared)
    csrf = page_value(base)
    with shared.connect() as api:
        job = api.submit("builtin.sleep", {"args": [30]}, max_attempts=1)
        wait_for(lambda: job.record().status == "running", what="the job running")
        url = f"{base}/api/jobs/{job.id}/cancel"
        assert call(url, "POST")[0] == 403
        assert call(url, "POST", {"X-Qntx-Csrf": "forged"})[0] == 403
        assert call(url, "POST", {"X-Qntx-Csrf": csrf, "Origin": "http://evil.example"})[0] == 403
        assert call(url, "GET")[0] == 405
        assert job.record().status == "running"  # nothing above changed anything

        status, body, _ = call(url, "POST", {"X-Qntx-Csrf": csrf, "Origin": base})
        assert status == 200 and body["job"]["status"] == "cancelled"
        assert job.record().status == "cancelled"


def test_pause_and_resume_a_queued_job(shared):
    _, base = start_ui(shared)
    act = {"X-Qntx-Csrf": page_value(base)}
    with shared.connect() as api:
        slots = [a.credit for a in api.status().actors if a.name == "worker-1"][0]
        busy = [api.submit("builtin.sleep", {"args": [30]}, max_attempts=1) for _ in range(slots)]
        wait_for(lambda: all(h.record().status == "running" for h in busy), what="every slot busy")
        waiting = api.submit("builtin.echo", "later")
        assert waiting.accepted().status == "queued"
        status, body, _ = call(f"{base}/api/jobs/{waiting.id}/pause", "POST", act)
        assert (
            status == 200
            and body["job"]["status"] == "paused"
            and api.job(waiting.id).status == "paused"
        )
        status, body, _ = call(f"{base}/api/jobs?status=paused", "GET")
        assert [j["id"] for j in body["jobs"]] == [waiting.id]
        status, body, _ = call(f"{base}/api/jobs/{waiting.id}/resume", "POST", act)
        assert status == 200 and body["job"]["status"] == "queued"
        status, body, _ = call(f"{base}/api/jobs/{waiting.id}/resume", "POST", act)
        # not paused any more: refused, and said why
        assert status == 409 and body["code"] == "conflict"
        for handle in busy:
            api.cancel(handle.id)
        assert waiting.result(timeout=20) == "later"


def test_the_overview_lists_jobs_handed_to_a_plugin_beside_running_ones(shared):
    _, base = start_ui(shared)
    with shared.connect() as api:
        naps = [api.submit("python.nap", {}, max_attempts=1) for _ in range(6)]
        wait_for(lambda: {api.job(h.id).status for h in naps} >= {"running", "dispatched"}, 30, what="some dispatched")
        status, body, _ = call(base + "/api/overview")
        listed = {job["id"]: job["status"] for job in body["running"]}
        assert status == 200 and "dispatched" in listed.values() and "running" in listed.values()
        for handle in naps:
            api.cancel(handle.id)


def test_another_host_name_is_refused_on_loopback(bus):
    _, base = start_ui(bus)
    status, body, _ = call(base + "/", headers={"Host": "rebound.example:80"})
    assert status == 403 and body == {"error": "unknown host name"}
    assert call(base + "/", headers={"Host": "localhost"})[0] == 200


def test_bad_input_is_a_clear_error_and_the_dashboard_goes_on(shared):
    process, base = start_ui(shared)
    csrf = page_value(base)
    cases = {
        "/api/jobs?status=bogus": (400, "unknown status 'bogus'"),
        "/api/jobs?limit=many": (400, "limit must be a whole number"),
        "/api/jobs?limit=0": (400, "limit must be between 1 and 1000"),
        "/api/jobs/JB-NOPE": (404, "JB-NOPE"),
        "/api/handlers/nobody": (404, "no handler named 'nobody'"),
        "/api/attestations?q=alice%20is": (400, "predicates need at least one value"),
        "/static/..%2Fviews.py": (404, None),
    }
    for path, (want, text) in cases.items():
        status, body, _ = call(base + path)
        assert status == want, (path, status, body)
        if text is not None:
            assert text in body["error"], (path, body)
    status, body, _ = call(base + "/api/attestations?q=alice%20is")
    assert body["position"] == 6
    status, body, _ = call(f"{base}/api/jobs/JB-NOPE/explode", "POST", {"X-Qntx-Csrf": csrf})
    assert status == 404 and "no action 'explode'" in body["error"]
    assert process.alive()
    assert call(base + "/api/overview")[0] == 200


def test_a_bus_that_is_down_is_reported_not_fatal(bus):
    process, base = start_ui(bus)
    status, body, _ = call(base + "/api/overview")
    assert status == 503 and body["code"] in ("timeout", "unavailable")
    assert process.alive()
    assert call(base + "/")[0] == 200


def test_a_port_in_use_is_one_line(bus):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = bus.run("ui", "--port", str(taken.getsockname()[1]), timeout=30)
    assert result.returncode == 3
    assert (
        result.stderr.startswith("error: cannot listen on 127.0.0.1:")
        and result.stderr.count("\n") == 1
    )


def test_listings_filter_and_page_through_everything_once(bus):
    bus.start_up("--workers", "1")
    _, base = start_ui(bus)
    with bus.connect() as api:
        echoes = [api.submit("builtin.echo", n) for n in range(5)]
        fails = [api.submit("builtin.fail", n, max_attempts=1) for n in range(2)]
        for handle in echoes + fails:
            handle.wait(timeout=20)
        made = [api.attest("pat", "paged", "ui", attributes={"n": n}) for n in range(12)]

    def everything(path: str, key: str) -> list[str]:
        seen, cursor = [], ""
        while True:
            status, body, _ = call(base + path + (f"&cursor={cursor}" if cursor else ""))
            assert status == 200, body
            assert len(body[key]) <= 5
            seen += [item["id"] for item in body[key]]
            cursor = body["cursor"]
            if not cursor:
                return seen

    all_jobs = [h.id for h in reversed(echoes + fails)]  # newest first
    assert everything("/api/jobs?limit=5", "jobs") == all_jobs
    assert everything("/api/jobs?limit=5&handler=FAIL", "jobs") == [h.id for h in reversed(fails)]
    assert everything("/api/jobs?limit=5&status=completed&since_min=5", "jobs") == [
        h.id for h in reversed(echoes)
    ]
    assert everything("/api/attestations?limit=5&q=pat%20is%20paged", "records") == [
        r.id for r in reversed(made)
    ]


def test_a_public_url_admits_actions_from_its_origin_alone(shared):
    process, base = start_ui(shared, "--public-url", "https://qntx.example:8443/")
    assert "Public address (through a proxy): https://qntx.example:8443/" in process.output()
    csrf = page_value(base)
    # a proxy that passes the public name on as the Host is let in; other names are not
    assert call(base + "/", headers={"Host": "qntx.example:8443"})[0] == 200
    assert call(base + "/", headers={"Host": "rebound.example"})[0] == 403
    with shared.connect() as api:
        job = api.submit("builtin.sleep", {"args": [30]}, max_attempts=1)
        wait_for(lambda: job.record().status == "running", what="the job running")
        url = f"{base}/api/jobs/{job.id}/cancel"
        for origin in ("https://qntx.example", "http://qntx.example:8443", "https://evil.example"):
            assert call(url, "POST", {"X-Qntx-Csrf": csrf, "Origin": origin})[0] == 403, origin
        assert job.record().status == "running"
        status, body, _ = call(url, "POST", {"X-Qntx-Csrf": csrf, "Origin": "https://qntx.example:8443"})
        assert status == 200 and body["job"]["status"] == "cancelled"


def test_a_bad_public_url_is_one_line(bus):
    result = bus.run("ui", "--port", "0", "--public-url", "qntx.example", timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "ui_public_url must be http(s)://HOST[:PORT]" in result.stderr
