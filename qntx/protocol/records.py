"""Records embedded in messages (attestations, jobs, runs): plain maps without a tag."""

from __future__ import annotations

from typing import Any

import msgspec


class Attestation(msgspec.Struct, kw_only=True):
    """One immutable claim: subjects are <predicates> in <contexts> according to <actors>."""

    id: str
    subjects: list[str]
    predicates: list[str]
    contexts: list[str]
    actors: list[str]
    timestamp: int  # ms: when the claim was made
    source: str
    attributes: dict[str, Any]
    created_at: int  # ms: when the store accepted it
    # The store's commit order (grows with every stored record): what decides which
    # record is current. 0 for records stored before it was kept.
    seq: int = 0


class NewAttestation(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An attestation to create; the store fills id, timestamp and created_at."""

    subjects: list[str]
    predicates: list[str] = msgspec.field(default_factory=lambda: ["_"])
    contexts: list[str] = msgspec.field(default_factory=lambda: ["_"])
    actors: list[str] = msgspec.field(default_factory=list)
    timestamp: int | None = None
    source: str = "python"
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str | None = None


class Filter(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An attestation query: OR within a field, AND across fields, case-insensitive."""

    subjects: list[str] = msgspec.field(default_factory=list)
    predicates: list[str] = msgspec.field(default_factory=list)
    contexts: list[str] = msgspec.field(default_factory=list)
    actors: list[str] = msgspec.field(default_factory=list)
    time_start: int | None = None  # ms, inclusive
    time_end: int | None = None  # ms, inclusive
    source: str | None = None
    limit: int | None = None
    cursor: str | None = None  # QueryResult.cursor of the previous page


class Progress(msgspec.Struct, kw_only=True):
    current: float = 0
    total: float = 0


class JobError(msgspec.Struct, kw_only=True):
    message: str
    traceback: str = ""


# Job.logs holds a job's stdout, then this line and its stderr (if it wrote any).
STDERR_MARK = "\n--- stderr ---\n"

# JOB_STATUSES: queued -> [dispatched ->] running -> completed | failed | cancelled; paused
# holds a queued job; waiting holds a job until the jobs it runs after have ended. A
# job handed to a plugin is dispatched until its handler's code starts (JobStarted).
JOB_STATUSES = ("queued", "dispatched", "running", "completed", "failed", "cancelled", "paused", "waiting")
RUNNING_STATUSES = ("dispatched", "running")  # out on a lease
AFTER_POLICIES = ("completed", "always")
FINAL_STATUSES = ("completed", "failed", "cancelled")


# What every timeout's error message starts with (worker, plugin pool and lease
# expiry alike): a run's history calls such a run "timed out", not "failed".
TIMED_OUT = "timed out after"
# How a run ended, in a job's history; "running" while it still runs.
RUN_OUTCOMES = ("running", "completed", "failed", "timed out", "cancelled", "lost")
HISTORY_KEPT = 20  # runs a job's history keeps (the oldest go first; history_dropped counts them)


class Run(msgspec.Struct, kw_only=True):
    """One run (lease) of a job, as its history keeps it. ``logs`` is the run's own
    output (its tail, bounded like ``Job.logs``), also when it was cancelled, timed
    out or lost: what it streamed until then."""

    lease: int
    attempt: int = 0  # the job's attempt count when it started (a lost run does not use one)
    worker: str | None = None  # the worker session (or plugin session) that held it
    host: str = ""
    plugin: str | None = None  # the plugin that ran the handler, if any
    started_at: int = 0  # wall ms
    finished_at: int | None = None
    outcome: str = "running"  # one of RUN_OUTCOMES
    error: JobError | None = None
    logs: str = ""


# The MessagePack nil: what an absent payload or result is carried as.
NIL = msgspec.Raw(b"\xc0")


class Job(msgspec.Struct, kw_only=True):
    """A job record. ``payload`` and ``result`` stay raw MessagePack wherever they
    are only carried (server, Pulse, workers); the scripting API decodes them."""

    id: str
    handler: str
    payload: msgspec.Raw = NIL
    status: str = "queued"
    attempts: int = 0
    max_attempts: int = 3
    timeout_s: float = 300.0
    priority: int = 0
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    progress: Progress | None = None
    result: msgspec.Raw = NIL
    error: JobError | None = None
    logs: str = ""
    parent_id: str | None = None
    worker: str | None = None
    idempotency_key: str | None = None
    run_after: int = 0  # wall ms: a delayed job, or a retry's backoff, waits until then
    lease: int = 0  # the lease of the current (or last) run; 0: never dispatched
    runs: int = 0  # runs started, counting those lost to a worker, plugin or server going away
    lost: int = 0  # runs lost that way since the job was (re)queued by a retry: they use no attempt
    after: list[str] = []  # jobs this one runs after
    after_policy: str = "completed"  # "completed": only if they all completed; "always": once they ended
    version: str | None = None  # the handler version (its attestation's ASID) this job runs
    schedule: str | None = None  # the schedule that fired it
    due: int | None = None  # the due time of the schedule firing it is (Unix ms)
    # Every run, oldest first (the last HISTORY_KEPT; retries keep the earlier ones).
    # Only GetJob carries it: listings, events and waits leave it out.
    history: list[Run] = []
    history_dropped: int = 0  # older runs no longer kept
    trace: str | None = None  # the W3C traceparent it was submitted with
