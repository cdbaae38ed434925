"""The attestation store on both backends (LMDB and PostgreSQL): writes, validation,
group commit, queries, pages; and LMDB's own planner, map growth and readers.

The contract tests take the ``store`` (or ``backend``) fixture and run once per
backend; the PostgreSQL runs use the real server of ``tests/pg.py`` (skipped with one
line where PostgreSQL is not installed)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qntx.asid import is_asid
from qntx.ats.store import MAX_JOINED_VALUES, AttestationStore, next_page
from qntx.errors import Conflict, Invalid, Unavailable
from qntx.protocol import Attestation, Filter, NewAttestation
from tests.pg import TEMPLATE, pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000_000


class LmdbBackend:
    name = "lmdb"

    def __init__(self, path: Path):
        self.path = path
        self.location = str(path)

    def open(self, **options):
        return AttestationStore(self.path, **{"sync": False, **options})

    @contextlib.contextmanager
    def fresh(self):
        """An empty store (one per Hypothesis example)."""
        with tempfile.TemporaryDirectory() as tmp:
            with AttestationStore(tmp, map_size=1 << 20, sync=False) as store:
                yield store


class PgBackend:
    name = "postgresql"

    def __init__(self, url: str):
        from qntx.db import redact

        self.url = url
        self.location = redact(url)

    def open(self, **lmdb_options):  # map sizes and syncing are LMDB's
        from qntx.ats.store_pg import PgAttestationStore

        return PgAttestationStore(self.url)

    @contextlib.contextmanager
    def fresh(self):
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("TRUNCATE ats_attestations")
            conn.execute("UPDATE ats_meta SET seq = 0, count = 0")
        with self.open() as store:
            yield store


@pytest.fixture(params=["lmdb", "postgresql"])
def backend(request, tmp_path: Path):
    if request.param == "lmdb":
        yield LmdbBackend(tmp_path / "ats")
        return
    server = request.getfixturevalue("pg_server")
    name = server.new_database(TEMPLATE)
    try:
        yield PgBackend(server.url(name))
    finally:
        server.drop(name)


@pytest.fixture
def store(backend):
    with backend.open() as store:
        yield store


@pytest.fixture
def lmdb_store(tmp_path: Path):
    with AttestationStore(tmp_path / "ats", sync=False) as store:
        yield store


def lmdb(store) -> bool:
    """Whether ``store`` is LMDB's, whose planner the tests also watch."""
    return isinstance(store, AttestationStore)


def new(subject: str = "alice", **fields) -> NewAttestation:
    return NewAttestation(subjects=[subject], **fields)


def ids(records: list[Attestation]) -> list[str]:
    return [r.id for r in records]


# ---------------------------------------------------------------- writes


def test_put_get_round_trip(store: AttestationStore) -> None:
    [record] = store.put_many(
        [
            NewAttestation(
                subjects=["vacancies"],
                predicates=["handler"],
                contexts=["python"],
                actors=["vacancies"],
                timestamp=NOW,
                source="qntx-cli",
                attributes={"code": "print('hi')", "nested": {"n": [1, 2.5, None, True]}},
            )
        ],
        now_ms=NOW + 5,
    )
    assert record.id.startswith("AS-VACANCIE-HANDLER-PYTHON-") and is_asid(record.id)
    assert store.get(record.id) == record
    assert record.timestamp == NOW and record.created_at == NOW + 5
    assert record.source == "qntx-cli"
    assert record.attributes == {"code": "print('hi')", "nested": {"n": [1, 2.5, None, True]}}
    assert store.count() == 1


def test_defaults(store: AttestationStore) -> None:
    [a, b] = store.put_many([new(), new("bob", predicates=[], contexts=[], source="")], now_ms=NOW)
    for record in (a, b):
        assert record.predicates == ["_"] and record.contexts == ["_"]
        assert record.actors == []
        assert record.timestamp == NOW and record.created_at == NOW
        assert record.source == "python"
        assert record.attributes == {}
    assert a.id.startswith("AS-ALICE---")


def test_default_timestamp_is_now(store: AttestationStore) -> None:
    import time

    before = time.time_ns() // 1_000_000
    [record] = store.put_many([new()])
    after = time.time_ns() // 1_000_000
    assert before <= record.timestamp == record.created_at <= after


def test_explicit_id_is_kept(store: AttestationStore) -> None:
    [record] = store.put_many([new(id="AS-MINE---22222222")])
    assert record.id == "AS-MINE---22222222"
    assert store.get("AS-MINE---22222222") == record


