"""Every message that crosses a QNTX socket, declared once (a module per socket, all
importable from here).

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

from qntx.bus.messages import ERROR_CODES, Ack, ErrorReply, Message, Ping, Pong
from qntx.protocol.ats import (
    AtsReply,
    AtsRequest,
    Attest,
    AttestationReply,
    Attested,
    GetAttestation,
    Query,
    QueryResult,
    Stats,
    StatsReply,
)
from qntx.protocol.events import (
    AttestationsStored,
    Event,
    HandlersRegistered,
    JobChanged,
    JobNotice,
    JobProgressed,
    StoredNotice,
    job_bytes,
    stored_notices,
)
from qntx.protocol.plugins import (
    PLUGIN_DEPTH,
    CancelExecution,
    Health,
    HealthReply,
    Initialize,
    InitializeReply,
    Metadata,
    MetadataReply,
    PluginReply,
    PluginRequest,
    Shutdown,
)
from qntx.protocol.records import (
    AFTER_POLICIES,
    FINAL_STATUSES,
    HISTORY_KEPT,
    JOB_STATUSES,
    NIL,
    RUN_OUTCOMES,
    RUNNING_STATUSES,
    STDERR_MARK,
    TIMED_OUT,
    Attestation,
    Filter,
    Job,
    JobError,
    NewAttestation,
    Progress,
    Run,
)
from qntx.protocol.roles import (
    ATS_EVENT_ROLES,
    ATS_ROLES,
    EVENT_ROLES,
    PLUGIN_ROLES,
    SERVER_ROLES,
    SESSION_ROLE,
    STEERING,
    WORKER_ROLES,
    attest_roles,
    steers,
)
from qntx.protocol.server import (
    MAX_PAGE,
    ActorStatus,
    BusEndpoints,
    CancelJob,
    EndedJobs,
    EndedJobsReply,
    GetEndpoints,
    GetJob,
    GetStatus,
    HandlersChanged,
    JobList,
    JobOutput,
    JobProgress,
    JobReply,
    JobStarted,
    JobUpdate,
    Leadership,
    LeaseHolder,
    ListJobs,
    ListSchedules,
    PauseJob,
    Prune,
    Pruned,
    RegisterPlugin,
    ResumeJob,
    RetryJob,
    SchedulesReply,
    ScheduleState,
    ServerReply,
    ServerRequest,
    Standby,
    StatusReply,
    Submit,
    WaitJob,
)
from qntx.protocol.workers import (
    CancelRunning,
    Dispatch,
    JobDone,
    WorkerCommand,
    WorkerJob,
    WorkerMessage,
    WorkerReady,
    WorkerResult,
    WorkerWelcome,
)

__all__ = [
    "ERROR_CODES", "Ack", "ErrorReply", "Message", "Ping", "Pong", "Attestation",
    "NewAttestation", "Filter", "Progress", "JobError", "STDERR_MARK", "JOB_STATUSES",
    "RUNNING_STATUSES", "AFTER_POLICIES", "FINAL_STATUSES", "TIMED_OUT", "RUN_OUTCOMES",
    "HISTORY_KEPT", "Run", "NIL", "Job", "Attest", "Attested", "Query", "QueryResult",
    "GetAttestation", "AttestationReply", "Stats", "StatsReply", "AtsRequest",
    "AtsReply", "Submit", "GetJob", "MAX_PAGE", "ListJobs", "CancelJob", "RetryJob",
    "PauseJob", "ResumeJob", "JobReply", "JobList", "GetStatus", "ActorStatus", "Leadership", "LeaseHolder", "Standby",
    "StatusReply", "Prune", "Pruned", "ListSchedules", "ScheduleState",
    "SchedulesReply", "RegisterPlugin", "GetEndpoints", "BusEndpoints",
    "HandlersChanged", "JobProgress", "JobStarted", "JobOutput", "WaitJob", "JobUpdate",
    "EndedJobs", "EndedJobsReply", "ServerRequest", "ServerReply", "WorkerReady",
    "WorkerWelcome", "JobDone", "Dispatch", "CancelRunning", "WorkerMessage",
    "WorkerCommand", "WorkerJob", "WorkerResult", "Metadata", "MetadataReply",
    "Initialize", "PLUGIN_DEPTH", "InitializeReply", "Health", "HealthReply",
    "CancelExecution", "Shutdown", "PluginRequest", "PluginReply", "StoredNotice",
    "AttestationsStored", "JobChanged", "job_bytes", "JobNotice", "JobProgressed",
    "HandlersRegistered", "Event", "stored_notices", "STEERING", "steers",
    "attest_roles", "ATS_ROLES", "SERVER_ROLES", "EVENT_ROLES", "ATS_EVENT_ROLES",
    "WORKER_ROLES", "SESSION_ROLE", "PLUGIN_ROLES",
]
