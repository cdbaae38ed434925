"""A shortened chaos run (``bin/chaos`` runs the full one): jobs and attestations
flow while actors are killed at random, a worker is stopped past its lease and the
whole group loses power; every invariant must hold, on LMDB and on PostgreSQL."""

from __future__ import annotations

import pytest

from tests.chaos import Chaos, violations
from tests.pg import pg_server, pg_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(400)


def short_run(home, seed: int, *, rounds: int, power: int, store: str = "") -> tuple[Chaos, dict[str, int], str]:
    """A chaos run of ``rounds`` kills, ``power`` power losses and one stopped worker;
    the run, its counts and its report. No invariant may be violated."""
    lines: list[str] = []
    chaos = Chaos(home, seed=seed, log=lines.append, store=store)
    try:
        chaos.run(rounds=rounds, power=power, stops=1)
        counts = chaos.check()
    finally:
        chaos.stop.set()
        chaos.stop_up()
    report = "\n".join(lines + [f"{k}: {v}" for k, v in counts.items()])
    assert violations(counts) == 0, report
    assert chaos.tally.kills["power loss"] == power and chaos.tally.kills["SIGSTOP past the lease"] == 1, report
    assert counts["jobs completed with their own result"] == len(chaos.tally.jobs), report
    assert counts["attestations stored exactly once"] == len(chaos.tally.attestations), report
    return chaos, counts, report


def test_a_short_chaos_run_keeps_every_invariant(home):
    chaos, counts, report = short_run(home, 20261126, rounds=6, power=2)
    assert len(chaos.tally.jobs) > 100 and len(chaos.tally.attestations) > 100, report
    assert counts["LMDB environments that open clean"] == 2, report


def test_a_short_chaos_run_on_postgresql_keeps_every_invariant(home, pg_url):  # noqa: F811
    """The same faults, fewer of them, with both stores in PostgreSQL: a power loss
    leaves the lease to expire before the fresh up leads again."""
    chaos, counts, report = short_run(home, 20261205, rounds=3, power=1, store=pg_url)
    assert len(chaos.tally.jobs) > 50 and len(chaos.tally.attestations) > 50, report
    assert counts["databases that check clean"] == 1, report
