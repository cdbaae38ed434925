"""A shortened chaos run (``bin/chaos`` runs the full one): jobs and attestations
flow while actors are killed at random, a worker is stopped past its lease and the
whole group loses power; every invariant must hold."""

from __future__ import annotations

import pytest

from tests.chaos import Chaos, violations

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
