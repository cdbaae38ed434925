"""Each actor's figures as Prometheus families, written where ``qntx up`` reads them.

``qntx up`` with ``metrics`` set makes ``<home>/run/metrics/``; an actor that finds
it at start writes its families there every ``SNAPSHOT_S`` (``<pid>.prom``, the text
exposition, replaced atomically), on its own loop, from the plain counts it keeps
(``qntx.obs.tally``, ``PulseCore.tally``, ``Actor.requests``). Nothing is counted
through prometheus-client on a hot path, and without the directory the library is
never imported. ``qntx.obs.endpoint`` merges the files under an ``actor`` label.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from qntx.obs.tally import Buckets

SNAPSHOT_S = 1.0
Families = Callable[[], Iterable[Any]]

# PulseCore.tally's events -> (metric, help)
JOB_COUNTERS = {
    "submitted": ("qntx_jobs_submitted", "Jobs accepted by Pulse (schedules' firings included)."),
    "started": ("qntx_jobs_started", "Runs dispatched to a worker session."),
    "completed": ("qntx_jobs_completed", "Jobs that completed."),
    "failed": ("qntx_jobs_failed", "Jobs that failed for good (no attempt left, or they cannot run)."),
    "cancelled": ("qntx_jobs_cancelled", "Jobs cancelled."),
    "retried": ("qntx_jobs_retried", "Jobs queued again after a failed attempt, or retried by hand."),
    "lost": ("qntx_runs_lost", "Runs lost to a worker, plugin or server going away (no attempt used)."),
    "expired": ("qntx_lease_expiries", "Runs whose lease expired (the job's timeout)."),
}


def metrics_dir(run_dir: Path) -> Path:
    return run_dir / "metrics"


def export(actor: Any, run_dir: Path, families: Families) -> bool:
    """Write ``families()`` (and the actor's request counts) every SNAPSHOT_S if
    ``qntx up`` serves metrics for this home. Returns whether it does."""
    directory = metrics_dir(run_dir)
    if not directory.is_dir():
        return False
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    class Source:
        def collect(self) -> Iterator[Any]:
            yield from bus_families(actor)
            yield from families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Source())
    path = directory / f"{os.getpid()}.prom"
    spare = directory / f".{os.getpid()}.tmp"

    def write() -> None:
        try:
            spare.write_bytes(generate_latest(registry))
            os.replace(spare, path)
        except OSError:
            pass  # `up` stopped and removed the directory: nobody reads it any more

    write()
    actor.every(SNAPSHOT_S, write)
    return True


def counter(name: str, doc: str, label: str, counts: dict) -> Any:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, doc, labels=[label] if label else [])
    for key, value in counts.items():
        family.add_metric([key] if label else [], value)
    return family


def histogram(name: str, doc: str, label: str, by: dict[str, Buckets]) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    family = HistogramMetricFamily(name, doc, labels=[label] if label else [])
    for key, buckets in by.items():
        family.add_metric([key] if label else [], buckets.cumulative(), buckets.sum)
    return family


def gauge(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def bus_families(actor: Any) -> Iterator[Any]:
    """What every poll-loop actor counts: replies by request type and code, refusals."""
    from prometheus_client.core import CounterMetricFamily

    requests = CounterMetricFamily(
        "qntx_requests", "Requests answered, by message type and reply code (ok or the error's code).", labels=["type", "code"]
    )
    for (kind, code), value in list(actor.requests.items()):
        requests.add_metric([kind, code], value)
    yield requests
    yield counter(
        "qntx_refused_messages", "Messages refused before any handler saw them (forbidden, too_large, bad_request, …).",
        "reason", dict(actor.refused),
    )  # fmt: skip
    published: dict[str, int] = {}
    oversized: dict[str, int] = {}
    for publisher in getattr(actor, "publishers", ()):
        for family, count in list(publisher.published.items()):
            published[family] = published.get(family, 0) + count
        for family, count in list(publisher.oversized.items()):
            oversized[family] = oversized.get(family, 0) + count
    missed: dict[str, int] = {}
    for gaps in getattr(actor, "gaps", ()):
        for family, count in gaps.counts().items():
            missed[family] = missed.get(family, 0) + count
    yield counter("qntx_notices_published", "Notices numbered on this actor's events sockets, by topic family "
                  "(each subscriber of the family got them, less what it was too slow to take).", "family", published)
    yield counter("qntx_notices_oversized", "Notices over NOTICE_MAX_BYTES, sent in pieces or as their ids only.",
                  "family", oversized)  # fmt: skip
    yield counter("qntx_notices_missed", "Notices this actor's subscriptions lost (gaps in their numbers); "
                  "each gap made it read the store again.", "family", missed)  # fmt: skip


def pulse_families(pulse: Any) -> Iterator[Any]:
    """Pulse's figures, read from its core and its shell (``qntx.pulse.shell``)."""
    core = pulse.core
    by_event: dict[str, dict[str, int]] = {event: {} for event in JOB_COUNTERS}
    for (event, handler), value in list(core.tally.items()):
        by_event[event][handler] = value
    for event, (name, doc) in JOB_COUNTERS.items():
        yield counter(name, doc + " By handler.", "handler", by_event[event])
    yield gauge("qntx_jobs", "Jobs in Pulse's store by status (queue depth: queued, waiting, running, paused).",
                ["status"], {(status,): count for status, count in core.counts().items()})  # fmt: skip
    sessions: dict[tuple[str], int] = {("worker",): 0, ("plugin",): 0}
    slots, free = dict(sessions), dict(sessions)
    for session in core.session_list():
        kind = ("plugin",) if session.plugin else ("worker",)
        sessions[kind] += 1
        slots[kind] += session.credit
        free[kind] += max(0, session.free)
    yield gauge("qntx_worker_sessions", "Worker sessions joined (kind: plain worker or a plugin's own).", ["kind"], sessions)
    yield gauge("qntx_worker_slots", "Job slots the sessions offer.", ["kind"], slots)
    yield gauge("qntx_worker_slots_free", "Job slots free now.", ["kind"], free)
    yield gauge("qntx_plugins_up", "Plugins registered and up.", [], {(): core.plugins_up()})
    yield histogram("qntx_job_queue_wait_seconds", "From a job's submission (or its due time) to its dispatch.",
                    "handler", dict(pulse.waits))  # fmt: skip
    yield histogram("qntx_job_run_duration_seconds", "From dispatch to the run's result.", "handler", dict(pulse.runs))
    yield histogram("qntx_pulse_commit_duration_seconds", "One synced commit of Pulse's job store.", "",
                    {"": pulse.commit_seconds})  # fmt: skip
    yield histogram("qntx_pulse_commit_jobs", "Jobs written by one commit of Pulse's job store.", "", {"": pulse.commit_rows})
    yield counter("qntx_refused_reports", "Results, progress and output from a session that holds no such run.", "",
                  {"": pulse.refused_reports})  # fmt: skip


def ats_families(ats: Any) -> Iterator[Any]:
    yield counter("qntx_attestations_written", "Attestations durably stored.", "", {"": ats.written})
    yield histogram("qntx_ats_commit_duration_seconds", "One group commit (journal write and sync) of ATS.", "",
                    {"": ats.commit_seconds})  # fmt: skip
    yield histogram("qntx_ats_commit_attestations", "Attestations in one group commit of ATS.", "", {"": ats.commit_size})
