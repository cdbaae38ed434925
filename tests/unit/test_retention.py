"""Retention: finished jobs leave Pulse's store in small transactions; logs rotate.

The store's cases run on both backends (LMDB in a temp dir, and a fresh migrated
PostgreSQL database from tests/pg.py): the same cases, the same answers.
"""

from __future__ import annotations

import msgspec
import pytest

from qntx.errors import Invalid
from qntx.protocol import Job
from qntx.pulse.core import PulseCore
from qntx.pulse.events import Saved
from qntx.pulse.jobstore import JobStore, PulseStore
from tests.pg import job_store, pg_server  # noqa: F401  (fixtures)
from tests.unit.test_core import CONFIG, Harness


@pytest.fixture
def store(job_store):  # noqa: F811
    """An empty job store, once on LMDB and once on PostgreSQL."""
    return job_store

pytestmark = pytest.mark.timeout(60)


class StoreHarness(Harness):
    """The core's harness, committing into a real JobStore (LMDB in a temp dir)."""

    def __init__(self, store: PulseStore):
        self.store = store
        super().__init__()

    def commit(self) -> list:
        changes = self.core.changes()
        if changes is None:
            return []
        self.store.save(changes)
        return self(Saved(changes.versions, changes.lease_ceiling))


def finished_jobs(h: StoreHarness, count: int, *, fail_every: int = 0, key: bool = False) -> list[str]:
    ids = [h.submit(payload=n, max_attempts=1, **({"idempotency_key": f"k{n}"} if key else {})).id for n in range(count)]
    h.hello(credit=count)
    for n, dispatch in enumerate(h.dispatched(h.turn())):
        h.done(dispatch, success=not (fail_every and n % fail_every == 0), result=n)
    h.commit()
    return ids


def test_prune_deletes_what_is_past_its_cutoff_in_batches_and_keeps_counts_right(store):
    h = StoreHarness(store)
    ids = finished_jobs(h, 30, fail_every=3, key=True)
    h.tick(10_000)
    newer = finished_jobs(h, 5)
    before = store.load(()).counts
    assert before["completed"] == 25 and before["failed"] == 10
    cutoff = h.wall - 5_000  # the first 30 finished before it, the last 5 after
    deleted = store.prune({"completed": cutoff, "failed": cutoff}, batch=7)
    assert sum(map(len, deleted.values())) == 7
    total = {k: len(v) for k, v in deleted.items()}
    while sum(map(len, deleted.values())) == 7:
        deleted = store.prune({"completed": cutoff, "failed": cutoff}, batch=7)
        total = {k: total[k] + len(deleted[k]) for k in total}
    assert total == {"completed": 20, "failed": 10}
    assert all(store.get(i) is None for i in ids) and all(store.get(i) is not None for i in newer)
    assert store.find(None, "k1") is None and _stored_keys(store) == 0  # the keys went with their jobs
    counts = store.load(()).counts
    assert counts["completed"] == 5 and counts["failed"] == 0
    assert [j.id for _, _, j in store.newest(None, 100)] == newer[::-1]


def test_prune_by_count_keeps_the_newest_completed_and_spares_live_jobs(store):
    h = StoreHarness(store)
    ids = finished_jobs(h, 20)
    deleted = store.prune({"completed": 0}, max_completed=15, keep={ids[0]})
    assert deleted == {"completed": ids[1:6]}
    assert store.get(ids[0]) is not None and all(store.get(i) is None for i in ids[1:6])


def test_the_core_counts_what_was_pruned_out():
    core = PulseCore(CONFIG, Harness().now)
    core.ledger.restore_counts({"completed": 10}, next_seq=0)
    core.pruned({"completed": ["JB-A", "JB-B", "JB-C", "JB-D"], "failed": []})
    assert core.counts()["completed"] == 6 and core.changes().counts["completed"] == 6


def test_a_retried_job_pruned_meanwhile_is_listed_again(store):
    h = StoreHarness(store)
    [job_id] = finished_jobs(h, 1, fail_every=1)
    stored = store.get(job_id)
    from qntx.pulse.events import Steer

    h(Steer("retry", job_id, "user", stored.job, stored.seq))
    store.prune({"failed": h.wall + 1})  # races the retry's commit
    h.commit()
    assert [j.id for _, _, j in store.newest(None, 10)] == [job_id]
    assert isinstance(store.get(job_id).job, Job) and msgspec.msgpack.decode(store.get(job_id).job.payload) == 0


