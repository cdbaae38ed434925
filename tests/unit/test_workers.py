"""The server's view of the worker pool: credit, assignment, reaping."""

from __future__ import annotations

import time

import pytest

from qntx.pulse.workers import WorkerPool

pytestmark = pytest.mark.timeout(30)


def test_credit_limits_assignments_and_reports_free_it():
    pool = WorkerPool(dead_after_s=10)
    pool.seen(b"w1", "worker-1", 1, capacity=2)
    w = pool.pick()
    pool.assign(w, "j1")
    pool.assign(w, "j2")
    assert not pool.has_free() and pool.pick() is None
    assert pool.finish("j1", reporter=b"someone-else") is None  # not its job
    assert pool.finish("j1", reporter=b"w1") is w and pool.has_free()


def test_pick_spreads_work_and_reap_removes_silent_workers():
    pool = WorkerPool(dead_after_s=0.05)
    pool.seen(b"a", "a", 1, capacity=4)
    pool.seen(b"b", "b", 2, capacity=4)
    for n in range(4):
        pool.assign(pool.pick(), f"j{n}")
    assert sorted(len(w.assigned) for w in pool.all()) == [2, 2]
    time.sleep(0.1)
    pool.touch(b"a")
    dead = pool.reap()
    assert [w.name for w in dead] == ["b"] and [w.name for w in pool.all()] == ["a"]
    assert pool.holder("j0") is None or pool.holder("j0").name == "a"


def test_jobs_a_worker_already_runs_take_slots_until_it_stops_listing_them():
    pool = WorkerPool(dead_after_s=10)
    w = pool.seen(b"w", "w", 1, capacity=2, running=["old1", "old2"])
    assert not pool.has_free()  # met after a server restart, still busy
    pool.drop_foreign(b"w", "old1")  # its (stale) report arrived
    assert w.free == 1
    pool.seen(b"w", "w", 1, capacity=2, running=[])  # heartbeat: nothing running
    assert w.free == 2
