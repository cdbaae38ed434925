"""Every message that crosses a QNTX socket, declared once.

Messages are msgspec Structs encoded as MessagePack maps. Each request/reply
message carries its class name in the ``type`` field, so one tagged union per
socket role decodes whatever arrives there. Records embedded in messages
(``Attestation``, ``Job``...) are plain maps without a tag.

The framing around these bodies (correlation frames, topics) belongs to
``qntx.bus``; docs/PROTOCOL.md describes both for clients in other languages.

Socket roles and their unions:

=====================  ==========================  ===========================
socket                 requests (decoded there)    replies / pushes
=====================  ==========================  ===========================
ats ROUTER             ``AtsRequest``              ``AtsReply``
server ROUTER          ``ServerRequest``           ``ServerReply``
workers ROUTER         ``WorkerMessage``           ``WorkerCommand`` (pushed)
a session's jobs PUSH  -                           ``WorkerJob`` (to its PULL)
results PULL           ``WorkerResult``            -
plugin ROUTER          ``PluginRequest``           ``PluginReply``
ats / server PUB       -                           ``Event``
=====================  ==========================  ===========================
"""

from __future__ import annotations

from typing import Any

import msgspec

from qntx.bus.messages import (  # noqa: F401  (re-exported: one import for every message)
    ERROR_CODES,
    Ack,
    ErrorReply,
    Message,
    Ping,
    Pong,
)
from qntx.bus.security import ROLES

# --------------------------------------------------------------------- records


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


# --------------------------------------------------------------------- ats


class Attest(Message):
    """Store attestations; the reply comes only after they are durably committed."""

    items: list[NewAttestation]


class Attested(Message):
    records: list[Attestation]


class Query(Message):
    filter: Filter


class QueryResult(Message):
    """One page: at most MAX_PAGE records, and work bounded per request. ``cursor``
    set: there may be more; ask again with it in the filter. A page may hold fewer
    records than asked for (even none) and still have a cursor."""

    records: list[Attestation]
    cursor: str | None = None


class GetAttestation(Message):
    id: str


class AttestationReply(Message):
    record: Attestation


class Stats(Message):
    pass


class StatsReply(Message):
    attestations: int
    map_size: int
    used_bytes: int
    path: str


AtsRequest = Ping | Attest | Query | GetAttestation | Stats
AtsReply = Pong | Attested | QueryResult | AttestationReply | StatsReply | ErrorReply


# --------------------------------------------------------------------- server


class Submit(Message):
    """Enqueue a job. ``id`` (optional, made by the client, e.g. a ``JB-`` ASID) makes
    a resubmission safe: a Submit whose id is already taken returns that job."""

    handler: str
    payload: msgspec.Raw = NIL
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float = 300.0
    idempotency_key: str | None = None
    parent_id: str | None = None
    id: str | None = None
    run_at: int | None = None  # wall ms (Unix epoch): do not start before
    after: list[str] = []  # job ids: start once they ended (see after_policy)
    after_policy: str = "completed"
    version: str | None = None  # a handler version to pin (default: the current one)
    trace: str | None = None  # W3C traceparent of the caller's span (qntx.obs.trace)


class GetJob(Message):
    id: str


# The most jobs (or attestations) one listing returns; ask again with the cursor.
MAX_PAGE = 1000


class ListJobs(Message):
    status: str | None = None
    limit: int = 50  # at most MAX_PAGE
    cursor: str | None = None  # JobList.cursor of the previous page


class CancelJob(Message):
    id: str
    brief: bool = False  # the reply's job without its payload (bulk steering)


class RetryJob(Message):
    id: str
    latest: bool = False  # run the handler's current version, not the one it ran
    brief: bool = False  # the reply's job without its payload (bulk steering)


class PauseJob(Message):
    id: str
    brief: bool = False  # the reply's job without its payload (bulk steering)


class ResumeJob(Message):
    id: str
    brief: bool = False  # the reply's job without its payload (bulk steering)


class JobReply(Message):
    job: Job
    dependents: list[str] = []  # GetJob only: the jobs that run after it (the first 1000)


class JobList(Message):
    jobs: list[Job]
    cursor: str | None = None  # pass it back for the next page; None: no more


class GetStatus(Message):
    pass


class ActorStatus(msgspec.Struct, kw_only=True):
    name: str
    pid: int | None = None
    endpoint: str = ""
    healthy: bool = False
    host: str = ""  # "" where it is not known (a worker names its host in its name)
    credit: int = 0  # a worker session's slots: jobs it takes at once
    role: str = ""  # the role its key holds for this (tcp peers; "" on ipc)
    key: str = ""  # the name its tcp key is authorised under ("" on ipc)
    leases: int = 0  # the runs it holds now (also those Pulse took back that it still runs)


