"""Who may reach the dashboard, and who may act through it.

On a loopback address (the default) anyone on this machine may look: the same
people who can run ``qntx`` here. Binding anywhere else needs ``--allow-remote``
and then every request must carry the access token (kept in ``<home>/ui.token``,
printed when it is made): once as ``?token=`` (which sets a cookie), or as
``Authorization: Bearer``. A loopback server also checks the Host header, so a
page of another site cannot reach it through a name it resolves to 127.0.0.1.

Actions are POSTs carrying the page's anti-forgery value in a header (another
site can make a browser POST, but not with a custom header), with an Origin, if
sent, naming this server: as the request reached it, or as ``ui_public_url``
says people open it through a proxy (a TLS proxy makes the browser's Origin
``https://`` while the request reaches this server over plain http). No header a
proxy adds (X-Forwarded-*) is trusted: the public address is configured.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from qntx.errors import Invalid

TOKEN_FILE = "ui.token"
COOKIE = "qntx_ui"
CSRF_HEADER = "X-Qntx-Csrf"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless asked for explicitly."""
    if not is_loopback(host) and not allow_remote:
        raise Invalid(
            f"{host} is not a loopback address: anyone who can reach it would see and steer the bus; "
            "pass --allow-remote to require the access token there, or use an SSH tunnel"
        )


def load_token(home: Path) -> tuple[str, bool]:
    """The access token of this home, and whether it was made just now."""
    path = home / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token, False
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token, True


def public_origin(url: str) -> str | None:
    """The origin (``scheme://host[:port]``) of ``ui_public_url``; None when it is unset."""
    if not url:
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"ui_public_url must be http(s)://HOST[:PORT], got {url!r}")
    default = {"http": 80, "https": 443}[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def _host_name(host_header: str) -> str:
    return host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header


@dataclass(frozen=True)
class Access:
    """The rules one server applies: ``token`` None means loopback (no token asked);
    ``public`` is the origin of ``ui_public_url`` (None: not behind a proxy)."""

    port: int
    token: str | None
    csrf: str
    public: str | None = None

    def allowed_host(self, host_header: str) -> bool:
        if self.token is not None:
            return True  # the token decides; any name may lead here
        name = _host_name(host_header)
        if self.public is not None and name.lower() == _host_name(self.public.split("://", 1)[1]).lower():
            return True  # the proxy passed on the public name
        return is_loopback(name)

    def has_token(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        offered = [
            request.cookies.get(COOKIE, ""),
            request.query.get("token", ""),
            request.headers.get("Authorization", "").removeprefix("Bearer "),
        ]
        return any(hmac.compare_digest(o.encode(), self.token.encode()) for o in offered if o)

    def may_act(self, request: web.Request) -> bool:
        offered = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(offered.encode(), self.csrf.encode()):
            return False
        origin = request.headers.get("Origin")
        return origin is None or origin in (f"{request.scheme}://{request.host}", self.public)


def middleware(access: Access):
    @web.middleware
    async def guard(request: web.Request, handler):
        if not access.allowed_host(request.host):
            return web.json_response({"error": "unknown host name"}, status=403)
        if not access.has_token(request):
            return web.json_response({"error": "the access token is missing or wrong"}, status=401)
        if request.method not in ("GET", "HEAD") and not access.may_act(request):
            return web.json_response({"error": "a cross-site request was refused"}, status=403)
        response = await handler(request)
        if access.token is not None and request.query.get("token") and not response.prepared:
            response.set_cookie(COOKIE, access.token, httponly=True, samesite="Strict")
        return response

    return guard
