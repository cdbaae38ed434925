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


class IndexRows:
    """The records and index entries of a set of attestations, gathered to be put into
    one write transaction (``write``).

    Gathering is Python work and writing is mostly LMDB's, so the two can happen in
    different places: the ATS gathers a group's entries as it journals the group, on
    its loop, and its writer thread only sorts and puts them. Each entry's key is made
    once, from its value's key prefix (made once per distinct value) and the record's
    ts + seq tail; each sub-database's entries are written sorted, in one ``putmulti``
    call, so neighbouring keys share pages and the loop runs in C; count increments
    are counted per prefix (in C) and written once.
    """

    def __init__(self):
        self.added = 0
        self.top_seq = 0  # the highest sequence number added
        self._records: list[tuple[bytes, bytes]] = []
        self._time: list[tuple[bytes, bytes]] = []
        # field -> its entries (key, id), and the prefix (value key + NUL) of each
        self._rows: dict[str, list[tuple[bytes, bytes]]] = {f: [] for f in (*INDEXED_FIELDS, PAIR)}
        self._prefixes: dict[str, list[bytes]] = {f: [] for f in (*INDEXED_FIELDS, PAIR)}
        self._value_prefix: dict[str, bytes] = {}  # value -> value key + NUL
        self._pair_prefix: dict[tuple[bytes, bytes], bytes] = {}  # (prefix, prefix) -> pair key + NUL

    def add(self, record: Attestation, blob: bytes, seq: int) -> None:
        """One record (encoded as ``blob``) under sequence number ``seq``."""
        self.add_many(((record, blob, seq),))

    def add_many(self, items) -> None:
        """Records as (record, blob, seq): the hot loop of every index write, so it
        keeps its lookups local and makes each distinct value's prefix once."""
        pack, prefixes_of, cache = TS_SEQ.pack, self._prefixes_of, self._value_prefix
        add_record, add_time = self._records.append, self._time.append
        rows, prefixes = self._rows, self._prefixes
        s_rows, p_rows, x_rows = rows["subjects"].append, rows["predicates"].append, rows[PAIR].append
        c_rows, a_rows, o_rows = rows["contexts"].append, rows["actors"].append, rows["source"].append
        s_pre, p_pre, x_pre = prefixes["subjects"].append, prefixes["predicates"].append, prefixes[PAIR].append
        c_pre, a_pre, o_pre = prefixes["contexts"].append, prefixes["actors"].append, prefixes["source"].append
        pairs = self._pair_prefix
        added, top = 0, self.top_seq
        for record, blob, seq in items:
            id = record.id.encode()
            added += 1
            if seq > top:
                top = seq
            tail = pack(record.timestamp, seq)
            add_record((id, blob))
            add_time((tail, id))
            subjects, predicates = record.subjects, record.predicates
            if len(subjects) == 1 and len(predicates) == 1:  # the usual shape, inline
                s, p = cache.get(subjects[0]), cache.get(predicates[0])
                if s is None:
                    s = cache[subjects[0]] = value_key(subjects[0]) + b"\x00"
                if p is None:
                    p = cache[predicates[0]] = value_key(predicates[0]) + b"\x00"
                s_rows((s + tail, id))
                s_pre(s)
                p_rows((p + tail, id))
                p_pre(p)
                x = pairs.get((s, p))
                if x is None:
                    x = pairs[(s, p)] = pair_key(s[:-1], p[:-1]) + b"\x00"
                x_rows((x + tail, id))
                x_pre(x)
            else:
                s_all, p_all = prefixes_of(subjects), prefixes_of(predicates)
                for s in s_all:
                    s_rows((s + tail, id))
                    s_pre(s)
                for p in p_all:
                    p_rows((p + tail, id))
                    p_pre(p)
                self._add_pairs(s_all, p_all, tail, id)
            contexts = record.contexts
            if len(contexts) == 1:
                c = cache.get(contexts[0])
                if c is None:
                    c = cache[contexts[0]] = value_key(contexts[0]) + b"\x00"
                c_rows((c + tail, id))
                c_pre(c)
            else:
                for c in prefixes_of(contexts):
                    c_rows((c + tail, id))
                    c_pre(c)
            for a in prefixes_of(record.actors):
                a_rows((a + tail, id))
                a_pre(a)
            o = cache.get(record.source)
            if o is None:
                o = cache[record.source] = value_key(record.source) + b"\x00"
            o_rows((o + tail, id))
            o_pre(o)
        self.added += added
        self.top_seq = top

    def index_pairs(self, record: Attestation, tail: bytes, id: bytes) -> None:
        """A stored record's pair entries (building the pair index of an older store)."""
        self._add_pairs(self._prefixes_of(record.subjects), self._prefixes_of(record.predicates), tail, id)

    def _add_pairs(self, subjects, predicates, tail: bytes, id: bytes) -> None:
        """The pair entries of one record, from its subjects' and predicates' prefixes."""
        append, prefixes, pairs = self._rows[PAIR].append, self._prefixes[PAIR].append, self._pair_prefix
        if len(subjects) == 1 and len(predicates) == 1:
            both = (subjects[0], predicates[0])
            x = pairs.get(both)
            if x is None:
                x = pairs[both] = pair_key(subjects[0][:-1], predicates[0][:-1]) + b"\x00"
            append((x + tail, id))
            prefixes(x)
            return
        for x in {pair_key(s[:-1], p[:-1]) + b"\x00" for s in subjects for p in predicates}:  # cut keys may meet
            append((x + tail, id))
            prefixes(x)

    def _prefixes_of(self, values) -> tuple[bytes, ...]:
        """The distinct prefixes (value key + NUL) of one field: "Alice" and "alice"
        in one record are one entry and one count."""
        cache = self._value_prefix
        if len(values) == 1:
            prefix = cache.get(values[0])
            if prefix is None:
                prefix = cache[values[0]] = value_key(values[0]) + b"\x00"
            return (prefix,)
        out = set()
        for value in values:
            prefix = cache.get(value)
            if prefix is None:
                prefix = cache[value] = value_key(value) + b"\x00"
            out.add(prefix)
        return tuple(out)

    def write(self, store: AttestationStore, txn) -> None:
        """Put the gathered records and entries, add to the counts and move the stored
        sequence number on. May run again in a new transaction (a map grown): it
        changes nothing here but the order of the gathered lists."""
        writes = [(store._records, self._records), (store._time, self._time)]
        added: dict[bytes, int] = {}  # count key -> entries added in this transaction
        for field, rows in self._rows.items():
            writes.append((store._index[field], rows))
            head = field.encode() + b":"
            for prefix, n in collections.Counter(self._prefixes[field]).items():
                added[head + prefix[:-1]] = n
        for db, items in writes:
            if items:
                items.sort()
                txn.cursor(db).putmulti(items)
        get, put, counts = txn.get, txn.put, store._counts
        for key, n in sorted(added.items()):
            old = get(key, db=counts)
            put(key, U64.pack(n + (U64.unpack(old)[0] if old else 0)), db=counts)
        if self.top_seq > stored_seq(store, txn):
            put(b"seq", U64.pack(self.top_seq), db=store._meta)


def stored_seq(store: AttestationStore, txn) -> int:
    """The last sequence number in the indexes, as ``txn`` sees them."""
    return U64.unpack(txn.get(b"seq", U64.pack(0), db=store._meta))[0]
