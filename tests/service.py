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
from typing import Any

import aiohttp
import uvicorn

from hrflow_webhooks.settings import Settings
from receiver.app import create_app
from receiver.protocol import HttpProtocol
from workers.registry import Registry
from workers.settings import create_worker

WEBHOOK_SECRET = "test-webhook-secret"


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_secrets": WEBHOOK_SECRET,
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
    body = json.dumps(payload).encode()
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


class ReceiverServer:
    """The receiver app served by a real uvicorn on 127.0.0.1, inside the test's loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(
            create_app(settings, own_logging=False),
            http=HttpProtocol,  # as deployed (Procfile, Dockerfile, make run)
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReceiverServer:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
        self.socket.close()

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
