"""``bin/bench ats --store URL``: the ATS through the bus on PostgreSQL beside LMDB.

The same workload runs against real ATS actors in one run, with the default LMDB
store in a throwaway home and with ``QNTX_STORE=URL`` in turn (the write stages in
three rounds each, their medians reported). The database is migrated as by
``qntx db upgrade`` and must hold no attestations at the start: the benchmark empties
it between its stages, so what it deletes is only its own. Each PostgreSQL figure is printed beside LMDB's, the LMDB figure as its
limit, and judged by the ratio:

1. durable attestations/s from one sequential client      (>= 0.5x of LMDB)
2. the same from 8 client processes, sequential
3. ``attest_many`` in batches of 1,000                     (>= 0.5x)
4. query p50/p99 over the realistic mix (handler/python, knows limit 10)

``--store local`` starts a PostgreSQL server of its own for the run (the test
suite's, with fsync and synchronous commit on, as in production).
"""

from __future__ import annotations

import contextlib
import statistics
import time

from bench.actors import Home
from bench.ats import QUICK, Sizes, concurrent_writes, fact, load_for_queries, realistic_mix, timed
from bench.probe import StageProbe
from bench.report import Metric, Report, Target, percentile, progress

ROUNDS = 3  # of the write stages, each backend in turn


@contextlib.contextmanager
def database(url: str):
    """``url`` migrated (and checked empty), or a durable local server's for ``local``."""
    if url != "local":
        yield _prepared(url)
        return
    from tests.pg import missing, running_server

    reason = missing()
    if reason:
        raise RuntimeError(f"--store local: {reason}")
    with running_server(durable=True) as server:
        server.admin("CREATE DATABASE bench")
        yield _prepared(server.url("bench"))


def _prepared(url: str) -> str:
    from qntx import db

    db.upgrade(url)
    conn = db.connect(url)
    try:
        if conn.execute("SELECT count FROM ats_meta").fetchone()[0]:
            raise RuntimeError(f"{db.redact(url)} holds attestations already: give an empty database")
    finally:
        conn.close()
    return url


def measure_writes(sizes: Sizes, store: str | None) -> dict[str, float]:
    """The write figures of one backend, from a fresh ATS actor."""
    from qntx import connect

    figures: dict[str, float] = {}
    with Home() as home:
        if store:
            home.env["QNTX_STORE"] = store
        ats = home.start_ats()
        probe = StageProbe(ats.pid, home.path / "ats") if not store else _NoProbe()
        try:
            with connect(home.path, embedded=False, request_timeout_s=60.0) as bus:
                bus.attest("warm", "up")
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < sizes.write_seconds:
                    bus.attest(f"user-{n % 997}", "knows", "work", actors="bench", attributes={"i": n})
                    n += 1
                figures["attest_1_client"] = n / (time.perf_counter() - start)
            figures["attest_8_clients"], _ = concurrent_writes(home, "sequential", sizes, probe)
            prebuilt = [[fact(b * sizes.batch + i) for i in range(sizes.batch)] for b in range(20)]
            with connect(home.path, embedded=False, request_timeout_s=60.0) as bus:
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < sizes.write_seconds:
                    bus.attest_many(prebuilt[(n // sizes.batch) % len(prebuilt)])
                    n += sizes.batch
                bus.stats()  # every record queryable
                figures["attest_many"] = n / (time.perf_counter() - start)
        finally:
            probe.close()
    return figures


def measure_queries(sizes: Sizes, store: str | None) -> dict[str, float]:
    """The load and query figures of one backend, over the realistic mix alone (as in
    `bin/bench ats`), from a fresh ATS actor."""
    if store:
        _empty(store)
    with Home() as home:
        return _queries(home, sizes, store)


class _NoProbe:
    """StageProbe reads the LMDB file's stats, which a PostgreSQL store has not."""

    def snapshot(self) -> None:
        return None

    def note(self, *args) -> str:
        return ""

    def close(self) -> None:
        pass


def _empty(url: str) -> None:
    from qntx import db

    conn = db.connect(url)
    try:
        conn.execute("TRUNCATE ats_attestations")
        conn.execute("UPDATE ats_meta SET seq = 0, count = 0")
    finally:
        conn.close()


def _queries(home: Home, sizes: Sizes, store: str | None) -> dict[str, float]:
    from qntx import connect

    items, handlers = realistic_mix(sizes.stored)
    if store:
        home.env["QNTX_STORE"] = store
    home.start_ats()
    with connect(home.path, embedded=False, request_timeout_s=60.0) as bus:
        load_s, selective, broad = load_for_queries(bus, sizes, items, handlers)
        load = sizes.stored / load_s
        for call in (selective, broad):
            timed(call, max(20, sizes.samples // 20))
        times: dict[str, list[float]] = {"selective": [], "broad": []}
        for _ in range(10):
            for name, call in (("selective", selective), ("broad", broad)):
                times[name] += timed(call, sizes.samples // 10)
    out = {"load": load}
    for name, values in times.items():
        values.sort()
        out[f"query_{name}_p50"], out[f"query_{name}_p99"] = percentile(values, 50), percentile(values, 99)
    return out


def run(report: Report, sizes: Sizes, url: str) -> None:
    from qntx.db import redact

    rounds = 1 if sizes is QUICK else ROUNDS
    writes: dict[str, list[dict[str, float]]] = {"LMDB": [], "PostgreSQL": []}
    with database(url) as store:
        # Rounds of LMDB then PostgreSQL in turn: the machine's load and its disk's sync
        # rate drift within a run, and each backend gets its share of both.
        for n in range(rounds):
            for name, target in (("LMDB", None), ("PostgreSQL", store)):
                progress(f"round {n + 1} of {rounds}: {name} writes")
                if target:
                    _empty(target)
                writes[name].append(measure_writes(sizes, target))
        progress("LMDB: load and queries")
        lmdb = {**_medians(writes["LMDB"]), **measure_queries(sizes, None)}
        progress(f"PostgreSQL ({redact(store)}): load and queries")
        pg = {**_medians(writes["PostgreSQL"]), **measure_queries(sizes, store)}
    for name, runs in writes.items():
        for key in runs[0]:
            report.notes.append(f"{name} {key} per round: " + ", ".join(f"{r[key]:,.0f}/s" for r in runs))
    for key, value in lmdb.items():
        report.add_raw(f"lmdb_{key}", value, "us" if key.startswith("query") else "/s", "-")
    half = Target(">=", 0.5)
    rows = [
        ("attest_1_client", "attest, 1 client (durable)", "/s", half),
        ("attest_8_clients", f"attest, {sizes.clients} clients sequential", "/s", None),
        ("attest_many", f"attest_many, batches of {sizes.batch}", "/s", half),
        ("load", f"load of {sizes.stored:,} (attest_many {sizes.load_batch:,})", "/s", None),
        ("query_selective_p50", "query handler/python p50", "us", None),
        ("query_selective_p99", "query handler/python p99", "us", None),
        ("query_broad_p50", "query knows, limit 10 p50", "us", None),
        ("query_broad_p99", "query knows, limit 10 p99", "us", None),
    ]
    for key, label, unit, target in rows:
        report.add(Metric(f"pg_{key}", f"PostgreSQL {label}", pg[key], unit, lmdb[key], f"LMDB {key}", target))
    report.notes.append(
        f"PostgreSQL and LMDB share this machine's cores and disk; write figures are the median "
        f"of {rounds} round(s) each, taken in turn; load and queries one run each. A query's "
        "ratio above 1 is PostgreSQL being slower."
    )


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}
