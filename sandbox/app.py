"""The sandbox HrFlow API: an aiohttp.web app speaking HrFlow's dialect for the profile
endpoints the product uses, with recorded calls and injectable faults.

API (HrFlow's paths, envelopes and errors):

- ``GET /v1/profile/parsing?source_key=&key=|reference=``   the parsing object
- ``GET /v1/profile/indexing?source_key=&key=|reference=``  a profile, read shape
- ``POST /v1/profile/indexing``  index a profile (write shape; 201)
- ``PUT /v1/profile/indexing``   edit one, by ``key`` or ``reference`` (fields sent replace)

Control (for tests, demos and benchmarks; no authentication):

- ``GET|DELETE /_sandbox/calls``     every API call: method, path, query, body, status
- ``GET|POST /_sandbox/profiles``    list, or store ``{"source_key", "profile"}`` directly
- ``GET|POST|DELETE /_sandbox/faults``  list, add (one fault or ``{"faults": [...]}``), clear
- ``GET /_sandbox/webhooks``         webhook deliveries sent after POSTs
- ``POST /_sandbox/reset``           back to start: seeds, no calls, start-up faults only
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from pydantic import ValidationError

from hrflow_client.profiles import ProfileWrite
from hrflow_webhooks.signatures import sign
from sandbox.faults import Fault, Faults, Outcome
from sandbox.store import DuplicateReferenceError, ProfileStore

logger = logging.getLogger(__name__)

DEFAULT_API_KEY = "sandbox-api-key"
DEFAULT_API_USER = "sandbox@hrflow.local"
API_PREFIX = "/v1/"
PARSING = "/v1/profile/parsing"
INDEXING = "/v1/profile/indexing"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SandboxState:
    api_key: str
    api_user: str
    seed: bool
    startup_faults: list[Fault]
    webhook_url: str | None = None
    webhook_secret: str | None = None
    profiles: ProfileStore = field(default_factory=ProfileStore)
    calls: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    faults: Faults = field(default_factory=lambda: Faults(random.Random()))
    session: aiohttp.ClientSession | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def reset(self) -> None:
        self.calls.clear()
        self.webhooks.clear()
        self.faults.clear()
        for fault in self.startup_faults:
            self.faults.add(Fault.from_json(fault.to_json()))
        self.profiles.clear()
        if self.seed:
            self.profiles.seed()

    def calls_to(self, method: str, path: str = INDEXING) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["method"] == method and c["path"] == path]


STATE = web.AppKey("sandbox_state", SandboxState)


def envelope(status: int, message: str, data: Any = None) -> web.Response:
    """HrFlow's answer. Content-Type exactly ``application/json``: the SDK compares it verbatim."""
    body: dict[str, Any] = {"code": status, "message": message}
    if data is not None or status < 400:
        body["data"] = data
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


# --- the API middleware: record, inject faults, authenticate ---------------------------------


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()  # cached by aiohttp: the middleware and the handler both read it
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


async def _apply(outcome: Outcome) -> web.Response | None:
    if outcome.latency_ms:
        await asyncio.sleep(outcome.latency_ms / 1000)
    if outcome.hang_s is not None:
        await asyncio.sleep(outcome.hang_s)
        return envelope(504, "Gateway timeout (injected)")
    if outcome.status is None:
        return None
    response = envelope(outcome.status, f"Injected fault: HTTP {outcome.status}")
    if outcome.retry_after_s is not None:
        response.headers["Retry-After"] = f"{outcome.retry_after_s:g}"
    return response


def _authorised(request: web.Request, state: SandboxState) -> bool:
    return (
        request.headers.get("X-API-KEY") == state.api_key
        and request.headers.get("X-USER-EMAIL") == state.api_user
    )


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    state = request.app[STATE]
    call: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "body": await _json_body(request),
        "at": time.time(),
    }
    state.calls.append(call)
    outcome = state.faults.decide(request.method, request.path)
    response = await _apply(outcome)
    if response is None and not _authorised(request, state):
        response = envelope(401, "Unauthorized: invalid X-API-KEY or X-USER-EMAIL")
    answer = response if response is not None else await handler(request)
    call.update(status=answer.status, faults=outcome.applied, answered_at=time.time())
    return answer


# --- the API ---------------------------------------------------------------------------------


