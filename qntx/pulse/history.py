"""A job's history of runs, and the output its running runs stream. No I/O.

The Pulse core (``qntx.pulse.core``) calls these as runs start and end. Each run
(lease) gets a ``Run`` in ``Job.history`` when it is dispatched; when it ends, for
whatever reason, the entry gets its end time, its outcome (``RUN_OUTCOMES``), its
error and its output. A run that reports its end (``JobDone``) brings its logs; one
that is cancelled, times out or is lost keeps what it streamed (``JobOutput``) until
then, which ``OutputTails`` holds per lease while it runs.

Bounded: a run's logs are the last ``MAX_LOG_BYTES`` of its output; a history keeps
the last ``HISTORY_KEPT`` runs and counts the older ones in ``history_dropped``; the
tails of every running run together stay under ``TAILS_BYTES`` (each gets its share,
never less than ``TAIL_MIN_BYTES``).

Entries are replaced, never changed in place: a commit encodes a snapshot of the
history list on the writer thread while the core goes on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgspec

from qntx.protocol import HISTORY_KEPT, STDERR_MARK, TIMED_OUT, Job, JobError, Run
from qntx.pulse.rules import MAX_LOG_BYTES, bound_logs

TAILS_BYTES = 64 << 20
TAIL_MIN_BYTES = 4 << 10


def start_run(job: Job, lease: int, worker: str | None, host: str, plugin: str | None, wall: int) -> None:
    """A new run of ``job`` went out under ``lease``."""
    run = Run(lease=lease, attempt=job.attempts, worker=worker, host=host, plugin=plugin, started_at=wall)
    history = [*job.history, run]
    if len(history) > HISTORY_KEPT:
        job.history_dropped += len(history) - HISTORY_KEPT
        history = history[-HISTORY_KEPT:]
    job.history = history


def _index(job: Job, lease: int) -> int | None:
    for i in range(len(job.history) - 1, -1, -1):
        if job.history[i].lease == lease:
            return i
    return None


def end_run(job: Job, lease: int, outcome: str, wall: int, *, error: JobError | None = None, logs: str = "") -> None:
    """The run under ``lease`` ended with ``outcome``; a failure whose error says it
    timed out counts as ``timed out``."""
    i = _index(job, lease)
    if i is None:
        return
    if outcome == "failed" and error is not None and error.message.startswith(TIMED_OUT):
        outcome = "timed out"
    job.history = [*job.history]
    job.history[i] = msgspec.structs.replace(
        job.history[i], finished_at=wall, outcome=outcome, error=error, logs=bound_logs(logs)
    )


def late_logs(job: Job, lease: int, logs: str) -> bool:
    """A run that had already ended for Pulse (cancelled, timed out) reported its
    logs after all: keep them if it had none. True if the job changed."""
    i = _index(job, lease)
    if i is None or not logs or job.history[i].logs or job.history[i].outcome == "running":
        return False
    job.history = [*job.history]
    job.history[i] = msgspec.structs.replace(job.history[i], logs=bound_logs(logs))
    return True


def forget_run(job: Job, lease: int) -> None:
    """The run never left (its dispatch could not be delivered): not a run at all."""
    i = _index(job, lease)
    if i is not None:
        job.history = [r for j, r in enumerate(job.history) if j != i]


def claim_run(job: Job, lease: int, worker: str, host: str) -> None:
    """A worker adopted the run after a server restart: it holds it now."""
    i = _index(job, lease)
    if i is not None and (job.history[i].worker != worker or job.history[i].host != host):
        job.history = [*job.history]
        job.history[i] = msgspec.structs.replace(job.history[i], worker=worker, host=host)


@dataclass(slots=True)
class Tail:
    chunks: deque[tuple[str, str]] = field(default_factory=deque)  # (stream, text)
    bytes: int = 0


class OutputTails:
    """What each running run streamed lately, per lease: the last MAX_LOG_BYTES of it
    (less when many run at once: TAILS_BYTES in all)."""

    def __init__(self) -> None:
        self._tails: dict[int, Tail] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def wrote(self, lease: int, stream: str, text: str) -> None:
        tail = self._tails.setdefault(lease, Tail())
        tail.chunks.append((stream, text))
        tail.bytes += len(text)
        cap = min(MAX_LOG_BYTES, max(TAIL_MIN_BYTES, TAILS_BYTES // len(self._tails)))
        while tail.bytes > cap and len(tail.chunks) > 1:
            tail.bytes -= len(tail.chunks.popleft()[1])

    def take(self, lease: int) -> str:
        """The run's output so far, as ``Job.logs`` holds it (stdout, then stderr
        behind STDERR_MARK), and forget it."""
        tail = self._tails.pop(lease, None)
        if tail is None:
            return ""
        stdout = "".join(text for stream, text in tail.chunks if stream != "stderr")
        stderr = "".join(text for stream, text in tail.chunks if stream == "stderr")
        return stdout + (STDERR_MARK + stderr if stderr else "")