def test_get_missing(store: AttestationStore) -> None:
    assert store.get("AS-NOPE---22222222") is None
    assert store.get("") is None
    assert store.get("x" * 600) is None


@pytest.mark.parametrize(
    "item",
    [
        NewAttestation(subjects=[]),
        NewAttestation(subjects=[""]),
        NewAttestation(subjects=["a", ""]),
        NewAttestation(subjects=[3]),  # type: ignore[list-item]
        NewAttestation(subjects="alice"),  # type: ignore[arg-type]
        NewAttestation(subjects=["a"], predicates=[""]),
        NewAttestation(subjects=["a"], contexts=[None]),  # type: ignore[list-item]
        NewAttestation(subjects=["a"], actors=[""]),
        NewAttestation(subjects=["a\x00b"]),
        NewAttestation(subjects=["a"], actors=["x\x00"]),
        NewAttestation(subjects=["a"], source="s\x00"),
        NewAttestation(subjects=["a"], timestamp=-1),
        NewAttestation(subjects=["a"], timestamp=1.5),  # type: ignore[arg-type]
        NewAttestation(subjects=["a"], timestamp=True),  # type: ignore[arg-type]
        NewAttestation(subjects=["a"], timestamp=1 << 63),
        NewAttestation(subjects=["a"], attributes={1: "int key"}),  # type: ignore[dict-item]
        NewAttestation(subjects=["a"], attributes={"x": object()}),
        NewAttestation(subjects=["a"], attributes={"x": 1 << 70}),
        NewAttestation(subjects=["a"], attributes=["not", "a", "map"]),  # type: ignore[arg-type]
        NewAttestation(subjects=["a"], id=""),
        NewAttestation(subjects=["a"], id="x" * 600),
        "not an attestation",
    ],
)
def test_invalid_items_are_rejected(store: AttestationStore, item) -> None:
    with pytest.raises(Invalid):
        store.put_many([new("fine"), item])
    assert store.count() == 0  # the good item of the batch was not written either


def test_attributes_are_bounded_in_depth(store: AttestationStore) -> None:
    deep: dict = {"k": None}
    for _ in range(15):
        deep = {"k": [deep]}  # two levels each: a map and a list
    deep = {"top": deep}
    store.put_many([new(attributes=deep)])  # 32 levels: the limit
    with pytest.raises(Invalid, match="deeper than 32"):
        store.put_many([new(attributes={"top": [deep]})])


def test_a_bad_batch_does_not_stop_the_others(store: AttestationStore) -> None:
    good1, bad, good2 = store.put_batches(
        [[new("a1"), new("a2")], [new("b1"), new("")], [new("c1")]]
    )
    assert isinstance(bad, Invalid)
    assert [r.subjects for r in good1] == [["a1"], ["a2"]]
    assert [r.subjects for r in good2] == [["c1"]]
    assert store.count() == 3
    assert store.query(Filter(subjects=["b1"])) == []


def test_duplicate_explicit_id_conflicts_and_writes_nothing_of_its_batch(
    store: AttestationStore,
) -> None:
    store.put_many([new(id="X1")])
    results = store.put_batches(
        [
            [new("first")],
            [new("dup-of-stored"), new("x", id="X1")],  # id already stored
            [new("second", id="X2")],
            [new("dup-in-txn", id="X2")],  # id taken by the batch before, same txn
            [new("dup-in-batch-1", id="X3"), new("dup-in-batch-2", id="X3")],
            [new("third")],
        ]
    )
    kinds = [type(r).__name__ if not isinstance(r, list) else "ok" for r in results]
    assert kinds == ["ok", "Conflict", "ok", "Conflict", "Conflict", "ok"]
    assert all(isinstance(r, Conflict) for r in (results[1], results[3], results[4]))
    assert store.count() == 4  # X1, first, X2, third
    for subject in ("dup-of-stored", "dup-in-txn", "dup-in-batch-1", "dup-in-batch-2"):
        assert store.query(Filter(subjects=[subject])) == []
    assert store.get("X2").subjects == ["second"]
    assert store.get("X3") is None
    with pytest.raises(Conflict):
        store.put_many([new(id="X1")])


