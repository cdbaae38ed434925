"""The dashboard's HTTP surface: the page, its static files, JSON reads and POST actions.

Every read and action goes through the scripting API (``AsyncBus``), the same
code the CLI runs. A QntxError becomes a JSON ``{"error": ...}`` with a status
that matches its cause (400 for bad input, with the ``position`` of a query that
does not parse).
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web

from qntx.api import ax_filter, make_filter
from qntx.errors import Conflict, Invalid, InvalidQuery, NotFound, QntxError, Timeout, Unavailable
from qntx.protocol import JOB_STATUSES, MAX_PAGE
from qntx.ui.live import Hub
from qntx.ui.views import (
    attestation_row,
    bulk_steer,
    handler_detail,
    handler_listing,
    job_detail,
    job_listing,
    now_ms,
)

STATIC = resources.files("qntx.ui") / "static"
PAGE_SIZE = 25
HTTP_STATUS = {Invalid: 400, NotFound: 404, Conflict: 409, Unavailable: 503, Timeout: 503}


def json(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except QntxError as exc:
        status = next((code for cls, code in HTTP_STATUS.items() if isinstance(exc, cls)), 500)
        body: dict[str, Any] = {"error": str(exc), "code": exc.code}
        if isinstance(exc, InvalidQuery):
            body["position"] = exc.position
        return json(body, status)


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise Invalid(f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise Invalid(f"{name} must be between {low} and {high}")
    return value


class Routes:
    def __init__(self, hub: Hub, csrf: str):
        self.hub = hub
        self.bus = hub.bus
        self.csrf = csrf
        self._actions = {
            "cancel": self.bus.cancel,
            "retry": self.bus.retry,
            "pause": self.bus.pause,
            "resume": self.bus.resume,
        }

    def table(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            web.get("/api/overview", self.overview),
            web.get("/api/jobs", self.jobs),
            web.get("/api/jobs/{id}", self.job),
            web.post("/api/jobs/{id}/{action}", self.act),
            web.post("/api/bulk/{action}", self.bulk),
            web.get("/api/handlers", self.handlers),
            web.get("/api/handlers/{name}", self.handler),
            web.get("/api/attestations", self.attestations),
            web.get("/api/events", self.hub.stream),
            web.get("/static/{name}", self.static),
            web.get("/favicon.ico", self.no_icon),
            web.get("/metrics", self.metrics),
        ]

    async def index(self, request: web.Request) -> web.Response:
        page = (STATIC / "index.html").read_text()
        page = page.replace("{{csrf}}", self.csrf).replace("{{statuses}}", ",".join(JOB_STATUSES))
        return web.Response(
            text=page, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kinds = {
            ".js": "text/javascript",
            ".css": "text/css",
            ".png": "image/png",
            ".svg": "image/svg+xml",
        }
        kind = next((k for suffix, k in kinds.items() if name.endswith(suffix)), None)
        item = STATIC / name
        if kind is None or "/" in name or not item.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=item.read_bytes(), content_type=kind)

    async def metrics(self, request: web.Request) -> web.Response:
        """The bus's Prometheus metrics, as ``qntx up`` serves them (same home only)."""
        from qntx.obs.endpoint import CONTENT_TYPE, render, served

        settings = self.bus.settings
        if not served(settings):
            raise NotFound(f"no metrics: qntx up is not running on {settings.home} with metrics on")
        body = await asyncio.to_thread(render, settings)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def overview(self, request: web.Request) -> web.Response:
        return json(await self.hub.current_overview())

    async def jobs(self, request: web.Request) -> web.Response:
        status = request.query.get("status") or None
        if status is not None and status not in JOB_STATUSES:
            raise Invalid(f"unknown status {status!r} (one of {', '.join(JOB_STATUSES)})")
        since_min = _int(request, "since_min", 0, 0, 10_000_000)
        listing = await job_listing(
            self.bus,
            status=status,
            handler=request.query.get("handler") or None,
            since_ms=now_ms() - since_min * 60_000 if since_min else None,
            limit=_int(request, "limit", PAGE_SIZE, 1, MAX_PAGE),
            cursor=request.query.get("cursor") or None,
        )
        return json(listing)

    async def job(self, request: web.Request) -> web.Response:
        return json({"job": job_detail(await self.bus.job(request.match_info["id"]))})

    async def act(self, request: web.Request) -> web.Response:
        action = self._actions.get(request.match_info["action"])
        if action is None:
            raise NotFound(
                f"no action {request.match_info['action']!r} (cancel, retry, pause or resume)"
            )
        return json({"job": job_detail(await action(request.match_info["id"]))})

    async def bulk(self, request: web.Request) -> web.Response:
        """``POST /api/bulk/retry|cancel?status=&handler=&since_min=``: every job the
        same filters as ``/api/jobs`` show, each once; how many, and how many skipped."""
        action = request.match_info["action"]
        if action not in ("retry", "cancel"):
            raise NotFound(f"no bulk action {action!r} (retry or cancel)")
        status = request.query.get("status") or None
        if status is not None and status not in JOB_STATUSES:
            raise Invalid(f"unknown status {status!r} (one of {', '.join(JOB_STATUSES)})")
        handler = request.query.get("handler") or None
        since_min = _int(request, "since_min", 0, 0, 10_000_000)
        if status is None and handler is None and not since_min:
            raise Invalid("choose the jobs first: a status, a handler or a time")
        since_ms = now_ms() - since_min * 60_000 if since_min else None
        return json(await bulk_steer(self.bus, action, status=status, handler=handler, since_ms=since_ms))

    async def handlers(self, request: web.Request) -> web.Response:
        return json(await handler_listing(self.bus))

    async def handler(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        detail = await handler_detail(self.bus, name)
        if detail is None:
            raise NotFound(f"no handler named {name!r}")
        return json(detail)

    async def attestations(self, request: web.Request) -> web.Response:
        text = request.query.get("q", "")
        limit = _int(request, "limit", PAGE_SIZE, 1, MAX_PAGE)
        # an empty query: the newest attestations
        flt = ax_filter(text, limit) if text.strip() else make_filter(limit=limit)
        flt = msgspec.structs.replace(flt, cursor=request.query.get("cursor") or None)
        records, cursor = await self.bus.query_page(flt)
        return json({"records": [attestation_row(r) for r in records], "cursor": cursor})