class StatusReply(Message):
    actors: list[ActorStatus]
    queue: dict[str, int]
    handlers: list[str]
    sessions_free: int | None = None  # how many more worker sessions the server has room for


class Prune(Message):
    """Delete finished jobs now: those past their retention, or (``older_than_ms``)
    every one that finished longer ago than that."""

    older_than_ms: int | None = None


class Pruned(Message):
    deleted: dict[str, int]  # status -> jobs deleted


class ListSchedules(Message):
    """What Pulse knows of its schedules: each with its next due time and past firings."""


class ScheduleState(msgspec.Struct, kw_only=True):
    name: str
    handler: str
    every_ms: int | None = None
    cron: str | None = None
    tz: str = "UTC"
    missed: str = "once"
    paused: bool = False
    last_due: int | None = None  # wall ms of the last firing handled
    next_due: int | None = None  # None: paused
    firings: list[tuple[int, str]] = []  # (due, job id), oldest first


class SchedulesReply(Message):
    schedules: list[ScheduleState]
    loaded: bool = True  # False: Pulse has not read them from ATS yet
    limits: dict[str, list[int | None]] = {}  # handler -> [concurrency, rate, per_ms]: the limits Pulse applies


class RegisterPlugin(Message):
    """A plugin announces itself; the server then calls Metadata and Initialize on it.
    A remote plugin (``endpoint`` ""; docs/DEPLOY.md) is not called back: it takes its
    jobs through its own worker session, and this message is only its heartbeat."""

    name: str
    endpoint: str
    pid: int = 0
    host: str = ""


class GetEndpoints(Message):
    """What a host joining through the server's one address asks first."""


class BusEndpoints(Message):
    ats_endpoint: str
    ats_events_endpoint: str
    workers_endpoint: str
    events_endpoint: str


class HandlersChanged(Message):
    """A plugin's handler set changed while running (live discovery)."""

    plugin: str
    handler_names: list[str]
    handler_versions: dict[str, str] = {}  # handler -> its current version (attestation ASID)


class JobProgress(Message):
    """Sent by whoever runs a job while it runs (fire and forget); counts only for
    the job's current lease."""

    job_id: str
    current: float
    total: float
    lease: int = 0


class JobStarted(Message):
    """The handler's code of a run began (fire and forget): a job handed to a plugin
    is ``dispatched`` until then (it may wait there for a free interpreter), and
    ``running`` from then on. Counts only for the job's current lease."""

    job_id: str
    lease: int = 0


class JobOutput(Message):
    """Output of a long-running job as it is written (fire and forget); the server
    publishes it to the job's followers if ``lease`` is the job's current one.
    The job's logs keep it all."""

    job_id: str
    stream: str  # "stdout" or "stderr"
    text: str
    lease: int = 0


class WaitJob(Message):
    """Wait for a job, over the asker's own connection (results never go out on a
    broadcast socket). With ``output`` < 0 the reply comes once the job is final, or
    after ``timeout_ms`` with its current record; with ``output`` >= 0 (the ``next`` of
    the previous reply, 0 at first) it comes as soon as the job has new output,
    progress or status after that point."""

    id: str
    timeout_ms: int = 10_000  # at most MAX_WAIT_MS
    output: int = -1


class JobUpdate(Message):
    """The answer to WaitJob: the job's record (without payload; with its result,
    error and logs once final), the output and progress since ``WaitJob.output``."""

    job: Job
    output: list[JobOutput] = []
    progress: Progress | None = None
    next: int = 0  # pass it as WaitJob.output to continue where this one ended


class EndedJobs(Message):
    """Which of ``ids`` have ended: for a client that asks for many outcomes at once
    (a loop of results). At most MAX_PAGE ids. With ``wait_ms`` > 0 and none of them
    ended lately, the server holds the request until one of them ends (answering,
    at the end of that loop turn, with every one of them that has ended by then) or
    until ``wait_ms`` passes (an empty answer); it answers at once when some of them
    are neither running nor lately ended (``gone``)."""

    ids: list[str]
    wait_ms: int = 0


class EndedJobsReply(Message):
    """The final records (without payload) of the asked jobs that have ended; the
    others (still running, unknown, or ended long ago) are left out: ask WaitJob.
    ``gone`` (only for a waiting EndedJobs): the asked ids that are neither live nor
    lately ended (unknown, or ended long ago): waiting cannot tell, WaitJob can."""

    jobs: list[Job] = []
    gone: list[str] = []


