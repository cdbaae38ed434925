"""Pulse's jobs on disk: the LMDB layout behind ``qntx.pulse.queue.JobQueue``.

Owns keys, values and indexes, nothing of job semantics: the queue decides what a
job's state is and hands over whatever changed; this module stores it and reads it
back. Named sub-databases:

* ``jobs``     id → MessagePack ``[seq, Job]``
* ``keys``     idempotency key → id
* ``status``   status + NUL + created_at(8 BE) + seq(8 BE) → id
* ``created``  created_at(8 BE) + seq(8 BE) → id
* ``meta``     ``seq`` → the next sequence number; ``count:<status>`` → jobs in it

``seq`` (given by the queue at submit) follows created_at in index keys, so keys are
unique and jobs created in the same millisecond keep their submit order.
"""

from __future__ import annotations

import struct
from collections.abc import Container, Iterable, Iterator, Mapping
from pathlib import Path

import msgspec

from qntx.errors import Invalid
from qntx.lmdbenv import LmdbEnv
from qntx.protocol import JOB_STATUSES, Job

MAX_KEY_BYTES = 400  # for idempotency keys: LMDB keys stop at 511 bytes

_U64 = struct.Struct(">Q")
_STAMP = struct.Struct(">QQ")  # created_at, seq
_DBS = ("jobs", "keys", "status", "created", "meta")


class StoredJob(msgspec.Struct, array_like=True):
    seq: int
    job: Job


class Saved(msgspec.Struct, frozen=True):
    """What ``JobStore.load`` finds: the counters and every job in the asked statuses."""

    next_seq: int
    counts: dict[str, int]
    jobs: list[StoredJob]


def _status_key(status: str, stamp: bytes) -> bytes:
    return status.encode() + b"\x00" + stamp


def _walk(txn, db, prefix: bytes, *, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every entry whose key starts with ``prefix``, in key order or reversed."""
    cursor = txn.cursor(db=db)
    if reverse:
        # Land on the first key past the prefix, then step back into it.
        after = prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else b""
        found = cursor.prev() if after and cursor.set_range(after) else cursor.last()
    else:
        found = cursor.set_range(prefix)
    while found and cursor.key().startswith(prefix):
        yield cursor.key(), cursor.value()
        found = cursor.prev() if reverse else cursor.next()


class JobStore:
    """Every job of one Pulse home in an LMDB directory, indexed by status and age."""

    def __init__(self, path: str | Path, *, map_size: int = 256 << 20, sync: bool = True, readonly: bool = False):
        self._env = LmdbEnv(path, _DBS, map_size=map_size, sync=sync, readonly=readonly)
        self._db = {name: self._env.db(name) for name in _DBS}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(StoredJob)

    def close(self) -> None:
        self._env.close()

    def load(self, statuses: Iterable[str]) -> Saved:
        """The counters, and every job whose status is one of ``statuses``."""

        def work(txn) -> Saved:
            meta = self._db["meta"]
            raw = txn.get(b"seq", db=meta)
            counts = {}
            for status in JOB_STATUSES:
                count = txn.get(b"count:" + status.encode(), db=meta)
                counts[status] = _U64.unpack(count)[0] if count else 0
            jobs = [
                self._decoder.decode(txn.get(job_id, db=self._db["jobs"]))
                for status in statuses
                for _, job_id in _walk(
                    txn, self._db["status"], status.encode() + b"\x00", reverse=False
                )
            ]
            return Saved(next_seq=_U64.unpack(raw)[0] if raw else 0, counts=counts, jobs=jobs)

        return self._env.read(work)

    def get(self, job_id: str) -> StoredJob | None:
        if not isinstance(job_id, str):
            raise Invalid(f"a job id must be a string, got {job_id!r}")
        key = job_id.encode()
        if not key or len(key) > 511:
            return None
        raw = self._env.read(lambda txn: txn.get(key, db=self._db["jobs"]))
        return None if raw is None else self._decoder.decode(raw)

    def job_id_for_key(self, idempotency_key: str) -> str | None:
        raw = self._env.read(lambda txn: txn.get(idempotency_key.encode(), db=self._db["keys"]))
        return None if raw is None else raw.decode()

    def save(
        self,
        changed: list[tuple[StoredJob, str | None]],
        next_seq: int,
        counts: Mapping[str, int],
    ) -> None:
        """Write ``changed`` jobs (each with its status on disk, None if new) and the
        counters in one synced transaction."""
        # Encoded before the transaction, which runs again if the map has to grow.
        rows = [(stored, old, self._encoder.encode(stored)) for stored, old in changed]

        def work(txn) -> None:
            for stored, old, blob in rows:
                job = stored.job
                job_id = job.id.encode()
                stamp = _STAMP.pack(job.created_at, stored.seq)
                txn.put(job_id, blob, db=self._db["jobs"])
                if old is None:
                    txn.put(stamp, job_id, db=self._db["created"])
                    if job.idempotency_key is not None:
                        txn.put(job.idempotency_key.encode(), job_id, db=self._db["keys"])
                if old != job.status:
                    if old is not None:
                        txn.delete(_status_key(old, stamp), db=self._db["status"])
                    txn.put(_status_key(job.status, stamp), job_id, db=self._db["status"])
            txn.put(b"seq", _U64.pack(next_seq), db=self._db["meta"])
            for status, count in counts.items():
                txn.put(b"count:" + status.encode(), _U64.pack(count), db=self._db["meta"])

        self._env.write(work)

    def newest(
        self,
        status: str | None,
        limit: int,
        *,
        skip: Container[str],
        cached: Mapping[str, Job],
    ) -> list[tuple[int, int, Job]]:
        """Up to ``limit`` (created_at, seq, job) of ``status`` (None: any), newest first.

        Walks that status's index, never the whole store. Ids in ``skip`` are passed
        over without counting; a job in ``cached`` is taken from there, not decoded.
        """

        def work(txn) -> list[tuple[int, int, Job]]:
            db, prefix = (
                (self._db["created"], b"") if status is None
                else (self._db["status"], status.encode() + b"\x00")
            )  # fmt: skip
            found = []
            for key, raw_id in _walk(txn, db, prefix, reverse=True):
                if len(found) == limit:
                    break
                job_id = raw_id.decode()
                if job_id in skip:
                    continue
                job = cached.get(job_id)
                if job is None:
                    job = self._decoder.decode(txn.get(raw_id, db=self._db["jobs"])).job
                created, seq = _STAMP.unpack(key[-_STAMP.size :])
                found.append((created, seq, job))
            return found

        return self._env.read(work)
