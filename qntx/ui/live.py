"""Pushing the bus's events to open pages, as server-sent events.

One ``Hub`` reads every event of the bus (``AsyncBus.events``) and fans it out to
the pages connected to ``/api/events``. What it sends:

* ``jobs``: the jobs that changed, as listing rows, gathered for FLUSH_S; when more
  than BURST changed, ``resync`` instead (each page fetches the one page it shows,
  at most once a second), so thousands of jobs a second cost a page little;
* ``progress`` and ``output`` of the job a page shows (``?job=ID``), which the hub
  follows for that page over its own request connection (from the output so far);
* ``overview``: the whole overview, at most once a second when something changed,
  and every OVERVIEW_IDLE_S anyway (an actor's health has no event of its own);
* ``handlers`` when a handler was stored or registered (the page asks again);
* ``bus``: whether the server answers (``{"up": ..., "error": ...}``), asked every
  BUS_PROBE_S, sent when it changes and to each page as it connects, so a page greys
  what it shows within seconds of the bus stopping (an events socket stays quiet
  then, it does not fail).

A page that reads too slowly loses its backlog and is told to ``resync`` (fetch
what it shows again) instead of events being dropped unseen. So are all pages when
the hub itself lost notices (a gap in their numbers: ``qntx.bus.gaps``, counted in
``Hub.gaps`` and logged) or got one too big to say what changed (``partial``): the
overview and the handlers are asked for again too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from typing import Any

import msgspec
from aiohttp import web
from loguru import logger

from qntx.aio import AsyncBus
from qntx.bus.gaps import Gaps
from qntx.errors import QntxError
from qntx.protocol import (
    FINAL_STATUSES,
    AttestationsStored,
    HandlersRegistered,
    JobNotice,
    JobOutput,
    JobProgressed,
    Ping,
    stored_notices,
)
from qntx.stored_handlers import CONTEXT, PREDICATE
from qntx.ui.views import Throughput, notice_row, now_ms, overview, seed_throughput

FLUSH_S = 0.25
OVERVIEW_MIN_S = 1.0
OVERVIEW_IDLE_S = 5.0
KEEPALIVE_S = 15.0
BACKLOG = 1000  # messages a page may fall behind before it is told to resync
BURST = 200  # more jobs changed than this in one flush: pages resync instead
COUNTED_KEPT = 100_000
BUS_PROBE_S = 1.0  # how often the server is asked whether it answers
BUS_PROBE_TIMEOUT_S = 2.0  # and how long its answer may take


class Page:
    """One connected page: its queue of messages, and the job it shows (if any)."""

    def __init__(self, job_id: str | None):
        self.job_id = job_id
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(BACKLOG)

    def send(self, kind: str, data: Any) -> None:
        try:
            self.queue.put_nowait((kind, data))
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(("resync", {}))


class Hub:
    def __init__(self, bus: AsyncBus):
        self.bus = bus
        self.throughput = Throughput()
        self.pages: set[Page] = set()
        self._changed: dict[str, dict[str, Any]] = {}
        self._counted: OrderedDict[tuple[str, int], None] = OrderedDict()  # finished runs charted
        self._progress: dict[str, dict[str, Any]] = {}
        self._dirty = True
        self._handlers_changed = False
        self._resync_due = False  # notices were lost (or said too little): every page fetches again
        self.gaps = Gaps("the dashboard")
        self.bus_error: str | None = None  # why the server does not answer now (None: it does)
        self._on_event = {
            JobNotice: self._job_changed,
            HandlersRegistered: self._handlers_registered,
            AttestationsStored: self._attestation_created,
        }

    async def run(self) -> None:
        """Read events and push them until cancelled."""
        events = self.bus.events()
        reader = asyncio.ensure_future(self._read(events))
        probe = asyncio.ensure_future(self._watch_bus())
        try:
            with contextlib.suppress(QntxError):  # the bus may be down: the charts start empty
                await seed_throughput(self.bus, self.throughput, now_ms())
            await self._push()
        finally:
            for task in (reader, probe):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await events.aclose()

    async def _watch_bus(self) -> None:
        """Ask the server every BUS_PROBE_S whether it answers; tell the pages when that changes."""
        while True:
            try:
                await self.bus.server.request(Ping(), timeout_s=BUS_PROBE_TIMEOUT_S)
                error = None
            except QntxError as exc:
                error = str(exc)
            if (error is None) != (self.bus_error is None):
                self.bus_error = error
                self._broadcast("bus", self.bus_state())
                self._dirty = True  # the overview again: fresh counts, or the error
            await asyncio.sleep(BUS_PROBE_S)

    def bus_state(self) -> dict[str, Any]:
        return {"up": self.bus_error is None, "error": self.bus_error}

    async def _read(self, events) -> None:
        async for event in events:
            handle = self._on_event.get(type(event))
            if handle is None:
                continue
            if self.gaps.saw_event(event) or getattr(event, "partial", False):
                self._lost()
            try:
                handle(event)
            except Exception:  # one odd event must not stop the pages' live updates
                logger.opt(exception=True).warning("dashboard: an event could not be shown")

    def _lost(self) -> None:
        """What the pages show may be stale (notices were lost): they fetch it again."""
        self._resync_due = self._handlers_changed = self._dirty = True

    def _job_changed(self, job: JobNotice) -> None:
        if not job.partial:  # (its row lacks its handler: the resync brings it)
            self._changed[job.id] = notice_row(job)
        if job.finished_at and (job.id, job.lease) not in self._counted:
            if job.status in FINAL_STATUSES:  # a run's end may be announced more than once
                self._counted[(job.id, job.lease)] = None
                if len(self._counted) > COUNTED_KEPT:
                    self._counted.popitem(last=False)
            self.throughput.count(job.status, job.finished_at)
        self._dirty = True

    async def _follow_for(self, page: Page) -> None:
        """The output and progress of the job ``page`` shows, from what it wrote so far."""
        try:
            async for event in self.bus.follow(page.job_id):
                if isinstance(event, JobOutput):
                    page.send("output", {"job_id": event.job_id, "stream": event.stream, "text": event.text})
                elif isinstance(event, JobProgressed):
                    self._progress[event.job_id] = {
                        "job_id": event.job_id,
                        "current": event.current,
                        "total": event.total,
                    }
        except QntxError as exc:  # the job is gone, or the bus is down: the page shows its record
            logger.debug("dashboard: stopped following {}: {}", page.job_id, exc)

    def _handlers_registered(self, event: HandlersRegistered) -> None:
        self._handlers_changed = True
        self._dirty = True

    def _attestation_created(self, event: AttestationsStored) -> None:
        for record in stored_notices(event):
            if record.partial or (PREDICATE in record.predicates and CONTEXT in record.contexts):
                self._handlers_changed = True

    async def _push(self) -> None:
        last_overview = last_burst = 0.0
        while True:
            await asyncio.sleep(FLUSH_S)
            if len(self._changed) > BURST or self._resync_due:
                # too many rows to patch in, or lost: each page fetches what it shows, once a second
                if time.monotonic() - last_burst >= OVERVIEW_MIN_S:
                    last_burst = time.monotonic()
                    self._changed, self._resync_due = {}, False
                    self._broadcast("resync", {})
            elif self._changed:
                changed, self._changed = list(self._changed.values()), {}
                self._broadcast("jobs", changed)
            if self._progress:
                progress, self._progress = self._progress, {}
                for page in self.pages:
                    if page.job_id in progress:
                        page.send("progress", progress[page.job_id])
            if self._handlers_changed:
                self._handlers_changed = False
                self._broadcast("handlers", {})
            since = time.monotonic() - last_overview
            if self.pages and (
                since >= OVERVIEW_IDLE_S or (self._dirty and since >= OVERVIEW_MIN_S)
            ):
                self._dirty = False
                last_overview = time.monotonic()
                self._broadcast("overview", await self._overview())

    async def current_overview(self) -> dict[str, Any]:
        return await overview(self.bus, self.throughput)

    async def _overview(self) -> dict[str, Any]:
        try:
            return await self.current_overview()
        except QntxError as exc:
            return {"error": str(exc)}

    def _broadcast(self, kind: str, data: Any) -> None:
        for page in self.pages:
            page.send(kind, data)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/events[?job=ID]``: this page's events until it goes away."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        page = Page(request.query.get("job") or None)
        self.pages.add(page)
        following = asyncio.ensure_future(self._follow_for(page)) if page.job_id else None
        self._dirty = True  # a new page gets the overview within a second
        page.send("bus", self.bus_state())
        try:
            await response.write(b"retry: 1000\n\n")
            while True:
                try:
                    kind, data = await asyncio.wait_for(page.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                body = msgspec.json.encode(data)
                await response.write(b"event: " + kind.encode() + b"\ndata: " + body + b"\n\n")
        except ConnectionResetError:  # the page went away
            pass
        except Exception:  # a page going away mid-write must not take the hub down
            logger.opt(exception=True).debug("event stream ended")
        finally:
            self.pages.discard(page)
            if following is not None:
                following.cancel()
        return response