def test_a_prune_and_a_retry_of_the_same_failed_job_count_it_out_once(store):
    """The retry counts the job out of ``failed``; the prune batch that deleted it
    meanwhile must not count it out again (the count went to -1 and every commit
    after failed)."""
    h = StoreHarness(store)
    [job_id] = finished_jobs(h, 1, fail_every=1)
    assert h.core.counts()["failed"] == 1
    stored = store.get(job_id)
    from qntx.pulse.events import Steer

    h.core.prune_started()  # the batch is on the writer thread ...
    h(Steer("retry", job_id, "user", stored.job, stored.seq))  # ... as the retry reads the job
    deleted = store.prune({"failed": h.wall + 1})  # the batch did not see it live
    assert deleted == {"failed": [job_id]}
    h.core.pruned(deleted)
    counts = h.core.counts()
    assert counts["failed"] == 0 and counts["queued"] == 1
    h.commit()  # (with -1 it raised struct.error here, and at every commit after)
    assert store.load(()).counts["failed"] == 0 and store.get(job_id).job.status == "queued"


def test_a_retried_job_that_ran_and_left_memory_during_the_prune_is_counted_once(store):
    h = StoreHarness(store)
    [job_id] = finished_jobs(h, 1, fail_every=1)
    stored = store.get(job_id)
    from qntx.pulse.events import Steer

    h.core.prune_started()
    h(Steer("retry", job_id, "user", stored.job, stored.seq))
    deleted = store.prune({"failed": h.wall + 1})
    h.hello(b"w", credit=1)
    [run] = h.dispatched(h.turn())
    h.done(run, result="ok")
    h.commit()
    assert job_id not in h.core.jobs  # final and saved: out of memory before the batch is counted
    h.core.pruned(deleted)
    counts = h.core.counts()
    assert counts["failed"] == 0 and counts["completed"] == 1
    h.commit()


def test_the_store_knows_what_runs_after_a_job_and_prunes_it_with_the_job(store):
    h = StoreHarness(store)
    [first] = finished_jobs(h, 1)
    from qntx.protocol import Submit
    from qntx.pulse.commands import Reply
    from qntx.pulse.events import Submitted

    after = []
    for n in range(3):  # (as the server does: how the job it runs after ended, read from the store)
        spec = Submit(handler="builtin.echo", payload=msgspec.Raw(msgspec.msgpack.encode(n)), after=[first])
        [reply] = [c for c in h(Submitted(spec, "client", ended={first: "completed"})) if isinstance(c, Reply)]
        after.append(reply.message.job.id)
    h.commit()
    assert store.dependents(first) == sorted(after)
    assert store.dependents(after[0]) == [] and store.dependents(first, limit=2) == sorted(after)[:2]
    h.hello(b"w", credit=5)
    for run in h.dispatched(h.turn()):
        h.done(run, result="ok")
    h.commit()
    deleted = store.prune({"completed": h.wall + 1})
    assert sorted(deleted["completed"]) == sorted([first, *after])
    assert store.dependents(first) == []  # the index went with the jobs
    with pytest.raises(Invalid):
        store.get("")


def _stored_keys(store: PulseStore) -> int:
    """How many idempotency keys the backend holds."""
    if isinstance(store, JobStore):
        return store._env.read(lambda txn: txn.stat(store._db["keys"])["entries"])
    return store._read(lambda conn: conn.execute("SELECT count(*) FROM pulse_keys").fetchone()[0])


def _stored_bytes(store: PulseStore, job_id: str) -> tuple[bytes | None, bytes | None]:
    """The job's record and its result kept apart, as the backend holds them."""
    if isinstance(store, JobStore):
        record = store._env.read(lambda txn: txn.get(job_id.encode(), db=store._db["jobs"]))
        return record, store._env.read(lambda txn: txn.get(job_id.encode(), db=store._db["results"]))
    row = store._read(
        lambda conn: conn.execute("SELECT record, result FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()
    )
    return (None, None) if row is None else row


def test_a_big_result_is_kept_apart_read_back_everywhere_and_pruned_with_its_job(store):
    from qntx.pulse.jobstore import INLINE_RESULT_BYTES

    h = StoreHarness(store)
    big = "r" * (INLINE_RESULT_BYTES + 1)
    job_id = h.submit(payload=1, max_attempts=1).id
    h.hello(credit=1)
    (dispatch,) = h.dispatched(h.turn())
    h.done(dispatch, result=big)
    h.commit()
    record, apart = _stored_bytes(store, job_id)
    assert len(record) < 1024 and msgspec.msgpack.decode(apart) == big  # the record stays small: the result went apart, as it came
    assert msgspec.msgpack.decode(store.get(job_id).job.result) == big
    assert msgspec.msgpack.decode(store.load(("completed",)).jobs[0].job.result) == big
    assert msgspec.msgpack.decode(store.newest("completed", 10)[0][2].result) == big
    h.tick(10_000)
    assert sum(map(len, store.prune({"completed": h.wall}).values())) == 1
    assert _stored_bytes(store, job_id) == (None, None)
