"""The sandbox HrFlow API on a free loopback port, inside the test's event loop."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any, Self

import pytest
from aiohttp import web

from hrflow_webhooks.settings import Settings
from sandbox import DEFAULT_API_KEY, DEFAULT_API_USER, STATE, create_app
from sandbox.app import SandboxState
from tests.service import make_settings


class LoopbackServer:
    """An aiohttp app on a free loopback port, inside the test's event loop."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.api_url = f"{self.url}/v1"
        self.runner = web.AppRunner(self.app, shutdown_timeout=1)

    async def __aenter__(self) -> Self:
        await self.runner.setup()
        await web.SockSite(self.runner, self.socket).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        self.socket.close()


class SandboxServer(LoopbackServer):
    def __init__(self, **options: Any) -> None:
        super().__init__(create_app(random_seed=1234, **options))

    @property
    def state(self) -> SandboxState:
        return self.app[STATE]

    def settings(self, redis_url: str, **overrides: Any) -> Settings:
        """Service settings pointing at this sandbox with its credentials."""
        values = {"api_url": self.api_url, "api_key": DEFAULT_API_KEY, "api_user": DEFAULT_API_USER}
        return make_settings(redis_url, **{**values, **overrides})


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer() as server:
        yield server
