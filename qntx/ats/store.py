"""The attestation store: append-only attestations in one LMDB environment (SPEC §3).

Owns the on-disk layout and nothing else (no sockets; ``qntx.ats.actor`` serves it).
Named sub-databases:

* ``records``  id → MessagePack ``Attestation``
* ``time``     ts(8 BE) + seq(8 BE) → id
* ``subjects`` / ``predicates`` / ``contexts`` / ``actors`` / ``source``:
               casefold(value) + NUL + ts + seq → id
* ``counts``   field + ":" + casefold(value) → how many attestations carry it
* ``meta``     ``seq`` → the last sequence number handed out

``seq`` grows with every stored attestation, so ts + seq orders records newest first
with insertion order breaking timestamp ties, and keys are unique without duplicates.
Queries walk one index backwards (the one the counts say is smallest) instead of
scanning records, so cost follows the number of candidates, not the store size.
"""

from __future__ import annotations

import heapq
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec

from qntx.asid import new_asid
from qntx.errors import Conflict, Invalid, QntxError, Unavailable
from qntx.lmdbenv import LmdbEnv
from qntx.protocol import Attestation, Filter, NewAttestation

LIST_FIELDS = ("subjects", "predicates", "contexts", "actors")
INDEXED_FIELDS = (*LIST_FIELDS, "source")
DEFAULT_SOURCE = "python"
MAX_TIMESTAMP = (1 << 63) - 1  # int64 max, so every MessagePack client can read it back

_U64 = struct.Struct(">Q")
_TS_SEQ = struct.Struct(">QQ")
_MIN_SEQ, _MAX_SEQ = b"\x00" * 8, b"\xff" * 8
# LMDB keys are at most 511 bytes. Longer values share a truncated index key, which
# is safe because every candidate is checked against the full value after decoding.
_VALUE_KEY_BYTES = 480
_MAX_ID_BYTES = 511


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _value_key(value: str) -> bytes:
    return value.casefold().encode()[:_VALUE_KEY_BYTES]


def _count_key(field: str, vkey: bytes) -> bytes:
    return field.encode() + b":" + vkey


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"{what} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise Invalid(f"{what} must not contain NUL")
    return value


def _check_list(field: str, values: object, *, default: list[str] | None) -> list[str]:
    if values is None:
        values = []
    if not isinstance(values, list | tuple):
        raise Invalid(f"{field} must be a list of strings, got {type(values).__name__}")
    if not values and default is not None:
        return list(default)
    return [_check_text(f"{field} value", v) for v in values]


