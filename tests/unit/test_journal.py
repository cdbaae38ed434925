"""The attestation journal, and the store's replay of it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from qntx.ats.journal import Journal
from qntx.ats.store import AttestationStore
from qntx.errors import Unavailable
from qntx.protocol import Filter, NewAttestation

pytestmark = pytest.mark.timeout(60)


def entries(path) -> list[tuple[int, list[bytes]]]:
    journal = Journal(path, sync=False)
    try:
        return list(journal.read_all())
    finally:
        journal.close()


def test_entries_read_back_in_order_and_a_torn_last_one_is_ignored(tmp_path):
    path = tmp_path / "journal"
    journal = Journal(path, sync=False)
    journal.append(1, [b"a", b"bb"])
    journal.append(3, [b"ccc"])
    end = os.path.getsize(path)
    journal.close()
    assert entries(path) == [(1, [b"a", b"bb"]), (3, [b"ccc"])]
    with open(path, "r+b") as file:  # the last entry's body half written: its checksum fails
        data = file.read()
        at = data.index(b"ccc")
        file.seek(at)
        file.write(b"cXc")
    assert entries(path) == [(1, [b"a", b"bb"])]
    assert os.path.getsize(path) == end


def test_after_a_rewind_an_older_pass_further_on_is_not_read(tmp_path):
    path = tmp_path / "journal"
    journal = Journal(path, sync=False)
    journal.append(1, [b"x" * 100])
    journal.append(2, [b"y" * 100])
    journal.rewind()
    journal.append(3, [b"z" * 100])  # shorter than the two before: their tail stays in the file
    journal.close()
    assert entries(path) == [(3, [b"z" * 100])]


def test_one_process_writes_the_journal(tmp_path):
    journal = Journal(tmp_path / "journal", sync=False)
    try:
        with pytest.raises(Unavailable):
            Journal(tmp_path / "journal", sync=False)
    finally:
        journal.close()


def test_a_group_bigger_than_the_journal_grows_it(tmp_path):
    with AttestationStore(tmp_path / "ats", journal=True, sync=False) as store:
        big = [NewAttestation(subjects=[f"s{i}"], attributes={"pad": "x" * 4000}) for i in range(400)]
        [stored] = [s.records for s in store.log_batches([big])]
        assert len(stored) == 400
        store.apply_logged()
        assert [r.id for r in store.query(Filter(subjects=["s7"]))] == [stored[7].id]


def test_journaled_records_are_indexed_on_open_after_a_crash(tmp_path):
    """A process that journals and dies before writing the indexes loses nothing:
    the next one to open the store replays the journal, each record once."""
    path = tmp_path / "ats"
    script = textwrap.dedent(f"""
        import os
        from qntx.ats.store import AttestationStore
        from qntx.protocol import NewAttestation
        store = AttestationStore({str(path)!r}, journal=True)
        store.put_many([NewAttestation(subjects=["indexed"], predicates=["p"])])
        ids = []
        for i in range(5):
            for outcome in store.log_batches([[NewAttestation(subjects=[f"s{{i}}-{{k}}"], predicates=["p"]) for k in range(3)]]):
                ids += [r.id for r in outcome.records]
        assert store.logged == 15
        print(" ".join(ids), flush=True)
        os._exit(0)  # no close: the indexes never see the 15
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    journaled = done.stdout.split()
    for _ in range(2):  # the second open replays nothing more
        with AttestationStore(path) as store:
            found = [r.id for r in store.query(Filter(predicates=["p"]))]
            assert sorted(found) == sorted([*journaled, *[r.id for r in store.query(Filter(subjects=["indexed"]))]])
            assert store.count() == 16
    with AttestationStore(path, journal=True) as store:  # and numbering goes on after them
        [record] = store.put_many([NewAttestation(subjects=["after"], predicates=["p"])])
        assert store.query(Filter(predicates=["p"]))[0].id == record.id


def test_reads_see_journaled_records_before_their_index_write(tmp_path):
    """Normally the ATS actor holds reads until the indexes catch up; when they cannot
    (a full disk), get, query pages and the count still see journaled records, in order."""
    with AttestationStore(tmp_path / "ats", journal=True, sync=False) as store:
        indexed = store.put_many([NewAttestation(subjects=[f"s{i}"], predicates=["p"], timestamp=i * 10) for i in range(5)])
        [outcome] = store.log_batches([[NewAttestation(subjects=[f"t{i}"], predicates=["p"], timestamp=i * 10 + 5) for i in range(5)]])
        logged = outcome.records
        assert store.logged == 5
        found, flt = [], Filter(predicates=["p"])
        while flt is not None:
            records, cursor = store.query_page(flt, page=3)
            assert len(records) <= 3
            found += records
            flt = None if cursor is None else Filter(predicates=["p"], cursor=cursor)
        expected = sorted([*indexed, *logged], key=lambda r: r.timestamp, reverse=True)
        assert [r.id for r in found] == [r.id for r in expected]
        assert [r.id for r in store.query(Filter(subjects=["t3"]))] == [logged[3].id]
        assert store.get(logged[2].id) == logged[2]
        assert store.stats()["attestations"] == 10


def test_a_direct_write_first_indexes_what_a_dead_journal_holder_left(tmp_path):
    """A store opened while an ATS holds the journal cannot replay it; once that
    holder dies with records journaled and not indexed, a direct write indexes them
    first, under the journal's lock, so numbers never collide and nothing is lost."""
    path = tmp_path / "ats"
    script = textwrap.dedent(f"""
        import os, sys
        from qntx.ats.store import AttestationStore
        from qntx.protocol import NewAttestation
        store = AttestationStore({str(path)!r}, journal=True)
        [outcome] = store.log_batches([[NewAttestation(subjects=[f"left{{k}}"], predicates=["p"]) for k in range(3)]])
        print(" ".join(r.id for r in outcome.records), flush=True)
        sys.stdin.readline()
        os._exit(0)  # dies holding the journal, its records not indexed
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        left = holder.stdout.readline().split()
        assert len(left) == 3
        with AttestationStore(path) as store:  # the holder still runs: no replay here
            assert store.count() == 0
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(10) == 0
            [mine] = store.put_many([NewAttestation(subjects=["mine"], predicates=["p"])])
            assert sorted(r.id for r in store.query(Filter(predicates=["p"]))) == sorted([*left, mine.id])
            assert store.query(Filter(predicates=["p"]))[0].id == mine.id  # numbered after them
            assert store.count() == 4
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_an_index_write_that_failed_is_made_whole_by_the_next(tmp_path):
    """The indexes fall behind the journal when their write fails (a full disk); the
    next write, once there is room, indexes every journaled record, the failed
    write's ones too."""
    store = AttestationStore(tmp_path / "ats", map_size=256 << 10, max_map_size=1 << 20, sync=False, journal=True)
    try:
        pad = {"pad": "x" * 2_000}
        first = store.log_batches([[NewAttestation(subjects=[f"a{i}"], predicates=["p"], attributes=pad) for i in range(400)]])
        with pytest.raises(Unavailable, match="disk full"):
            store.apply_logged()
        second = store.log_batches([[NewAttestation(subjects=["b"], predicates=["p"])]])
        store._env._max_map_size = 8 << 20  # room made (space freed on the disk)
        assert store.apply_logged() == 401
        logged = [r.id for r in first[0].records + second[0].records]
        assert store.count() == 401
        assert sorted(r.id for r in store.query(Filter(predicates=["p"], limit=1000))) == sorted(logged)
        assert store.stats()["attestations"] == 401
    finally:
        store.close()
