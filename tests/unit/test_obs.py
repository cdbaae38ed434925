"""Observability without sockets: what Pulse's core counts, the histograms, the
settings, trace context."""

from __future__ import annotations

import os

import pytest

from qntx.errors import Invalid
from qntx.obs.endpoint import parse_address, process_figures
from qntx.obs.tally import Buckets
from qntx.obs.trace import TRACEPARENT, current_traceparent, trace_id_of
from qntx.pulse.events import PluginUp, Steer
from qntx.pulse.rules import lease_ms
from qntx.settings import load_settings
from tests.unit.test_core import CONFIG, Harness


def test_the_core_counts_each_transition_once_by_handler():
    h = Harness()
    h(PluginUp("python", ("python.x",)))
    ok = h.submit()
    flaky = h.submit(max_attempts=2)
    slow = h.submit(timeout_s=1, max_attempts=1)
    lost = h.submit(handler="python.x")
    h.hello(b"s1", credit=8)
    h.hello(b"p1", credit=8, plugin="python")
    runs = {d.job.id: d for d in h.dispatched(h.turn())}
    h.done(runs[ok.id], result=1)
    h.done(runs[flaky.id], success=False)
    h.tick(lease_ms(1) + 1)
    h.hello(b"s1", credit=8, leases=[runs[slow.id].lease])
    h.hello(b"p1", credit=8, leases=[runs[lost.id].lease], plugin="python")
    h.turn()  # slow's lease expires: no attempt left, it fails
    h(Steer("retry", slow.id, "client"))  # by hand
    h(Steer("cancel", slow.id, "client"))
    # s1 goes silent: its runs are lost (after the stall the last turn made up for)
    h.idle(lease_ms(1) + CONFIG.dead_after_ms + 1)
    tally = {key: n for key, n in h.core.tally.items() if n}
    assert tally == {
        ("submitted", "builtin.echo"): 3, ("submitted", "python.x"): 1,
        ("started", "builtin.echo"): 4,  # flaky twice; python.x was dispatched, its code never started
        ("completed", "builtin.echo"): 1,
        ("retried", "builtin.echo"): 2,  # flaky's failed attempt, slow by hand
        ("expired", "builtin.echo"): 1, ("failed", "builtin.echo"): 1,
        ("cancelled", "builtin.echo"): 1, ("lost", "python.x"): 1, ("lost", "builtin.echo"): 1,
    }  # fmt: skip


def test_buckets_count_at_or_below_each_bound():
    buckets = Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert buckets.sum == pytest.approx(8.65)


def test_metrics_and_log_format_settings(tmp_path):
    assert load_settings(tmp_path, environ={}).metrics == "127.0.0.1:9464"
    assert load_settings(tmp_path, environ={}).log_format == "text"
    (tmp_path / "config.toml").write_text('metrics = ""\nlog_format = "json"\n')
    resolved = load_settings(tmp_path, environ={})
    assert resolved.metrics == "" and resolved.log_format == "json"
    with pytest.raises(Invalid, match="log_format must be one of text, json"):
        load_settings(tmp_path, environ={"QNTX_LOG_FORMAT": "xml"})
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:99999", ":80"):
        with pytest.raises(Invalid, match="metrics must be HOST:PORT"):
            parse_address(bad)


def test_process_figures_of_this_process_and_of_none():
    cpu, rss = process_figures(os.getpid())
    assert cpu > 0 and rss > 1 << 20
    assert process_figures(2**22 + 1) is None


def test_trace_context_is_only_read_from_a_current_span():
    trace = pytest.importorskip("opentelemetry.trace")
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    assert current_traceparent() is None  # no span: nothing goes on the Submit
    with sdk.TracerProvider().get_tracer("t").start_as_current_span("s") as span:
        parent = current_traceparent()
    assert TRACEPARENT.match(parent)
    assert trace_id_of(parent) == f"{span.get_span_context().trace_id:032x}"
    assert trace_id_of("not a traceparent") is None
    assert trace.get_current_span().get_span_context().is_valid is False
