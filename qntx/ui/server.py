"""Starting the dashboard: checks where it may listen, then serves until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import signal
import sys
import webbrowser

from aiohttp import web

from qntx.aio import AsyncBus
from qntx.errors import Unavailable
from qntx.settings import Settings
from qntx.ui.access import (
    TOKEN_FILE,
    Access,
    check_bind,
    is_loopback,
    load_token,
    middleware,
    public_origin,
)
from qntx.ui.live import Hub
from qntx.ui.routes import Routes, errors

# The dashboard waits less for an answer than a script does: a page should say
# the bus is down within seconds.
REQUEST_TIMEOUT_S = 3.0


async def _open(url: str) -> None:
    """Open ``url`` in the user's browser, off the loop (a console browser would block it);
    on a Linux session without a display there is none to open."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        print("No display here to open a browser on: open the address above (or tunnel to it).")
        return
    await asyncio.get_running_loop().run_in_executor(None, webbrowser.open, url)


def build_app(bus: AsyncBus, access: Access) -> tuple[web.Application, Hub]:
    hub = Hub(bus)
    app = web.Application(middlewares=[middleware(access), errors])
    app.add_routes(Routes(hub, access.csrf).table())
    return app, hub


def serve(
    settings: Settings, *, host: str, port: int, allow_remote: bool, open_browser: bool
) -> None:
    """Serve the dashboard of ``settings.home`` on host:port until SIGINT/SIGTERM."""
    check_bind(host, allow_remote)
    public_origin(settings.ui_public_url)  # a bad one is bad input before anything starts
    token = None
    if not is_loopback(host):
        token, made = load_token(settings.home)
        where = settings.home / TOKEN_FILE
        print(
            f"Access token (made now, kept in {where}): {token}"
            if made
            else f"Access token: in {where}"
        )
    asyncio.run(_serve(settings, host, port, token, open_browser))


async def _serve(
    settings: Settings, host: str, port: int, token: str | None, open_browser: bool
) -> None:
    if settings.connect:  # the bus of another host, through its server's address
        from qntx.join import join

        settings = await asyncio.to_thread(join, settings)
    bus = AsyncBus(
        dataclasses.replace(
            settings, request_timeout_s=min(settings.request_timeout_s, REQUEST_TIMEOUT_S)
        )
    )
    access = Access(
        port=port, token=token, csrf=secrets.token_urlsafe(24),
        public=public_origin(settings.ui_public_url),
    )  # fmt: skip
    app, hub = build_app(bus, access)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await bus.close()
        raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/"
    print(f"Dashboard: {url} (home {settings.home}); Ctrl-C stops it", flush=True)
    if access.public:
        print(f"Public address (through a proxy): {settings.ui_public_url}", flush=True)
    if open_browser:
        await _open(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pushing = asyncio.ensure_future(hub.run())
    try:
        await stop.wait()
    finally:
        pushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pushing
        await runner.cleanup()
        await bus.close()
