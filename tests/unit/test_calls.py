"""The calls of the scripting API without any bus: what each asks for, page after
page, given the replies (a driver derived like Bus and AsyncBus, over no connection)."""

from __future__ import annotations

import tempfile

import pytest

from qntx.calls import SERVER, Ask, AskEach, Enqueue, Nap
from qntx.calls.derive import with_calls
from qntx.errors import Invalid, NotFound
from qntx.protocol import (
    MAX_PAGE,
    Attestation,
    CancelJob,
    ErrorReply,
    Filter,
    Job,
    JobList,
    ListJobs,
    Query,
    QueryResult,
)
from qntx.settings import load_settings

pytestmark = pytest.mark.timeout(30)


@with_calls(asynchronous=False)
class Driver:
    """A driver whose effects are answered by ``answer``: the calls' own derived
    methods, over no connection."""

    embedded = False

    def __init__(self, answer):
        self.settings = load_settings(tempfile.mkdtemp(prefix="qntx-calls-"))
        self.answer = answer
        self.asked: list = []
        self.forgotten: list[str] = []

    def _answer(self, effect):
        self.asked.append(effect)
        return self.answer(effect)

    _effects = dict.fromkeys((Ask, AskEach, Enqueue, Nap), _answer)

    def _server_up(self) -> bool:
        return True

    def _forget_outcome(self, job_id: str) -> None:
        self.forgotten.append(job_id)

    def run(self, name: str, *args, **kwargs):
        return getattr(self, name)(*args, **kwargs)


def job(n: int, created_at: int = 0) -> Job:
    return Job(id=f"JB-{n:06d}", handler="h", status="completed", created_at=created_at)


def job_pages(total: int):
    """A server holding ``total`` jobs, newest first, answering ListJobs pages."""

    def answer(effect: Ask) -> JobList:
        message = effect.message
        assert isinstance(message, ListJobs) and 0 < message.limit <= MAX_PAGE
        start = 0 if message.cursor is None else int(message.cursor)
        end = min(total, start + message.limit)
        return JobList(jobs=[job(n) for n in range(start, end)], cursor=str(end) if end < total else None)

    return answer


def test_jobs_reads_page_after_page_up_to_its_limit() -> None:
    driver = Driver(job_pages(3_500))
    found = driver.run("jobs", limit=2_500)
    assert [j.id for j in found] == [f"JB-{n:06d}" for n in range(2_500)]
    assert [(e.message.limit, e.message.cursor) for e in driver.asked] == [(1000, None), (1000, "1000"), (500, "2000")]


def test_jobs_ends_with_the_listing() -> None:
    driver = Driver(job_pages(1_200))
    assert len(driver.run("jobs", limit=5_000)) == 1_200
    assert len(driver.asked) == 2


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_jobs_refuses_a_bad_limit_before_asking(limit) -> None:
    driver = Driver(job_pages(10))
    with pytest.raises(Invalid, match="limit"):
        driver.run("jobs", limit=limit)
    assert driver.asked == []


def test_query_filter_follows_cursors_until_the_filter_limit() -> None:
    def answer(effect: Ask) -> QueryResult:
        flt = effect.message.filter
        assert isinstance(effect.message, Query)
        start = int(flt.cursor or 0)
        end = start + min(3, flt.limit)  # pages of 3 at most
        records = [Attestation(id=f"AS-{n}", subjects=["s"], predicates=["p"], contexts=["c"], actors=[],
                               attributes={}, timestamp=n, source="t", created_at=n) for n in range(start, end)]  # fmt: skip
        return QueryResult(records=records, cursor=str(end))  # always more

    driver = Driver(answer)
    found = driver.run("query_filter", Filter(subjects=["s"], limit=7))
    assert [r.id for r in found] == [f"AS-{n}" for n in range(7)]  # 3 + 3 + 1, then no more asked
    assert [e.message.filter.limit for e in driver.asked] == [7, 4, 1]


def test_matching_jobs_stops_at_the_first_page_older_than_since() -> None:
    def answer(effect: Ask) -> JobList:
        page = int(effect.message.cursor or 0)
        # page 0: created 300..201, page 1: 200..101, page 2: 100..1 (never asked)
        jobs = [job(page * 100 + i, created_at=300 - page * 100 - i) for i in range(100)]
        return JobList(jobs=jobs, cursor=str(page + 1))

    driver = Driver(answer)
    ids = driver.run("matching_jobs", since=150)
    assert len(ids) == 151 and len(driver.asked) == 2


def test_steering_many_pipelines_once_each_and_keeps_refusals_as_skips() -> None:
    def answer(effect: AskEach) -> list:
        assert isinstance(effect, AskEach) and effect.to == SERVER
        assert all(isinstance(m, CancelJob) and m.brief for m in effect.messages)
        return [ErrorReply(code="conflict", message="final") if m.id == "b" else object() for m in effect.messages]

    driver = Driver(answer)
    steered = driver.run("cancel_many", ["a", "b", "a", "c"])
    assert steered.done == ["a", "c"] and steered.skipped == {"b": "final"}
    assert driver.forgotten == ["a", "b", "c"]


def test_chain_submits_each_step_after_the_one_before() -> None:
    class Handle:
        def __init__(self, job_id: str):
            self.id = job_id

    driver = Driver(lambda effect: Handle(effect.job_id))
    handles = driver.run("chain", ("builtin.echo", 1), {"handler": "builtin.echo", "payload": 2, "id": "JB-SECOND"})
    first, second = (e.message for e in driver.asked if isinstance(e, Enqueue))
    assert second.id == "JB-SECOND" and second.after == [first.id] and second.parent_id == first.id
    assert [h.id for h in handles] == [first.id, "JB-SECOND"]


def test_an_error_reply_is_raised_inside_the_call_where_it_asked() -> None:
    def answer(effect: Ask):
        raise NotFound("no schedule")

    with pytest.raises(NotFound):
        Driver(answer).run("job", "JB-NONE")
