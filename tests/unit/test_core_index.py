"""Pulse's core looks only at what it must: a dispatch does not walk the sessions or
the handlers, and a handler announcement does not walk the jobs (structural checks:
what was visited is counted, nothing is timed)."""

from __future__ import annotations

from qntx.pulse.events import HandlersAnnounced, PluginUp
from qntx.pulse.rules import MAX_ATTEMPTS
from tests.unit.test_core import Harness


class Walked(dict):
    """A dict that counts how often it is walked whole (iterated, or its values or items read)."""

    walks = 0

    def __iter__(self):
        Walked.walks += 1
        return super().__iter__()

    def values(self):
        Walked.walks += 1
        return super().values()

    def items(self):
        Walked.walks += 1
        return super().items()

    def keys(self):
        Walked.walks += 1
        return super().keys()


def watched_sessions(h: Harness) -> None:
    h.core.sessions_.by_id = h.core.sessions = Walked(h.core.sessions_.by_id)


def watched_jobs(h: Harness) -> None:
    h.core.ledger.jobs = h.core.jobs = Walked(h.core.ledger.jobs)


def one_dispatch_cost(sessions: int, handlers: int) -> tuple[int, int, int]:
    """(heads the queue looked at, limit checks, walks of every session) to dispatch one
    job when ``sessions`` plugin sessions (all full but one) and ``handlers`` handlers
    with ready jobs are there."""
    names = tuple(f"python.h{n}" for n in range(handlers))
    h = Harness()
    h(PluginUp("python", names))
    for name in names:
        h.submit(handler=name, max_attempts=MAX_ATTEMPTS)
    h.submit(handler="python.h0", priority=5)  # the one that goes
    for n in range(sessions - 1):
        h.hello(f"full{n}".encode(), credit=0, plugin="python")
    for n in range(sessions):
        h.hello(f"plain{n}".encode(), credit=4)  # plain workers: never a plugin's job
    h.hello(b"free", credit=1, plugin="python")
    checks = 0
    limited = h.core.limits_.limited

    def counted(handler, mono):
        nonlocal checks
        checks += 1
        return limited(handler, mono)

    h.core.limits_.limited = counted
    watched_sessions(h)
    Walked.walks = 0
    h.core.queue.visits = 0
    sent = h.dispatched(h.turn())
    assert [d.job.handler for d in sent] == ["python.h0"] and sent[0].job.priority == 5
    return h.core.queue.visits, checks, Walked.walks


def test_a_dispatch_costs_the_same_whatever_the_number_of_sessions_and_handlers():
    small = one_dispatch_cost(sessions=10, handlers=10)
    big = one_dispatch_cost(sessions=1_000, handlers=1_000)
    assert big == small, f"10 sessions and handlers: {small}; 1,000: {big} (heads visited, limit checks, session walks)"
    visits, checks, walks = big
    assert walks == 0 and checks <= 2 and visits <= 4


def test_a_handler_at_its_limit_is_looked_at_once_per_dispatch_pass():
    from qntx.pulse.directives import Limit
    from qntx.pulse.events import DirectivesSet

    h = Harness()
    h(DirectivesSet(limits={"builtin.sleep": Limit(concurrency=1)}, schedules={}))
    for n in range(50):
        h.submit(handler="builtin.sleep", payload=0, priority=10)  # the best jobs, but only one may run
        h.submit(handler="builtin.echo", payload=n)
    h.hello(credit=100)
    h.core.queue.visits = 0
    sent = h.dispatched(h.turn())
    assert sorted(d.job.handler for d in sent).count("builtin.sleep") == 1 and len(sent) == 51
    assert h.core.queue.visits <= 2 * len(sent) + 4, f"{h.core.queue.visits} heads looked at for {len(sent)} dispatches"


def announcement_walks(jobs: int) -> int:
    h = Harness()
    h(PluginUp("python", ("python.gone", "python.kept")))
    for n in range(jobs):
        h.submit(handler="builtin.echo" if n % 2 else "python.kept", payload=n)
    doomed = h.submit(handler="python.gone")
    watched_jobs(h)
    Walked.walks = 0
    h(HandlersAnnounced("python", ("python.kept", "python.new")))
    assert h.core.jobs[doomed.id].status == "failed" and "was deleted" in h.core.jobs[doomed.id].error.message
    assert all(j.status == "queued" for j in dict.values(h.core.jobs) if j.id != doomed.id)
    return Walked.walks


def test_a_handler_announcement_does_not_walk_the_jobs():
    assert announcement_walks(10) == announcement_walks(5_000) == 0
