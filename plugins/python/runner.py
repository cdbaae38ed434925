"""One warm child interpreter of the Python plugin: it runs handler code, job after job.

Started by ``plugins.python.pool`` as ``python -m plugins.python.runner --rfd R --wfd W``.
It owns executing user code: a fresh namespace per job (``upstream``, ``args``,
``attest``, ``progress``), capturing stdout/stderr, turning exceptions into a
``JobError``, and the per-job CPU limit and per-process memory limit.

It talks to its parent only over a private pipe pair, never over fd 0/1: frames are
a 4-byte big-endian length and a MessagePack body. The parent sends ``RunJob``; the
child answers ``Ready`` once at start, any number of ``ReportProgress`` and
``ReportOutput`` during a job and one ``RunResult`` per job. Output is streamed
only once a job has run for ``STREAM_AFTER_S``: a quick job's output simply comes
with its result, at no extra cost. The frames are declared here, once, and
``plugins.python.channel`` (the parent's end) imports them. The child exits when its
input pipe closes.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import io
import linecache
import math
import os
import resource
import signal
import sys
import threading
import time
import traceback
from typing import Any

import msgspec

from qntx.bus.client import Client
from qntx.protocol import NIL, AtsReply, Attest, Attested, JobError, NewAttestation
from qntx.values import as_list

MAX_OUTPUT_CHARS = 1 << 20  # per stream; the tail is kept, it usually holds the error
MAX_FRAME_BYTES = 1 << 30
CODE_CACHE_SIZE = 256
ATTEST_TIMEOUT_S = 10.0
STREAM_AFTER_S = 0.2  # a job running longer than this has its output streamed live
STREAM_EVERY_S = 0.1
STREAM_CHUNK_CHARS = 256 << 10  # one ReportOutput frame at most
STREAM_BACKLOG_CHARS = 1 << 20  # unsent output kept when a job outpaces the stream


# --------------------------------------------------------------------- frames


class RunJob(msgspec.Struct, tag="run", kw_only=True):
    job_id: str
    code: str
    filename: str
    payload: msgspec.Raw = NIL  # decoded here, where the handler runs
    cpu_s: int = 600
    ats_endpoint: str = ""


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    pid: int


class ReportProgress(msgspec.Struct, tag="progress", kw_only=True):
    current: float
    total: float


class ReportOutput(msgspec.Struct, tag="output", kw_only=True):
    stream: str  # "stdout" or "stderr"
    text: str


class RunResult(msgspec.Struct, tag="reply", kw_only=True):
    job_id: str
    success: bool
    result: msgspec.Raw = NIL  # encoded here; the plugin only carries it
    error: JobError | None = None
    stdout: str = ""
    stderr: str = ""


ToChild = RunJob
ToParent = Ready | ReportProgress | ReportOutput | RunResult


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


class Pipe:
    """The child's blocking end of the private pipe pair."""

    def __init__(self, rfd: int, wfd: int):
        self._input = os.fdopen(rfd, "rb")
        self._wfd = wfd
        self._decoder = msgspec.msgpack.Decoder(ToChild)
        self.lock = threading.Lock()  # the output streamer sends from its own thread

    def receive(self) -> RunJob | None:
        """The next job, or None once the parent has closed the pipe."""
        header = self._input.read(4)
        if len(header) < 4:
            return None
        size = int.from_bytes(header, "big")
        body = self._input.read(size)
        if size > MAX_FRAME_BYTES or len(body) < size:
            return None
        return self._decoder.decode(body)

    def send(self, body: bytes) -> None:
        with self.lock:
            view = memoryview(frame(body))
            while view:
                view = view[os.write(self._wfd, view) :]


# --------------------------------------------------------------------- limits


