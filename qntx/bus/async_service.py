"""The asyncio flavour of the actor runtime, for actors whose work is waiting.

Workers wait on plugins and the python plugin waits on interpreter processes, so
they run on asyncio: ``AsyncService`` is the ``Responder`` of ``qntx.bus.service``
(the same frame rules, typed errors, handler tables and request counts as the
poll-loop ``Service``) on an asyncio socket; a coroutine handler runs as its own
task, so one slow job never holds up a Health check.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from typing import Any

import zmq
import zmq.asyncio
from loguru import logger

from qntx.bus.codec import error_reply
from qntx.bus.gate import Gate, RolePolicy
from qntx.bus.security import PLAIN, Security, stop_zap
from qntx.bus.service import Handler, Request, Responder, dropped, error_for
from qntx.bus.sockets import bound_socket, with_peer


class AsyncService(Responder):
    def __init__(
        self,
        context: zmq.asyncio.Context,
        endpoint: str,
        request_type: Any,
        handlers: dict[type, Handler],
        *,
        label: str,
        max_message_bytes: int,
        security: Security = PLAIN,
        roles: RolePolicy | None = None,
    ):
        socket = bound_socket(context, zmq.ROUTER, security, endpoint, max_message_bytes=max_message_bytes)
        gate = Gate(security, endpoint, roles)
        super().__init__(socket, request_type, handlers, label=label, max_message_bytes=max_message_bytes, gate=gate)
        self._tasks: set[asyncio.Task] = set()

    def _send(self, identity: bytes, correlation: bytes, body: bytes) -> None:
        try:
            sent = self.socket.send_multipart([identity, correlation, body], zmq.NOBLOCK)
            sent.add_done_callback(self._check_sent)
        except (zmq.Again, zmq.ZMQError) as exc:
            dropped(identity, exc.strerror)

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
                frames, peer = with_peer(await self.socket.recv_multipart(copy=False))
            else:
                frames, peer = await self.socket.recv_multipart(), None
            try:
                self.handle(frames, peer)
            except Exception:  # whatever a peer sends, the service keeps serving
                logger.exception("{} recovered from a bad message", self.label)

    def run(self, handler: Handler, message: Any, request: Request) -> None:
        if not inspect.iscoroutinefunction(handler):
            super().run(handler, message, request)
            return
        task = asyncio.get_running_loop().create_task(self._run(handler, message, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, handler, message: Any, request: Request) -> None:
        try:
            reply = await handler(message, request)
        except Exception as exc:  # (a cancellation is no Exception: it passes)
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
