"""Pulse's core: delayed jobs, dependencies, limits, pinned versions and schedules."""

from __future__ import annotations

import dataclasses

import pytest

from qntx.errors import Invalid, NotFound
from qntx.protocol import Submit
from qntx.pulse.commands import Reply
from qntx.pulse.directives import Limit, Schedule, firing_id
from qntx.pulse.events import DirectivesSet, HandlersAnnounced, PluginUp, Steer, Submitted
from tests.unit.test_core import CONFIG, Harness


@pytest.fixture
def h() -> Harness:
    return Harness()


def run_all(h: Harness, credit: int = 10) -> list:
    h.hello(credit=credit)
    h.hello(b"p1", credit=credit, plugin="python")  # a plugin's jobs go to its own sessions
    return h.dispatched(h.turn())


# ----------------------------------------------------------------- delayed jobs


def test_a_delayed_job_waits_for_its_time_and_the_wakeup_names_it(h):
    job = h.submit(run_at=h.wall + 5_000)
    assert job.status == "queued" and job.run_after == h.wall + 5_000
    assert run_all(h) == []
    assert h.core.next_wakeup(h.now) <= h.mono + 5_000
    h.tick(4_999)
    assert h.dispatched(h.turn()) == []
    h.tick(1)
    assert [d.job.id for d in h.dispatched(h.turn())] == [job.id]


def test_a_delayed_job_survives_a_restart(h):
    job = h.submit(run_at=h.wall + 5_000)
    h.commit()
    h2 = Harness(h.disk, wall=h.wall + 100, mono=h.mono + 100)
    assert run_all(h2) == []
    h2.tick(5_000)
    assert [d.job.id for d in h2.dispatched(h2.turn())] == [job.id]


def test_a_bad_run_at_is_invalid(h):
    for bad in (-1, "soon", 1.5):
        with pytest.raises(Invalid):
            h.submit(run_at=bad)


# ----------------------------------------------------------------- dependencies


def test_a_chain_runs_in_order(h):
    first = h.submit(payload=1)
    second = h.submit(payload=2, after=[first.id])
    third = h.submit(payload=3, after=[second.id])
    assert (second.status, third.status) == ("waiting", "waiting")
    [d1] = run_all(h)
    assert d1.job.id == first.id
    h.done(d1)
    [d2] = h.dispatched(h.turn())
    assert d2.job.id == second.id and h.job(third.id).status == "waiting"
    h.done(d2)
    [d3] = h.dispatched(h.turn())
    assert d3.job.id == third.id


def test_a_failed_dependency_fails_its_dependents_down_the_chain(h):
    first = h.submit(max_attempts=1)
    chain = [first]
    for _ in range(3):
        chain.append(h.submit(after=[chain[-1].id]))
    anyway = h.submit(after=[first.id], after_policy="always")
    [d1] = run_all(h)
    h.done(d1, success=False)
    for job in chain[1:]:
        record = h.job(job.id)
        assert record.status == "failed" and "which it runs after, failed" in record.error.message
    assert h.job(anyway.id).status == "queued"  # "always": it runs once the other ended
    assert [d.job.id for d in h.dispatched(h.turn())] == [anyway.id]
    assert h.core.counts()["waiting"] == 0


def test_a_cancelled_dependency_fails_its_dependent_and_a_cancelled_dependent_stops_waiting(h):
    first, other = h.submit(), h.submit()
    dependent = h.submit(after=[first.id, other.id])
    h(Steer("cancel", first.id, "user"))
    assert h.job(dependent.id).status == "failed"
    waiting = h.submit(after=[other.id])
    h(Steer("cancel", waiting.id, "user"))
    assert h.job(waiting.id).status == "cancelled" and not h.core.deps.has_dependents(other.id)


def test_after_a_job_that_ended_long_ago(h):
    done = h.submit()
    [d] = run_all(h)
    h.done(d)
    h.commit()  # saved: it left memory, the loop reads its status from the store
    assert done.id not in h.core.jobs
    spec = Submit(handler="builtin.echo", after=[done.id])
    [reply] = [c for c in h(Submitted(spec, "c", ended={done.id: "completed"})) if isinstance(c, Reply)]
    assert reply.message.job.status == "queued"
    with pytest.raises(NotFound):
        h.submit(after=["JB-NOPE"])
    with pytest.raises(Invalid):
        h.submit(id="JB-SELF", after=["JB-SELF"])


