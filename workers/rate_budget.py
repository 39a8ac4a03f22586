"""A token bucket in Redis: one outbound request budget shared by every worker process.

Scaling workers through the Procfile multiplies concurrency, not HrFlow's rate
limit, so the budget lives in Redis and one Lua script takes a token
atomically. The script reads Redis' own clock (``TIME``), so the processes'
clocks never have to agree. ``burst`` tokens may be spent at once; after that
tokens refill at ``rate_per_s``, so any window of T seconds holds at most
``rate_per_s * T + burst`` requests.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from hrflow_webhooks.queue import RATE_BUDGET_SCRIPT


class SharedRateBudget:
    """``await budget.acquire()`` before each request; it returns once a token is taken.

    Satisfies ``hrflow_client.RateBudget``.
    """

    def __init__(self, redis: Redis, key: str, rate_per_s: float, burst: float = 1.0) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.key = key
        self.rate_per_s = rate_per_s
        self.burst = burst
        # An idle bucket is full again after burst / rate seconds: keep it no longer than that.
        self._ttl_ms = max(1_000, int(burst / rate_per_s * 1000) + 1_000)
        self._take = redis.register_script(RATE_BUDGET_SCRIPT)

    async def acquire(self) -> None:
        while True:
            wait_ms = int(await self._take(keys=[self.key], args=self._args()))
            if wait_ms <= 0:
                return
            await asyncio.sleep(wait_ms / 1000)

    def _args(self) -> list[str]:
        return [repr(self.rate_per_s), repr(self.burst), str(self._ttl_ms)]
