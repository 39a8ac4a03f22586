"""P2 and P2b: events fully handled by the built-in edit handler against the sandbox HrFlow
API answering each call after 100 ms, per worker process.

Each event names its own profile (stored in the sandbox beforehand), so every event
costs what a real one does: a GET, then a PUT of the merged tags. The handler's
time is read from the worker's own metrics (``hrflow_worker_handler_seconds``).
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from typing import Any

import aiohttp
from redis import Redis

from bench import measure
from bench.deliveries import bench_profile_key
from bench.procs import Processes, cpu_seconds
from bench.rows import Config
from sandbox import SAMPLE_SOURCE_KEY
from sandbox.samples import john_doe
from tests.redis_server import free_port

LATENCY_MS = 100
MAX_JOBS = 100  # the default of HRFLOW_WORKER_MAX_JOBS, stated so the bound is explicit
EDIT = ["workers.handlers.edit:register", "bench.handlers:register"]  # count once edited
_HANDLER_SECONDS = re.compile(
    r'hrflow_worker_handler_seconds_(sum|count)\{[^}]*handler="builtin\.edit"[^}]*\} ([\d.e+-]+)'
)


async def _store_profiles(sandbox_url: str, tag: str, count: int) -> None:
    """Profiles to edit, stored through the sandbox's set-up endpoint (no latency, no calls)."""
    limit = asyncio.Semaphore(32)

    async def store(session: aiohttp.ClientSession, number: int) -> None:
        profile = {**john_doe(), "key": bench_profile_key(tag, number), "reference": None}
        body = {"source_key": SAMPLE_SOURCE_KEY, "profile": profile}
        async with limit, session.post(f"{sandbox_url}/_sandbox/profiles", json=body) as answer:
            answer.raise_for_status()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(store(session, n) for n in range(count)))


def _handler_seconds(metrics_url: str) -> tuple[float, int]:
    with urllib.request.urlopen(metrics_url, timeout=5) as answer:  # noqa: S310 (loopback)
        text = answer.read().decode()
    values = {kind: float(value) for kind, value in _HANDLER_SECONDS.findall(text)}
    return values.get("sum", 0.0), int(values.get("count", 0))


def p2_edit(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    events = 600 if config.smoke else 3_000
    sandbox, sandbox_url = procs.start_sandbox(LATENCY_MS)
    metrics_port = free_port()
    env = {
        "HRFLOW_EDIT_TAGS": "processed_by=bench",
        "HRFLOW_API_URL": f"{sandbox_url}/v1",
        "HRFLOW_API_KEY": "sandbox-api-key",
        "HRFLOW_API_USER": "sandbox@hrflow.local",
        "HRFLOW_WORKER_METRICS_PORT": str(metrics_port),
        "HRFLOW_WORKER_MAX_JOBS": str(MAX_JOBS),
    }
    redis.flushall()
    asyncio.run(_store_profiles(sandbox_url, "p2-warm", 50))
    asyncio.run(_store_profiles(sandbox_url, "p2", events))
    worker = procs.start_worker("worker-edit", EDIT, env=env)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    pids = {"worker": worker.pid, "sandbox": sandbox.pid, "redis": procs.redis_pid}
    measure.fill_queue(procs.redis_url, "p2-warm", 50, source_key=SAMPLE_SOURCE_KEY)
    measure.wait_handled(redis, 50, timeout_s=120)
    measure.reset_counters(redis)
    prepared = measure.prepare_events("p2", events, source_key=SAMPLE_SOURCE_KEY)
    sum_before, count_before = _handler_seconds(metrics_url)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.monotonic()
    measure.enqueue_prepared(procs.redis_url, prepared)
    measure.wait_handled(redis, events, timeout_s=600)
    rate = events / (time.monotonic() - start)
    cpu_ms = {n: (cpu_seconds(p) - cpu_before[n]) / events * 1000 for n, p in pids.items()}
    sum_after, count_after = _handler_seconds(metrics_url)
    procs.stop(worker)
    handler_s = (sum_after - sum_before) / max(1, count_after - count_before)
    bound = MAX_JOBS / handler_s
    sdk_rate = 1 / handler_s  # the SDK's model: one event at a time, inline, nothing else
    return {
        "events": events,
        "sandbox_latency_ms": LATENCY_MS,
        "handler_ms": handler_s * 1000,
        "handler_runs": count_after - count_before,
        "max_jobs": MAX_JOBS,
        "cpu_ms_per_event": cpu_ms,  # two cores for all three: the worker's share explains P2
        "P2": {"baseline": bound, "subject": rate, "ratio": rate / bound, "target": 0.8},
        "P2b": {"baseline": sdk_rate, "subject": rate, "ratio": rate / sdk_rate, "target": 50},
    }