ServerRequest = (
    Ping
    | WaitJob
    | EndedJobs
    | Submit
    | GetJob
    | ListJobs
    | CancelJob
    | RetryJob
    | PauseJob
    | ResumeJob
    | GetStatus
    | ListSchedules
    | Prune
    | RegisterPlugin
    | HandlersChanged
    | JobProgress
    | JobOutput
    | JobStarted
    | GetEndpoints
)
ServerReply = (
    Pong | JobReply | JobUpdate | EndedJobsReply | JobList | StatusReply | SchedulesReply | Pruned | Ack | BusEndpoints | ErrorReply
)


# --------------------------------------------------------------------- workers
#
# A worker session talks to Pulse over three pipes (docs/PROTOCOL.md §5.4):
#   control: its DEALER (routing id = its session id) to the workers ROUTER:
#            WorkerReady up; WorkerWelcome and CancelRunning down.
#   jobs:    a PULL connected to the PUSH the server binds for this session alone:
#            Dispatch down. Pulse never sends a session more than its credit.
#   results: a PUSH connected to the server's results PULL, the one sink of every
#            worker: JobDone and JobProgress up.


class WorkerReady(Message):
    """A worker's hello and heartbeat: how many jobs it takes at once (``credit``;
    0 while it stops) and the leases it holds, so a restarted server adopts them."""

    worker: str
    credit: int = 1
    pid: int = 0
    session: str = ""  # its session id (also the routing id of its control DEALER)
    leases: list[int] = msgspec.field(default_factory=list)
    jobs_endpoint: str = ""  # the jobs PUSH it is connected to ("" until welcomed)
    plugin: str = ""  # a plugin taking its own jobs through this session ("": a plain worker)
    host: str = ""  # the host it runs on


class WorkerWelcome(Message):
    """The server's answer to a new session: where its jobs come from and where
    its results go."""

    jobs_endpoint: str
    results_endpoint: str


class JobDone(Message):
    """The outcome of one run (lease) of a job."""

    job_id: str
    lease: int
    success: bool
    attempt: int = 0
    result: msgspec.Raw = NIL
    error: JobError | None = None
    logs: str = ""
    progress: Progress | None = None  # the last progress reported, if any
    # Not the handler's doing (the worker stopped, the plugin went away): the run
    # is given back to the queue and uses no attempt.
    interrupted: bool = False


class Dispatch(Message):
    """One run of a job, sent to the worker session that holds ``lease``."""

    lease: int
    job: Job
    trace: str | None = None  # traced jobs: the traceparent of Pulse's span of this run


class CancelRunning(Message):
    """The server asks a worker to stop the run holding ``lease``."""

    lease: int
    job_id: str = ""


WorkerMessage = WorkerReady
WorkerCommand = WorkerWelcome | CancelRunning
WorkerJob = Dispatch
WorkerResult = JobDone | JobProgress


# --------------------------------------------------------------------- plugins


class Metadata(Message):
    pass


class MetadataReply(Message):
    name: str
    version: str
    description: str = ""


class Initialize(Message):
    ats_endpoint: str
    server_endpoint: str
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    ats_events_endpoint: str = ""


# A plugin with N interpreters may take up to N * PLUGIN_DEPTH jobs at once, so a job
# can wait behind PLUGIN_DEPTH - 1 others before its own timeout starts; leases and
# worker timeouts therefore allow PLUGIN_DEPTH * timeout_s.
PLUGIN_DEPTH = 4


class InitializeReply(Message):
    handler_names: list[str]
    capacity: int = 0  # jobs it takes at once here (informational: its sessions' credit bounds its jobs out)
    handler_versions: dict[str, str] = {}  # handler -> its current version (attestation ASID)


class Health(Message):
    pass


class HealthReply(Message):
    healthy: bool
    detail: str = ""


class CancelExecution(Message):
    job_id: str
    lease: int = 0  # 0: whichever run of the job


class Shutdown(Message):
    pass


PluginRequest = Ping | Metadata | Initialize | Health | CancelExecution | Shutdown
PluginReply = (
    Pong | MetadataReply | InitializeReply | HealthReply | Ack | ErrorReply
)


# --------------------------------------------------------------------- events


class StoredNotice(msgspec.Struct, kw_only=True):
    """What the ATS events socket says of one stored attestation: what it is about,
    never its subjects' claims in full or its attributes (GetAttestation has those)."""

    id: str
    predicates: list[str]
    contexts: list[str]
    seq: int = 0


