"""The sandbox HrFlow API: an aiohttp.web app speaking HrFlow's dialect for the profile
endpoints the product uses, with recorded calls and injectable faults.

API (HrFlow's paths, envelopes and errors):

- ``GET /v1/profile/parsing?source_key=&key=|reference=``   the parsing object
- ``GET /v1/profile/indexing?source_key=&key=|reference=``  a profile, read shape
- ``POST /v1/profile/indexing``  index a profile (write shape; 201)
- ``PUT /v1/profile/indexing``   edit one, by ``key`` or ``reference`` (fields sent replace)
- ``GET /v1/storing/profiles?source_keys=["k"]&page=&limit=&...``  list profiles, paged
- ``PATCH /v1/profile/indexing/archive``  ``{"source_key", "key"|"reference"|"email",
  "is_archive": 1|0}``: archive or unarchive one

Archived profiles (HrFlow documents no more than the endpoint, so the least surprising
reading): the listing leaves them out, being the way to enumerate live profiles; GET
still answers them, with ``archive`` set to when they were archived. A 404 would make
an archived profile look deleted, although it can be unarchived and its reference stays
taken, and the read shape's ``archive`` field (``null`` in every example) only makes
sense if archived profiles can be read.

Webhooks (with a URL and a secret): ``profile.parsing.success`` after each POST, as
HrFlow's asynchronous parsing does, and ``profile.storing.update`` after each PUT, as
HrFlow announces edits; the latter can be switched off. Archiving sends none (HrFlow
names no event for it). The ``drop`` switch discards them all, counted, to simulate
missed deliveries.

Control (for tests, demos and benchmarks; no authentication):

- ``GET|DELETE /_sandbox/calls``     every API call: method, path, query, body, status
- ``GET|POST /_sandbox/profiles``    list, or store ``{"source_key", "profile"}`` directly
- ``GET|POST|DELETE /_sandbox/faults``  list, add (one fault or ``{"faults": [...]}``), clear
- ``GET /_sandbox/webhooks``         webhooks sent and dropped, their counts, the switches
- ``POST /_sandbox/webhooks``        set the switches: ``{"drop": bool, "updates": bool}``
- ``POST /_sandbox/reset``           back to start: seeds, no calls, start-up faults and
  webhook switches only
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import web
from pydantic import ValidationError

from hrflow_client.profiles import ProfileWrite
from hrflow_webhooks.signatures import sign
from sandbox.faults import Fault, Faults, Outcome
from sandbox.store import DuplicateReferenceError, ListQuery, ProfileStore

logger = logging.getLogger(__name__)

DEFAULT_API_KEY = "sandbox-api-key"
DEFAULT_API_USER = "sandbox@hrflow.local"
API_PREFIX = "/v1/"
PARSING = "/v1/profile/parsing"
INDEXING = "/v1/profile/indexing"
ARCHIVE = "/v1/profile/indexing/archive"
LISTING = "/v1/storing/profiles"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class WebhookSwitches:
    """What happens to the webhooks: ``drop`` discards every one (counted), as when
    HrFlow's deliveries go missing; ``updates`` sends ``profile.storing.update`` after
    each PUT (off: only adds are announced, as before the switch existed)."""

    drop: bool = False
    updates: bool = True


@dataclass
class SandboxState:
    api_key: str
    api_user: str
    seed: bool
    startup_faults: list[Fault]
    webhook_url: str | None = None
    webhook_secret: str | None = None
    startup_switches: WebhookSwitches = field(default_factory=WebhookSwitches)
    switches: WebhookSwitches = field(default_factory=WebhookSwitches)
    profiles: ProfileStore = field(default_factory=ProfileStore)
    calls: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    dropped_webhooks: list[dict[str, Any]] = field(default_factory=list)
    faults: Faults = field(default_factory=lambda: Faults(random.Random()))
    session: aiohttp.ClientSession | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def reset(self) -> None:
        self.calls.clear()
        self.webhooks.clear()
        self.dropped_webhooks.clear()
        self.switches = replace(self.startup_switches)
        self.faults.clear()
        for fault in self.startup_faults:
            self.faults.add(Fault.from_json(fault.to_json()))
        self.profiles.clear()
        if self.seed:
            self.profiles.seed()

    def calls_to(self, method: str, path: str = INDEXING) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["method"] == method and c["path"] == path]


STATE = web.AppKey("sandbox_state", SandboxState)


def envelope(
    status: int, message: str, data: Any = None, meta: dict[str, Any] | None = None
) -> web.Response:
    """HrFlow's answer. Content-Type exactly ``application/json``: the SDK compares it verbatim."""
    body: dict[str, Any] = {"code": status, "message": message}
    if meta is not None:
        body["meta"] = meta
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
    edited = state.profiles.edit(profile, body)
    if state.switches.updates:
        _notify(state, edited, "profile.storing.update")
    return envelope(200, "Profile edited", edited)