def test_a_generated_id_that_is_taken_is_drawn_again(
    store: AttestationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id is drawn before the transaction; one that is stored already, or that an
    explicit id of the same batch claims, is replaced by a fresh draw (and re-encoded)."""
    import qntx.ats.batch as batch_module
    import qntx.ats.records as records_module

    [stored] = store.put_many([new(id="AS-TAKEN---22222222")])
    draws = iter(["AS-TAKEN---22222222", "AS-MINE---33333333", "AS-FREE---44444444"])
    # The first draw is made with the item's checks (records), the next ones by the store.
    monkeypatch.setattr(records_module, "new_asid", lambda *parts: next(draws))
    monkeypatch.setattr(batch_module, "new_asid", lambda *parts: next(draws))
    # The first draw hits the stored id, the second the explicit id later in the batch.
    generated, explicit = store.put_many([new("gen"), new("exp", id="AS-MINE---33333333")])
    assert generated.id == "AS-FREE---44444444"
    assert explicit.id == "AS-MINE---33333333"
    assert store.get(generated.id) == generated and store.get(explicit.id) == explicit
    assert store.get(stored.id) == stored  # not overwritten
    assert store.count() == 3


def test_counts_add_up_across_batches_and_transactions(store: AttestationStore) -> None:
    """The planner's counts are summed per transaction and written once per value."""
    store.put_batches([[new("a", predicates=["p"])] * 3, [new("b", predicates=["P", "p"])]])
    store.put_many([new("c", predicates=["p"])])
    assert len(store.query(Filter(predicates=["p"]))) == 5
    # "P" and "p" in one record are one entry: the counts say 5, so a field with
    # 5 + 1 candidates is not chosen over it.
    for name in ("x", "y", "z", "w", "v", "u"):
        store.put_many([new(name, contexts=["ctx"])])
    found = store.query(Filter(predicates=["p"], contexts=["ctx"]))
    assert found == []
    if lmdb(store):
        assert store.last_query_plan == ["predicates", "contexts"]
        assert store.last_query_scanned == 0  # the intersection is empty: nothing is read


def test_item_lists_are_copied(store: AttestationStore) -> None:
    item = new("alice", predicates=["p"])
    [record] = store.put_many([item])
    item.subjects.append("mallory")
    assert record.subjects == ["alice"] and store.get(record.id).subjects == ["alice"]


def test_empty_batches(store: AttestationStore) -> None:
    assert store.put_batches([]) == []
    assert store.put_batches([[]]) == [[]]
    assert store.put_many([]) == []


def test_stats(store: AttestationStore, backend) -> None:
    store.put_many([new(), new()])
    stats = store.stats()
    assert stats["attestations"] == 2
    assert stats["path"] == backend.location
    assert 0 < stats["used_bytes"]
    assert stats["used_bytes"] <= stats["map_size"] if lmdb(store) else stats["map_size"] == 0
    assert set(stats) == {"attestations", "map_size", "used_bytes", "path"}


# ---------------------------------------------------------------- queries


@pytest.fixture
def people(store: AttestationStore) -> dict[str, Attestation]:
    items = {
        "alice_eng": NewAttestation(
            subjects=["Alice"], predicates=["engineer"], contexts=["ACME"], actors=["hr"],
            timestamp=NOW + 1, source="qntx-cli",
        ),
        "bob_eng": NewAttestation(
            subjects=["bob"], predicates=["Engineer"], contexts=["acme"], actors=["HR"],
            timestamp=NOW + 2, source="python",
        ),
        "alice_mgr": NewAttestation(
            subjects=["alice"], predicates=["manager"], contexts=["globex"], actors=["board"],
            timestamp=NOW + 3, source="python",
        ),
        "carol_both": NewAttestation(
            subjects=["carol", "CAROL", "Carol R."], predicates=["engineer", "manager"],
            contexts=["acme", "globex"], actors=["hr", "board"], timestamp=NOW + 4,
            source="importer",
        ),
        "strasse": NewAttestation(
            subjects=["Straße"], predicates=["street"], timestamp=NOW + 5,
        ),
    }  # fmt: skip
    records = store.put_many(list(items.values()))
    return dict(zip(items, records, strict=True))


def names(people: dict[str, Attestation], records: list[Attestation]) -> list[str]:
    by_id = {r.id: name for name, r in people.items()}
    return [by_id[r.id] for r in records]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (Filter(), ["strasse", "carol_both", "alice_mgr", "bob_eng", "alice_eng"]),
        (Filter(subjects=["alice"]), ["alice_mgr", "alice_eng"]),
        (Filter(subjects=["ALICE", "Bob"]), ["alice_mgr", "bob_eng", "alice_eng"]),
        (Filter(subjects=["carol"]), ["carol_both"]),  # carol and CAROL: one result
        (Filter(subjects=["carol r."]), ["carol_both"]),
        (Filter(subjects=["car"]), []),  # exact values, not prefixes
        (Filter(subjects=["strasse"]), ["strasse"]),  # casefold: ß == ss
        (Filter(subjects=["STRASSE"]), ["strasse"]),
        (Filter(predicates=["ENGINEER"]), ["carol_both", "bob_eng", "alice_eng"]),
        (Filter(predicates=["engineer", "manager"]), ["carol_both", "alice_mgr", "bob_eng", "alice_eng"]),
        (Filter(predicates=["_"]), []),
        (Filter(contexts=["_"]), ["strasse"]),
        (Filter(contexts=["Globex"]), ["carol_both", "alice_mgr"]),
        (Filter(actors=["hr"]), ["carol_both", "bob_eng", "alice_eng"]),
        (Filter(actors=["nobody"]), []),
        (Filter(source="python"), ["strasse", "alice_mgr", "bob_eng"]),
        (Filter(source="QNTX-CLI"), ["alice_eng"]),
        (Filter(source="qntx"), []),
        # AND across fields
        (Filter(subjects=["alice"], predicates=["engineer"]), ["alice_eng"]),
        (Filter(predicates=["engineer"], contexts=["globex"]), ["carol_both"]),
        (Filter(predicates=["manager"], actors=["hr"]), ["carol_both"]),
        (Filter(subjects=["alice", "bob"], predicates=["engineer"], contexts=["acme"], actors=["hr"]), ["bob_eng", "alice_eng"]),
        (Filter(subjects=["alice"], source="python"), ["alice_mgr"]),
        (Filter(subjects=["alice"], predicates=["street"]), []),
        # time range, inclusive at both ends
        (Filter(time_start=NOW + 2, time_end=NOW + 4), ["carol_both", "alice_mgr", "bob_eng"]),
        (Filter(time_start=NOW + 3), ["strasse", "carol_both", "alice_mgr"]),
        (Filter(time_end=NOW + 1), ["alice_eng"]),
        (Filter(time_start=NOW + 3, time_end=NOW + 3), ["alice_mgr"]),
        (Filter(time_start=NOW + 4, time_end=NOW + 3), []),
        (Filter(time_end=-5), []),
        (Filter(time_start=-5, time_end=NOW + 1), ["alice_eng"]),
        (Filter(predicates=["engineer"], time_start=NOW + 2, time_end=NOW + 2), ["bob_eng"]),
        (Filter(subjects=["alice", "bob"], time_start=NOW + 2), ["alice_mgr", "bob_eng"]),
        # limit, applied after filtering, newest first
        (Filter(limit=2), ["strasse", "carol_both"]),
        (Filter(predicates=["engineer", "manager"], limit=3), ["carol_both", "alice_mgr", "bob_eng"]),
        (Filter(subjects=["alice"], limit=100), ["alice_mgr", "alice_eng"]),
    ],
)  # fmt: skip
def test_query(store: AttestationStore, people, flt: Filter, expected: list[str]) -> None:
    assert names(people, store.query(flt)) == expected


