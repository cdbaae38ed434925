"""What the dashboard shows, built from the scripting API's records.

Every function here takes an ``AsyncBus`` (or records it returned) and gives plain
JSON-able values; routes serve them and ``live`` pushes them. Nothing here talks
to a socket itself.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from qntx.aio import AsyncBus
from qntx.ats.current import stored_last_first
from qntx.errors import QntxError
from qntx.protocol import MAX_PAGE, Attestation, Job, JobNotice
from qntx.stored_handlers import (
    HANDLER_FILTER,
    current_version,
    history_filter,
    is_tombstone,
    resolve,
)

# A payload or result larger than this (as JSON) is shown as its size alone.
SHOWN_VALUE_BYTES = 64 * 1024
# Listings with a filter the server cannot apply (handler, time) scan at most this
# many jobs per page asked for, so one request stays bounded.
SCAN_JOBS = 5 * MAX_PAGE
# Throughput is counted in buckets of BUCKET_S seconds over the last BUCKETS of them.
BUCKET_S = 10
BUCKETS = 60
# Running jobs shown on the overview (per worker and in all).
RUNNING_SHOWN = 200


def now_ms() -> int:
    return int(time.time() * 1000)


def shown_value(value: Any) -> Any:
    """A payload or result as the page shows it: itself, or a note when it is large."""
    encoded = msgspec.json.encode(value)
    if len(encoded) > SHOWN_VALUE_BYTES:
        return {"(not shown)": f"{len(encoded):,} bytes"}
    return msgspec.json.decode(encoded)


BULK_MAX = 100_000  # jobs one dashboard action steers at most


def notice_row(job: Job | JobNotice) -> dict[str, Any]:
    """A listing row of what an events notice carries (no progress, no error)."""
    fields = ("id", "handler", "status", "attempts", "max_attempts", "priority", "created_at", "started_at", "finished_at", "worker")
    return {name: getattr(job, name) for name in fields} | {"progress": None, "error": None}


def job_summary(job: Job) -> dict[str, Any]:
    """One row of a job listing (no payload, result or logs)."""
    return notice_row(job) | {
        "progress": msgspec.to_builtins(job.progress) if job.progress else None,
        "error": job.error.message.splitlines()[0] if job.error and job.error.message else None,
    }


def job_detail(job: Job) -> dict[str, Any]:
    """Everything about one job: its record, its error and traceback, its runs."""
    detail = job_summary(job)
    detail.update(
        payload=shown_value(job.payload),
        result=shown_value(job.result),
        error=msgspec.to_builtins(job.error) if job.error else None,
        logs=job.logs,
        timeout_s=job.timeout_s,
        parent_id=job.parent_id,
        idempotency_key=job.idempotency_key,
        run_after=job.run_after,
        version=job.version,
        after=job.after,
        schedule=job.schedule,
        lease=job.lease,
        runs=job.runs,
        lost=job.lost,
        history=msgspec.to_builtins(job.history),
        history_dropped=job.history_dropped,
    )
    return detail


class Throughput:
    """Jobs completed and failed per bucket of time, over the last minutes."""

    def __init__(self):
        self._counts: dict[int, dict[str, int]] = {}  # bucket start (s) -> counts

    def count(self, status: str, at_ms: int) -> None:
        if status not in ("completed", "failed"):
            return
        start = at_ms // 1000 // BUCKET_S * BUCKET_S
        self._counts.setdefault(start, {"completed": 0, "failed": 0})[status] += 1
        if len(self._counts) > 2 * BUCKETS:  # forget what no chart shows any more
            oldest = max(self._counts) - BUCKET_S * BUCKETS
            self._counts = {s: c for s, c in self._counts.items() if s > oldest}

    def series(self, at_ms: int | None = None) -> dict[str, Any]:
        """The last BUCKETS buckets, oldest first, ending with the current one."""
        end = (at_ms or now_ms()) // 1000 // BUCKET_S * BUCKET_S
        by_start = self._counts
        starts = [end - BUCKET_S * i for i in range(BUCKETS - 1, -1, -1)]
        return {
            "bucket_s": BUCKET_S,
            "end": end,
            "completed": [by_start.get(s, {}).get("completed", 0) for s in starts],
            "failed": [by_start.get(s, {}).get("failed", 0) for s in starts],
        }


async def seed_throughput(bus: AsyncBus, throughput: Throughput, before_ms: int) -> None:
    """Count the jobs that finished in the charted window before ``before_ms``."""
    since = before_ms - BUCKET_S * BUCKETS * 1000
    jobs, _ = await bus.jobs_page(limit=MAX_PAGE)
    for job in jobs:
        if job.finished_at and since <= job.finished_at < before_ms:
            throughput.count(job.status, job.finished_at)


async def overview(bus: AsyncBus, throughput: Throughput) -> dict[str, Any]:
    """Actors, queue depth, workers with their running jobs and free slots, charts."""
    status = await bus.status()
    running, _ = await bus.jobs_page(status="running", limit=RUNNING_SHOWN)
    # handed to a plugin and waiting inside it for an interpreter: the session holds them too
    dispatched, _ = await bus.jobs_page(status="dispatched", limit=RUNNING_SHOWN)
    running += dispatched
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for job in running:
        by_worker.setdefault(job.worker or "", []).append(job_summary(job))
    actors = [msgspec.to_builtins(actor) for actor in status.actors]
    workers = [
        {
            "name": actor.name,
            "pid": actor.pid,
            "slots": actor.credit,
            "free": max(0, actor.credit - actor.leases),
            "running": by_worker.get(actor.name, []),
        }
        for actor in status.actors
        if actor.endpoint == bus.settings.workers_endpoint
    ]
    return {
        "actors": actors,
        "queue": status.queue,
        "handlers": status.handlers,
        "workers": workers,
        "running": [job_summary(job) for job in running],
        "throughput": throughput.series(),
    }


async def job_listing(
    bus: AsyncBus,
    *,
    status: str | None,
    handler: str | None,
    since_ms: int | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    """A page of jobs, newest first, filtered by status (by the server) and by handler
    and creation time (here, scanning at most SCAN_JOBS jobs); ``cursor`` goes on.

    Each server page asks only for as many jobs as are still wanted, so the page
    never ends mid-way through one and the server's cursor stays exact."""
    found: list[Job] = []
    scanned = 0
    while True:
        page, cursor = await bus.jobs_page(status=status, limit=limit - len(found), cursor=cursor)
        scanned += len(page)
        for job in page:
            if since_ms is not None and job.created_at < since_ms:
                # newest first: the rest is older still
                return {"jobs": [job_summary(j) for j in found], "cursor": None}
            if shown(job, handler):
                found.append(job)
        if cursor is None or len(found) >= limit or scanned >= SCAN_JOBS:
            return {"jobs": [job_summary(j) for j in found], "cursor": cursor}


