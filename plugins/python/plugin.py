"""The Python plugin actor: runs handler scripts stored as attestations.

Binds its ROUTER (``PluginRequest``) and registers with the server, repeating the
registration as a heartbeat. Answers ``Metadata``, ``Initialize`` (discovers the
handlers in ATS and returns their names), ``Health``, ``CancelExecution`` and
``Shutdown``.

Once initialised it joins Pulse's worker pool as a session of its own
(``qntx.pulse.worker.Worker`` with ``plugin="python"``), with as much credit as it
takes jobs at once: that is the one way its jobs come (``Dispatch``); it runs each in
the warm interpreter pool and reports its ``JobDone`` itself.

Live discovery: it subscribes to the ATS event stream; a handler attestation
(predicate ``handler``, context ``python``) triggers a re-discovery, the same log
lines, and ``HandlersChanged`` to the server when the set of names changed. So does
a gap in the notices' numbers (notices it was too slow to take, or lost while ATS
restarted: counted and logged by ``qntx.ats.feed``), and a quiet resync every
RESYNC_S without notices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time

import msgspec
import zmq
import zmq.asyncio
from loguru import logger

from plugins.python.pool import InterpreterPool, Outcome
from plugins.python.runner import JobContext
from qntx import __version__
from qntx.ats.feed import NOTICE_BURST, Feed, subscribe
from qntx.bus.actor import Request
from qntx.bus.async_service import AsyncService, install_stop_signals
from qntx.bus.client import AsyncClient
from qntx.bus.pidlock import PidLock, lock_holder
from qntx.errors import QntxError, Unavailable
from qntx.join import SILENT_HEARTBEATS, find_server, reachable
from qntx.obs.trace import Tracer
from qntx.protocol import (
    PLUGIN_DEPTH,
    PLUGIN_ROLES,
    STDERR_MARK,
    Ack,
    AtsReply,
    BusEndpoints,
    CancelExecution,
    Dispatch,
    HandlersChanged,
    Health,
    HealthReply,
    Initialize,
    InitializeReply,
    JobDone,
    JobError,
    JobOutput,
    JobProgress,
    JobStarted,
    Metadata,
    MetadataReply,
    Ping,
    PluginRequest,
    Pong,
    RegisterPlugin,
    ServerReply,
    Shutdown,
)
from qntx.pulse.worker import Worker, given_back
from qntx.settings import Settings
from qntx.stored_handlers import HANDLER_FILTER, is_handler, resolve
from qntx.values import STOP_GRACE_S, now_ms


def run_key(job_id: str, lease: int) -> str:
    """The pool's name for one run: a job may have an abandoned run still going."""
    return f"{job_id}@{lease}"

NAME = "python"
SCRIPT_HANDLER = "python.script"


class ScriptPayload(msgspec.Struct):
    """What ``python.script`` reads of its payload."""

    content: str


RESYNC_S = 5.0
HANDLERS_FEED = Feed(HANDLER_FILTER, is_handler, "the python plugin's handler discovery")
ANNOUNCE_RETRY_S = 1.0  # an announcement the server did not acknowledge is sent again this soon
# A run's JobStarted goes out once its code has run this long; a run that ends sooner
# says when it started in its result (JobDone.started_at).
START_NOTICE_S = 0.1


