"""The receiver's start-up check of the Redis settings that zero loss depends on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from redis.asyncio import Redis

from hrflow_webhooks.redis_setup import unsafe_redis_settings, warn_on_unsafe_redis_config
from tests.redis_server import RedisServer


async def test_the_test_server_is_configured_for_zero_loss(redis: Redis) -> None:
    assert await unsafe_redis_settings(redis) == []


async def test_each_unsafe_setting_is_named_and_logged(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        await redis.config_set("maxmemory-policy", "allkeys-lru")
        await redis.config_set("appendfsync", "no")
        problems = await unsafe_redis_settings(redis)
        assert len(problems) == 2
        assert "appendfsync" in problems[0]
        assert "allkeys-lru" in problems[1]
        with caplog.at_level(logging.WARNING):
            await warn_on_unsafe_redis_config(redis, logging.getLogger("test"))
        assert [r.reason for r in caplog.records] == problems  # type: ignore[attr-defined]
    finally:
        await redis.config_set("appendfsync", "always")
        await redis.config_set("maxmemory-policy", "noeviction")


async def test_a_server_without_aof_is_reported(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with Redis.from_url(server.url) as redis:
            await redis.config_set("appendonly", "no")
            (problem,) = await unsafe_redis_settings(redis)
        assert "appendonly is not 'yes'" in problem
    finally:
        server.kill()
