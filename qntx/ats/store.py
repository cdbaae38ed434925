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

Queries walk one index backwards (the one the counts say is smallest) instead of
scanning records, so cost follows the number of candidates, not the store size. A
query that ANDs fields intersects their posting lists (``qntx.ats.postings``) and
reads only the records that every field carries.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import msgspec

from qntx.asid import new_asid
from qntx.ats.indexing import (
    INDEXED_FIELDS,
    LIST_FIELDS,
    PAIR,
    TS_SEQ,
    U64,
    IndexWriter,
    count_key,
    pair_key,
    value_key,
)
from qntx.ats.journal import Journal
from qntx.ats.postings import Intersection, PostingList, tail_after, tail_before, walk_back
from qntx.ats.records import MAX_ID_BYTES, MAX_TIMESTAMP, Stored, check_list, check_text, validated
from qntx.errors import Conflict, Invalid, QntxError, Unavailable
from qntx.lmdbenv import LmdbEnv
from qntx.protocol import MAX_PAGE, Attestation, Filter, NewAttestation
from qntx.values import is_int
from qntx.values import now_ms as wall_clock_ms

# Records one query request may read (matching or not), and index seeks it may make,
# before it answers with what it found and a cursor: bounded work per request (a few
# milliseconds of the actor's loop), whatever the filter.
MAX_SCAN = 2_000
MAX_SEEKS = 8_000
# Values one filter field may OR together: each is a lookup and a cursor per page.
MAX_FILTER_VALUES = 1_000
# A field with more values than this is checked on the records the other fields
# found rather than joined in the intersection (each seek in it seeks every value).
MAX_JOINED_VALUES = 16
_PAIRS_BUILT = b"pairs-built"  # meta: every record has its pair entries
_BACKFILL_BATCH = 10_000
# The journal grows up to this while the indexes are behind; past it a group commit
# first brings the indexes up to date and writes the journal from the start again.
JOURNAL_MAX_BYTES = 64 << 20
JOURNAL_WAIT_S = 5.0  # a direct write waits this long for the journal's lock
_MIN_SEQ, _MAX_SEQ = b"\x00" * 8, b"\xff" * 8


class _Prepared(NamedTuple):
    """A validated attestation with its id chosen and its one encoding made."""

    record: Attestation
    blob: bytes
    explicit: bool  # the id came with the item (else the store generated it)

    def numbered(self, seq: int, encode) -> _Prepared:
        """The record, and its encoding, with its commit sequence number: what decides
        which record is current (``qntx.ats.current``). ``seq`` is the last field of
        the encoding (0 until now), so only its last byte changes."""
        blob = self.blob[:-1] + encode(seq) if self.blob.endswith(_SEQ_UNSET) else None
        record = msgspec.structs.replace(self.record, seq=seq)
        return self._replace(record=record, blob=blob or encode(record))


_SEQ_UNSET = b"\xa3seq\x00"  # how an Attestation's encoding ends while its seq is 0


