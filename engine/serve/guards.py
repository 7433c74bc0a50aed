"""Who may talk to the server: the API key, the Host and Origin headers (web pages and DNS rebinding), and the
Content-Type of request bodies (a page can send a CORS-simple POST with no preflight, never one of JSON).

Plain ASGI middlewares (not BaseHTTPMiddleware, which would wrap streaming responses)."""
from __future__ import annotations

import hmac
import logging
from urllib.parse import urlsplit

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.serve.config import is_loopback
from engine.serve.errors import ApiError, error_response

log = logging.getLogger("engine.serve")
OPEN_ROUTES = ("/health",)  # liveness probes need no key; the route says nothing but ok / unhealthy


class ApiKeyMiddleware:
    """Every request but GET /health needs `Authorization: Bearer KEY` (the scheme in any case), compared in
    constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES and not self._authorized(scope):
            response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.expected)


class HostOriginMiddleware:
    """On a loopback bind the Host header (and Origin, when a browser sends one) must name a loopback address or
    one of `allowed_hosts` (a local reverse proxy's name), so that a web page the user visits cannot reach the
    server through its own host name (DNS rebinding) or post to it from its origin. On other binds they must name
    one of `allowed_hosts` when it is given."""

    def __init__(self, app: ASGIApp, bind_host: str, allowed_hosts: list[str] | None) -> None:
        self.app = app
        self.loopback = is_loopback(bind_host)
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self._problem(dict(scope["headers"]))
            if problem is not None:
                await error_response(*problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if not self._allowed(_hostname(host)):
            return 400, (f"the Host header {host!r} is not allowed: {self._rule()}")
        raw_origin = headers.get(b"origin")
        if raw_origin is not None:
            origin = raw_origin.decode("latin-1")
            name = urlsplit(origin).hostname if origin != "null" else None
            if name is None or not self._allowed(name):
                return 403, f"requests from the web origin {origin!r} are not allowed: {self._rule()}"
        return None

    def _allowed(self, name: str | None) -> bool:
        if name is None:
            return False
        if self.allowed is not None and ("*" in self.allowed or name.lower() in self.allowed):
            return True
        return is_loopback(name) if self.loopback else self.allowed is None

    def _rule(self) -> str:
        listed = f" or one of --allowed-hosts {sorted(self.allowed)}" if self.allowed else ""
        if self.loopback:
            return f"the server is bound to a loopback address; use 127.0.0.1, localhost or [::1]{listed}"
        return f"use one of --allowed-hosts {sorted(self.allowed or ())}"


def _hostname(host: str) -> str | None:
    """The name of a Host header value (host, host:port, [v6]:port); None when empty or malformed."""
    if not host:
        return None
    try:
        return urlsplit(f"//{host}").hostname
    except ValueError:
        return None


def require_content_type(request: Request, expected: str) -> None:
    """415 unless the body is declared as `expected` (parameters such as charset allowed)."""
    declared = request.headers.get("content-type", "")
    if declared.split(";")[0].strip().lower() != expected:
        raise ApiError(415, f"send this route's body as Content-Type: {expected}, got {declared or 'none'!r}")


def warn_if_open(host: str, api_key: str | None, weight_updates: bool) -> None:
    """A loud line at start for a server that anyone on the network may use."""
    if not is_loopback(host) and not api_key:
        rule = "!" * 100
        power = "generate with it" + (" and replace its weights (--enable-weight-updates)" if weight_updates else "")
        log.warning("\n%s\nThe server listens on %s WITHOUT an API key: anyone who can reach this address can %s.\n"
                    "Give --api-key KEY (or ETTRL_API_KEY), and --allowed-hosts.\n%s", rule, host, power, rule)
