"""Connecting to Redis the same way everywhere (its fitness is hrflow_webhooks.durability's)."""

from __future__ import annotations

from redis.asyncio import Redis

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
