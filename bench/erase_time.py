"""How long `hrflow-webhooks erase` takes on a full event log.

    .venv/bin/python -m bench.erase_time [--entries 100000] [--queued] [--rdb]

A redis-server of its own (AOF on, appendfsync always, as the tests run it; ``--rdb`` turns
RDB snapshots on too) is filled the way the receiver fills it: ``EventQueue`` runs the
enqueue script, which writes each event's job and its ``delivery`` entry in the log; one
event in a thousand is the erased profile's. Without ``--queued`` the runs are then dropped,
as handled runs are, leaving the log full and the queue empty (the usual state); with it,
every event's job is still queued too, so erase reads every job. Then the `erase` command
runs in its own process, timed from start to exit, and again in-process by phase.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from control.erasure import erase_profile, rewrite_files
from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import EVENT_LOG_MAX_ENTRIES, JOB_KEY_PREFIX, QueueKeys
from tests.redis_server import RedisServer
from tests.service import parsing_event

KEYS = QueueKeys("hrflow:queue")
ERASED = "pk-erased"
BATCH = 1_000


async def fill(redis: Redis, entries: int, queued: bool) -> None:
    async with EventQueue(redis, KEYS.queue, dedup_window_s=3_600) as queue:
        for start in range(0, entries, BATCH):
            payloads = [
                parsing_event(ERASED if n % 1_000 == 0 else f"pk-{n}", message=str(n))
                for n in range(start, min(start + BATCH, entries))
            ]
            await queue.enqueue_events([Event.from_payload(p) for p in payloads])
    if queued:
        return
    for pattern in (JOB_KEY_PREFIX + "*", KEYS.order_prefix + "*", KEYS.seen("*")):
        found = [key async for key in redis.scan_iter(match=pattern, count=5_000)]
        for at in range(0, len(found), 5_000):
            await redis.delete(*found[at : at + 5_000])
    await redis.delete(KEYS.queue)


async def by_phase(url: str) -> tuple[float, float]:
    redis = Redis.from_url(url)
    try:
        started = time.perf_counter()
        await erase_profile(redis, KEYS, ERASED)
        erased = time.perf_counter()
        await rewrite_files(redis)
        return erased - started, time.perf_counter() - erased
    finally:
        await redis.aclose()


async def prepared(url: str, entries: int, queued: bool) -> int:
    redis = Redis.from_url(url)
    try:
        await redis.flushall()
        await fill(redis, entries, queued)
        await rewrite_files(redis)  # the AOF as compact as a long-running Redis keeps it
        return int(await redis.xlen(KEYS.log))
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.erase_time", description=__doc__)
    parser.add_argument("--entries", type=int, default=EVENT_LOG_MAX_ENTRIES)
    parser.add_argument("--queued", action="store_true", help="leave every event's job queued")
    parser.add_argument("--rdb", action="store_true", help="RDB snapshots on too")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        extra = ("--save", "3600 1") if options.rdb else ()
        server = RedisServer(Path(folder), None, *extra)
        server.start()
        try:
            logged = asyncio.run(prepared(server.url, options.entries, options.queued))
            command = [sys.executable, "-m", "control.cli", "erase", "--profile-key", ERASED]
            started = time.perf_counter()
            out = subprocess.run(
                command, env={"REDIS_URL": server.url, "PATH": ""}, capture_output=True,
                text=True, check=True,
            ).stdout  # fmt: skip
            whole_s = time.perf_counter() - started
            asyncio.run(prepared(server.url, options.entries, options.queued))
            redis_s, files_s = asyncio.run(by_phase(server.url))
        finally:
            server.stop()
    print(out.rstrip())
    print(
        f"log of {logged} entries{', every job queued' if options.queued else ''}: "
        f"`erase` took {whole_s:.2f} s from start to exit; in-process, Redis {redis_s:.2f} s "
        f"and the files {files_s:.2f} s"
    )


if __name__ == "__main__":
    main()
