"""The console's gate: every page needs access, every action also a same-origin, CSRF-checked
form, and every answer carries headers that keep it out of frames, caches and referrers.

Endpoints are wrapped explicitly in the route list (``page(overview)``,
``action(replay_one)``), so what a route requires is read where the route is declared.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control.console.access import (
    CSRF_FIELD,
    Access,
    access_of,
    csrf_is_valid,
    origin_is_foreign,
)
from control.console.readings import Stores
from control.console.rendering import render
from control.console.throttle import LoginThrottle
from hrflow_webhooks.redis_setup import unreachable_reason

logger = logging.getLogger(__name__)

FORM_MAX_BYTES = 16_384  # the largest form here is a filter: a few hundred bytes
FORM_MAX_FIELDS = 32

PageEndpoint = Callable[[Request, Access], Awaitable[Response]]
ActionEndpoint = Callable[[Request, Access, Mapping[str, str]], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
        b"form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every answer, errors and static files included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [pair for pair in SECURITY_HEADERS if pair[0] not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class FormError(Exception):
    """A form the console will not read: too big, or not a form."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def throttle_of(request: Request) -> LoginThrottle:
    throttle: LoginThrottle = request.app.state.login_throttle
    return throttle


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def told_to_wait(request: Request) -> Response | None:
    """429 for an address past its wrong tokens (control.console.throttle), before any token
    of it is looked at: a guess learns nothing, the right one included. None: it may try."""
    throttle, client = throttle_of(request), client_of(request)
    wait_s = throttle.wait_s(client)
    if not wait_s:
        return None
    if throttle.starts_waiting(client):
        failures = throttle.failures(client)
        logger.warning("console login throttled", extra={"client": client, "failures": failures})
    seconds = math.ceil(wait_s)
    reason = f"too many wrong tokens from this address: try again in {seconds} s"
    response = refused(request, None, reason, 429)
    response.headers["retry-after"] = str(seconds)
    return response


def wrong_token(request: Request) -> None:
    client = client_of(request)
    failures = throttle_of(request).failed(client)
    logger.warning("console login refused", extra={"client": client, "failures": failures})


async def admitted(request: Request) -> Access | Response:
    """The request's access, or the answer to give it: a Bearer header is a token try like
    the login form's, throttled and counted the same way (a cookie is not: it holds no
    token to guess)."""
    guessing = "authorization" in request.headers
    if guessing and (waiting := told_to_wait(request)) is not None:
        return waiting
    access = await live_access(request)
    if access is not None:
        return access
    if guessing:
        wrong_token(request)
    return login_required(request)


def token_of(request: Request) -> str:
    token: str = request.app.state.token
    return token


def request_access(request: Request) -> Access | None:
    return access_of(token_of(request), request.headers, request.cookies, time.time())


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def own_origins(request: Request) -> frozenset[str]:
    """Where the console's own pages are: ``HRFLOW_CONSOLE_ORIGIN`` when set (behind a
    proxy), else the address it listens on and its loopback names, on the port the
    connection came in on (the server's socket, not a header the client wrote)."""
    configured: str | None = request.app.state.origin
    if configured:
        return frozenset((configured,))
    host, port = request.scope.get("server") or ("127.0.0.1", 0)
    names = {*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host}
    return frozenset(f"http://{name}:{port}" for name in names)


def is_foreign(request: Request) -> bool:
    headers = request.headers
    return origin_is_foreign(
        headers.get("origin"), headers.get("sec-fetch-site"), own_origins(request)
    )


def served_over_https(request: Request) -> bool:
    """The console's own origin is https, or the trusted proxy in front says so (uvicorn
    applies X-Forwarded-Proto from FORWARDED_ALLOW_IPS only): its cookie must be Secure."""
    configured: str | None = request.app.state.origin
    return request.url.scheme == "https" or bool(configured and configured.startswith("https:"))


async def live_access(request: Request) -> Access | None:
    """The request's access, unless its session was logged out."""
    access = request_access(request)
    if access is None or access.session is None:
        return access
    stores: Stores = request.state.stores
    revoked = await stores.redis.exists(stores.keys.console_revoked(access.session))
    return None if revoked else access


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form, size-limited while it arrives. Parsed here with the standard
    library: the console's forms are small and flat, which python-multipart is not needed for."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type not in ("application/x-www-form-urlencoded", ""):
        raise FormError(415, "the console takes urlencoded forms only")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX_BYTES:
            raise FormError(413, "form too large")
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode(), keep_blank_values=True, max_num_fields=FORM_MAX_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        raise FormError(400, "unreadable form") from None
    return dict(pairs)


def login_required(request: Request, message: str | None = None) -> Response:
    """401 with the login form: what a browser shows, and a Bearer hint for scripts."""
    # Back to the page after logging in; an action's URL cannot be revisited with a GET.
    url = request.url
    back = (url.path + (f"?{url.query}" if url.query else "")) if request.method == "GET" else "/"
    context: dict[str, Any] = {"next": back, "message": message}
    response = render(request, "login.html", context, None, status=401)
    response.headers["www-authenticate"] = 'Bearer realm="hrflow-webhooks console"'
    return response


def refused(request: Request, access: Access | None, reason: str, status: int = 403) -> Response:
    return render(request, "error.html", {"reason": reason}, access, status=status)


def unavailable(request: Request, access: Access | None, error: BaseException) -> Response:
    """Redis cannot be read: the page says why in one line (503), not a traceback (500)."""
    logger.warning(
        "console: redis unreachable",
        extra={"error_type": type(error).__name__, "reason": unreachable_reason(error)},
    )
    return refused(request, access, f"Redis is unreachable: {unreachable_reason(error)}", 503)


def page(endpoint: PageEndpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        try:
            access = await admitted(request)
        except (RedisError, OSError) as error:
            return unavailable(request, None, error)
        if isinstance(access, Response):
            return access
        try:
            return await endpoint(request, access)
        except (RedisError, OSError) as error:
            return unavailable(request, access, error)

    return guarded


def action(endpoint: ActionEndpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        # Origin first: a cross-site POST learns nothing, not even whether it was logged in.
        if is_foreign(request):
            return refused(request, None, "this action came from another site's page")
        try:
            access = await admitted(request)
        except (RedisError, OSError) as error:
            return unavailable(request, None, error)
        if isinstance(access, Response):
            return access
        try:
            form = await read_form(request)
        except FormError as error:
            return refused(request, access, error.reason, error.status)
        if not csrf_is_valid(access, form.get(CSRF_FIELD)):
            return refused(request, access, "the form's CSRF token is missing or wrong: reload")
        try:
            return await endpoint(request, access, form)
        except (RedisError, OSError) as error:
            return unavailable(request, access, error)

    return guarded
