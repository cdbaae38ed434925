"""The index entries of stored attestations: their keys, and the writer that puts
records and entries into one LMDB transaction.

Owns the key layout the store's queries read (``qntx.ats.store`` describes the
sub-databases): value keys, pair keys, count keys, and ts + seq tails.
"""

from __future__ import annotations

import collections
import struct
from typing import TYPE_CHECKING

from qntx.protocol import Attestation

if TYPE_CHECKING:
    from qntx.ats.store import AttestationStore

LIST_FIELDS = ("subjects", "predicates", "contexts", "actors")
INDEXED_FIELDS = (*LIST_FIELDS, "source")
# Subject and predicate together, the pair most queries AND: one posting list per
# (subject, predicate), so `alice AND knows` walks only the records that have both,
# however the two broad lists interleave.
PAIR = "subject_predicate"
PAIR_SEP = b"\x00\x01"  # between the two value keys (value keys hold no NUL)
U64 = struct.Struct(">Q")
TS_SEQ = struct.Struct(">QQ")
# LMDB keys are at most 511 bytes. Longer values share a truncated index key, which
# is safe because every candidate is checked against the full value after decoding.
VALUE_KEY_BYTES = 480


def value_key(value: str) -> bytes:
    return value.casefold().encode()[:VALUE_KEY_BYTES]


def pair_key(subject_key: bytes, predicate_key: bytes) -> bytes:
    # Cut like a value key: pairs that share a cut key are told apart by the record check.
    return (subject_key + PAIR_SEP + predicate_key)[:VALUE_KEY_BYTES]


def count_key(field: str, vkey: bytes) -> bytes:
    return field.encode() + b":" + vkey


class IndexWriter:
    """Puts records and their index entries into one write transaction.

    Gathers every entry first and writes each sub-database's entries sorted, in one
    ``putmulti`` call: neighbouring keys share pages, and the loop runs in C. Count
    increments are summed per value and written once at the end. Value keys are
    made once per distinct value.
    """

    def __init__(self, store: AttestationStore, txn):
        self._txn = txn
        self._store = store
        self.start_seq = U64.unpack(txn.get(b"seq", U64.pack(0), db=store._meta))[0]
        self._seq = self.start_seq
        self.ids: set[str] = set()  # of the records added
        self.added = 0
        self._records: list[tuple[bytes, bytes]] = []
        self._time: list[tuple[bytes, bytes]] = []
        # field -> (value key, ts + seq, id) of each index entry to write
        self._rows: dict[str, list[tuple[bytes, bytes, bytes]]] = {f: [] for f in (*INDEXED_FIELDS, PAIR)}
        self.value_keys: dict[str, bytes] = {}
        self.pair_keys: dict[tuple[bytes, bytes], bytes] = {}

    def add(self, record: Attestation, blob: bytes, seq: int) -> None:
        """One record (encoded as ``blob``) under sequence number ``seq``."""
        self.add_many(((record, blob, seq),))

    def add_many(self, items) -> None:
        """Records as (record, blob, seq): the hot loop of every index write, so it
        keeps its lookups local and makes each distinct value key once."""
        pack, keys_of, cache = TS_SEQ.pack, self._keys_of, self.value_keys
        add_id, add_record, add_time = self.ids.add, self._records.append, self._time.append
        rows = self._rows
        subjects_rows, predicates_rows = rows["subjects"].append, rows["predicates"].append
        contexts_rows, actors_rows = rows["contexts"].append, rows["actors"].append
        source_rows, pair_rows = rows["source"].append, rows[PAIR].append
        pairs = self.pair_keys
        added, top = 0, self._seq
        for record, blob, seq in items:
            id = record.id.encode()
            add_id(record.id)
            added += 1
            if seq > top:
                top = seq
            tail = pack(record.timestamp, seq)
            add_record((id, blob))
            add_time((tail, id))
            subjects, predicates = record.subjects, record.predicates
            if len(subjects) == 1 and len(predicates) == 1:  # the usual shape, inline
                s_key, p_key = cache.get(subjects[0]), cache.get(predicates[0])
                if s_key is None:
                    s_key = cache[subjects[0]] = value_key(subjects[0])
                if p_key is None:
                    p_key = cache[predicates[0]] = value_key(predicates[0])
                subjects_rows((s_key, tail, id))
                predicates_rows((p_key, tail, id))
                pair = pairs.get((s_key, p_key))
                if pair is None:
                    pair = pairs[(s_key, p_key)] = pair_key(s_key, p_key)
                pair_rows((pair, tail, id))
            else:
                s_keys, p_keys = keys_of(subjects), keys_of(predicates)
                for key in s_keys:
                    subjects_rows((key, tail, id))
                for key in p_keys:
                    predicates_rows((key, tail, id))
                self._add_pairs(s_keys, p_keys, tail, id)
            for key in keys_of(record.contexts):
                contexts_rows((key, tail, id))
            for key in keys_of(record.actors):
                actors_rows((key, tail, id))
            key = cache.get(record.source)
            if key is None:
                key = cache[record.source] = value_key(record.source)
            source_rows((key, tail, id))
        self.added += added
        self._seq = top

    def index_pairs(self, record: Attestation, tail: bytes, id: bytes) -> None:
        """A stored record's pair entries (building the pair index of an older store)."""
        self._add_pairs(self._keys_of(record.subjects), self._keys_of(record.predicates), tail, id)

    def _add_pairs(self, subjects, predicates, tail: bytes, id: bytes) -> None:
        append, pairs = self._rows[PAIR].append, self.pair_keys
        if len(subjects) == 1 and len(predicates) == 1:
            both = (subjects[0], predicates[0])
            key = pairs.get(both)
            if key is None:
                key = pairs[both] = pair_key(*both)
            append((key, tail, id))
            return
        for key in {pair_key(s, p) for s in subjects for p in predicates}:  # cut keys may meet
            append((key, tail, id))

    def _keys_of(self, values) -> tuple[bytes, ...]:
        """The distinct value keys of one field: "Alice" and "alice" in one record
        are one entry and one count."""
        cache = self.value_keys
        if len(values) == 1:
            vkey = cache.get(values[0])
            if vkey is None:
                vkey = cache[values[0]] = value_key(values[0])
            return (vkey,)
        out = set()
        for value in values:
            vkey = cache.get(value)
            if vkey is None:
                vkey = cache[value] = value_key(value)
            out.add(vkey)
        return tuple(out)

    def finish(self) -> None:
        """Write the gathered entries, add to the counts and store the sequence number."""
        txn, store = self._txn, self._store
        writes = [(store._records, self._records), (store._time, self._time)]
        added: dict[bytes, int] = {}  # count key -> entries added in this transaction
        for field, rows in self._rows.items():
            writes.append((store._index[field], [(vkey + b"\x00" + tail, id) for vkey, tail, id in rows]))
            prefix = field.encode() + b":"
            for vkey, n in collections.Counter(vkey for vkey, _, _ in rows).items():
                added[prefix + vkey] = n
        for db, items in writes:
            if items:
                items.sort()
                txn.cursor(db).putmulti(items)
        get, put, counts = txn.get, txn.put, store._counts
        for key, n in sorted(added.items()):
            old = get(key, db=counts)
            put(key, U64.pack(n + (U64.unpack(old)[0] if old else 0)), db=counts)
        if self._seq != self.start_seq:
            put(b"seq", U64.pack(self._seq), db=store._meta)
