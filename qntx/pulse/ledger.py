"""Pulse's ledger: the jobs held in memory and what of them is on disk. No I/O.

The core (``qntx.pulse.core``) keeps every live job here, and final ones until a
commit has saved them. The ledger numbers jobs (``seq``: their order of creation),
counts them by status (the counts on disk are these), knows which changed since the
last commit (``rows``), which are not on disk yet (``unsaved``: listings merge them
in) and which idempotency keys they hold. A commit that reached the disk (``saved``)
drops the final jobs it wrote from memory.

It also indexes the jobs that wait to run (queued, paused, waiting) by handler, so
that a plugin announcing its handlers finds the jobs of a handler it lost without
looking at any other job.
"""

from __future__ import annotations

import msgspec

from qntx.protocol import FINAL_STATUSES, JOB_STATUSES, NIL, RUNNING_STATUSES, Job

WAITING_STATUSES = ("queued", "paused", "waiting")  # not running yet, not ended
# A payload bigger than this is let go from memory once it is on disk and its job is
# out on a lease: the store has it for a retry, a re-dispatch or GetJob (the server
# then holds one copy of a big payload at a time, not one more for as long as it runs).
BIG_PAYLOAD_BYTES = 1 << 20
# What a job in memory holds in place of a payload it let go (the shell reads it back
# from the store). 0xc1 is the one byte MessagePack never uses: should it ever reach a
# reader, it is refused, never taken for a value.
STORED = msgspec.Raw(b"\xc1")


def public(job: Job) -> Job:
    """The job as events, listings and waits carry it: without its payload and its
    history (GetJob has them)."""
    return msgspec.structs.replace(job, payload=NIL, history=[])