class PythonPlugin:
    """``remote``: joined with ``--connect`` from another host (docs/DEPLOY.md). It binds
    nothing: it learns the bus's endpoints from the server (``GetEndpoints``),
    initialises itself, and takes its jobs through its own worker session only."""

    def __init__(self, settings: Settings, *, remote: bool = False, name: str | None = None):
        self.tracer = Tracer("plugin-python")  # spans of traced jobs only (qntx.obs.trace)
        self.settings = settings
        self.remote = remote
        default = f"plugin-{NAME}@{socket.gethostname()}-{os.getpid()}" if remote else f"plugin-{NAME}"
        self.session_name = name or default
        self.endpoint = settings.plugin_endpoint(NAME)
        self.context = zmq.asyncio.Context()
        self.handlers: dict[str, str] = {}  # name -> code
        self.versions: dict[str, str] = {}  # name -> its current version (attestation ASID)
        self.code_by_version: dict[str, tuple[str, str]] = {}  # every version seen -> (name, code)
        self.ats: AsyncClient | None = None
        self.ats_endpoint = settings.ats_endpoint
        self.pool: InterpreterPool | None = None
        self.initialized = asyncio.Event()
        self.session: Worker | None = None
        self.session_task: asyncio.Task | None = None
        self.stop = asyncio.Event()
        self._discovery_lock = asyncio.Lock()
        self._joining = asyncio.Lock()
        self._starting = asyncio.Lock()

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        self.settings.ensure_dirs()
        # Like every actor: one per home, and the server can tell its pid from the lock.
        lock = PidLock(self.settings.lock_path(f"plugin-{NAME}"))
        if not lock.acquire():
            holder = lock_holder(self.settings.lock_path(f"plugin-{NAME}"))
            raise Unavailable(f"a python plugin already runs on {self.settings.home} (pid {holder})")
        try:
            await self._serve()
        finally:
            lock.release()

    async def _serve(self) -> None:
        install_stop_signals(self.stop)
        self.service = None if self.remote else AsyncService(
            self.context,
            self.endpoint,
            PluginRequest,
            {
                Ping: self.on_ping,
                Metadata: self.on_metadata,
                Initialize: self.on_initialize,
                Health: self.on_health,
                CancelExecution: self.on_cancel,
                Shutdown: self.on_shutdown,
            },
            label="Python plugin",
            max_message_bytes=self.settings.max_message_bytes,
            security=self.settings.security,
            roles=PLUGIN_ROLES,
        )
        self.server = AsyncClient(
            self.settings.server_endpoint, ServerReply, context=self.context, security=self.settings.security,
            notices=True,  # a job's start, progress and output: one each per run at least
        )
        tasks = [asyncio.create_task(self._register_forever())]
        if self.service is not None:
            tasks.append(asyncio.create_task(self.service.serve_forever()))
        else:
            tasks.append(asyncio.create_task(self._join()))
        await self.stop.wait()
        if self.session_task is not None:  # its running jobs get their grace, the rest go back
            await self.session_task
            self.session.context.term()
        running = self.service.running_tasks() if self.service is not None else []
        if running:
            logger.info("stopping: {} running job(s) get {}s to finish", len(running), STOP_GRACE_S)
            await asyncio.wait(running, timeout=STOP_GRACE_S)
        for task in tasks:
            task.cancel()
        if self.service is not None:
            self.service.close()
        self.server.close()
        if self.ats is not None:
            self.ats.close()
        if self.pool is not None:
            await self.pool.close()
        self.context.destroy(linger=0)

    async def _register_forever(self) -> None:
        endpoint = "" if self.remote else self.endpoint
        message = RegisterPlugin(name=NAME, endpoint=endpoint, pid=os.getpid(), host=socket.gethostname())
        answered = time.monotonic()
        while True:
            try:
                await self.server.request(message, timeout_s=self.settings.heartbeat_s * 2)
                answered = time.monotonic()
            except QntxError as exc:
                logger.debug("server not reachable yet: {}", exc)
                silent = time.monotonic() - answered
                if self.remote and self.initialized.is_set() and silent >= self.settings.heartbeat_s * SILENT_HEARTBEATS:
                    logger.warning("no answer from the server at {} for {:.1f}s; looking for the leading one", self.server.endpoint, silent)
                    await self._rejoin()
                    answered = time.monotonic()
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _join(self) -> None:
        """A remote plugin: learn the bus from the server (the leading one of its
        addresses), then start."""
        while not self.initialized.is_set():
            try:
                async with self._joining:
                    address, bus = await asyncio.to_thread(find_server, self.settings, self.settings.connect)
                    if bus is None:
                        raise Unavailable(f"{address} is not a QNTX server's address (it does not answer GetEndpoints)")
                    await self.on_initialize(self._point_at(address, bus), None)
            except QntxError as exc:
                logger.warning("cannot join the bus at {} yet: {}", self.settings.connect, exc)
                await asyncio.sleep(self.settings.heartbeat_s)
            except Exception:  # its interpreters failed to start (one killed as it came up)
                logger.exception("joining the bus at {} failed; trying again", self.settings.connect)
                await asyncio.sleep(self.settings.heartbeat_s)

    async def _rejoin(self) -> None:
        """The server went silent (it died, or stopped, or a standby took over): join
        the leading one of the addresses again, as the same worker session (so it adopts
        the runs in flight), and re-point every connection at it."""
        async with self._joining:
            try:
                address, bus = await asyncio.to_thread(find_server, self.settings, self.settings.connect)
            except QntxError as exc:
                logger.warning("no server to join again yet: {}", exc)
                return
            if bus is None or address == self.settings.server_endpoint:
                return  # the same server: it was only slow or restarting
            logger.warning("joining the server at {} (was {})", address, self.settings.server_endpoint)
            init = self._point_at(address, bus)
            try:
                await self.on_initialize(init, None)
            except QntxError as exc:  # its ATS not answering yet: the resync finds the handlers later
                logger.warning("handler discovery at {} failed: {}; trying again", address, exc)

    def _point_at(self, address: str, bus: BusEndpoints) -> Initialize:
        """Every connection of this plugin pointed at the server at ``address``: requests,
        the worker session (jobs and results follow its welcome), ATS and its events
        (``on_initialize`` and ``_follow_ats``)."""
        self.server.repoint(address)
        self.settings = dataclasses.replace(
            self.settings,
            server_endpoint=address,
            workers_endpoint=reachable(bus.workers_endpoint, address),
            ats_events_endpoint=reachable(bus.ats_events_endpoint, address),
        )
        if self.session is not None:
            self.session.repoint(self.settings.workers_endpoint)
        return Initialize(
            ats_endpoint=reachable(bus.ats_endpoint, address),
            ats_events_endpoint=self.settings.ats_events_endpoint,
            server_endpoint=address,
        )

    # ---------------------------------------------------------------- requests

    def on_ping(self, message: Ping, request: Request) -> Pong:
        return Pong(actor=f"plugin:{NAME}", pid=os.getpid(), version=__version__)

    def on_metadata(self, message: Metadata, request: Request) -> MetadataReply:
        return MetadataReply(name=NAME, version=__version__, description="Runs Python handler scripts stored in ATS")

    async def on_initialize(self, message: Initialize, request: Request) -> InitializeReply:
        logger.info("Initializing Python plugin")
        if self.ats is None or message.ats_endpoint != self.ats_endpoint:
            ats = AsyncClient(message.ats_endpoint, AtsReply, context=self.context, security=self.settings.security)
            if self.ats is not None:  # (replaced once the new one exists: never a closed one kept)
                self.ats.close()
            self.ats, self.ats_endpoint = ats, message.ats_endpoint
            if self.pool is not None:
                self.pool.use_ats(message.ats_endpoint)
        logger.info("ATSStore endpoint: {}", message.ats_endpoint)
        self.ats_events_endpoint = message.ats_events_endpoint or self.settings.ats_events_endpoint
        async with self._starting:  # (a second Initialize, after a slow start, waits for it)
            if self.pool is None:
                await self._start_pool(message.ats_endpoint)
        await self._discover()
        if not self.initialized.is_set():
            self.initialized.set()
            asyncio.create_task(self._follow_ats())
            # Its own session of the worker pool: Pulse hands it its jobs directly.
            self.session = Worker(
                self.settings, self.session_name, PLUGIN_DEPTH * self.pool.size, plugin=NAME, execute=self._run_dispatch,
                rejoin=self._rejoin if self.remote else None,
            )
            self.session_task = asyncio.create_task(self.session.serve(self.stop))
        # A few jobs per interpreter keep each one busy across the round trips.
        return InitializeReply(
            handler_names=self.handler_names(), capacity=PLUGIN_DEPTH * self.pool.size,
            handler_versions=self.handler_versions(),
        )  # fmt: skip

    async def _start_pool(self, ats_endpoint: str) -> None:
        """Start the interpreters. The pool is kept only once it has started: a start
        that fails (an interpreter killed as it came up) closes it, and the next
        Initialize makes a new one, so no job is ever given to a closed pool."""
        pool = InterpreterPool(
            self.settings.python_interpreters,
            memory_mb=self.settings.python_memory_mb,
            file_mb=self.settings.python_file_mb,
            processes=self.settings.python_processes,
            fresh=self.settings.python_fresh_process,
            ats_endpoint=ats_endpoint,
            keys_dir=self.settings.security.runner_keys(),
            insecure=self.settings.insecure,
        )
        await pool.start()
        self.pool = pool

    def handler_names(self) -> list[str]:
        return [SCRIPT_HANDLER, *(f"{NAME}.{name}" for name in sorted(self.handlers))]

    def handler_versions(self) -> dict[str, str]:
        return {f"{NAME}.{name}": asid for name, asid in sorted(self.versions.items())}

    async def _discover(self) -> bool:
        """Query ATS for handlers; returns True when the set of names changed."""
        async with self._discovery_lock:
            logger.info("Discovering Python handlers from ATS store")
            records = await self._handler_records()
            resolution = resolve(records)
            for record in records:  # every version stays runnable: jobs pin the one they were submitted with
                code = record.attributes.get("code")
                if isinstance(code, str) and record.subjects:
                    self.code_by_version[record.id] = (record.subjects[0], code)
            self.versions = {name: record.id for name, record in resolution.current.items()}
            for record in resolution.skipped:
                logger.warning(
                    "skipped handler attestation {} for {}: it has no attributes.code",
                    record.id, json.dumps(record.subjects),
                )  # fmt: skip
            found = {name: record.attributes["code"] for name, record in resolution.current.items()}
            names = sorted(found)
            logger.info("Discovered {} handler(s) from ATS store: {}", len(names), json.dumps(names))
            changed = sorted(found) != sorted(self.handlers)
            self.handlers = found
            logger.info("Announcing async handlers: {}", json.dumps(self.handler_names()))
            return changed

    async def _follow_ats(self) -> None:
        """Live discovery from the ATS event stream, with a slow resync as a safety net."""
        endpoint = self.ats_events_endpoint
        sub = subscribe(self.context, self.settings, endpoint)
        # What the server has acknowledged (it got the first set in InitializeReply);
        # a change is announced until an announcement of it is acknowledged.
        announced = (self.handler_names(), self.handler_versions())
        while not self.stop.is_set():
            if endpoint != self.ats_events_endpoint:  # joined another server: its events now
                sub.close(0)
                endpoint = self.ats_events_endpoint
                sub = subscribe(self.context, self.settings, endpoint)
            pending = not self.remote and (self.handler_names(), self.handler_versions()) != announced
            try:
                if await sub.poll((ANNOUNCE_RETRY_S if pending else RESYNC_S) * 1000):
                    bodies = []
                    while len(bodies) < NOTICE_BURST and await sub.poll(0):
                        bodies.append((await sub.recv_multipart())[-1])
                    if HANDLERS_FEED.touched(bodies):
                        await self._discover()
                elif not pending:
                    await self._quiet_resync()
                wanted = (self.handler_names(), self.handler_versions())
                if wanted != announced and not self.remote:
                    # (A remote plugin runs what the server host's plugin announces.)
                    changed = HandlersChanged(plugin=NAME, handler_names=wanted[0], handler_versions=wanted[1])
                    await self.server.request(changed)
                    announced = wanted
            except QntxError as exc:
                logger.warning("handler discovery or announcement failed: {}; trying again", exc)
            except Exception:
                logger.exception("handler discovery crashed; retrying")
                await asyncio.sleep(1)

    async def _handler_records(self) -> list:
        """Every handler attestation in ATS, page after page (no cap on their number)."""
        pages = HANDLERS_FEED.pages()
        query = next(pages)
        while True:
            reply = await self.ats.request(query)
            try:
                query = pages.send(reply)
            except StopIteration as done:
                return done.value

    async def _quiet_resync(self) -> bool:
        current = {n: r.attributes["code"] for n, r in resolve(await self._handler_records()).current.items()}
        if current == self.handlers:
            return False
        return await self._discover()

    def on_health(self, message: Health, request: Request) -> HealthReply:
        healthy = self.pool is not None and self.initialized.is_set()
        return HealthReply(healthy=healthy, detail="" if healthy else "not initialized")

    async def _run_dispatch(self, dispatch: Dispatch) -> JobDone:
        """One job Pulse sent this plugin's own session: find its code and run it."""
        job, lease = dispatch.job, dispatch.lease
        if self.pool is None or not self.initialized.is_set():
            # Not the handler's failure: the run goes back, no attempt used.
            return given_back(job, lease, "the python plugin is not initialized yet")
        code, filename = self._code_for(job.handler, job.payload, job.version)
        if code is None:
            return _done(job.id, lease, job.attempts, Outcome(success=False, error=JobError(message=filename)))
        server = self.server

        def on_progress(current: float, total: float) -> None:
            server.notify(JobProgress(job_id=job.id, current=current, total=total, lease=lease))

        def on_output(stream: str, text: str) -> None:
            server.notify(JobOutput(job_id=job.id, stream=stream, text=text, lease=lease))

        started_at, start_notice = 0, None  # when its code began (ms), its JobStarted waiting to go

        def on_start() -> None:
            # Pulse says "running" from here (it may have waited for an interpreter). A
            # run that ends within START_NOTICE_S says so in its result instead: two
            # messages and two server turns fewer for every short job.
            nonlocal started_at, start_notice
            started_at = now_ms()
            start_notice = asyncio.get_running_loop().call_later(
                START_NOTICE_S, server.notify, JobStarted(job_id=job.id, lease=lease)
            )

        context = JobContext(id=job.id, attempt=job.attempts, due=job.due, handler=job.handler, lease=lease)
        span = None if dispatch.trace is None else self.tracer.start(
            "python.run", dispatch.trace, **{"qntx.job_id": job.id, "qntx.handler": job.handler, "qntx.lease": lease}
        )  # fmt: skip
        on_marks = None
        if span is not None:
            below = self.tracer.parent_of(span)

            def on_marks(marks: list) -> None:  # the handler's attest() batches, timed in its process
                for what, start_ns, end_ns, items in marks:
                    self.tracer.record(what, below, start_ns, end_ns, **{"qntx.attestations": items})

        outcome = await self.pool.run(
            run_key(job.id, lease),
            code,
            filename=filename,
            payload=job.payload,
            timeout_s=job.timeout_s,
            cpu_s=self.settings.python_cpu_s,
            on_progress=on_progress,
            on_output=on_output,
            on_start=on_start,
            context=context,
            on_marks=on_marks,
        )
        if start_notice is not None:
            start_notice.cancel()
        if span is not None:
            if not outcome.success:
                self.tracer.fail(span, outcome.error.message if outcome.error else "failed")
            span.end()
        return _done(job.id, lease, job.attempts, outcome, started_at)

    def _code_for(self, handler: str, payload: msgspec.Raw, version: str | None) -> tuple[str | None, str]:
        """(code, filename) for a job, or (None, error message)."""
        if handler == SCRIPT_HANDLER:
            try:  # only `content` is built: the rest of the payload is skipped unread
                return msgspec.msgpack.decode(payload, type=ScriptPayload).content, "<python.script>"
            except (msgspec.DecodeError, RecursionError):
                return None, "python.script needs a payload {\"content\": \"<python code>\"}"
        prefix = f"{NAME}."
        name = handler[len(prefix):] if handler.startswith(prefix) else ""
        if version is not None:  # the version the job was submitted with, even if updated since
            pinned = self.code_by_version.get(version)
            if pinned is None or pinned[0] != name:
                return None, f"handler {handler!r} has no version {version}"
            return pinned[1], f"<handler {name}>"
        code = self.handlers.get(name)
        if code is None:
            return None, f"unknown handler {handler!r}"
        return code, f"<handler {name}>"

    async def on_cancel(self, message: CancelExecution, request: Request) -> Ack:
        if self.pool is not None:
            if message.lease:
                await self.pool.cancel(run_key(message.job_id, message.lease))
            else:  # every run of the job
                for key in self.pool.runs():
                    if key.rpartition("@")[0] == message.job_id:
                        await self.pool.cancel(key)
        return Ack()

    def on_shutdown(self, message: Shutdown, request: Request) -> Ack:
        self.stop.set()
        return Ack()


def _done(job_id: str, lease: int, attempt: int, outcome: Outcome, started_at: int = 0) -> JobDone:
    """A run's outcome as its report (logs: stdout, the marker, stderr)."""
    logs = outcome.stdout + ((STDERR_MARK + outcome.stderr) if outcome.stderr else "")
    return JobDone(
        job_id=job_id, lease=lease, attempt=attempt, success=outcome.success, result=outcome.result,
        error=outcome.error, logs=logs, progress=outcome.progress, started_at=started_at,
    )  # fmt: skip


def run_python_plugin(settings: Settings, *, remote: bool = False, name: str | None = None) -> None:
    asyncio.run(PythonPlugin(settings, remote=remote, name=name).run())
