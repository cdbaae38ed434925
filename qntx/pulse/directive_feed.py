"""Pulse follows its directives (handler limits, schedules) in ATS, live.

Reads them all at start (page by page), then re-reads whenever the ATS event stream
shows a new limit or schedule attestation or a gap in the notices' numbers (notices
lost to a slow read or an ATS restart: counted in the server's metrics as
``qntx_notices_missed``), and every ``RESYNC_S`` as a safety net. Every read hands the complete current set
to Pulse, so it takes effect at once. It never blocks the server's loop: queries
are non-blocking calls with callbacks, and an ATS that is down is simply asked again.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq
from loguru import logger

from qntx.ats.feed import NOTICE_BURST, Feed, subscribe
from qntx.bus.actor import Actor
from qntx.protocol import AtsReply, ErrorReply, QueryResult
from qntx.pulse.directives import DIRECTIVES_FILTER, Directives, is_directive, resolve
from qntx.settings import Settings

RESYNC_S = 30.0
RETRY_S = 1.0  # ATS not up yet (or restarting)


class DirectivesFollower:
    def __init__(self, actor: Actor, settings: Settings, apply: Callable[[Directives], None]):
        self.actor = actor
        self._apply = apply
        self.ats = actor.connect(settings.ats_endpoint, AtsReply)
        self.feed = Feed(DIRECTIVES_FILTER, is_directive, "Pulse's limits and schedules")
        actor.gaps.append(self.feed.gaps)
        self.events = subscribe(actor.context, settings, settings.ats_events_endpoint)
        actor.add_reader(self.events, self._on_events)
        self._reading = False
        self._again = False
        self._pages = self.feed.pages()
        self._last: Directives | None = None
        self._problems: set[str] = set()
        actor.every(RESYNC_S, self.refresh)
        self.refresh()

    @property
    def loaded(self) -> bool:
        return self._last is not None

    def refresh(self) -> None:
        if self._reading:
            self._again = True  # read once more when this read ends: it may predate the change
            return
        self._reading, self._pages = True, self.feed.pages()
        self._ask(next(self._pages))

    def _ask(self, query) -> None:
        self.ats.call(query, self._on_page, timeout_s=5.0)

    def _on_page(self, reply) -> None:
        if not isinstance(reply, QueryResult):
            self._reading = False
            message = reply.message if isinstance(reply, ErrorReply) else repr(reply)
            logger.debug("could not read limits and schedules from ATS ({}); asking again", message)
            self.actor.call_later(RETRY_S, self.refresh)
            return
        try:
            self._ask(self._pages.send(reply))
            return
        except StopIteration as done:
            records = done.value
        self._reading = False
        directives = resolve(records)
        for problem in sorted(set(directives.problems) - self._problems):
            logger.warning("ignored a directive that cannot be read: {}", problem)
        self._problems = set(directives.problems)
        if self._last is None or (directives.limits, directives.schedules) != (self._last.limits, self._last.schedules):
            self._last = directives
            logger.info(
                "limits for {} handler(s), {} schedule(s) from ATS", len(directives.limits), len(directives.schedules)
            )
            self._apply(directives)
        if self._again:
            self._again = False
            self.refresh()

    def _on_events(self) -> None:
        bodies = []
        for _ in range(NOTICE_BURST):
            try:
                bodies.append(self.events.recv_multipart(zmq.NOBLOCK)[-1])
            except zmq.Again:
                break
        if self.feed.touched(bodies):
            self.refresh()

    def close(self) -> None:
        self.actor.remove_reader(self.events)
        self.events.close(0)
        self.ats.close()
