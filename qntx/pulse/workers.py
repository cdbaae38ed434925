"""The worker pool as the server sees it: who is alive, how much each can take.

Flow control is by credit: a worker declares its capacity (``WorkerReady``, also its
heartbeat); the server never has more jobs assigned to a worker than that. A job
leaves a worker's account only when its ``JobDone`` arrives or the worker is
declared dead (no heartbeat for ``dead_after_s``), so nothing is ever stranded in
a socket buffer: a worker that stops answering loses its jobs back to the queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class WorkerState:
    identity: bytes
    name: str
    pid: int
    capacity: int
    last_seen: float
    assigned: set[str] = field(default_factory=set)
    # Jobs it was already running when this server met it (e.g. after a server
    # restart): they occupy slots until the worker stops listing them.
    foreign: set[str] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.capacity - len(self.assigned) - len(self.foreign)


class WorkerPool:
    def __init__(self, dead_after_s: float):
        self.dead_after_s = dead_after_s
        self._workers: dict[bytes, WorkerState] = {}
        self._by_job: dict[str, bytes] = {}
        self._turn = 0

    def seen(self, identity: bytes, name: str, pid: int, capacity: int, running: list[str] = ()) -> WorkerState:
        """Record a hello/heartbeat; returns the worker's state (new or updated)."""
        worker = self._workers.get(identity)
        if worker is None:
            worker = WorkerState(identity, name, pid, max(0, capacity), time.monotonic())
            worker.foreign = set(running)
            self._workers[identity] = worker
        else:
            worker.capacity = max(0, capacity)
            worker.last_seen = time.monotonic()
            worker.foreign &= set(running)
        return worker

    def drop_foreign(self, identity: bytes, job_id: str) -> None:
        worker = self._workers.get(identity)
        if worker is not None:
            worker.foreign.discard(job_id)

    def touch(self, identity: bytes) -> None:
        worker = self._workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()

    def known(self, identity: bytes) -> bool:
        return identity in self._workers

    def has_free(self) -> bool:
        return any(w.free > 0 for w in self._workers.values())

    def pick(self) -> WorkerState | None:
        """The next worker with free credit, taking turns so load spreads evenly."""
        workers = [w for w in self._workers.values() if w.free > 0]
        if not workers:
            return None
        self._turn += 1
        return max(workers, key=lambda w: (w.free, (hash(w.identity) + self._turn) % 7919))

    def assign(self, worker: WorkerState, job_id: str) -> None:
        worker.assigned.add(job_id)
        self._by_job[job_id] = worker.identity

    def finish(self, job_id: str, reporter: bytes | None = None) -> WorkerState | None:
        """Free the slot of ``job_id``; when ``reporter`` is given, only if it holds it
        (a late report from a worker that lost the job must not free another's slot)."""
        if reporter is not None and self._by_job.get(job_id) != reporter:
            return None
        identity = self._by_job.pop(job_id, None)
        worker = self._workers.get(identity) if identity is not None else None
        if worker is not None:
            worker.assigned.discard(job_id)
        return worker

    def holder(self, job_id: str) -> WorkerState | None:
        identity = self._by_job.get(job_id)
        return self._workers.get(identity) if identity is not None else None

    def reap(self) -> list[WorkerState]:
        """Remove and return workers whose heartbeat stopped."""
        cutoff = time.monotonic() - self.dead_after_s
        dead = [w for w in self._workers.values() if w.last_seen < cutoff]
        for worker in dead:
            self.remove(worker.identity)
        return dead

    def remove(self, identity: bytes) -> WorkerState | None:
        worker = self._workers.pop(identity, None)
        if worker is not None:
            for job_id in worker.assigned:
                self._by_job.pop(job_id, None)
        return worker

    def all(self) -> list[WorkerState]:
        return sorted(self._workers.values(), key=lambda w: w.name)