@pytest.mark.parametrize(
    "flt",
    [
        Filter(limit=0),
        Filter(limit=-1),
        Filter(limit=True),  # type: ignore[arg-type]
        Filter(subjects=[""]),
        Filter(subjects=["a\x00"]),
        Filter(subjects="alice"),  # type: ignore[arg-type]
        Filter(predicates=[7]),  # type: ignore[list-item]
        Filter(source=""),
        Filter(time_start="yesterday"),  # type: ignore[arg-type]
        Filter(time_end=1.5),  # type: ignore[arg-type]
        {"subjects": ["alice"]},
        Filter(subjects=[f"s{i}" for i in range(1_001)]),  # more values than one page may OR
    ],
)
def test_invalid_filters(store: AttestationStore, flt) -> None:
    with pytest.raises(Invalid):
        store.query(flt)


def test_equal_timestamps_come_newest_written_first(store: AttestationStore) -> None:
    first = store.put_many([new(predicates=["p"], timestamp=NOW) for _ in range(3)])
    second = store.put_many([new(predicates=["p"], timestamp=NOW) for _ in range(2)])
    older = store.put_many([new(predicates=["p"], timestamp=NOW - 1)])
    expected = ids(second[::-1] + first[::-1] + older)
    assert ids(store.query(Filter())) == expected
    assert ids(store.query(Filter(subjects=["alice"]))) == expected
    assert ids(store.query(Filter(subjects=["alice"], predicates=["p"], limit=4))) == expected[:4]


