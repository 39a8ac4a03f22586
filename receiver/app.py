"""The HTTP edge: verify, decode, enqueue, answer. Nothing else happens here.

``uvicorn receiver.app:create_app --factory`` serves it (the Procfile's web line).
Settings come from the environment once, when uvicorn calls the factory, which
refuses to build the app without a webhook secret; the lifespan opens (and
closes) the one Redis connection pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE

from hrflow_webhooks.durability import DurabilityWatch
from hrflow_webhooks.enqueue import EventQueue, ReplicaAck, ReplicasBehindError
from hrflow_webhooks.events import Event
from hrflow_webhooks.logs import configure_logging, log_line, write_logs_at_once
from hrflow_webhooks.queue import COALESCED, OLDEST_WAIT_SCRIPT, QUEUED, long_wait_problems
from hrflow_webhooks.redis_setup import connect_redis
from hrflow_webhooks.settings import MissingSecretError, Settings
from hrflow_webhooks.signatures import SchemeChoice, SignatureError, verify_signature
from receiver import metrics
from receiver.decoding import TOO_DEEP, BadPayloadError, decode_events
from receiver.protocol import (
    HEAD_ALLOWANCE_BYTES,
    ConnectionLimits,
    HttpProtocol,
    default_max_connections,
    default_max_head_bytes,
)
from receiver.rejections import RejectionLog

logger = logging.getLogger(__name__)

# Header names HrFlow and its older SDKs use, as ASGI servers hand them over (lower case).
SIGNATURE_HEADERS = frozenset(
    {
        b"http-hrflow-signature",
        b"http-riminder-signature",
        b"hrflow-signature",
        b"riminder-signature",
        b"http_hrflow_signature",
        b"http_riminder_signature",
    }
)


@dataclass(frozen=True, slots=True)
class Receiver:
    """What the webhook endpoint needs, built once in the lifespan."""

    queue: EventQueue
    secrets: tuple[bytes, ...]
    scheme: SchemeChoice
    max_body_bytes: int
    durability: DurabilityWatch
    max_run_wait_s: float  # /readyz?strict fails past it
    # Per app, not per process: each receiver logs its own first rejection at once.
    rejections: RejectionLog = field(default_factory=RejectionLog)
    max_signature_bytes: int = field(init=False)  # the longest header of a payload that fits

    def __post_init__(self) -> None:
        longest = default_max_head_bytes(self.max_body_bytes) - HEAD_ALLOWANCE_BYTES
        object.__setattr__(self, "max_signature_bytes", longest)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


@dataclass(frozen=True, slots=True)
class Answer:
    """A webhook response as ASGI wants it: status, raw headers and the JSON body."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def json(cls, status: int, content: object, **headers: str) -> Answer:
        body = orjson.dumps(content)
        raw: tuple[tuple[bytes, bytes], ...] = (
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        )
        if headers:
            raw += tuple((name.encode(), value.encode()) for name, value in headers.items())
        return cls(status, body, raw)


RETRY = {"retry-after": "5"}  # what a 503 asks of the sender


def _error(status: int, error: str, reason: str, **headers: str) -> Answer:
    return Answer.json(status, {"error": error, "reason": reason}, **headers)


# Request ids: a random per-process prefix and a counter. Unique across processes like a
# uuid4, without a urandom call per delivery (measurable at thousands of deliveries a second).
_REQUEST_ID_PREFIX = uuid.uuid4().hex[:16]
_request_numbers = itertools.count()


def _acceptable_request_id(value: bytes) -> bool:
    """A caller's request id is echoed and logged: short printable ASCII only, or we make one."""
    return 0 < len(value) <= 128 and all(0x21 <= byte <= 0x7E for byte in value)


def new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):016x}"


