"""The attestation store: append-only attestations in one LMDB environment (SPEC §3).

Owns the on-disk layout and nothing else (no sockets; ``qntx.ats.actor`` serves it).
Named sub-databases:

* ``records``  id → MessagePack ``Attestation``
* ``time``     ts(8 BE) + seq(8 BE) → id
* ``subjects`` / ``predicates`` / ``contexts`` / ``actors`` / ``source``:
               casefold(value) + NUL + ts + seq → id
* ``subject_predicate``: the pair of value keys + NUL + ts + seq → id
* ``counts``   field + ":" + casefold(value) → how many attestations carry it
* ``meta``     ``seq`` → the last sequence number in the indexes

(``qntx.ats.indexing`` makes these keys and writes them; ``qntx.ats.records``
checks and encodes a new attestation.) ``seq`` grows with every stored attestation,
so ts + seq orders records newest first with insertion order breaking timestamp
ties, and keys are unique without duplicates.

Writes take one of two paths. Without a journal (the embedded store of a CLI
command, tests) ``put_batches`` writes records and indexes in one synced LMDB
transaction. With one (the ATS actor, the store's one writer: ``journal=True``),
``log_batches`` makes a group durable in ``qntx.ats.journal`` (one sync of one
sequential write) and numbers its records; ``apply_logged`` writes them into the
sub-databases above later, many groups per transaction, and opening the store
replays whatever the journal holds beyond ``meta/seq``. Each index transaction is
atomic, so a crash never leaves a record half indexed.

Queries (``qntx.ats.store_query``) walk one index backwards, the smallest the counts
name, or intersect the posting lists of several. A new group is validated, encoded
and its ids claimed by ``qntx.ats.batch``, as on every backend (``qntx.ats.backend``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import NamedTuple

import msgspec

from qntx.ats.backend import StoreCommon
from qntx.ats.batch import Prepared, claim_and_number, prepare_batches
from qntx.ats.filters import next_page  # noqa: F401  (callers page with it from here)
from qntx.ats.indexing import INDEXED_FIELDS, PAIR, U64, IndexRows, stored_seq  # noqa: F401
from qntx.ats.journal import Journal
from qntx.ats.records import MAX_ID_BYTES, Stored
from qntx.ats.store_query import MAX_JOINED_VALUES, MAX_SCAN, MAX_SEEKS, LmdbQueries  # noqa: F401
from qntx.errors import QntxError, Unavailable
from qntx.lmdbenv import LmdbEnv
from qntx.protocol import Attestation, NewAttestation

_PAIRS_BUILT = b"pairs-built"  # meta: every record has its pair entries
_BACKFILL_BATCH = 10_000
# The journal grows up to this while the indexes are behind; past it a group commit
# first brings the indexes up to date and writes the journal from the start again.
JOURNAL_MAX_BYTES = 64 << 20
JOURNAL_WAIT_S = 5.0  # a direct write waits this long for the journal's lock


class AttestationStore(LmdbQueries, StoreCommon):
    """Append-only attestations in an LMDB directory, indexed for ``Filter`` queries."""

    def __init__(
        self,
        path: str | Path,
        *,
        map_size: int = 256 << 20,
        max_map_size: int = 0,
        readonly: bool = False,
        sync: bool = True,
        journal: bool = False,
    ):
        """``journal``: keep the journal open for ``log_batches`` (the ATS actor, the
        one writer of its store); without it writes go straight to LMDB."""
        self.path = Path(path)
        self.location = str(self.path)
        self.readonly = readonly
        self._sync = sync
        if readonly and not (self.path / "data.mdb").exists():
            raise Unavailable(f"no attestation store at {self.path}")
        self._env = LmdbEnv(
            self.path, ("records", "time", *INDEXED_FIELDS, PAIR, "counts", "meta"),
            map_size=map_size, max_map_size=max_map_size, readonly=readonly, sync=sync,
        )  # fmt: skip
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Attestation)
        self._records = self._env.db("records")
        self._time = self._env.db("time")
        self._index = {f: self._env.db(f) for f in (*INDEXED_FIELDS, PAIR)}
        self._counts = self._env.db("counts")
        self._meta = self._env.db("meta")
        self._journal: Journal | None = None
        self._logged: list[_Logged] = []  # journaled, not yet in the indexes; oldest first
        self._logged_records: dict[str, Attestation] = {}  # the same records by id
        # Their index entries, gathered as they are journaled (on the ATS loop): the
        # writer thread only puts them. Swapped with _logged under _rows_lock.
        self._rows = IndexRows()
        self._rows_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._next_seq = 0
        if not readonly:
            self._build_pairs()
            self._replay(keep=journal)
        self._pairs = self._env.read(lambda txn: txn.get(_PAIRS_BUILT, db=self._meta)) is not None
        # What the last query did, for tests that watch the planner: the records it
        # decoded, and the fields it walked (the first drove it).
        self.last_query_scanned = 0
        self.last_query_plan: list[str] = []
        self._page_tails: list[bytes] = []
        self._page_indexed = 0

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Index what is only journaled yet (a clean stop replays nothing), then close."""
        try:
            if self._journal is not None and self._logged:
                self.apply_logged()
        finally:
            if self._journal is not None:
                self._journal.close()
            self._env.close()

    def _build_pairs(self) -> None:
        """Give every stored record its pair entries, once (a store made before the
        pair index existed), a batch of records per transaction."""
        if self._env.read(lambda txn: txn.get(_PAIRS_BUILT, db=self._meta)) is not None:
            return
        position = [b""]

        def batch(txn) -> bool:
            rows = IndexRows()
            cursor = txn.cursor(self._time)
            found = cursor.set_range(position[0]) if position[0] else cursor.first()
            done = 0
            while found and done < _BACKFILL_BATCH:
                tail, id = cursor.key(), cursor.value()
                rows.index_pairs(self._decoder.decode(txn.get(id, db=self._records)), tail, id)
                done += 1
                found = cursor.next()
            rows.write(self, txn)
            if found:
                position[0] = cursor.key()
                return False
            txn.put(_PAIRS_BUILT, b"1", db=self._meta)
            return True

        while not self._env.write(batch):
            pass

    def clear_stale_readers(self) -> int:
        return self._env.clear_stale_readers()

    # ------------------------------------------------------------------ writes

    def put_batches(
        self, batches: list[list[NewAttestation]], *, now_ms: int | None = None
    ) -> list[list[Attestation] | QntxError]:
        """Group commit: every batch durable and indexed when this returns, each batch
        all or nothing; a batch with a bad item or a taken id gets its error in its
        slot and writes nothing, the others still commit.

        Without a journal: one synced transaction holds records and indexes. With one
        (the ATS actor's store): the journal, then the indexes at once."""
        if self._journal is not None:
            outcomes = self.log_batches(batches, now_ms=now_ms)
            self.apply_logged()
            return [o if isinstance(o, QntxError) else o.records for o in outcomes]
        prepared = self._prepare_batches(batches, now_ms)
        if not (self.path / "journal").exists():  # no ATS actor ever wrote here
            return self._env.write(lambda txn: self._write_batches(txn, prepared))
        # What an ATS actor journaled and did not index (it crashed) goes in first, under
        # the journal's lock: numbers handed out here must follow the journal's.
        journal = self._wait_for_journal()
        try:
            self._replay_from(journal)
            return self._env.write(lambda txn: self._write_batches(txn, prepared))
        finally:
            journal.close()

    def _wait_for_journal(self) -> Journal:
        """The journal, locked; another writer (a replay) holds it only briefly, the
        ATS actor for as long as it runs."""
        deadline = time.monotonic() + JOURNAL_WAIT_S
        while True:
            try:
                return Journal(self.path / "journal", sync=self._sync)
            except Unavailable:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"the attestation store {self.path} is in use by an ATS actor: write through the bus"
                    ) from None
                time.sleep(0.01)

    def log_batches(
        self, batches: list[list[NewAttestation]], *, now_ms: int | None = None
    ) -> list[Stored | QntxError]:
        """Group commit into the journal: every batch durable when this returns (one
        ``fdatasync``), its records numbered and their ids final; the indexes are
        written later by ``apply_logged``. Until then ``get``/``query`` do not see
        them: a reader calls ``apply_logged`` first (``logged`` says when to)."""
        journal = self._journal
        if journal is None:
            raise Unavailable(f"attestation store {self.path} has no journal open")
        prepared = self._prepare_batches(batches, now_ms)

        def claim(txn):
            seek, logged = txn.cursor(self._records).set_key, self._logged_records

            def taken(id: str) -> bool:
                return id in logged or seek(id.encode())

            return claim_and_number(prepared, taken, self._next_seq - 1, self._encoder)

        outcomes, accepted = self._env.read(claim)
        results: list[Stored | QntxError] = [
            o if isinstance(o, QntxError) else Stored([p.record for p in o], [p.blob for p in o])
            for o in outcomes
        ]
        if not accepted:
            return results
        blobs = [p.blob for p in accepted]
        size = journal.entry_size(blobs)
        if not journal.empty and not self._logged:
            journal.rewind()  # every entry is in the (synced) indexes: start again at 0
        if not journal.fits(size):
            if journal.size < JOURNAL_MAX_BYTES:
                journal.grow(size)  # rather than wait here for the indexes
            else:
                self.apply_logged()  # the indexes fell this far behind: catch up
                journal.rewind()
                if not journal.fits(size):
                    journal.grow(size)  # one group bigger than the journal
        first = self._next_seq
        journal.append(first, blobs)
        with self._rows_lock:
            self._rows.add_many((item.record, item.blob, item.record.seq) for item in accepted)
            # Before the entry: an applier drops both in this order.
            self._logged_records.update({item.record.id: item.record for item in accepted})
            self._logged.append(_Logged(first, accepted))
        self._next_seq = first + len(accepted)
        return results

    @property
    def logged(self) -> int:
        """How many journaled records the indexes do not hold yet."""
        return self.logged_seq - self.indexed_seq

    @property
    def logged_seq(self) -> int:
        """The sequence number of the last record journaled (or stored)."""
        return self._next_seq - 1

    @property
    def indexed_seq(self) -> int:
        """Every record up to this sequence number is in the indexes."""
        oldest = next(iter(self._logged), None)  # one C call: safe while an applier trims the list
        return self._next_seq - 1 if oldest is None else oldest.first_seq - 1

    def apply_logged(self) -> int:
        """Write every journaled record not yet indexed into LMDB, in one synced
        transaction; returns how many. Safe on another thread than ``log_batches``
        (one applier at a time; the journal is only rewound by ``log_batches``)."""
        with self._apply_lock:
            with self._rows_lock:
                entries = list(self._logged)
                rows, self._rows = self._rows, IndexRows()
            if not entries:
                return 0
            try:
                self._env.write(lambda txn: rows.write(self, txn))
            except BaseException:
                with self._rows_lock:  # the entries stay journaled: gather theirs again
                    self._rows = IndexRows()
                    for entry in self._logged:
                        self._rows.add_many((item.record, item.blob, item.record.seq) for item in entry.items)
                raise
            del self._logged[: len(entries)]
            for entry in entries:
                for item in entry.items:
                    self._logged_records.pop(item.record.id, None)
            return sum(len(entry.items) for entry in entries)

    def _replay(self, keep: bool) -> None:
        """Index what the journal holds beyond the last applied record (a crash came
        between an acknowledgement and its index write); keep the journal open for
        writing when ``keep`` (else leave it to whoever holds it)."""
        path = self.path / "journal"
        self._next_seq = self._applied_seq() + 1
        if not keep and not path.exists():
            return
        try:
            journal = Journal(path, sync=self._sync)
        except Unavailable:
            if keep:
                raise
            return  # the ATS actor holds it (it replayed it when it opened)
        try:
            self._replay_from(journal)
        except BaseException:
            journal.close()
            raise
        if keep:
            self._journal = journal
        else:
            journal.close()

    def _replay_from(self, journal: Journal) -> None:
        entries = list(journal.read_all())
        if entries:

            def work(txn) -> int:
                applied = stored_seq(self, txn)
                rows = IndexRows()
                for first, blobs in entries:
                    for seq, blob in enumerate(blobs, first):
                        if seq > applied:
                            rows.add(self._decoder.decode(blob), blob, seq)
                rows.write(self, txn)
                return rows.added

            replayed = self._env.write(work)
            if replayed:
                from loguru import logger

                logger.info("replayed {} journaled attestation(s) into the indexes", replayed)
        self._next_seq = self._applied_seq() + 1

    def _applied_seq(self) -> int:
        return self._env.read(lambda txn: stored_seq(self, txn))

    def _prepare_batches(self, batches, now_ms: int | None) -> list[list[Prepared] | QntxError]:
        if self.readonly:
            raise Unavailable(f"attestation store {self.path} is open read-only")
        return prepare_batches(batches, now_ms, self._encoder)

    def _write_batches(self, txn, prepared: list[list[Prepared] | QntxError]):
        get, db = txn.get, self._records
        results, accepted = claim_and_number(
            prepared, lambda id: get(id.encode(), db=db) is not None, stored_seq(self, txn), self._encoder
        )
        rows = IndexRows()
        rows.add_many((item.record, item.blob, item.record.seq) for item in accepted)
        rows.write(self, txn)
        return [r if isinstance(r, QntxError) else [item.record for item in r] for r in results]

    # ------------------------------------------------------------------ reads

    def get(self, id: str) -> Attestation | None:
        if not isinstance(id, str) or not id or len(id.encode()) > MAX_ID_BYTES:
            return None
        logged = self._logged_records.get(id)  # journaled, its index write still to come
        if logged is not None:
            return logged
        blob = self._env.read(lambda txn: txn.get(id.encode(), db=self._records))
        return None if blob is None else self._decoder.decode(blob)

    def count(self) -> int:
        return self._env.read(lambda txn: txn.stat(self._records)["entries"])

    def stats(self) -> dict:
        def work(txn):
            # Journaled records past this snapshot's last indexed one count too.
            journaled = max(0, self.logged_seq - stored_seq(self, txn)) if self._journal is not None else 0
            return {
                "attestations": txn.stat(self._records)["entries"] + journaled,
                **self._env.stats,
                "path": str(self.path),
            }

        return self._env.read(work)


class _Logged(NamedTuple):
    """One journal entry whose records the indexes do not hold yet."""

    first_seq: int
    items: list[Prepared]