def test_long_values_that_share_an_index_prefix(store: AttestationStore) -> None:
    base = "x" * 600  # longer than an LMDB key: the index keeps a prefix only
    a, b = store.put_many([new(base + "a"), new(base + "b")])
    assert ids(store.query(Filter(subjects=[base + "A"]))) == [a.id]
    assert ids(store.query(Filter(subjects=[base + "b"]))) == [b.id]
    assert store.query(Filter(subjects=[base])) == []


def test_the_planner_walks_the_most_selective_index(lmdb_store: AttestationStore) -> None:
    store = lmdb_store
    common = [new(f"user{i % 100}", predicates=["knows"], contexts=["work"]) for i in range(20_000)]
    rare = [new(f"user{i}", predicates=["rare"], contexts=["work"]) for i in range(3)]
    common[5_000:5_000] = rare[:1]
    common[12_000:12_000] = rare[1:]
    store.put_many(common)
    assert store.count() == 20_003

    assert len(store.query(Filter(predicates=["rare"]))) == 3
    assert store.last_query_scanned == 3
    # "work" and "user1" are common, "rare" is not: the planner must drive with the
    # subject-predicate pairs (2 records), not the broad fields.
    found = store.query(Filter(subjects=["user1", "user2"], predicates=["rare"], contexts=["work"]))
    assert [r.subjects for r in found] == [["user2"], ["user1"]]
    assert store.last_query_plan == ["subject_predicate", "contexts"]
    assert store.last_query_scanned == 2  # only the records every field carries are read
    # A value nobody carries ends the query before any record is read.
    assert store.query(Filter(contexts=["work"], actors=["nobody"])) == []
    assert store.last_query_scanned == 0
    # A limit stops the walk early.
    assert len(store.query(Filter(contexts=["work"], limit=10))) == 10
    assert store.last_query_scanned == 10
    # OR across two values still reads only their entries, each record once.
    found = store.query(Filter(subjects=["user7", "user8"]))
    assert len(found) == 400
    assert store.last_query_scanned == len(found)


# ---------------------------------------------------------------- the environment


def test_map_grows_from_a_tiny_map(tmp_path: Path) -> None:
    with AttestationStore(tmp_path / "ats", map_size=64 << 10, sync=False) as store:
        start = store.stats()["map_size"]
        for i in range(40):
            store.put_many(
                [
                    new(f"s{i}-{j}", predicates=["p"], attributes={"pad": "x" * 100})
                    for j in range(100)
                ]
            )
        # one large group too, so a single transaction has to outgrow the map
        store.put_batches([[new(f"big{j}", predicates=["p"])] for j in range(2000)])
        stats = store.stats()
        assert stats["attestations"] == 6000
        assert stats["map_size"] > start
        assert len(store.query(Filter(predicates=["p"]))) == 6000


def test_a_map_at_its_configured_maximum_refuses_writes_and_keeps_reads(tmp_path: Path) -> None:
    path = tmp_path / "ats"
    with AttestationStore(path, map_size=256 << 10, max_map_size=1 << 20, sync=False) as store:
        kept = store.put_many([new("kept")])[0]
        with pytest.raises(Unavailable, match="disk full: .* maximum map size of 1 MiB"):
            for i in range(1_000):
                store.put_many([new(f"s{i}", attributes={"pad": "x" * 2_000})])
        written = store.count()
        assert store.stats()["map_size"] == 1 << 20
        assert store.get(kept.id) == kept  # reads go on
        assert len(store.query(Filter())) == written
        with pytest.raises(Unavailable):  # nothing half-written: the count is the same
            store.put_many([new("big", attributes={"pad": "x" * 200_000})])
        assert store.count() == written
    # A larger maximum (a config change and a restart) makes room again.
    with AttestationStore(path, map_size=256 << 10, max_map_size=4 << 20, sync=False) as store:
        store.put_many([new("again", attributes={"pad": "x" * 2_000})])
        assert store.count() == written + 1


def test_reopen_persists(backend) -> None:
    with backend.open(map_size=64 << 10, sync=True) as store:
        before = store.put_many([new(predicates=["p"], timestamp=NOW) for _ in range(500)])
    with backend.open(map_size=64 << 10, sync=True) as store:
        assert store.count() == 500
        assert store.get(before[0].id) == before[0]
        after = store.put_many([new(predicates=["p"], timestamp=NOW)])
        # the sequence continues across reopen, so ties still order by write
        assert ids(store.query(Filter(predicates=["p"], limit=2))) == [after[0].id, before[-1].id]
        with pytest.raises(Conflict):
            store.put_many([new(id=before[3].id)])


