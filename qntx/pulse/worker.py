"""A worker actor: takes job attempts from the server and runs them.

Connects a DEALER to the server's workers ROUTER and sends ``WorkerReady`` (its
capacity; repeated every heartbeat). For each ``Dispatch`` it runs a built-in
handler itself or forwards ``ExecuteJob`` to the plugin that owns the handler,
then reports ``JobDone``. ``CancelRunning`` kills an attempt. Timeouts are
enforced here for built-ins and by the plugin for its handlers (with a margin
here as a backstop). If a plugin process dies mid-job, the lost connection fails
its in-flight attempts at once, so the server can retry them.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import zmq
import zmq.asyncio
from loguru import logger

from qntx.bus.aio import install_stop_signals
from qntx.bus.client import AsyncClient
from qntx.bus.codec import Decoder, encode
from qntx.errors import QntxError
from qntx.protocol import (
    PLUGIN_DEPTH,
    STDERR_MARK,
    CancelExecution,
    CancelRunning,
    Dispatch,
    ExecuteJob,
    ExecuteResult,
    Job,
    JobDone,
    JobError,
    PluginReply,
    WorkerCommand,
    WorkerReady,
)
from qntx.settings import Settings

# How long past a job's own timeout the worker waits for its plugin to answer.
PLUGIN_TIMEOUT_MARGIN_S = 2.0  # shorter than the lease's grace: the worker reports first
# On SIGTERM, running attempts get this long to finish before the worker exits.
STOP_GRACE_S = 5.0


def _ignore_result(future) -> None:
    # A send that failed after the socket closed has no one left to tell.
    if not future.cancelled():
        future.exception()


class BuiltinFailure(Exception):
    pass


async def run_builtin(job: Job) -> Any:
    """The built-in handlers: echo (returns its payload), sleep (payload seconds), fail."""
    if job.handler == "builtin.echo":
        return job.payload
    if job.handler == "builtin.sleep":
        payload = job.payload
        if isinstance(payload, dict):
            args = payload.get("args") or [1]  # `qntx ix builtin.sleep 2`
            seconds = payload.get("seconds", args[0])
        else:
            seconds = payload
        try:
            seconds = float(seconds)
        except (TypeError, ValueError):
            raise BuiltinFailure(f"builtin.sleep needs a number of seconds, got {seconds!r}") from None
        if not 0 <= seconds < float("inf"):
            raise BuiltinFailure(f"builtin.sleep needs 0 <= seconds < inf, got {seconds!r}")
        await asyncio.sleep(seconds)
        return {"slept": seconds}
    if job.handler == "builtin.fail":
        raise BuiltinFailure(str(job.payload) if job.payload is not None else "failed on purpose")
    raise BuiltinFailure(f"no built-in handler {job.handler!r}")


class Worker:
    def __init__(self, settings: Settings, name: str | None = None, capacity: int = 8):
        self.settings = settings
        self.name = name or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.capacity = capacity
        self.context = zmq.asyncio.Context()
        self.decoder = Decoder(WorkerCommand)
        self.running: dict[str, asyncio.Task] = {}
        self.plugins: dict[str, AsyncClient] = {}
        self.stopping = False
        self.draining = False
        self._background: set[asyncio.Task] = set()

    async def run(self) -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 2000)  # let final JobDone messages out
        self.settings.security.connect(self.socket, self.settings.workers_endpoint)
        logger.info("worker {} connected to {} (capacity {})", self.name, self.settings.workers_endpoint, self.capacity)
        tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._receive())]
        await stop.wait()
        self.draining = True  # heartbeats now say credit 0: no new work, still alive
        self._send(self._ready())
        if self.running:
            logger.info("worker {} stopping: {} running job(s) get {}s to finish", self.name, len(self.running), STOP_GRACE_S)
            await asyncio.wait(list(self.running.values()), timeout=STOP_GRACE_S)
        self.stopping = True
        unfinished = list(self.running.values())
        for task in unfinished:
            task.cancel()  # each gives its job back (interrupted) as it ends
        if unfinished:
            logger.info("worker {}: {} job(s) given back to the queue unfinished", self.name, len(unfinished))
            await asyncio.wait(unfinished, timeout=1)
        for task in tasks:
            task.cancel()
        for client in self.plugins.values():
            client.close()
        self.socket.close(linger=2000)  # the last JobDone messages (given back jobs) go out
        self.context.term()

    def _send(self, message) -> None:
        body = encode(message)
        if isinstance(message, JobDone) and len(body) > self.settings.max_message_bytes:
            # The server would refuse it and the job would sit until its lease ran out.
            body = encode(self._failed_done(message, f"result too large ({len(body)} bytes > {self.settings.max_message_bytes})"))
        try:
            self.socket.send_multipart([b"", body], zmq.NOBLOCK).add_done_callback(_ignore_result)
        except zmq.ZMQError as exc:
            logger.warning("could not send {} to the server: {}", type(message).__name__, exc)

    @staticmethod
    def _failed_done(done: JobDone, message: str) -> JobDone:
        return JobDone(job_id=done.job_id, attempt=done.attempt, success=False, error=JobError(message=message))

    def _ready(self) -> WorkerReady:
        credit = 0 if self.draining else self.capacity
        return WorkerReady(worker=self.name, credit=credit, pid=os.getpid(), running=list(self.running))

    async def _heartbeat(self) -> None:
        while True:
            self._send(self._ready())
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _receive(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                command = self.decoder.decode(frames[1])
            except QntxError as exc:
                logger.warning("ignored an undecodable command from the server: {}", exc)
                continue
            if isinstance(command, Dispatch):
                task = asyncio.create_task(self._attempt(command))
                self.running[command.job.id] = task
                # Also when cancelled before it ever ran (then its finally never runs).
                task.add_done_callback(lambda t, job_id=command.job.id: self._forget(job_id, t))
            elif isinstance(command, CancelRunning):
                asyncio.create_task(self._cancel(command.job_id))

    async def _attempt(self, dispatch: Dispatch) -> None:
        job = dispatch.job
        try:
            done = await self._execute(job, dispatch.plugin_endpoint)
        except asyncio.CancelledError:
            if self.stopping:  # not a failure: give it back to run again elsewhere
                done = JobDone(job_id=job.id, attempt=job.attempts, success=False, interrupted=True)
            else:
                done = self._failed(job, "cancelled")
        except Exception as exc:  # never leave the server holding a slot for nothing
            logger.exception("job {} crashed in the worker", job.id)
            done = self._failed(job, f"worker error: {type(exc).__name__}: {exc}")
        finally:
            self.running.pop(job.id, None)
        self._send(done)

    async def _execute(self, job: Job, plugin_endpoint: str | None) -> JobDone:
        if plugin_endpoint is None:
            try:
                result = await asyncio.wait_for(run_builtin(job), job.timeout_s)
            except TimeoutError:
                return self._failed(job, f"timed out after {job.timeout_s:g}s")
            except Exception as exc:
                return self._failed(job, f"{type(exc).__name__}: {exc}")
            return JobDone(job_id=job.id, attempt=job.attempts, success=True, result=result)
        plugin = self._plugin(plugin_endpoint)
        request = ExecuteJob(
            job_id=job.id, handler=job.handler, payload=job.payload, timeout_s=job.timeout_s, attempt=job.attempts
        )
        try:
            # The plugin times the run itself; this backstop also covers a wait
            # for one of its interpreters (see the lease length in the queue).
            reply = await plugin.request(request, timeout_s=PLUGIN_DEPTH * job.timeout_s + PLUGIN_TIMEOUT_MARGIN_S)
        except asyncio.CancelledError:
            self._tell_plugin_to_cancel(plugin, job.id)
            raise
        except QntxError as exc:
            self._tell_plugin_to_cancel(plugin, job.id)
            return self._failed(job, f"plugin at {plugin_endpoint} failed: {exc}")
        if not isinstance(reply, ExecuteResult):
            return self._failed(job, f"plugin at {plugin_endpoint} answered {type(reply).__name__}")
        logs = reply.stdout + ((STDERR_MARK + reply.stderr) if reply.stderr else "")
        return JobDone(
            job_id=job.id,
            attempt=job.attempts,
            success=reply.success,
            result=reply.result,
            error=reply.error,
            logs=logs,
            progress=reply.progress,
        )

    def _forget(self, job_id: str, task: asyncio.Task) -> None:
        if self.running.get(job_id) is task:
            del self.running[job_id]

    def _failed(self, job: Job, message: str) -> JobDone:
        return JobDone(job_id=job.id, attempt=job.attempts, success=False, error=JobError(message=message))

    def _plugin(self, endpoint: str) -> AsyncClient:
        client = self.plugins.get(endpoint)
        if client is None:
            client = AsyncClient(
                endpoint, PluginReply, context=self.context, fail_on_disconnect=True, security=self.settings.security
            )
            self.plugins[endpoint] = client
        return client

    async def _cancel(self, job_id: str) -> None:
        task = self.running.get(job_id)
        if task is not None:
            task.cancel()  # a plugin job tells its plugin to stop it too

    def _tell_plugin_to_cancel(self, plugin: AsyncClient, job_id: str) -> None:
        async def tell() -> None:
            try:
                await plugin.request(CancelExecution(job_id=job_id), timeout_s=2)
            except QntxError as exc:
                logger.debug("cancel of {} at {}: {}", job_id, plugin.endpoint, exc)

        task = asyncio.create_task(tell())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def run_worker(settings: Settings, name: str | None = None, capacity: int = 8) -> None:
    asyncio.run(Worker(settings, name, capacity).run())