@dataclass(slots=True)
class Delivery:
    """What the endpoint reads from the request headers, in one pass."""

    signature: bytes | None = None
    request_id: str | None = None
    content_length: int | None = None

    @classmethod
    def from_scope(cls, scope: Scope) -> Delivery:
        delivery = cls()
        for name, value in scope["headers"]:
            if name in SIGNATURE_HEADERS:
                delivery.signature = delivery.signature or bytes(value)
            elif name == b"x-request-id" and _acceptable_request_id(value):
                delivery.request_id = value.decode("ascii")
            elif name == b"content-length" and value.isdigit():
                delivery.content_length = int(value)
        return delivery


class BodyTooLargeError(Exception):
    pass


class ClientGoneError(Exception):
    pass


async def read_body(receive: Receive, limit: int, content_length: int | None) -> bytes:
    """The raw body, refusing more than ``limit`` bytes before reading them when it can."""
    if content_length is not None and content_length > limit:
        raise BodyTooLargeError
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class WebhookEndpoint:
    """``POST /webhook`` as a plain ASGI app.

    The hot path of the service: a Starlette ``Request``/``Response`` pair, the
    route's body-limit middleware and a uuid4 per delivery cost more than
    verifying and decoding (profiled with py-spy, see docs/benchmarks.md), so
    this endpoint reads the body and writes its answer itself. Behaviour is the
    same: 413 past ``HRFLOW_MAX_BODY_BYTES``, then verify, decode, enqueue, and
    202 only once the events are durably queued.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await handle_webhook(scope["app"].state.receiver, scope, receive, send)


async def handle_webhook(receiver: Receiver, scope: Scope, receive: Receive, send: Send) -> None:
    delivery = Delivery.from_scope(scope)
    request_id = delivery.request_id or new_request_id()
    counts = metrics.COUNTS
    counts.in_flight += 1
    try:
        answer = await _handle_delivery(receive, delivery, receiver, request_id)
    except ClientGoneError:
        return  # nobody to answer; nothing was queued
    finally:
        counts.in_flight -= 1
    headers = [*answer.headers, (b"x-request-id", request_id.encode("latin-1"))]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


class ReceiverApp(Starlette):
    """Starlette, with ``POST /webhook`` answered before its middleware and router.

    Each Starlette layer wraps ``send`` and adds a coroutine frame per request;
    together they cost a sixth of the receiver's CPU per delivery under load
    (py-spy, docs/benchmarks.md). The webhook endpoint catches its own errors
    and needs no routing, so an exact ``POST /webhook`` goes straight to it.
    Everything else, including ``/webhook`` under a root path and other methods
    (405), goes through Starlette as before.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/webhook" and scope["method"] == "POST":
            await handle_webhook(self.state.receiver, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _handle_delivery(
    receive: Receive, delivery: Delivery, receiver: Receiver, request_id: str
) -> Answer:
    if receiver.durability.refusing_writes:
        # Above the memory high-water mark: refuse before Redis must, so that the workers
        # keep the room to claim and finish what is queued (HrFlow retries a 503).
        return _unavailable(request_id, None)
    header = delivery.signature
    if header is not None and len(header) > receiver.max_signature_bytes:
        # A header that long carries a payload over the body limit (under another server than
        # HttpProtocol, one over the head limit too): refused before any decoding.
        return _too_large(receiver, "signed payload exceeds HRFLOW_MAX_BODY_BYTES")
    try:
        body = await read_body(receive, receiver.max_body_bytes, delivery.content_length)
    except BodyTooLargeError:
        return _too_large(receiver, "request body exceeds HRFLOW_MAX_BODY_BYTES")
    received_at = time.time()
    events = _verified_events(header, body, receiver, request_id, received_at)
    if isinstance(events, Answer):
        return events
    try:
        outcomes = await receiver.queue.enqueue_events(events, request_id)
    except (RedisError, OSError) as error:
        return _unavailable(request_id, error)
    except orjson.JSONEncodeError:
        # The job wraps the event in a few more levels than its id: at 253 to 255 levels the
        # id could be written but not the job (nothing was sent to Redis).
        return _bad_payload(receiver, BadPayloadError(TOO_DEEP), request_id)
    return _queued(receiver, events, outcomes, request_id, received_at)


def _too_large(receiver: Receiver, reason: str) -> Answer:
    metrics.COUNTS.delivery("too_large")
    receiver.rejections.note("too_large", reason)
    return _error(413, "too_large", reason)


def _verified_events(
    header: bytes | None, body: bytes, receiver: Receiver, request_id: str, received_at: float
) -> list[Event] | Answer:
    """The events of a delivery signed by one of our secrets, or the answer that refuses it."""
    try:
        verified = verify_signature(header, body, receiver.secrets, receiver.scheme)
        return decode_events(verified.payload, received_at)
    except SignatureError as error:
        metrics.COUNTS.delivery("bad_signature", error.reason)
        receiver.rejections.note("bad_signature", error.reason, request_id)
        return _error(401, "invalid_signature", error.reason)
    except BadPayloadError as error:
        return _bad_payload(receiver, error, request_id)


def _bad_payload(receiver: Receiver, error: BadPayloadError, request_id: str) -> Answer:
    metrics.COUNTS.delivery("bad_request")
    receiver.rejections.note("bad_request", error.reason, request_id)
    return _error(400, "bad_payload", error.reason)


def _unavailable(request_id: str, error: Exception | None) -> Answer:
    """503: Redis refused or did not answer, its replicas did not acknowledge in time, or
    (``error`` None) it is over its memory mark."""
    if error is None:
        metrics.COUNTS.delivery("unavailable", "memory_high_water")
        return _error(503, "unavailable", "the event queue is nearly full; retry later", **RETRY)
    if isinstance(error, ReplicasBehindError):
        # Queued on the primary, perhaps, but not yet safe from its loss: HrFlow's resend
        # merges into it or is a duplicate.
        metrics.COUNTS.delivery("unavailable", "replicas_behind")
        reason = "the event queue's replicas did not acknowledge in time; retry later"
    else:
        metrics.COUNTS.delivery("unavailable")
        reason = "the event queue is unavailable; retry later"
    logger.error(
        "queue unavailable",
        extra={"request_id": request_id, "error_type": type(error).__name__},
    )
    return _error(503, "unavailable", reason, **RETRY)


def _queued(
    receiver: Receiver,
    events: list[Event],
    outcomes: list[int],
    request_id: str,
    received_at: float,
) -> Answer:
    enqueue_s = time.time() - received_at
    counts = metrics.COUNTS
    counts.enqueued_in(enqueue_s)
    queued, coalesced = outcomes.count(QUEUED), outcomes.count(COALESCED)
    receiver.durability.acknowledged(queued)
    duplicates = len(events) - queued - coalesced
    counts.delivery("queued" if queued else "coalesced" if coalesced else "duplicate")
    counts.events_received(events, outcomes)
    if logger.isEnabledFor(logging.INFO):  # the fields cost more than the check
        log_line(
            logger,
            logging.INFO,
            "delivery queued",
            {
                "request_id": request_id,
                "queued": queued,
                "coalesced": coalesced,
                "duplicates": duplicates,
                "event_id": events[0].id if len(events) == 1 else None,
                "canonical_type": events[0].canonical_type if len(events) == 1 else None,
                "duration_ms": round(enqueue_s * 1000, 2),
            },
        )
    body = {
        "queued": queued,
        "coalesced": coalesced,
        "duplicates": duplicates,
        "event_ids": [event.id for event in events],
    }
    return Answer.json(202, body)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when Redis answers, accepts a write (a read-only replica is not ready) and is
    under its memory high-water mark. ``?strict``: also when nothing puts acknowledged
    events at risk (persistence as required, no recent loss of data) and no run has waited
    past ``HRFLOW_MAX_RUN_WAIT_S``."""
    receiver: Receiver = request.app.state.receiver
    try:
        await receiver.queue.redis.set(receiver.queue.keys.readiness_probe, "1", ex=10)
    except (RedisError, OSError) as error:
        return _not_ready([f"redis: {type(error).__name__}"])
    state = receiver.durability.state
    if state is not None and state.over_high_water:
        return _not_ready([state.memory_problem()])
    if "strict" in request.query_params:
        if state is None or not receiver.durability.reachable:
            return _not_ready(["redis durability not checked yet"])
        if problems := state.problems() + await _long_waits(receiver):
            return _not_ready(problems)
    return JSONResponse({"status": "ready"})


async def _long_waits(receiver: Receiver) -> list[str]:
    queue, now_ms = receiver.queue, int(time.time() * 1000)
    try:
        wait_ms = await queue.redis.eval(OLDEST_WAIT_SCRIPT, 1, queue.keys.queue, str(now_ms))  # type: ignore[misc]
    except (RedisError, OSError) as error:
        return [f"redis: {type(error).__name__}"]
    return long_wait_problems(int(wait_ms) / 1000, receiver.max_run_wait_s)


def _not_ready(problems: list[str]) -> Response:
    content = {"error": "unavailable", "reason": problems[0], "problems": problems}
    return JSONResponse(content, status_code=503)


async def _serve_metrics(settings: Settings) -> asyncio.Server | None:
    port = settings.receiver_metrics_port
    if port is None:
        return None
    server = await metrics.serve_metrics(settings.metrics_host, port)
    bound = server.sockets[0].getsockname()[1]
    logger.info(f"receiver metrics served on {settings.metrics_host}:{bound}")
    return server


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(
        max_head_bytes=settings.max_header_bytes or default_max_head_bytes(settings.max_body_bytes),
        keep_alive_s=settings.keep_alive_timeout_s,
        head_timeout_s=settings.head_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections or default_max_connections(),
    )


def create_app(settings: Settings | None = None, *, own_logging: bool = True) -> Starlette:
    """The receiver app; ``own_logging=False`` leaves logging to the host (tests, embedding).

    It also sets the connection limits of :class:`receiver.protocol.HttpProtocol`, the
    protocol the receiver is served with: uvicorn builds the app before it accepts.
    """
    settings = settings or Settings()
    if own_logging:  # now, not in the lifespan: uvicorn's start-up lines are JSON too
        configure_logging(settings.log_level, settings.log_format)
    if not settings.webhook_secrets:
        # Before uvicorn starts: in the lifespan this was a traceback ending in "Application
        # startup failed", JSON-escaped. One line says what to do instead.
        logger.error(str(MissingSecretError.for_receiver()))
        # uvicorn's start-up failure code: with --workers N its supervisor stops on it,
        # where any other code makes it respawn the child for ever.
        raise SystemExit(STARTUP_FAILURE)
    limits = connection_limits(settings)
    HttpProtocol.limits = limits
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        secrets = settings.secret_bytes()  # no secret: refuse to start, with the reason
        redis: Redis = connect_redis(settings)
        durability = DurabilityWatch(redis, settings, "receiver")
        await durability.look()  # logs what is wrong before the first delivery
        durability.start()
        metrics_server = await _serve_metrics(settings)
        queue = EventQueue(
            redis, settings.queue_name, settings.dedup_window_s, settings.event_log_max_entries,
            replica_ack=ReplicaAck.required_by(settings),
        )  # fmt: skip
        app.state.receiver = Receiver(
            queue, secrets, settings.signature_scheme, settings.max_body_bytes, durability,
            settings.max_run_wait_s,
        )  # fmt: skip
        # What start-up built lives as long as the process. Freezing it keeps the cyclic
        # collector from re-scanning it on every full collection: ~20% of the receiver's CPU
        # per delivery went there (docs/benchmarks.md). Nothing is leaked by it.
        gc.freeze()
        try:
            yield
        finally:
            if own_logging:  # uvicorn ends by re-raising SIGTERM: no exit hook will flush
                write_logs_at_once()
            if metrics_server is not None:
                metrics_server.close()
            await durability.stop()
            await queue.aclose()
            await redis.aclose()

    routes = [
        Route("/webhook", WebhookEndpoint(), methods=["POST"]),  # it enforces max_body_bytes
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics.endpoint(token)),
    ]
    return ReceiverApp(routes=routes, lifespan=lifespan)
