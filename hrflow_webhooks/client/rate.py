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

# KEYS: bucket. ARGV: rate per s, burst, key TTL ms. Returns 0 (token taken) or ms to wait.
_TAKE_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local last_ms = tonumber(state[2]) or now_ms
tokens = math.min(burst, tokens + math.max(0, now_ms - last_ms) * rate / 1000)
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now_ms))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return wait_ms
"""


class RateBudget:
    """``await budget.acquire()`` before each request; it returns once a token is taken."""

    def __init__(self, redis: Redis, key: str, rate_per_s: float, burst: float = 1.0) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.key = key
        self.rate_per_s = rate_per_s
        self.burst = burst
        # An idle bucket is full again after burst / rate seconds: keep it no longer than that.
        self._ttl_ms = max(1_000, int(burst / rate_per_s * 1000) + 1_000)
        self._take = redis.register_script(_TAKE_SCRIPT)

    async def acquire(self) -> None:
        while True:
            wait_ms = int(await self._take(keys=[self.key], args=self._args()))
            if wait_ms <= 0:
                return
            await asyncio.sleep(wait_ms / 1000)

    def _args(self) -> list[str]:
        return [repr(self.rate_per_s), repr(self.burst), str(self._ttl_ms)]
