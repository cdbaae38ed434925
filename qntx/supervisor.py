"""``qntx up``: start every actor as its own process and keep them running.

The supervisor holds ``<home>/run/up.lock`` (a second ``up`` on the same home is
refused), starts the children in dependency order, copies each child's log lines
to the console and to ``<home>/logs/<child>.log``, restarts a child that dies with
exponential backoff, and on SIGINT/SIGTERM stops them in reverse order: SIGTERM,
a grace period, then SIGKILL. Children get PR_SET_PDEATHSIG so they die with the
supervisor even when it is killed with -9.

On a PostgreSQL store several ``up`` (on different hosts) share one bus, and only one
leads (``qntx.leader``): the supervisor first takes the lease or waits as a standby,
starting no actor and binding nothing meanwhile; once it leads it starts the actors
with the epoch (``QNTX_EPOCH``) and renews the lease on a thread. When the lease is
lost (taken over after a pause, not renewable) or an actor's write was fenced, it
kills every actor at once, never letting one finish a thing more, and stands by
again: the host that was cut off comes back as a standby, not as a second leader.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path

from loguru import logger

from qntx.bus.pidlock import PidLock, lock_holder
from qntx.errors import Conflict
from qntx.leader import EPOCH_ENV, FENCED_EXIT, Lease
from qntx.lifeline import die_with_parent
from qntx.settings import Settings
from qntx.values import STOP_GRACE_S

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a child that ran this long gets its backoff reset
# How long one stage of a stop may take before its children are killed: past the
# grace running jobs get (values.STOP_GRACE_S), with room to report and close.
STAGE_WAIT_S = STOP_GRACE_S + 5.0
ECHO_HOLD_S = 0.05  # how long a console line may wait for an earlier one from another actor
STAMP = re.compile(rb"^\d\d:\d\d:\d\d\.\d{6} ")
# The console's queue holds at most this many lines of at most this many bytes (about
# 32 MiB): a console slower than the actors drops lines (the log files keep them all).
ECHO_QUEUE_LINES = 2_000
ECHO_LINE_BYTES = 16 << 10


class ActorLog(RotatingFileHandler):
    """One actor's log file, rotated. A write that fails (a full disk) is reported
    once, when it starts failing, and once more when it works again; its lines are
    dropped meanwhile (the console still has them), not each followed by a traceback."""

    failing = False
    _failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)
        if self.failing and not self._failed_now:
            self.failing = False
            logger.info("{} is written again", self.baseFilename)

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if not self.failing:
            self.failing = True
            logger.error("cannot write {}: {}; its lines are dropped until it can", self.baseFilename, sys.exc_info()[1])


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_socket: Path | None = None  # wait for this ipc socket file after start
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    log_threads: list[threading.Thread] = field(default_factory=list)


def supervised_actors(settings: Settings) -> dict[str, int]:
    """The actors ``qntx up`` runs on this home now: name -> pid (none when it is not up)."""
    try:
        lines = (settings.run_dir / "actors").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        name, _, pid = line.partition(" ")
        if pid.isdigit():
            found[name] = int(pid)
    return found


def actor_command(settings: Settings, *args: str) -> list[str]:
    return [sys.executable, "-m", "qntx", "--home", str(settings.home), *args]


class Supervisor:
    def __init__(self, settings: Settings, children: list[Child], *, echo: bool = True, lease: Lease | None = None):
        self.settings = settings
        self.children = children
        self.echo = echo
        self.lease = lease  # a database store: lead or stand by
        self._lost: str | None = None  # why the lease was lost, while leading
        # A plain flag: a signal handler must not take the locks of a
        # threading.Event the main thread may be holding while it waits.
        self._stopping = False
        self._console: queue.Queue = queue.Queue(maxsize=ECHO_QUEUE_LINES)
        self._dropped = 0  # console lines dropped while the queue was full (said on the console)
        self._dropped_lock = threading.Lock()
        self._echo_thread = threading.Thread(target=self._echo, name="console", daemon=True)

    # ---------------------------------------------------------------- processes

    def _start(self, child: Child) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.lease is not None and self.lease.epoch is not None:
            env[EPOCH_ENV] = str(self.lease.epoch)  # every write of its stores is fenced by it
        child.process = subprocess.Popen(
            child.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        log_path = self.settings.logs_dir / f"{child.name}.log"
        thread = threading.Thread(target=self._pump, args=(child, child.process, log_path), daemon=True)
        thread.start()
        child.log_threads = [thread]
        self._write_pidfile()

    def _pump(self, child: Child, process: subprocess.Popen, log_path: Path) -> None:
        log = self._log_file(child, log_path)
        try:
            stamp = b""
            for line in process.stdout:  # type: ignore[union-attr]
                if log is not None:
                    log.emit(logging.makeLogRecord({"msg": line.decode("utf-8", "replace")}))
                if self.echo:
                    # A line without its own stamp (a traceback) goes with the line before it.
                    if STAMP.match(line):
                        stamp = line[:15]
                    if len(line) > ECHO_LINE_BYTES:
                        line = line[:ECHO_LINE_BYTES] + b" [... cut here; the log file has it whole]\n"
                    try:
                        self._console.put_nowait((stamp, line))
                    except queue.Full:
                        with self._dropped_lock:
                            self._dropped += 1
        finally:
            if log is not None:
                log.close()

    def _log_file(self, child: Child, log_path: Path) -> ActorLog | None:
        """The actor's log file, rotated at log_max_bytes with log_files kept (a
        long-running bus never fills the disk with logs); None if it cannot be opened
        (a full disk): its pipe is read on all the same, or the actor would block."""
        try:
            log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # (removed to make room, say)
            log = ActorLog(
                log_path, maxBytes=self.settings.log_max_bytes, backupCount=max(1, self.settings.log_files), encoding="utf-8"
            )
        except OSError as exc:
            logger.error("cannot open {}'s log {}: {}; its lines go to the console only", child.name, log_path, exc)
            return None
        log.terminator = ""
        return log

    def _echo(self) -> None:
        """Write the children's lines to the console in stamp order.

        Each child's pipe is read by its own thread, so lines from two actors can
        arrive in either order; holding them for ECHO_HOLD_S and sorting by their
        stamps puts an answer after the request it answers."""
        held: list[tuple[bytes, int, float, bytes]] = []
        order = itertools.count()
        while True:
            try:
                stamp, line = self._console.get(timeout=ECHO_HOLD_S / 2)
                if line is None:
                    break
                held.append((stamp, next(order), time.monotonic(), line))
            except queue.Empty:
                pass
            due = time.monotonic() - ECHO_HOLD_S
            if held and min(h[2] for h in held) <= due:
                held.sort()
                ready = [h for h in held if h[2] <= due]
                # Emit in stamp order up to the newest due line; later stamps wait.
                cut = held.index(ready[-1]) + 1
                self._write(held[:cut])
                held = held[cut:]
        held.sort()
        self._write(held)

    def _write(self, lines) -> None:
        if not self.echo:
            return
        with self._dropped_lock:
            dropped, self._dropped = self._dropped, 0
        try:
            if dropped:
                sys.stderr.buffer.write(f"[qntx] {dropped} console line(s) dropped: the console is slower than the actors (the logs have them)\n".encode())
            for *_, line in lines:
                sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
        except (BrokenPipeError, ValueError):
            # The console is gone (its pipe's reader exited, or it was closed): echo no
            # more, and hold nothing for it. The actors' logs still go to their files.
            self.echo = False
        except OSError:
            pass  # (a console file on a full disk) these lines are dropped; later ones are tried

    def _wait_ready(self, child: Child, timeout_s: float = 15.0) -> None:
        if child.ready_socket is None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stopping:
            if child.ready_socket.exists():
                return
            if child.process is not None and child.process.poll() is not None:
                return  # it died; the monitor loop restarts it
            time.sleep(0.01)
        logger.warning("{} did not bind {} within {}s", child.name, child.ready_socket, timeout_s)

    def _write_pidfile(self) -> None:
        """Name the live actors' pids in ``run/actors`` (read by ``qntx status``, the
        metrics endpoint and tools). A failed write (a full disk) is logged and the
        bus goes on; the next start of an actor writes it again."""
        lines = [f"{c.name} {c.process.pid}" for c in self.children if c.process and c.process.poll() is None]
        tmp = self.settings.run_dir / "actors.tmp"
        try:
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(self.settings.run_dir / "actors")
        except OSError as exc:
            logger.warning("cannot write {}: {}", self.settings.run_dir / "actors", exc)

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> int:
        self.settings.ensure_dirs()
        lock = PidLock(self.settings.lock_path("up"))
        if not lock.acquire():
            holder = lock_holder(self.settings.lock_path("up"))
            raise Conflict(f"qntx is already up on {self.settings.home} (pid {holder}); stop it first")
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        self._echo_thread.start()
        from qntx.obs.endpoint import MetricsEndpoint

        self.metrics = MetricsEndpoint(self.settings)
        self.metrics.prepare()
        self.metrics.start()
        try:
            if self.lease is None:
                self._serve()
            else:
                self._lead_or_stand_by()
        finally:
            self._stop_all()
            if self.lease is not None:
                self.lease.release()
                self.lease.close()
            self.metrics.stop()
            (self.settings.run_dir / "actors").unlink(missing_ok=True)
            with contextlib.suppress(queue.Full):  # the children are gone: flush what is held
                self._console.put((b"", None), timeout=2)
            self._echo_thread.join(timeout=2)
            lock.release()
        return 0

    def _serve(self) -> None:
        """Start every actor in order, then watch them until a stop (or a lost lease)."""
        for child in self.children:
            if self._stopping or self._lost:
                return
            if child.ready_socket is not None:
                child.ready_socket.unlink(missing_ok=True)  # a stale file from a killed run
            child.restarts, child.backoff_s = 0, BACKOFF_START_S
            self._start(child)
            self._wait_ready(child)
        logger.info("QNTX is up on {} ({} actors); Ctrl-C stops it", self.settings.home, len(self.children))
        self._monitor()

    def _lead_or_stand_by(self) -> None:
        lease = self.lease
        assert lease is not None
        while not self._stopping:
            epoch = lease.wait_to_lead(lambda: self._stopping)
            if epoch is None:
                return
            logger.info("leading the bus at epoch {} ({})", epoch, lease.identity["address"])
            self._lost = None
            done = threading.Event()
            renewer = lease.keep(self._lose, done)
            try:
                self._serve()
                if self._lost is None:
                    # A stop: the actors' last commits go in while the lease is still
                    # renewed; the caller gives it back after.
                    self._stop_all()
            finally:
                done.set()
                renewer.join(timeout=5)
            if self._lost is None:
                return
            logger.error("lost the lead: {}; the actors are stopped at once and this host stands by", self._lost)
            self._kill_all()
            lease.epoch = None

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why

    def _kill_all(self) -> None:
        """SIGKILL every actor: a leader that lost its lease must not answer another request."""
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
        for child in self.children:
            if child.process is not None:
                child.process.wait()
                for thread in child.log_threads:
                    thread.join(timeout=1)
            child.restart_at = None
        self._write_pidfile()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _monitor(self) -> None:
        while not self._stopping and not self._lost:
            time.sleep(0.05)
            now = time.monotonic()
            for child in self.children:
                process = child.process
                if process is None or process.poll() is None:
                    continue
                if process.returncode == FENCED_EXIT and self.lease is not None:
                    self._lose(f"{child.name}'s write was fenced (another host leads)")
                    return
                if child.restart_at is None:
                    ran = now - child.started_at
                    if ran > STABLE_AFTER_S:
                        child.backoff_s = BACKOFF_START_S
                    child.restart_at = now + child.backoff_s
                    logger.warning(
                        "{} exited with code {}; restarting in {:.2f}s", child.name, process.returncode, child.backoff_s
                    )
                    child.backoff_s = min(BACKOFF_MAX_S, child.backoff_s * 2)
                elif now >= child.restart_at:
                    child.restarts += 1
                    self.metrics.forget(process.pid)
                    try:
                        self._start(child)
                    except OSError as exc:  # no new process now (out of memory or processes)
                        child.restart_at = now + child.backoff_s
                        logger.error("{} could not be restarted: {}; trying again in {:.2f}s", child.name, exc, child.backoff_s)
                        child.backoff_s = min(BACKOFF_MAX_S, child.backoff_s * 2)

    def _stop_all(self) -> None:
        """Stop in stages, most dependent first: workers and plugins get their grace
        period to finish running jobs (and report them to a server that is still
        up), then the server commits and stops, then ATS."""
        stages = [
            [c for c in self.children if c.name.startswith("worker")],
            [c for c in self.children if c.name.startswith("plugin")],
            [c for c in self.children if c.name == "server"],
            [c for c in self.children if c.name == "ats"],
        ]
        for stage in stages:
            self._stop_stage(stage)

    def _stop_stage(self, children: list[Child]) -> None:
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STAGE_WAIT_S
        for child in children:
            process = child.process
            if process is None:
                continue
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("{} did not stop in {}s; killing it", child.name, STAGE_WAIT_S)
                process.kill()
                process.wait()
            for thread in child.log_threads:
                thread.join(timeout=1)