class Ledger:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}  # live jobs, and final ones until saved
        self.seq: dict[str, int] = {}  # job id -> its number (the order of creation)
        self._on_disk: dict[str, str] = {}  # status on disk of each saved job in jobs
        self._version: dict[str, int] = {}
        self._dirty: set[str] = set()  # changed since the last rows()
        self._unsaved: set[str] = set()  # newest version not on disk yet
        self._writing: set[str] = set()  # handed to the commit in flight
        self._keys: dict[str, str] = {}  # idempotency key -> id, for jobs in memory
        self._counts = dict.fromkeys(JOB_STATUSES, 0)
        self._revived: dict[str, str] | None = None  # while a prune runs: stored jobs brought back, their stored status
        self.next_seq = 0
        self.meta_dirty = True  # counts, next_seq, lease ceiling or plugin names changed
        # handler -> ids of its jobs waiting to run (a handler's set stays when empty:
        # handlers are few, and jobs come and go)
        self._waiting: dict[str, set[str]] = {}
        self._handlers: dict[str, set[str]] = {}  # plugin (a name's part before its first dot) -> its handlers seen

    # ---------------------------------------------------------------- jobs

    def adopt(self, seq: int, job: Job) -> None:
        """A job read from the store (at start, or a stored one a retry brings back)."""
        self.jobs[job.id] = job
        self.seq[job.id] = seq
        self._on_disk[job.id] = job.status
        self._version[job.id] = 0
        if job.idempotency_key is not None:
            self._keys[job.idempotency_key] = job.id
        if job.status in WAITING_STATUSES:
            self._wait(job)
        if self._revived is not None:
            self._revived[job.id] = job.status

    def add(self, job: Job) -> None:
        """A new job: the next number (it has no status on disk yet)."""
        self.jobs[job.id] = job
        self.seq[job.id] = self.next_seq
        self.next_seq += 1
        if job.idempotency_key is not None:
            self._keys[job.idempotency_key] = job.id

    def touch(self, job: Job) -> None:
        """``job`` changed: the next commit writes it."""
        self._version[job.id] = self._version.get(job.id, 0) + 1
        self._dirty.add(job.id)
        self._unsaved.add(job.id)

    def set_status(self, job: Job, status: str) -> None:
        if job.id in self._version or job.id in self._on_disk:
            self._counts[job.status] -= 1
            if job.status in WAITING_STATUSES:
                self._unwait(job)
        self._counts[status] += 1
        job.status = status
        if status in WAITING_STATUSES:
            self._wait(job)
        # (touch, inline: this runs at every change of every job)
        self._version[job.id] = self._version.get(job.id, 0) + 1
        self._dirty.add(job.id)
        self._unsaved.add(job.id)

    def _wait(self, job: Job) -> None:
        ids = self._waiting.get(job.handler)
        if ids is None:
            ids = self._waiting[job.handler] = set()
            self._handlers.setdefault(job.handler.split(".", 1)[0], set()).add(job.handler)
        ids.add(job.id)

    def _unwait(self, job: Job) -> None:
        ids = self._waiting.get(job.handler)
        if ids is not None:
            ids.discard(job.id)

    def waiting_handlers(self, plugin: str) -> set[str]:
        """The handlers named for ``plugin`` (``plugin.<name>``) that jobs wait to run."""
        waiting = self._waiting
        return {h for h in self._handlers.get(plugin, ()) if waiting[h]}

    def waiting_jobs(self, handler: str) -> list[Job]:
        """The jobs of ``handler`` that wait to run (queued, paused, waiting)."""
        return [self.jobs[i] for i in sorted(self._waiting.get(handler, ()))]

    def seq_of(self, job_id: str) -> int:
        return self.seq[job_id]

    def owner_of_key(self, key: str | None) -> str | None:
        return None if key is None else self._keys.get(key)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def restore_counts(self, counts: dict[str, int], next_seq: int) -> None:
        self._counts.update(counts)
        self.next_seq = next_seq

    def unsaved(self) -> dict[str, Job]:
        """Jobs whose newest state is not on disk yet."""
        return {i: self.jobs[i] for i in self._unsaved}

    def is_unsaved(self, job_id: str) -> bool:
        return job_id in self._unsaved

    # ---------------------------------------------------------------- commits

    def has_changes(self) -> bool:
        return self.meta_dirty or bool(self._dirty)

    def rows(self) -> tuple[list[tuple[int, Job, str | None]], dict[str, tuple[int, str]]]:
        """What changed since the last call: (rows of (seq, a snapshot of the job, its
        status on disk or None), job id -> (version, status) written)."""
        dirty, self._dirty = [i for i in self._dirty if i in self.jobs], set()
        self._writing = set(dirty)
        self.meta_dirty = False
        # Snapshots: the commit encodes them on another thread while these jobs move on
        # (history lists are replaced, never changed in place: a shallow copy is one).
        rows = [(self.seq[i], msgspec.structs.replace(self.jobs[i]), self._on_disk.get(i)) for i in dirty]
        return rows, {job.id: (self._version[job.id], job.status) for _, job, _ in rows}

    def commit_failed(self) -> None:
        self.meta_dirty = True
        self._dirty |= self._writing

    def saved(self, versions: dict[str, tuple[int, str]]) -> None:
        """A commit wrote these versions: final jobs saved in their newest state leave memory."""
        for job_id, (version, status) in versions.items():
            job = self.jobs.get(job_id)
            if job is None:
                continue
            self._on_disk[job_id] = status  # what the index on disk now says
            if job.status in RUNNING_STATUSES and job.payload is not STORED and len(job.payload) > BIG_PAYLOAD_BYTES:
                job.payload = STORED  # on disk since its first commit; the dispatch holds its own reference
            if self._version.get(job_id) != version:
                continue  # changed again since: the next commit writes it
            self._unsaved.discard(job_id)
            if job.status in FINAL_STATUSES:  # durable now: memory keeps only live jobs
                for table in (self.jobs, self.seq, self._on_disk, self._version):
                    table.pop(job_id, None)
                if job.idempotency_key is not None and self._keys.get(job.idempotency_key) == job_id:
                    del self._keys[job.idempotency_key]

    def prune_started(self) -> None:
        """A prune batch is about to run on the writer thread: until ``pruned``, note
        each stored job a retry brings back (that batch may delete it, and the retry
        counted it out of its stored status already)."""
        self._revived = {}

    def pruned(self, deleted: dict[str, list[str]]) -> None:
        """Finished jobs left the store: count them out, except those a retry took back
        meanwhile (in memory now, or brought back from that status during the batch)."""
        revived, self._revived = self._revived or {}, None
        for status, ids in deleted.items():
            gone = [i for i in ids if i not in self.jobs and revived.get(i) != status]
            self._counts[status] -= len(gone)
            self.meta_dirty = self.meta_dirty or bool(gone)