def shown(job: Job, handler: str | None) -> bool:
    """The listing's handler filter: a part of the name, in any case."""
    return handler is None or handler.lower() in job.handler.lower()


async def bulk_steer(
    bus: AsyncBus, action: str, *, status: str | None, handler: str | None, since_ms: int | None
) -> dict[str, int]:
    """Retry or cancel every job the listing's filters show (every page, not only
    the one on screen), each once."""
    ids: list[str] = []
    cursor = None
    while True:
        page, cursor = await bus.jobs_page(status=status, limit=MAX_PAGE, cursor=cursor)
        fresh = [j for j in page if since_ms is None or j.created_at >= since_ms]
        ids += [j.id for j in fresh if shown(j, handler)]
        if cursor is None or len(fresh) < len(page) or len(ids) >= BULK_MAX:
            break
    steered = await (bus.retry_many(ids) if action == "retry" else bus.cancel_many(ids))
    return {"steered": len(steered), "skipped": len(steered.skipped)}


async def handler_listing(bus: AsyncBus) -> dict[str, Any]:
    """The current python handlers and whether the server has them registered now."""
    records = await bus.query_filter(HANDLER_FILTER)
    resolution = resolve(records)
    try:
        registered = set((await bus.status()).handlers)
    except QntxError:  # the handlers are in the store whether or not the server is up
        registered = set()
    handlers = []
    for name, record in resolution.current.items():
        code = record.attributes["code"]
        handlers.append(
            {
                "name": name,
                "handler": f"python.{name}",
                "asid": record.id,
                "updated": record.timestamp,
                "lines": code.count("\n") + 1,
                "registered": f"python.{name}" in registered,
            }
        )
    return {"handlers": handlers, "skipped": resolution.skipped}


async def handler_detail(bus: AsyncBus, name: str) -> dict[str, Any] | None:
    """A handler's versions, newest first, each with its jobs by status (counted over
    the newest SCAN_JOBS jobs); None if it never existed."""
    history = stored_last_first(await bus.query_filter(history_filter(name)))
    if not history:
        return None
    counts = await _jobs_per_version(bus, f"python.{name}", history)
    versions = [
        {
            "asid": record.id,
            "timestamp": record.timestamp,
            "deleted": is_tombstone(record),
            "code": record.attributes.get("code")
            if isinstance(record.attributes.get("code"), str)
            else None,
            "jobs": counts[i],
        }
        for i, record in enumerate(history)
    ]
    return {
        "name": name,
        "handler": f"python.{name}",
        "deleted": is_tombstone(current_version(history)) if current_version(history) else False,
        "versions": versions,
    }


async def _jobs_per_version(
    bus: AsyncBus, handler: str, history: list[Attestation]
) -> list[dict[str, int]]:
    counts: list[dict[str, int]] = [{} for _ in history]
    by_id = {record.id: i for i, record in enumerate(history)}
    cursor = None
    scanned = 0
    while scanned < SCAN_JOBS:
        page, cursor = await bus.jobs_page(limit=MAX_PAGE, cursor=cursor)
        scanned += len(page)
        for job in page:
            if job.handler != handler:
                continue
            index = by_id.get(job.version) if job.version else None
            if index is None:  # a job from before jobs were pinned to a version: by time
                index = next(
                    (i for i, r in enumerate(history) if r.timestamp <= job.created_at), None
                )
            if index is not None:
                counts[index][job.status] = counts[index].get(job.status, 0) + 1
        if cursor is None:
            break
    return counts


def attestation_row(record: Attestation) -> dict[str, Any]:
    return msgspec.to_builtins(record)
