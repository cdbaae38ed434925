"""``bin/bench ats --and``: a query that ANDs two broad fields, at a million attestations.

``subjects=alice AND predicates=knows``, each field carried by 30,000 attestations and
60 carrying both, in a store of 1,000,000. Two layouts of the same counts:

* ``interleaved``: the 30,000 of each are spread at random through the store, the
  worst case for an intersection (the two lists alternate all the time);
* ``runs``: they come in runs of 100 (a bulk import, a busy hour), the usual case.

Each is measured in the store (what the ATS actor's loop spends on it) beside the
plan a one-index walk would make, reading and decoding all 30,000 records of one of
the two fields (the raw limit: what the query cost before the intersection), and
through the bus beside a ping to the same actor. The target is the issue's: under
2 ms in the store. The store is loaded in-process,
unsynced (loading speed is not what is measured here), then served by a real actor.
"""

from __future__ import annotations

import random
import time

from bench.actors import Home
from bench.ats import timed as timed_us
from bench.report import Metric, Report, Target, percentile, progress

FULL = {"stored": 1_000_000, "each": 30_000, "common": 60, "samples": 300}
QUICK = {"stored": 20_000, "each": 3_000, "common": 60, "samples": 20}
RUN = 100  # attestations per run in the ``runs`` layout
LOAD_BATCH = 20_000


def positions(stored: int, each: int, common: int, layout: str, seed: int = 11):
    """Which attestations carry ``alice`` and which ``knows``: ``each`` of both, of
    which ``common`` are the same."""
    rng = random.Random(seed)
    if layout == "interleaved":
        picked = rng.sample(range(stored), 2 * each - common)
        shared = picked[:common]
        return set(shared) | set(picked[common:each]), set(shared) | set(picked[each:])
    # Runs of RUN consecutive attestations at random places that do not overlap; the
    # common ones are spread through alice's.
    slots = rng.sample(range(stored // RUN), -(-(2 * each - common) // RUN))
    picked = [s * RUN + k for s in slots for k in range(RUN)]
    alice = set(picked[:each])
    knows = set(picked[each : 2 * each - common]) | set(rng.sample(sorted(alice), common))
    return alice, knows


def load(path, stored: int, alice: set[int], knows: set[int]) -> None:
    from qntx.ats.store import AttestationStore
    from qntx.protocol import NewAttestation

    with AttestationStore(path, sync=False) as store:
        for start in range(0, stored, LOAD_BATCH):
            store.put_many([
                NewAttestation(
                    subjects=["alice" if i in alice else f"person-{i % 5_000}"],
                    predicates=["knows" if i in knows else f"p{i % 40}"],
                    contexts=[f"ctx-{i % 200}"], actors=["bench"], timestamp=1_000_000 + i,
                )
                for i in range(start, min(start + LOAD_BATCH, stored))
            ])  # fmt: skip


def layout_stage(report: Report, sizes: dict, layout: str) -> None:
    from qntx import connect
    from qntx.ats.store import AttestationStore
    from qntx.protocol import Filter

    stored, each, common, samples = (sizes[k] for k in ("stored", "each", "common", "samples"))
    both = Filter(subjects=["alice"], predicates=["knows"])
    one = Filter(subjects=["alice"])
    with Home() as home:
        progress(f"{layout}: loading {stored:,} attestations")
        alice, knows = positions(stored, each, common, layout)
        started = time.perf_counter()
        load(home.path / "ats", stored, alice, knows)
        report.notes.append(
            f"{layout}: loaded {stored:,} attestations in {time.perf_counter() - started:.1f} s"
        )
        progress(f"{layout}: {samples} queries in the store")
        with AttestationStore(home.path / "ats", readonly=True) as store:
            found = store.query(both)  # every page: the interleaved case takes several
            if len(found) != common or store.last_query_scanned != common:
                raise RuntimeError(f"the AND query found {len(found)}, not {common}")
            page = lambda: store.query(both)  # noqa: E731
            walk = lambda: store.query_page(one, page=each, max_scan=each)  # noqa: E731
            timed_us(page, 5), timed_us(walk, 2)  # warm the page cache
            and_us = timed_us(page, samples)
            walk_us = timed_us(walk, max(3, samples // 30))
        home.start_ats()
        progress(f"{layout}: {samples} queries and pings through the bus")
        with connect(home.path, embedded=False, request_timeout_s=60.0) as bus:
            query = lambda: bus.query(subjects=["alice"], predicates=["knows"])  # noqa: E731
            if len(query()) != common:
                raise RuntimeError("the AND query through the bus found the wrong records")
            ping_us, bus_us = [], []
            for _ in range(10):  # interleaved, so a noisy second hurts both alike
                ping_us += timed_us(bus.ping, samples // 10)
                bus_us += timed_us(query, samples // 10)
    ping_us.sort(), bus_us.sort()
    walk_p50 = report.add_raw(f"{layout}_walk_{each}", percentile(walk_us, 50), "us", "-")
    ping_p50 = report.add_raw(f"{layout}_bus_ping_p50", percentile(ping_us, 50), "us", "-")
    label = f"{layout}: alice AND knows in the store ({each:,} x {each:,}, {common} common)"
    for p in (50, 99):
        report.add(Metric(
            f"and_{layout}_store_p{p}", f"{label} p{p}", percentile(and_us, p), "us",
            walk_p50, f"decode {each:,}", Target("<=", 2_000, on="measured"),
        ))  # fmt: skip
    report.add(Metric(
        f"and_{layout}_bus_p50", f"{layout}: the same through the bus p50", percentile(bus_us, 50),
        "us", ping_p50, "ping p50",
    ))  # fmt: skip


def run(report: Report, quick: bool) -> None:
    sizes = QUICK if quick else FULL
    for layout in ("interleaved", "runs"):
        layout_stage(report, sizes, layout)