def test_readonly(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        AttestationStore(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()
    with AttestationStore(tmp_path / "ats") as store:
        [record] = store.put_many([new()])
    with AttestationStore(tmp_path / "ats", readonly=True) as store:
        assert store.get(record.id) == record
        assert ids(store.query(Filter(subjects=["alice"]))) == [record.id]
        with pytest.raises(Unavailable):
            store.put_many([new()])


READER = textwrap.dedent(
    """
    import json, pathlib, sys
    from qntx.ats.store import MAX_JOINED_VALUES, AttestationStore, next_page
    from qntx.protocol import Filter

    path, stop = sys.argv[1], pathlib.Path(sys.argv[2])
    # a tiny map, so the writer's growth forces this process to adopt the new size
    store = AttestationStore(path, map_size=64 << 10, readonly=True)
    print("ready", flush=True)
    counts, errors = [], []
    while True:
        done = stop.exists()
        try:
            n = store.count()
            newest = store.query(Filter(predicates=["p"], limit=3))
            if n and len(newest) != min(n, 3):
                errors.append(f"count {n} but {len(newest)} newest")
            counts.append(n)
        except Exception as exc:
            errors.append(repr(exc))
        if done:
            break
    print(json.dumps({"counts": counts, "errors": errors[:5]}), flush=True)
    """
)


def test_another_process_reads_while_the_map_grows(tmp_path: Path) -> None:
    path, stop = tmp_path / "ats", tmp_path / "stop"
    with AttestationStore(path, map_size=64 << 10) as store:
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(path), str(stop)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert reader.stdout.readline().strip() == "ready"
            for i in range(60):
                store.put_many([new(f"s{i}-{j}", predicates=["p"]) for j in range(50)])
            assert store.stats()["map_size"] > 64 << 10
            stop.touch()
            out, _ = reader.communicate(timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
    report = json.loads(out)
    assert report["errors"] == []
    counts = report["counts"]
    assert counts == sorted(counts)  # never goes back in time
    assert counts[-1] == 3000
    assert len(set(counts)) > 2  # it really read while the writes were going on


# ---------------------------------------------------------------- against a model

# with what SQL array literals must escape, and a word that is NULL when unquoted there
VALUES = ["alice", "Alice", "bob", "BOB", "ß", "SS", "ss", "x", "_", 'q"u\\o{t,e} ', "NULL"]
values = st.sampled_from(VALUES)
new_attestations = st.builds(
    NewAttestation,
    subjects=st.lists(values, min_size=1, max_size=3),
    predicates=st.lists(values, max_size=2),
    contexts=st.lists(values, max_size=2),
    actors=st.lists(values, max_size=2),
    timestamp=st.integers(0, 5),
    source=st.sampled_from(["python", "Python", "cli", ""]),
)
filters = st.builds(
    Filter,
    subjects=st.lists(values, max_size=2),
    predicates=st.lists(values, max_size=2),
    contexts=st.lists(values, max_size=2),
    actors=st.lists(values, max_size=2),
    time_start=st.none() | st.integers(-1, 6),
    time_end=st.none() | st.integers(-1, 6),
    source=st.none() | st.sampled_from(["python", "PYTHON", "cli", "other"]),
    limit=st.none() | st.integers(1, 6),
)


def reference_query(records: list[Attestation], flt: Filter) -> list[str]:
    """The obvious, slow answer: filter a list, sort newest first, cut."""

    def hit(wanted: list[str], have: list[str]) -> bool:
        return not wanted or bool({w.casefold() for w in wanted} & {h.casefold() for h in have})

    matching = [
        (r.timestamp, seq, r.id)
        for seq, r in enumerate(records)
        if hit(flt.subjects, r.subjects)
        and hit(flt.predicates, r.predicates)
        and hit(flt.contexts, r.contexts)
        and hit(flt.actors, r.actors)
        and (flt.time_start is None or r.timestamp >= flt.time_start)
        and (flt.time_end is None or r.timestamp <= flt.time_end)
        and (flt.source is None or r.source.casefold() == flt.source.casefold())
    ]
    matching.sort(reverse=True)
    return [id for _, _, id in matching][: flt.limit]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.lists(new_attestations, max_size=6), min_size=1, max_size=4),
    queries=st.lists(filters, min_size=1, max_size=8),
)
def test_query_matches_a_reference_model(backend, batches, queries) -> None:
    with backend.fresh() as store:
        records = [r for batch in store.put_batches(batches) for r in batch]
        for flt in queries:
            assert ids(store.query(flt)) == reference_query(records, flt)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.lists(new_attestations, max_size=8), min_size=1, max_size=5),
    queries=st.lists(filters, min_size=1, max_size=6),
    page=st.integers(1, 4),
    max_scan=st.integers(1, 3),
    max_seeks=st.integers(1, 5),
)
def test_tiny_pages_and_budgets_still_give_every_match_once(
    backend, batches, queries, page, max_scan, max_seeks
) -> None:
    """Pages that stop for their size or their work budget, anywhere in a walk or an
    intersection, resume exactly where they stopped."""
    with backend.fresh() as store:
        records = [r for batch in store.put_batches(batches) for r in batch]
        for flt in queries:
            found, current = [], flt
            for _ in range(10_000):
                if current is None:
                    break
                got, cursor = store.query_page(
                    current, page=page, max_scan=max_scan, max_seeks=max_seeks
                )
                found += got
                current = next_page(flt, cursor, len(found))
            assert current is None, "the pages never ended"
            assert ids(found) == reference_query(records, flt)


