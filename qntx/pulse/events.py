"""What goes into Pulse's core: the events ``PulseCore.handle(event, now)`` takes.

Events are facts the shell observed (a message arrived, a turn ended); the core
answers each with commands (``qntx.pulse.commands``). Nothing here does any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qntx.protocol import (
    Job,
    JobDone,
    JobOutput,
    JobProgress,
    JobStarted,
    Submit,
    WorkerReady,
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
class RunClaimed:
    """A result sent again names the session that ran it: a run a crashed server
    left, which nobody claimed yet, is that session's."""

    session: bytes
    lease: int


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
