"""Real processes and servers for end-to-end tests: the receiver under uvicorn on a loopback
port, arq workers in burst mode, and signed deliveries built the way HrFlow builds them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any, Self

import aiohttp
import uvicorn
from redis.asyncio import Redis

from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QUEUED, QueueKeys, deserialize_job, tag_of
from hrflow_webhooks.settings import Settings
from receiver.app import create_app
from receiver.protocol import HttpProtocol
from tests.polling import eventually
from workers.arq_worker import Worker
from workers.registry import Registry
from workers.settings import create_worker

WEBHOOK_SECRET = "test-webhook-secret"
METRICS_TOKEN = "test-metrics-token"
# The receiver's /metrics on the webhook port answers only this (HRFLOW_METRICS_TOKEN).
METRICS_HEADERS = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_secrets": WEBHOOK_SECRET,
        "metrics_token": METRICS_TOKEN,
        "redis_url": redis_url,
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
        "job_timeout_s": 5,
        "shutdown_grace_s": 1,
        **overrides,
    }
    return Settings(**values)


def signed_headers(payload: Any, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    """The HrFlow Python SDK's scheme, computed here independently of the product."""
    return signed_body_headers(json.dumps(payload).encode(), secret)


def signed_body_headers(body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    hex_digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()
    header = base64.urlsafe_b64encode(hex_digest) + b"." + base64.urlsafe_b64encode(body)
    return {"HTTP-HRFLOW-SIGNATURE": header.decode(), "Content-Type": "application/json"}


def parsing_event(
    profile_key: str = "pk-1", source_key: str = "sk-1", **extra: Any
) -> dict[str, Any]:
    return {
        "type": "profile.parsing.success",
        "origin": "api",
        "message": "Profile parsed",
        "profile": {"key": profile_key, "reference": None, "source": {"key": source_key}},
        **extra,
    }


def update_event(
    profile_key: str = "pk-1", source_key: str = "sk-1", family: str = "parsing", **extra: Any
) -> dict[str, Any]:
    """``profile.<family>.update``: byte-identical for every change of one profile."""
    return {
        **parsing_event(profile_key, source_key, **extra),
        "type": f"profile.{family}.update",
        "message": "Profile updated",
    }


async def queued_event_ids(redis: Redis, queue: str = "hrflow:queue") -> list[str]:
    """The event id of every run in the queue, in queue order."""
    ids = []
    for run_id in await redis.zrange(queue, 0, -1):
        raw = await redis.get(QueueKeys.job(run_id.decode()))
        ids.append(deserialize_job(raw)["a"][0]["id"] if raw else f"<no job {run_id!r}>")
    return ids


async def runs_of(redis: Redis, event: Event, queue: str = "hrflow:queue") -> list[str]:
    """The live runs of the event's subject, oldest first (its order list)."""
    order = QueueKeys(queue).order(tag_of(event.subject))
    return [run_id.decode() for run_id in await redis.lrange(order, 0, -1)]  # type: ignore[misc]


async def enqueue(settings: Settings, redis: Redis, *payloads: Mapping[str, Any]) -> list[Event]:
    """Queue events as the receiver does (each must be queued: not a duplicate, not merged)."""
    events = [Event.from_payload(p) for p in payloads]
    async with EventQueue(redis, settings.queue_name, settings.dedup_window_s) as queue:
        assert await queue.enqueue_events(events) == [QUEUED] * len(events)
    return events


async def key_exists(redis: Redis, key: str) -> bool:
    return bool(await redis.exists(key))


async def run_leftovers(redis: Redis) -> list[str]:
    """Keys a finished run must not leave: jobs, markers, order lists, arq's claims."""
    patterns = ("arq:job:*", "arq:in-progress:*", "arq:retry:*", "*:done:*", "*:order:*")
    return sorted([k.decode() for p in patterns async for k in redis.scan_iter(match=p)])


async def answers(http: aiohttp.ClientSession, url: str) -> bool:
    """``url`` answers 200. A check for :func:`tests.polling.eventually`: a server started in
    the background refuses connections, or fails them, until it is ready."""
    try:
        async with http.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


class LoopbackServer:
    """An ASGI app served by a real uvicorn on 127.0.0.1, inside the test's loop."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", **options)
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        task = self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))

        async def started() -> bool:
            if self.server.started:
                return True
            if task.done():  # a start-up error surfaces here, not as a wait to the limit
                task.result()
                raise AssertionError("uvicorn stopped before it started")
            return False

        await eventually(started, "uvicorn to start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
        self.socket.close()


class ReceiverServer(LoopbackServer):
    """The receiver app, with the HTTP protocol it is deployed with."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # HttpProtocol: as deployed (Procfile, Dockerfile, make run).
        super().__init__(create_app(settings, own_logging=False), http=HttpProtocol)

    async def post(
        self, session: aiohttp.ClientSession, payload: Any, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        async with session.post(
            f"{self.url}/webhook",
            data=json.dumps(payload),
            headers=signed_headers(payload) if headers is None else headers,
        ) as response:
            body = await response.read()
            try:
                return response.status, json.loads(body)
            except ValueError:
                return response.status, body.decode(errors="replace")


@contextlib.asynccontextmanager
async def receiver(settings: Settings) -> AsyncIterator[ReceiverServer]:
    async with ReceiverServer(settings) as server:
        yield server


@contextlib.asynccontextmanager
async def polling(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """A long-running (not burst) worker's main loop, as a task, for the block; then the
    worker is stopped and closed."""
    task = asyncio.create_task(worker.main())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close()


async def drain(settings: Settings, registry: Registry, **overrides: Any) -> Any:
    """Run one worker in burst mode until the queue is empty (retries included)."""
    worker = create_worker(settings, registry, burst=True, handle_signals=False, **overrides)
    try:
        await worker.main()
    finally:
        await worker.close()
    return worker


def recorder(registry: Registry, event_name: str, name: str = "recorder") -> list[Any]:
    """A handler that records the events it sees, registered on ``registry``."""
    seen: list[Any] = []

    async def record(event: Any, ctx: Any) -> None:
        seen.append(event)

    registry.add(event_name, record, name=name)
    return seen
