"""Pulse's jobs on PostgreSQL: the ``PulseStore`` interface of ``qntx.pulse.jobstore``
over the tables of ``MIGRATIONS`` (component ``pulse`` of ``qntx db upgrade``).

The tables mirror the LMDB sub-databases, and hold the same bytes:

* ``pulse_jobs``   one row per job: its id, seq, created_at (the two order it),
  status (indexed with them), ``finished`` (finished_at, else created_at: what
  retention compares), ``record`` (the MessagePack ``StoredJob`` of the LMDB store,
  with its payload if small and its result if not kept apart), ``payload`` (a big
  payload, written once when the job is new), ``result`` (a big result, kept apart)
* ``pulse_keys``   idempotency key → job id
* ``pulse_after``  (job id, id of a job that runs after it)
* ``pulse_counts`` status → jobs in it
* ``pulse_meta``   one row: the next seq, the lease ceiling, the plugin names, and the
  schedules, limits and handler versions as MessagePack

Every ``save`` (one group commit) is one statement, and so one transaction in one
round trip; every ``prune`` batch is one transaction; both on the writer connection; reads run on a connection of their own,
so the loop's reads never wait behind a prune on the writer thread. Text columns
compare bytewise (``COLLATE "C"``), the order of LMDB's keys.

Every write goes through ``save``'s statement or ``prune``'s transaction, and both
call the lease's fence (``qntx.leader``) with the epoch this store writes for: a
write of a process that no longer leads the bus stores nothing.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

import msgspec

from qntx import db
from qntx.errors import Unavailable
from qntx.protocol import JOB_STATUSES, NIL, Job
from qntx.pulse.commands import Changes
from qntx.pulse.jobstore import (
    PRUNE_BATCH,
    Loaded,
    StoredJob,
    _is_job_id,
    _payload_apart,
    check_job_id,
    encode_record,
)

MIGRATIONS: list[list[str]] = [
    [  # 1: jobs with their indexes, keys, dependents, counters and the one meta row
        "CREATE TABLE pulse_jobs ("
        ' id text COLLATE "C" PRIMARY KEY,'
        " seq bigint NOT NULL,"
        " created_at bigint NOT NULL,"
        ' status text COLLATE "C" NOT NULL,'
        " finished bigint NOT NULL,"
        " record bytea NOT NULL,"
        " payload bytea,"
        " result bytea)",
        "CREATE INDEX pulse_jobs_status ON pulse_jobs (status, created_at, seq)",
        "CREATE INDEX pulse_jobs_created ON pulse_jobs (created_at, seq)",
        'CREATE TABLE pulse_keys (key text COLLATE "C" PRIMARY KEY, id text COLLATE "C" NOT NULL)',
        "CREATE INDEX pulse_keys_id ON pulse_keys (id)",
        'CREATE TABLE pulse_after (dep text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL, PRIMARY KEY (dep, id))',
        "CREATE INDEX pulse_after_id ON pulse_after (id)",
        'CREATE TABLE pulse_counts (status text COLLATE "C" PRIMARY KEY, count bigint NOT NULL)',
        "CREATE TABLE pulse_meta ("
        " one boolean PRIMARY KEY DEFAULT true CHECK (one),"
        " seq bigint NOT NULL, lease bigint NOT NULL, plugins bytea,"
        " schedules bytea, limits bytea, handler_versions bytea)",
        "INSERT INTO pulse_meta (seq, lease) VALUES (0, 1)",
    ],
]

_UPSERT_JOBS = (
    "INSERT INTO pulse_jobs (id, seq, created_at, status, finished, record, payload, result)"
    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::bigint[],"
    " %s::bytea[], %s::bytea[], %s::bytea[])"
    " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, created_at = excluded.created_at,"
    " status = excluded.status, finished = excluded.finished, record = excluded.record,"
    " result = excluded.result"
)
_UPSERT_KEYS = (
    "INSERT INTO pulse_keys (key, id) SELECT * FROM unnest(%s::text[], %s::text[])"
    " ON CONFLICT (key) DO UPDATE SET id = excluded.id"
)
_INSERT_AFTER = (
    "INSERT INTO pulse_after (dep, id) SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING"
)
_UPSERT_COUNTS = (
    "INSERT INTO pulse_counts (status, count) SELECT * FROM unnest(%s::text[], %s::bigint[])"
    " ON CONFLICT (status) DO UPDATE SET count = excluded.count"
)
_SAVE_META = (
    "UPDATE pulse_meta SET seq = %s, lease = %s, plugins = %s, schedules = coalesce(%s, schedules),"
    " limits = coalesce(%s, limits), handler_versions = coalesce(%s, handler_versions)"
)
# ``newest`` reads what it still needs and a few more (for jobs it passes over), at
# most this many rows at a time.
_PAGE = 500
_SPARE = 16


class PgJobStore:
    """Every job of one bus in a PostgreSQL database migrated by ``qntx db upgrade``."""

    # Every commit waits for the database (a round trip and its sync): on the writer
    # thread the loop goes on meanwhile, and what arrives joins the next commit.
    commits_inline = False
    local_reads = False  # every read is a round trip: lookups are batched

    def __init__(self, url: str, *, readonly: bool = False, epoch: int | None = None):
        """``epoch``: the leadership epoch every write is fenced by (None: write only
        while no ``up`` leads the bus)."""
        self.url = url
        self.location = db.redact(url)
        self.readonly = readonly
        self.epoch = epoch
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(StoredJob)
        # Writes and reads each on a connection of their own.
        self._writer, self._reader = (
            db.StoreConnection(
                url, "pulse", application=f"qntx pulse {role}", readonly=readonly, epoch=epoch,
                what=f"job store {self.location}",
            )
            for role in ("write", "read")
        )  # fmt: skip
        self._read = self._reader.run
        self._read(lambda conn: None)  # connect now: a missing schema fails the start

    # ------------------------------------------------------------------ lifecycle

    def _write_one(self, statement: str, params) -> None:
        """One statement: its own transaction, in one round trip."""
        if self.readonly:
            raise Unavailable(f"job store {self.location} is open read-only")
        self._writer.run(lambda conn: conn.execute(statement, params))

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    def clear_stale_readers(self) -> int:
        return 0  # LMDB's reader slots; the database server tracks its own sessions

    # ------------------------------------------------------------------ reads

    def _stored(self, record: bytes, payload: bytes | None, result: bytes | None) -> StoredJob:
        stored = self._decoder.decode(record)
        if payload is not None and stored.job.payload == NIL:
            stored.job.payload = msgspec.Raw(payload)
        if stored.apart and result is not None:
            stored.job.result = msgspec.Raw(result)
        return stored

    def load(self, statuses: Iterable[str]) -> Loaded:
        """The counters, and every job whose status is one of ``statuses`` (with payloads)."""
        statuses = list(statuses)

        def work(conn) -> Loaded:
            with conn.transaction():  # one snapshot for all of it
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                return snapshot(conn)

        def snapshot(conn) -> Loaded:
            meta = conn.execute(
                "SELECT seq, lease, plugins, schedules, limits, handler_versions FROM pulse_meta"
            ).fetchone()
            counts = dict.fromkeys(JOB_STATUSES, 0)
            counts.update(conn.execute("SELECT status, count FROM pulse_counts").fetchall())
            jobs = []
            for status in statuses:
                rows = conn.execute(
                    "SELECT record, payload, result FROM pulse_jobs WHERE status = %s ORDER BY created_at, seq",
                    (status,),
                ).fetchall()
                jobs += (self._stored(*row) for row in rows)
            return meta, counts, jobs

        (seq, lease, plugins, schedules, limits, versions), counts, jobs = self._read(work)
        decode = msgspec.msgpack.decode
        return Loaded(
            next_seq=seq,
            counts=counts,
            jobs=jobs,
            lease_ceiling=lease,
            plugins=decode(plugins, type=list[str]) if plugins else [],
            schedules=decode(schedules, type=dict[str, list]) if schedules else {},
            limits=decode(limits, type=dict[str, list]) if limits else {},
            handler_versions=decode(versions, type=dict[str, str]) if versions else {},
        )

    def get(self, job_id: str) -> StoredJob | None:
        """One job with its payload, or None."""
        check_job_id(job_id)
        row = self._read(
            lambda conn: conn.execute(
                "SELECT record, payload, result FROM pulse_jobs WHERE id = %s", (job_id,)
            ).fetchone()
        )
        return None if row is None else self._stored(*row)

    def statuses(self, job_ids: Iterable[str]) -> dict[str, str]:
        """The stored status of each of ``job_ids`` that exists."""
        wanted = [job_id for job_id in job_ids if _is_job_id(job_id)]  # (the core refuses the others)
        if not wanted:
            return {}
        rows = self._read(
            lambda conn: conn.execute("SELECT id, status FROM pulse_jobs WHERE id = ANY(%s)", (wanted,)).fetchall()
        )
        return dict(rows)

    def find(self, job_id: str | None, idempotency_key: str | None) -> StoredJob | None:
        """The stored job with this id, else the one with this idempotency key."""
        return self.find_many([(job_id, idempotency_key)])[0]

    def find_many(self, wanted: list[tuple[str | None, str | None]]) -> list[StoredJob | None]:
        """``find`` for each (id, idempotency key), in one round trip for them all."""
        ids = [job_id for job_id, _ in wanted if job_id is not None and _is_job_id(job_id)]  # (the core refuses the others)
        keys = [key for _, key in wanted if key is not None and 0 < len(key.encode()) <= 511]

        def work(conn) -> tuple[dict, dict]:
            by_id = by_key = {}
            if ids:
                rows = conn.execute("SELECT id, record, payload, result FROM pulse_jobs WHERE id = ANY(%s)", (ids,))
                by_id = {row[0]: row[1:] for row in rows}
            if keys:
                rows = conn.execute(
                    "SELECT k.key, j.record, j.payload, j.result FROM pulse_keys k JOIN pulse_jobs j ON j.id = k.id"
                    " WHERE k.key = ANY(%s)",
                    (keys,),
                )
                by_key = {row[0]: row[1:] for row in rows}
            return by_id, by_key

        by_id, by_key = self._read(work) if ids or keys else ({}, {})
        found: list[StoredJob | None] = []
        for job_id, key in wanted:
            row = by_id.get(job_id) or by_key.get(key)
            found.append(None if row is None else self._stored(*row))
        return found

    def dependents(self, job_id: str, limit: int = 1000) -> list[str]:
        """The ids of up to ``limit`` stored jobs that run after ``job_id``."""
        if not isinstance(job_id, str) or not 0 < len(job_id.encode()) <= 510:
            return []
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT id FROM pulse_after WHERE dep = %s ORDER BY id LIMIT %s", (job_id, limit)
            ).fetchall()
        )
        return [row[0] for row in rows]

    def newest(
        self,
        status: str | None,
        limit: int,
        *,
        before: tuple[int, int] | None = None,
        skip: Container[str] = (),
        cached: Mapping[str, Job] | None = None,
    ) -> list[tuple[int, int, Job]]:
        """Up to ``limit`` (created_at, seq, job) of ``status`` (None: any), newest
        first, older than ``before`` (created_at, seq) if given; jobs come without
        their big payloads. Ids in ``skip`` are passed over without counting; a job in
        ``cached`` is taken from there, not decoded."""
        cached = cached or {}
        where = "" if status is None else "status = %(status)s AND "
        statement = (
            f"SELECT id, created_at, seq, record, result FROM pulse_jobs WHERE {where}"
            "(created_at, seq) < (%(created)s, %(seq)s) ORDER BY created_at DESC, seq DESC LIMIT %(page)s"
        )
        found: list[tuple[int, int, Job]] = []
        created, seq = before if before is not None else (2**63 - 1, 2**63 - 1)
        while len(found) < limit:
            page = min(_PAGE, limit - len(found) + _SPARE)
            params = {"status": status, "created": created, "seq": seq, "page": page}
            rows = self._read(lambda conn, params=params: conn.execute(statement, params).fetchall())
            for job_id, created, seq, record, result in rows:
                if len(found) == limit:
                    break
                if job_id in skip:
                    continue
                job = cached.get(job_id)
                if job is None:
                    job = self._stored(record, None, result).job
                found.append((created, seq, job))
            if len(rows) < page:
                break
        return found

    # ------------------------------------------------------------------ writes

    def save(self, changes: Changes) -> None:
        """Write changed jobs (each with its seq and its status on disk, None if new),
        the counters, the lease ceiling and the plugin names in one transaction."""
        ids, seqs, created, statuses, finished, records, payloads, results = ([] for _ in range(8))
        keys: dict[str, str] = {}  # (a key given twice in one commit: the later job's, as on LMDB)
        deps: dict[tuple[str, str], None] = {}
        for seq, job, old in changes.rows:
            record, apart = encode_record(self._encoder, seq, job)
            ids.append(job.id)
            seqs.append(seq)
            created.append(job.created_at)
            statuses.append(job.status)
            finished.append(job.finished_at or job.created_at)
            records.append(record)
            payloads.append(bytes(job.payload) if old is None and _payload_apart(job) else None)
            results.append(bytes(job.result) if apart else None)
            if old is None:
                if job.idempotency_key is not None:
                    keys[job.idempotency_key] = job.id
                for dep in job.after:
                    deps[dep, job.id] = None
        encode = self._encoder.encode
        meta = (
            changes.next_seq,
            changes.lease_ceiling,
            encode(changes.plugins),
            None if changes.schedules is None else encode(changes.schedules),
            None if changes.limits is None else encode(changes.limits),
            None if changes.handler_versions is None else encode(changes.handler_versions),
        )
        counts = list(changes.counts.items())

        # One statement, so one implicit transaction in one round trip: each table's
        # rows as a data-modifying CTE (all run, referenced or not), the meta row last,
        # fenced: a statement whose fence raises writes none of it.
        parts, params = [], []
        if ids:
            parts.append(f"j AS ({_UPSERT_JOBS} RETURNING 1)")
            params += [ids, seqs, created, statuses, finished, records, payloads, results]
        if keys:
            parts.append(f"k AS ({_UPSERT_KEYS} RETURNING 1)")
            params += [list(keys), list(keys.values())]
        if deps:
            parts.append(f"a AS ({_INSERT_AFTER} RETURNING 1)")
            params += [[dep for dep, _ in deps], [job_id for _, job_id in deps]]
        if counts:
            parts.append(f"c AS ({_UPSERT_COUNTS} RETURNING 1)")
            params += [[s for s, _ in counts], [c for _, c in counts]]
        statement = ("WITH " + ", ".join(parts) + " " if parts else "") + _SAVE_META
        self._write_one(statement + " WHERE qntx_fence(%s)", (*params, *meta, self.epoch))

    def prune(
        self,
        cutoffs: Mapping[str, int],
        *,
        max_completed: int | None = None,
        keep: Container[str] = (),
        batch: int = PRUNE_BATCH,
    ) -> dict[str, list[str]]:
        """``JobStore.prune`` on the tables: the same jobs chosen (oldest created
        first, at most ``batch``, a scan of at most four batches per status), deleted
        with their keys, payloads, results and dependents' entries in one transaction."""
        if not cutoffs:
            return {}
        if self.readonly:
            raise Unavailable(f"job store {self.location} is open read-only")

        def choose(conn) -> dict[str, list[str]]:
            # Chosen and deleted in one transaction (the writer's lock keeps out saves).
            deleted, budget = {status: [] for status in cutoffs}, batch
            with conn.transaction():
                conn.execute("SELECT qntx_fence(%s)", (self.epoch,))
                for status, cutoff in cutoffs.items():
                    row = conn.execute("SELECT count FROM pulse_counts WHERE status = %s", (status,)).fetchone()
                    count = row[0] if row else 0
                    over = max(0, count - max_completed) if status == "completed" and max_completed is not None else 0
                    rows = conn.execute(
                        "SELECT id, finished FROM pulse_jobs WHERE status = %s ORDER BY created_at, seq LIMIT %s",
                        (status, 4 * batch),
                    ).fetchall()
                    victims = []
                    for job_id, ended in rows:
                        if len(victims) >= budget:
                            break
                        if job_id in keep:
                            continue
                        if len(victims) < over or ended < cutoff:
                            victims.append(job_id)
                    if victims:
                        with conn.pipeline():
                            conn.execute("DELETE FROM pulse_jobs WHERE id = ANY(%s)", (victims,))
                            conn.execute("DELETE FROM pulse_keys WHERE id = ANY(%s)", (victims,))
                            conn.execute("DELETE FROM pulse_after WHERE id = ANY(%s)", (victims,))
                            conn.execute(
                                "UPDATE pulse_counts SET count = greatest(0, count - %s) WHERE status = %s",
                                (len(victims), status),
                            )
                    deleted[status] = victims
                    budget -= len(victims)
            return deleted

        return self._writer.run(choose)