def test_an_and_of_two_broad_fields_reads_only_the_common_records(store) -> None:
    """subjects=alice AND predicates=knows, each carried by many records, few by both:
    the intersection of their posting lists finds the few without reading the rest."""
    items = []
    for i in range(3_000):
        kind = i % 50
        if kind == 0:
            items.append(new("alice", predicates=["knows"], timestamp=i))
        elif kind % 2:
            items.append(new("alice", predicates=["likes"], timestamp=i))
        else:
            items.append(new("bob", predicates=["knows"], timestamp=i))
    made = store.put_many(items)
    common = [r for r in reversed(made) if r.subjects == ["alice"] and r.predicates == ["knows"]]
    both = ids(common)
    assert len(both) == 60
    flt = Filter(subjects=["ALICE"], predicates=["knows"])
    records, cursor = store.query_page(flt)
    assert ids(records) == both and cursor is None
    if lmdb(store):
        assert store.last_query_scanned == 60
        assert store.last_query_plan == ["subject_predicate"]  # one list: the records with both
    # The same over a time range and with a limit.
    early = Filter(subjects=["alice"], predicates=["knows"], time_start=100, time_end=999)
    assert ids(store.query(early)) == [r.id for r in common if 100 <= r.timestamp <= 999]
    assert ids(store.query(Filter(subjects=["alice"], predicates=["knows"], limit=5))) == both[:5]
    assert store.last_query_scanned == 5  # a limit stops the walk (or the SQL) early


def test_the_pair_index_is_built_for_a_store_made_without_it(tmp_path) -> None:
    """A store written before the pair index existed gets it when next opened."""
    from qntx.ats import store as module

    path = tmp_path / "ats"
    first = AttestationStore(path)
    made = first.put_many([new(f"s{i % 7}", predicates=[f"p{i % 5}"], timestamp=i) for i in range(500)])
    pairs = first._index[module.PAIR]

    def forget(txn) -> None:  # as an older version left it: no pair entries, no flag
        txn.drop(pairs, delete=False)
        txn.delete(module._PAIRS_BUILT, db=first._meta)
        for key in [k for k, _ in txn.cursor(db=first._counts) if k.startswith(b"subject_predicate:")]:
            txn.delete(key, db=first._counts)

    first._env.write(forget)
    first.close()
    again = AttestationStore(path)
    expected = [r.id for r in reversed(made) if r.subjects == ["s3"] and r.predicates == ["p2"]]
    assert ids(again.query(Filter(subjects=["s3"], predicates=["p2"]))) == expected
    assert again.last_query_plan == ["subject_predicate"] and again.last_query_scanned == len(expected)
    again.close()


def test_a_field_of_many_values_is_checked_on_the_records_the_others_found(store) -> None:
    made = store.put_many([new(f"s{i}", contexts=["p" if i % 3 else "q"]) for i in range(60)])
    subjects = [f"s{i}" for i in range(MAX_JOINED_VALUES + 10)]
    found = store.query(Filter(subjects=subjects, contexts=["q"]))
    expected = [r.id for r in reversed(made) if r.contexts == ["q"] and r.subjects[0] in subjects]
    assert ids(found) == expected
    if lmdb(store):
        assert store.last_query_plan == ["contexts"]


