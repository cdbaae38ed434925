"""A shortened chaos run (``bin/chaos`` runs the full one): jobs and attestations
flow while actors are killed at random, a worker is stopped past its lease and the
whole group loses power; every invariant must hold."""

from __future__ import annotations

import pytest

from tests.chaos import Chaos, violations
from tests.pg import pg_server, pg_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(400)


def test_a_short_chaos_run_keeps_every_invariant(home):
    lines: list[str] = []
    chaos = Chaos(home, seed=20261126, log=lines.append)
    try:
        chaos.run(rounds=6, power=2, stops=1)
        counts = chaos.check()
    finally:
        chaos.stop.set()
        chaos.stop_up()
    report = "\n".join(lines + [f"{k}: {v}" for k, v in counts.items()])
    assert violations(counts) == 0, report
    assert chaos.tally.kills["power loss"] == 2 and chaos.tally.kills["SIGSTOP past the lease"] == 1, report
    assert counts["jobs completed with their own result"] == len(chaos.tally.jobs) > 100, report
    assert counts["attestations stored exactly once"] == len(chaos.tally.attestations) > 100, report
    assert counts["LMDB environments that open clean"] == 2, report


def test_a_short_chaos_run_on_postgresql_keeps_every_invariant(home, pg_url):  # noqa: F811
    """The same faults, fewer of them, with both stores in PostgreSQL: a power loss
    leaves the lease to expire before the fresh up leads again."""
    lines: list[str] = []
    chaos = Chaos(home, seed=20261205, log=lines.append, store=pg_url)
    try:
        chaos.run(rounds=3, power=1, stops=1)
        counts = chaos.check()
    finally:
        chaos.stop.set()
        chaos.stop_up()
    report = "\n".join(lines + [f"{k}: {v}" for k, v in counts.items()])
    assert violations(counts) == 0, report
    assert chaos.tally.kills["power loss"] == 1 and chaos.tally.kills["SIGSTOP past the lease"] == 1, report
    assert counts["jobs completed with their own result"] == len(chaos.tally.jobs) > 50, report
    assert counts["attestations stored exactly once"] == len(chaos.tally.attestations) > 50, report
    assert counts["databases that check clean"] == 1, report
