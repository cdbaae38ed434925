"""Many worker sessions from one process: the worker protocol (PROTOCOL §5.4), lean.

Each session is what a real worker is to the server: a DEALER on the control socket
whose ROUTING_ID is its session id, sending ``WorkerReady`` at once and then every
heartbeat; on ``WorkerWelcome`` a PULL on its own jobs pipe and a PUSH into the
results pipe; once connected, heartbeats that carry the welcome's ``jobs_endpoint``;
``builtin.echo`` jobs answered with a ``JobDone`` carrying the payload (anything
else fails). An ``ErrorReply`` on the control socket is the server refusing the
session: it closes its control connection (which holds one of the server's open
files) and says hello again after ``REJOIN_S``.

One thread serves every socket through an epoll selector on the sockets' file
descriptors (a ZeroMQ poll over thousands of sockets would cost more per turn than
the server), so a thousand sessions cost the swarm little and the figures measured
beside it are the server's.

``python -m bench.swarm_sessions --workers ENDPOINT --sessions N --stats FILE`` runs
until SIGTERM/SIGINT and rewrites FILE (JSON: sessions, welcomed, ready, refused,
jobs, cpu_s) a few times a second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import selectors
import signal
import sys
import time
from pathlib import Path

import msgspec
import zmq

from qntx.bus.codec import encode
from qntx.protocol import JobDone, JobError, WorkerReady

TICKS = 50  # heartbeats are spread over this many slices of a heartbeat period
CONNECT_S = 0.05  # after a welcome, how long before a session says it is connected
REJOIN_S = 5.0  # how long a refused session waits before it says hello again


class _Job(msgspec.Struct):
    id: str
    handler: str
    payload: msgspec.Raw = msgspec.Raw(b"\xc0")


class _Dispatch(msgspec.Struct):  # the fields of Dispatch a swarm session reads
    lease: int
    job: _Job


class _Control(msgspec.Struct):  # WorkerWelcome, CancelRunning or ErrorReply
    type: str
    jobs_endpoint: str = ""
    results_endpoint: str = ""
    message: str = ""


class Session:
    __slots__ = ("id", "name", "control", "jobs", "results", "target", "jobs_endpoint", "welcomed_at", "refused", "rejoin_at")

    def __init__(self, name: str):
        self.name = name
        self.id = f"{name}:{os.getpid()}:{secrets.token_hex(4)}"
        self.control: zmq.Socket | None = None
        self.jobs: zmq.Socket | None = None
        self.results: zmq.Socket | None = None
        self.target = ""  # the jobs endpoint its PULL connects to
        self.jobs_endpoint = ""  # the same, once connected: its heartbeats carry it
        self.welcomed_at: float | None = None
        self.refused = False  # the server's last word was a refusal
        self.rejoin_at: float | None = None  # refused: when to say hello again


class Swarm:
    def __init__(self, workers_endpoint: str, sessions: int, credit: int = 1, heartbeat_s: float = 1.0, prefix: str = "swarm"):
        _raise_open_files()
        self.context = zmq.Context()
        self.context.set(zmq.MAX_SOCKETS, min(self.context.get(zmq.SOCKET_LIMIT), resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        self.endpoint = workers_endpoint
        self.credit = credit
        self.heartbeat_s = heartbeat_s
        self.selector = selectors.DefaultSelector()
        self.sessions = [Session(f"{prefix}-{n:05}") for n in range(sessions)]
        self.jobs_done = 0
        self._connecting: list[Session] = []  # welcomed, PULL connecting
        self._dispatch = msgspec.msgpack.Decoder(_Dispatch)
        self._control = msgspec.msgpack.Decoder(_Control)

    # ------------------------------------------------------------ the protocol

    def join(self, session: Session) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, session.id.encode())
        sock.connect(self.endpoint)
        session.control = sock
        session.rejoin_at = None
        self.selector.register(sock.FD, selectors.EVENT_READ, (session, sock))
        self.hello(session)

    def _refused(self, session: Session) -> None:
        session.refused = True
        self.selector.unregister(session.control.FD)
        session.control.close(0)
        session.control = None
        session.rejoin_at = time.monotonic() + REJOIN_S

    def hello(self, session: Session) -> None:
        if session.control is None:
            if session.rejoin_at is not None and time.monotonic() >= session.rejoin_at:
                self.join(session)
            return
        body = WorkerReady(
            worker=session.name, credit=self.credit, pid=os.getpid(), session=session.id,
            jobs_endpoint=session.jobs_endpoint,
        )  # fmt: skip
        try:
            session.control.send_multipart([b"", encode(body)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet: the next heartbeat says it again
        # A send can take the socket's wakeup with it: read what is there now.
        self._drain(session, session.control)

    def _welcomed(self, session: Session, welcome: _Control) -> None:
        if session.jobs is not None:
            if welcome.jobs_endpoint == session.target:
                return  # welcomed again (a restarted server): the same pipe
            self._close_pipes(session)
        session.refused = False
        session.results = self.context.socket(zmq.PUSH)
        session.results.setsockopt(zmq.LINGER, 0)
        session.results.setsockopt(zmq.SNDHWM, 0)
        session.results.connect(welcome.results_endpoint)
        session.jobs = self.context.socket(zmq.PULL)
        session.jobs.setsockopt(zmq.LINGER, 0)
        session.jobs.connect(welcome.jobs_endpoint)
        self.selector.register(session.jobs.FD, selectors.EVENT_READ, (session, session.jobs))
        session.target = welcome.jobs_endpoint
        session.welcomed_at = time.monotonic()
        self._connecting.append(session)

    def _close_pipes(self, session: Session) -> None:
        if session.jobs is not None:
            self.selector.unregister(session.jobs.FD)
            session.jobs.close(0)
            session.results.close(0)
        session.jobs = session.results = None
        session.target = session.jobs_endpoint = ""

    def _drain(self, session: Session, sock: zmq.Socket) -> None:
        while not sock.closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                body = sock.recv_multipart(zmq.NOBLOCK)[-1]
            except zmq.Again:
                return
            if sock is session.control:
                self._on_control(session, body)
            else:
                self._run(session, body)

    def _on_control(self, session: Session, body: bytes) -> None:
        try:
            message = self._control.decode(body)
        except msgspec.DecodeError:
            return
        if message.type == "WorkerWelcome":
            self._welcomed(session, message)
        elif message.type == "ErrorReply":
            self._refused(session)

    def _run(self, session: Session, body: bytes) -> None:
        dispatch = self._dispatch.decode(body)
        job = dispatch.job
        if job.handler == "builtin.echo":
            done = JobDone(job_id=job.id, lease=dispatch.lease, success=True, result=job.payload)
        else:
            done = JobDone(job_id=job.id, lease=dispatch.lease, success=False, error=JobError(message=f"a swarm session cannot run {job.handler}"))
        session.results.send(encode(done))
        self.jobs_done += 1

    # ------------------------------------------------------------ the loop

    def run(self, stop, stats: Path | None = None) -> None:
        for session in self.sessions:
            self.join(session)
        tick_s = self.heartbeat_s / TICKS
        next_tick, tick, next_stats = time.monotonic(), 0, 0.0
        while not stop():
            timeout = max(0.0, next_tick - time.monotonic())
            for key, _ in self.selector.select(timeout):
                session, sock = key.data
                self._drain(session, sock)
            now = time.monotonic()
            if now >= next_tick:
                self._connected(now)
                for session in self.sessions[tick::TICKS]:
                    self.hello(session)
                tick = (tick + 1) % TICKS
                next_tick += tick_s
                if next_tick < now:  # fell behind: do not try to catch up in a burst
                    next_tick = now + tick_s
            if stats is not None and now >= next_stats:
                self.write_stats(stats)
                next_stats = now + 0.2
        self.close()

    def _connected(self, now: float) -> None:
        """Sessions whose jobs PULL had time to connect say so at once (an ipc connect
        takes well under CONNECT_S; a dispatch that finds it unconnected is re-queued)."""
        waiting = []
        for session in self._connecting:
            if session.jobs is None:
                continue
            if now - session.welcomed_at < CONNECT_S:
                waiting.append(session)
                continue
            session.jobs_endpoint = session.target
            self.hello(session)
        self._connecting = waiting

    def counts(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "sessions": len(self.sessions),
            "welcomed": sum(1 for s in self.sessions if s.jobs is not None),
            "ready": sum(1 for s in self.sessions if s.jobs_endpoint),
            "refused": sum(1 for s in self.sessions if s.refused),
            "jobs": self.jobs_done,
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }

    def write_stats(self, path: Path) -> None:
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.counts()))
        partial.replace(path)

    def close(self) -> None:
        for session in self.sessions:
            self._close_pipes(session)
            if session.control is not None:
                session.control.close(0)
        self.selector.close()
        self.context.term()


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swarm_sessions", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", required=True, help="the server's workers (control) endpoint")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--credit", type=int, default=1)
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--prefix", default="swarm", help="session names are PREFIX-NNNNN")
    parser.add_argument("--stats", type=Path, help="rewrite this JSON file with the counts")
    args = parser.parse_args(argv)
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))
    swarm = Swarm(args.workers, args.sessions, args.credit, args.heartbeat_s, args.prefix)
    swarm.run(lambda: bool(stopping), args.stats)
    if args.stats is not None:
        swarm.write_stats(args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