class AttestationStore:
    """Append-only attestations in an LMDB directory, indexed for ``Filter`` queries."""

    def __init__(
        self,
        path: str | Path,
        *,
        map_size: int = 256 << 20,
        readonly: bool = False,
        sync: bool = True,
    ):
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not (self.path / "data.mdb").exists():
            raise Unavailable(f"no attestation store at {self.path}")
        self._env = LmdbEnv(
            self.path, ("records", "time", *INDEXED_FIELDS, "counts", "meta"),
            map_size=map_size, readonly=readonly, sync=sync,
        )  # fmt: skip
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Attestation)
        self._records = self._env.db("records")
        self._time = self._env.db("time")
        self._index = {f: self._env.db(f) for f in INDEXED_FIELDS}
        self._counts = self._env.db("counts")
        self._meta = self._env.db("meta")
        self.last_query_scanned = 0  # records the last query decoded; lets tests watch the planner

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._env.close()

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
        """Group commit: every batch in one synced transaction, each batch all or nothing.

        A batch with a bad item or a taken id gets its error in its slot and writes
        nothing; the others still commit. Returns only once the commit is durable.
        """
        if self.readonly:
            raise Unavailable(f"attestation store {self.path} is open read-only")
        now = _now_ms() if now_ms is None else now_ms
        prepared: list[list[Attestation] | QntxError] = []
        for batch in batches:
            try:
                prepared.append(self._prepare_batch(batch, now))
            except Invalid as exc:
                prepared.append(exc)
        return self._env.write(lambda txn: self._write_batches(txn, prepared))

    def _prepare_batch(self, batch: list[NewAttestation], now: int) -> list[Attestation]:
        if not isinstance(batch, list | tuple):
            raise Invalid("a batch must be a list of attestations")
        return [self._prepare(item, now) for item in batch]

    def _prepare(self, item: NewAttestation, now: int) -> Attestation:
        """Validate and fill defaults; ``id`` stays "" when the store must generate one."""
        if not isinstance(item, NewAttestation):
            raise Invalid(f"expected a NewAttestation, got {type(item).__name__}")
        subjects = _check_list("subjects", item.subjects, default=None)
        if not subjects:
            raise Invalid("an attestation needs at least one subject")
        timestamp = now if item.timestamp is None else item.timestamp
        if not _is_int(timestamp) or not 0 <= timestamp <= MAX_TIMESTAMP:
            raise Invalid(f"timestamp must be an integer of ms >= 0, got {timestamp!r}")
        source = item.source or DEFAULT_SOURCE
        _check_text("source", source)
        if not isinstance(item.attributes, dict) or not all(
            isinstance(k, str) for k in item.attributes
        ):
            raise Invalid("attributes must be a map with string keys")
        try:  # here, outside the write transaction, so a batch fails before it writes
            self._encoder.encode(item.attributes)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            raise Invalid(f"attributes cannot be encoded: {exc}") from None
        if item.id is not None:
            _check_text("id", item.id)
            if len(item.id.encode()) > _MAX_ID_BYTES:
                raise Invalid(f"id is longer than {_MAX_ID_BYTES} bytes")
        return Attestation(
            id=item.id or "",
            subjects=subjects,
            predicates=_check_list("predicates", item.predicates, default=["_"]),
            contexts=_check_list("contexts", item.contexts, default=["_"]),
            actors=_check_list("actors", item.actors, default=[]),
            timestamp=timestamp,
            source=source,
            attributes=item.attributes,
            created_at=now,
        )

    def _write_batches(self, txn, prepared: list[list[Attestation] | QntxError]):
        taken: set[str] = set()  # ids claimed in this transaction
        counts: Counter[tuple[str, bytes]] = Counter()  # (field, value key) -> new entries
        seq = _U64.unpack(txn.get(b"seq", _U64.pack(0), db=self._meta))[0]
        results: list[list[Attestation] | QntxError] = []
        for batch in prepared:
            if isinstance(batch, QntxError):
                results.append(batch)
                continue
            try:
                self._check_explicit_ids(txn, batch, taken)
            except Conflict as exc:
                results.append(exc)
                continue
            # Nothing below can fail for a prepared batch, so the batch is all or nothing.
            taken.update(r.id for r in batch if r.id)  # generated ids must avoid these
            records = []
            for record in batch:
                seq += 1
                records.append(self._insert(txn, record, seq, taken, counts))
            results.append(records)
        for (field, vkey), n in counts.items():
            key = _count_key(field, vkey)
            old = txn.get(key, db=self._counts)
            txn.put(key, _U64.pack(n + (_U64.unpack(old)[0] if old else 0)), db=self._counts)
        txn.put(b"seq", _U64.pack(seq), db=self._meta)
        return results

    def _check_explicit_ids(self, txn, batch: list[Attestation], taken: set[str]) -> None:
        explicit = [r.id for r in batch if r.id]
        if len(set(explicit)) != len(explicit):
            raise Conflict("a batch repeats an attestation id")
        for id in explicit:
            if id in taken or txn.get(id.encode(), db=self._records) is not None:
                raise Conflict(f"attestation {id} already exists")

    def _insert(self, txn, record: Attestation, seq: int, taken: set[str], counts: Counter):
        """Write one record and its index entries; returns the record with its id."""
        record = self._put_record(txn, record, taken)
        id = record.id.encode()
        tail = _TS_SEQ.pack(record.timestamp, seq)
        txn.put(tail, id, db=self._time)
        for field, db in self._index.items():
            values = (record.source,) if field == "source" else getattr(record, field)
            # A set: "Alice" and "alice" in one record are one index entry and one count.
            for vkey in {_value_key(v) for v in values}:
                txn.put(vkey + b"\x00" + tail, id, db=db)
                counts[field, vkey] += 1
        return record

    def _put_record(self, txn, record: Attestation, taken: set[str]) -> Attestation:
        """Store the record under its explicit id, or under a fresh id that is free."""
        if record.id:  # checked free before the batch started writing
            txn.put(record.id.encode(), self._encoder.encode(record), db=self._records)
            return record
        while True:
            id = new_asid(record.subjects[0], record.predicates[0], record.contexts[0])
            if id in taken:
                continue
            stored = msgspec.structs.replace(record, id=id)
            # overwrite=False doubles as the existence check.
            if txn.put(
                id.encode(), self._encoder.encode(stored), db=self._records, overwrite=False
            ):
                taken.add(id)
                return stored

    # ------------------------------------------------------------------ reads

    def get(self, id: str) -> Attestation | None:
        if not isinstance(id, str) or not id or len(id.encode()) > _MAX_ID_BYTES:
            return None
        blob = self._env.read(lambda txn: txn.get(id.encode(), db=self._records))
        return None if blob is None else self._decoder.decode(blob)

    def count(self) -> int:
        return self._env.read(lambda txn: txn.stat(self._records)["entries"])

    def stats(self) -> dict:
        def work(txn):
            return {
                "attestations": txn.stat(self._records)["entries"],
                **self._env.stats,
                "path": str(self.path),
            }

        return self._env.read(work)

    def query(self, flt: Filter) -> list[Attestation]:
        """Attestations matching ``flt``, newest first (SPEC §3.3), never a full scan
        when a list field or source is given."""
        want, lo, hi, limit = _normalise_filter(flt)
        self.last_query_scanned = 0
        if lo > hi:
            return []
        return self._env.read(lambda txn: self._run_query(txn, want, lo, hi, limit))

    def _run_query(self, txn, want: dict[str, set[str]], lo: int, hi: int, limit: int | None):
        low, high = _U64.pack(lo) + _MIN_SEQ, _U64.pack(hi) + _MAX_SEQ
        if want:
            field, vkeys = self._plan(txn, want)
            if not vkeys:
                return []
            walks = [
                _walk_back(
                    txn.cursor(self._index[field]), vkey + b"\x00" + low, vkey + b"\x00" + high
                )
                for vkey in vkeys
            ]
            # Each walk yields (ts+seq, id) newest first; merging keeps that order.
            candidates = walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=True)
        else:
            candidates = _walk_back(txn.cursor(self._time), low, high)
        out: list[Attestation] = []
        previous = None
        for tail, id in candidates:
            if tail == previous:  # the same record reached through two OR values
                continue
            previous = tail
            self.last_query_scanned += 1
            record = self._decoder.decode(txn.get(id, db=self._records))
            if _matches(record, want):
                out.append(record)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def _plan(self, txn, want: dict[str, set[str]]) -> tuple[str, list[bytes]]:
        """The field whose values are carried by the fewest attestations, and its keys.
        A field with no matching attestation at all means an empty result: no keys."""
        best: tuple[int, str, list[bytes]] | None = None
        for field, values in want.items():
            vkeys = sorted({_value_key(v) for v in values})
            counts = [txn.get(_count_key(field, k), db=self._counts) for k in vkeys]
            total = sum(_U64.unpack(c)[0] for c in counts if c)
            if total == 0:
                return field, []
            if best is None or total < best[0]:
                best = (total, field, vkeys)
        assert best is not None
        return best[1], best[2]


def _walk_back(cursor, low: bytes, high: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(ts+seq, id) for every key in [low, high], highest key first."""
    if cursor.set_range(high):
        if cursor.key() > high and not cursor.prev():
            return
    elif not cursor.last():
        return
    while True:
        key = cursor.key()
        if key < low:
            return
        yield key[-_TS_SEQ.size :], cursor.value()
        if not cursor.prev():
            return


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
        values = _check_list(f"filter {field}", getattr(flt, field), default=None)
        if values:
            want[field] = {v.casefold() for v in values}
    if flt.source is not None:
        want["source"] = {_check_text("filter source", flt.source).casefold()}
    bounds = []
    for name, default in (("time_start", 0), ("time_end", MAX_TIMESTAMP)):
        value = getattr(flt, name)
        if value is not None and not _is_int(value):
            raise Invalid(f"filter {name} must be an integer of ms, got {value!r}")
        bounds.append(default if value is None else value)
    lo, hi = max(bounds[0], 0), min(bounds[1], MAX_TIMESTAMP)
    if flt.limit is not None and (not _is_int(flt.limit) or flt.limit <= 0):
        raise Invalid(f"limit must be a positive integer, got {flt.limit!r}")
    return want, lo, hi, flt.limit
