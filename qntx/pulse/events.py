"""What goes into Pulse's core and what comes out of it.

``PulseCore.handle(event, now)`` takes one of the events below and returns a list of
commands; the server carries the commands out (``qntx.pulse.scheduler``). Neither
side of this module does any I/O: events are facts the loop observed (a message
arrived, a turn ended), commands are what it must do about them.

``reply_to`` is opaque to the core: whatever the loop needs to answer a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from qntx.protocol import (
    CancelRunning,
    Dispatch,
    Job,
    JobDone,
    JobOutput,
    JobProgress,
    JobStarted,
    Submit,
    WorkerReady,
    WorkerWelcome,
)
from qntx.pulse.directives import Limit, Schedule


@dataclass(frozen=True, slots=True)
class Instant:
    """Now, twice: the wall clock (records, backoffs: they outlive the process) and a
    monotonic clock (leases, liveness: they must not jump with the wall clock)."""

    wall: int  # Unix ms
    mono: int  # ms on a monotonic clock


# --------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Submitted:
    spec: Submit
    reply_to: Any
    existing: Job | None = None  # the stored job with that id or idempotency key, if any
    ended: dict[str, str] = field(default_factory=dict)  # status of each stored `after` job


@dataclass(frozen=True, slots=True)
class WorkerSeen:
    """A worker's hello or heartbeat, from its control socket."""

    session: bytes
    message: WorkerReady
    pipe_ready: bool  # it is connected to the jobs pipe the server bound for it


@dataclass(frozen=True, slots=True)
class Finished:
    message: JobDone


@dataclass(frozen=True, slots=True)
class Started:
    message: JobStarted


@dataclass(frozen=True, slots=True)
class Progressed:
    message: JobProgress


@dataclass(frozen=True, slots=True)
class OutputWritten:
    message: JobOutput


@dataclass(frozen=True, slots=True)
class Steer:
    """cancel, retry, pause or resume one job; ``stored`` is its record on disk, if
    it is not live (the loop reads it for the core)."""

    action: str
    job_id: str
    reply_to: Any
    stored: Job | None = None
    stored_seq: int = 0
    latest: bool = False  # retry: with the handler's current version
    ended: dict[str, str] = field(default_factory=dict)  # status of each stored `after` job
    brief: bool = False  # reply with the job without its payload (bulk steering)


@dataclass(frozen=True, slots=True)
class PluginUp:
    """A plugin was initialised: the handlers it runs (through its own sessions)."""

    name: str
    handlers: tuple[str, ...]
    versions: tuple[tuple[str, str], ...] = ()  # (handler, its current version)


@dataclass(frozen=True, slots=True)
class PluginDown:
    name: str


@dataclass(frozen=True, slots=True)
class HandlersAnnounced:
    """A plugin's handlers changed (all of them: they replace the last)."""

    name: str
    handlers: tuple[str, ...]
    versions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DirectivesSet:
    """The current handler limits and schedules (all of them: they replace the last)."""

    limits: dict[str, Limit]
    schedules: dict[str, Schedule]


@dataclass(frozen=True, slots=True)
class Undeliverable:
    """The jobs pipe of a session refused a dispatch (not connected yet or gone)."""

    lease: int


@dataclass(frozen=True, slots=True)
class Saved:
    """A commit is durable: ``versions`` says what it wrote of each job."""

    versions: dict[str, tuple[int, str]]  # job id -> (version, status) written
    lease_ceiling: int


@dataclass(frozen=True, slots=True)
class Turn:
    """The loop has read every pending message: expire, reap, dispatch, publish."""


# --------------------------------------------------------------------- commands


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
