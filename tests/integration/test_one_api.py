"""The calls AsyncBus lacked or did differently before it was derived from the same
table as Bus, on a real bus (one ``qntx up`` for the module): every page of
``jobs``, the job an idempotency key names, a misspelt option refused at the
call, and chain, ax(so=), limits, schedules and prune over asyncio."""

from __future__ import annotations

import asyncio

import pytest

import qntx.aio
from qntx.errors import NotFound
from qntx.protocol import Filter
from qntx.pulse.directives import Limit
from tests.conftest import fresh_home
from tests.integration.conftest import Bus

pytestmark = pytest.mark.timeout(120)

PAST_ONE_PAGE = 1_150  # a listing page holds at most MAX_PAGE (1,000) jobs


@pytest.fixture(scope="module")
def up():
    with fresh_home() as home:
        bus = Bus(home)
        try:
            bus.start_up("--workers", "1")
            yield bus
        finally:
            bus.stop_all()


def run(coroutine_fn, up: Bus):
    async def main():
        async with await qntx.aio.connect(up.home) as abus:
            return await coroutine_fn(abus)

    return asyncio.run(main())


def test_jobs_reads_every_page_up_to_its_limit_on_both(up: Bus) -> None:
    with up.connect() as bus:
        ours = [bus.submit("builtin.echo", n).id for n in range(PAST_ONE_PAGE)]
        bus.flush()
        listed = [job.id for job in bus.jobs(limit=5000)]
        first = [job.id for job in bus.jobs(limit=1100)]
    assert len(listed) == len(set(listed)) and set(ours) <= set(listed)
    assert first == listed[:1100]  # newest first, across the page boundary

    async def lists(abus):
        return [j.id for j in await abus.jobs(limit=5000)], [j.id for j in await abus.jobs(limit=1100)]

    async_listed, async_first = run(lists, up)
    assert async_listed == listed and async_first == first


def test_a_key_names_the_job_it_was_first_given_on_both(up: Bus) -> None:
    with up.connect() as bus:
        first = bus.submit("builtin.echo", 1, idempotency_key="sync-key", id="JB-SYNC-KEY-FIRST")
        again = bus.submit("builtin.echo", 2, idempotency_key="sync-key", id="JB-SYNC-KEY-AGAIN")
        assert (first.id, again.id) == ("JB-SYNC-KEY-FIRST", "JB-SYNC-KEY-FIRST")

    async def keyed(abus):
        first = await abus.submit("builtin.echo", 1, idempotency_key="async-key", id="JB-ASYNC-KEY-FIRST")
        again = await abus.submit("builtin.echo", 2, idempotency_key="async-key", id="JB-ASYNC-KEY-AGAIN")
        ids = (first.id, again.id)  # known as submit returns, not only after accepted()
        return ids, await again.result(timeout=30)

    ids, result = run(keyed, up)
    assert ids == ("JB-ASYNC-KEY-FIRST", "JB-ASYNC-KEY-FIRST")
    assert result == 1  # the first job's outcome: the second was never enqueued


def test_a_misspelt_submit_option_is_a_type_error_at_the_call_on_both(up: Bus) -> None:
    with up.connect() as bus:
        before = len(bus.jobs(limit=5000))
        with pytest.raises(TypeError, match="prioriti"):
            bus.submit("builtin.echo", 1, prioriti=5)

        async def misspelt(abus):
            with pytest.raises(TypeError, match="max_attempt"):
                abus.submit("builtin.echo", 1, max_attempt=5)  # raised by the call, before any await
            with pytest.raises(TypeError, match="retries"):
                await abus.chain(("builtin.echo", 1), {"handler": "builtin.echo", "retries": 2})

        run(misspelt, up)
        after = bus.jobs(limit=5000)
    assert len(after) == before  # nothing went out, not even the chain's good first step


