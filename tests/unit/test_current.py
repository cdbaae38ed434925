"""What is current follows the store's commit order (``Attestation.seq``), never the
timestamp a client claimed (issue: a handler attested a year ahead hid every later one)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qntx.ats.current import latest, latest_per
from qntx.ats.store import AttestationStore
from qntx.protocol import Filter, NewAttestation
from qntx.pulse.directives import LIMIT, directive_attestation
from qntx.pulse.directives import resolve as resolve_directives
from qntx.stored_handlers import HANDLER_FILTER, handler_attestation, resolve, tombstone_attestation

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
YEAR_MS = 365 * 24 * 3600 * 1000


@pytest.fixture
def store(tmp_path: Path):
    with AttestationStore(tmp_path / "ats", sync=False) as store:
        yield store


def test_seq_grows_with_every_stored_record(store):
    first = store.put_many([NewAttestation(subjects=["a"]), NewAttestation(subjects=["b"])])
    second = store.put_many([NewAttestation(subjects=["c"], timestamp=1)])
    seqs = [r.seq for r in first + second]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and seqs[0] >= 1
    assert store.get(second[0].id).seq == seqs[2]


def test_a_future_timestamp_does_not_hide_a_later_handler(store):
    now = 1_800_000_000_000
    ahead = handler_attestation("report", "print('from the future')")
    ahead.timestamp = now + YEAR_MS
    store.put_many([ahead], now_ms=now)
    store.put_many([handler_attestation("report", "print('today')")], now_ms=now + 1000)
    assert resolve(store.query(HANDLER_FILTER)).current["report"].attributes["code"] == "print('today')"
    store.put_many([tombstone_attestation("report")], now_ms=now + 2000)
    assert "report" not in resolve(store.query(HANDLER_FILTER)).current


def test_a_future_timestamp_does_not_hide_a_later_limit(store):
    ahead = directive_attestation(LIMIT, "python.x", {"concurrency": 1})
    ahead.timestamp = 10**15
    store.put_many([ahead])
    store.put_many([directive_attestation(LIMIT, "python.x", {"concurrency": 7})])
    limits = resolve_directives(store.query(Filter(contexts=["pulse"]))).limits
    assert limits["python.x"].concurrency == 7


def test_records_without_seq_fall_back_to_timestamp_order(store):
    old_new, old_old = (r for r in store.put_many([NewAttestation(subjects=["x"]), NewAttestation(subjects=["x"])]))
    import msgspec

    unseq = [msgspec.structs.replace(old_new, seq=0, timestamp=2), msgspec.structs.replace(old_old, seq=0, timestamp=1)]
    assert latest(unseq) is unseq[0]  # newest timestamp first, as queries return them
    stored = store.put_many([NewAttestation(subjects=["x"], timestamp=0)])[0]
    assert latest([*unseq, stored]) is stored
    assert latest_per([*unseq, stored], lambda r: r.subjects)["x"] is stored


def test_another_process_writing_between_two_batches_is_renumbered(tmp_path: Path):
    """Two processes on one store: a batch prepared from a stale counter is renumbered
    in the write transaction, so no two records share a seq (or a time-index key)."""
    path = tmp_path / "ats"
    with AttestationStore(path, sync=False) as store:
        mine = store.put_many([NewAttestation(subjects=["a"], timestamp=5)])
        other = textwrap.dedent(f"""
            from qntx.ats.store import AttestationStore
            from qntx.protocol import NewAttestation
            with AttestationStore({str(path)!r}, sync=False) as s:
                s.put_many([NewAttestation(subjects=["b"], timestamp=5) for _ in range(3)])
        """)
        subprocess.run([sys.executable, "-c", other], check=True, cwd=REPO, timeout=30)
        later = store.put_many([NewAttestation(subjects=["c"], timestamp=5) for _ in range(2)])
        everything = store.query(Filter(time_start=5, time_end=5))
        assert len(everything) == 6  # nothing overwritten in the time index
        seqs = sorted(r.seq for r in everything)
        assert seqs == list(range(seqs[0], seqs[0] + 6))
        assert min(r.seq for r in later) > max(r.seq for r in everything if r.subjects == ["b"])
        assert mine[0].seq < min(r.seq for r in later)
