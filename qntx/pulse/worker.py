"""A worker actor: one session of Pulse's worker pool, running the runs it is leased.

Its three pipes (docs/PROTOCOL.md §5.4):

* control: a DEALER to the server's workers endpoint whose routing id is this
  session's id, so a reconnect (or a restarted server) sees the same worker with
  the same jobs. It sends ``WorkerReady`` at once and every heartbeat (its credit
  and the leases it holds); it gets ``WorkerWelcome`` and ``CancelRunning``.
* jobs: a PULL connected to the PUSH the server bound for this session alone
  (named in the welcome): ``Dispatch``, never more than the credit it announced.
* results: a PUSH connected to the server's results sink: ``JobDone``.

A plain worker runs the built-in handlers; a plugin runs a session of its own
(``plugin`` names it, ``execute`` runs each dispatch) and takes its handlers' jobs
there: Pulse never sends a plugin's job anywhere else. Payloads and results stay raw
MessagePack on the way through. Only the handler's own failure or timeout uses an
attempt: if this worker stops, the run is reported ``interrupted`` and Pulse queues
it again as it was.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from loguru import logger

from qntx.bus.async_service import install_stop_signals
from qntx.bus.bounds import check_decoded_size
from qntx.bus.codec import Decoder, encode
from qntx.bus.messages import ErrorReply
from qntx.errors import QntxError, TooLarge
from qntx.join import join, reachable
from qntx.log import about_run
from qntx.protocol import (
    NIL,
    TIMED_OUT,
    CancelRunning,
    Dispatch,
    Job,
    JobDone,
    JobError,
    WorkerCommand,
    WorkerJob,
    WorkerReady,
    WorkerWelcome,
)
from qntx.pulse.leader_watch import LeaderWatch
from qntx.settings import Settings
from qntx.values import STOP_GRACE_S

# Results sent within this long (at most RECENT_RESULTS of them) are sent again when
# a server welcomes this session anew: one that restarted may have lost them unread.
RECENT_RESULTS_S = 120.0
RECENT_RESULTS = 10_000
RECENT_RESULTS_BYTES = 64 << 20
# A session the server refused (no room) hangs up, so that it holds none of the
# server's open files, and says hello again this much later.
REFUSED_RETRY_S = 5.0
# Dispatches taken from the jobs pipe in one loop turn; more wait for the next turn.
JOBS_PER_TURN = 64
_monitors = itertools.count()  # names the jobs pipes' monitors


class BuiltinFailure(Exception):
    pass


async def run_builtin(job: Job) -> msgspec.Raw:
    """The built-in handlers: echo (returns its payload as it came), sleep (payload
    seconds), fail. Only sleep and fail decode the payload."""
    if job.handler == "builtin.echo":
        return job.payload
    try:
        check_decoded_size(job.payload, "payload")  # carried unread so far: see qntx.bus.bounds
    except TooLarge as exc:
        raise BuiltinFailure(str(exc)) from None
    payload = msgspec.msgpack.decode(job.payload)
    if job.handler == "builtin.sleep":
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
        return msgspec.Raw(msgspec.msgpack.encode({"slept": seconds}))
    if job.handler == "builtin.fail":
        raise BuiltinFailure(str(payload) if payload is not None else "failed on purpose")
    raise BuiltinFailure(f"no built-in handler {job.handler!r}")


# What a plugin that takes its jobs itself runs for each one (see ``Worker.plugin``).
Executor = Callable[[Dispatch], Awaitable[JobDone]]


class Worker:
    """One session of the worker pool. A plain worker runs built-ins; a plugin runs
    a session of its own (``plugin`` names it, ``execute`` runs each dispatch) and
    takes its handlers' jobs there."""

    def __init__(
        self,
        settings: Settings,
        name: str | None = None,
        capacity: int = 8,
        *,
        plugin: str = "",
        execute: Executor | None = None,
        rejoin: Callable[[], Awaitable[None]] | None = None,
        joined: bool = False,
    ):
        self.settings = settings
        self.name = name or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.plugin = plugin
        self.execute = execute
        self.session = f"{self.name}:{os.getpid()}:{secrets.token_hex(4)}"
        self.capacity = capacity
        self.context = zmq.asyncio.Context()
        # The jobs pipe and the results are plain sockets on the same context, read and
        # written without futures: a job's messages cost no asyncio machinery.
        self._plain = zmq.Context.shadow(self.context.underlying)
        self.commands = Decoder(WorkerCommand)
        self.jobs_decoder = Decoder(WorkerJob)
        self.running: dict[int, asyncio.Task] = {}  # lease -> its run
        self._not_started: dict[int, Job] = {}  # lease -> job, until its run begins
        self.draining = False
        self.stopping = False
        self.jobs: zmq.Socket | None = None
        self.jobs_endpoint = ""  # connected (handshake done) to this jobs PUSH
        self._jobs_target = ""
        self.results: zmq.Socket | None = None
        self._results_endpoint = ""
        self._unsent: list[bytes] = []  # results finished before the first welcome
        self._recent: collections.OrderedDict[int, tuple[float, bytes]] = collections.OrderedDict()
        self._recent_bytes = 0
        self._background: set[asyncio.Task] = set()
        self._refusals = 0  # hellos the server refused since it last took this session
        # Joined through server addresses (``settings.connect``): what finds the leading
        # server again when this one goes silent (by default: join again, re-point this session).
        if rejoin is None and joined and settings.connect:
            rejoin = self._rejoin
        self.watch = None if rejoin is None else LeaderWatch(self.name, settings.heartbeat_s, rejoin)

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await self.serve(stop)
        self.context.term()

    async def serve(self, stop: asyncio.Event) -> None:
        """Take part in the pool until ``stop`` is set, then stop gracefully."""
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.ROUTING_ID, self.session.encode())
        tasks = [self._spawn(self._heartbeat()), self._spawn(self._read_control())]
        if self.watch is not None:
            tasks += [self._spawn(c) for c in self.watch.arm(self.control, self.settings.workers_endpoint)]
        self.settings.security.connect(self.control, self.settings.workers_endpoint)
        logger.info("worker {} connected to {} (capacity {})", self.name, self.settings.workers_endpoint, self.capacity)
        await stop.wait()
        self.draining = True  # heartbeats now say credit 0: no new work, still alive
        self._send_ready()
        if self.running:
            logger.info("worker {} stopping: {} running job(s) get {}s to finish", self.name, len(self.running), STOP_GRACE_S)
            await asyncio.wait(list(self.running.values()), timeout=STOP_GRACE_S)
        self.stopping = True
        unfinished = list(self.running.values())
        for task in unfinished:
            task.cancel()  # each gives its run back (interrupted) as it ends
        if unfinished:
            logger.info("worker {}: {} job(s) given back to the queue unfinished", self.name, len(unfinished))
            await asyncio.wait(unfinished, timeout=1)
        for task in [*tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*tasks, *self._background, return_exceptions=True)
        self.control.close(0)
        self._close_jobs()
        if self.results is not None:
            self.results.close(linger=2000)  # the last JobDone messages get 2 s to go out

    def _spawn(self, coroutine: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---------------------------------------------------------------- control

    def _send_ready(self) -> None:
        ready = WorkerReady(
            worker=self.name,
            credit=0 if self.draining else self.capacity,
            pid=os.getpid(),
            session=self.session,
            leases=sorted(self.running),
            jobs_endpoint=self.jobs_endpoint,
            plugin=self.plugin,
            host=socket.gethostname(),
        )
        try:
            self.control.send_multipart([b"", encode(ready)], zmq.NOBLOCK).add_done_callback(_ignore_result)
        except zmq.ZMQError as exc:
            logger.debug("heartbeat not sent: {}", exc)

    async def _heartbeat(self) -> None:
        while True:
            self._send_ready()
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _read_control(self) -> None:
        while True:
            frames = await self.control.recv_multipart()
            if self.watch is not None:
                self.watch.heard()
            if len(frames) != 2:
                continue
            try:
                command = self.commands.decode(frames[1])
            except QntxError as exc:
                refusal = _refusal(frames[1])
                if refusal is not None:
                    await self._refused(refusal)
                else:
                    logger.warning("ignored an undecodable command from the server: {}", exc)
                continue
            if isinstance(command, WorkerWelcome):
                self._welcomed(command)
            elif isinstance(command, CancelRunning):
                task = self.running.get(command.lease)
                if task is not None:
                    task.cancel()

    async def _refused(self, refusal: ErrorReply) -> None:
        endpoint = self.settings.workers_endpoint
        level = "DEBUG" if self._refusals else "WARNING"  # said once, until it gets in
        self._refusals += 1
        logger.log(level, "worker {}: the server refused this session: {}; trying again in {:g}s", self.name, refusal.message, REFUSED_RETRY_S)
        if self.watch is not None:
            self.watch.holding_off = True
        try:
            self.control.disconnect(endpoint)  # heartbeats meanwhile find no peer and are skipped
            await asyncio.sleep(REFUSED_RETRY_S)
            self.settings.security.connect(self.control, endpoint)
        finally:
            if self.watch is not None:
                self.watch.holding_off = False
                self.watch.heard()

    # ---------------------------------------------------------------- finding the leading server

    async def _rejoin(self) -> None:
        try:
            joined = await asyncio.to_thread(join, self.settings)
        except QntxError as exc:
            logger.warning("worker {}: {}", self.name, exc)
            return
        self.repoint(joined.workers_endpoint)

    def repoint(self, workers_endpoint: str) -> None:
        """Take part in the pool of the server at ``workers_endpoint`` from now on, as the
        same session (so that server adopts the runs it holds); the welcome there
        re-points the jobs pipe and the results."""
        old = self.settings.workers_endpoint
        if workers_endpoint == old:
            return
        logger.warning("worker {}: moving to the server at {} (was {})", self.name, workers_endpoint, old)
        try:
            self.control.disconnect(old)
        except zmq.ZMQError:
            pass
        self.settings = dataclasses.replace(self.settings, workers_endpoint=workers_endpoint)
        self.jobs_endpoint = ""  # that server has not seen this pipe connected
        if self.watch is not None:
            self.watch.moved(workers_endpoint)
        self.settings.security.connect(self.control, workers_endpoint)
        self._send_ready()

    def _welcomed(self, welcome: WorkerWelcome) -> None:
        if self._refusals:
            logger.info("worker {}: the server took this session after {} refusal(s)", self.name, self._refusals)
            self._refusals = 0
        welcomed_before = self.results is not None
        via = self.settings.workers_endpoint
        results = reachable(welcome.results_endpoint, via)
        if results != self._results_endpoint:
            if self.results is not None:
                self.results.close(0)
            self.results = self._plain.socket(zmq.PUSH)
            self.results.setsockopt(zmq.LINGER, 2000)
            self.results.setsockopt(zmq.SNDHWM, 0)  # results wait for a server, however long
            self.settings.security.connect(self.results, results)
            self._results_endpoint = results
            unsent, self._unsent = self._unsent, []
            for body in unsent:
                self._push(body)
        if welcomed_before:
            self._resend_recent()  # (to the results sink of the server that welcomed it now)
        target = reachable(welcome.jobs_endpoint, via)
        if target != self._jobs_target:
            self._close_jobs()
            self.jobs = jobs = self._plain.socket(zmq.PULL)
            jobs.setsockopt(zmq.LINGER, 0)
            jobs.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes * 4)
            self._jobs_target, self.jobs_endpoint = target, ""
            # (a fresh name each time: a closed pipe's name is released only later)
            address = f"inproc://qntx-jobs-monitor-{next(_monitors)}"
            jobs.monitor(address, zmq.EVENT_HANDSHAKE_SUCCEEDED)
            monitor = self.context.socket(zmq.PAIR)
            monitor.connect(address)
            self.settings.security.connect(jobs, target)
            self._spawn(self._watch_jobs_pipe(monitor, welcome.jobs_endpoint))
            loop = asyncio.get_running_loop()
            loop.add_reader(jobs.FD, self._take_jobs, jobs)
            loop.call_soon(self._take_jobs, jobs)  # (what came before the reader was added)
        else:
            self._send_ready()  # the same pipe (a restarted server binds it again)

    async def _watch_jobs_pipe(self, monitor: zmq.asyncio.Socket, announced: str) -> None:
        """Each time the jobs pipe is (re)connected, tell the server at once."""
        try:
            while True:
                await monitor.recv_multipart()
                self.jobs_endpoint = announced
                self._send_ready()
        except zmq.ZMQError:
            monitor.close(0)  # the pipe was replaced
        except asyncio.CancelledError:
            monitor.close(0)
            raise

    # ---------------------------------------------------------------- runs

    def _close_jobs(self) -> None:
        if self.jobs is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self.jobs.FD)
        except RuntimeError:  # (no loop running any more)
            pass
        self.jobs.close(0)
        self.jobs = None

    def _take_jobs(self, sock: zmq.Socket) -> None:
        """The jobs pipe is readable: take what it holds, JOBS_PER_TURN at most (the
        rest in the next loop turn). Its descriptor signals only new arrivals, so it is
        read until empty, and that ``Again`` readies it for the next signal."""
        if sock is not self.jobs:
            return  # replaced by a new pipe
        for _ in range(JOBS_PER_TURN):
            try:
                body = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed
            self._take_job(body)
        asyncio.get_running_loop().call_soon(self._take_jobs, sock)

    def _take_job(self, body: bytes) -> None:
        try:
            dispatch = self.jobs_decoder.decode(body)
        except QntxError as exc:
            logger.warning("ignored an undecodable dispatch: {}", exc)
            return
        job = dispatch.job
        if job.handler == "builtin.echo" and self.execute is None:
            # Nothing to wait for: answered here, without a task.
            self._report(JobDone(job_id=job.id, lease=dispatch.lease, attempt=job.attempts, success=True, result=job.payload))
            return
        task = asyncio.get_running_loop().create_task(self._run(dispatch))
        self.running[dispatch.lease] = task
        self._not_started[dispatch.lease] = dispatch.job
        # Also when cancelled before it ever ran (then its body never runs).
        task.add_done_callback(lambda t, lease=dispatch.lease: self._forget(lease, t))

    def _forget(self, lease: int, task: asyncio.Task) -> None:
        if self.running.get(lease) is task:
            del self.running[lease]
        job = self._not_started.pop(lease, None)
        if job is not None:  # cancelled before it ever ran: still owed a report
            self._report(self._cancelled(job, lease))

    async def _run(self, dispatch: Dispatch) -> None:
        job, lease = dispatch.job, dispatch.lease
        self._not_started.pop(lease, None)
        try:
            with about_run(job.id, lease, job.handler, job.trace):
                if self.execute is not None:
                    done = await self.execute(dispatch)
                else:
                    done = await self._builtin(job, lease)
        except asyncio.CancelledError:
            done = self._cancelled(job, lease)
        except Exception as exc:  # never leave the server holding a slot for nothing
            logger.exception("job {} crashed in the worker", job.id)
            done = _failed(job, lease, f"worker error: {type(exc).__name__}: {exc}")
        finally:
            self.running.pop(lease, None)
        self._report(done)

    def _cancelled(self, job: Job, lease: int) -> JobDone:
        if self.stopping:  # not a failure: give it back to run again elsewhere
            return JobDone(job_id=job.id, lease=lease, attempt=job.attempts, success=False, interrupted=True)
        return _failed(job, lease, "cancelled")

    def _report(self, done: JobDone) -> None:
        body = encode(done)
        if len(done.result) > self.settings.max_result_bytes:
            message = f"result too large ({len(done.result)} bytes > max_result_bytes {self.settings.max_result_bytes})"
            body = encode(_failed_done(done, message))
        elif len(body) > self.settings.max_message_bytes:
            body = encode(_failed_done(done, f"report too large ({len(body)} bytes > {self.settings.max_message_bytes})"))
        self._remember(done.lease, body)
        self._push(body)

    def _remember(self, lease: int, body: bytes) -> None:
        now = time.monotonic()
        self._recent[lease] = (now, body)
        self._recent_bytes += len(body)
        while self._recent and (
            len(self._recent) > RECENT_RESULTS
            or self._recent_bytes > RECENT_RESULTS_BYTES
            or next(iter(self._recent.values()))[0] < now - RECENT_RESULTS_S
        ):
            self._recent_bytes -= len(self._recent.popitem(last=False)[1][1])

    def _resend_recent(self) -> None:
        """A (re)welcome: results the old server may have died with go again. Pulse
        takes each only if it is still its job's current run."""
        if self._recent and self.results is not None:
            logger.info("worker {}: sending the last {} result(s) again to a new server", self.name, len(self._recent))
            for _, body in self._recent.values():
                done = msgspec.msgpack.decode(body, type=JobDone)
                done.session = self.session  # its run may be one the new server has not seen claimed
                self._push(encode(done))

    def _push(self, body: bytes) -> None:
        if self.results is None:
            self._unsent.append(body)
            return
        try:
            self.results.send(body, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.warning("could not send a result to the server: {}", exc)

    async def _builtin(self, job: Job, lease: int) -> JobDone:
        try:
            result = await asyncio.wait_for(run_builtin(job), job.timeout_s)
        except TimeoutError:
            return _failed(job, lease, f"{TIMED_OUT} {job.timeout_s:g}s")
        except Exception as exc:
            return _failed(job, lease, f"{type(exc).__name__}: {exc}")
        return JobDone(job_id=job.id, lease=lease, attempt=job.attempts, success=True, result=result)


def given_back(job: Job, lease: int, why: str) -> JobDone:
    """The run did not happen through no fault of the handler: no attempt used."""
    return JobDone(job_id=job.id, lease=lease, attempt=job.attempts, success=False, interrupted=True, error=JobError(message=why))


def _failed(job: Job, lease: int, message: str) -> JobDone:
    return JobDone(job_id=job.id, lease=lease, attempt=job.attempts, success=False, error=JobError(message=message))


def _failed_done(done: JobDone, message: str) -> JobDone:
    """The same report as a failure (its result dropped, its logs kept)."""
    return msgspec.structs.replace(done, success=False, result=NIL, error=JobError(message=message))


def _refusal(body: bytes) -> ErrorReply | None:
    """The server's refusal of this session (an ErrorReply on the control socket), if ``body`` is one."""
    try:
        return msgspec.msgpack.decode(body, type=ErrorReply)
    except msgspec.DecodeError:  # (a ValidationError too)
        return None


def _ignore_result(future) -> None:
    # A send that failed after the socket closed has no one left to tell.
    if not future.cancelled():
        future.exception()


def run_worker(settings: Settings, name: str | None = None, capacity: int = 8, *, joined: bool = False) -> None:
    """``joined``: through ``settings.connect``'s server addresses, joined again when silent."""
    asyncio.run(Worker(settings, name, capacity, joined=joined).run())
