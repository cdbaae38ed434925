"""Retention: finished jobs leave Pulse's store in small transactions; logs rotate."""

from __future__ import annotations

import msgspec

from qntx.protocol import Job
from qntx.pulse.core import PulseCore
from qntx.pulse.events import Saved
from qntx.pulse.jobstore import JobStore
from tests.unit.test_core import CONFIG, Harness


class StoreHarness(Harness):
    """The core's harness, committing into a real JobStore (LMDB in a temp dir)."""

    def __init__(self, store: JobStore):
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


def test_prune_deletes_what_is_past_its_cutoff_in_batches_and_keeps_counts_right(tmp_path):
    store = JobStore(tmp_path / "pulse")
    h = StoreHarness(store)
    ids = finished_jobs(h, 30, fail_every=3, key=True)
    h.tick(10_000)
    newer = finished_jobs(h, 5)
    before = store.load(()).counts
    assert before["completed"] == 25 and before["failed"] == 10
    cutoff = h.wall - 5_000  # the first 30 finished before it, the last 5 after
    deleted = store.prune({"completed": cutoff, "failed": cutoff}, batch=7)
    assert sum(deleted.values()) == 7
    total = dict(deleted)
    while sum(deleted.values()) == 7:
        deleted = store.prune({"completed": cutoff, "failed": cutoff}, batch=7)
        total = {k: total[k] + deleted[k] for k in total}
    assert total == {"completed": 20, "failed": 10}
    assert all(store.get(i) is None for i in ids) and all(store.get(i) is not None for i in newer)
    assert store.find(None, "k1") is None  # its idempotency key went with it
    counts = store.load(()).counts
    assert counts["completed"] == 5 and counts["failed"] == 0
    assert [j.id for _, _, j in store.newest(None, 100)] == newer[::-1]
    store.close()


def test_prune_by_count_keeps_the_newest_completed_and_spares_live_jobs(tmp_path):
    store = JobStore(tmp_path / "pulse")
    h = StoreHarness(store)
    ids = finished_jobs(h, 20)
    deleted = store.prune({"completed": 0}, max_completed=15, keep={ids[0]})
    assert deleted == {"completed": 5}
    assert store.get(ids[0]) is not None and all(store.get(i) is None for i in ids[1:6])
    store.close()


def test_the_core_counts_what_was_pruned_out():
    core = PulseCore(CONFIG, Harness().now)
    core._counts["completed"] = 10
    core.pruned({"completed": 4, "failed": 0})
    assert core.counts()["completed"] == 6 and core.changes().counts["completed"] == 6


def test_a_retried_job_pruned_meanwhile_is_listed_again(tmp_path):
    store = JobStore(tmp_path / "pulse")
    h = StoreHarness(store)
    [job_id] = finished_jobs(h, 1, fail_every=1)
    stored = store.get(job_id)
    from qntx.pulse.events import Steer

    h(Steer("retry", job_id, "user", stored.job, stored.seq))
    store.prune({"failed": h.wall + 1})  # races the retry's commit
    h.commit()
    assert [j.id for _, _, j in store.newest(None, 10)] == [job_id]
    assert isinstance(store.get(job_id).job, Job) and msgspec.msgpack.decode(store.get(job_id).job.payload) == 0
    store.close()