def test_async_bus_chains_acts_on_matches_limits_schedules_and_prunes(up: Bus) -> None:
    async def everything(abus):
        steps = await abus.chain(("builtin.echo", "a"), ("builtin.echo", "b"))
        assert [await h.result(timeout=30) for h in steps] == ["a", "b"]
        assert (await steps[1].record()).parent_id == steps[0].id
        assert await abus.dependents(steps[0].id) == [steps[1].id]

        await abus.attest("widget-1", "stocked", "store")
        handles = await abus.ax("widget-1 is stocked of store", so="builtin.echo", args=["x"])
        assert len(handles) == 1
        echoed = await handles[0].result(timeout=30)
        assert echoed["args"] == ["x"] and echoed["attestation"]["subjects"] == ["widget-1"]

        assert await abus.limit("builtin.echo", concurrency=2) == Limit(concurrency=2)
        assert (await abus.limits())["builtin.echo"] == Limit(concurrency=2)
        assert await abus.limit("builtin.echo") is None
        assert "builtin.echo" not in await abus.limits()

        state = await abus.schedule_add("tick", "builtin.echo", every=3600, payload="t")
        assert state.every_ms == 3_600_000
        assert [s.name for s in await abus.schedules()] == ["tick"]
        await abus.schedule_pause("tick")
        assert (await abus.schedule("tick")).paused
        await abus.schedule_resume("tick")
        assert not (await abus.schedule("tick")).paused
        await abus.schedule_delete("tick")
        with pytest.raises(NotFound):
            await abus.schedule("tick")

        pruned = await abus.prune(older_than_s=0)
        assert pruned.get("completed", 0) >= 4  # the chain's and the action's jobs at least
        with pytest.raises(NotFound):
            await abus.job(steps[0].id)

    run(everything, up)


def test_bus_reads_events_and_single_pages_as_async_bus_does(up: Bus) -> None:
    import threading

    from qntx.protocol import AttestationsStored

    with up.connect() as bus:
        stored = bus.attest("paged-1", "listed", "pages")
        records, _ = bus.query_page(Filter(subjects=["paged-1"]))
        assert [r.id for r in records] == [stored.id]
        newest = [bus.submit("builtin.echo", n).id for n in range(3)][::-1]
        bus.flush()
        page, cursor = bus.jobs_page(limit=2)
        assert [j.id for j in page] == newest[:2] and cursor is not None

        stop = threading.Event()

        def attest_until_seen() -> None:  # until the subscription has reached the publisher
            while not stop.is_set():
                bus_two.attest("evented", "seen", "events")
                stop.wait(0.05)

        with up.connect() as bus_two:
            writer = threading.Thread(target=attest_until_seen)
            events = bus.events()
            writer.start()
            try:
                first = next(e for e in events if isinstance(e, AttestationsStored))
            finally:
                stop.set()
                writer.join()
                events.close()
        assert first.stored and all(n.predicates == ["seen"] for n in first.stored)


def test_waiting_by_id_for_a_refused_submission_raises_its_refusal_on_both(up: Bus) -> None:
    """``wait(id)`` right after ``submit`` (its answer not read yet, or read on the
    way and not reported): the server knows no such job, and the call says why."""
    with up.connect() as bus:
        refused = bus.submit("python.nothere", 1)
        with pytest.raises(NotFound, match="unknown handler 'python.nothere'"):
            bus.wait(refused.id, timeout=30)
        # read on the way: a later submission's answer settles it first
        refused = bus.submit("python.nothere", 2)
        bus.submit("builtin.echo", 3).result(timeout=30)
        with pytest.raises(NotFound, match="unknown handler 'python.nothere'"):
            bus.wait(refused.id, timeout=30)
        accepted = bus.submit("builtin.echo", 4)
        assert bus.wait(accepted.id, timeout=30).result == 4
        with pytest.raises(NotFound, match="no job JB-NEVER-SUBMITTED"):
            bus.wait("JB-NEVER-SUBMITTED", timeout=5)

    async def refused_async(abus):
        refused = abus.submit("python.nothere", 5)
        with pytest.raises(NotFound, match="unknown handler 'python.nothere'"):
            await abus.wait((await refused).id, timeout=30)
        accepted = await abus.submit("builtin.echo", 6)
        return (await abus.wait(accepted.id, timeout=30)).result

    assert run(refused_async, up) == 6