def _lookup(request: web.Request) -> tuple[dict[str, Any] | None, web.Response | None]:
    query = request.query
    source_key = query.get("source_key")
    if not source_key or not (query.get("key") or query.get("reference")):
        return None, envelope(
            400, "Invalid parameters: source_key and key or reference are required"
        )
    profile = request.app[STATE].profiles.get(source_key, query.get("key"), query.get("reference"))
    if profile is None:
        return None, envelope(404, "Unable to find object: profile")
    return profile, None


async def get_indexing(request: web.Request) -> web.Response:
    profile, error = _lookup(request)
    return error or envelope(200, "Profile details", profile)


_PARSING_FIELDS = (
    "info", "text", "text_language", "experiences", "educations", "skills", "languages",
    "interests", "certifications", "courses", "tasks",
)  # fmt: skip


async def get_parsing(request: web.Request) -> web.Response:
    profile, error = _lookup(request)
    if error is not None or profile is None:
        return error or envelope(404, "Unable to find object: profile")
    parsing = {name: profile.get(name) for name in _PARSING_FIELDS}
    data = {"key": profile["key"], "source": profile["source"], "parsing": parsing}
    return envelope(200, "Parsing details", data)


def _valid_write(body: Any) -> tuple[dict[str, Any] | None, web.Response | None]:
    if not isinstance(body, dict):
        return None, envelope(400, "Invalid source fields")
    try:
        ProfileWrite.model_validate(body)
    except ValidationError as error:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in error.errors()})
        return None, envelope(400, "Invalid source fields", {"fields": fields[:20]})
    return body, None


async def post_indexing(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body, error = _valid_write(await _json_body(request))
    if error is not None or body is None:
        return error or envelope(400, "Invalid source fields")
    try:
        profile = state.profiles.add(body["source_key"], body)
    except DuplicateReferenceError:
        return envelope(400, "A profile with this reference already exists in the source")
    _notify(state, profile)
    return envelope(201, "Profile created", profile)


async def put_indexing(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body, error = _valid_write(await _json_body(request))
    if error is not None or body is None:
        return error or envelope(400, "Invalid source fields")
    if not body.get("key") and not body.get("reference"):
        return envelope(400, "Invalid parameters: key or reference is required")
    profile = state.profiles.get(body["source_key"], body.get("key"), body.get("reference"))
    if profile is None:
        return envelope(404, "Unable to find object: profile")
    return envelope(200, "Profile edited", state.profiles.edit(profile, body))


# --- HrFlow's asynchronous notification ------------------------------------------------------


def _notify(state: SandboxState, profile: dict[str, Any]) -> None:
    url, secret, session = state.webhook_url, state.webhook_secret, state.session
    if not url or not secret or session is None:
        return
    event = {
        "type": "profile.parsing.success",
        "origin": "api",
        "message": "Profile parsed",
        "profile": {
            "key": profile["key"],
            "reference": profile["reference"],
            "source": {"key": profile["source"]["key"]},
        },
    }
    delivery = _deliver(state, session, url, sign(orjson.dumps(event), secret.encode()), event)
    task = asyncio.create_task(delivery)
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def _deliver(
    state: SandboxState,
    session: aiohttp.ClientSession,
    url: str,
    signature: str,
    event: dict[str, Any],
) -> None:
    headers = {"HTTP-HRFLOW-SIGNATURE": signature, "Content-Type": "application/json"}
    body = orjson.dumps(event)
    record: dict[str, Any] = {"url": url, "at": time.time(), "status": None}
    state.webhooks.append(record)
    try:
        async with session.post(url, data=body, headers=headers) as response:
            record["status"] = response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        record["error"] = type(error).__name__
        logger.warning("webhook delivery failed", extra={"error_type": type(error).__name__})


# --- control ---------------------------------------------------------------------------------


async def list_calls(request: web.Request) -> web.Response:
    return web.json_response({"calls": request.app[STATE].calls}, dumps=_dumps)


async def clear_calls(request: web.Request) -> web.Response:
    request.app[STATE].calls.clear()
    return web.json_response({"calls": []})


async def list_profiles(request: web.Request) -> web.Response:
    return web.json_response({"profiles": request.app[STATE].profiles.all()}, dumps=_dumps)


async def store_profile(request: web.Request) -> web.Response:
    """Store a profile directly (test set-up): no call recorded, no webhook sent."""
    state = request.app[STATE]
    body = await _json_body(request)
    if not isinstance(body, dict) or "source_key" not in body or "profile" not in body:
        return web.json_response({"error": 'expected {"source_key", "profile"}'}, status=400)
    write = {**body["profile"], "source_key": body["source_key"]}
    _, error = _valid_write(write)
    if error is not None:
        return error
    existing = state.profiles.get(body["source_key"], write.get("key"), write.get("reference"))
    if existing is not None:
        return web.json_response(state.profiles.edit(existing, write), dumps=_dumps)
    stored = state.profiles.add(body["source_key"], write, key=write.get("key"))
    return web.json_response(stored, dumps=_dumps)


async def list_faults(request: web.Request) -> web.Response:
    rules = [f.to_json() for f in request.app[STATE].faults.rules]
    return web.json_response({"faults": rules})


async def add_faults(request: web.Request) -> web.Response:
    body = await _json_body(request)
    items = body.get("faults", [body]) if isinstance(body, dict) else None
    try:
        faults = [Fault.from_json(item) for item in items or []]
    except (TypeError, ValueError) as error:
        return web.json_response({"error": str(error)}, status=400)
    for fault in faults:
        request.app[STATE].faults.add(fault)
    return await list_faults(request)


async def clear_faults(request: web.Request) -> web.Response:
    request.app[STATE].faults.clear()
    return web.json_response({"faults": []})


async def list_webhooks(request: web.Request) -> web.Response:
    return web.json_response({"webhooks": request.app[STATE].webhooks})


async def reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"reset": True})


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# --- the app ---------------------------------------------------------------------------------


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    yield
    # Stopping must be quick (Ctrl-C in `make run`): webhooks still in flight are dropped.
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    await state.session.close()