class AttestationStore:
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
            writer = IndexWriter(self, txn)
            cursor = txn.cursor(self._time)
            found = cursor.set_range(position[0]) if position[0] else cursor.first()
            done = 0
            while found and done < _BACKFILL_BATCH:
                tail, id = cursor.key(), cursor.value()
                writer.index_pairs(self._decoder.decode(txn.get(id, db=self._records)), tail, id)
                done += 1
                found = cursor.next()
            writer.finish()
            if found:
                position[0] = cursor.key()
                return False
            txn.put(_PAIRS_BUILT, b"1", db=self._meta)
            return True

        while not self._env.write(batch):
            pass

    def clear_stale_readers(self) -> int:
        return self._env.clear_stale_readers()

    def __enter__(self) -> AttestationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writes

    def put_many(
        self, items: list[NewAttestation], *, now_ms: int | None = None
    ) -> list[Attestation]:
        """Store ``items`` durably, all or nothing; raise the batch's error if any."""
        outcome = self.put_batches([items], now_ms=now_ms)[0]
        if isinstance(outcome, QntxError):
            raise outcome
        return outcome

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
        claimed: set[str] = set()
        results: list[Stored | QntxError] = []
        accepted: list[_Prepared] = []

        def claim(txn) -> None:
            results.clear(), accepted.clear(), claimed.clear()  # LmdbEnv may run this twice
            get, db, logged = txn.get, self._records, self._logged_records

            def taken(id: str) -> bool:
                return id in logged or id in claimed or get(id.encode(), db=db) is not None

            for batch in prepared:
                if isinstance(batch, QntxError):
                    results.append(batch)
                    continue
                try:
                    batch = _claim_ids(batch, taken, self._encoder)
                except Conflict as exc:
                    results.append(exc)
                    continue
                claimed.update(p.record.id for p in batch)
                accepted.extend(batch)
                results.append(len(batch))  # a Stored once numbered, below

        self._env.read(claim)
        if not accepted:
            return results
        encode = self._encoder.encode
        accepted[:] = [p.numbered(seq, encode) for seq, p in enumerate(accepted, self._next_seq)]
        done = iter(accepted)
        for n, outcome in enumerate(results):
            if isinstance(outcome, int):
                batch = [next(done) for _ in range(outcome)]
                results[n] = Stored([p.record for p in batch], [p.blob for p in batch])
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
            entries = list(self._logged)
            if not entries:
                return 0

            def work(txn) -> None:
                writer = IndexWriter(self, txn)
                for entry in entries:
                    writer.add_many(
                        (item.record, item.blob, seq) for seq, item in enumerate(entry.items, entry.first_seq)
                    )
                writer.finish()

            self._env.write(work)
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
                applied = U64.unpack(txn.get(b"seq", U64.pack(0), db=self._meta))[0]
                writer = IndexWriter(self, txn)
                for first, blobs in entries:
                    for seq, blob in enumerate(blobs, first):
                        if seq > applied:
                            writer.add(self._decoder.decode(blob), blob, seq)
                writer.finish()
                return writer.added

            replayed = self._env.write(work)
            if replayed:
                from loguru import logger

                logger.info("replayed {} journaled attestation(s) into the indexes", replayed)
        self._next_seq = self._applied_seq() + 1

    def _snapshot_seq(self, txn) -> int:
        """The last sequence number in the indexes as ``txn`` sees them."""
        return U64.unpack(txn.get(b"seq", U64.pack(0), db=self._meta))[0]

    def _applied_seq(self) -> int:
        return self._env.read(lambda txn: U64.unpack(txn.get(b"seq", U64.pack(0), db=self._meta))[0])

    def _prepare_batches(self, batches, now_ms: int | None) -> list[list[_Prepared] | QntxError]:
        if self.readonly:
            raise Unavailable(f"attestation store {self.path} is open read-only")
        now = wall_clock_ms() if now_ms is None else now_ms
        prepared: list[list[_Prepared] | QntxError] = []
        for batch in batches:
            try:
                prepared.append(self._prepare_batch(batch, now))
            except Invalid as exc:
                prepared.append(exc)
        return prepared

    def _prepare_batch(self, batch: list[NewAttestation], now: int) -> list[_Prepared]:
        if not isinstance(batch, list | tuple):
            raise Invalid("a batch must be a list of attestations")
        return [self._prepare(item, now) for item in batch]

    def _prepare(self, item: NewAttestation, now: int) -> _Prepared:
        """Validate, fill defaults, pick an id and encode: all before the write,
        so a bad item fails its batch before anything is written."""
        record = validated(item, now)
        try:  # the one encoding of the record; only attributes can fail it
            blob = self._encoder.encode(record)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            raise Invalid(f"attributes cannot be encoded: {exc}") from None
        return _Prepared(record, blob, item.id is not None)

    def _write_batches(self, txn, prepared: list[list[_Prepared] | QntxError]):
        writer = IndexWriter(self, txn)
        get, db, added = txn.get, self._records, writer.ids

        def taken(id: str) -> bool:
            return id in added or get(id.encode(), db=db) is not None

        results: list[list[Attestation] | QntxError] = []
        seq = writer.start_seq
        for batch in prepared:
            if isinstance(batch, QntxError):
                results.append(batch)
                continue
            try:
                batch = _claim_ids(batch, taken, self._encoder)
            except Conflict as exc:
                results.append(exc)
                continue
            numbered = []
            for item in batch:
                seq += 1
                item = item.numbered(seq, self._encoder.encode)
                writer.add(item.record, item.blob, seq)
                numbered.append(item.record)
            results.append(numbered)
        writer.finish()
        return results

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
            journaled = max(0, self.logged_seq - self._snapshot_seq(txn)) if self._journal is not None else 0
            return {
                "attestations": txn.stat(self._records)["entries"] + journaled,
                **self._env.stats,
                "path": str(self.path),
            }

        return self._env.read(work)

    def query(self, flt: Filter) -> list[Attestation]:
        """Every attestation matching ``flt`` (up to its limit), newest first (SPEC
        §3.3), never a full scan when a list field or source is given. Pages through
        ``query_page``; an actor serves single pages instead."""
        out: list[Attestation] = []
        scanned, current = 0, flt
        while current is not None:
            records, cursor = self.query_page(current)
            out += records
            scanned += self.last_query_scanned
            current = next_page(flt, cursor, len(out))
        self.last_query_scanned = scanned
        return out

    def query_page(
        self, flt: Filter, *, page: int = MAX_PAGE, max_scan: int = MAX_SCAN,
        max_seeks: int = MAX_SEEKS,
    ) -> tuple[list[Attestation], str | None]:  # fmt: skip
        """One page of ``query``: at most ``page`` records, ``max_scan`` records read
        and ``max_seeks`` index seeks, so no request holds the actor for long; the
        cursor of the next page, or None when there is no more."""
        want, lo, hi, limit = _normalise_filter(flt)
        start = _parse_cursor(flt.cursor)
        self.last_query_scanned, self.last_query_plan = 0, []
        if lo > hi:
            return [], None
        limit = page if limit is None else min(limit, page)
        budget = _Budget(limit, max_scan, max_seeks)
        self._page_tails: list[bytes] = []  # beside each record found, its ts + seq
        def work(txn):
            self._page_indexed = self._snapshot_seq(txn)  # what the overlay must not repeat
            return self._run_query(txn, want, lo, hi, start, budget)

        records, cursor = self._env.read(work)
        if self._logged:  # only when the index writes fail (a full disk): readers wait otherwise
            return self._with_logged(records, cursor, want, lo, hi, start, limit)
        return records, cursor

    def _with_logged(
        self, records: list[Attestation], cursor: str | None, want: dict[str, set[str]],
        lo: int, hi: int, start: bytes | None, limit: int,
    ) -> tuple[list[Attestation], str | None]:  # fmt: skip
        """The page with the journaled records that match and fall in its range of
        ts + seq (the indexes do not hold them yet), in order, cut to ``limit``."""
        floor = bytes.fromhex(cursor) if cursor is not None else None
        found = list(zip(self._page_tails, records, strict=True))
        for entry in list(self._logged):
            for seq, item in enumerate(entry.items, entry.first_seq):
                if seq <= self._page_indexed:  # an index write committed before the page's read
                    continue
                record = item.record
                tail = TS_SEQ.pack(record.timestamp, seq)
                in_page = (start is None or tail < start) and (floor is None or tail > floor)
                if in_page and lo <= record.timestamp <= hi and _matches(record, want):
                    found.append((tail, record))
        found.sort(key=lambda pair: pair[0], reverse=True)
        if len(found) > limit:
            found = found[:limit]
            cursor = found[-1][0].hex()
        return [record for _, record in found], cursor

    def _run_query(
        self, txn, want: dict[str, set[str]], lo: int, hi: int, start: bytes | None, budget: _Budget
    ) -> tuple[list[Attestation], str | None]:
        low, high = U64.pack(lo) + _MIN_SEQ, U64.pack(hi) + _MAX_SEQ
        if start is not None:
            high = min(high, start)  # resume below the previous page's last record
        if want:
            plan = self._plan(txn, want)
            self.last_query_plan = [field for field, _ in plan]
            if not plan:
                return [], None
            if len(plan) > 1:
                return self._intersect(txn, want, plan, low, high, start, budget)
            field, vkeys = plan[0]
            walks = [
                walk_back(
                    txn.cursor(self._index[field]), vkey + b"\x00" + low, vkey + b"\x00" + high
                )
                for vkey in vkeys
            ]
            # Each walk yields (ts+seq, id) newest first; merging keeps that order.
            candidates = walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=True)
        else:
            candidates = walk_back(txn.cursor(self._time), low, high)
        out: list[Attestation] = []
        previous = start
        for tail, id in candidates:
            if tail == previous:  # the same record through two OR values, or the cursor's
                continue
            previous = tail
            self._read_candidate(txn, id, tail, want, out)
            if len(out) >= budget.limit or self.last_query_scanned >= budget.max_scan:
                return out, tail.hex()  # the page is full, or its work is done
        return out, None

    def _intersect(
        self, txn, want: dict[str, set[str]], plan: list[tuple[str, list[bytes]]],
        low: bytes, high: bytes, start: bytes | None, budget: _Budget,
    ) -> tuple[list[Attestation], str | None]:  # fmt: skip
        """The query's records through the intersection of the planned fields' posting
        lists: only records every one of them carries are read."""
        if start is not None:  # the cursor's own record was on the previous page
            high = tail_before(start)
            if high is None:
                return [], None
        lists = [
            PostingList(
                [txn.cursor(self._index[field]) for _ in vkeys], [k + b"\x00" for k in vkeys], low
            )
            for field, vkeys in plan
        ]
        join = Intersection(lists, high)
        out: list[Attestation] = []
        while join.pivot is not None:
            if join.seeks >= budget.max_seeks or self.last_query_scanned >= budget.max_scan:
                # Its work is done: the next page starts at the first unsettled tail.
                return out, tail_after(join.pivot).hex()
            tail = join.step()
            if tail is None:
                continue
            self._read_candidate(txn, txn.get(tail, db=self._time), tail, want, out)
            if len(out) >= budget.limit:
                return out, tail.hex()
        return out, None

    def _read_candidate(self, txn, id: bytes, tail: bytes, want: dict[str, set[str]], out: list) -> None:
        """Decode one candidate and keep it when it matches: index keys may be cut short
        and a field may be left out of the intersection, so the record has the word."""
        self.last_query_scanned += 1
        record = self._decoder.decode(txn.get(id, db=self._records))
        if _matches(record, want):
            out.append(record)
            self._page_tails.append(tail)

    def _plan(self, txn, want: dict[str, set[str]]) -> list[tuple[str, list[bytes]]]:
        """The fields to walk, each with its value keys, the one carried by the fewest
        attestations first: that one alone, or with every other field of few enough
        values to join in an intersection. Empty when a field matches no attestation.
        Subjects and predicates asked together walk their pair index instead."""
        ranked: list[tuple[int, str, list[bytes]]] = []
        fields = dict.fromkeys(want)
        subjects, predicates = want.get("subjects"), want.get("predicates")
        if self._pairs and subjects and predicates and len(subjects) * len(predicates) <= MAX_FILTER_VALUES:
            fields = {f: None for f in want if f not in ("subjects", "predicates")}
            fields[PAIR] = {pair_key(value_key(s), value_key(p)) for s in subjects for p in predicates}
        for field, pair_keys in fields.items():
            vkeys = sorted(pair_keys) if pair_keys is not None else sorted({value_key(v) for v in want[field]})
            counts = [txn.get(count_key(field, k), db=self._counts) for k in vkeys]
            total = sum(U64.unpack(c)[0] for c in counts if c)
            if total == 0:
                return []
            ranked.append((total, field, vkeys))
        ranked.sort()
        first, rest = ranked[0], ranked[1:]
        joined = [r for r in rest if len(r[2]) <= MAX_JOINED_VALUES]
        return [(field, vkeys) for _, field, vkeys in (first, *joined)]


