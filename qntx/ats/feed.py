"""Following a set of attestations in ATS live, written once for every actor that does.

Pulse follows its directives (limits and schedules: ``qntx.pulse.directive_feed``,
on the poll loop) and the python plugin its handlers (``plugins.python.plugin``, on
asyncio). Both do the same three things, and only wait differently:

* subscribe to the ``att.`` notices of the ATS events socket (``subscribe``);
* tell whether the notices that arrived touch the set (``Feed.touched``): one of the
  set, one too big to say (``partial``), or a gap in their numbers (notices lost to
  a slow read or a restart: ``qntx.bus.gaps``, counted in ``Feed.gaps``);
* read the whole set, page after page (``Feed.pages``: a generator that yields each
  query and is sent each reply), at start, when touched, and every so often as a
  safety net for notices a restart dropped.

No I/O happens here beyond making the socket.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any

import zmq

from qntx.ats.filters import next_page
from qntx.bus.codec import Decoder
from qntx.bus.gaps import Gaps
from qntx.errors import QntxError
from qntx.protocol import (
    Attestation,
    Event,
    Filter,
    Query,
    QueryResult,
    StoredNotice,
    stored_notices,
)
from qntx.settings import Settings

# Notices an actor reads in one pass before it looks at them: a flood of them holds
# neither its loop nor its memory (the rest are read on the next pass).
NOTICE_BURST = 1000


def subscribe(context: Any, settings: Settings, endpoint: str) -> Any:
    """A SUB socket (of ``context``: blocking or asyncio) on the ATS's notices."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"att.")
    settings.security.connect(sub, endpoint)
    return sub


class Feed:
    """One set of attestations (``filter``) and which stored notices belong to it."""

    def __init__(self, filter: Filter, member: Callable[[StoredNotice], bool], who: str = "a feed"):
        self.filter = filter
        self._member = member
        self._decoder = Decoder(Event)
        self.gaps = Gaps(who)

    def touched(self, bodies: Iterable[bytes]) -> bool:
        """Whether these notices (message bodies, in the order read) may have changed
        the set: one is of it or too big to say, or some were lost before one of them.
        A body that cannot be read is skipped."""
        touched = False
        for body in bodies:
            try:
                event = self._decoder.decode(body)
            except QntxError:
                continue
            if self.gaps.saw_event(event):
                touched = True
            elif not touched:
                touched = any(notice.partial or self._member(notice) for notice in stored_notices(event))
        return touched

    def pages(self) -> Generator[Query, QueryResult, list[Attestation]]:
        """Every record of the set: yields each page's query, is sent its reply,
        returns the records once the last page is in."""
        records: list[Attestation] = []
        current: Filter | None = self.filter
        while current is not None:
            page = yield Query(filter=current)
            records += page.records
            current = next_page(self.filter, page.cursor, len(records))
        return records
