"""P8: what operators searching the console cost every delivery.

A full event log (its default cap, 100,000 entries, shaped as the receiver writes them),
the deployed receiver (the Procfile's web line, default settings) and the deployed console
(its Procfile line) on one Redis. A steady stream of signed deliveries, each on a new
connection, is timed alone and then while two operators search the whole log without
pause (a filter nothing matches: every slice is read); the rounds alternate. The figure is
the receiver's p99 with searches ÷ without, target ≤ 2x; beside it, Redis' own time per
search slice (INFO commandstats), which the console bounds to about 1 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
from typing import Any

import aiohttp
from redis import Redis

from bench import attacks, measure
from bench.procs import WEBHOOK_SECRET, Processes, deployed_env, terminate
from control.commands import PROCFILE, expand
from hrflow_webhooks.queue import EVENT_LOG_MAX_ENTRIES, QueueKeys
from tests.polling import eventually
from tests.redis_server import free_port

CONSOLE_TOKEN = "bench-console-token-0123456789"
OPERATORS = 2
P99_TARGET = 2.0


def p8_console_search(procs: Processes, redis: Redis, config: Any) -> dict[str, Any]:
    redis.flushall()
    fill_log(redis, 10_000 if config.smoke else EVENT_LOG_MAX_ENTRIES)
    rate, seconds = (20, 3) if config.smoke else (50, 8)
    port, console_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}/webhook"
    log = procs.work_dir / "p8-receiver.log"
    with (
        attacks.deployed_receiver(procs.redis_url, WEBHOOK_SECRET, port, log),
        deployed_console(procs, console_port),
    ):
        return asyncio.run(
            _measure(redis, url, f"http://127.0.0.1:{console_port}", rate, seconds, config.reps)
        )


def fill_log(redis: Redis, entries: int) -> None:
    """Delivery entries as the enqueue script writes them (hrflow_webhooks.queue.LOG_FIELDS)."""
    log = QueueKeys("hrflow:queue").log
    for start in range(0, entries, 1_000):
        with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 1_000, entries)):
                pipe.xadd(log, _entry(n))  # type: ignore[arg-type]
            pipe.execute()


def _entry(n: int) -> dict[str, str]:
    return {
        "k": "delivery", "e": f"{n:064x}", "r": f"{n:024x}.bench{n:x}",
        "s": f"profile/source:p8-{n % 7}/key:p8-{n}", "t": "profile.parsing.success",
        "o": "queued", "request_id": f"{n:032x}", "via": "http",
    }  # fmt: skip


@contextlib.contextmanager
def deployed_console(procs: Processes, port: int) -> Any:
    env = deployed_env(procs.redis_url, WEBHOOK_SECRET) | {
        "HRFLOW_CONSOLE_TOKEN": CONSOLE_TOKEN,
        "HRFLOW_CONSOLE_PORT": str(port),
    }
    with (procs.work_dir / "p8-console.log").open("wb") as output:
        process = subprocess.Popen(
            expand(PROCFILE["console"], {}), env=env, stdout=output, stderr=output
        )
    try:
        yield process
    finally:
        terminate(process)


async def _measure(
    redis: Redis, url: str, console: str, rate: float, seconds: float, reps: int
) -> dict[str, Any]:
    await attacks.until_answering(url, WEBHOOK_SECRET)
    headers = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        await _until_console_answers(session, console)
        calm, searched, searches = [], [], 0
        redis.config_resetstat()
        for rep in range(reps):
            alone = await attacks.good_deliveries(url, WEBHOOK_SECRET, rate, seconds, f"c{rep}")
            loaded, done = await _while_searching(session, console, url, rate, seconds, rep)
            calm.append(_checked(alone).p99_s)
            searched.append(_checked(loaded).p99_s)
            searches += done
    stats: dict[str, Any] = redis.info("commandstats")  # type: ignore[assignment]
    slices = stats.get("cmdstat_evalsha", {})
    ratios = [s / c for s, c in zip(searched, calm, strict=True)]
    return {
        "operators": OPERATORS,
        "log_entries": int(redis.xlen(QueueKeys("hrflow:queue").log)),  # type: ignore[arg-type]
        "p99_ms_alone": measure.median(calm) * 1000,
        "p99_ms_searching": measure.median(searched) * 1000,
        "ratio": measure.median(ratios),
        "ratios": ratios,
        "target": P99_TARGET,
        "searches": searches,
        "redis_us_per_script_call": float(slices.get("usec_per_call", 0.0)),
        "script_calls": int(slices.get("calls", 0)),
    }


async def _until_console_answers(session: aiohttp.ClientSession, console: str) -> None:
    async def answers() -> bool:
        async with session.get(f"{console}/healthz") as response:
            return response.status == 200

    await eventually(answers, "the console", ignoring=(aiohttp.ClientError,))


async def _while_searching(
    session: aiohttp.ClientSession, console: str, url: str, rate: float, seconds: float, rep: int
) -> tuple[attacks.GoodTraffic, int]:
    stop = asyncio.Event()
    counts = [0] * OPERATORS

    async def operator(n: int) -> None:
        while not stop.is_set():
            async with session.get(f"{console}/events?profile_key=nobody-{n}") as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"a console search answered {response.status}")
            counts[n] += 1

    searching = [asyncio.create_task(operator(n)) for n in range(OPERATORS)]
    try:
        await asyncio.sleep(0.5)  # both are scanning before the first delivery
        traffic = await attacks.good_deliveries(url, WEBHOOK_SECRET, rate, seconds, f"s{rep}")
    finally:
        stop.set()
        await asyncio.gather(*searching)
    if not all(counts):
        raise RuntimeError(f"an operator never finished a search: {counts}")
    return traffic, sum(counts)


def _checked(traffic: attacks.GoodTraffic) -> attacks.GoodTraffic:
    if traffic.success_rate != 1.0:
        codes = statistics.multimode(traffic.statuses)
        raise RuntimeError(f"deliveries failed during P8 (most common status {codes})")
    return traffic
