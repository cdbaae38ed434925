"""The worker pool's sockets on the server side: sessions admitted while they fit,
one jobs PUSH bound per session, results read from the one PULL.

Part of ``Pulse`` (``qntx.pulse.shell``). Each session costs the server five open
files (its control connection; its jobs PUSH's mailbox, listener and connection; its
results connection), so the room for sessions is worked out at start from the
open-file limit. A session past that, or whose jobs PUSH cannot be bound, is refused
(``ErrorReply{unavailable}`` on the control socket). Over tcp a session belongs to the
key that opened it, and only that key may report on its runs (``holds_lease``).
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
from loguru import logger

from qntx.bus.actor import Request, open_file_count, receive
from qntx.bus.codec import error_reply
from qntx.errors import Forbidden, QntxError, Unavailable
from qntx.obs.tally import bump
from qntx.protocol import (
    SESSION_ROLE,
    WORKER_ROLES,
    JobDone,
    JobOutput,
    JobProgress,
    JobStarted,
    WorkerReady,
    WorkerWelcome,
)
from qntx.pulse.events import Finished, Progressed, RunClaimed, WorkerSeen
from qntx.values import now_ms

if TYPE_CHECKING:
    from qntx.pulse.shell import Pulse as _Pulse
else:
    _Pulse = object

DRAIN_LIMIT = 512
# What one worker session costs the server: its control connection, its jobs PUSH
# (mailbox, listener, connection) and its results connection.
FILES_PER_SESSION = 5
# Open files and sockets kept for everything but sessions: clients, plugins, the stores.
FILES_RESERVED = 64
SOCKETS_RESERVED = 64
FEW_SESSIONS = 8  # room for fewer than this is worth a warning at start
REFUSALS_REMEMBERED = 10_000  # sessions refused lately: each is logged once


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


class SessionPipes(_Pulse):
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
            if session is None and type(message) is JobDone and message.session:
                # A result sent again to a server that took over, naming the session
                # that ran it: a lease nobody claimed yet is that session's, if it
                # is the sender's own.
                claimant = message.session.encode()
                if self.core.session_known(claimant) and self._owner_key(claimant) == peer:
                    self.apply(RunClaimed(claimant, message.lease))
                    current, session = self.core.lease_holder(message.lease, message.job_id)
            # (a lease left by a crashed server, not claimed yet: this host's only)
            if self._owner_key(session) == peer:
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

    def _owner_key(self, session: bytes | None) -> str | None:
        """The name of the key that opened ``session`` (None: this host's, or none)."""
        return self.owners[session][0] if session is not None and session in self.owners else None

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

