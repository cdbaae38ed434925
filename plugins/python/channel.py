"""The plugin's end of the private pipes to one fork server of the Python plugin.

Owns the frame protocol on the plugin's side: writing ``RunJob`` frames, reading
``Ready``/``ReportProgress``/``ReportOutput``/``RunResult``/``Exited`` frames (declared
in ``plugins.python.runner``) and turning a death into an exception for whoever awaits
a reply: ``JobDied`` when one job's process died (the fork server lives on and takes
the next job), ``Died`` when the fork server itself is gone, silent or talking
garbage. When and why fork servers are started, reused or replaced is
``plugins.python.pool``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import msgspec
from loguru import logger

from plugins.python.runner import (
    MAX_FRAME_BYTES,
    Exited,
    ReportOutput,
    ReportProgress,
    RunJob,
    ToParent,
    frame,
)
from qntx.lifeline import kill_group
from qntx.protocol import Progress

_encoder = msgspec.msgpack.Encoder()


class Died(Exception):
    """The fork server stopped answering: it exited, or we killed it."""


class JobDied(Exception):
    """The process running the awaited job ended without its result."""

    def __init__(self, returncode: int):
        super().__init__(returncode)
        self.returncode = returncode


class Interpreter(asyncio.Protocol):
    """One child process: the protocol reading its frames, and the parent's pipe ends."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.in_service = False  # said Ready: its death must be replaced
        self.kill_reason: str | None = None  # set when we kill it on purpose
        self.last_progress: Progress | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._lost = False
        self._buffer = bytearray()
        self._pending: asyncio.Future | None = None  # the awaited Ready or RunResult
        self._pending_seq = 0  # which job's RunResult it awaits (0: Ready)
        self._sent = 0  # jobs sent; the fork server counts them the same way
        self._on_progress: Callable[[float, float], None] | None = None
        self._on_output: Callable[[str, str], None] | None = None
        self._decoder = msgspec.msgpack.Decoder(ToParent)

    async def connect(self, from_child: int, to_child: int) -> None:
        """Take over the parent's pipe ends (fds) for reading frames and writing jobs."""
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: self, os.fdopen(from_child, "rb", buffering=0))
        self._writer, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(to_child, "wb", buffering=0)
        )

    @property
    def usable(self) -> bool:
        return not self._lost and self.kill_reason is None and self.proc.returncode is None

    def expect(
        self,
        on_progress: Callable[[float, float], None] | None = None,
        on_output: Callable[[str, str], None] | None = None,
    ) -> asyncio.Future:
        """A future for the next Ready/RunResult frame; it fails with Died if the child goes."""
        self._pending = asyncio.get_running_loop().create_future()
        self._pending_seq = self._sent + 1 if self.in_service else 0
        self._on_progress, self.last_progress = on_progress, None
        self._on_output = on_output
        if self._lost:
            self._pending.set_exception(Died())
        return self._pending

    def send(self, job: RunJob) -> None:
        self._sent += 1
        self._writer.write(frame(_encoder.encode(job)))

    def close_input(self) -> None:
        """Close the child's input pipe; the runner exits once it reads the EOF."""
        if self._writer is not None:
            self._writer.close()

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.proc.returncode is None:
            kill_group(self.proc.pid)  # with whatever the handler code started
        # Do not wait for EOF: a process forked by handler code may hold the pipe open.
        self.fail_pending()

    def fail_pending(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(Died())

    # asyncio.Protocol: the read end of the child's output pipe

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            end = 4 + int.from_bytes(self._buffer[:4], "big")
            if end > 4 + MAX_FRAME_BYTES:
                self.kill("protocol error: an oversized frame from the interpreter")
                return
            if len(self._buffer) < end:
                return
            body = self._buffer[4:end]
            del self._buffer[:end]
            try:
                message = self._decoder.decode(body)
            except msgspec.MsgspecError as exc:
                self.kill(f"protocol error: {exc}")
                return
            self._dispatch(message)

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, ReportProgress):
            self.last_progress = Progress(current=message.current, total=message.total)
            if self._on_progress is not None:
                try:
                    self._on_progress(message.current, message.total)
                except Exception:
                    logger.exception("progress callback failed")
        elif isinstance(message, ReportOutput):
            if self._on_output is not None:
                try:
                    self._on_output(message.stream, message.text)
                except Exception:
                    logger.exception("output callback failed")
        elif isinstance(message, Exited):
            # Every job's process ends: after its RunResult, unless it died first.
            if (
                message.seq == self._pending_seq
                and self._pending is not None
                and not self._pending.done()
            ):
                self._pending.set_exception(JobDied(message.returncode))
        elif self._pending is not None and not self._pending.done():
            self._pending.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.fail_pending()