def test_waiting_jobs_survive_a_restart(h):
    first = h.submit()
    second = h.submit(after=[first.id])
    h.commit()
    h2 = Harness(h.disk, wall=h.wall + 100, mono=h.mono + 100)
    assert h2.job(second.id).status == "waiting"
    [d1] = run_all(h2)
    h2.done(d1)
    [d2] = h2.dispatched(h2.turn())
    assert d2.job.id == second.id


# ----------------------------------------------------------------- limits


def test_a_concurrency_limit_holds_jobs_in_pulse_not_in_workers(h):
    h(DirectivesSet(limits={"builtin.echo": Limit(concurrency=2)}, schedules={}))
    jobs = [h.submit(payload=n) for n in range(5)]
    other = h.submit(handler="builtin.sleep")
    sent = run_all(h, credit=10)
    assert sorted(d.job.handler for d in sent) == ["builtin.echo", "builtin.echo", "builtin.sleep"]
    echo = [d for d in sent if d.job.handler == "builtin.echo"]
    h.done(echo[0])
    [next_one] = h.dispatched(h.turn())
    assert next_one.job.id == jobs[2].id  # in order
    assert other.id in {d.job.id for d in sent}


def test_a_rate_limit_spaces_starts_and_wakes_for_the_next(h):
    h(DirectivesSet(limits={"builtin.echo": Limit(rate=2, per_ms=1_000)}, schedules={}))
    for n in range(5):
        h.submit(payload=n)
    first = run_all(h)
    assert len(first) == 2
    for d in first:
        h.done(d)
    assert h.dispatched(h.turn()) == []
    assert h.core.next_wakeup(h.now) <= h.mono + 1_000
    h.tick(1_000)
    assert len(h.dispatched(h.turn())) == 2


def test_a_rate_window_is_kept_across_a_crash_of_the_server(h):
    """--rate 3/20s, three starts, kill -9: the restarted server starts no other job
    of that handler until the window of the first start has passed."""
    limit = {"builtin.echo": Limit(rate=3, per_ms=20_000)}
    h(DirectivesSet(limits=limit, schedules={}))
    for n in range(6):
        h.submit(payload=n)
    first = run_all(h)
    assert len(first) == 3
    for d in first:
        h.done(d)
    h.commit()  # (the crash comes after this commit: nothing later is on disk)
    h.tick(2_000)
    again = Harness(h.disk, wall=h.wall, mono=h.mono + 500_000)  # a new process: another monotonic clock
    again(DirectivesSet(limits=limit, schedules={}))
    assert run_all(again) == []
    assert again.core.next_wakeup(again.now) <= again.mono + 18_000
    again.tick(17_999)
    assert again.dispatched(again.turn()) == []
    again.tick(1)
    assert len(again.dispatched(again.turn())) == 3


def test_a_dispatch_that_could_not_be_delivered_uses_no_start_of_a_rate(h):
    from qntx.pulse.events import Undeliverable

    h(DirectivesSet(limits={"builtin.echo": Limit(rate=1, per_ms=10_000)}, schedules={}))
    job = h.submit()
    [lost] = run_all(h)
    h(Undeliverable(lost.lease))  # its worker's pipe was not connected: it never left
    h.hello(credit=10)  # connected now
    [again] = h.dispatched(h.turn())
    assert again.job.id == job.id and again.lease != lost.lease


def test_a_limit_removed_lets_the_rest_go(h):
    h(DirectivesSet(limits={"builtin.echo": Limit(concurrency=1)}, schedules={}))
    for n in range(3):
        h.submit(payload=n)
    assert len(run_all(h)) == 1
    h(DirectivesSet(limits={}, schedules={}))
    assert len(h.dispatched(h.turn())) == 2


# ----------------------------------------------------------------- versions


def test_a_job_pins_the_version_current_when_submitted(h):
    h(PluginUp("python", ("python.work",), (("python.work", "AS-1"),)))
    old = h.submit(handler="python.work")
    h(HandlersAnnounced("python", ("python.work",), (("python.work", "AS-2"),)))
    new = h.submit(handler="python.work")
    assert (old.version, new.version) == ("AS-1", "AS-2")
    sent = {d.job.id: d for d in run_all(h)}
    assert sent[old.id].job.version == "AS-1"
    h.done(sent[old.id], success=False, error=None)


