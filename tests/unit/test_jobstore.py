"""Pulse's job store interface, the same cases on LMDB and on PostgreSQL: what a
restart loads, big payloads and results kept apart, idempotency keys (one at a time
and many at once), listings
newest first with cursors, skips and cached jobs, and a read-only store."""

from __future__ import annotations

import msgspec
import pytest

from qntx.errors import Invalid, Unavailable
from qntx.protocol import Job
from qntx.pulse.commands import Changes
from qntx.pulse.jobstore import INLINE_PAYLOAD_BYTES, INLINE_RESULT_BYTES, JobStore
from tests.pg import job_store, pg_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(job_store):  # noqa: F811
    """An empty job store, once on LMDB and once on PostgreSQL."""
    return job_store


def raw(value) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(value))


def job(n: int, status: str = "queued", **fields) -> Job:
    fields = {"payload": raw(n), **fields}
    return Job(id=f"JB-{n:04d}", handler="builtin.echo", status=status, created_at=1_000 + n // 2, **fields)


def changes(rows, **fields) -> Changes:
    counts: dict[str, int] = {}
    for _, j, _ in rows:
        counts[j.status] = counts.get(j.status, 0) + 1
    return Changes(rows=rows, next_seq=len(rows) + 1, counts=counts, lease_ceiling=64, **fields)


def reopen(store):
    """The same store, opened again (what a restarted server finds)."""
    store.close()
    if isinstance(store, JobStore):
        return JobStore(store.location)
    from qntx.pulse.jobstore_pg import PgJobStore

    return PgJobStore(store.url)


def test_a_restart_loads_the_live_jobs_counters_and_meta_as_saved(store):
    rows = [(n, job(n, "completed" if n % 3 == 0 else "queued"), None) for n in range(10)]
    store.save(changes(rows, plugins=["python"], schedules={"nightly": [5, [[6, "JB-0001"]]]},
                       limits={"python.x": [2, 0, 0, []]}, handler_versions={"python.x": "AS-V1"}))  # fmt: skip
    store = reopen(store)
    try:
        loaded = store.load(("queued",))
        assert loaded.next_seq == 11 and loaded.lease_ceiling == 64
        assert loaded.counts["queued"] == 6 and loaded.counts["completed"] == 4 and loaded.counts["failed"] == 0
        assert [s.job.id for s in loaded.jobs] == [f"JB-{n:04d}" for n in range(10) if n % 3]
        assert [s.seq for s in loaded.jobs] == [n for n in range(10) if n % 3]
        assert msgspec.msgpack.decode(loaded.jobs[0].job.payload) == 1
        assert loaded.plugins == ["python"] and loaded.schedules == {"nightly": [5, [[6, "JB-0001"]]]}
        assert loaded.limits == {"python.x": [2, 0, 0, []]} and loaded.handler_versions == {"python.x": "AS-V1"}
        # A commit that leaves schedules, limits and versions out keeps them.
        store.save(changes([(10, job(10), None)], plugins=["python"]))
        again = store.load(())
        assert again.schedules and again.limits and again.handler_versions == {"python.x": "AS-V1"}
    finally:
        store.close()


def test_state_changes_move_a_job_between_status_indexes(store):
    first = job(1)
    store.save(changes([(1, first, None)]))
    running = msgspec.structs.replace(first, status="running", attempts=1, started_at=2_000)
    store.save(changes([(1, running, "queued")]))
    assert store.load(("queued",)).jobs == [] and [s.job.id for s in store.load(("running",)).jobs] == [first.id]
    assert store.statuses([first.id, "JB-none", "", 7]) == {first.id: "running"}
    done = msgspec.structs.replace(running, status="completed", finished_at=3_000, result=raw("ok"))
    store.save(changes([(1, done, "running")]))
    assert [j.id for _, _, j in store.newest("completed", 5)] == [first.id]
    assert store.newest("running", 5) == [] and store.newest("queued", 5) == []
    assert msgspec.msgpack.decode(store.get(first.id).job.result) == "ok"


def test_big_payloads_and_results_are_kept_apart_and_read_back(store):
    payload = raw("p" * (INLINE_PAYLOAD_BYTES + 10))
    big = job(1, payload=payload)
    store.save(changes([(1, big, None)]))
    assert bytes(store.get(big.id).job.payload) == bytes(payload)
    assert bytes(store.load(("queued",)).jobs[0].job.payload) == bytes(payload)
    assert store.newest(None, 5)[0][2].payload == msgspec.Raw(msgspec.msgpack.encode(None))  # listings leave it out
    result = raw("r" * (INLINE_RESULT_BYTES + 10))
    done = msgspec.structs.replace(big, status="completed", finished_at=5_000, result=result)
    store.save(changes([(1, done, "queued")]))  # the payload is not written again, and stays
    stored = store.get(big.id)
    assert stored.apart and bytes(stored.job.result) == bytes(result) and bytes(stored.job.payload) == bytes(payload)
    again = msgspec.structs.replace(done, status="queued", result=raw(None), finished_at=None)
    store.save(changes([(1, again, "completed")]))  # a retry: the small record says "not apart"
    stored = store.get(big.id)
    assert not stored.apart and msgspec.msgpack.decode(stored.job.result) is None


def test_idempotency_keys_find_their_job(store):
    keyed = job(1, idempotency_key="order-17")
    store.save(changes([(1, keyed, None)]))
    assert store.find(None, "order-17").job.id == keyed.id
    assert store.find("JB-nope", "order-17").job.id == keyed.id
    assert store.find(keyed.id, None).job.id == keyed.id
    assert store.find(None, "order-18") is None and store.find(None, "") is None and store.find(None, None) is None
    with pytest.raises(Invalid):
        store.get("   ")
    with pytest.raises(Invalid):
        store.get(42)


def test_many_lookups_at_once_answer_each_as_find_would(store):
    keyed, plain = job(1, idempotency_key="order-17"), job(2)
    store.save(changes([(1, keyed, None), (2, plain, None)]))
    wanted = [
        (plain.id, None), ("JB-nope", None), (None, "order-17"), ("JB-nope", "order-17"), (plain.id, "order-17"),
        (None, None), ("   ", ""), (plain.id, None),
    ]  # fmt: skip
    found = store.find_many(wanted)
    assert [f.job.id if f else None for f in found] == [plain.id, None, keyed.id, keyed.id, plain.id, None, None, plain.id]
    assert [f.job.id if f else None for f in found] == [
        f.job.id if (f := store.find(job_id, key)) else None for job_id, key in wanted
    ]
    assert msgspec.msgpack.decode(found[0].job.payload) == 2 and store.find_many([]) == []


def test_newest_pages_by_cursor_and_passes_over_skipped_jobs(store):
    jobs = [job(n) for n in range(30)]
    store.save(changes([(n, j, None) for n, j in enumerate(jobs)]))
    newest = store.newest(None, 10)
    assert [j.id for _, _, j in newest] == [j.id for j in jobs[::-1][:10]]
    assert [(c, s) for c, s, _ in newest] == [(j.created_at, n) for n, j in list(enumerate(jobs))[::-1][:10]]
    created, seq, _ = newest[-1]
    page = store.newest("queued", 10, before=(created, seq))
    assert [j.id for _, _, j in page] == [j.id for j in jobs[::-1][10:20]]
    skipped = {jobs[29].id, jobs[27].id}
    cached = {jobs[28].id: msgspec.structs.replace(jobs[28], status="running")}
    found = store.newest(None, 3, skip=skipped, cached=cached)
    assert [j.id for _, _, j in found] == [jobs[28].id, jobs[26].id, jobs[25].id]
    assert found[0][2].status == "running"  # taken from the cache, not the store
    assert store.newest(None, 100, before=(0, 0)) == []
    assert len(store.newest(None, 100, before=(2**64 - 1, 2**64 - 1))) == 30  # any cursor a client may send


def test_dependents_are_listed_in_id_order(store):
    parent = job(1)
    children = [job(n, "waiting", after=[parent.id]) for n in (9, 3, 5)]
    store.save(changes([(1, parent, None), *[(n + 2, c, None) for n, c in enumerate(children)]]))
    assert store.dependents(parent.id) == sorted(c.id for c in children)
    assert store.dependents(parent.id, limit=1) == [min(c.id for c in children)]
    assert store.dependents("") == [] and store.dependents(None) == []


def test_a_read_only_store_reads_and_refuses_writes(store):
    store.save(changes([(1, job(1), None)]))
    if isinstance(store, JobStore):
        store.close()
        reader = JobStore(store.location, readonly=True)
    else:
        from qntx.pulse.jobstore_pg import PgJobStore

        reader = PgJobStore(store.url, readonly=True)
    try:
        assert reader.get("JB-0001").job.status == "queued"
        with pytest.raises(Exception) as refused:
            reader.save(changes([(2, job(2), None)]))
        if not isinstance(reader, JobStore):
            assert isinstance(refused.value, Unavailable) and "read-only" in str(refused.value)
        assert reader.get("JB-0002") is None
    finally:
        reader.close()
