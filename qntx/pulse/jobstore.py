"""Pulse's jobs on disk: the store's interface (``PulseStore``, ``open_job_store``)
and its LMDB layout behind the Pulse core (``qntx.pulse.core``); the PostgreSQL
backend is ``qntx.pulse.jobstore_pg``.

Owns keys, values and indexes, nothing of job semantics: the core decides what a
job's state is and hands over whatever changed; this module stores it and reads it
back. Named sub-databases:

* ``jobs``     id → MessagePack ``[seq, Job]``, with its payload if that is small
* ``payloads`` id → a bigger payload, raw MessagePack, written once when the job is
  new (state changes rewrite the small record, never a big payload)
* ``results``  id → a bigger result, raw MessagePack, put as it came (the record then
  says ``apart``): a big result is copied once, into the map, never encoded again
* ``keys``     idempotency key → id
* ``status``   status + NUL + created_at(8 BE) + seq(8 BE) → id
* ``created``  created_at(8 BE) + seq(8 BE) → id
* ``after``    id + NUL + id of a job that runs after it → nothing (what runs after a job)
* ``meta``     ``seq`` → the next sequence number; ``count:<status>`` → jobs in it;
  ``lease`` → lease ids below it may have been used (reserved in blocks)

``seq`` (given by the queue at submit) follows created_at in index keys, so keys are
unique and jobs created in the same millisecond keep their submit order.
"""

from __future__ import annotations

import struct
from collections.abc import Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import msgspec

from qntx import db
from qntx.errors import Invalid
from qntx.lmdbenv import LmdbEnv
from qntx.protocol import JOB_STATUSES, NIL, Job
from qntx.pulse.commands import Changes
from qntx.pulse.ledger import STORED
from qntx.settings import Settings

_U64 = struct.Struct(">Q")
_STAMP = struct.Struct(">QQ")  # created_at, seq
_DBS = ("jobs", "payloads", "keys", "status", "created", "meta", "after", "results")
# Payloads up to this size stay in the job's record: one B-tree less per commit.
INLINE_PAYLOAD_BYTES = 2048
# Results up to this size stay in the job's record; bigger ones are kept apart.
INLINE_RESULT_BYTES = 64 << 10
PRUNE_BATCH = 500  # jobs deleted per transaction: short enough never to hold the writer long


class StoredJob(msgspec.Struct, array_like=True):
    seq: int
    job: Job
    apart: bool = False  # its result is in ``results`` (the record holds nil)


class Loaded(msgspec.Struct, frozen=True):
    """What ``JobStore.load`` finds: the counters and every job in the asked statuses."""

    next_seq: int
    counts: dict[str, int]
    jobs: list[StoredJob]
    lease_ceiling: int = 1
    plugins: list[str] = []
    schedules: dict[str, list] = {}  # name -> [last due fired, [[due, job id], ...]]
    limits: dict[str, list] = {}  # handler -> [concurrency, rate, per_ms, [recent starts]], as last read from ATS
    handler_versions: dict[str, str] = {}  # handler -> its current version, as last announced


def _status_key(status: str, stamp: bytes) -> bytes:
    return status.encode() + b"\x00" + stamp


