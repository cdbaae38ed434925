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

Sessions are admitted while they fit (``qntx.pulse.pipes``: the worker pool's
sockets, admission, who may report on a run). Dispatches and events go out at once;
replies that promise durability (a Submit's, a cancel's) wait for the commit that
holds their change (``qntx.pulse.commits``: group commits, on the loop or its writer
thread, and retention prunes). The shell reads the core only through the commands
it returns and its query methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
from loguru import logger

from qntx.bus.actor import Actor, Offloader, Request
from qntx.bus.codec import Decoder, encode, error_reply
from qntx.bus.security import HOST
from qntx.bus.service import answer
from qntx.errors import Invalid, NotFound, QntxError
from qntx.log import job_context
from qntx.obs.tally import BATCH_BOUNDS, COMMIT_BOUNDS, DURATION_BOUNDS, Buckets, ByLabel
from qntx.obs.trace import RunSpans
from qntx.protocol import (
    FINAL_STATUSES,
    JOB_STATUSES,
    MAX_PAGE,
    WORKER_ROLES,
    EndedJobs,
    EndedJobsReply,
    Job,
    JobChanged,
    JobList,
    JobOutput,
    JobProgress,
    JobProgressed,
    JobReply,
    JobStarted,
    JobUpdate,
    ListJobs,
    Progress,
    Submit,
    WaitJob,
    WorkerMessage,
    WorkerReady,
    WorkerResult,
)
from qntx.pulse.commands import (
    CancelAtPlugin,
    ClosePipe,
    Log,
    OpenPipe,
    Publish,
    Reply,
    SendControl,
    SendJob,
)
from qntx.pulse.commits import Commits
from qntx.pulse.core import Config, PulseCore, public
from qntx.pulse.directives import Directives
from qntx.pulse.events import (
    DirectivesSet,
    Instant,
    OutputWritten,
    Progressed,
    Started,
    Steer,
    Submitted,
    Turn,
    Undeliverable,
)
from qntx.pulse.jobstore import PulseStore, open_job_store
from qntx.pulse.ledger import STORED
from qntx.pulse.pipes import SessionPipes, jobs_endpoint_for
from qntx.pulse.rules import MAX_AFTER
from qntx.pulse.watch import JobWatch, notice
from qntx.settings import Settings, jobs_port_range
from qntx.values import is_int, now_ms

LIVE_STATUSES = ("queued", "dispatched", "running", "paused", "waiting")
# A final job whose result is bigger than this is announced to its waiters once its
# commit is on disk: the copy the answer encodes is then never made while the
# commit's own copy of the result exists (a big result costs the server at most
# twice its size at a time, not three or four times).
BIG_RESULT_BYTES = 1 << 20
# On a remote job store, submissions with an id the core does not know wait for one
# lookup per read pass; at most this many share one.
LOOKUP_BATCH = 256
# How often waiting requests are checked for their deadline (they are answered up to
# this much after it).
WAIT_CHECK_S = 0.1


