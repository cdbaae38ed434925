"""The server actor: front door for clients and plugins, home of Pulse.

Sockets:
  * server ROUTER (``ServerRequest``): clients submit and inspect jobs; plugins
    register, announce handler changes and report progress.
  * workers ROUTER (``WorkerMessage``): workers say hello/heartbeat and report
    results; the server pushes ``Dispatch``/``CancelRunning`` to them.
  * events PUB: ``JobChanged``/``JobProgressed`` (topic ``job.<id>``) and
    ``HandlersRegistered`` (topic ``handlers``).
  * one DEALER per registered plugin, for Metadata/Initialize/Health.

A plugin registers with ``RegisterPlugin``; the server calls ``Metadata`` and
``Initialize`` on it and registers the handler names it returns. Plugins repeat
``RegisterPlugin`` as a heartbeat, which also re-registers them after a server
restart. A plugin that fails health checks loses its handlers until it is back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loguru import logger

from qntx import __version__
from qntx.bus.actor import Actor, Peer, Publisher, Request
from qntx.bus.pidlock import PidLock
from qntx.errors import Invalid, NotFound, Unavailable
from qntx.protocol import (
    Ack,
    ActorStatus,
    CancelExecution,
    CancelJob,
    ErrorReply,
    GetJob,
    GetStatus,
    HandlersChanged,
    HandlersRegistered,
    Health,
    HealthReply,
    Initialize,
    InitializeReply,
    JobDone,
    JobList,
    JobOutput,
    JobProgress,
    JobReply,
    ListJobs,
    Metadata,
    MetadataReply,
    PauseJob,
    Ping,
    PluginReply,
    Pong,
    RegisterPlugin,
    ResumeJob,
    RetryJob,
    ServerRequest,
    StatusReply,
    Submit,
    WorkerMessage,
    WorkerReady,
)
from qntx.pulse.queue import JobQueue
from qntx.pulse.scheduler import BUILTIN_HANDLERS, Pulse, Route
from qntx.settings import Settings

HEALTH_FAILURES_ALLOWED = 3


@dataclass
class PluginEntry:
    name: str
    endpoint: str
    pid: int
    peer: Peer
    handlers: list[str] = field(default_factory=list)
    healthy: bool = False
    failures: int = 0
    version: str = ""
    capacity: int = 0


class ServerActor(Actor):
    name = "server"
    label = "QNTX Server"

    def __init__(self, settings: Settings):
        super().__init__(max_message_bytes=settings.max_message_bytes, security=settings.security)
        self.settings = settings
        self.plugins: dict[str, PluginEntry] = {}
        self.routes: dict[str, str] = {}  # handler name -> plugin name

    def setup(self) -> None:
        self.settings.ensure_dirs()
        self.lock = PidLock(self.settings.lock_path(self.name))
        if not self.lock.acquire():
            raise Unavailable(f"another server already runs on {self.settings.home}")
        self.events = Publisher(self, self.settings.events_endpoint)
        self.worker_service = self.serve(
            self.settings.workers_endpoint,
            WorkerMessage,
            {WorkerReady: self.on_worker_ready, JobDone: self.on_job_done, JobProgress: self.on_progress},
        )
        self.pulse = Pulse(
            JobQueue(self.settings.pulse_path),
            dead_after_s=self.settings.heartbeat_s * 3,
            send_to_worker=self.worker_service.send_to,
            publish=self.events.publish,
            route=self.route,
            cancel_at_plugin=self.cancel_at_plugin,
            call_later=self.call_later,
        )
        self.service = self.serve(
            self.settings.server_endpoint,
            ServerRequest,
            {
                Ping: self.on_ping,
                Submit: self.on_submit,
                GetJob: self.on_get_job,
                ListJobs: self.on_list_jobs,
                CancelJob: self.on_cancel,
                RetryJob: self.on_retry,
                PauseJob: self.on_pause,
                ResumeJob: self.on_resume,
                GetStatus: self.on_status,
                RegisterPlugin: self.on_register_plugin,
                HandlersChanged: self.on_handlers_changed,
                JobProgress: self.on_progress,
                JobOutput: self.on_output,
            },
        )
        self._schedule_health()
        counts = self.pulse.queue.counts()
        logger.info(
            "QNTX server serving {} (pulse {}: {} queued, {} paused; jobs a crash left running are queued again)",
            self.settings.server_endpoint,
            self.settings.pulse_path,
            counts.get("queued", 0),
            counts.get("paused", 0),
        )

    def after_batch(self) -> None:
        self.pulse.end_turn()

    def teardown(self) -> None:
        self.pulse.end_turn()
        self.pulse.queue.close()
        self.lock.release()

    # ---------------------------------------------------------------- clients

    def on_ping(self, message: Ping, request: Request) -> Pong:
        return Pong(actor=self.name, pid=self.pid, version=__version__)

    def on_submit(self, message: Submit, request: Request) -> None:
        if not self.pulse.handler_available(message.handler):
            known = ", ".join(self.known_handlers()) or "none"
            raise NotFound(f"unknown handler {message.handler!r} (known handlers: {known})")
        self.pulse.submit(message, request)  # replied to after the commit
        return None

    def on_get_job(self, message: GetJob, request: Request) -> JobReply:
        return JobReply(job=self.pulse.get(message.id))

    def on_list_jobs(self, message: ListJobs, request: Request) -> JobList:
        if message.limit <= 0:
            raise Invalid("limit must be positive")
        return JobList(jobs=self.pulse.queue.jobs(message.status, message.limit))

    def on_cancel(self, message: CancelJob, request: Request) -> JobReply:
        job = self.pulse.cancel(message.id)
        self.pulse.end_turn()  # commit before answering
        return JobReply(job=job)

    def on_retry(self, message: RetryJob, request: Request) -> JobReply:
        job = self.pulse.change(self.pulse.queue.retry(message.id))
        self.pulse.end_turn()  # commit (and maybe dispatch) before answering
        return JobReply(job=job)

    def on_pause(self, message: PauseJob, request: Request) -> JobReply:
        job = self.pulse.change(self.pulse.queue.pause(message.id))
        self.pulse.end_turn()
        return JobReply(job=job)

    def on_resume(self, message: ResumeJob, request: Request) -> JobReply:
        job = self.pulse.change(self.pulse.queue.resume(message.id))
        self.pulse.end_turn()
        return JobReply(job=job)

    def on_output(self, message: JobOutput, request: Request) -> None:
        self.pulse.output(message)

    def on_progress(self, message: JobProgress, request: Request) -> None:
        self.pulse.progress(message.job_id, message.current, message.total, message.attempt)

    def on_status(self, message: GetStatus, request: Request) -> StatusReply:
        actors = [ActorStatus(name="server", pid=self.pid, endpoint=self.settings.server_endpoint, healthy=True)]
        for worker in self.pulse.workers.all():
            actors.append(
                ActorStatus(name=worker.name, pid=worker.pid, endpoint=self.settings.workers_endpoint, healthy=True)
            )
        for plugin in sorted(self.plugins.values(), key=lambda p: p.name):
            actors.append(
                ActorStatus(name=f"plugin:{plugin.name}", pid=plugin.pid, endpoint=plugin.endpoint, healthy=plugin.healthy)
            )
        return StatusReply(actors=actors, queue=self.pulse.queue.counts(), handlers=self.known_handlers())

    # ---------------------------------------------------------------- workers

    def on_worker_ready(self, message: WorkerReady, request: Request) -> None:
        self.pulse.worker_ready(request.identity, message)

    def on_job_done(self, message: JobDone, request: Request) -> None:
        self.pulse.job_done(request.identity, message)

    # ---------------------------------------------------------------- plugins

    def known_handlers(self) -> list[str]:
        return sorted([*BUILTIN_HANDLERS, *self.routes])

    def cancel_at_plugin(self, plugin: str, job_id: str) -> None:
        entry = self.plugins.get(plugin)
        if entry is not None:
            entry.peer.call(CancelExecution(job_id=job_id), lambda reply: None, timeout_s=5)

    def route(self, handler: str) -> Route | None:
        """Where a plugin handler runs now (None: no healthy plugin owns it)."""
        plugin = self.plugins.get(self.routes.get(handler, ""))
        if plugin is None or not plugin.healthy:
            return None
        return Route(plugin=plugin.name, endpoint=plugin.endpoint, capacity=plugin.capacity)

    def on_register_plugin(self, message: RegisterPlugin, request: Request) -> Ack:
        entry = self.plugins.get(message.name)
        if entry is not None and entry.pid == message.pid and entry.endpoint == message.endpoint:
            # A heartbeat from a plugin we know. It proves the process lives, not
            # that it serves: only a Health reply clears failed checks.
            return Ack()
        if entry is not None:
            self._drop_plugin(entry, "re-registered")
        peer = self.connect(message.endpoint, PluginReply)
        entry = PluginEntry(name=message.name, endpoint=message.endpoint, pid=message.pid, peer=peer)
        self.plugins[message.name] = entry
        peer.call(Metadata(), lambda reply: self._on_metadata(entry, reply))
        return Ack()

    def _on_metadata(self, entry: PluginEntry, reply) -> None:
        if isinstance(reply, ErrorReply):
            logger.error("plugin {} did not answer Metadata: {}", entry.name, reply.message)
            return
        if isinstance(reply, MetadataReply):
            entry.version = reply.version
        init = Initialize(
            ats_endpoint=self.settings.ats_endpoint,
            server_endpoint=self.settings.server_endpoint,
            config=dict(self.settings.extra.get("plugins", {}).get(entry.name, {})),
        )
        entry.peer.call(init, lambda r: self._on_initialized(entry, r), timeout_s=60)

    def _on_initialized(self, entry: PluginEntry, reply) -> None:
        if self.plugins.get(entry.name) is not entry:
            return  # replaced meanwhile
        if not isinstance(reply, InitializeReply):
            logger.error("plugin {} failed to initialize: {}", entry.name, getattr(reply, "message", reply))
            return
        entry.healthy = True
        entry.capacity = max(0, reply.capacity)
        self._set_handlers(entry, reply.handler_names)
        self.pulse.handlers_announced(entry.name, entry.handlers)

    def on_handlers_changed(self, message: HandlersChanged, request: Request) -> Ack:
        entry = self.plugins.get(message.plugin)
        if entry is None:
            raise NotFound(f"plugin {message.plugin!r} is not registered")
        self._set_handlers(entry, message.handler_names)
        self.pulse.handlers_announced(entry.name, entry.handlers)
        return Ack()

    def _set_handlers(self, entry: PluginEntry, names: list[str]) -> None:
        for name in names:
            owner = self.routes.get(name)
            if owner is not None and owner != entry.name:
                logger.error("plugin {} announced {} which plugin {} owns; ignored", entry.name, name, owner)
        # Keep the plugin's announced order: the log reads like its announcement.
        wanted = [n for n in dict.fromkeys(names) if self.routes.get(n, entry.name) == entry.name and n not in BUILTIN_HANDLERS]
        for name in entry.handlers:
            if name not in wanted:
                self.routes.pop(name, None)
                logger.info("Unregistering plugin async handler plugin={} handler={}", entry.name, name)
        for name in wanted:
            if name not in entry.handlers:
                self.routes[name] = entry.name
                logger.info("Registering plugin async handler plugin={} handler={}", entry.name, name)
        entry.handlers = wanted
        self.events.publish(b"handlers", HandlersRegistered(plugin=entry.name, handler_names=wanted))

    def _drop_plugin(self, entry: PluginEntry, why: str) -> None:
        logger.warning("plugin {} {}; its handlers are unregistered until it is back", entry.name, why)
        self._set_handlers(entry, [])
        entry.peer.close()
        self.plugins.pop(entry.name, None)

    def _schedule_health(self) -> None:
        self.call_later(self.settings.heartbeat_s, self._check_health)

    def _check_health(self) -> None:
        self._schedule_health()
        self.pulse.reap_workers()
        for entry in list(self.plugins.values()):
            entry.peer.call(Health(), lambda reply, e=entry: self._on_health(e, reply), timeout_s=self.settings.heartbeat_s * 2)

    def _on_health(self, entry: PluginEntry, reply) -> None:
        if self.plugins.get(entry.name) is not entry:
            return
        if isinstance(reply, HealthReply) and reply.healthy:
            entry.failures = 0
            entry.healthy = True
            return
        entry.failures += 1
        if entry.failures >= HEALTH_FAILURES_ALLOWED:
            self._drop_plugin(entry, f"failed {entry.failures} health checks")


def run_server(settings: Settings) -> None:
    ServerActor(settings).run()

