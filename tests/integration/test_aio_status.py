"""The asyncio API calls the dashboard reads through: status, pages, events, steering."""

from __future__ import annotations

import asyncio

import pytest

import qntx.aio
from qntx.protocol import AttestationsStored, JobNotice

pytestmark = pytest.mark.timeout(60)


def test_status_pages_events_and_steering(bus):
    bus.start_up("--workers", "1")

    async def main():
        async with await qntx.aio.connect(bus.home) as api:
            for _ in range(300):  # every actor up and heard from (a loaded machine takes a while)
                status = await api.status()
                by_name = {a.name: a for a in status.actors}
                if {"ats", "server", "worker-1", "plugin:python"} <= set(by_name) and all(
                    a.healthy for a in status.actors
                ):
                    break
                await asyncio.sleep(0.05)
            assert {"ats", "server", "worker-1", "plugin:python"} <= set(by_name)
            assert all(a.healthy for a in status.actors), status.actors
            assert by_name["worker-1"].credit > 0 and by_name["server"].host
            assert (await api.stats()).attestations >= 0

            seen: list = []

            async def collect():
                async for event in api.events():
                    seen.append(event)

            reader = asyncio.ensure_future(collect())
            for _ in range(100):  # until both subscriptions have reached their publishers
                kinds = {type(e) for e in seen}
                if AttestationsStored in kinds and JobNotice in kinds:
                    break
                await api.attest("warm", "up", "aio")
                await (await api.submit("builtin.echo", "warm")).result(timeout=20)
                await asyncio.sleep(0.05)
            seen.clear()
            handles = [await api.submit("builtin.echo", n) for n in range(3)]
            results = [await h.result(timeout=20) for h in handles]
            record = await api.attest("ev", "seen", "aio")
            ids = {h.id for h in handles}

            def done():
                finals = {e.id for e in seen if isinstance(e, JobNotice) and e.status == "completed"}
                made = {n.id for e in seen if isinstance(e, AttestationsStored) for n in e.stored}
                return ids <= finals and record.id in made

            for _ in range(200):
                if done():
                    break
                await asyncio.sleep(0.05)
            reader.cancel()
            assert results == [0, 1, 2] and done()
            # Notices say what changed, never the result (that goes to who asked).
            notices = [e for e in seen if isinstance(e, JobNotice) and e.id in ids]
            assert notices and not any(hasattr(n, "result") or hasattr(n, "logs") for n in notices)

            first, cursor = await api.jobs_page(limit=2)
            rest, _ = await api.jobs_page(limit=1, cursor=cursor)
            assert [j.id for j in first + rest] == [h.id for h in reversed(handles)]

            page, cursor = await api.query_page(qntx.api.ax_filter("ev is seen", 10))
            assert [r.id for r in page] == [record.id] and cursor is None

            busy = [
                await api.submit("builtin.sleep", {"args": [30]}, max_attempts=1)
                for _ in range(by_name["worker-1"].credit)
            ]
            for handle in busy:
                await handle.accepted()
            later = await api.submit("builtin.echo", "later")
            await later.accepted()
            for _ in range(200):
                if all(job.status == "running" for job in [await api.job(h.id) for h in busy]):
                    break
                await asyncio.sleep(0.05)
            assert (await api.pause(later.id)).status == "paused"
            assert (await api.resume(later.id)).status == "queued"
            for handle in busy:
                await api.cancel(handle.id)
            assert await later.result(timeout=20) == "later"

    asyncio.run(main())