def test_retry_keeps_the_version_unless_latest(h):
    h(PluginUp("python", ("python.work",), (("python.work", "AS-1"),)))
    job = h.submit(handler="python.work", max_attempts=1)
    [d] = run_all(h)
    h.done(d, success=False)
    h(HandlersAnnounced("python", ("python.work",), (("python.work", "AS-2"),)))
    h(Steer("retry", job.id, "user"))
    assert h.job(job.id).version == "AS-1"
    h(Steer("cancel", job.id, "user"))
    h(Steer("retry", job.id, "user", latest=True))
    assert h.job(job.id).version == "AS-2"


# ----------------------------------------------------------------- schedules


def every(name: str, ms: int, anchor: int, **fields) -> Schedule:
    return Schedule(name=name, handler="builtin.echo", every_ms=ms, anchor=anchor, **fields)


def test_a_schedule_fires_once_per_due_time_with_derived_ids(h):
    h(DirectivesSet(limits={}, schedules={"tick": every("tick", 1_000, h.wall)}))
    fired = []
    for _ in range(35):
        h.tick(100)
        fired += [d.job.id for d in run_all(h)]
    dues = [h.wall - 3_500 + 1_000 * k for k in range(1, 4)]
    assert fired == [firing_id("tick", due) for due in dues]
    assert all(h.job(i).schedule == "tick" for i in fired)


def test_a_schedule_never_fires_twice_across_a_restart_and_runs_a_missed_firing_once(h):
    h(DirectivesSet(limits={}, schedules={"tick": every("tick", 1_000, h.wall)}))
    h.tick(1_000)
    assert len(run_all(h)) == 1
    h.commit()
    # Back 10.5 s later: nine firings were missed; "once" runs one of them.
    h2 = Harness(h.disk, wall=h.wall + 10_500, mono=h.mono + 10_500)
    h2(DirectivesSet(limits={}, schedules={"tick": every("tick", 1_000, h.wall - 1_000)}))
    sent = run_all(h2)
    assert len(sent) == 1 and sent[0].job.id == firing_id("tick", h.wall + 10_000)
    assert sent[0].job.due == h.wall + 10_000  # its due time goes with it (handler code: job.due)
    h2.tick(500)
    assert len(h2.dispatched(h2.turn())) == 1  # then on time again


def test_a_restart_before_the_commit_fires_the_same_job_again_not_a_new_one(h):
    h(DirectivesSet(limits={}, schedules={"tick": every("tick", 1_000, h.wall)}))
    h.commit()
    h.tick(1_000)
    [d] = run_all(h)
    h2 = Harness(h.disk, wall=h.wall + 10, mono=h.mono + 10)  # the firing was never saved
    h2(DirectivesSet(limits={}, schedules={"tick": every("tick", 1_000, h.wall - 1_000)}))
    [again] = run_all(h2)
    assert again.job.id == d.job.id


def test_missed_firings_skipped_by_policy_and_pause_resume(h):
    s = every("tick", 1_000, h.wall, missed="skip")
    h(DirectivesSet(limits={}, schedules={"tick": s}))
    h.commit()
    h2 = Harness(h.disk, wall=h.wall + 10_500, mono=h.mono + 10_500)
    h2(DirectivesSet(limits={}, schedules={"tick": s}))
    assert run_all(h2) == []
    h2.tick(500)
    assert len(h2.dispatched(h2.turn())) == 1
    paused = dataclasses.replace(s, paused=True)
    h2(DirectivesSet(limits={}, schedules={"tick": paused}))
    h2.tick(5_000)
    assert h2.dispatched(h2.turn()) == []
    h2(DirectivesSet(limits={}, schedules={"tick": s}))
    assert h2.dispatched(h2.turn()) == []  # what fell due while paused is not run
    h2.tick(1_000)
    assert len(h2.dispatched(h2.turn())) == 1


def test_schedule_states_show_next_and_past(h):
    h(DirectivesSet(limits={}, schedules={"tick": every("tick", 1_000, h.wall)}))
    h.tick(1_000)
    run_all(h)
    [(schedule, last, nxt, firings)] = h.core.schedule_states().values()
    assert last == h.wall and nxt == h.wall + 1_000 and firings == [[h.wall, firing_id("tick", h.wall)]]
    assert CONFIG.dead_after_ms  # the harness config is the one shared with the other core tests


def test_limits_hold_after_a_restart_before_ats_answers(h):
    h(DirectivesSet(limits={"builtin.echo": Limit(concurrency=1)}, schedules={}))
    h.commit()
    for n in range(3):
        h.submit(payload=n)
    h.commit()
    h2 = Harness(h.disk, wall=h.wall + 100, mono=h.mono + 100)  # no DirectivesSet yet
    assert len(run_all(h2)) == 1
