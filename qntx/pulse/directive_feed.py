"""Pulse follows its directives (handler limits, schedules) in ATS, live.

Reads them all at start (page by page), then re-reads whenever the ATS event stream
shows a new limit or schedule attestation, and every ``RESYNC_S`` as a safety net
for events a restart may have dropped. Every read hands the complete current set
to Pulse, so it takes effect at once. It never blocks the server's loop: queries
are non-blocking calls with callbacks, and an ATS that is down is simply asked again.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq
from loguru import logger

from qntx.ats.store import next_page
from qntx.bus.actor import Actor
from qntx.bus.codec import Decoder
from qntx.errors import QntxError
from qntx.protocol import AtsReply, ErrorReply, Event, Query, QueryResult, stored_notices
from qntx.pulse.directives import DIRECTIVES_FILTER, Directives, is_directive, resolve
from qntx.settings import Settings

RESYNC_S = 30.0
RETRY_S = 1.0  # ATS not up yet (or restarting)


class DirectivesFollower:
    def __init__(self, actor: Actor, settings: Settings, apply: Callable[[Directives], None]):
        self.actor = actor
        self._apply = apply
        self.ats = actor.connect(settings.ats_endpoint, AtsReply)
        self.events = actor.context.socket(zmq.SUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.SUBSCRIBE, b"att.")
        settings.security.connect(self.events, settings.ats_events_endpoint)
        self._decoder = Decoder(Event)
        actor.add_reader(self.events, self._on_events)
        self._reading = False
        self._again = False
        self._records: list = []
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
        self._reading, self._records = True, []
        self._ask(DIRECTIVES_FILTER)

    def _ask(self, flt) -> None:
        self.ats.call(Query(filter=flt), self._on_page, timeout_s=5.0)

    def _on_page(self, reply) -> None:
        if not isinstance(reply, QueryResult):
            self._reading = False
            message = reply.message if isinstance(reply, ErrorReply) else repr(reply)
            logger.debug("could not read limits and schedules from ATS ({}); asking again", message)
            self.actor.call_later(RETRY_S, self.refresh)
            return
        self._records += reply.records
        following = next_page(DIRECTIVES_FILTER, reply.cursor, len(self._records))
        if following is not None:
            self._ask(following)
            return
        self._reading = False
        directives = resolve(self._records)
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
        relevant = False
        for _ in range(1000):
            try:
                frames = self.events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                event = self._decoder.decode(frames[-1])
            except QntxError:
                continue
            if any(is_directive(r) for r in stored_notices(event)):
                relevant = True
        if relevant:
            self.refresh()

    def close(self) -> None:
        self.actor.remove_reader(self.events)
        self.events.close(0)
        self.ats.close()
