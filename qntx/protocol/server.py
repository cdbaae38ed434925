"""The server socket's requests and replies: jobs, steering, status, plugins."""

from __future__ import annotations

import msgspec

from qntx.bus.messages import Ack, ErrorReply, Message, Ping, Pong
from qntx.protocol.records import NIL, Job, Progress


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


class LeaseHolder(msgspec.Struct, kw_only=True):
    """Who holds the leadership lease of a bus on PostgreSQL (``qntx.leader``)."""

    host: str | None = None
    home: str | None = None
    pid: int | None = None
    address: str | None = None
    live: bool = False  # held now (not expired)
    expires_in_s: float = 0.0
    held_s: float = 0.0  # since this holder took it


class Standby(msgspec.Struct, kw_only=True):
    host: str
    home: str
    pid: int
    address: str | None = None
    seen_s_ago: float = 0.0


class Leadership(msgspec.Struct, kw_only=True):
    """The lease's epoch, its holder and the standbys, as the database has them."""

    epoch: int = 0
    leader: LeaseHolder = msgspec.field(default_factory=LeaseHolder)
    standbys: list[Standby] = []
    error: str | None = None  # the database could not be read


class StatusReply(Message):
    actors: list[ActorStatus]
    queue: dict[str, int]
    handlers: list[str]
    sessions_free: int | None = None  # how many more worker sessions the server has room for
    leadership: Leadership | None = None  # on a PostgreSQL store (None on LMDB)


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
