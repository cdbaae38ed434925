"""The attestation store on PostgreSQL: the interface of ``qntx.ats.backend`` over the
tables of ``qntx.ats.sql``.

Every group commit is one transaction in two round trips: move the sequence and the
count on in ``ats_meta`` (its row lock, held to the commit, makes sequence numbers
follow commit order) and ask which of the group's ids are taken; then claim the ids,
number the records, insert them as one statement, commit. Both ways call the lease's
fence (``qntx.leader``): a commit of a process that no longer leads stores nothing. Records are validated, encoded and numbered by
``qntx.ats.batch`` exactly as on LMDB, and stored as those bytes. There is no journal
in front of the tables: the commit is the durable write (the server's
``synchronous_commit`` and replication decide how durable), so ``log_batches``
commits at once and ``apply_logged`` has nothing to do.

Reads are single statements on the autocommit connection. A lost connection fails
the request with ``Unavailable`` and the next request connects again (a group whose
commit was sent when the connection broke may have been stored: its writers hear
``Unavailable`` all the same).
"""

from __future__ import annotations

import msgspec

from qntx import db
from qntx.ats import sql
from qntx.ats.backend import StoreCommon
from qntx.ats.batch import Prepared, claim_and_number, prepare_batches
from qntx.ats.filters import normalise_filter, parse_cursor
from qntx.ats.indexing import TS_SEQ
from qntx.ats.records import MAX_ID_BYTES, Stored
from qntx.ats.store_query import MAX_SCAN, MAX_SEEKS
from qntx.errors import QntxError, Unavailable
from qntx.protocol import MAX_PAGE, Attestation, Filter, NewAttestation

# Times a group is tried in one statement before its ids are checked first (another
# writer moving the sequence each time).
_FAST_TRIES = 3
_CLAIM = object()  # a group's ids must be checked first


