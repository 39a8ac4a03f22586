"""A test plugin that watches runs per subject, for the ordering suites.

On ``profile.parsing.update`` it marks the profile's run as entered (and counts an
overlap if another run of the same profile is inside), waits a little, reads the
profile's "current state" (``test:state:<key>``, which the test sets before each
delivery), records it as seen, and leaves.
"""

from __future__ import annotations

import asyncio
import os
import random

from redis.asyncio import Redis

from hrflow_webhooks.events import Event
from workers.context import HandlerContext
from workers.registry import Registry

OVERLAPS_KEY = "test:overlaps"
WORKERS_KEY = "test:workers"


def state_key(profile_key: str) -> str:
    return f"test:state:{profile_key}"


async def observe(event: Event, ctx: HandlerContext) -> None:
    key = event["profile"]["key"]
    redis = ctx.redis
    if int(await redis.incr(f"test:active:{key}")) > 1:
        await redis.incr(OVERLAPS_KEY)
    await redis.sadd(WORKERS_KEY, os.getpid())  # type: ignore[misc]
    await asyncio.sleep(random.uniform(0, 0.02))
    await redis.set(f"test:seen:{key}", await redis.get(state_key(key)) or b"")
    await redis.incr(f"test:runs:{key}")
    await redis.decr(f"test:active:{key}")


async def overlaps(redis: Redis) -> int:
    return int(await redis.get(OVERLAPS_KEY) or 0)


async def last_seen(redis: Redis, profile_key: str) -> int:
    return int(await redis.get(f"test:seen:{profile_key}") or 0)


async def runs(redis: Redis, profile_key: str) -> int:
    return int(await redis.get(f"test:runs:{profile_key}") or 0)


async def workers_seen(redis: Redis) -> int:
    return int(await redis.scard(WORKERS_KEY))  # type: ignore[misc]


def register(registry: Registry) -> None:
    registry.add("profile.parsing.update", observe, name="subjects")
