"""Measuring tools shared by the rows: wrk runs, queue fills, counters, percentiles."""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from bench.deliveries import bench_event
from bench.handlers import HANDLED_KEY, PICKUP_KEY
from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.events import Event
from tests.polling import eventually_sync

WRK_SCRIPT = Path(__file__).with_name("replay.lua")
QUEUE = "hrflow:queue"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    requests_per_s: float
    not_2xx: int


def run_wrk(url: str, deliveries: Path, seconds: float, connections: int) -> WrkResult:
    """wrk, one thread (two cores: one for the server, one for wrk and Redis)."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not on PATH: `make bench` installs Debian's wrk package")
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
        "-s", str(WRK_SCRIPT), f"{url}/webhook", "--", str(deliveries), "1",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if rate is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    return WrkResult(int(total.group(1)), float(rate.group(1)), int(bad.group(1)) if bad else 0)


def fill_queue(
    redis_url: str, tag: str, count: int, batch: int = 500, source_key: str = "sk-1"
) -> None:
    """Queue ``count`` unique events through the receiver's own enqueue (one script per batch)."""
    enqueue_prepared(redis_url, prepare_events(tag, count, source_key), batch)


def prepare_events(tag: str, count: int, source_key: str = "sk-1") -> list[Event]:
    """Events built (ids hashed) ahead of a timed fill, so the fill costs Redis time only."""
    return [Event.from_payload(bench_event(tag, n, source_key)) for n in range(count)]


def enqueue_prepared(redis_url: str, events: list[Event], batch: int = 1_000) -> None:
    asyncio.run(_enqueue_prepared(redis_url, events, batch))


async def _enqueue_prepared(redis_url: str, events: list[Event], batch: int) -> None:
    redis = AsyncRedis.from_url(redis_url)
    try:
        async with EventQueue(redis, QUEUE, dedup_window_s=86_400) as queue:
            for first in range(0, len(events), batch):
                await queue.enqueue_events(events[first : first + batch])
    finally:
        await redis.aclose()


def queue_length(redis: Redis) -> int:
    return int(cast(int, redis.zcard(QUEUE)))


def handled(redis: Redis) -> int:
    return int(cast(bytes | None, redis.get(HANDLED_KEY)) or 0)


def wait_handled(redis: Redis, target: int, timeout_s: float) -> None:
    """Until the workers have handled ``target`` events; raises past ``timeout_s``."""
    try:
        eventually_sync(lambda: handled(redis) >= target, timeout_s=timeout_s, interval_s=0.02)
    except AssertionError:
        count = handled(redis)
        raise TimeoutError(f"only {count} of {target} events handled in {timeout_s} s") from None


def redis_commands(redis: Redis) -> int:
    """Commands Redis has run, every kind, including those inside scripts and MULTI/EXEC."""
    stats = cast(dict[str, dict[str, int]], redis.info("commandstats"))
    return sum(int(entry["calls"]) for entry in stats.values())


def reset_counters(redis: Redis) -> None:
    redis.delete(HANDLED_KEY, PICKUP_KEY)


def pickups_ms(redis: Redis) -> list[float]:
    return [float(value) for value in cast(list[bytes], redis.lrange(PICKUP_KEY, 0, -1))]


def used_memory(redis: Redis) -> int:
    return int(cast(dict[str, Any], redis.info("memory"))["used_memory"])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values)
