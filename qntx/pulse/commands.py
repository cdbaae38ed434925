"""What Pulse's core asks its shell to do: the commands ``PulseCore.handle`` returns.

The shell (``qntx.pulse.shell``) carries them out: it sends, binds, replies, publishes,
logs and commits. None of them does any I/O itself.

``reply_to`` is opaque to the core: whatever the loop needs to answer a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from qntx.protocol import CancelRunning, Dispatch, Job, WorkerWelcome


@dataclass(frozen=True, slots=True)
class SendJob:
    session: bytes
    message: Dispatch
    # Only once the commit holding the run is on disk: a handler with side effects
    # never runs without its run recorded (built-ins, which have none, go at once).
    durable: bool = False


@dataclass(frozen=True, slots=True)
class SendControl:
    session: bytes
    message: CancelRunning | WorkerWelcome


@dataclass(frozen=True, slots=True)
class OpenPipe:
    """Bind the jobs PUSH of a new session and welcome it."""

    session: bytes


@dataclass(frozen=True, slots=True)
class ClosePipe:
    session: bytes


@dataclass(frozen=True, slots=True)
class CancelAtPlugin:
    plugin: str
    job_id: str
    lease: int


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer a request; ``durable``: only once the next commit is on disk."""

    reply_to: Any
    message: msgspec.Struct
    durable: bool = True


@dataclass(frozen=True, slots=True)
class Publish:
    topic: bytes
    message: msgspec.Struct


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # a loguru level name
    text: str
    job: Job | None = None  # the job it is about: JSON logs carry its id, lease, handler and trace


@dataclass(slots=True)
class Changes:
    """What a commit must write: rows of (seq, job, status on disk or None if new)."""

    rows: list[tuple[int, Job, str | None]] = field(default_factory=list)
    versions: dict[str, tuple[int, str]] = field(default_factory=dict)
    next_seq: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    lease_ceiling: int = 0
    plugins: list[str] = field(default_factory=list)  # every plugin that ever registered
    schedules: dict[str, list] | None = None  # name -> [last due, [[due, job id], ...]]; None: unchanged
    limits: dict[str, list] | None = None  # handler -> [concurrency, rate, per_ms, [recent starts, wall ms]]; None: unchanged
    handler_versions: dict[str, str] | None = None  # handler -> its current version; None: unchanged