# --- the listing -----------------------------------------------------------------------------


class InvalidParametersError(ValueError):
    """A parameter (of the listing, of an archiving) the sandbox refuses: 400, this message."""


# Filters HrFlow has and the sandbox does not: refused rather than ignored, so a test cannot
# pass on a listing that silently left a filter out.
_UNSUPPORTED_FILTERS = ("name", "location_lat", "location_lon", "location_dist")
_SORTS: tuple[Literal["created_at", "updated_at"], ...] = ("created_at", "updated_at")


def _given(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    return value if value else None


def _source_keys(raw: str | None) -> tuple[str, ...]:
    try:
        keys = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        keys = None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise InvalidParametersError(
            'Invalid parameters: source_keys must be a JSON list of source keys, e.g. ["k1"]'
        )
    return tuple(keys)


def _whole(query: Mapping[str, str], name: str, default: int) -> int:
    raw = _given(query, name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise InvalidParametersError(f"Invalid parameters: {name} must be a whole number from 1")
    return int(raw)


def _boolean(query: Mapping[str, str], name: str) -> bool:
    """``true``/``1`` or ``false``/``0``, any case: the SDK sends Python's ``True``/``False``."""
    raw = (_given(query, name) or "false").lower()
    if raw not in ("true", "1", "false", "0"):
        raise InvalidParametersError(f"Invalid parameters: {name} must be true or false")
    return raw in ("true", "1")


def _day(query: Mapping[str, str], name: str) -> date | None:
    """A ``YYYY-MM-DD`` day, the only form documented: a time of day is refused rather than
    read one way here and maybe another by HrFlow."""
    raw = _given(query, name)
    if raw is None:
        return None
    try:
        if len(raw) == len("YYYY-MM-DD"):
            return datetime.strptime(raw, "%Y-%m-%d").date()
    except ValueError:
        pass
    raise InvalidParametersError(f"Invalid parameters: {name} must be YYYY-MM-DD")


def _sort_by(query: Mapping[str, str]) -> Literal["created_at", "updated_at"]:
    raw = _given(query, "sort_by") or "created_at"
    for sort in _SORTS:
        if raw == sort:
            return sort
    raise InvalidParametersError("Invalid parameters: sort_by must be created_at or updated_at")


def list_query(query: Mapping[str, str]) -> ListQuery:
    """The listing's query parameters, checked; defaults as the SDK's (page 1, 30 a page,
    newest ``created_at`` first)."""
    unsupported = [name for name in _UNSUPPORTED_FILTERS if _given(query, name)]
    if unsupported:
        raise InvalidParametersError(
            f"Invalid parameters: the sandbox does not support {', '.join(unsupported)}"
        )
    order = _given(query, "order_by") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidParametersError("Invalid parameters: order_by must be asc or desc")
    return ListQuery(
        source_keys=_source_keys(query.get("source_keys")),
        key=_given(query, "key"),
        reference=_given(query, "reference"),
        page=_whole(query, "page", 1),
        limit=_whole(query, "limit", 30),
        sort_by=_sort_by(query),
        descending=order == "desc",
        created_min=_day(query, "created_at_min"),
        created_max=_day(query, "created_at_max"),
    )


def _summary(profile: dict[str, Any]) -> dict[str, Any]:
    """A listed profile without ``return_profile``: "only the keys, the reference and the
    dates". The source travels as ``source.key``, the read shape's and the webhooks' path,
    so a consumer reads both listing shapes (and webhook payloads) the same way."""
    return {
        "key": profile["key"],
        "reference": profile["reference"],
        "source": {"key": profile["source"]["key"]},
        "created_at": profile["created_at"],
        "updated_at": profile["updated_at"],
    }


async def list_storing_profiles(request: web.Request) -> web.Response:
    """HrFlow's listing: non-archived profiles of the sources, sorted, one page of them."""
    profiles = request.app[STATE].profiles
    try:
        query = list_query(request.query)
        whole = _boolean(request.query, "return_profile")
    except InvalidParametersError as error:
        return envelope(400, str(error))
    if not all(profiles.has_source(source_key) for source_key in query.source_keys):
        return envelope(400, "Invalid parameters. Unable to find object: source")
    page = profiles.page(query)
    data = page.profiles if whole else [_summary(p) for p in page.profiles]
    meta = {"page": page.page, "maxPage": page.max_page, "count": len(data), "total": page.total}
    return envelope(200, "List of profiles", data, meta)


# --- archiving -------------------------------------------------------------------------------


def _text(body: dict[str, Any], *names: str) -> str | None:
    """The first of ``names`` set in the body; a value not a string is refused."""
    for name in names:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidParametersError(f"Invalid parameters: {name} must be a string")
        if value:
            return value
    return None


@dataclass(frozen=True, slots=True)
class ArchiveRequest:
    source_key: str
    key: str | None
    reference: str | None
    email: str | None
    archived: bool

    @classmethod
    def from_body(cls, body: Any) -> ArchiveRequest:
        """The PATCH body, checked. ``is_archive`` is required (1 or 0): the SDK always sends
        it, and a client leaving it out is better told than guessed for."""
        if not isinstance(body, dict):
            raise InvalidParametersError("Invalid parameters: a JSON object is required")
        source_key = _text(body, "source_key")
        key, reference = _text(body, "key"), _text(body, "reference")
        email = _text(body, "email", "profile_email")  # the SDK sends profile_email
        if not source_key or not (key or reference or email):
            raise InvalidParametersError(
                "Invalid parameters: source_key and key, reference or email are required"
            )
        is_archive = body.get("is_archive")
        if isinstance(is_archive, bool) or is_archive not in (0, 1):
            raise InvalidParametersError("Invalid parameters: is_archive must be 1 or 0")
        return cls(source_key, key, reference, email, archived=is_archive == 1)

    def find(self, store: ProfileStore) -> dict[str, Any] | None:
        """By key or reference as GET finds it, else by ``info.email``."""
        if self.key or self.reference:
            return store.get(self.source_key, self.key, self.reference)
        return store.get_by_email(self.source_key, self.email or "")


async def archive_profile(request: web.Request) -> web.Response:
    """Archive (``is_archive: 1``) or unarchive (0). The answer's ``data`` holds only the
    profile's key: HrFlow's answer is not documented, and a client needing no more than
    the key works whatever HrFlow adds."""
    store = request.app[STATE].profiles
    try:
        wanted = ArchiveRequest.from_body(await _json_body(request))
    except InvalidParametersError as error:
        return envelope(400, str(error))
    profile = wanted.find(store)
    if profile is None:
        return envelope(404, "Unable to find object: profile")
    store.archive(profile, wanted.archived)
    message = "Profile archived" if wanted.archived else "Profile unarchived"
    return envelope(200, message, {"key": profile["key"]})


# --- HrFlow's asynchronous notification ------------------------------------------------------

_EVENT_MESSAGES = {
    "profile.parsing.success": "Profile parsed",
    "profile.storing.update": "Profile updated",
}


def _notify(
    state: SandboxState, profile: dict[str, Any], event_type: str = "profile.parsing.success"
) -> None:
    """Send (or, switched to drop, count and forget) the event about this profile. The
    payload names the profile without its contents, so each update of one profile is the
    same bytes, as HrFlow's are."""
    url, secret, session = state.webhook_url, state.webhook_secret, state.session
    if not url or not secret or session is None:
        return
    event = {
        "type": event_type,
        "origin": "api",
        "message": _EVENT_MESSAGES[event_type],
        "profile": {
            "key": profile["key"],
            "reference": profile["reference"],
            "source": {"key": profile["source"]["key"]},
        },
    }
    record: dict[str, Any] = {"type": event_type, "profile": event["profile"], "at": time.time()}
    if state.switches.drop:
        state.dropped_webhooks.append(record)
        return
    # Recorded now, not when the delivery starts: once the API call is answered, the
    # control endpoint already counts its webhook.
    record |= {"url": url, "status": None}
    state.webhooks.append(record)
    signature = sign(orjson.dumps(event), secret.encode())
    task = asyncio.create_task(_deliver(session, url, signature, event, record))
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def _deliver(
    session: aiohttp.ClientSession,
    url: str,
    signature: str,
    event: dict[str, Any],
    record: dict[str, Any],
) -> None:
    headers = {"HTTP-HRFLOW-SIGNATURE": signature, "Content-Type": "application/json"}
    body = orjson.dumps(event)
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
    """Deliveries sent (each with its answer's status, or ``error``) and events dropped."""
    state = request.app[STATE]
    return web.json_response(
        {
            "drop": state.switches.drop,
            "updates": state.switches.updates,
            "sent": len(state.webhooks),
            "dropped": len(state.dropped_webhooks),
            "webhooks": state.webhooks,
            "dropped_webhooks": state.dropped_webhooks,
        }
    )


async def set_webhook_switches(request: web.Request) -> web.Response:
    """``{"drop": bool, "updates": bool}``, either or both; the counts carry on."""
    state = request.app[STATE]
    body = await _json_body(request)
    known = {"drop", "updates"}
    if (
        not isinstance(body, dict)
        or not set(body) <= known
        or not all(isinstance(v, bool) for v in body.values())
    ):
        return web.json_response(
            {"error": 'expected {"drop": true|false, "updates": true|false}'}, status=400
        )
    state.switches = replace(state.switches, **body)
    return await list_webhooks(request)


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
    drop_webhooks: bool = False,
    update_webhooks: bool = True,
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
        startup_switches=WebhookSwitches(drop=drop_webhooks, updates=update_webhooks),
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
            web.get(LISTING, list_storing_profiles),
            web.patch(ARCHIVE, archive_profile),
            web.get("/_sandbox/calls", list_calls),
            web.delete("/_sandbox/calls", clear_calls),
            web.get("/_sandbox/profiles", list_profiles),
            web.post("/_sandbox/profiles", store_profile),
            web.get("/_sandbox/faults", list_faults),
            web.post("/_sandbox/faults", add_faults),
            web.delete("/_sandbox/faults", clear_faults),
            web.get("/_sandbox/webhooks", list_webhooks),
            web.post("/_sandbox/webhooks", set_webhook_switches),
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
    drop_webhooks: bool = False,
    update_webhooks: bool = True,
) -> None:
    """Serve the sandbox until interrupted (blocking): the CLI's entry point."""
    app = create_app(
        latency_ms=latency_ms,
        fail_rate=fail_rate,
        status=status,
        seed=seed,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        drop_webhooks=drop_webhooks,
        update_webhooks=update_webhooks,
    )
    print(f"sandbox HrFlow API on http://{host}:{port}/v1", flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None, shutdown_timeout=5.0)
