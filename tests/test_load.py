"""Load: a bounded burst of signed deliveries against one uvicorn receiver process while two
worker processes drain the queue. Afterwards: no error answers, nothing left queued, and
Redis holds only the dedup window (a seen marker and a done marker per event).

HRFLOW_LOAD_DELIVERIES (default 20,000) and HRFLOW_LOAD_CONCURRENCY (default 64).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from control.commands import web_argv
from tests.polling import eventually
from tests.processes import ROOT, WorkerProcess, worker_env
from tests.redis_server import RedisServer, free_port
from tests.service import WEBHOOK_SECRET, answers, parsing_event, signed_headers

DELIVERIES = int(os.environ.get("HRFLOW_LOAD_DELIVERIES", "20000"))
CONCURRENCY = int(os.environ.get("HRFLOW_LOAD_CONCURRENCY", "64"))

pytestmark = pytest.mark.slow


class ReceiverProcess:
    """The Procfile's web line in its own process, on a free port."""

    def __init__(self, redis_url: str, log_path: Path, **settings: Any) -> None:
        self.env = worker_env(redis_url, **settings) | {"HRFLOW_WEBHOOK_SECRET": WEBHOOK_SECRET}
        self.log = log_path.open("ab")
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            web_argv(self.port, "127.0.0.1"),
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def wait_ready(self, http: aiohttp.ClientSession) -> None:
        """Until /readyz answers. A free port can be taken between being found and bound (by
        another process's outgoing connection): then the receiver exits, and starts again on
        another port."""
        for _ in range(3):

            async def ready_or_gone() -> bool:
                return self.process.poll() is not None or await answers(http, f"{self.url}/readyz")

            await eventually(ready_or_gone, "the receiver's /readyz")
            if self.process.poll() is None:
                return
            self._start()
        raise AssertionError("the receiver exited three times at start-up: see its log")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


async def send_all(
    url: str, deliveries: list[tuple[bytes, dict[str, str]]]
) -> collections.Counter[int]:
    statuses: collections.Counter[int] = collections.Counter()
    pending = iter(deliveries)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def sender() -> None:
            for body, headers in pending:
                async with session.post(f"{url}/webhook", data=body, headers=headers) as response:
                    await response.read()
                    statuses[response.status] += 1

        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    return statuses


async def test_a_burst_is_fully_queued_and_drained(
    redis: Redis, redis_server: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    baseline_memory = (await redis.info("memory"))["used_memory"]
    events = [parsing_event(f"load-{i}") for i in range(DELIVERIES)]
    deliveries = [(json.dumps(e).encode(), signed_headers(e)) for e in events]
    receiver = ReceiverProcess(redis_server.url, tmp_path / "receiver.log")
    workers = [WorkerProcess(redis_server.url, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        await receiver.wait_ready(http)
        started = time.perf_counter()
        statuses = await send_all(receiver.url, deliveries)
        ingest_s = time.perf_counter() - started

        async def all_handled() -> bool:
            handled = await redis.llen("test:effects") >= DELIVERIES  # type: ignore[misc]
            return handled and not await redis.zcard("hrflow:queue")

        with contextlib.suppress(AssertionError):  # liveness; the asserts below say what is left
            await eventually(all_handled, timeout_s=120, interval_s=0.05)
        drained_s = time.perf_counter() - started
    finally:
        receiver.close()
        for worker in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.terminate()  # a stopped worker drops its lease key
            worker.close()

    print(f"\nload: {DELIVERIES} deliveries, concurrency {CONCURRENCY}: statuses {dict(statuses)}, "
          f"ingest {DELIVERIES / ingest_s:.0f}/s, all handled after {drained_s:.1f} s")  # fmt: skip
    assert statuses == {202: DELIVERIES}
    assert await redis.llen("test:effects") == DELIVERIES  # type: ignore[misc]
    assert len(set(await redis.lrange("test:effects", 0, -1))) == DELIVERIES  # type: ignore[misc]  # each once
    assert await redis.zcard("hrflow:queue") == 0
    assert await redis.zcard("hrflow:queue:dead-letters") == 0
    leftovers = collections.Counter(
        [key.decode().rsplit(":", 1)[0] async for key in redis.scan_iter(count=5000)]
    )
    # Only the dedup window remains: a seen marker per (once) event, expiring; no arq job,
    # in-progress, retry or result key, no run's markers or order list, no worker's lease.
    assert set(leftovers) <= {"hrflow:queue:seen", "hrflow:queue", "test"}
    assert leftovers["hrflow:queue:seen"] == DELIVERIES
    used_memory = (await redis.info("memory"))["used_memory"]
    # The event log is kept by design, capped by entries (HRFLOW_EVENT_LOG_MAX_ENTRIES): its
    # cost is measured per entry, the rest per event for the dedup window.
    log_bytes = int(await redis.memory_usage("hrflow:queue:log", samples=0) or 0)
    log_entries = await redis.xlen("hrflow:queue:log")
    assert log_entries == 3 * DELIVERIES  # a delivery, a handler and a run entry per event
    per_entry = log_bytes / log_entries
    per_event = (used_memory - baseline_memory - log_bytes) / DELIVERIES
    print(f"load: Redis memory per event kept for the dedup window: {per_event:.0f} bytes; "
          f"event log: {per_entry:.0f} bytes per entry")  # fmt: skip
    assert per_event < 1_000
    assert per_entry < 400
