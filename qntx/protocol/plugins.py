"""The plugin socket: a plugin's life cycle as the server drives it."""

from __future__ import annotations

from typing import Any

import msgspec

from qntx.bus.messages import Ack, ErrorReply, Message, Ping, Pong


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
