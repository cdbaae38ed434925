"""The free-credit index (qntx.pulse.credit) and the core's choice of session with it:
the ready session with the most free slots, the first to join among equals, per group."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qntx.protocol import WorkerReady
from qntx.pulse.commands import SendJob
from qntx.pulse.credit import FreeCredit
from qntx.pulse.events import PluginUp, WorkerSeen
from tests.unit.test_core import Harness

pytestmark = pytest.mark.timeout(120)

SESSIONS = [f"s{n}".encode() for n in range(6)]
GROUPS = ("", "python", "other")


def scan(model: dict[bytes, tuple[str, int, int, bool]], group: str) -> bytes | None:
    """What a scan of every session in join order chooses."""
    best = None
    for session, (g, _order, free, usable) in sorted(model.items(), key=lambda item: item[1][1]):
        if g == group and usable and (best is None or free > model[best][2]):
            best = session
    return best


operation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(SESSIONS), st.sampled_from(GROUPS), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(SESSIONS)),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(operation, max_size=120))
def test_the_index_chooses_as_a_scan_of_every_session_would(operations):
    index, model, orders = FreeCredit(), {}, {}
    joined = iter(range(1, 10_000))
    for op in operations:
        if op[0] == "set":
            _, session, group, free, ready = op
            order = orders.setdefault(session, next(joined))  # a session keeps its join order
            usable = ready and free > 0
            index.set(session, group, order, free, usable)
            model[session] = (group, order, free, usable)
        else:
            index.remove(op[1])
            model.pop(op[1], None)
            orders.pop(op[1], None)  # it may join again, later in the order
        for group in GROUPS:
            assert index.best(group) == scan(model, group), (group, model)
        assert sorted(index.plugin_groups()) == sorted({g for g, *_ in model.values() if g})


def test_dispatch_goes_to_the_freest_ready_session_first_joined_among_equals():
    h = Harness()
    h.hello(b"a", credit=2)
    h.hello(b"b", credit=5, ready=False)  # the freest, but not connected to its pipe
    h.hello(b"c", credit=3)
    h.hello(b"d", credit=3)
    for n in range(4):
        h.submit(payload=n)
    sent = [c.session for c in h.turn() if isinstance(c, SendJob)]
    # c and d tie at 3 free (c joined first), then 2 each with a: a joined first.
    assert sent == [b"c", b"d", b"a", b"c"]
    h.hello(b"b", credit=5)  # connected now: the freest by far
    for n in range(3):
        h.submit(payload=n)
    assert [c.session for c in h.turn() if isinstance(c, SendJob)] == [b"b", b"b", b"b"]


def test_a_slot_freed_by_a_result_takes_the_next_job_before_any_heartbeat():
    h = Harness()
    h.hello(b"a", credit=1)
    h.hello(b"b", credit=1)
    first = [h.submit(payload=n) for n in range(2)]
    sent = [c.message for c in h.turn() if isinstance(c, SendJob)]
    assert [d.job.id for d in sent] == [j.id for j in first]
    h.done(sent[1])  # b's slot is free again; nobody heartbeats
    h.submit(payload=2)
    assert [c.session for c in h.turn() if isinstance(c, SendJob)] == [b"b"]


def test_a_plugin_session_takes_only_its_plugins_jobs_and_plain_ones_never_do():
    h = Harness()
    h(PluginUp("python", ("python.work",)))
    h(WorkerSeen(b"p", WorkerReady(worker="p", credit=9, session="p", plugin="python"), True))
    h.hello(b"w", credit=1)
    h.submit(handler="builtin.echo", payload=1)
    h.submit(handler="builtin.echo", payload=2)
    h.submit(handler="python.work", payload=3)
    sent = [(c.session, c.message.job.handler) for c in h.turn() if isinstance(c, SendJob)]
    # The plugin's session is freer, but a built-in goes only to a plain worker (one slot).
    assert sent == [(b"w", "builtin.echo"), (b"p", "python.work")]


def test_a_thousand_sessions_each_get_one_job_in_join_order():
    h = Harness()
    for n in range(1_000):
        h.hello(f"w{n:04}".encode(), credit=1)
    for n in range(1_000):
        h.submit(payload=n)
    sent = [c.session for c in h.turn() if isinstance(c, SendJob)]
    assert sent == [f"w{n:04}".encode() for n in range(1_000)]
