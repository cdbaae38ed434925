"""OpenTelemetry trace context across the bus (the optional ``qntx[otel]`` extra).

A client puts its caller's current span on a ``Submit`` as a W3C ``traceparent``
(``current_traceparent``: it only looks if the caller's process already imported
OpenTelemetry, so a script without it pays one dict lookup). Pulse keeps it on the
job and, when it dispatches a traced job, records ``pulse.queue_wait`` and starts
``pulse.run`` as children of it; the ``Dispatch`` carries ``pulse.run`` on; the
python plugin runs the handler under ``python.run`` and adds one ``attest`` span
per batch the handler's ``attest()`` sent (timed in the job process, which never
imports OpenTelemetry). A job without trace context costs each actor one ``if``.

Actors export with whatever the OpenTelemetry SDK is set up to do: with
``opentelemetry-sdk`` installed, ``OTEL_TRACES_EXPORTER=console`` or ``otlp`` (the
latter needs ``opentelemetry-exporter-otlp``), or ``QNTX_SPANS_DIR=DIR``: every span
as one JSON line in ``DIR/<service>-<pid>.jsonl`` (for debugging and tests).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
MAX_TRACEPARENT = 55  # its length: 2 + 1 + 32 + 1 + 16 + 1 + 2


def current_traceparent() -> str | None:
    """The caller's current span as a traceparent, or None (no OpenTelemetry in use)."""
    otel = sys.modules.get("opentelemetry.trace")
    if otel is None:
        return None
    context = otel.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return _format(context)


def trace_id_of(traceparent: str | None) -> str | None:
    match = TRACEPARENT.match(traceparent or "")
    return match.group(1) if match else None


def _format(context: Any) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class Tracer:
    """An actor's spans for traced jobs. Imports OpenTelemetry on the first traced
    job only; without it installed, every call is a no-op returning None."""

    def __init__(self, service: str):
        self.service = service
        self._otel: Any = None  # the opentelemetry.trace module, once loaded
        self._failed = False

    def _load(self) -> Any:
        if self._otel is None and not self._failed:
            try:
                from opentelemetry import trace
            except ImportError:
                self._failed = True
                return None
            setup_exporter(self.service)
            self._otel = trace
        return self._otel

    def start(self, name: str, parent: str | None, start_ns: int | None = None, **attributes: Any) -> Any:
        """A span under ``parent`` (a traceparent), or None if it is not one / no OpenTelemetry."""
        match = TRACEPARENT.match(parent or "")
        if match is None:
            return None
        otel = self._load()
        if otel is None:
            return None
        trace_id, span_id, flags = match.groups()
        remote = otel.SpanContext(
            int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=otel.TraceFlags(int(flags, 16))
        )
        context = otel.set_span_in_context(otel.NonRecordingSpan(remote))
        tracer = otel.get_tracer("qntx")
        return tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes or None)

    def record(self, name: str, parent: str | None, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A span already over (times measured elsewhere)."""
        span = self.start(name, parent, start_ns, **attributes)
        if span is not None:
            span.end(end_time=end_ns)

    @staticmethod
    def parent_of(span: Any) -> str | None:
        """``span`` as the traceparent of its children."""
        return None if span is None else _format(span.get_span_context())

    def fail(self, span: Any, message: str) -> None:
        otel = self._otel
        if span is not None and otel is not None:
            span.set_status(otel.Status(otel.StatusCode.ERROR, message))


def setup_exporter(service: str) -> None:
    """Give this process a tracer provider that exports, if the SDK is installed and
    the environment asks for one (and none was set up already)."""
    spans_dir = os.environ.get("QNTX_SPANS_DIR")
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if not spans_dir and exporter_name in ("", "none"):
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"qntx-{service}"}))
    if spans_dir:  # in batches, off the actor's loop, as an OTLP exporter would be
        processor = BatchSpanProcessor(_LinesExporter(Path(spans_dir), service), schedule_delay_millis=200)
        provider.add_span_processor(processor)
    elif exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            return
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # what is still batched goes out when the actor stops


class _LinesExporter:
    """Spans as JSON lines, one file per process."""

    def __init__(self, directory: Path, service: str):
        self.path = directory / f"{service}-{os.getpid()}.jsonl"

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for span in spans:
            context, parent = span.get_span_context(), span.parent
            lines.append(json.dumps({
                "name": span.name,
                "trace_id": f"{context.trace_id:032x}",
                "span_id": f"{context.span_id:016x}",
                "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "attributes": dict(span.attributes or {}),
                "status": span.status.status_code.name,
            }))  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class RunSpans:
    """Pulse's spans of traced jobs: each run's queue wait, and the run itself from
    its dispatch to its result (its traceparent goes out on the ``Dispatch``)."""

    OPEN_LIMIT = 10_000  # runs whose result never comes (a lost run) end here at the latest

    def __init__(self, service: str = "server"):
        self.tracer = Tracer(service)
        self.open: dict[int, Any] = {}  # lease -> its run's span

    def dispatched(self, dispatch: Any, at_ms: int) -> None:
        """A run of a traced job went out at ``at_ms`` (wall ms)."""
        job = dispatch.job
        attributes = {"qntx.job_id": job.id, "qntx.handler": job.handler, "qntx.attempt": job.attempts}
        started_ns = at_ms * 1_000_000
        due_ns = max(job.created_at, job.run_after) * 1_000_000
        self.tracer.record("pulse.queue_wait", job.trace, min(due_ns, started_ns), started_ns, **attributes)
        span = self.tracer.start("pulse.run", job.trace, started_ns, **attributes, **{"qntx.lease": dispatch.lease})
        if span is None:
            return
        dispatch.trace = self.tracer.parent_of(span)
        self.open[dispatch.lease] = span
        if len(self.open) > self.OPEN_LIMIT:
            self.open.pop(next(iter(self.open))).end()

    def finished(self, lease: int, success: bool, error: str = "") -> None:
        span = self.open.pop(lease, None)
        if span is None:
            return
        span.set_attribute("qntx.success", success)
        if not success:
            self.tracer.fail(span, error)
        span.end()
