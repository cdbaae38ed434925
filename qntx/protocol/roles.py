"""Which role may send what, on every socket (checked on tcp with CURVE keys)."""

from __future__ import annotations

from qntx.bus.messages import Ping
from qntx.protocol.ats import Attest, GetAttestation, Query, Stats
from qntx.protocol.plugins import CancelExecution
from qntx.protocol.records import NewAttestation
from qntx.protocol.server import (
    CancelJob,
    EndedJobs,
    GetEndpoints,
    GetJob,
    GetStatus,
    HandlersChanged,
    JobOutput,
    JobProgress,
    JobStarted,
    ListJobs,
    ListSchedules,
    PauseJob,
    Prune,
    RegisterPlugin,
    ResumeJob,
    RetryJob,
    Submit,
    WaitJob,
)
from qntx.protocol.workers import WorkerReady

# What a key may be authorised as (``qntx keys allow --role``).
ROLES = ("client", "developer", "worker", "plugin", "admin")

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
