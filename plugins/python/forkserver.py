"""The warm parent of the Python plugin's job processes: each job starts clean.

Started by ``plugins.python.pool`` as ``python -m plugins.python.forkserver --rfd R
--wfd W [limits] [--fresh]``. It imports everything a job needs once and runs no
handler code itself: jobs run in children it forks, each of which sets its hard
limits for good (``runner.limit_process``) before any handler code runs.

A job process takes the next job only while it is exactly as it was forked: after
each job it looks for what the job left behind (``plugins.python.traces``: an
import, a changed builtin, environment or working directory, a thread, a signal
handler, an open file, a process still running, ...) and retires on the first
trace, as it does once its CPU budget runs low. The next job then goes to a
*spare*, forked ahead of need and waiting on a private pipe, while the server
forks the next spare. So no job sees what an earlier one changed, and a job that
leaves nothing behind costs no fork: a fork costs about a millisecond of CPU on
the small virtual machines this runs on, several times a trivial job, which would
cut the plugin's throughput by more than half. ``--fresh`` (the
``python_fresh_process`` setting) retires every process after one job.

Before a job process sends its last result it says it retires on a notice pipe;
the plugin sends the next job only after that result, so the server sees the
notice before it routes that job. When a job process ends the server sends
``Exited`` (after the job's own ``RunResult``, which the child wrote before it
exited; the plugin uses it only when that result never came; and only while no newer
job was handed out, so it never shares the pipe with another writer), kills whatever the
job left running (it is the subreaper of its children's children) and reaps it.
It forks only while single-threaded. It exits when its input pipe closes; its
children die with it (PDEATHSIG).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import select
import signal
import sys

import msgspec

from plugins.python.runner import (
    MAX_FRAME_BYTES,
    Exited,
    HandlerRunner,
    Limits,
    Pipe,
    Ready,
    RunJob,
    compiled,
    cpu_left,
    frame,
    limit_process,
    write_all,
)
from plugins.python.traces import Traces, children
from qntx.lifeline import PR_SET_PDEATHSIG, prctl

PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 1 << 16
RETIRE = b"R"
JOB_PROCESSES = 64  # processes (threads count too) one job may add under RLIMIT_NPROC


class FrameReader:
    """Whole frames from a pipe read in chunks; ``select`` says when to read."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buffer = bytearray()

    def read(self) -> list[bytes] | None:
        """The frames completed by what the pipe holds now; None at EOF or garbage."""
        data = os.read(self.fd, READ_CHUNK)
        if not data:
            return None
        self._buffer += data
        frames = []
        while len(self._buffer) >= 4:
            size = int.from_bytes(self._buffer[:4], "big")
            if size > MAX_FRAME_BYTES:
                return None
            if len(self._buffer) < 4 + size:
                break
            frames.append(bytes(self._buffer[4 : 4 + size]))
            del self._buffer[: 4 + size]
        return frames


class JobProcess:
    """A forked child that runs jobs, from its private job pipe, until it retires."""

    def __init__(self, pid: int, job_fd: int, notice_fd: int):
        self.pid = pid
        self.job_fd = job_fd  # our write end of its job pipe
        self.notice_fd = notice_fd  # our read end of its notice pipe (non-blocking)
        self.pidfd = os.pidfd_open(pid)
        self.last_seq = 0  # the last job it was given: its number and frame
        self.last_job = b""
        self.retired = False

    def fds(self) -> tuple[int, int, int]:
        return self.job_fd, self.notice_fd, self.pidfd

    def read_notice(self) -> None:
        """Its notice pipe is readable: it retires (or it is gone: EOF)."""
        try:
            os.read(self.notice_fd, 1)
        except BlockingIOError:
            return
        self.retired = True


