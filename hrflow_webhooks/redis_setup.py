"""Connecting to Redis the same way everywhere, and checking it is fit for zero loss."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hrflow_webhooks.settings import Settings


def connect_redis(settings: Settings) -> Redis:
    """A pool that fails fast: a webhook sender must get 503 in seconds, not hang."""
    redis: Redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    return redis


async def unsafe_redis_settings(redis: Redis) -> list[str]:
    """What in the server's configuration can lose an acknowledged event."""
    problems: list[str] = []
    config = await redis.config_get("appendonly")
    config |= await redis.config_get("appendfsync")
    config |= await redis.config_get("maxmemory-policy")
    if config.get("appendonly") != "yes":
        problems.append("appendonly is not 'yes': a Redis restart loses queued events")
    elif config.get("appendfsync") not in ("always", "everysec"):
        problems.append("appendfsync is neither 'always' nor 'everysec'")
    policy = config.get("maxmemory-policy")
    if policy is not None and policy != "noeviction":
        problems.append(f"maxmemory-policy is '{policy}', not 'noeviction': Redis may evict jobs")
    return problems


async def warn_on_unsafe_redis_config(redis: Redis, logger: logging.Logger) -> None:
    """Warn at start-up; never refuse to start (managed Redis may hide CONFIG)."""
    try:
        problems = await unsafe_redis_settings(redis)
    except RedisError as error:
        logger.warning(
            "could not check the Redis configuration", extra={"error_type": type(error).__name__}
        )
        return
    for problem in problems:
        logger.warning("redis configuration risks losing events", extra={"reason": problem})
