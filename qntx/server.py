"""The server actor: front door for clients and plugins, home of Pulse.

Sockets:
  * server ROUTER (``ServerRequest``): clients submit and inspect jobs; plugins
    register, announce handler changes and report progress and output.
  * the worker pool's sockets (control ROUTER, one jobs PUSH per worker session,
    the results PULL): ``qntx.pulse.shell``.
  * events PUB: ``JobChanged``/``JobProgressed``/``JobOutput`` (topic ``job.<id>``)
    and ``HandlersRegistered`` (topic ``handlers``).
  * one DEALER per registered plugin, for Metadata/Initialize/Health/CancelExecution.

A plugin registers with ``RegisterPlugin``; the server calls ``Metadata`` and
``Initialize`` on it and registers the handler names it returns. Plugins repeat
``RegisterPlugin`` as a heartbeat, which also re-registers them after a server
restart. The server asks each plugin for ``Health`` every heartbeat, with a deadline
of two heartbeats. A plugin that fails HEALTH_FAILURES_ALLOWED checks in a row loses
its handlers until it is back; one that did not answer at all is hung (stopped, or
its loop blocked), and if it runs on this host the server kills it, having checked
by its pid lock that the pid is still that plugin's, so that ``qntx up`` restarts it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass

import msgspec
from loguru import logger

from qntx import __version__, db, leader
from qntx.bus.actor import Actor, Peer, Publisher, Request
from qntx.bus.pidlock import PidLock, lock_holder
from qntx.bus.security import HOST
from qntx.errors import Forbidden, Invalid, NotFound, QntxError, Unavailable
from qntx.lmdbenv import READER_CHECK_S, clear_stale_readers_logged
from qntx.obs.metrics import export, pulse_families
from qntx.protocol import (
    EVENT_ROLES,
    SERVER_ROLES,
    Ack,
    ActorStatus,
    BusEndpoints,
    CancelExecution,
    CancelJob,
    EndedJobs,
    EndedJobsReply,
    ErrorReply,
    GetEndpoints,
    GetJob,
    GetStatus,
    HandlersChanged,
    Health,
    HealthReply,
    Initialize,
    InitializeReply,
    JobList,
    JobOutput,
    JobProgress,
    JobReply,
    JobStarted,
    JobUpdate,
    Leadership,
    ListJobs,
    ListSchedules,
    Metadata,
    MetadataReply,
    PauseJob,
    Ping,
    PluginReply,
    Pong,
    Prune,
    Pruned,
    RegisterPlugin,
    ResumeJob,
    RetryJob,
    SchedulesReply,
    ScheduleState,
    ServerRequest,
    StatusReply,
    Submit,
    WaitJob,
)
from qntx.pulse.directive_feed import DirectivesFollower
from qntx.pulse.events import HandlersAnnounced, PluginDown, PluginUp
from qntx.pulse.shell import Pulse, instant
from qntx.settings import Settings
from qntx.values import is_int

HEALTH_FAILURES_ALLOWED = 3


@dataclass
class PluginEntry:
    name: str
    endpoint: str
    pid: int
    peer: Peer
    healthy: bool = False
    failures: int = 0
    version: str = ""
    capacity: int = 0
    key: str | None = None  # the key it registered with (None: this host, over ipc)


@dataclass
class RemotePlugin:
    """A plugin on another host: it takes its jobs through its own worker session and
    is never called back; its RegisterPlugin heartbeats keep this entry fresh."""

    name: str
    host: str
    pid: int
    key: str
    last_seen: float


class ServerActor(Actor):
    name = "server"
    label = "QNTX Server"

    def __init__(self, settings: Settings):
        super().__init__(max_message_bytes=settings.max_message_bytes, security=settings.security)
        self.settings = settings
        self.plugins: dict[str, PluginEntry] = {}  # the plugins it calls (their handlers: Pulse's registry)
        self.remote_plugins: dict[tuple[str, str, int], RemotePlugin] = {}  # (key, name, pid) -> it

    def setup(self) -> None:
        self.settings.ensure_dirs()
        self.lock = PidLock(self.settings.lock_path(self.name))
        if not self.lock.acquire():
            raise Unavailable(f"another server already runs on {self.settings.home}")
        self.events = Publisher(
            self, self.settings.events_endpoint, self.settings.public("events_endpoint"), topics=EVENT_ROLES
        )
        self.pulse = Pulse(self, self.settings, publish=self.events.publish, cancel_at_plugin=self.cancel_at_plugin)
        handlers = {
            Ping: self.on_ping,
            Submit: self.on_submit,
            WaitJob: self.on_wait,
            EndedJobs: self.on_ended,
            GetJob: self.on_get_job,
            ListJobs: self.on_list_jobs,
            CancelJob: self.on_cancel,
            RetryJob: self.on_retry,
            PauseJob: self.on_pause,
            ResumeJob: self.on_resume,
            GetStatus: self.on_status,
            ListSchedules: self.on_list_schedules,
            Prune: self.on_prune,
            RegisterPlugin: self.on_register_plugin,
            HandlersChanged: self.on_handlers_changed,
            JobProgress: self.on_progress,
            JobOutput: self.on_output,
            JobStarted: self.on_started,
            GetEndpoints: self.on_get_endpoints,
        }
        self.service = self.serve(
            self.settings.server_endpoint,
            ServerRequest,
            {kind: handler if kind is Submit else self._after_submits(handler) for kind, handler in handlers.items()},
            roles=SERVER_ROLES,
            also=self.settings.public("server_endpoint"),
        )
        self.directives = DirectivesFollower(self, self.settings, self.pulse.set_directives)
        self.every(max(0.1, self.settings.prune_every_s), self._prune_in_background)
        self._pruning = False
        self._schedule_health()
        self.every(READER_CHECK_S, lambda: clear_stale_readers_logged(self.pulse.store, "the job store"))
        export(self, self.settings.run_dir, lambda: pulse_families(self.pulse))
        counts = self.pulse.core.counts()
        logger.info(
            "QNTX server serving {} (pulse {}: {} queued, {} running, {} paused; running ones wait for their workers to claim them)",
            self.settings.server_endpoint,
            self.pulse.store.location,
            counts.get("queued", 0),
            counts.get("running", 0) + counts.get("dispatched", 0),
            counts.get("paused", 0),
        )

    def after_batch(self) -> None:
        self.pulse.end_turn()

    def teardown(self) -> None:
        self.pulse.end_turn()
        self.pulse.close()
        self.lock.release()

    # ---------------------------------------------------------------- clients

    def _after_submits(self, handler):
        """``handler``, run once the submissions before it are in the core (on a
        remote job store they may still wait for their lookup)."""

        def run(message, request):
            self.pulse.settle_submits()
            return handler(message, request)

        return run

    def on_ping(self, message: Ping, request: Request) -> Pong:
        return Pong(actor=self.name, pid=self.pid, version=__version__)

    def on_submit(self, message: Submit, request: Request) -> None:
        self.pulse.submit(message, request)  # replied to after the commit

    def on_wait(self, message: WaitJob, request: Request) -> JobUpdate | None:
        return self.pulse.wait(message, request)  # now, or when there is news (or at its deadline)

    def on_ended(self, message: EndedJobs, request: Request) -> EndedJobsReply | None:
        return self.pulse.ended(message, request)  # now, or when one of them ends (or at its deadline)

    def on_get_job(self, message: GetJob, request: Request) -> JobReply:
        job = self.pulse.get(message.id)
        return JobReply(job=job, dependents=self.pulse.dependents(job.id))

    def on_list_jobs(self, message: ListJobs, request: Request) -> JobList:
        return self.pulse.list_jobs(message)

    def on_cancel(self, message: CancelJob, request: Request) -> None:
        self.pulse.steer("cancel", message.id, request, brief=message.brief)  # replied to after the commit

    def on_retry(self, message: RetryJob, request: Request) -> None:
        self.pulse.steer("retry", message.id, request, latest=message.latest, brief=message.brief)

    def on_pause(self, message: PauseJob, request: Request) -> None:
        self.pulse.steer("pause", message.id, request, brief=message.brief)

    def on_resume(self, message: ResumeJob, request: Request) -> None:
        self.pulse.steer("resume", message.id, request, brief=message.brief)

    def on_get_endpoints(self, message: GetEndpoints, request: Request) -> BusEndpoints:
        names = ("ats_endpoint", "ats_events_endpoint", "workers_endpoint", "events_endpoint")
        return BusEndpoints(**{name: self.settings.for_other_hosts(name) for name in names})

    def on_output(self, message: JobOutput, request: Request) -> None:
        self.pulse.output(message, request.peer)

    def on_started(self, message: JobStarted, request: Request) -> None:
        self.pulse.started(message, request.peer)

    def on_progress(self, message: JobProgress, request: Request) -> None:
        self.pulse.progress(message, request.peer)

    def on_status(self, message: GetStatus, request: Request) -> StatusReply:
        host = socket.gethostname()
        actors = [ActorStatus(name="server", pid=self.pid, endpoint=self.settings.server_endpoint, healthy=True, host=host)]
        # A worker is healthy while connected and heard from within two heartbeats
        # (Pulse gives its runs back only after three).
        now, fresh_ms = instant().mono, self.settings.heartbeat_s * 2000
        for session in self.pulse.core.session_list():
            # A plugin's own session (this host's too) is listed like a worker, with its
            # slots: it takes jobs from the pool as one.
            key, role, peer_host = self.pulse.owners.get(session.id, ("", "", ""))
            healthy = session.ready and now - session.last_seen <= fresh_ms
            actors.append(
                ActorStatus(
                    name=session.name, pid=session.pid, endpoint=self.settings.workers_endpoint, healthy=healthy,
                    credit=session.credit, host=peer_host if key else host, role=role, key=key,
                    leases=len(session.leases) + len(session.foreign),  # with runs taken back it still runs
                )  # fmt: skip
            )
        for plugin in sorted(self.plugins.values(), key=lambda p: p.name):
            healthy = plugin.healthy and plugin.failures == 0
            actors.append(
                ActorStatus(
                    name=f"plugin:{plugin.name}", pid=plugin.pid, endpoint=plugin.endpoint, healthy=healthy,
                    host=host if plugin.endpoint.startswith("ipc://") else "",
                )  # fmt: skip
            )
        stale = time.monotonic() - 3 * self.settings.heartbeat_s
        for key, remote in sorted(self.remote_plugins.items()):
            if remote.last_seen < stale:
                del self.remote_plugins[key]
                continue
            actors.append(
                ActorStatus(
                    name=f"plugin:{remote.name}", pid=remote.pid, endpoint="(remote)", healthy=True,
                    host=remote.host, role="plugin", key=remote.key,
                )  # fmt: skip
            )
        return StatusReply(
            actors=actors, queue=self.pulse.core.counts(), handlers=self.pulse.core.live_handlers(),
            sessions_free=self.pulse.sessions_free, leadership=self._leadership(),
        )  # fmt: skip

    def _leadership(self) -> Leadership | None:
        """The lease as the database has it now, on a PostgreSQL store (else None)."""
        if not db.is_database_url(self.settings.store):
            return None
        try:
            return msgspec.convert(leader.read(self.settings.store), Leadership)
        except QntxError as exc:
            return Leadership(error=str(exc))

    def on_prune(self, message: Prune, request: Request) -> None:
        older = message.older_than_ms
        if older is not None and (not is_int(older) or older < 0):
            raise Invalid(f"older_than_ms must be a whole number of ms >= 0, got {older!r}")
        self.pulse.prune(older, lambda deleted: request.reply(Pruned(deleted=deleted)))

    def _prune_in_background(self) -> None:
        if not self._pruning:
            self._pruning = True
            self.pulse.prune(done=lambda deleted: setattr(self, "_pruning", False))

    def on_list_schedules(self, message: ListSchedules, request: Request) -> SchedulesReply:
        states = []
        for name, (schedule, last, due, firings) in sorted(self.pulse.core.schedule_states().items()):
            states.append(
                ScheduleState(
                    name=name, handler=schedule.handler, every_ms=schedule.every_ms, cron=schedule.cron,
                    tz=schedule.tz, missed=schedule.missed, paused=schedule.paused, last_due=last,
                    next_due=due, firings=[(d, i) for d, i in firings],
                )  # fmt: skip
            )
        limits = {h: [lim.concurrency, lim.rate, lim.per_ms] for h, lim in self.pulse.core.limits().items()}
        return SchedulesReply(schedules=states, loaded=self.directives.loaded, limits=limits)

    # ---------------------------------------------------------------- plugins

    def cancel_at_plugin(self, plugin: str, job_id: str, lease: int) -> None:
        entry = self.plugins.get(plugin)
        if entry is not None:
            entry.peer.call(CancelExecution(job_id=job_id, lease=lease), lambda reply: None, timeout_s=5)

    def on_register_plugin(self, message: RegisterPlugin, request: Request) -> Ack:
        if not message.endpoint:  # a remote plugin's heartbeat: it is never called back
            key = (request.peer or "", message.name, message.pid)
            if key not in self.remote_plugins:
                logger.info("remote plugin {} on {} (pid {}, key {}) joined", message.name, message.host, message.pid, request.peer)
            self.remote_plugins[key] = RemotePlugin(message.name, message.host, message.pid, request.peer or "", time.monotonic())
            return Ack()
        if request.peer is not None and (
            request.peer != HOST or message.endpoint != self.settings.plugin_endpoint(message.name)
        ):
            # Over tcp the server connects to no endpoint a peer names: only to a
            # plugin socket in its own 0700 run directory, for this host's own key.
            logger.warning("refused RegisterPlugin {} with endpoint {} from key {}", message.name, message.endpoint, request.peer)
            raise Forbidden("a plugin registering over tcp leaves endpoint empty (it takes its own jobs)")
        entry = self.plugins.get(message.name)
        if entry is not None and entry.key != request.peer:
            logger.warning("refused RegisterPlugin {} from {}: it is registered by {}", message.name, request.peer or "this host", entry.key or "this host")
            raise Forbidden(f"plugin {message.name!r} is registered by another key")
        if entry is not None and entry.pid == message.pid and entry.endpoint == message.endpoint:
            # A heartbeat from a plugin we know. It proves the process lives, not
            # that it serves: only a Health reply clears failed checks.
            return Ack()
        if entry is not None:
            self._drop_plugin(entry, "re-registered")
        peer = self.connect(message.endpoint, PluginReply)
        entry = PluginEntry(name=message.name, endpoint=message.endpoint, pid=message.pid, peer=peer, key=request.peer)
        self.plugins[message.name] = entry
        peer.call(Metadata(), lambda reply: self._on_metadata(entry, reply))
        return Ack()

    def _on_metadata(self, entry: PluginEntry, reply) -> None:
        if self.plugins.get(entry.name) is not entry:
            return  # replaced meanwhile
        if isinstance(reply, ErrorReply):
            # Dropped: its next RegisterPlugin (one per heartbeat) starts over.
            self._drop_plugin(entry, f"did not answer Metadata: {reply.message}")
            return
        if isinstance(reply, MetadataReply):
            entry.version = reply.version
        init = Initialize(
            ats_endpoint=self.settings.ats_endpoint,
            ats_events_endpoint=self.settings.ats_events_endpoint,
            server_endpoint=self.settings.server_endpoint,
            config=dict(self.settings.extra.get("plugins", {}).get(entry.name, {})),
        )
        entry.peer.call(init, lambda r: self._on_initialized(entry, r), timeout_s=60)

    def _on_initialized(self, entry: PluginEntry, reply) -> None:
        if self.plugins.get(entry.name) is not entry:
            return  # replaced meanwhile
        if not isinstance(reply, InitializeReply):
            # Dropped: its next RegisterPlugin (one per heartbeat) asks it again. Kept, a
            # plugin that answers Health would never be initialized by this server.
            self._drop_plugin(entry, f"failed to initialize: {getattr(reply, 'message', reply)}")
            return
        entry.healthy = True
        entry.capacity = max(0, reply.capacity)
        versions = tuple(reply.handler_versions.items())
        self.pulse.apply(PluginUp(entry.name, tuple(reply.handler_names), versions))

    def on_handlers_changed(self, message: HandlersChanged, request: Request) -> Ack:
        entry = self.plugins.get(message.plugin)
        if entry is None:
            raise NotFound(f"plugin {message.plugin!r} is not registered")
        if entry.key != request.peer:
            logger.warning("refused HandlersChanged for plugin {} from {}: not its key", message.plugin, request.peer or "this host")
            raise Forbidden(f"only plugin {message.plugin!r} itself announces its handlers")
        versions = tuple(message.handler_versions.items())
        self.pulse.apply(HandlersAnnounced(entry.name, tuple(message.handler_names), versions))
        return Ack()

    def _drop_plugin(self, entry: PluginEntry, why: str) -> None:
        logger.warning("plugin {} {}; its handlers are unregistered until it is back", entry.name, why)
        entry.peer.close()
        self.plugins.pop(entry.name, None)
        self.pulse.apply(PluginDown(entry.name))  # its handlers stay known: their jobs wait

    def _schedule_health(self) -> None:
        self.call_later(self.settings.heartbeat_s, self._check_health)

    def _check_health(self) -> None:
        self._schedule_health()
        deadline_s = self.settings.heartbeat_s * 2
        for entry in list(self.plugins.values()):
            entry.peer.call(Health(), lambda reply, e=entry: self._on_health(e, reply), timeout_s=deadline_s)

    def _on_health(self, entry: PluginEntry, reply) -> None:
        if self.plugins.get(entry.name) is not entry:
            return
        if isinstance(reply, HealthReply) and reply.healthy:
            entry.failures = 0
            return
        entry.failures += 1
        if entry.failures < HEALTH_FAILURES_ALLOWED:
            return
        if isinstance(reply, ErrorReply) and reply.code == "timeout":
            self._kill_hung(entry)
        self._drop_plugin(entry, f"failed {entry.failures} health checks")

    def _kill_hung(self, entry: PluginEntry) -> None:
        """Kill a plugin that stopped answering, so that its supervisor restarts it."""
        deadline_s = self.settings.heartbeat_s * 2
        if not entry.endpoint.startswith("ipc://"):
            logger.error("plugin {} on another host is hung (no Health reply within {:g}s)", entry.name, deadline_s)
            return
        holder = lock_holder(self.settings.lock_path(f"plugin-{entry.name}"))
        if holder != entry.pid:
            logger.warning("plugin {} is hung, but pid {} no longer holds its lock; not killed", entry.name, entry.pid)
            return
        logger.warning(
            "plugin {} (pid {}) is hung: {} Health checks got no reply within {:g}s; killing it to restart it",
            entry.name,
            entry.pid,
            entry.failures,
            deadline_s,
        )
        try:
            os.kill(entry.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_server(settings: Settings) -> None:
    ServerActor(settings).run()

