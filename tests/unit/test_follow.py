"""The event book behind job following: what is kept, for whom, and when a job is done."""

from __future__ import annotations

import pytest

from qntx.bus.codec import encode
from qntx.follow import EventBook
from qntx.handles import decoded
from qntx.protocol import Job, JobChanged, JobProgressed

pytestmark = pytest.mark.timeout(30)


def frames(event) -> list[bytes]:
    return [b"job.x", encode(event)]


def test_watched_jobs_get_their_events_in_order_ending_with_the_final_one():
    book = EventBook()
    book.watch("a")
    book.ingest(frames(JobChanged(job=Job(id="a", handler="h", status="running"))))
    book.ingest(frames(JobProgressed(job_id="a", current=1, total=2)))
    book.ingest(frames(JobChanged(job=Job(id="b", handler="h", status="running"))))  # not watched
    events, final = book.take("a")
    assert [type(e).__name__ for e in events] == ["JobChanged", "JobProgressed"] and not final
    book.ingest(frames(JobChanged(job=Job(id="a", handler="h", status="completed", result=7))))
    events, final = book.take("a")
    assert final and decoded(events[-1].job).result == 7
    assert book.take("a") == ([JobChanged(job=events[-1].job)], True)  # final stays until unwatched
    book.unwatch("a")
    assert book.take("a") == ([], False)


def test_a_job_that_finished_before_anyone_watched_is_still_known_done():
    book = EventBook()
    book.ingest(frames(JobChanged(job=Job(id="early", handler="h", status="failed"))))
    book.watch("early")
    events, final = book.take("early")
    assert final and events[-1].job.status == "failed"


def test_garbage_events_are_ignored():
    book = EventBook()
    book.watch("a")
    book.ingest([b"lonely"])
    assert book.take("a") == ([], False)
