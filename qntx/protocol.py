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


class Progress(msgspec.Struct, kw_only=True):
    current: float = 0
    total: float = 0


class JobError(msgspec.Struct, kw_only=True):
    message: str
    traceback: str = ""


# Job.logs holds a job's stdout, then this line and its stderr (if it wrote any).
STDERR_MARK = "\n--- stderr ---\n"

# JOB_STATUSES: queued -> running -> completed | failed | cancelled; paused holds a queued job.
JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "paused")
FINAL_STATUSES = ("completed", "failed", "cancelled")


class Job(msgspec.Struct, kw_only=True):
    id: str
    handler: str
    payload: Any = None
    status: str = "queued"
    attempts: int = 0
    max_attempts: int = 3
    timeout_s: float = 300.0
    priority: int = 0
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    progress: Progress | None = None
    result: Any = None
    error: JobError | None = None
    logs: str = ""
    parent_id: str | None = None
    worker: str | None = None
    idempotency_key: str | None = None
    run_after: int = 0  # ms: a retried job waits for its backoff until then


# --------------------------------------------------------------------- ats


class Attest(Message):
    """Store attestations; the reply comes only after they are durably committed."""

    items: list[NewAttestation]


class Attested(Message):
    records: list[Attestation]


class Query(Message):
    filter: Filter


class QueryResult(Message):
    records: list[Attestation]


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
    handler: str
    payload: Any = None
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float = 300.0
    idempotency_key: str | None = None
    parent_id: str | None = None


class GetJob(Message):
    id: str


class ListJobs(Message):
    status: str | None = None
    limit: int = 50


class CancelJob(Message):
    id: str


class RetryJob(Message):
    id: str


class PauseJob(Message):
    id: str


class ResumeJob(Message):
    id: str


class JobReply(Message):
    job: Job


class JobList(Message):
    jobs: list[Job]


class GetStatus(Message):
    pass


class ActorStatus(msgspec.Struct, kw_only=True):
    name: str
    pid: int | None = None
    endpoint: str = ""
    healthy: bool = False


class StatusReply(Message):
    actors: list[ActorStatus]
    queue: dict[str, int]
    handlers: list[str]


class RegisterPlugin(Message):
    """A plugin announces itself; the server then calls Metadata and Initialize on it."""

    name: str
    endpoint: str
    pid: int = 0


class HandlersChanged(Message):
    """A plugin's handler set changed while running (live discovery)."""

    plugin: str
    handler_names: list[str]


class JobProgress(Message):
    """Sent by whoever runs a job while it runs (fire and forget)."""

    job_id: str
    current: float
    total: float
    attempt: int = 0  # the attempt it belongs to (0: whichever is running)


class JobOutput(Message):
    """Output of a long-running job as it is written (fire and forget); the server
    publishes it unchanged to the job's followers. The job's logs keep it all."""

    job_id: str
    stream: str  # "stdout" or "stderr"
    text: str


ServerRequest = (
    Ping
    | Submit
    | GetJob
    | ListJobs
    | CancelJob
    | RetryJob
    | PauseJob
    | ResumeJob
    | GetStatus
    | RegisterPlugin
    | HandlersChanged
    | JobProgress
    | JobOutput
)
ServerReply = Pong | JobReply | JobList | StatusReply | Ack | ErrorReply


# --------------------------------------------------------------------- workers


class WorkerReady(Message):
    """A worker says it can take ``credit`` more jobs; also its heartbeat."""

    worker: str
    credit: int = 1
    pid: int = 0
    running: list[str] = msgspec.field(default_factory=list)


class JobDone(Message):
    """The outcome of one attempt of a job."""

    job_id: str
    attempt: int
    success: bool
    result: Any = None
    error: JobError | None = None
    logs: str = ""
    progress: Progress | None = None  # the last progress reported, if any
    interrupted: bool = False  # given back unfinished by a stopping worker: not an attempt


class Dispatch(Message):
    """The server hands one job attempt to a worker."""

    job: Job
    plugin_endpoint: str | None = None  # where to forward a plugin handler


class CancelRunning(Message):
    """The server asks a worker to kill a running attempt."""

    job_id: str


WorkerMessage = WorkerReady | JobDone | JobProgress
WorkerCommand = Dispatch | CancelRunning


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


# A plugin with N interpreters may take up to N * PLUGIN_DEPTH jobs at once, so a job
# can wait behind PLUGIN_DEPTH - 1 others before its own timeout starts; leases and
# worker timeouts therefore allow PLUGIN_DEPTH * timeout_s.
PLUGIN_DEPTH = 4


class InitializeReply(Message):
    handler_names: list[str]
    capacity: int = 0  # jobs it takes at once (0: no limit); Pulse never sends more


class Health(Message):
    pass


class HealthReply(Message):
    healthy: bool
    detail: str = ""


class ExecuteJob(Message):
    job_id: str
    handler: str
    payload: Any = None
    timeout_s: float = 300.0
    attempt: int = 1


class ExecuteResult(Message):
    success: bool
    result: Any = None
    error: JobError | None = None
    stdout: str = ""
    stderr: str = ""
    progress: Progress | None = None


class CancelExecution(Message):
    job_id: str


class Shutdown(Message):
    pass


PluginRequest = Ping | Metadata | Initialize | Health | ExecuteJob | CancelExecution | Shutdown
PluginReply = (
    Pong | MetadataReply | InitializeReply | HealthReply | ExecuteResult | Ack | ErrorReply
)


# --------------------------------------------------------------------- events


class AttestationCreated(Message):
    record: Attestation


class JobChanged(Message):
    job: Job


class JobProgressed(Message):
    job_id: str
    current: float
    total: float


class HandlersRegistered(Message):
    plugin: str
    handler_names: list[str]


Event = AttestationCreated | JobChanged | JobProgressed | JobOutput | HandlersRegistered
