"""Pulse inside the server actor: the I/O around the core (``qntx.pulse.core``).

Owns the sockets of the worker pool and the job store:

* workers ROUTER (control, ``WorkerMessage``): each worker session's DEALER, whose
  routing id is its session id, so a reconnect is the same session. Hello and
  heartbeat (``WorkerReady``) come up; ``WorkerWelcome`` and ``CancelRunning`` go down.
* one PUSH per worker session (``WorkerJob``), bound when the session says hello;
  Pulse picks the session and never sends past its credit, so PUSH never has to
  choose and nothing waits behind a busy worker.
* results PULL (``WorkerResult``): the one sink every worker pushes ``JobDone`` and
  ``JobProgress`` into.

Each loop turn: the server hands it requests and messages (each becomes an event
for the core), then ``end_turn`` runs the core's ``Turn`` (expiry, liveness, dispatch)
after every pending message was read, and carries out the commands. The control
socket is paced (``Actor.add_reader``): heartbeats are read in batches of up to
``heartbeat_s / 20``, and read at once before a turn that may judge liveness.

Sessions are admitted while they fit. Each costs the server five open files (its
control connection; its jobs PUSH's mailbox, listener and connection; its results
connection) and one socket, so the room for sessions is worked out at start from
the open-file limit, what is open already and a reserve for everything else
(clients, plugins, the stores). A session past that, or whose jobs PUSH cannot be
bound (``EMFILE``, the socket limit), is refused: ``ErrorReply{unavailable}`` on the
control socket and one log line, and the bus serves the others as before. Dispatches and
events go out at once; replies that promise durability (a Submit's, a cancel's)
wait for the commit that holds their change. Commits run on a writer thread, one at
a time; whatever changes while one syncs goes into the next (group commit).
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from qntx.bus.actor import Actor, Offloader, Request, open_file_count, receive
from qntx.bus.codec import Decoder, encode, error_reply
from qntx.bus.security import HOST
from qntx.errors import Forbidden, Invalid, NotFound, QntxError, Unavailable, Unconfirmed
from qntx.log import job_context
from qntx.obs.tally import BATCH_BOUNDS, COMMIT_BOUNDS, DURATION_BOUNDS, Buckets, ByLabel, bump
from qntx.obs.trace import RunSpans
from qntx.protocol import (
    FINAL_STATUSES,
    JOB_STATUSES,
    MAX_PAGE,
    SESSION_ROLE,
    WORKER_ROLES,
    EndedJobs,
    EndedJobsReply,
    Job,
    JobChanged,
    JobDone,
    JobList,
    JobOutput,
    JobProgress,
    JobProgressed,
    JobStarted,
    JobUpdate,
    ListJobs,
    Progress,
    Submit,
    WaitJob,
    WorkerMessage,
    WorkerReady,
    WorkerResult,
    WorkerWelcome,
)
from qntx.pulse.core import Config, PrunePlan, PulseCore, public
from qntx.pulse.directives import Directives
from qntx.pulse.events import (
    CancelAtPlugin,
    Changes,
    ClosePipe,
    DirectivesSet,
    Finished,
    Instant,
    Log,
    OpenPipe,
    OutputWritten,
    Progressed,
    Publish,
    Reply,
    Saved,
    SendControl,
    SendJob,
    Started,
    Steer,
    Submitted,
    Turn,
    Undeliverable,
    WorkerSeen,
)
from qntx.pulse.jobstore import PRUNE_BATCH, JobStore
from qntx.pulse.rules import MAX_AFTER
from qntx.pulse.watch import JobWatch, notice
from qntx.settings import Settings, jobs_port_range
from qntx.values import is_int, now_ms

LIVE_STATUSES = ("queued", "dispatched", "running", "paused", "waiting")
DRAIN_LIMIT = 512
# Changes nobody waits for (a dispatch, a completion already published) are committed
# within this long, sharing one fsync with whatever else comes; a reply that promises
# durability starts a commit at once.
LAZY_COMMIT_S = 0.02
# Commits up to this size run on the loop; bigger ones on the writer thread, so the
# loop keeps answering while a big one syncs.
INLINE_COMMIT_ROWS = 2_000
# A final job whose result is bigger than this is announced to its waiters once its
# commit is on disk: the copy the answer encodes is then never made while the
# commit's own copy of the result exists (a big result costs the server at most
# twice its size at a time, not three or four times).
BIG_RESULT_BYTES = 1 << 20
INLINE_COMMIT_BYTES = 1 << 20
# How often waiting requests are checked for their deadline (they are answered up to
# this much after it).
WAIT_CHECK_S = 0.1
# What one worker session costs the server: its control connection, its jobs PUSH
# (mailbox, listener, connection) and its results connection.
FILES_PER_SESSION = 5
# Open files and sockets kept for everything but sessions: clients, plugins, the stores.
FILES_RESERVED = 64
SOCKETS_RESERVED = 64
FEW_SESSIONS = 8  # room for fewer than this is worth a warning at start
REFUSALS_REMEMBERED = 10_000  # sessions refused lately: each is logged once


def instant() -> Instant:
    return Instant(wall=now_ms(), mono=time.monotonic_ns() // 1_000_000)


def jobs_endpoint_for(workers_endpoint: str, session: bytes) -> str:
    """Where the jobs PUSH of one session binds: beside the workers endpoint."""
    if workers_endpoint.startswith("ipc://"):
        run_dir = Path(workers_endpoint[len("ipc://") :]).parent
        # Short: no longer than the other sockets' names, so it fits wherever they do.
        name = hashlib.blake2b(session, digest_size=4).hexdigest()
        return f"ipc://{run_dir}/j-{name}.sock"
    scheme, _, rest = workers_endpoint.partition("://")
    host = rest.rsplit(":", 1)[0]
    return f"{scheme}://{host}:*"  # a free port; the welcome says which


def _cursor(created_at: int, seq: int) -> str:
    return f"{created_at}.{seq}"


def _parse_cursor(cursor: str | None) -> tuple[int, int] | None:
    if cursor is None:
        return None
    try:
        created, seq = (int(part) for part in cursor.split("."))
    except (ValueError, AttributeError):
        raise Invalid(f"not a page cursor: {cursor!r}") from None
    if not (0 <= created < 2**64 and 0 <= seq < 2**64):
        raise Invalid(f"not a page cursor: {cursor!r}")
    return created, seq


class Pulse:
    def __init__(
        self,
        actor: Actor,
        settings: Settings,
        *,
        publish: Callable[[bytes, Any], None],
        cancel_at_plugin: Callable[[str, str, int], None],
    ):
        self.actor = actor
        self.settings = settings
        self._publish = publish
        self._cancel_at_plugin = cancel_at_plugin
        self.store = JobStore(settings.pulse_path)
        loaded = self.store.load(LIVE_STATUSES)
        config = Config(
            dead_after_ms=int(settings.heartbeat_s * 3000),
            adopt_grace_ms=max(5_000, int(settings.heartbeat_s * 5000)),
            max_payload_bytes=settings.max_payload_bytes,
            keep_completed_ms=int(settings.keep_completed_s * 1000),
            keep_failed_ms=int(settings.keep_failed_s * 1000),
            keep_completed_max=settings.keep_completed_max,
        )
        self.core = PulseCore(config, instant())
        live = {s.job.id for s in loaded.jobs}
        after = {dep for s in loaded.jobs if s.job.status == "waiting" for dep in s.job.after if dep not in live}
        self.core.restore(
            [(s.seq, s.job) for s in loaded.jobs], loaded.next_seq, loaded.counts, loaded.lease_ceiling, instant(),
            plugins=loaded.plugins, ended=self.store.statuses(after), schedules=loaded.schedules, limits=loaded.limits,
            handler_versions=loaded.handler_versions,
        )  # fmt: skip
        self._durable: list[Reply] = []  # replies waiting for the next commit
        self._held: list[SendJob] = []  # dispatches waiting for the next commit
        self._committing = False
        self._commits = 0  # commits started so far
        self._big_ended: list[tuple[int, Job]] = []  # (commits started before it ended, the job)
        self._closing = False
        self._lazy_timer = None
        self._pipes: dict[bytes, tuple[zmq.Socket, str]] = {}
        self.jobs_ports = jobs_port_range(settings)  # tcp ports for the jobs pipes of other hosts' sessions
        self._next_port = self.jobs_ports.start if self.jobs_ports else 0
        # Observed for qntx.obs.metrics (the core counts what happened, in core.tally).
        self.waits, self.runs = ByLabel(DURATION_BOUNDS), ByLabel(DURATION_BOUNDS)
        self.commit_seconds, self.commit_rows = Buckets(COMMIT_BOUNDS), Buckets(BATCH_BOUNDS)
        self.spans = RunSpans()  # traced jobs only (qntx.obs.trace)
        self.refused_reports = 0  # results, progress and output from a sender that holds no such run
        self.watch = JobWatch(self.get, public, self.core.running_or_due)
        actor.every(WAIT_CHECK_S, lambda: self.watch.expire(time.monotonic()))
        self._refused: dict[bytes, None] = {}  # sessions refused lately, oldest first
        self.refusals = 0  # hellos refused since start
        self._commit_now()  # reserves the first block of lease ids before any dispatch
        self.writer = Offloader(actor, "pulse-writer")
        self.control = actor.serve(
            settings.workers_endpoint, WorkerMessage, {WorkerReady: self.on_worker_ready}, handover=True,
            roles=WORKER_ROLES, also=settings.public("workers_endpoint"), pace_s=settings.heartbeat_s / 20,
        )  # fmt: skip
        # tcp sessions: session id -> (the name of the key that opened it, its role, its host).
        self.owners: dict[bytes, tuple[str, str, str]] = {}
        self.host_key = HOST  # this host's own key name (qntx.bus.security)
        results = settings.results_endpoint
        if results.startswith("ipc://") and not settings.workers_endpoint.startswith("ipc://"):
            results = jobs_endpoint_for(settings.workers_endpoint, b"")  # remote workers must reach it
        self.results = actor.bind(zmq.PULL, results)
        self.results_endpoint = self.results.getsockopt_string(zmq.LAST_ENDPOINT)
        self.public_results_endpoint = settings.public("results_endpoint")  # for sessions on other hosts
        if self.public_results_endpoint:
            settings.security.bind(self.results, self.public_results_endpoint)
        self._results_decoder = Decoder(WorkerResult)
        actor.add_reader(self.results, self.on_results)
        self._wakeup_at: int | None = None
        self._wakeup_timer = None
        self._clean_stale_pipes()
        self.session_room = self._room_for_sessions()

    def _room_for_sessions(self) -> int:
        """How many worker sessions fit in this process's open files and sockets."""
        limit = self.actor.open_file_limit
        reserve = max(FILES_RESERVED, limit // 20)
        by_files = (limit - open_file_count() - reserve) // FILES_PER_SESSION
        by_sockets = self.actor.max_sockets - SOCKETS_RESERVED
        room = max(0, min(by_files, by_sockets))
        level = "INFO" if room >= FEW_SESSIONS else "WARNING"  # then the hard limit wants raising (ulimit -Hn)
        logger.log(
            level, "room for {} worker sessions (open-file limit {}, {} files each; socket limit {})",
            room, limit, FILES_PER_SESSION, self.actor.max_sockets,
        )  # fmt: skip
        return room

    @property
    def sessions_free(self) -> int:
        """How many more worker sessions fit."""
        return max(0, self.session_room - len(self._pipes))

    # ---------------------------------------------------------------- the core

    def apply(self, event: Any) -> None:
        """Feed one event to the core and carry out what it says."""
        for command in self.core.handle(event, instant()):
            self._carry_out(command)

    def _carry_out(self, command: Any) -> None:
        kind = type(command)
        if kind is SendJob:
            try:
                self._observe_dispatch(command.message)
            except Exception:  # what is observed never costs the dispatch itself
                logger.exception("observing a dispatch failed")
            if command.durable:
                self._held.append(command)  # sent once the commit holding its run is on disk
            else:
                self._send_job(command)
        elif kind is Publish:
            self._announce(command.topic, command.message)
        elif kind is Reply:
            if command.durable:
                self._durable.append(command)
            else:
                command.reply_to.reply(command.message)
        elif kind is SendControl:
            self.control.send_to(command.session, command.message)
        elif kind is CancelAtPlugin:
            self._cancel_at_plugin(command.plugin, command.job_id, command.lease)
        elif kind is OpenPipe:
            self._open_pipe(command.session)
        elif kind is ClosePipe:
            self._close_pipe(command.session)
        elif kind is Log:
            job = command.job
            if job is None:
                logger.log(command.level, command.text)
            else:
                logger.bind(**job_context(job.id, job.lease, job.handler, job.trace)).log(command.level, command.text)
        else:  # pragma: no cover - a command without a carrier is a bug
            raise TypeError(f"unknown command {command!r}")

    def _observe_dispatch(self, dispatch: Any) -> None:
        """Queue wait (from submitted or due to this dispatch) and, if traced, its spans."""
        job = dispatch.job
        dispatched_at = job.started_at or now_ms()  # (a plugin's job has no start until its code runs)
        self.waits[job.handler].observe(max(0, dispatched_at - max(job.created_at, job.run_after)) / 1000)
        if job.trace is not None:
            self.spans.dispatched(dispatch, dispatched_at)

    def _announce(self, topic: bytes, message: Any) -> None:
        """Results, output and progress go to who waits for that job (``JobWatch``);
        the events socket gets a notice of each change."""
        kind = type(message)
        if kind is JobChanged:
            job = message.job
            if job.status in FINAL_STATUSES and len(job.result) > BIG_RESULT_BYTES:
                self._big_ended.append((self._commits, job))  # told once the next commit is done
            else:
                self.watch.changed(job)
            self._publish(topic, lambda: notice(job))  # built only if someone subscribed
        elif kind is JobProgressed:
            job = self.core.get(message.job_id)
            if job is not None:
                self.watch.progressed(job, Progress(current=message.current, total=message.total))
        elif kind is JobOutput:
            job = self.core.get(message.job_id)
            if job is not None:
                self.watch.wrote(job, message)
        else:
            self._publish(topic, message)

    def wait(self, message: WaitJob, request: Request) -> JobUpdate | None:
        return self.watch.wait(message, request, time.monotonic())

    def ended(self, message: EndedJobs, request: Request) -> EndedJobsReply | None:
        if not isinstance(message.ids, list) or len(message.ids) > MAX_PAGE:
            raise Invalid(f"EndedJobs takes at most {MAX_PAGE} ids")
        wait_ms = message.wait_ms if isinstance(message.wait_ms, int) else 0
        # (Raws in place of Jobs in the reply: the same bytes)
        return self.watch.ended_or_wait(message.ids, wait_ms, request, time.monotonic())

    def _send_job(self, command: SendJob) -> None:
        pipe = self._pipes.get(command.session)
        try:
            if pipe is None:
                raise zmq.Again()
            pipe[0].send(encode(command.message), zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            self.apply(Undeliverable(command.message.lease))

    def _release_held(self, held: list[SendJob]) -> None:
        for command in held:
            message = command.message
            current, session = self.core.lease_holder(message.lease, message.job.id)
            if current and session == command.session:  # not cancelled or taken back meanwhile
                self._send_job(command)

    def end_turn(self) -> None:
        """After every pending message was read: expire, reap, dispatch; then commit."""
        if self.core.liveness_due(instant()):  # a resting heartbeat must count first
            self.actor.read_now(self.control.socket)
        self.apply(Turn())
        self.watch.flush()
        self._start_commit()
        self._arm_wakeup()

    # ---------------------------------------------------------------- commits

    def _commit_now(self) -> None:
        changes = self.core.changes()
        if changes is not None:
            self._commits += 1
            self.store.save(changes)
            self.apply(Saved(changes.versions, changes.lease_ceiling))
        self._tell_big_ended(self._commits)

    def _tell_big_ended(self, committed: int) -> None:
        """Announce the big final jobs whose commit (number ``committed`` or earlier) is
        on disk, unless they changed again meanwhile (the newer state is told then)."""
        if not self._big_ended:
            return
        later = []
        for before, job in self._big_ended:
            if before >= committed:
                later.append((before, job))
                continue
            current = self.core.get(job.id)
            if current is None or (current.status, current.attempts) == (job.status, job.attempts):
                self.watch.changed(job)
        self._big_ended = later

    def _start_commit(self, *, lazy_ok: bool = True) -> None:
        if self._committing or self._closing:
            return
        if lazy_ok and not self._durable and not self._held and not self.core.urgent:
            if self._lazy_timer is None and self.core.has_changes():
                self._lazy_timer = self.actor.call_later(LAZY_COMMIT_S, self._lazy_commit)
            return
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        changes = self.core.changes()
        if changes is None:
            # Nothing new to write: what they wait for is on disk.
            replies, self._durable, held, self._held = self._durable, [], self._held, []
            for reply in replies:
                reply.reply_to.reply(reply.message)
            self._release_held(held)
            self._tell_big_ended(self._commits + 1)
            return
        replies, self._durable, held, self._held = self._durable, [], self._held, []
        self._committing = True
        self._commits += 1
        number = self._commits
        save = self.store.save
        took = [0.0]

        def work() -> None:
            began = time.perf_counter()
            save(changes)
            took[0] = time.perf_counter() - began

        def done(outcome: Any) -> None:
            self._committing = False
            if isinstance(outcome, BaseException):
                logger.opt(exception=outcome).error("pulse commit of {} jobs failed", len(changes.rows))
                self.core.commit_failed()
                for reply in replies:
                    # The change may already be under way (a job dispatched before its
                    # commit) and goes with the next commit that succeeds: not known yet.
                    reply.reply_to.fail(Unconfirmed(f"{outcome}; the change is not confirmed yet: ask again"))
                self._held = held + self._held  # they go with the next commit that succeeds
            else:
                self.commit_seconds.observe(took[0])
                self.commit_rows.observe(len(changes.rows))
                self.apply(Saved(changes.versions, changes.lease_ceiling))
                for reply in replies:
                    reply.reply_to.reply(reply.message)
                self._release_held(held)
                self._tell_big_ended(number)
            self._start_commit()  # what changed meanwhile goes next

        if self._small(changes):
            # On the loop: handing a small commit to the writer thread and back costs
            # more than it saves. Messages that arrive meanwhile wait in their sockets
            # and go into the next commit together.
            try:
                work()
            except Exception as exc:  # handed to done(), which decides
                done(exc)
            else:
                done(None)
        else:
            self.writer.submit(work, done)

    @staticmethod
    def _small(changes: Changes) -> bool:
        if len(changes.rows) > INLINE_COMMIT_ROWS:
            return False
        carried = sum(len(job.payload) + len(job.result) for _, job, _ in changes.rows)
        return carried <= INLINE_COMMIT_BYTES

    def _lazy_commit(self) -> None:
        self._lazy_timer = None
        self._start_commit(lazy_ok=False)

    def close(self) -> None:
        self._closing = True
        self.writer.close()  # the commit in flight finishes and answers
        self._committing = False
        self._commits = 0  # commits started so far
        self._big_ended: list[tuple[int, Job]] = []  # (commits started before it ended, the job)
        self._closing = False
        try:
            self._commit_now()
            for reply in self._durable:
                reply.reply_to.reply(reply.message)
        finally:
            # Held dispatches are not sent: their runs are on disk as running, and
            # the next server gives back what no worker claims.
            self._durable, self._held = [], []
            for session in list(self._pipes):
                self._close_pipe(session)
            self.store.close()

    # ---------------------------------------------------------------- worker sockets

    def on_worker_ready(self, message: WorkerReady, request: Request) -> None:
        if request.peer is not None:  # over tcp (ipc peers are this host's user)
            self._check_owner(message, request)
        if not self.core.has_session(request.identity) and not self._admit(request.identity, message):
            return
        pipe = self._pipes.get(request.identity)
        ready = pipe is not None and bool(message.jobs_endpoint) and message.jobs_endpoint == pipe[1]
        self.apply(WorkerSeen(request.identity, message, ready))

    def _check_owner(self, message: WorkerReady, request: Request) -> None:
        """Over tcp a session belongs to the key that opened it, and a plain worker
        session needs role ``worker``, a plugin's own session role ``plugin``."""
        role = SESSION_ROLE[bool(message.plugin)]
        held = self.control.gate.roles(request.peer)  # (a revoked key never gets here)
        if role not in held and "admin" not in held:
            logger.warning("refused a {} session from key {}: it has no role {}", role, request.peer, role)
            raise Forbidden(f"a {role} session needs role {role}; key {request.peer!r} has {', '.join(sorted(held))}")
        owner = self.owners.get(request.identity)
        if owner is not None and owner[0] != request.peer:
            logger.warning("refused key {}: session {} belongs to key {}", request.peer, message.session, owner[0])
            raise Forbidden(f"session {message.session!r} belongs to another key")
        self.owners[request.identity] = (request.peer, role, message.host)

    def on_results(self) -> None:
        curve = self.control.gate.curve
        for _ in range(DRAIN_LIMIT):
            try:
                (body,), peer = receive(self.results, curve, zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                logger.warning("dropped a multipart message on the results pipe")
                continue
            if peer is not None and not self.control.gate.roles(peer) & WORKER_ROLES[WorkerReady]:
                logger.warning("dropped a result from key {}: it has no worker or plugin role", peer)
                continue
            if len(body) > self.settings.max_message_bytes:
                bump(self.actor.refused, "too_large")
                logger.warning("dropped a result of {} bytes (limit {})", len(body), self.settings.max_message_bytes)
                continue
            try:
                message = self._results_decoder.decode(body)
            except QntxError as exc:
                logger.warning("dropped an undecodable message on the results pipe: {}", exc)
                continue
            if not self.holds_lease(peer, message):
                continue
            if isinstance(message, JobDone):
                run = self.core.run_started_at(message.job_id, message.lease)
                if run is not None:
                    self.runs[run[0]].observe(max(0, now_ms() - run[1]) / 1000)
                if self.spans.open:
                    self.spans.finished(message.lease, message.success, message.error.message if message.error else "")
                self.apply(Finished(message))
            elif isinstance(message, JobProgress):
                self.apply(Progressed(message))

    def holds_lease(self, peer: str | None, message: JobDone | JobProgress | JobOutput | JobStarted) -> bool:
        """Whether ``peer`` (a key's name over tcp, None over ipc) may report on the run
        ``message`` names: only the key that opened the session holding its lease, and
        only through the kind of endpoint that session came in on. Anything else, and a
        message without a lease, is discarded, counted and logged. A lease Pulse no
        longer has goes on to the core, which discards it as stale."""
        if message.lease:
            current, session = self.core.lease_holder(message.lease, message.job_id)
            if not current:
                return True  # not a current run: the core discards it (and frees a taken-back slot)
            # (a lease left by a crashed server, not claimed yet: this host's only)
            owner = self.owners[session][0] if session is not None and session in self.owners else None
            if owner == peer:
                return True
        self.refused_reports += 1
        kind = type(message).__name__
        if not message.lease:
            logger.warning("discarded a {} for job {} without a lease (from {})", kind, message.job_id, peer or "this host")
        else:
            logger.warning(
                "discarded a {} for job {} lease {} from {}: another session holds that run",
                kind, message.job_id, message.lease, f"key {peer}" if peer else "this host",
            )  # fmt: skip
        return False

    def _admit(self, session: bytes, message: WorkerReady) -> bool:
        """Bind a new session's jobs PUSH if it fits; else refuse it (False). A worker
        that restarted takes its old session's place, so it always fits."""
        if self.sessions_free > 0 or self.core.session_named(message.worker) is not None:
            try:
                self._bind_pipe(session)
            except zmq.ZMQError as exc:  # EMFILE, ENFILE, the socket limit
                reason = f"the server cannot open its jobs pipe: {exc.strerror}"
            else:
                self._refused.pop(session, None)
                return True
        else:
            reason = (
                f"no room for another worker session: {len(self._pipes)} fill the server's "
                f"open-file limit of {self.actor.open_file_limit}"
            )
        self.refusals += 1
        self.owners.pop(session, None)
        if session not in self._refused:  # logged once, not at every hello
            self._refused[session] = None
            if len(self._refused) > REFUSALS_REMEMBERED:
                del self._refused[next(iter(self._refused))]
            logger.warning("refused worker {} (pid {}): {}", message.worker, message.pid, reason)
        # Told every time: a worker that hung up and came back must hear it again.
        self.control.send_to(session, error_reply(Unavailable(reason)))
        return False

    def _bind_pipe(self, session: bytes) -> None:
        if session not in self._pipes:
            owner = self.owners.get(session)
            if owner is not None and self.settings.bind:  # a session from another host
                endpoint = jobs_endpoint_for(self.settings.public("workers_endpoint"), session)
            else:
                endpoint = jobs_endpoint_for(self.settings.workers_endpoint, session)
            # Over tcp only the session's own key may connect to its jobs pipe.
            sock = self._bind_push(endpoint, only=owner[0] if owner else None)
            sock.setsockopt(zmq.SNDHWM, 0)  # credit bounds what is queued, not the HWM
            bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._pipes[session] = (sock, bound)
            if owner is not None:
                logger.info("session {!r} of key {} gets its jobs pipe at {}", session.decode(errors="replace"), owner[0], bound)

    def _bind_push(self, endpoint: str, only: str | None) -> zmq.Socket:
        """A jobs PUSH on ``endpoint``; a tcp one takes the first free port of the
        ``jobs_ports`` range (so a firewall opens one known range), or any free port
        when no range is set."""
        if not endpoint.endswith(":*") or not self.jobs_ports:
            return self.actor.bind(zmq.PUSH, endpoint, only=only)
        base = endpoint[: -len("*")]
        for port in self._ports_from(self._next_port):
            try:
                sock = self.actor.bind(zmq.PUSH, f"{base}{port}", only=only)
            except zmq.ZMQError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self._next_port = port + 1
            return sock
        raise zmq.ZMQError(errno.EADDRINUSE, f"every port of jobs_ports {self.settings.jobs_ports or 'range'} is in use")

    def _ports_from(self, start: int):
        """The range's ports, starting at ``start`` and wrapping around."""
        ports = self.jobs_ports
        first = max(ports.start, min(start, ports.stop - 1)) if ports else 0
        return [*range(first, ports.stop), *range(ports.start, first)]

    def _open_pipe(self, session: bytes) -> None:
        self._bind_pipe(session)  # bound already when the session was admitted
        remote = session in self.owners and self.public_results_endpoint
        results = self.public_results_endpoint if remote else self.results_endpoint
        welcome = WorkerWelcome(jobs_endpoint=self._pipes[session][1], results_endpoint=results)
        self.control.send_to(session, welcome)

    def _close_pipe(self, session: bytes) -> None:
        self.owners.pop(session, None)
        pipe = self._pipes.pop(session, None)
        if pipe is None:
            return
        pipe[0].close(0)
        if pipe[1].startswith("ipc://"):
            Path(pipe[1][len("ipc://") :]).unlink(missing_ok=True)

    def _clean_stale_pipes(self) -> None:
        if self.settings.workers_endpoint.startswith("ipc://"):
            run_dir = Path(self.settings.workers_endpoint[len("ipc://") :]).parent
            for stale in run_dir.glob("j-*.sock"):
                stale.unlink(missing_ok=True)

    def _arm_wakeup(self) -> None:
        """One timer for the next backoff end, lease deadline or liveness check: the
        loop wakes for it (and runs a turn); there is no polling tick. A later time
        leaves an earlier timer in place: it fires, and the turn after it re-arms."""
        now = instant()
        at = self.core.next_wakeup(now)
        if at is None or (self._wakeup_timer is not None and self._wakeup_at <= at):
            return
        if self._wakeup_timer is not None:
            self._wakeup_timer.cancel()
        self._wakeup_at = at
        self._wakeup_timer = self.actor.call_later(max(0.0, (at - now.mono) / 1000) + 0.001, self._woken)

    def _woken(self) -> None:
        self._wakeup_timer = self._wakeup_at = None  # the turn after this timer re-arms

    # ---------------------------------------------------------------- requests

    def submit(self, message: Submit, request: Request) -> None:
        existing = None
        if (message.id is not None and self.core.get(message.id) is None) or message.idempotency_key is not None:
            stored = self.store.find(message.id, message.idempotency_key)
            existing = stored.job if stored is not None else None
        self.apply(Submitted(message, request, existing, self._ended(message.after)))

    def _ended(self, after: Any) -> dict[str, str]:
        """The stored status of the jobs in ``after`` that are not live (the core knows those)."""
        if not isinstance(after, list) or len(after) > MAX_AFTER:
            return {}  # the core refuses it
        return self.store.statuses(i for i in after if isinstance(i, str) and self.core.get(i) is None)

    def steer(self, action: str, job_id: str, request: Request, *, latest: bool = False, brief: bool = False) -> None:
        stored_seq, stored = 0, None
        job = self.core.get(job_id)
        if job is None:
            found = self.store.get(job_id)
            if found is not None:
                stored_seq, stored = found.seq, found.job
                job = stored
        ended = self._ended(job.after) if action == "retry" and job is not None else {}
        self.apply(Steer(action, job_id, request, stored, stored_seq, latest, ended, brief))

    def prune(self, older_than_ms: int | None = None, done: Callable[[dict[str, int]], None] | None = None) -> None:
        """Delete finished jobs past their retention (or older than ``older_than_ms``),
        a small transaction at a time on the writer thread, until none is left;
        ``done`` gets the counts deleted per status."""
        total = dict.fromkeys(FINAL_STATUSES, 0)

        def batch(plan: PrunePlan) -> dict[str, list[str]]:
            return self.store.prune(plan.cutoffs, max_completed=plan.max_completed, keep=plan.keep)

        def after(outcome: Any) -> None:
            if isinstance(outcome, BaseException):
                logger.warning("pruning finished jobs failed: {}", outcome)
                self.core.pruned({})
                deleted = {}
            else:
                self.core.pruned(outcome)  # counts out only what no retry took back meanwhile
                deleted = {status: len(ids) for status, ids in outcome.items()}
                for status, count in deleted.items():
                    total[status] += count
            if sum(deleted.values()) >= PRUNE_BATCH and not self._closing:
                plan = self.core.prune_plan(now_ms(), older_than_ms)  # more to go: the next small transaction
                self.writer.submit(lambda: batch(plan), after)
                return
            if any(total.values()):
                logger.info("pruned {} finished job(s): {}", sum(total.values()), ", ".join(f"{k} {v}" for k, v in total.items() if v))
            if done is not None:
                done(total)

        plan = self.core.prune_plan(now_ms(), older_than_ms)
        self.writer.submit(lambda: batch(plan), after)

    def set_directives(self, directives: Directives) -> None:
        """The limits and schedules now in ATS (all of them)."""
        self.apply(DirectivesSet(directives.limits, directives.schedules))

    def progress(self, message: JobProgress, peer: str | None) -> None:
        if self.holds_lease(peer, message):
            self.apply(Progressed(message))

    def started(self, message: JobStarted, peer: str | None) -> None:
        if self.holds_lease(peer, message):
            self.apply(Started(message))

    def output(self, message: JobOutput, peer: str | None) -> None:
        if self.holds_lease(peer, message):
            self.apply(OutputWritten(message))

    def get(self, job_id: str) -> Job:
        job = self.core.get(job_id)
        if job is not None:
            return job
        stored = self.store.get(job_id)
        if stored is None:
            raise NotFound(f"no job {job_id}")
        return stored.job

    def dependents(self, job_id: str) -> list[str]:
        """The jobs that run after ``job_id``: those waiting for it now and those stored."""
        return sorted({*self.core.dependents(job_id), *self.store.dependents(job_id)})

    def list_jobs(self, message: ListJobs) -> JobList:
        """A page of jobs, newest first, at most MAX_PAGE of them; without payloads."""
        status, limit = message.status, message.limit
        if status is not None and status not in JOB_STATUSES:
            raise Invalid(f"status must be one of {', '.join(JOB_STATUSES)}, got {status!r}")
        if not is_int(limit) or limit < 1:
            raise Invalid(f"limit must be an integer >= 1, got {limit!r}")
        limit = min(limit, MAX_PAGE)
        before = _parse_cursor(message.cursor)
        unsaved = self.core.unsaved()
        found = [
            (job.created_at, self.core.seq_of(job.id), job)
            for job in unsaved.values()
            if (status is None or job.status == status)
            and (before is None or (job.created_at, self.core.seq_of(job.id)) < before)
        ]
        found += self.store.newest(status, limit, before=before, skip=unsaved, cached=self.core.live_jobs())
        found.sort(key=lambda row: row[:2], reverse=True)
        page = found[:limit]
        cursor = _cursor(*page[-1][:2]) if len(page) == limit else None
        return JobList(jobs=[public(job) for _, _, job in page], cursor=cursor)
