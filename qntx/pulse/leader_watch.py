"""How a worker session joined through server addresses finds the leading server again.

A session started with ``--connect`` (a plain worker, or a remote plugin's own session)
watches its control connection: libzmq's own heartbeat (ZMTP PING/PONG) drops a
connection whose server went silent with it open (stopped, or cut off without a reset)
after the heartbeat window, and a server that dies resets it at once. When the
connection is lost, and then at most once a window while no server takes it, the
session's ``rejoin`` runs: it asks the addresses which server leads now and re-points
the session there (``Worker.repoint``), as the same session, so that server adopts the
runs it holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio
import zmq.utils.monitor
from loguru import logger

from qntx.join import SILENT_HEARTBEATS


class LeaderWatch:
    def __init__(self, name: str, heartbeat_s: float, rejoin: Callable[[], Awaitable[None]]):
        self.name = name
        self.window = heartbeat_s * SILENT_HEARTBEATS
        self.heartbeat_s = heartbeat_s
        self.rejoin = rejoin
        self.endpoint = ""  # the server's endpoint the session is connected (or connecting) to
        self.connected = False  # the control connection's handshake is done and not lost since
        self.last_contact = time.monotonic()
        self.holding_off = False  # refused: the session hung up on purpose for a while

    def arm(self, control: zmq.asyncio.Socket, endpoint: str) -> list:
        """Set ``control``'s transport heartbeat (before it connects to ``endpoint``);
        the coroutines that watch it."""
        control.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_s * 1000))
        control.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.window * 1000))
        self.endpoint = endpoint
        monitor = control.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        return [self._watch(monitor), self._look()]

    def heard(self) -> None:
        self.last_contact = time.monotonic()

    def moved(self, endpoint: str) -> None:
        self.endpoint, self.connected = endpoint, False

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = zmq.utils.monitor.parse_monitor_message(await monitor.recv_multipart())
                endpoint = event["endpoint"]
                if (endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else endpoint) != self.endpoint:
                    continue  # (the server this session left)
                self.connected = event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
                if self.connected:
                    self.heard()
        finally:
            monitor.close(0)

    async def _look(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s / 2)
            if self.connected or self.holding_off or time.monotonic() - self.last_contact < self.window:
                continue
            logger.warning("worker {}: lost the server at {}; looking for the leading one", self.name, self.endpoint)
            await self.rejoin()
            self.heard()  # (the next look, a window later unless a server takes the session)
