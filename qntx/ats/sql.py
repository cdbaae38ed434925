"""The attestation store's tables on PostgreSQL, and a filter as one SQL query.

``ats_attestations`` holds one row per attestation: its commit sequence number
``seq`` (the primary key, the order "current" follows), its ``id``, its ``ts``
(timestamp), the *keys* of its subjects, predicates, contexts and actors as arrays
(GIN-indexed) and of its source, and the record itself as the MessagePack bytes the
LMDB store keeps too (``record``), so both backends return the same records.

A value's key is its casefold (what the ax language matches on: "Straße" is
"STRASSE"); a value longer than ``KEY_CHARS`` keeps a prefix and the SHA-256 of its
whole casefold, so index entries stay small and matching stays exact (a hashed key
is longer than any plain one: the two never meet). ``ats_meta`` holds the last
sequence number and the number of rows; each group commit locks it, so sequence
numbers follow commit order exactly as on LMDB.

A filter becomes ``WHERE`` conditions: each list field an overlap (``&&``) of
arrays of keys, the source one key of a set, the time range a ``BETWEEN``, and a page
cursor (timestamp, seq) a row comparison; the rows come ``ORDER BY ts DESC, seq DESC``,
the LMDB order.
"""

from __future__ import annotations

import hashlib

from qntx.ats.indexing import LIST_FIELDS
from qntx.ats.records import MAX_TIMESTAMP

KEY_CHARS = 200
_HASHED_PREFIX = 150  # + "\x1f" + 64 hex digits: 215 characters, more than KEY_CHARS
MAX_INT64 = (1 << 63) - 1

MIGRATIONS: list[list[str]] = [
    [  # 1: attestations with their keys, the commit sequence, the row count
        "CREATE TABLE ats_attestations ("
        " seq bigint PRIMARY KEY,"
        " id text NOT NULL UNIQUE,"
        " ts bigint NOT NULL,"
        " subjects text[] NOT NULL,"
        " predicates text[] NOT NULL,"
        " contexts text[] NOT NULL,"
        " actors text[] NOT NULL,"
        " source text NOT NULL,"
        " record bytea NOT NULL)",
        "CREATE INDEX ats_attestations_time ON ats_attestations (ts, seq)",
        *(
            f"CREATE INDEX ats_attestations_{field} ON ats_attestations USING gin ({field}) WITH (fastupdate = off)"
            for field in LIST_FIELDS
        ),
        "CREATE INDEX ats_attestations_source ON ats_attestations (source, ts, seq)",
        "CREATE TABLE ats_meta ("
        " one boolean PRIMARY KEY DEFAULT true CHECK (one),"
        " seq bigint NOT NULL, count bigint NOT NULL)",
        "INSERT INTO ats_meta (seq, count) VALUES (0, 0)",
    ],
]

TAKEN = "SELECT id FROM ats_attestations WHERE id = ANY(%s::text[])"
# A group's rows as one statement of one array per column (a list field's keys travel
# as array literals, one per row: arrays of arrays must be rectangular).
INSERT_ROWS = (
    "INSERT INTO ats_attestations (seq, id, ts, subjects, predicates, contexts, actors, source, record)"
    " SELECT seq, id, ts, s::text[], p::text[], c::text[], a::text[], src, rec FROM unnest("
    "%s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[],"
    " %s::text[], %s::bytea[]) AS t(seq, id, ts, s, p, c, a, src, rec)"
)
# The whole group commit as one statement (its own transaction): move the sequence on
# by N from the number the writer expects and insert the rows numbered after it, or
# do nothing when another writer moved it (0 rows stored); a taken id fails it whole,
# and so does the lease's fence (``qntx.leader``) when the writer's epoch does not lead.
COMMIT_ROWS = (
    "WITH advance AS (UPDATE ats_meta SET seq = seq + %s, count = count + %s"
    " WHERE seq = %s AND qntx_fence(%s) RETURNING seq),"
    f" stored AS ({INSERT_ROWS} WHERE EXISTS (SELECT FROM advance) RETURNING 1)"
    " SELECT count(*) FROM stored"
)


def key(value: str) -> str:
    folded = value.casefold()
    if len(folded) <= KEY_CHARS:
        return folded
    return folded[:_HASHED_PREFIX] + "\x1f" + hashlib.sha256(folded.encode()).hexdigest()


def keys(values: list[str]) -> list[str]:
    return [key(v) for v in values]


def columns(items) -> list[list]:
    """The parameters of ``INSERT_ROWS`` for numbered items (``Prepared``)."""
    records = [item.record for item in items]
    return [
        [r.seq for r in records],
        [r.id for r in records],
        [r.timestamp for r in records],
        *([array_literal(keys(getattr(r, field))) for r in records] for field in LIST_FIELDS),
        [key(r.source) for r in records],
        [item.blob for item in items],
    ]


def array_literal(values: list[str]) -> str:
    """``values`` as a PostgreSQL array literal: each element quoted, ``\\`` and ``"``
    escaped (values hold no NUL: the store refuses it)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def query_sql(
    want: dict[str, set[str]], lo: int, hi: int, below: tuple[int, int] | None, limit: int
) -> tuple[str, list]:
    """The SQL and parameters of one page: matching rows in [lo, hi], strictly below
    the cursor's (timestamp, seq) when given, newest first, at most ``limit``.
    ``want`` holds casefolded values per field (as ``normalise_filter`` gives them)."""
    where, params = ["ts BETWEEN %s AND %s"], [lo, hi]
    for field in LIST_FIELDS:
        if field in want:
            where.append(f"{field} && %s::text[]")
            params.append(sorted({key(v) for v in want[field]}))
    if "source" in want:
        where.append("source = ANY(%s::text[])")
        params.append(sorted({key(v) for v in want["source"]}))
    if below is not None:
        ts, seq = below
        if ts <= MAX_TIMESTAMP:  # a tail above every timestamp leaves all rows below it
            if seq > MAX_INT64:
                where.append("ts <= %s")
                params.append(ts)
            else:
                where.append("(ts, seq) < (%s, %s)")
                params += [ts, seq]
    sql = (
        f"SELECT record, ts, seq FROM ats_attestations WHERE {' AND '.join(where)}"
        " ORDER BY ts DESC, seq DESC LIMIT %s"
    )
    return sql, [*params, limit]