class AttestationsStored(Message):
    """One group commit's attestations, as notices, in commit order."""

    stored: list[StoredNotice]


class JobChanged(msgspec.Struct, kw_only=True):
    """A job's new state, as ``follow`` yields it to the one who asked (with its
    result, error and logs). Not a wire message: WaitJob's JobUpdate carries it."""

    job: Job


def job_bytes(job: Job) -> int:
    """About what one job's record costs to hold: its result, logs and error, plus its fields."""
    error = len(job.error.message) + len(job.error.traceback) if job.error else 0
    return 512 + len(job.result) + len(job.logs) + error


class JobNotice(Message):
    """What the events socket says of a job that changed: its identity and state,
    never its payload, result, error or logs (WaitJob or GetJob has those)."""

    id: str
    handler: str
    status: str
    lease: int = 0
    attempts: int = 0
    max_attempts: int = 0
    priority: int = 0
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    run_after: int = 0
    worker: str | None = None


class JobProgressed(msgspec.Struct, kw_only=True):
    """A job's progress, as ``follow`` yields it (from WaitJob's JobUpdate)."""

    job_id: str
    current: float
    total: float


class HandlersRegistered(Message):
    plugin: str
    handler_names: list[str]


Event = AttestationsStored | JobNotice | HandlersRegistered


def stored_notices(event: object) -> list[StoredNotice]:
    """What an ATS event says was stored (nothing for any other event)."""
    return event.stored if isinstance(event, AttestationsStored) else []


# --------------------------------------------------------------------- roles

# The roles a tcp peer's key needs to send each request (docs/DEPLOY.md); a message
# missing here needs ``admin``. ipc peers are this host's own user and pass.
_ANY = frozenset(ROLES)
_CLIENT = frozenset({"client", "developer", "admin"})  # a developer may do what a client may
_PLUGIN = frozenset({"plugin", "admin"})
_STORE = frozenset({"client", "developer", "plugin", "admin"})  # handler code attests through its plugin's key
_DEVELOPER = frozenset({"developer", "admin"})

# Attestations that decide what code runs and when: handlers, limits and schedules,
# as (predicate, context), compared case-insensitively as queries compare them.
# Writing one needs role developer: whoever may store a handler runs code on every
# plugin host.
STEERING = frozenset({("handler", "python"), ("limit", "pulse"), ("schedule", "pulse")})


def steers(item: NewAttestation) -> bool:
    predicates = {p.casefold() for p in item.predicates if isinstance(p, str)}
    contexts = {c.casefold() for c in item.contexts if isinstance(c, str)}
    return any(p in predicates and c in contexts for p, c in STEERING)


def attest_roles(message: Attest) -> frozenset[str]:
    """The roles an Attest needs: developer if any item steers what runs."""
    items = message.items if isinstance(message.items, list) else []
    return _DEVELOPER if any(isinstance(i, NewAttestation) and steers(i) for i in items) else _STORE


ATS_ROLES = {Ping: _ANY, Attest: attest_roles, Query: _STORE, GetAttestation: _STORE, Stats: _STORE}
SERVER_ROLES = {
    Ping: _ANY,
    GetEndpoints: _ANY,
    Submit: _CLIENT,
    WaitJob: _CLIENT,
    EndedJobs: _CLIENT,
    GetJob: _CLIENT,
    ListJobs: _CLIENT,
    CancelJob: _CLIENT,
    RetryJob: _CLIENT,
    PauseJob: _CLIENT,
    ResumeJob: _CLIENT,
    GetStatus: _CLIENT,
    ListSchedules: _CLIENT,
    Prune: frozenset({"admin"}),
    RegisterPlugin: _PLUGIN,
    HandlersChanged: _PLUGIN,
    JobProgress: _PLUGIN,
    JobOutput: _PLUGIN,
    JobStarted: _PLUGIN,
}
# Who may subscribe to each family of event topics (the server's events socket, the
# ATS events socket): a prefix that can match a family needs one of its roles.
EVENT_ROLES = {b"job.": _CLIENT, b"handlers": _STORE}
ATS_EVENT_ROLES = {b"att.": _STORE}
# A plain worker session needs ``worker``, a plugin's own session ``plugin``
# (qntx.pulse.shell checks which); results come from either.
WORKER_ROLES = {WorkerReady: frozenset({"worker", "plugin", "admin"})}
SESSION_ROLE = {False: "worker", True: "plugin"}
# A plugin bound on tcp: the server host's key (admin) steers it.
PLUGIN_ROLES = {Ping: _ANY, CancelExecution: frozenset({"admin"})}
