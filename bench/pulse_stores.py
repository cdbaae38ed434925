"""``bin/bench pulse --store URL``: jobs end to end with Pulse's job store (and the
ATS) on PostgreSQL, beside LMDB in the same run.

The plain loops of ``bin/bench pulse`` (N ``builtin.echo`` submits then every
result; M jobs of a stored python handler) run against a real ``qntx up`` in a
throwaway home with the default LMDB stores and with ``QNTX_STORE=URL`` in turn,
in rounds (their medians reported, each backend getting its share of the machine's
drift). Each PostgreSQL figure is printed beside LMDB's, the LMDB figure as its
limit; target >= 0.5x. The database is migrated as by ``qntx db upgrade`` and must
hold no attestations at the start: the benchmark empties its tables between rounds.
``--store local`` starts a durable PostgreSQL server of its own (fsync and
synchronous commit on, as in production).
"""

from __future__ import annotations

import statistics

from bench.actors import Home
from bench.ats_stores import database
from bench.report import Metric, Report, Target, progress

ROUNDS = 3


def _empty(url: str) -> None:
    from qntx import db

    conn = db.connect(url)
    try:
        conn.execute("TRUNCATE ats_attestations, pulse_jobs, pulse_keys, pulse_after, pulse_counts")
        conn.execute("UPDATE ats_meta SET seq = 0, count = 0")
        conn.execute(
            "UPDATE pulse_meta SET seq = 0, lease = 1, plugins = NULL, schedules = NULL, limits = NULL,"
            " handler_versions = NULL"
        )
    finally:
        conn.close()


def measure(sizes, store: str | None) -> dict[str, float]:
    """Jobs/s of the two plain loops on a fresh ``qntx up`` (on ``store`` if given)."""
    from bench.pulse import HANDLER, start_up, throughput
    from qntx import connect

    with Home("qs-") as home:
        if store:
            home.env["QNTX_STORE"] = store
        start_up(home)
        with connect(home.path) as bus:
            warm = [bus.submit(h, {"n": n}) for h in ("builtin.echo", f"python.{HANDLER}") for n in range(50)]
            for handle in warm:
                handle.result(timeout=60)
            return {
                "echo": throughput(bus, "builtin.echo", sizes.echo_jobs),
                "python": throughput(bus, f"python.{HANDLER}", sizes.python_jobs),
            }


def run(report: Report, sizes, url: str, *, quick: bool) -> None:
    from qntx.db import redact

    rounds = 1 if quick else ROUNDS
    rates: dict[str, list[dict[str, float]]] = {"LMDB": [], "PostgreSQL": []}
    with database(url) as store:
        for n in range(rounds):
            for name, target in (("LMDB", None), ("PostgreSQL", store)):
                progress(f"round {n + 1} of {rounds}: {name} plain loops")
                if target:
                    _empty(target)
                rates[name].append(measure(sizes, target))
        where = redact(store)
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rates.items()}
    for name, runs in rates.items():
        for key in runs[0]:
            report.notes.append(f"{name} {key} plain loop per round: " + ", ".join(f"{r[key]:,.0f}/s" for r in runs))
    for key, label, jobs in (
        ("echo", "builtin.echo", sizes.echo_jobs),
        ("python", "python handler", sizes.python_jobs),
    ):
        limit = report.add_raw(f"lmdb_{key}_jobs_per_s", medians["LMDB"][key], "/s", "this run, LMDB stores")
        report.add(
            Metric(
                f"pg_{key}_jobs_per_s", f"PostgreSQL {label}: plain loop, {jobs:,} jobs", medians["PostgreSQL"][key],
                "/s", limit, f"lmdb_{key}_jobs_per_s", Target(">=", 0.5),
            )
        )  # fmt: skip
    report.notes.append(
        f"PostgreSQL ({where}) holds both the jobs and the attestations; it shares this machine's cores "
        f"and disk with the bus. Figures are medians of {rounds} round(s) per backend, taken in turn."
    )
