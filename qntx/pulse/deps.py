"""Pulse's dependencies: which waiting jobs run after which others. No I/O.

A job submitted with ``after`` waits (status ``waiting``) until every job it names
has ended; ``after_policy`` says whether they must have completed. The core records
what each waiting job still waits for (``wait``), notes the jobs that ended during
an event (``ended``) and, at the end of that event, starts or fails their dependents
(``qntx.pulse.core``), one job at a time, without recursion.
"""

from __future__ import annotations

from collections.abc import Callable

from qntx.errors import NotFound
from qntx.protocol import FINAL_STATUSES, Job


class Dependencies:
    def __init__(self) -> None:
        self._pending: dict[str, set[str]] = {}  # waiting job -> the jobs it still waits for
        self._dependents: dict[str, set[str]] = {}  # job -> waiting jobs that run after it
        self.ended: list[Job] = []  # jobs that just ended, whose dependents must hear of it

    @staticmethod
    def statuses(after: list[str], live: Callable[[str], Job | None], ended: dict[str, str], *, strict: bool) -> dict[str, str]:
        """The status of each job in ``after``: live ones from memory, the rest as the
        loop read them from the store. ``strict``: an unknown one is an error (else it
        counts as gone, which a dependent that needs it completed fails on)."""
        out = {}
        for dep in after:
            other = live(dep)
            status = other.status if other is not None else ended.get(dep)
            if status is None:
                if strict:
                    raise NotFound(f"no job {dep} to run after")
                # Pruned since: it ended, and well enough, or its dependent would have
                # failed with it then.
                status = "completed"
            out[dep] = status
        return out

    @staticmethod
    def split(statuses: dict[str, str]) -> tuple[set[str], list[tuple[str, str]]]:
        """(the jobs not ended yet, [(job, status)] of those that ended other than completed)."""
        pending = {dep for dep, status in statuses.items() if status not in FINAL_STATUSES}
        failed = [(dep, status) for dep, status in statuses.items() if dep not in pending and status != "completed"]
        return pending, failed

    def wait(self, job_id: str, pending: set[str]) -> None:
        self._pending[job_id] = pending
        for dep in pending:
            self._dependents.setdefault(dep, set()).add(job_id)

    def stop(self, job_id: str) -> None:
        """``job_id`` waits no more (cancelled, failed)."""
        for dep in self._pending.pop(job_id, ()):
            waiting = self._dependents.get(dep)
            if waiting is not None:
                waiting.discard(job_id)
                if not waiting:
                    del self._dependents[dep]

    def has_dependents(self, job_id: str) -> bool:
        return job_id in self._dependents

    def dependents(self, job_id: str) -> list[str]:
        return sorted(self._dependents.get(job_id, ()))

    def note_ended(self, job: Job) -> None:
        if job.id in self._dependents:
            self.ended.append(job)

    def next_ended(self) -> tuple[Job, list[str]] | None:
        """A job that ended, with the jobs that waited for it (each hears of it once)."""
        if not self.ended:
            return None
        done = self.ended.pop()
        return done, sorted(self._dependents.pop(done.id, ()))

    def arrived(self, job_id: str, done_id: str) -> set[str] | None:
        """``done_id`` ended: what ``job_id`` still waits for (None: it waits for nothing here)."""
        pending = self._pending.get(job_id)
        if pending is not None:
            pending.discard(done_id)
        return pending

    def done_waiting(self, job_id: str) -> None:
        self._pending.pop(job_id, None)