class _Budget(NamedTuple):
    """What one query page may return and do."""

    limit: int
    max_scan: int
    max_seeks: int


class _Logged(NamedTuple):
    """One journal entry whose records the indexes do not hold yet."""

    first_seq: int
    items: list[_Prepared]


def _claim_ids(batch: list[_Prepared], taken: Callable[[str], bool], encoder) -> list[_Prepared]:
    """The batch with every id free: Conflict when an explicit id is taken or repeated;
    a generated id that is taken (or another item's explicit id) is drawn again."""
    explicit = [p.record.id for p in batch if p.explicit]
    unique = frozenset(explicit)
    if len(unique) != len(explicit):
        raise Conflict("a batch repeats an attestation id")
    for id in explicit:
        if taken(id):
            raise Conflict(f"attestation {id} already exists")
    out, generated = [], set()
    for item in batch:
        if not item.explicit:
            record = item.record
            while record.id in unique or record.id in generated or taken(record.id):
                fresh = new_asid(record.subjects[0], record.predicates[0], record.contexts[0])
                record = msgspec.structs.replace(record, id=fresh)
            if record is not item.record:
                item = _Prepared(record, encoder.encode(record), False)
            generated.add(record.id)
        out.append(item)
    return out


def next_page(flt: Filter, cursor: str | None, found: int) -> Filter | None:
    """The filter asking for the page after one that ended at ``cursor``, having
    found ``found`` records in all so far; None when the query is done."""
    if cursor is None or (flt.limit is not None and found >= flt.limit):
        return None
    left = None if flt.limit is None else flt.limit - found
    return msgspec.structs.replace(flt, cursor=cursor, limit=left)


