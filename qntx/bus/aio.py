"""The asyncio flavour of the actor runtime, for actors whose work is waiting.

Workers wait on plugins and the python plugin waits on interpreter processes, so
they run on asyncio: ``AsyncService`` answers a ROUTER with the same frame rules,
typed errors and handler tables as the poll-loop ``Service``; a coroutine handler
runs as its own task, so one slow job never holds up a Health check.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from loguru import logger

from qntx.bus.actor import (
    REPLY_QUEUE_LIMIT,
    Gate,
    Request,
    RolePolicy,
    admit,
    answer,
    error_for,
)
from qntx.bus.codec import HARD_LIMIT_FACTOR, Decoder, encode, error_reply
from qntx.bus.security import PLAIN, Security, peer_name, stop_zap


class AsyncService:
    def __init__(
        self,
        context: zmq.asyncio.Context,
        endpoint: str,
        request_type: Any,
        handlers: dict[type, Callable[[Any, Request], Any]],
        *,
        label: str,
        max_message_bytes: int,
        security: Security = PLAIN,
        roles: RolePolicy | None = None,
    ):
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes * HARD_LIMIT_FACTOR)
        self.socket.setsockopt(zmq.SNDHWM, REPLY_QUEUE_LIMIT)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        security.bind(self.socket, endpoint)  # a tcp bind starts the ZAP handler first
        self.gate = Gate(security, endpoint, roles)
        self.decoder = Decoder(request_type)
        self.handlers = handlers
        self.label = label
        self.refused: dict[str, int] = {}  # messages refused before a handler saw them, by reason
        self.max_message_bytes = max_message_bytes
        self._tasks: set[asyncio.Task] = set()

    def send_reply(self, request: Request, message: msgspec.Struct) -> None:
        self.send(request.identity, request.correlation, message)

    def send(self, identity: bytes, correlation: bytes, message: msgspec.Struct) -> None:
        if not correlation:
            return
        try:
            sent = self.socket.send_multipart([identity, correlation, encode(message)], zmq.NOBLOCK)
            sent.add_done_callback(self._check_sent)
        except (zmq.Again, zmq.ZMQError) as exc:
            logger.warning("dropped a reply to peer {}: {}", identity.hex(), exc.strerror)

    @staticmethod
    def _check_sent(future: asyncio.Future) -> None:
        # An asyncio send fails inside its future (e.g. the peer has gone).
        if not future.cancelled() and future.exception() is not None:
            logger.warning("dropped a reply: {}", future.exception())

    async def serve_forever(self) -> None:
        while True:
            # An asyncio socket returns an already-completed future when a message
            # is waiting, so a busy socket is drained without waking the selector.
            if self.gate.curve:
                received = await self.socket.recv_multipart(copy=False)
                frames, peer = [f.bytes for f in received], peer_name(received[-1])
            else:
                frames, peer = await self.socket.recv_multipart(), None
            try:
                self._handle(frames, peer)
            except Exception:  # whatever a peer sends, the service keeps serving
                logger.exception("{} recovered from a bad message", self.label)

    def _handle(self, frames: list[bytes], peer: str | None = None) -> None:
        admitted = admit(self, frames, peer)
        if admitted is None:
            return
        handler, message, request = admitted
        if inspect.iscoroutinefunction(handler):
            task = asyncio.get_running_loop().create_task(self._run(handler, message, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            answer(handler, message, request)

    def reject(self, identity: bytes, correlation: bytes, error) -> None:
        self.send(identity, correlation, error_reply(error))

    async def _run(self, handler, message: Any, request: Request) -> None:
        try:
            reply = await handler(message, request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reply = error_reply(error_for(message, exc))
        if reply is not None:
            request.reply(reply)

    def running_tasks(self) -> list[asyncio.Task]:
        """Handlers still at work (e.g. jobs being executed)."""
        return [t for t in self._tasks if not t.done()]

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.socket.close(0)
        stop_zap(self.socket.context)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