def test_queries_come_in_bounded_pages_with_a_cursor(store: AttestationStore) -> None:
    made = store.put_many([new(f"s{n}", predicates=["p"], timestamp=1_000 + n) for n in range(7)])
    newest_first = list(reversed(ids(made)))
    records, cursor = store.query_page(Filter(predicates=["p"]), page=3)
    assert ids(records) == newest_first[:3] and cursor
    records, cursor = store.query_page(Filter(predicates=["p"], cursor=cursor), page=3)
    assert ids(records) == newest_first[3:6] and cursor
    records, cursor = store.query_page(Filter(predicates=["p"], cursor=cursor), page=3)
    assert ids(records) == newest_first[6:] and cursor is None
    # Work is bounded too: a page that read its share of records stops, with a cursor.
    records, cursor = store.query_page(Filter(subjects=["s0", "s1", "s2", "s3"], predicates=["p"]), max_scan=2)
    assert len(records) <= 2 and cursor
    assert ids(store.query(Filter(predicates=["p"]))) == newest_first  # query() pages itself
    assert ids(store.query(Filter(predicates=["p"], limit=4))) == newest_first[:4]
    with pytest.raises(Invalid):
        store.query_page(Filter(cursor="not-a-cursor"))


def test_reader_slots_of_killed_readers_are_freed(tmp_path: Path) -> None:
    """A process killed in the middle of a read leaves its reader slot behind (which
    pins old pages); clear_stale_readers frees it, and opening a store does too."""
    path = tmp_path / "ats"
    with AttestationStore(path) as store:
        reader = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import lmdb, os, signal
                env = lmdb.open({str(path)!r}, max_dbs=16, subdir=True)
                txn = env.begin()  # a read transaction, never ended
                print("reading", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            """)],
            stdout=subprocess.PIPE, text=True,
        )
        assert reader.stdout.readline().strip() == "reading"
        reader.wait(10)
        reader.stdout.close()
        assert store.clear_stale_readers() == 1
        assert store.clear_stale_readers() == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice", ["alice_mgr", "alice_eng"]),
        ("ALICE bob is ENGINEER", ["bob_eng", "alice_eng"]),
        ("is engineer manager of globex", ["carol_both", "alice_mgr"]),
        ("is manager by hr", ["carol_both"]),
        ("'carol r.' from ACME via HR", ["carol_both"]),
        ("STRASSE", ["strasse"]),
        ("alice bob carol is engineer of acme by hr", ["carol_both", "bob_eng", "alice_eng"]),
        ("is engineer manager since 2023-11-14T22:13:20.003Z", ["carol_both", "alice_mgr"]),  # NOW + 3
        ("bob until 2023-11-14T22:13:20.001Z", []),
        ("alice until 2023-11-14T22:13:20.001Z", ["alice_eng"]),
    ],
)  # fmt: skip
def test_ax_queries_give_the_same_answers_on_every_backend(store, people, text, expected) -> None:
    """What `qntx ax` sends: the parsed filter, on the store, newest first."""
    from qntx.ats.ax import parse_ax

    flt = parse_ax(text, now_ms=NOW + 10).filter
    assert names(people, store.query(flt)) == expected


def test_writers_sharing_a_database_share_one_sequence(pg_url) -> None:  # noqa: F811
    """Two stores on one PostgreSQL database (two hosts' processes), writing at once:
    every record gets its own sequence number, with none skipped, each writer's in
    the order it wrote them, and a taken explicit id is still a Conflict."""
    import threading

    from qntx.ats.store_pg import PgAttestationStore

    stores = [PgAttestationStore(pg_url), PgAttestationStore(pg_url)]
    written: list[list[Attestation]] = [[], []]

    def write(n: int) -> None:
        for i in range(60):
            for batch in stores[n].put_batches([[new(f"w{n}-{i}")], [new(f"w{n}-{i}b"), new(f"w{n}-{i}c")]]):
                written[n] += batch

    threads = [threading.Thread(target=write, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert all([r.seq for r in records] == sorted(r.seq for r in records) for records in written)
        everything = stores[0].query(Filter())
        assert sorted(r.seq for r in everything) == list(range(1, 361))
        assert {r.id: r.seq for r in everything} == {r.id: r.seq for rs in written for r in rs}
        with pytest.raises(Conflict):
            stores[1].put_many([new(id=written[0][0].id)])
        assert stores[0].count() == stores[1].count() == 360
    finally:
        for store in stores:
            store.close()