def _parse_cursor(cursor: str | None) -> bytes | None:
    if cursor is None:
        return None
    try:
        tail = bytes.fromhex(cursor) if isinstance(cursor, str) else b""
    except ValueError:
        tail = b""
    if len(tail) != TS_SEQ.size:
        raise Invalid(f"not a page cursor: {cursor!r}")
    return tail


def _matches(record: Attestation, want: dict[str, set[str]]) -> bool:
    """The field conditions (the time range is already bounded by the index keys)."""
    for field, values in want.items():
        have = [record.source] if field == "source" else getattr(record, field)
        if not any(v.casefold() in values for v in have):
            return False
    return True


def _normalise_filter(flt: Filter) -> tuple[dict[str, set[str]], int, int, int | None]:
    """Validate ``flt``; return casefolded wanted values per field, the ms range, the limit."""
    if not isinstance(flt, Filter):
        raise Invalid(f"expected a Filter, got {type(flt).__name__}")
    want: dict[str, set[str]] = {}
    for field in LIST_FIELDS:
        values = check_list(f"filter {field}", getattr(flt, field), default=None)
        if len(values) > MAX_FILTER_VALUES:
            raise Invalid(f"filter {field} has {len(values)} values, more than {MAX_FILTER_VALUES}")
        if values:
            want[field] = {v.casefold() for v in values}
    if flt.source is not None:
        want["source"] = {check_text("filter source", flt.source).casefold()}
    bounds = []
    for name, default in (("time_start", 0), ("time_end", MAX_TIMESTAMP)):
        value = getattr(flt, name)
        if value is not None and not is_int(value):
            raise Invalid(f"filter {name} must be an integer of ms, got {value!r}")
        bounds.append(default if value is None else value)
    lo, hi = max(bounds[0], 0), min(bounds[1], MAX_TIMESTAMP)
    if flt.limit is not None and (not is_int(flt.limit) or flt.limit <= 0):
        raise Invalid(f"limit must be a positive integer, got {flt.limit!r}")
    return want, lo, hi, flt.limit
