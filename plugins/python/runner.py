"""What runs one handler job, inside a fresh child process of the Python plugin.

``plugins.python.forkserver`` forks one child per job from a warm parent; the child
sets its hard limits (``limit_job``), runs the job with ``HandlerRunner`` and exits,
so nothing a job changes (builtins, modules, threads, cwd, environment) reaches the
next. It owns executing user code: a fresh namespace (``upstream``, ``args``,
``attest``, ``progress``, ``job``; attests go out in batches, ``plugins.python.attesting``), capturing stdout/stderr and turning exceptions into a
``JobError``.

Parent and child talk only over a private pipe pair, never over fd 0/1: frames are
a 4-byte big-endian length and a MessagePack body. The plugin sends ``RunJob``; the
fork server answers ``Ready`` once at start and ``Exited`` when a job's process has
ended; the job's process sends any number of ``ReportProgress`` and ``ReportOutput``
and one ``RunResult``. Output is streamed only once a job has run for
``STREAM_AFTER_S``: a quick job's output simply comes with its result, at no extra
cost. The frames are declared here, once; ``plugins.python.channel`` (the plugin's
end) and ``plugins.python.forkserver`` import them.
"""

from __future__ import annotations

import builtins
import ctypes
import hashlib
import io
import linecache
import os
import re
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import msgspec

from plugins.python.attesting import AttestWriter
from qntx.bus.client import Client
from qntx.bus.security import Security
from qntx.protocol import NIL, AtsReply, JobError, NewAttestation
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


class JobContext(msgspec.Struct, frozen=True, kw_only=True):
    """What handler code can learn of its run, as ``job`` in its namespace: ``job.id``,
    ``job.attempt`` (1 for the first), ``job.due`` (a schedule firing's due time, Unix
    ms; None for other jobs), ``job.handler`` and ``job.lease``."""

    id: str = ""
    attempt: int = 0
    due: int | None = None
    handler: str = ""
    lease: int = 0


class RunJob(msgspec.Struct, tag="run", kw_only=True):
    job_id: str
    code: str
    filename: str
    payload: msgspec.Raw = NIL  # decoded here, where the handler runs
    cpu_s: int = 600
    traced: bool = False  # time each attest() batch (RunResult.marks) for the run's trace
    ats_endpoint: str = ""
    keys_dir: str = ""  # CURVE keys for a tcp ATS endpoint (qntx.bus.security)
    insecure: bool = False
    context: JobContext = JobContext()


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    pid: int


class ReportProgress(msgspec.Struct, tag="progress", kw_only=True):
    current: float
    total: float


class ReportOutput(msgspec.Struct, tag="output", kw_only=True):
    stream: str  # "stdout" or "stderr"
    text: str


class Exited(msgspec.Struct, tag="exited", kw_only=True):
    """From the fork server: the process of its ``seq``-th job (counting from 1, in
    the order the jobs came) has ended. A job without its ``RunResult`` by now died,
    and ``returncode`` (``-N`` for signal N) says how."""

    seq: int
    job_id: str
    returncode: int


class RunResult(msgspec.Struct, tag="reply", kw_only=True):
    job_id: str
    success: bool
    result: msgspec.Raw = NIL  # encoded here; the plugin only carries it
    error: JobError | None = None
    stdout: str = ""
    stderr: str = ""
    marks: list[tuple[str, int, int, int]] = []  # traced runs: (what, start ns, end ns, items)


ToChild = RunJob
ToParent = Ready | ReportProgress | ReportOutput | RunResult | Exited


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
            write_all(self._wfd, frame(body))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --------------------------------------------------------------------- limits


class Limits(msgspec.Struct, frozen=True):
    """The hard ceilings of one job process; 0 leaves a ceiling as it is."""

    cpu_s: int = 0  # per job
    memory_mb: int = 0
    processes: int = 0  # RLIMIT_NPROC: counts every process of the user, so the
    # fork server passes its user's count at start plus the processes one job may add
    file_mb: int = 0


CAP_SYS_RESOURCE = 24  # capability(7): lets a process raise its hard limits
PR_CAPBSET_DROP = 24  # prctl(2)
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# A job process takes another job only while it has used at most this much CPU,
# and its CPU limit is cpu_s + REUSE_CPU_S: so every job gets at least its cpu_s,
# and at most REUSE_CPU_S more.
REUSE_CPU_S = 2


def _set_limit(which: int, soft: int, hard: int) -> None:
    """Never above the current hard limit: only lowering a hard limit makes it stick."""
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(which, (soft, hard))


def limit_process(limits: Limits) -> None:
    """Set the hard limits of a fresh job process, for good: it cannot raise them,
    even as root (CAP_SYS_RESOURCE is dropped)."""
    if limits.cpu_s > 0:
        # SIGXCPU at the soft limit; handler code that catches or ignores it meets
        # the kernel's SIGKILL at the hard limit a second later.
        soft = limits.cpu_s + REUSE_CPU_S
        _set_limit(resource.RLIMIT_CPU, soft, soft + 1)
    if limits.memory_mb > 0:
        _set_limit(resource.RLIMIT_AS, limits.memory_mb << 20, limits.memory_mb << 20)
    if limits.processes > 0:
        _set_limit(resource.RLIMIT_NPROC, limits.processes, limits.processes)
    if limits.file_mb > 0:
        # A write past the limit fails with EFBIG (an OSError the handler sees)
        # instead of the default SIGXFSZ kill.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _set_limit(resource.RLIMIT_FSIZE, limits.file_mb << 20, limits.file_mb << 20)
    _drop_capability(CAP_SYS_RESOURCE)


