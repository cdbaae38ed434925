"""Notices on the events sockets: each within NOTICE_MAX_BYTES (in pieces or as ids
when too big), numbered per topic family, and what a subscriber lost seen as gaps."""

from __future__ import annotations

import itertools

import pytest
from loguru import logger

from qntx.ats.feed import Feed
from qntx.bus.codec import Decoder, encode
from qntx.bus.gaps import Gaps
from qntx.protocol import AttestationsStored, Event, HandlersRegistered, JobNotice, StoredNotice
from qntx.protocol.events import NOTICE_MAX_BYTES, fitted
from qntx.stored_handlers import HANDLER_FILTER, is_handler

pytestmark = pytest.mark.timeout(10)


def numbers(start: int = 1):
    counter = itertools.count(start)
    return lambda: next(counter)


def test_a_notice_that_fits_goes_whole_and_numbered():
    event = JobNotice(id="JB-1", handler="python.hello", status="queued")
    messages, whole = fitted(b"job.JB-1", event, encode, numbers(7))
    assert whole and len(messages) == 1
    topic, body = messages[0]
    assert topic == b"job.JB-1" and Decoder(Event).decode(body) == JobNotice(
        id="JB-1", handler="python.hello", status="queued", seq=7
    )


def test_a_big_group_of_attestations_goes_in_numbered_pieces_each_within_the_cap():
    stored = [StoredNotice(id=f"AS-{n:04d}", predicates=["p" * 40, "q"], contexts=["c" * 30], seq=n) for n in range(500)]
    messages, whole = fitted(b"att.", AttestationsStored(stored=stored), encode, numbers())
    assert not whole and len(messages) > 1
    assert all(len(topic) + len(body) <= NOTICE_MAX_BYTES for topic, body in messages)
    pieces = [Decoder(Event).decode(body) for _, body in messages]
    assert [piece.seq for piece in pieces] == list(range(1, len(pieces) + 1))
    assert [n for piece in pieces for n in piece.stored] == stored  # every notice, in order, whole


def test_what_is_too_big_alone_goes_as_its_ids():
    huge = StoredNotice(id="AS-BIG", predicates=["p" * 100] * 40, contexts=["python"])
    small = StoredNotice(id="AS-SMALL", predicates=["handler"], contexts=["python"])
    messages, whole = fitted(b"att.", AttestationsStored(stored=[huge, small]), encode, numbers())
    assert not whole
    stored = [n for _, body in messages for n in Decoder(Event).decode(body).stored]
    assert stored == [StoredNotice(id="AS-BIG", predicates=[], contexts=[], partial=True), small]

    job = JobNotice(id="JB-2", handler="h" * 3000, status="running", lease=9, worker="w")
    (message,), whole = fitted(b"job.JB-2", job, encode, numbers(3))
    assert not whole and len(message[0]) + len(message[1]) <= NOTICE_MAX_BYTES
    assert Decoder(Event).decode(message[1]) == JobNotice(id="JB-2", handler="", status="running", lease=9, seq=3, partial=True)

    names = HandlersRegistered(plugin="python", handler_names=[f"python.h{n}" for n in range(500)])
    (message,), whole = fitted(b"handlers", names, encode, numbers())
    assert not whole and Decoder(Event).decode(message[1]) == HandlersRegistered(
        plugin="python", handler_names=[], seq=1, partial=True
    )


def test_gaps_count_what_was_lost_and_log_once_per_burst():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        gaps = Gaps("a reader")
        assert not gaps.saw("job.", 5)  # the first seen: nothing to tell
        assert not gaps.saw("job.", 6)
        assert gaps.saw("job.", 10)  # 7, 8, 9 lost
        assert gaps.saw("job.", 12)  # 11 lost, in the same burst: not logged again
        assert not gaps.saw("att.", 1) and not gaps.saw("att.", 2)
        assert gaps.saw("att.", 3) is False
        assert gaps.saw("att.", 2)  # the actor started anew: 1 lost
        assert not gaps.saw("att.", 0)  # an older actor: not numbered
        assert gaps.missed == {"job.": 4, "att.": 1} and gaps.total == 5
    finally:
        logger.remove(sink)
    assert len(lines) == 1 and "a reader missed 3 job. notice(s)" in lines[0]


def test_a_gap_or_a_partial_notice_touches_a_feed_and_every_notice_is_counted():
    feed = Feed(HANDLER_FILTER, is_handler, "test")
    other = StoredNotice(id="AS-X", predicates=["is"], contexts=["acme"])

    def body(seq, *notices):
        return encode(AttestationsStored(stored=list(notices), seq=seq))

    assert not feed.touched([body(1, other), body(2, other)])
    assert feed.touched([body(4, other), body(5, other)])  # 3 was lost
    assert not feed.touched([body(6, other)])
    assert feed.touched([body(7, StoredNotice(id="AS-Y", predicates=[], contexts=[], partial=True))])
    assert feed.touched([body(8, other), body(12, other), body(13, other)])
    assert feed.gaps.missed == {"att.": 4}
