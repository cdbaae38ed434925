"""Following jobs live over the server's event stream.

One SUB socket per ``Bus`` subscribes to every ``job.`` event and keeps the
newest final record of each job it sees, so waiting for thousands of jobs costs
one socket. Events are fast but not guaranteed (PUB drops for slow readers and a
subscription takes a moment to reach the server), so a follower also asks the
server for the record now and then: a missed event costs latency, never a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import zmq

from qntx.bus.codec import Decoder
from qntx.errors import Timeout
from qntx.protocol import FINAL_STATUSES, Event, Job, JobChanged, JobProgressed

RECHECK_S = 0.5


class JobFollower:
    def __init__(self, endpoint: str, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"job.")
        self._socket.connect(endpoint)
        self._decoder = Decoder(Event)
        self._final: dict[str, Job] = {}
        self._backlog: dict[str, list[JobChanged | JobProgressed]] = {}
        self._watching: set[str] = set()

    def _pump(self, wait_s: float) -> None:
        """Read events for up to wait_s (returns early after the first batch)."""
        if not self._socket.poll(max(0.0, wait_s) * 1000):
            return
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            event = self._decoder.decode(frames[1])
            if isinstance(event, JobChanged):
                job_id = event.job.id
                if event.job.status in FINAL_STATUSES:
                    self._final[job_id] = event.job
            elif isinstance(event, JobProgressed):
                job_id = event.job_id
            else:
                continue
            if job_id in self._watching:
                self._backlog.setdefault(job_id, []).append(event)

    def follow(
        self, job_id: str, timeout: float | None, fetch: Callable[[str], Job]
    ) -> Iterator[JobChanged | JobProgressed]:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._watching.add(job_id)
        try:
            next_check = 0.0
            while True:
                final = self._final.pop(job_id, None)
                yield from self._backlog.pop(job_id, [])
                if final is not None:
                    return
                now = time.monotonic()
                if now >= next_check:
                    job = fetch(job_id)
                    if job.status in FINAL_STATUSES:
                        yield JobChanged(job=job)
                        return
                    next_check = now + RECHECK_S
                if deadline is not None and now >= deadline:
                    raise Timeout(f"job {job_id} did not finish within {timeout:g}s")
                wait = next_check - now if deadline is None else min(next_check, deadline) - now
                self._pump(wait)
        finally:
            self._watching.discard(job_id)
            self._final.pop(job_id, None)

    def close(self) -> None:
        self._socket.close(0)