def _walk(txn, db, prefix: bytes, *, reverse: bool, below: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every entry whose key starts with ``prefix``, in key order or
    reversed; reversed walks may start below the key ``below`` (a page cursor)."""
    cursor = txn.cursor(db=db)
    if reverse:
        # Land on the first key past the prefix (or on ``below``), then step back.
        after = below if below is not None else (prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else b"")
        found = cursor.prev() if after and cursor.set_range(after) else cursor.last()
    else:
        found = cursor.set_range(prefix)
    while found and cursor.key().startswith(prefix):
        yield cursor.key(), cursor.value()
        found = cursor.prev() if reverse else cursor.next()


def _is_job_id(job_id: object) -> bool:
    return isinstance(job_id, str) and bool(job_id.strip()) and len(job_id.encode()) <= 511


def _inline(job: Job) -> bool:
    return job.payload is not STORED and len(job.payload) <= INLINE_PAYLOAD_BYTES


def _payload_apart(job: Job) -> bool:
    """Whether a new job's payload is written apart (big, and held: not let go to the store)."""
    return job.payload is not STORED and len(job.payload) > INLINE_PAYLOAD_BYTES


def check_job_id(job_id: object) -> None:
    """Raise ``Invalid`` unless ``job_id`` can be a stored job's id."""
    if not isinstance(job_id, str):
        raise Invalid(f"a job id must be a string, got {job_id!r}")
    if not _is_job_id(job_id):
        shown = job_id if len(job_id) <= 40 else job_id[:40] + "…"
        raise Invalid(f"not a job id: {shown!r} (a job id is 1 to 511 bytes, not blank)")


def encode_record(encoder: msgspec.msgpack.Encoder, seq: int, job: Job) -> tuple[bytes, bool]:
    """The job's record as both backends store it, and whether its result goes apart
    (a big payload always does: the record then holds nil for it)."""
    apart = len(job.result) > INLINE_RESULT_BYTES
    if apart or not _inline(job):
        job = msgspec.structs.replace(
            job, payload=job.payload if _inline(job) else NIL, result=NIL if apart else job.result
        )
    return encoder.encode(StoredJob(seq=seq, job=job, apart=apart)), apart


class PulseStore(Protocol):
    """What Pulse's shell, its commits and the embedded API read and write, no more.
    ``JobStore`` (LMDB in the home) and ``qntx.pulse.jobstore_pg.PgJobStore``
    (``store = "postgresql://..."``) implement it with the same records, the same
    orders and the same prune choices (tests/unit/test_retention.py runs on both)."""

    location: str
    # Whether a small group commit is best run on the loop (it costs less than a hop
    # to the writer thread and back) rather than on the writer thread.
    commits_inline: bool
    # Whether a read costs microseconds (a local map) rather than a round trip.
    local_reads: bool

    def load(self, statuses: Iterable[str]) -> Loaded: ...

    def get(self, job_id: str) -> StoredJob | None: ...

    def statuses(self, job_ids: Iterable[str]) -> dict[str, str]: ...

    def find(self, job_id: str | None, idempotency_key: str | None) -> StoredJob | None: ...

    def find_many(self, wanted: list[tuple[str | None, str | None]]) -> list[StoredJob | None]: ...

    def save(self, changes: Changes) -> None: ...

    def prune(
        self, cutoffs: Mapping[str, int], *, max_completed: int | None = None, keep: Container[str] = (),
        batch: int = PRUNE_BATCH,
    ) -> dict[str, list[str]]: ...  # fmt: skip

    def dependents(self, job_id: str, limit: int = 1000) -> list[str]: ...

    def newest(
        self, status: str | None, limit: int, *, before: tuple[int, int] | None = None,
        skip: Container[str] = (), cached: Mapping[str, Job] | None = None,
    ) -> list[tuple[int, int, Job]]: ...  # fmt: skip

    def clear_stale_readers(self) -> int: ...

    def close(self) -> None: ...


def open_job_store(settings: Settings, *, readonly: bool = False) -> PulseStore | None:
    """The job store ``settings`` name: PostgreSQL when ``store`` is a URL (at this
    version's schema: ``qntx db upgrade``), else LMDB under the home. Read-only on
    LMDB gives None while the home has no store yet (nothing was ever submitted)."""
    if db.is_database_url(settings.store):
        from qntx.leader import epoch_from_env
        from qntx.pulse.jobstore_pg import PgJobStore

        return PgJobStore(settings.store, readonly=readonly, epoch=epoch_from_env())
    if readonly and not (settings.pulse_path / "data.mdb").exists():
        return None
    return JobStore(settings.pulse_path, readonly=readonly)


class JobStore:
    """Every job of one Pulse home in an LMDB directory, indexed by status and age."""

    commits_inline = True  # a small commit is a local write and one fsync
    local_reads = True

    def __init__(self, path: str | Path, *, map_size: int = 256 << 20, sync: bool = True, readonly: bool = False):
        self._env = LmdbEnv(path, _DBS, map_size=map_size, sync=sync, readonly=readonly)
        self._db = {name: self._env.db(name) for name in _DBS}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(StoredJob)
        self.location = str(path)

    def close(self) -> None:
        self._env.close()

    def clear_stale_readers(self) -> int:
        return self._env.clear_stale_readers()

    def _with_payload(self, txn, stored: StoredJob) -> StoredJob:
        if stored.job.payload == NIL:  # nil, or big and kept apart
            raw = txn.get(stored.job.id.encode(), db=self._db["payloads"])
            if raw is not None:
                stored.job.payload = msgspec.Raw(raw)
        return self._with_result(txn, stored)

    def _with_result(self, txn, stored: StoredJob) -> StoredJob:
        if stored.apart:
            raw = txn.get(stored.job.id.encode(), db=self._db["results"])
            if raw is not None:
                stored.job.result = msgspec.Raw(raw)
        return stored

    def load(self, statuses: Iterable[str]) -> Loaded:
        """The counters, and every job whose status is one of ``statuses`` (with payloads)."""

        def work(txn) -> Loaded:
            meta = self._db["meta"]
            raw = txn.get(b"seq", db=meta)
            ceiling = txn.get(b"lease", db=meta)
            plugins = txn.get(b"plugins", db=meta)
            schedules = txn.get(b"schedules", db=meta)
            limits = txn.get(b"limits", db=meta)
            versions = txn.get(b"handler-versions", db=meta)
            counts = {}
            for status in JOB_STATUSES:
                count = txn.get(b"count:" + status.encode(), db=meta)
                counts[status] = _U64.unpack(count)[0] if count else 0
            jobs = [
                self._with_payload(txn, self._decoder.decode(txn.get(job_id, db=self._db["jobs"])))
                for status in statuses
                for _, job_id in _walk(txn, self._db["status"], status.encode() + b"\x00", reverse=False)
            ]
            return Loaded(
                next_seq=_U64.unpack(raw)[0] if raw else 0,
                counts=counts,
                jobs=jobs,
                lease_ceiling=_U64.unpack(ceiling)[0] if ceiling else 1,
                plugins=msgspec.msgpack.decode(plugins, type=list[str]) if plugins else [],
                schedules=msgspec.msgpack.decode(schedules, type=dict[str, list]) if schedules else {},
                limits=msgspec.msgpack.decode(limits, type=dict[str, list]) if limits else {},
                handler_versions=msgspec.msgpack.decode(versions, type=dict[str, str]) if versions else {},
            )

        return self._env.read(work)

    def get(self, job_id: str) -> StoredJob | None:
        """One job with its payload, or None."""
        check_job_id(job_id)
        key = job_id.encode()

        def work(txn) -> StoredJob | None:
            raw = txn.get(key, db=self._db["jobs"])
            return None if raw is None else self._with_payload(txn, self._decoder.decode(raw))

        return self._env.read(work)

    def statuses(self, job_ids: Iterable[str]) -> dict[str, str]:
        """The stored status of each of ``job_ids`` that exists."""
        found = {}
        for job_id in job_ids:
            stored = self.get(job_id) if _is_job_id(job_id) else None  # (the core refuses the others)
            if stored is not None:
                found[job_id] = stored.job.status
        return found

    def find(self, job_id: str | None, idempotency_key: str | None) -> StoredJob | None:
        """The stored job with this id, else the one with this idempotency key."""
        if job_id is not None and _is_job_id(job_id):  # (the core refuses the others)
            found = self.get(job_id)
            if found is not None:
                return found
        if idempotency_key is not None:
            key = idempotency_key.encode()
            if key and len(key) <= 511:
                owner = self._env.read(lambda txn: txn.get(key, db=self._db["keys"]))
                if owner is not None:
                    return self.get(owner.decode())
        return None

    def find_many(self, wanted: list[tuple[str | None, str | None]]) -> list[StoredJob | None]:
        """``find`` for each (id, idempotency key)."""
        return [self.find(job_id, key) for job_id, key in wanted]

    def save(self, changes: Changes) -> None:
        """Write changed jobs (each with its seq and its status on disk, None if new),
        the counters, the lease ceiling and the plugin names in one synced transaction."""
        rows, plugins = changes.rows, self._encoder.encode(changes.plugins)
        schedules = None if changes.schedules is None else self._encoder.encode(changes.schedules)
        limits = None if changes.limits is None else self._encoder.encode(changes.limits)
        versions = None if changes.handler_versions is None else self._encoder.encode(changes.handler_versions)
        # Encoded before the transaction, which runs again if the map has to grow.
        prepared = [(seq, job, old, *encode_record(self._encoder, seq, job)) for seq, job, old in rows]

        def work(txn) -> None:
            db = self._db
            for seq, job, old, blob, apart in prepared:
                job_id = job.id.encode()
                stamp = _STAMP.pack(job.created_at, seq)
                txn.put(job_id, blob, db=db["jobs"])
                if apart:  # (a buffer: LMDB copies it once, into the map)
                    txn.put(job_id, job.result, db=db["results"])
                if old is None:
                    txn.put(stamp, job_id, db=db["created"])
                    if _payload_apart(job):  # (a buffer: LMDB copies it once, into the map)
                        txn.put(job_id, job.payload, db=db["payloads"])
                    if job.idempotency_key is not None:
                        txn.put(job.idempotency_key.encode(), job_id, db=db["keys"])
                    for dep in job.after:
                        txn.put(dep.encode() + b"\x00" + job_id, b"", db=db["after"])
                if old != job.status:
                    if old is not None:
                        txn.delete(_status_key(old, stamp), db=db["status"])
                        # Again: a retried job may have been pruned while it was being retried.
                        txn.put(stamp, job_id, db=db["created"])
                    txn.put(_status_key(job.status, stamp), job_id, db=db["status"])
            meta = db["meta"]
            txn.put(b"seq", _U64.pack(changes.next_seq), db=meta)
            txn.put(b"lease", _U64.pack(changes.lease_ceiling), db=meta)
            txn.put(b"plugins", plugins, db=meta)
            if schedules is not None:  # the firings saved with the jobs they enqueued
                txn.put(b"schedules", schedules, db=meta)
            if limits is not None:  # so a restarted server applies them before ATS answers
                txn.put(b"limits", limits, db=meta)
            if versions is not None:  # so jobs submitted before the plugin is back are pinned too
                txn.put(b"handler-versions", versions, db=meta)
            for status, count in changes.counts.items():
                txn.put(b"count:" + status.encode(), _U64.pack(count), db=meta)

        self._env.write(work)

    def prune(
        self,
        cutoffs: Mapping[str, int],
        *,
        max_completed: int | None = None,
        keep: Container[str] = (),
        batch: int = PRUNE_BATCH,
    ) -> dict[str, list[str]]:
        """Delete finished jobs in one small transaction: those of each status in
        ``cutoffs`` that finished before its cutoff (wall ms), and the oldest completed
        ones past ``max_completed``. At most ``batch`` go at once (call again while a
        batch comes back full); ids in ``keep`` (live in Pulse) are left alone.
        Returns the ids of each status that went (Pulse's core counts them out:
        ``PulseCore.pruned``)."""
        def work(txn) -> dict[str, list[str]]:
            db, meta = self._db, self._db["meta"]
            deleted, budget = {status: [] for status in cutoffs}, batch
            for status, cutoff in cutoffs.items():
                count = txn.get(b"count:" + status.encode(), db=meta)
                count = _U64.unpack(count)[0] if count else 0
                over = max(0, count - max_completed) if status == "completed" and max_completed is not None else 0
                prefix = status.encode() + b"\x00"
                victims = []
                # Oldest created first; a job that finished late is passed over, and
                # the scan stops after a few batches' worth either way.
                for scanned, (key, raw_id) in enumerate(_walk(txn, db["status"], prefix, reverse=False)):
                    if len(victims) >= budget or scanned >= 4 * batch:
                        break
                    if raw_id.decode() in keep:
                        continue
                    record = txn.get(raw_id, db=db["jobs"])
                    job = None if record is None else self._decoder.decode(record).job
                    if job is None or len(victims) < over or (job.finished_at or job.created_at) < cutoff:
                        victims.append((key, raw_id, job))
                for key, raw_id, job in victims:
                    txn.delete(key, db=db["status"])
                    txn.delete(key[len(prefix) :], db=db["created"])
                    txn.delete(raw_id, db=db["jobs"])
                    txn.delete(raw_id, db=db["payloads"])
                    txn.delete(raw_id, db=db["results"])
                    if job is not None and job.idempotency_key is not None:
                        owner = job.idempotency_key.encode()
                        if txn.get(owner, db=db["keys"]) == raw_id:
                            txn.delete(owner, db=db["keys"])
                    for dep in job.after if job is not None else ():
                        txn.delete(dep.encode() + b"\x00" + raw_id, db=db["after"])
                deleted[status] = [raw_id.decode() for _, raw_id, _ in victims]
                budget -= len(victims)
                if victims:
                    txn.put(b"count:" + status.encode(), _U64.pack(max(0, count - len(victims))), db=meta)
            return deleted

        return self._env.write(work) if cutoffs else {}

    def dependents(self, job_id: str, limit: int = 1000) -> list[str]:
        """The ids of up to ``limit`` stored jobs that run after ``job_id``."""
        key = job_id.encode() + b"\x00" if isinstance(job_id, str) else b""
        if self._db["after"] is None or not 1 < len(key) <= 511:
            return []

        def work(txn) -> list[str]:
            found = []
            for entry, _ in _walk(txn, self._db["after"], key, reverse=False):
                if len(found) == limit:
                    break
                found.append(entry[len(key) :].decode())
            return found

        return self._env.read(work)

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
        first, older than ``before`` (created_at, seq) if given. Jobs come without
        their payloads.

        Walks that status's index, never the whole store. Ids in ``skip`` are passed
        over without counting; a job in ``cached`` is taken from there, not decoded.
        """
        cached = cached or {}

        def work(txn) -> list[tuple[int, int, Job]]:
            db, prefix = (
                (self._db["created"], b"") if status is None
                else (self._db["status"], status.encode() + b"\x00")
            )  # fmt: skip
            found = []
            walk = _walk(txn, db, prefix, reverse=True, below=None if before is None else prefix + _STAMP.pack(*before))
            for key, raw_id in walk:
                if len(found) == limit:
                    break
                job_id = raw_id.decode()
                if job_id in skip:
                    continue
                job = cached.get(job_id)
                if job is None:
                    job = self._with_result(txn, self._decoder.decode(txn.get(raw_id, db=self._db["jobs"]))).job
                created, seq = _STAMP.unpack(key[-_STAMP.size :])
                found.append((created, seq, job))
            return found

        return self._env.read(work)
