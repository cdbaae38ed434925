"""The one way actors follow a set of attestations: which notices touch the set, and
reading the whole set page after page (what Pulse's directives and the python
plugin's handlers both use)."""

from __future__ import annotations

import msgspec
import pytest

from qntx.ats.feed import Feed
from qntx.bus.codec import encode
from qntx.protocol import AttestationsStored, Filter, QueryResult, StoredNotice
from qntx.stored_handlers import HANDLER_FILTER, is_handler

pytestmark = pytest.mark.timeout(10)


def notice(predicates, contexts) -> StoredNotice:
    return StoredNotice(id="AS-X", predicates=predicates, contexts=contexts)


def body(*notices) -> bytes:
    return encode(AttestationsStored(stored=list(notices)))


def test_a_burst_touches_the_set_when_any_notice_is_of_it_and_garbage_is_skipped():
    feed = Feed(HANDLER_FILTER, is_handler)
    other = body(notice(["is"], ["acme"]))
    assert not feed.touched([other, b"\xc1 not msgpack", other])
    assert feed.touched([b"\xc1", other, body(notice(["is"], ["acme"]), notice(["Handler"], ["PYTHON"]))])
    assert not feed.touched([])


def test_the_whole_set_is_read_page_after_page_up_to_the_filters_limit():
    def record(n):
        from qntx.protocol import Attestation

        return Attestation(
            id=f"AS-{n}", subjects=[f"h{n}"], predicates=["handler"], contexts=["python"], actors=["x"],
            timestamp=n, source="t", attributes={}, created_at=n,
        )  # fmt: skip

    feed = Feed(Filter(predicates=["handler"], limit=5), is_handler)
    pages = feed.pages()
    asked = [next(pages)]
    asked.append(pages.send(QueryResult(records=[record(0), record(1)], cursor="c1")))
    asked.append(pages.send(QueryResult(records=[], cursor="c2")))  # an empty page with a cursor goes on
    with pytest.raises(StopIteration) as done:
        pages.send(QueryResult(records=[record(2), record(3), record(4)], cursor="c3"))  # the limit is reached
    assert [r.id for r in done.value.value] == [f"AS-{n}" for n in range(5)]
    assert [(q.filter.cursor, q.filter.limit) for q in asked] == [(None, 5), ("c1", 3), ("c2", 3)]
    assert all(msgspec.structs.replace(q.filter, cursor=None, limit=5) == feed.filter for q in asked)
