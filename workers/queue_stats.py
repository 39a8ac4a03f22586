"""How far behind the workers are, read from Redis in one round trip.

The queue is arq's sorted set (``Settings.queue_name``) whose score is the time
a job becomes due, in ms: the enqueue time for a new event, a later time for a
deferred retry. So "ready" jobs are those scored up to now, and the oldest
ready score says how long the longest-waiting event has been due. A job stays
in the set while it runs, so a running job counts as ready until it finishes.
A parked or retried run is re-scored, so the oldest wait comes from the first
due time the queue layout keeps for it (``OLDEST_WAIT_SCRIPT``): a run that holds
its profile for hours shows its hours.

Both the worker's metrics (sync, in the scrape thread) and the health check
(async) read the same numbers, with the same commands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from hrflow_webhooks.queue import OLDEST_WAIT_SCRIPT, QueueKeys


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int  # due now: waiting for (or held by) a worker
    deferred: int  # retries scheduled for later
    oldest_ready_age_s: float  # 0 when nothing is due
    dead_letters: int
    oldest_wait_s: float  # the oldest unfinished run's wait since it first became due


def _queue_commands(pipe: Any, keys: QueueKeys, now_ms: int) -> None:
    pipe.zcount(keys.queue, "-inf", now_ms)
    pipe.zcount(keys.queue, f"({now_ms}", "+inf")
    pipe.zrange(keys.queue, 0, 0, withscores=True)
    pipe.zcard(keys.dead_letters)
    # EVAL, not EVALSHA: one call per scrape, and no script cache to miss after a failover.
    pipe.eval(OLDEST_WAIT_SCRIPT, 1, keys.queue, now_ms)


def _stats_from(results: list[Any], now_ms: int) -> QueueStats:
    ready, deferred, first, dead, wait_ms = results
    oldest_score = float(first[0][1]) if first else float(now_ms)
    return QueueStats(
        ready=int(ready),
        deferred=int(deferred),
        oldest_ready_age_s=max(0.0, (now_ms - oldest_score) / 1000),
        dead_letters=int(dead),
        oldest_wait_s=int(wait_ms) / 1000,
    )


async def read_queue_stats(redis: Redis, keys: QueueKeys) -> QueueStats:
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        _queue_commands(pipe, keys, now_ms)
        results = await pipe.execute()
    return _stats_from(results, now_ms)


def read_queue_stats_sync(redis: SyncRedis, keys: QueueKeys) -> QueueStats:
    """For Prometheus' scrape thread, which cannot await the worker's event loop."""
    now_ms = int(time.time() * 1000)
    with redis.pipeline(transaction=False) as pipe:
        _queue_commands(pipe, keys, now_ms)
        results = pipe.execute()
    return _stats_from(results, now_ms)
