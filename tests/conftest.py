from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from pydantic import AliasChoices
from redis.asyncio import Redis

from hrflow_webhooks.settings import Settings
from tests.redis_server import RedisServer

pytest_plugins = ["tests.sandbox_fixtures"]


def settings_variables() -> set[str]:
    """Every environment variable ``Settings`` reads (upper case; it ignores case)."""
    names = {"FORWARDED_ALLOW_IPS"}  # uvicorn's own, read by the receiver's processes
    for name, field in Settings.model_fields.items():
        names.add(f"HRFLOW_{name}".upper())
        if isinstance(field.validation_alias, AliasChoices):
            names |= {c.upper() for c in field.validation_alias.choices if isinstance(c, str)}
    return names


# Hermetic: the developer's shell (HRFLOW_MAX_TRIES=1, a REDIS_URL, ...) must not reach a
# test, its servers or its subprocesses. Removed here, before any test module is imported.
for _variable in [v for v in os.environ if v.upper() in settings_variables()]:
    del os.environ[_variable]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    if redis_server.process is None:  # a fault test left it stopped
        redis_server.start()
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The test's HTTP client. Its timeout only stops a hung call from hanging the suite."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
