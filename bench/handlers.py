"""Handlers for the worker rows (P3-P5). The no-op ones cost almost nothing, so the figures
measure the pipeline (poll, job, markers), not a handler; ``register_io`` waits like a
handler that calls the HrFlow API, which is what real handlers spend their time on.

Both count handled events in Redis, so the bench reads throughput from outside
the worker; ``register_timed`` also records each event's pick-up latency.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hrflow_webhooks.events import Event
from workers.registry import Registry

EVENT_TYPE = "profile.parsing.success"
HANDLED_KEY = "bench:handled"
PICKUP_KEY = "bench:pickup-ms"  # receipt → handler start, ms, one entry per event
# The built-in edit handler's time at P2's 100 ms per sandbox call: a GET, then a PUT.
IO_WAIT_S = 0.2


async def count(event: Event, ctx: Any) -> None:
    await ctx.redis.incr(HANDLED_KEY)


async def count_timed(event: Event, ctx: Any) -> None:
    pickup_ms = (time.time() - event.received_at) * 1000
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.rpush(PICKUP_KEY, f"{pickup_ms:.3f}")
        pipe.incr(HANDLED_KEY)
        await pipe.execute()


async def wait_then_count(event: Event, ctx: Any) -> None:
    await asyncio.sleep(IO_WAIT_S)
    await ctx.redis.incr(HANDLED_KEY)


def register(registry: Registry) -> None:
    registry.add(EVENT_TYPE, count, name="bench-count")


def register_timed(registry: Registry) -> None:
    registry.add(EVENT_TYPE, count_timed, name="bench-count")


def register_io(registry: Registry) -> None:
    registry.add(EVENT_TYPE, wait_then_count, name="bench-io")


STARTED_KEY = "bench:started"
# A handler as slow as an HrFlow call that takes seconds: long enough to be cut off by a kill.
SLOW_HANDLER_S = 3.0


async def slow_then_count(event: Event, ctx: Any) -> None:
    await ctx.redis.incr(STARTED_KEY)
    await asyncio.sleep(SLOW_HANDLER_S)
    await ctx.redis.incr(HANDLED_KEY)


def register_slow(registry: Registry) -> None:
    registry.add(EVENT_TYPE, slow_then_count, name="bench-slow")