def limit_memory(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    limit = memory_mb << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    # Soft and hard together, so handler code cannot lift its own ceiling.
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def limit_cpu(cpu_s: float) -> None:
    """Allow ``cpu_s`` more CPU seconds from now: RLIMIT_CPU counts the whole process life."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + max(1, math.ceil(cpu_s))
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


# --------------------------------------------------------------------- running jobs


def _tail(text: str) -> str:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    return f"[... {len(text) - MAX_OUTPUT_CHARS} characters dropped]\n" + text[-MAX_OUTPUT_CHARS:]


def _job_error(exc: BaseException) -> JobError:
    # Drop the runner's own leading frames (exec, compile): the traceback should
    # start at the handler, whose filename and lines are what the author needs.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return JobError(
        message=message, traceback="".join(traceback.format_exception(type(exc), exc, tb))
    )


class OutputStream(io.TextIOBase):
    """A job's stdout or stderr: its tail kept for the result, and handed to the
    streamer as it is written."""

    def __init__(self, name: str, streamer: OutputStreamer):
        self.name = name
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0
        self._streamer = streamer

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._parts.append(text)
        self._size += len(text)
        if self._size > 2 * MAX_OUTPUT_CHARS:  # keep memory bounded, amortised
            whole = "".join(self._parts)
            self._dropped += len(whole) - MAX_OUTPUT_CHARS
            self._parts, self._size = [whole[-MAX_OUTPUT_CHARS:]], MAX_OUTPUT_CHARS
        self._streamer.written(self.name, text)
        return len(text)

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self._dropped:
            return f"[... {self._dropped} characters dropped]\n" + text
        return text


class OutputStreamer:
    """Sends a long job's output to the parent every STREAM_EVERY_S, from a thread
    (handler code may print once and then compute or sleep for minutes).

    Writers only append under a short lock; sending happens outside it, under a
    second lock that also orders the last flush before the job's result."""

    def __init__(self, pipe: Pipe):
        self._pipe = pipe
        self._lock = threading.Lock()  # guards the pending output; held briefly
        self._sending = threading.Lock()  # one sender at a time, in order
        self._unsent: list[tuple[str, str]] = []
        self._unsent_size = 0
        self._started: float | None = None  # the running job's start; None between jobs
        self.streamed = False
        self._encoder = msgspec.msgpack.Encoder()
        threading.Thread(target=self._loop, name="output-streamer", daemon=True).start()

    def begin(self) -> None:
        with self._lock:
            self._unsent, self._unsent_size, self.streamed = [], 0, False
            self._started = time.monotonic()

    def written(self, stream: str, text: str) -> None:
        with self._lock:
            if self._started is None:
                return
            self._unsent.append((stream, text))
            self._unsent_size += len(text)
            if self._unsent_size > STREAM_BACKLOG_CHARS:
                # Faster than anyone reads: keep the newest, say what was skipped.
                skipped = self._unsent_size - STREAM_BACKLOG_CHARS // 2
                kept = "".join(t for _, t in self._unsent)[skipped:]
                self._unsent = [(stream, f"\n[... {skipped} characters not streamed]\n" + kept)]
                self._unsent_size = len(kept)

    def end(self) -> None:
        """The job is over: send what is left if it was being streamed, then stop."""
        with self._sending:
            with self._lock:
                pending = self._unsent if self.streamed else []
                self._started, self._unsent, self._unsent_size = None, [], 0
            self._send(pending)

    def _loop(self) -> None:
        while True:
            time.sleep(STREAM_EVERY_S)
            with self._sending:
                with self._lock:
                    if self._started is None or time.monotonic() - self._started < STREAM_AFTER_S:
                        continue
                    pending, self._unsent, self._unsent_size = self._unsent, [], 0
                    self.streamed = True
                self._send(pending)

    def _send(self, pending: list[tuple[str, str]]) -> None:
        chunks: list[tuple[str, list[str]]] = []
        for stream, text in pending:
            if chunks and chunks[-1][0] == stream:
                chunks[-1][1].append(text)
            else:
                chunks.append((stream, [text]))
        for stream, parts in chunks:
            text = "".join(parts)
            for at in range(0, len(text), STREAM_CHUNK_CHARS):
                piece = text[at : at + STREAM_CHUNK_CHARS]
                self._pipe.send(self._encoder.encode(ReportOutput(stream=stream, text=piece)))


class HandlerRunner:
    """Executes jobs in fresh namespaces; compiled code and the ATS client are reused."""

    def __init__(self, pipe: Pipe):
        self._pipe = pipe
        self._code_cache: dict[tuple[str, bytes], tuple[Any, tuple]] = {}
        self._ats: Client | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._streamer = OutputStreamer(pipe)

    def _compile(self, code: str, filename: str) -> Any:
        key = (
            filename,
            hashlib.blake2b(code.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
        )
        cached = self._code_cache.get(key)
        if cached is None:
            if len(self._code_cache) >= CODE_CACHE_SIZE:
                del self._code_cache[next(iter(self._code_cache))]
            # A linecache entry lets tracebacks quote the handler's source lines.
            lines = code.splitlines(keepends=True)
            cached = (compile(code, filename, "exec"), (len(code), None, lines, filename))
            self._code_cache[key] = cached
        linecache.cache[filename] = cached[1]
        return cached[0]

    def _attest_function(self, endpoint: str):
        def attest(subjects, predicates, contexts, actors=None, attributes=None) -> dict:
            """Create one attestation through the bus and return the stored record."""
            if not endpoint:
                raise RuntimeError("attest() is unavailable: this interpreter has no ATS endpoint")
            if self._ats is None or self._ats.endpoint != endpoint:
                if self._ats is not None:
                    self._ats.close()
                self._ats = Client(endpoint, AtsReply, timeout_s=ATTEST_TIMEOUT_S)
            item = NewAttestation(
                subjects=as_list(subjects),
                predicates=as_list(predicates),
                contexts=as_list(contexts),
                actors=as_list(actors),
                attributes=dict(attributes or {}),
                source="python",
            )
            reply = self._ats.request(Attest(items=[item]))
            if not isinstance(reply, Attested) or not reply.records:
                raise RuntimeError(f"unexpected ATS reply to Attest: {type(reply).__name__}")
            return msgspec.to_builtins(reply.records[0])

        return attest

    def _progress(self, current: float, total: float) -> None:
        self._pipe.send(
            self._encoder.encode(ReportProgress(current=float(current), total=float(total)))
        )

    def run(self, job: RunJob) -> bytes:
        """Run one job and return its encoded ``RunResult``."""
        payload = msgspec.msgpack.decode(job.payload)
        args = payload.get("args") if isinstance(payload, dict) else None
        namespace: dict[str, Any] = {
            "__name__": "__main__",
            "__builtins__": builtins,
            "upstream": payload,
            "args": args if isinstance(args, list) else [],
            "attest": self._attest_function(job.ats_endpoint),
            "progress": self._progress,
        }
        saved = sys.stdout, sys.stderr
        out, err = OutputStream("stdout", self._streamer), OutputStream("stderr", self._streamer)
        sys.stdout, sys.stderr = out, err
        self._streamer.begin()
        error = None
        try:
            limit_cpu(job.cpu_s)
            exec(self._compile(job.code, job.filename), namespace)
        except SystemExit as exc:
            if exc.code not in (0, None):
                error = _job_error(exc)
        except BaseException as exc:  # noqa: B036  (KeyboardInterrupt in user code is a failure too)
            error = _job_error(exc)
        finally:
            sys.stdout, sys.stderr = saved
            self._streamer.end()  # its last output goes out before the result
        result = namespace.get("_result") if error is None else None
        reply = RunResult(job_id=job.job_id, success=error is None, error=error)
        return self._encode(reply, result, out.getvalue(), err.getvalue())

    def _encode(self, reply: RunResult, result: Any, stdout: str, stderr: str) -> bytes:
        # (OutputStream already bounds what it keeps; _tail cuts to the final size.)
        reply.stdout, reply.stderr = _tail(stdout), _tail(stderr)
        try:
            reply.result = msgspec.Raw(self._encoder.encode(result))
            return self._encoder.encode(reply)
        except Exception as exc:
            # Most likely `_result` is not MessagePack-able: return its repr instead of
            # losing the whole job, and say so where the author will look.
            note = f"\n[qntx] _result is not MessagePack-able ({exc}); returning its repr()\n"
            reply.result = msgspec.Raw(self._encoder.encode(repr(result)))
            reply.stdout = _tail(stdout.encode("utf-8", "replace").decode())
            reply.stderr = _tail(stderr.encode("utf-8", "replace").decode() + note)
            return self._encoder.encode(reply)


# --------------------------------------------------------------------- entry point


def make_std_streams_harmless() -> None:
    """Point fd 0 at /dev/null and fd 1 at stderr, so no C-level write reaches a protocol pipe."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    sys.stdout = sys.stderr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m plugins.python.runner")
    parser.add_argument("--rfd", type=int, required=True)
    parser.add_argument("--wfd", type=int, required=True)
    parser.add_argument("--memory-mb", type=int, default=0)
    options = parser.parse_args(argv)

    make_std_streams_harmless()
    # Handler subprocesses must not hold our pipe ends open (the parent relies on EOF).
    os.set_inheritable(options.rfd, False)
    os.set_inheritable(options.wfd, False)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the plugin, which owns shutdown
    _, core_hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(
        resource.RLIMIT_CORE, (0, core_hard)
    )  # a SIGXCPU kill must not drop a core file
    limit_memory(options.memory_mb)

    pipe = Pipe(options.rfd, options.wfd)
    runner = HandlerRunner(pipe)
    pipe.send(msgspec.msgpack.encode(Ready(pid=os.getpid())))
    while (job := pipe.receive()) is not None:
        pipe.send(runner.run(job))


if __name__ == "__main__":
    main()
