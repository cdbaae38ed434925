"""Blocking work off a poll-loop actor's thread, its outcome back on the loop."""

from __future__ import annotations

import collections
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qntx.bus.actor import Actor


class Offloader:
    """Runs blocking work on one background thread; its callback runs on the loop.

    For work that releases the GIL (an fsync) and must not stall the loop meanwhile.
    Jobs run one at a time, in order. A pipe wakes the poll loop when one is done.
    """

    def __init__(self, actor: Actor, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._actor = actor
        actor.add_reader(self._read_fd, self.drain)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], Any], callback: Callable[[Any], None]) -> None:
        """Run ``work()`` off the loop; later ``callback(result or exception)`` on it."""
        self._jobs.put((work, callback))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, callback = job
            try:
                result = work()
            except BaseException as exc:  # handed to the callback, which decides
                result = exc
            self._done.append((callback, result))
            # Not kept while waiting for the next job: what a job refers to may be big
            # (a commit's rows hold the payloads and results they write).
            job = work = callback = result = None
            os.write(self._write_fd, b"!")

    def drain(self) -> None:
        try:
            os.read(self._read_fd, 4096)
        except BlockingIOError:
            pass
        while self._done:
            callback, result = self._done.popleft()
            self._actor._guarded(functools.partial(callback, result))

    def close(self) -> None:
        """Finish the queued work, run its callbacks, stop the thread."""
        self._jobs.put(None)
        self._thread.join()
        self.drain()
        self._actor.remove_reader(self._read_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)