class PgAttestationStore(StoreCommon):
    """Attestations in a PostgreSQL database migrated by ``qntx db upgrade``."""

    def __init__(self, url: str, *, readonly: bool = False, epoch: int | None = None):
        """``epoch``: the leadership epoch every commit is fenced by (None: commit
        only while no ``up`` leads the bus)."""
        self.url = url
        self.location = db.redact(url)
        self.readonly = readonly
        self.epoch = epoch
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Attestation)
        self._pg = db.psycopg()
        # One statement or transaction at a time. Each query is planned for its values:
        # a plan made once for any value (what a prepared statement gets after a few
        # runs) may walk the whole time index for a value the GIN index answers at once.
        self._conn = db.StoreConnection(
            url, "ats", application="qntx ats", readonly=readonly, epoch=epoch,
            what=f"attestation store {self.location}", setup=("SET plan_cache_mode = force_custom_plan",),
        )  # fmt: skip
        self._run = self._conn.run
        self.last_query_scanned = 0
        self._seq = self._run(lambda conn: conn.execute("SELECT seq FROM ats_meta").fetchone()[0])

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._conn.close()

    def clear_stale_readers(self) -> int:
        return 0  # LMDB's reader slots; the database server tracks its own sessions

    # ------------------------------------------------------------------ writes

    def put_batches(
        self, batches: list[list[NewAttestation]], *, now_ms: int | None = None
    ) -> list[list[Attestation] | QntxError]:
        """Group commit: every batch durable when this returns, each all or nothing, in
        one transaction; a batch with a bad item or a taken id gets its error."""
        outcomes = self._commit(batches, now_ms)
        return [o if isinstance(o, QntxError) else [p.record for p in o] for o in outcomes]

    def log_batches(
        self, batches: list[list[NewAttestation]], *, now_ms: int | None = None
    ) -> list[Stored | QntxError]:
        """``put_batches`` as the ATS actor wants it: each batch with its bytes."""
        outcomes = self._commit(batches, now_ms)
        return [
            o if isinstance(o, QntxError) else Stored([p.record for p in o], [p.blob for p in o])
            for o in outcomes
        ]

    # Nothing waits behind a journal here: every committed record is queryable.
    logged = 0

    @property
    def logged_seq(self) -> int:
        return self._seq

    @property
    def indexed_seq(self) -> int:
        return self._seq

    def apply_logged(self) -> int:
        return 0

    def _commit(self, batches, now_ms: int | None) -> list[list[Prepared] | QntxError]:
        if self.readonly:
            raise Unavailable(f"attestation store {self.location} is open read-only")
        prepared = prepare_batches(batches, now_ms, self._encoder)
        if not any(isinstance(b, list) and b for b in prepared):
            return prepared

        for _ in range(_FAST_TRIES):
            done = self._run(lambda conn: self._commit_at_once(conn, prepared))
            if done is _CLAIM:
                break
            if done is not None:
                return done
        return self._run(lambda conn: self._commit_claiming(conn, prepared))

    def _commit_at_once(self, conn, prepared) -> list[list[Prepared] | QntxError] | None:
        """The group in one statement, numbered after the last sequence number this
        store wrote or read: None when another writer moved it since (read it again),
        ``_CLAIM`` when an id is taken (``_commit_claiming`` tells which batch)."""
        results, rows = claim_and_number(prepared, lambda id: False, self._seq, self._encoder)
        if not rows:
            return results
        try:
            stored = conn.execute(
                sql.COMMIT_ROWS, (len(rows), len(rows), self._seq, self.epoch, *sql.columns(rows))
            ).fetchone()[0]
        except self._pg.errors.UniqueViolation:
            return _CLAIM
        if stored != len(rows):
            self._seq = conn.execute("SELECT seq FROM ats_meta").fetchone()[0]
            return None
        self._seq += len(rows)
        return results

    def _commit_claiming(self, conn, prepared) -> list[list[Prepared] | QntxError]:
        """The group with its ids checked against the table first, in two round trips:
        move the sequence on as if every record were stored and ask which ids are
        taken (one pipeline), then the rows and the commit."""
        wanted = [p.record.id for b in prepared if isinstance(b, list) for p in b]
        with conn.pipeline(), conn.transaction():
            conn.execute("SELECT qntx_fence(%s)", (self.epoch,))
            moved = conn.execute(
                "UPDATE ats_meta SET seq = seq + %s, count = count + %s RETURNING seq",
                (len(wanted), len(wanted)),
            )
            found = conn.execute(sql.TAKEN, (wanted,))
            seq = moved.fetchone()[0] - len(wanted)
            taken_ids = {row[0] for row in found.fetchall()}
            results, rows = self._claim(conn, prepared, seq, taken_ids, set(wanted), self._encoder)
            if len(rows) != len(wanted):  # a batch failed: the sequence ends at the last stored
                conn.execute(
                    "UPDATE ats_meta SET seq = %s, count = count - %s",
                    (seq + len(rows), len(wanted) - len(rows)),
                )
            if rows:
                conn.execute(sql.INSERT_ROWS, sql.columns(rows))
        self._seq = seq + len(rows)
        return results

    @staticmethod
    def _claim(conn, prepared, seq: int, taken_ids: set[str], checked: set[str], encoder):
        """``claim_and_number`` against the table: ``taken_ids`` are the stored ones
        among the ids ``checked``; an id drawn again is asked for on its own."""

        def taken(id: str) -> bool:
            if id not in checked:
                checked.add(id)
                if conn.execute(sql.TAKEN, ([id],)).fetchone() is not None:
                    taken_ids.add(id)
            return id in taken_ids

        return claim_and_number(prepared, taken, seq, encoder)

    # ------------------------------------------------------------------ reads

    def get(self, id: str) -> Attestation | None:
        if not isinstance(id, str) or not id or len(id.encode()) > MAX_ID_BYTES or "\x00" in id:
            return None
        row = self._run(
            lambda conn: conn.execute("SELECT record FROM ats_attestations WHERE id = %s", (id,)).fetchone()
        )
        return None if row is None else self._decoder.decode(row[0])

    def count(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT count FROM ats_meta").fetchone()[0])

    def stats(self) -> dict:
        def work(conn):
            count = conn.execute("SELECT count FROM ats_meta").fetchone()[0]
            size = conn.execute("SELECT pg_total_relation_size('ats_attestations')").fetchone()[0]
            return count, size

        count, size = self._run(work)
        # map_size is LMDB's; a database grows as its disk allows.
        return {"attestations": count, "map_size": 0, "used_bytes": size, "path": self.location}

    def query_page(
        self, flt: Filter, *, page: int = MAX_PAGE, max_scan: int = MAX_SCAN,
        max_seeks: int = MAX_SEEKS,
    ) -> tuple[list[Attestation], str | None]:  # fmt: skip
        """One page of ``query``: at most ``page`` records (and no more than
        ``max_scan``: the database reads what it must for them), newest first, and the
        cursor of the next page, or None when there is no more."""
        want, lo, hi, limit = normalise_filter(flt)
        start = parse_cursor(flt.cursor)
        self.last_query_scanned = 0
        if lo > hi:
            return [], None
        size = min(page, max_scan) if limit is None else min(limit, page, max_scan)
        below = TS_SEQ.unpack(start) if start is not None else None
        statement, params = sql.query_sql(want, lo, hi, below, size)
        rows = self._run(lambda conn: conn.execute(statement, params).fetchall())
        decode = self._decoder.decode
        records = [decode(row[0]) for row in rows]
        self.last_query_scanned = len(records)
        if len(rows) < size:
            return records, None
        last = rows[-1]
        return records, TS_SEQ.pack(last[1], last[2]).hex()