def instant() -> Instant:
    return Instant(wall=now_ms(), mono=time.monotonic_ns() // 1_000_000)


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


class Pulse(Commits, SessionPipes):
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
        self.store: PulseStore = open_job_store(settings)
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
        self._looking: list[tuple[Submit, Request]] = []  # submissions waiting for their stored twin's lookup
        self._durable: list[Reply] = []  # replies waiting for the next commit
        self._held: list[SendJob] = []  # dispatches waiting for the next commit
        self._committing = False
        self._commits = 0  # commits started so far
        self._big_ended: list[tuple[int, Job]] = []  # (commits started before it ended, the job)
        self._closing = False
        self._lazy_timer = None
        self._retry_timer = None  # after a failed commit: the next try waits for it
        self._pipes: dict[bytes, tuple[zmq.Socket, str]] = {}
        self.jobs_ports = jobs_port_range(settings)  # tcp ports for the jobs pipes of other hosts' sessions
        self._next_port = self.jobs_ports.start if self.jobs_ports else 0
        # Observed for qntx.obs.metrics (the core counts what happened, in core.tally).
        self.waits, self.runs = ByLabel(DURATION_BOUNDS), ByLabel(DURATION_BOUNDS)
        self.commit_seconds, self.commit_rows = Buckets(COMMIT_BOUNDS), Buckets(BATCH_BOUNDS)
        self.spans = RunSpans()  # traced jobs only (qntx.obs.trace)
        self.refused_reports = 0  # results, progress and output from a sender that holds no such run
        self.watch = JobWatch(
            lambda job_id: self.get(job_id, payload=False), public, self.core.running_or_due, self._told_later
        )
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

    # ---------------------------------------------------------------- the core

    def apply(self, event: Any) -> None:
        """Feed one event to the core and carry out what it says (after the submissions
        still waiting for their lookup: they came first)."""
        if self._looking:
            self.settle_submits()
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
            message = command.message
            if type(message) is JobReply and message.job.payload is STORED:  # (a steer's reply)
                command = Reply(command.reply_to, JobReply(job=self._with_payload(message.job)), command.durable)
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

    def _told_later(self, job_id: str) -> bool:
        """Whether ``job_id`` ended with a big result that is told once its commit is done."""
        return any(job.id == job_id for _, job in self._big_ended)

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
            message = command.message
            if message.job.payload is STORED:  # a big payload the core let go: the store has it
                message = msgspec.structs.replace(message, job=self._with_payload(message.job))
            pipe[0].send(encode(message), zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            self.apply(Undeliverable(command.message.lease))
        except QntxError as exc:  # its payload could not be read back: the run's lease expires, and it retries
            logger.error("job {}: its payload could not be read back for lease {}: {}", command.message.job.id, command.message.lease, exc)

    def _with_payload(self, job: Job) -> Job:
        """``job`` with its payload: read back from the store if the core let it go
        (a big one, on disk since the job's first commit: ``qntx.pulse.ledger``)."""
        if job.payload is not STORED:
            return job
        stored = self.store.get(job.id)
        if stored is None:  # (a live job is never pruned)
            raise NotFound(f"job {job.id}: its payload is not in the store")
        return msgspec.structs.replace(job, payload=stored.job.payload)

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

    def close(self) -> None:
        self._closing = True
        self.writer.close()  # the commit in flight finishes and answers
        self._committing = False
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
        """A submission whose id (or key) the core does not know may name a stored job:
        on a local store it is looked up at once; on a remote one the lookups of a
        read pass go in one query (``settle_submits``), not a round trip each."""
        known = self.core.get(message.id) if message.id is not None else None
        # (a job that let its payload go is looked up too: a resubmission compares payloads)
        if (message.id is not None and (known is None or known.payload is STORED)) or message.idempotency_key is not None:
            if not self.store.local_reads:
                self._looking.append((message, request))
                if len(self._looking) >= LOOKUP_BATCH:
                    self.settle_submits()
                return
            stored = self.store.find(message.id, message.idempotency_key)
            self.apply(Submitted(message, request, stored.job if stored else None, self._ended(message.after)))
            return
        self.apply(Submitted(message, request, None, self._ended(message.after)))

    def settle_submits(self) -> None:
        """Apply the submissions waiting for their lookup, in the order they came. Runs
        before anything else reaches the core (``apply``) and before every other
        request is answered (the server's handlers), so no one sees them out of order."""
        looking, self._looking = self._looking, []
        if not looking:
            return
        try:
            found = self.store.find_many([(message.id, message.idempotency_key) for message, _ in looking])
        except QntxError as exc:  # the store is out of reach: each sender is told, nothing is taken
            for _, request in looking:
                request.reply(error_reply(exc))
            return
        for (message, request), stored in zip(looking, found, strict=True):
            existing = stored.job if stored is not None else None
            # (as a handler: a refusal, a conflict or an unknown handler, goes to its sender alone)
            answer(lambda m, r, e=existing: self.apply(Submitted(m, r, e, self._ended(m.after))), message, request)

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

    def get(self, job_id: str, *, payload: bool = True) -> Job:
        """A job's current record; ``payload=False``: one its reader strips anyway (a
        big payload the core let go is then not read back)."""
        job = self.core.get(job_id)
        if job is not None:
            return self._with_payload(job) if payload else job
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
