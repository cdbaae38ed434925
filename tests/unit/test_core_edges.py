"""Pulse's core at the edges: an idle loop that must sleep, schedules with bad
values, long downtimes and clock steps, pruned dependencies, pinned versions
across restarts."""
from __future__ import annotations

import dataclasses

import pytest

from qntx.pulse.directives import Limit, Schedule
from qntx.pulse.events import DirectivesSet, HandlersAnnounced
from tests.unit.test_core import Harness


def run_all(h, credit: int = 10) -> list:
    h.hello(credit=credit)
    h.hello(b"p1", credit=credit, plugin="python")  # a plugin's jobs go to its own sessions
    return h.dispatched(h.turn())


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_a_due_delayed_job_with_every_worker_busy_does_not_spin_the_loop(h):
    """A delayed (or backing-off) job that fell due while no worker slot is free:
    the turn cannot dispatch it, so the next wakeup must not be 'now' again."""
    h.hello(credit=1)
    h.submit(handler="builtin.sleep")          # takes the only slot
    assert len(h.dispatched(h.turn())) == 1
    h.submit(run_at=h.wall + 1_000)            # delayed
    h.tick(1_500)                              # due now, but no free slot
    h.hello(credit=1, leases=[1])
    assert h.dispatched(h.turn()) == []
    wake = h.core.next_wakeup(h.now)
    assert wake > h.mono, f"wakeup {wake - h.mono} ms from now: the loop spins with a 1 ms timer"


def test_an_expired_rate_window_with_nothing_queued_does_not_spin_the_loop(h):
    h(DirectivesSet(limits={"builtin.echo": Limit(rate=2, per_ms=1_000)}, schedules={}))
    h.hello(credit=10)
    h.submit(), h.submit()
    assert len(h.dispatched(h.turn())) == 2   # the rate is used up; the queue is empty
    h.tick(5_000)
    h.hello(credit=10)
    h.turn()
    wake = h.core.next_wakeup(h.now)
    assert wake is None or wake > h.mono, (
        f"wakeup {wake - h.mono} ms from now: a rate window that ended long ago keeps the loop waking every 1 ms")


@pytest.mark.parametrize("timeout_s", [float("nan"), float("inf"), -5.0, 0])
def test_a_schedule_with_an_unusable_timeout_is_refused(h, timeout_s):
    from qntx.errors import Invalid
    from qntx.pulse.directives import parse_schedule

    with pytest.raises(Invalid):
        parse_schedule("tick", {"handler": "builtin.echo", "every_ms": 1_000, "timeout_s": timeout_s}, h.wall)


def test_a_firing_with_an_infinite_timeout_does_not_break_the_turn(h):
    schedule = Schedule(name="tick", handler="builtin.echo", every_ms=1_000, anchor=h.wall, timeout_s=float("inf"))
    h(DirectivesSet(limits={}, schedules={"tick": schedule}))
    h.hello(credit=4)
    h.tick(1_000)
    h.turn()  # OverflowError from lease_ms() in _dispatch, after the job left the ready heap: stuck 'queued'


def every(name: str, ms: int, anchor: int, **fields) -> Schedule:
    return Schedule(name=name, handler="builtin.echo", every_ms=ms, anchor=anchor, **fields)


def test_missed_once_runs_one_firing_even_after_more_than_10000_missed(h):
    s = every("tick", 100, h.wall)
    h(DirectivesSet(limits={}, schedules={"tick": s}))
    h.commit()
    down = 30 * 60_000  # 30 minutes down: 18,000 missed firings
    h2 = Harness(h.disk, wall=h.wall + down + 50, mono=h.mono + down + 50)
    h2(DirectivesSet(limits={}, schedules={"tick": s}))
    h2.hello(credit=100)
    fired = []
    for _ in range(3):  # three turns within 30 ms: at most one firing is due
        fired += [d.job.id for d in h2.dispatched(h2.turn())]
        h2.tick(10)
    assert len(fired) == 1, f"'run once' ran {len(fired)} missed firings"


def test_a_waiting_job_survives_a_restart_after_its_completed_dependency_was_pruned(h):
    done = h.submit(payload="a")
    slow = h.submit(handler="builtin.sleep", payload=30)
    h.hello(credit=1)
    [d] = h.dispatched(h.turn())
    assert d.job.id == done.id
    h.done(d)
    dependent = h.submit(after=[done.id, slow.id])  # `done` already satisfied; waits for `slow`
    assert dependent.status == "waiting"
    h.commit()
    del h.disk.jobs[done.id]  # retention (JobStore.prune, keep=core.jobs) deletes the finished job
    h2 = Harness(h.disk, wall=h.wall + 100, mono=h.mono + 100)
    record = h2.job(dependent.id)
    assert record.status == "waiting", f"{record.status}: {record.error and record.error.message}"


def test_a_schedule_resumed_while_the_bus_was_down_does_not_run_what_fell_due_while_paused(h):
    """`qntx schedule resume` works with the bus down (embedded store); the next `up`
    sees the schedule active with no memory of the pause and runs a 'missed' firing."""
    s = every("tick", 60_000, h.wall)
    h(DirectivesSet(limits={}, schedules={"tick": s}))
    h.hello(credit=4)
    h.tick(60_000)
    assert len(h.dispatched(h.turn())) == 1
    h(DirectivesSet(limits={}, schedules={"tick": dataclasses.replace(s, paused=True)}))
    h.commit()
    # Down for an hour while paused; resumed while down; then `qntx up`.
    h2 = Harness(h.disk, wall=h.wall + 3_600_000, mono=h.mono + 3_600_000)
    h2(DirectivesSet(limits={}, schedules={"tick": s}))
    h2.hello(credit=4)
    fired = h2.dispatched(h2.turn())
    assert fired == [], "a firing for a time the schedule was paused ran at start"


def test_a_transient_forward_clock_step_does_not_stop_a_schedule_for_the_size_of_the_step(h):
    s = every("tick", 60_000, h.wall)
    h(DirectivesSet(limits={}, schedules={"tick": s}))
    h.hello(credit=100)
    day = 86_400_000
    h.wall += day                      # the wall clock jumps a day ahead (the VM resumed with a bad RTC) ...
    h.mono += 10
    h.dispatched(h.turn())             # ... a 'missed' firing for the future is enqueued
    h.wall -= day                      # NTP puts it right a moment later
    fired = []
    for _ in range(10):                # the next ten minutes
        h.tick(60_000)
        h.hello(credit=100)
        fired += h.dispatched(h.turn())
    assert len(fired) >= 9, f"{len(fired)} firings in the 10 minutes after the clock was corrected"


def test_a_job_submitted_after_a_server_restart_before_the_plugin_registers_is_still_pinned(h):
    from qntx.pulse.events import PluginUp

    h(PluginUp("python", ("python.work",), (("python.work", "AS-1"),)))
    h.commit()
    h2 = Harness(h.disk, wall=h.wall + 100, mono=h.mono + 100)  # the server restarted; the plugin is not back yet
    job = h2.submit(handler="python.work")  # accepted: its plugin is known, just down
    h2(PluginUp("python", ("python.work",), (("python.work", "AS-1"),)))  # back, unchanged
    h2(HandlersAnnounced("python", ("python.work",), (("python.work", "AS-2"),)))  # updated before the job ran
    [sent] = run_all(h2)
    assert sent.job.id == job.id
    assert sent.job.version == "AS-1", f"version {sent.job.version!r}: the plugin runs AS-2, code newer than the job"