class ForkServer:
    def __init__(self, rfd: int, wfd: int, limits: Limits, *, fresh: bool):
        self._input = FrameReader(rfd)
        self._wfd = wfd
        self._limits = limits
        self._fresh = fresh  # every job in a fresh process, whatever it left behind
        self._pid = os.getpid()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(RunJob)
        self._processes: dict[int, JobProcess] = {}  # pidfd -> every child not yet reaped
        self._current: JobProcess | None = None  # the one that takes the next job
        self._spare: JobProcess | None = None  # forked ahead, waiting to take over
        self._jobs = 0

    def serve(self) -> None:
        self._send(Ready(pid=self._pid))
        self._spare = self._fork()
        while True:
            notices = {p.notice_fd: p for p in self._processes.values() if not p.retired}
            readable, _, _ = select.select([self._input.fd, *self._processes, *notices], [], [])
            # Notices first: a retiring process's notice is here by the time the job
            # that must not go to it is (see _dispatch).
            for fd in readable:
                if fd in notices:
                    notices[fd].read_notice()
            for fd in readable:
                if fd in notices:
                    continue
                if fd == self._input.fd:
                    frames = self._input.read()
                    if frames is None:
                        return  # the plugin closed our input (or sent garbage): stop
                    for body in frames:
                        self._dispatch(body)
                else:
                    self._ended(self._processes[fd])

    def _dispatch(self, body: bytes) -> None:
        # A retiring process says so before it sends its last result, and the plugin
        # sends the next job only after that result: so its notice is here by now.
        if self._current is None or self._current.retired:
            self._promote()
        try:
            write_all(self._current.job_fd, frame(body))
        except BrokenPipeError:  # it died between two jobs, before we saw it go
            self._current.retired = True
            self._promote()
            write_all(self._current.job_fd, frame(body))
        self._jobs += 1
        self._current.last_seq, self._current.last_job = self._jobs, body
        if self._spare is None:
            job = self._decoder.decode(body)
            try:
                compiled(job.code, job.filename)  # inherited by the processes forked next
            except Exception:  # noqa: S110  (the job's own process reports the error)
                pass
            self._spare = self._fork()

    def _promote(self) -> None:
        """The spare takes the next job."""
        self._current, self._spare = self._spare or self._fork(), None

    def _ended(self, process: JobProcess) -> None:
        del self._processes[process.pidfd]
        _, status = os.waitpid(process.pid, 0)
        for fd in process.fds():
            os.close(fd)
        if process.last_seq and process.last_seq == self._jobs:
            # The plugin ignores this unless that job's result never came. Once a
            # newer job was handed out, the result did come (the plugin sends the next
            # job only after it), and the newer job's process may be writing frames
            # larger than PIPE_BUF into the same pipe, which a write of ours could cut
            # in two: so Exited goes out only while no other job process runs.
            returncode = os.waitstatus_to_exitcode(status)
            job_id = self._decoder.decode(process.last_job).job_id
            self._send(Exited(seq=process.last_seq, job_id=job_id, returncode=returncode))
        process.retired = True
        if process is self._current:
            self._current = None
        if process is self._spare:
            self._spare = self._fork()
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Kill and reap what jobs left running after their process ended: orphans
        become our children (we are their subreaper)."""
        for _ in range(100):  # each round may orphan the next generation
            ours = {process.pid for process in self._processes.values()}
            leftovers = [pid for pid in children(self._pid) if pid not in ours]
            if not leftovers:
                return
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass

    def _fork(self) -> JobProcess:
        job_read, job_write = os.pipe()
        notice_read, notice_write = os.pipe()
        os.set_blocking(notice_read, False)
        # What the server holds is shared with the child: keep the child's collector
        # from touching (and so copying) it.
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                for fd in (job_write, notice_read, self._input.fd):
                    os.close(fd)
                for process in self._processes.values():
                    for fd in process.fds():
                        os.close(fd)
                code = self._child(job_read, notice_write)
            finally:
                os._exit(code)
        os.close(job_read)
        os.close(notice_write)
        process = JobProcess(pid, job_write, notice_read)
        self._processes[process.pidfd] = process
        return process

    def _child(self, job_read: int, notice_write: int) -> int:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # no job outlives its server
        if os.getppid() != self._pid:
            return 1  # the server died before we asked
        prctl(PR_SET_CHILD_SUBREAPER, 0)
        pipe = Pipe(job_read, self._wfd)
        job = pipe.receive()
        if job is None:
            return 0  # the server is closing
        limit_process(msgspec.structs.replace(self._limits, cpu_s=max(1, job.cpu_s)))
        runner = HandlerRunner(pipe)
        traces = None if self._fresh else Traces()
        while job is not None:
            result = runner.run(job)
            last = traces is None or traces.left() is not None or not cpu_left()
            if last:
                write_all(notice_write, RETIRE)  # before the result: see _dispatch
            pipe.send(result)
            if last:
                return 0
            job = pipe.receive()
        return 0

    def _send(self, message: msgspec.Struct) -> None:
        write_all(self._wfd, frame(self._encoder.encode(message)))


def _user_processes() -> int:
    """How many processes this user runs now (RLIMIT_NPROC counts them all)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass
    return count


def make_std_streams_harmless() -> None:
    """Point fd 0 at /dev/null and fd 1 at stderr, so no C-level write reaches a protocol pipe."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    sys.stdout = sys.stderr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m plugins.python.forkserver")
    parser.add_argument("--rfd", type=int, required=True)
    parser.add_argument("--wfd", type=int, required=True)
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--file-mb", type=int, default=0)
    parser.add_argument("--processes", type=int, default=JOB_PROCESSES)
    parser.add_argument("--fresh", action="store_true", help="a fresh process for every job")
    options = parser.parse_args(argv)

    make_std_streams_harmless()
    # Processes that handler code starts must not hold our pipe ends open.
    os.set_inheritable(options.rfd, False)
    os.set_inheritable(options.wfd, False)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the plugin, which owns shutdown
    _, core_hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core_hard))  # a SIGXCPU kill drops no core file
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    limits = Limits(
        memory_mb=options.memory_mb,
        processes=_user_processes() + options.processes if options.processes > 0 else 0,
        file_mb=options.file_mb,
    )
    ForkServer(options.rfd, options.wfd, limits, fresh=options.fresh).serve()


if __name__ == "__main__":
    main()