def _drop_capability(capability: int) -> None:
    """Drop a capability from the bounding, effective, permitted and inheritable sets
    (a no-op for a process that does not have it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)  # fails harmlessly without CAP_SETPCAP
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words
    if libc.capget(header, data) != 0:
        return
    word, bit = divmod(capability, 32)
    for field in range(3):
        data[word * 3 + field] &= ~(1 << bit)
    libc.capset(header, data)


def cpu_left() -> bool:
    """Whether this process may take another job: it has used at most REUSE_CPU_S, so
    the next job still gets its cpu_s under the limit set at the start."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime <= REUSE_CPU_S


# --------------------------------------------------------------------- running jobs


def _tail(text: str) -> str:
    text = sendable(text)
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    return f"[... {len(text) - MAX_OUTPUT_CHARS} characters dropped]\n" + text[-MAX_OUTPUT_CHARS:]


def sendable(text: str) -> str:
    """``text`` as MessagePack can carry it: a lone surrogate (a name in another
    encoding, as ``os.listdir`` gives it) becomes U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


def _job_error(exc: BaseException) -> JobError:
    # Drop the runner's own leading frames (exec, compile): the traceback should
    # start at the handler, whose filename and lines are what the author needs.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return JobError(
        message=sendable(message), traceback=sendable("".join(traceback.format_exception(type(exc), exc, tb)))
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
                piece = sendable(text[at : at + STREAM_CHUNK_CHARS])
                self._pipe.send(self._encoder.encode(ReportOutput(stream=stream, text=piece)))


# (filename, digest of the code) -> (code object, linecache entry). The fork server
# fills it before it forks the next child, so a child inherits every handler compiled.
_code_cache: dict[tuple[str, bytes], tuple[Any, tuple]] = {}


def compiled(code: str, filename: str) -> Any:
    """The code object for ``code``, compiled once per fork server."""
    key = (
        filename,
        hashlib.blake2b(code.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
    )
    cached = _code_cache.get(key)
    if cached is None:
        if len(_code_cache) >= CODE_CACHE_SIZE:
            del _code_cache[next(iter(_code_cache))]
        # A linecache entry lets tracebacks quote the handler's source lines.
        lines = code.splitlines(keepends=True)
        cached = (compile(code, filename, "exec"), (len(code), None, lines, filename))
        _code_cache[key] = cached
    linecache.cache[filename] = cached[1]
    return cached[0]


class HandlerRunner:
    """Executes a job in a fresh namespace (one per process: the process ends with it)."""

    def __init__(self, pipe: Pipe):
        self._pipe = pipe
        self._ats: AttestWriter | None = None
        self._marks: list | None = None  # the attest batches of a traced run
        self._encoder = msgspec.msgpack.Encoder()
        self._streamer = OutputStreamer(pipe)

    def _attest_function(self, endpoint: str, keys_dir: str = "", insecure: bool = False):
        def attest(subjects, predicates, contexts, actors=None, attributes=None) -> dict:
            """Create one attestation through the bus; returns the stored record
            (``plugins.python.attesting``: sent in batches, read when acknowledged)."""
            if not endpoint:
                raise RuntimeError("attest() is unavailable: this interpreter has no ATS endpoint")
            if self._ats is None or self._ats.client.endpoint != endpoint:
                if self._ats is not None:
                    self._ats.client.close()
                security = Security(keys_dir=Path(keys_dir) if keys_dir else None, insecure=insecure)
                client = Client(endpoint, AtsReply, timeout_s=ATTEST_TIMEOUT_S, security=security)
                self._ats = AttestWriter(client, marks=self._marks)
            item = NewAttestation(
                subjects=as_list(subjects),
                predicates=as_list(predicates),
                contexts=as_list(contexts),
                actors=as_list(actors),
                attributes=dict(attributes or {}),
                source="python",
            )
            return self._ats.attest(item)

        return attest

    def _progress(self, current: float, total: float) -> None:
        self._pipe.send(
            self._encoder.encode(ReportProgress(current=float(current), total=float(total)))
        )

    def run(self, job: RunJob) -> bytes:
        """Run one job and return its encoded ``RunResult``."""
        payload = msgspec.msgpack.decode(job.payload)
        self._marks = [] if job.traced else None
        if self._ats is not None:
            self._ats.marks = self._marks
        args = payload.get("args") if isinstance(payload, dict) else None
        namespace: dict[str, Any] = {
            "__name__": "__main__",
            "__builtins__": builtins,
            "upstream": payload,
            "args": args if isinstance(args, list) else [],
            "attest": self._attest_function(job.ats_endpoint, job.keys_dir, job.insecure),
            "progress": self._progress,
            "job": job.context,
        }
        saved = sys.stdout, sys.stderr
        out, err = OutputStream("stdout", self._streamer), OutputStream("stderr", self._streamer)
        sys.stdout, sys.stderr = out, err
        self._streamer.begin()
        error = None
        try:
            try:
                exec(compiled(job.code, job.filename), namespace)
            finally:
                if self._ats is not None:  # the job is done once its attestations are stored
                    self._ats.flush()
        except SystemExit as exc:
            if exc.code not in (0, None):
                error = _job_error(exc)
        except BaseException as exc:  # noqa: B036  (KeyboardInterrupt in user code is a failure too)
            error = _job_error(exc)
        finally:
            sys.stdout, sys.stderr = saved
            self._streamer.end()  # its last output goes out before the result
        result = namespace.get("_result") if error is None else None
        reply = RunResult(job_id=job.job_id, success=error is None, error=error, marks=self._marks or [])
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
            reply.result = msgspec.Raw(self._encoder.encode(sendable(repr(result))))
            reply.stderr = _tail(stderr + sendable(note))
            return self._encoder.encode(reply)