def _startup_faults(latency_ms: float, fail_rate: float, status: int) -> list[Fault]:
    faults = []
    if latency_ms:
        faults.append(Fault(latency_ms=latency_ms))
    if fail_rate:
        retry_after = 1.0 if status == 429 else None
        faults.append(Fault(status=status, rate=fail_rate, retry_after_s=retry_after))
    return faults


def create_app(
    *,
    api_key: str = DEFAULT_API_KEY,
    api_user: str = DEFAULT_API_USER,
    latency_ms: float = 0.0,
    fail_rate: float = 0.0,
    status: int = 500,
    seed: bool = True,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    random_seed: int | None = None,
) -> web.Application:
    """The sandbox app; ``app[STATE]`` gives in-process access to its state."""
    state = SandboxState(
        api_key=api_key,
        api_user=api_user,
        seed=seed,
        startup_faults=_startup_faults(latency_ms, fail_rate, status),
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        faults=Faults(random.Random(random_seed)),
    )
    state.reset()
    app = web.Application(middlewares=[api_middleware], client_max_size=16 * 1024 * 1024)
    app[STATE] = state
    app.cleanup_ctx.append(_http_session)
    app.router.add_routes(
        [
            web.get(PARSING, get_parsing),
            web.get(INDEXING, get_indexing),
            web.post(INDEXING, post_indexing),
            web.put(INDEXING, put_indexing),
            web.get("/_sandbox/calls", list_calls),
            web.delete("/_sandbox/calls", clear_calls),
            web.get("/_sandbox/profiles", list_profiles),
            web.post("/_sandbox/profiles", store_profile),
            web.get("/_sandbox/faults", list_faults),
            web.post("/_sandbox/faults", add_faults),
            web.delete("/_sandbox/faults", clear_faults),
            web.get("/_sandbox/webhooks", list_webhooks),
            web.post("/_sandbox/reset", reset),
        ]
    )
    return app


def run_sandbox(
    host: str,
    port: int,
    latency_ms: float,
    fail_rate: float,
    status: int,
    seed: bool,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
) -> None:
    """Serve the sandbox until interrupted (blocking): the CLI's entry point."""
    app = create_app(
        latency_ms=latency_ms,
        fail_rate=fail_rate,
        status=status,
        seed=seed,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
    )
    print(f"sandbox HrFlow API on http://{host}:{port}/v1", flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None, shutdown_timeout=5.0)
