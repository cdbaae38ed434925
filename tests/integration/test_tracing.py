"""OpenTelemetry traces and JSON logs across real actors (``qntx up``).

The caller's span is recorded by the SDK's in-memory exporter in this process; the
actors write theirs as JSON lines (``QNTX_SPANS_DIR``). One job's spans must form
one trace, parent to child: caller → pulse.queue_wait and pulse.run → python.run →
attest. ``log_format = "json"`` makes every log line one JSON object, and a line
about a run names its job, lease, handler and trace id."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(120)

trace = pytest.importorskip("opentelemetry.trace")
sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

EXPORTER = InMemorySpanExporter()
PROVIDER = sdk.TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(PROVIDER)
CODE = "for i in range(3):\n    attest(['s%d' % i], ['p'], ['c'])\n_result = 'ok'"


def spans_in(directory) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]


@pytest.fixture
def traced_bus(bus, tmp_path):
    (bus.home / "config.toml").write_text('log_format = "json"\n')
    bus.env["QNTX_SPANS_DIR"] = str(tmp_path)
    assert bus.run("handler", "create", "att", "--code", CODE).returncode == 0
    bus.start("up")
    bus.processes[-1].wait_output("python.att", timeout=30)
    return bus


def test_one_job_is_one_trace_from_submit_to_attest(traced_bus, tmp_path):
    with traced_bus.connect() as api:
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            job = api.submit("python.att", {})
        assert job.result(timeout=30) == "ok"
        untraced = api.submit("python.att", {})  # outside any span: no context goes with it
        assert untraced.result(timeout=30) == "ok"
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    names = {"pulse.queue_wait", "pulse.run", "python.run", "attest"}
    spans = wait_for(
        lambda: (found := spans_in(tmp_path)) and names <= {s["name"] for s in found} and found,
        timeout=10, what="the actors' spans",
    )  # fmt: skip
    assert {s["trace_id"] for s in spans} == {trace_id}  # the untraced job made none
    by_name = {s["name"]: s for s in spans}
    assert len(spans) == 4
    caller_id = f"{caller.get_span_context().span_id:016x}"
    assert by_name["pulse.queue_wait"]["parent_id"] == caller_id
    assert by_name["pulse.run"]["parent_id"] == caller_id
    assert by_name["python.run"]["parent_id"] == by_name["pulse.run"]["span_id"]
    assert by_name["attest"]["parent_id"] == by_name["python.run"]["span_id"]
    assert by_name["attest"]["attributes"]["qntx.attestations"] == 3
    assert by_name["pulse.run"]["attributes"]["qntx.job_id"] == job.id
    run, inner = by_name["pulse.run"], by_name["python.run"]
    assert run["start_ns"] <= inner["start_ns"] <= by_name["attest"]["start_ns"] <= inner["end_ns"] <= run["end_ns"]
    assert [s.name for s in EXPORTER.get_finished_spans()] == ["caller"]


def test_json_logs_parse_line_by_line_and_name_the_run(traced_bus):
    with traced_bus.connect() as api:
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            job = api.submit("builtin.fail", "boom", max_attempts=2)
        wait_for(lambda: api.job(job.id).status == "failed", timeout=30, what="the failure")
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    log = traced_bus.home / "logs" / "server.log"

    def about_the_job() -> list[dict]:
        records = [json.loads(line)["record"] for line in log.read_text().splitlines()]  # every line parses
        return [r for r in records if r["extra"].get("job") == job.id]

    lines = wait_for(about_the_job, timeout=10, what="a server log line about the job")
    extra = lines[0]["extra"]
    assert extra["actor"] == "QNTX Server"
    assert extra["handler"] == "builtin.fail" and extra["lease"] > 0 and extra["trace_id"] == trace_id
    assert lines[0]["message"].endswith("boom; retrying")
    for name in ("ats", "worker-1", "plugin-python"):
        for line in (traced_bus.home / "logs" / f"{name}.log").read_text().splitlines():
            assert json.loads(line)["record"]["extra"]["actor"], name
