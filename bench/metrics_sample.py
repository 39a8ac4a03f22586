"""``python -m bench.metrics_sample``: what /metrics shows after 100 events.

Starts its own redis-server, serves the receiver with uvicorn on loopback, sends
100 signed events (5 of them fail permanently, to show dead letters), plus 3
duplicate and 2 badly signed deliveries, lets a worker drain the queue, then
prints the receiver's and the worker's ``hrflow_*`` samples. HrFlow API metrics
stay empty here: the sample handler calls no API.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from arq import Worker
from redis.asyncio import Redis

from hrflow_webhooks.errors import PermanentError
from hrflow_webhooks.events import Event
from hrflow_webhooks.logs import configure_logging
from hrflow_webhooks.settings import Settings
from tests.polling import eventually
from tests.redis_server import RedisServer
from tests.service import (
    METRICS_HEADERS,
    ReceiverServer,
    make_settings,
    parsing_event,
    signed_headers,
)
from workers.registry import Registry
from workers.settings import create_worker

EVENTS = 100
FAILING = 5


async def index_profile(event: Event, ctx: Any) -> None:
    if event.payload.get("fail"):
        raise PermanentError("sample failure")


def hrflow_lines(exposition: str) -> list[str]:
    """Our samples only, without the ``_created`` timestamps prometheus-client adds."""
    return [
        line
        for line in exposition.splitlines()
        if line.startswith("hrflow_") and "_created" not in line.split(" ")[0]
    ]


async def send(server: ReceiverServer, session: aiohttp.ClientSession) -> None:
    events = [parsing_event(f"pk-{i}", fail=i < FAILING) for i in range(EVENTS)]
    for event in events:
        await server.post(session, event)
    for event in events[:3]:
        await server.post(session, event)
    for event in events[:2]:
        await server.post(session, event, signed_headers(event, "wrong-secret"))


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, registry: Registry) -> AsyncIterator[Worker]:
    """A worker picking events up while they arrive, as in production."""
    worker = create_worker(settings, registry, handle_signals=False)
    task = asyncio.create_task(worker.main())
    try:

        async def started() -> bool:
            if task.done():
                task.result()  # a start-up error surfaces here
            return "metrics_server" in worker.ctx

        await eventually(started, "the worker's metrics server")
        yield worker
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()


async def wait_until_drained(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)

    async def queue_empty() -> bool:
        return not await redis.zcard(settings.queue_name)

    try:
        await eventually(queue_empty)
    finally:
        await redis.aclose()


async def sample(redis_url: str) -> tuple[str, str]:
    settings = make_settings(redis_url, worker_metrics_port=0)
    registry = Registry()
    registry.add("profile.parsing.success", index_profile, name="index_profile")
    async with (
        running_worker(settings, registry) as worker,
        aiohttp.ClientSession() as session,
        ReceiverServer(settings) as server,
    ):
        await send(server, session)
        await wait_until_drained(settings)
        async with session.get(f"{server.url}/metrics", headers=METRICS_HEADERS) as response:
            receiver_text = await response.text()
        worker_url = f"http://127.0.0.1:{worker.ctx['metrics_server'].port}/metrics"
        async with session.get(worker_url) as response:
            worker_text = await response.text()
    return receiver_text, worker_text


def main() -> None:
    configure_logging("WARNING")  # the rejected and failed events, as JSON lines on stderr
    with tempfile.TemporaryDirectory() as data_dir:
        redis = RedisServer(Path(data_dir))
        redis.start()
        try:
            receiver_text, worker_text = asyncio.run(sample(redis.url))
        finally:
            redis.stop()
    receiver_lines = [
        line for line in hrflow_lines(receiver_text) if line.startswith("hrflow_webhook_")
    ]
    print("# receiver GET /metrics")
    print("\n".join(receiver_lines))
    # One process here, so each page also shows the other's counters: print each part once.
    print("\n# worker metrics (HRFLOW_WORKER_METRICS_PORT)")
    print("\n".join(line for line in hrflow_lines(worker_text) if line not in receiver_lines))


if __name__ == "__main__":
    main()
