"""Fault injection with real processes: while N signed deliveries flow through one receiver
process into two worker processes running the built-in ``index`` handler against the
sandbox HrFlow API, the suite SIGKILLs workers several times, SIGTERMs one once and
restarts the Redis server once (AOF, appendfsync always). Afterwards every event's
effect - one copy of its profile in the target source - exists exactly once, nothing is
lost, and nothing is left queued or dead-lettered.

HRFLOW_FAULT_EVENTS (default 2,000) and HRFLOW_FAULT_KILLS (default 3).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.processes import ROOT, WorkerProcess, wait_until_answering
from tests.redis_server import RedisServer, free_port
from tests.service import WEBHOOK_SECRET, parsing_event, signed_headers
from tests.test_load import ReceiverProcess

EVENTS = int(os.environ.get("HRFLOW_FAULT_EVENTS", "2000"))
KILLS = int(os.environ.get("HRFLOW_FAULT_KILLS", "3"))
ORIGIN, TARGET = "fault-origin", "fault-target"
API_KEY, API_USER = "sandbox-api-key", "sandbox@hrflow.local"
JOB_TIMEOUT_S = 4  # crash recovery bound: job_timeout + 10 s

pytestmark = pytest.mark.slow


class SandboxProcess:
    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandbox", "--port", str(self.port), "--no-seed"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        await wait_until_answering(session, f"{self.url}/_sandbox/profiles", "sandbox")

    async def store(self, session: aiohttp.ClientSession, key: str) -> None:
        profile = {"key": key, "text": "synthetic profile for fault injection"}
        body = {"source_key": ORIGIN, "profile": profile}
        async with session.post(f"{self.url}/_sandbox/profiles", json=body) as response:
            assert response.status == 200, await response.text()

    async def profiles_in(self, session: aiohttp.ClientSession, source_key: str) -> list[Any]:
        async with session.get(f"{self.url}/_sandbox/profiles") as response:
            profiles = (await response.json())["profiles"]
        return [p for p in profiles if _source_of(p) == source_key]

    async def calls(self, session: aiohttp.ClientSession) -> Counter[str]:
        async with session.get(f"{self.url}/_sandbox/calls") as response:
            calls = (await response.json())["calls"]
        return Counter(f"{c['method']} {c['status']}" for c in calls)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


def _source_of(profile: dict[str, Any]) -> str | None:
    source = profile.get("source")
    return source.get("key") if isinstance(source, dict) else profile.get("source_key")


@dataclass
class Chaos:
    """What the suite did, and what it measured, for the closing report."""

    kills: int = 0
    terminations: int = 0
    redis_restarts: int = 0
    retried_deliveries: int = 0
    recovery_s: list[tuple[int, float]] = field(default_factory=list)  # (jobs held, seconds)


async def deliver(
    session: aiohttp.ClientSession, url: str, event: dict[str, Any], chaos: Chaos
) -> None:
    """Deliver like HrFlow would: retry until acknowledged (503 while Redis restarts)."""
    body, headers = json.dumps(event).encode(), signed_headers(event)
    for _ in range(600):
        try:
            async with session.post(f"{url}/webhook", data=body, headers=headers) as response:
                await response.read()
                if response.status == 202:
                    return
                assert response.status == 503, response.status  # nothing but unavailability
        except aiohttp.ClientError:
            pass
        chaos.retried_deliveries += 1
        await asyncio.sleep(0.1)
    raise AssertionError("a delivery was never acknowledged")


async def in_progress_jobs(redis: Redis) -> list[str]:
    return [k.decode().split(":", 2)[2] async for k in redis.scan_iter("arq:in-progress:*")]


async def wait_recovered(url: str, job_ids: list[str], chaos: Chaos, started: float) -> None:
    """Time until every job the killed worker held has finished on another worker."""
    if not job_ids:
        return
    async with Redis.from_url(url) as redis:
        for _ in range(1200):
            try:
                pending = [j for j in job_ids if await redis.exists(f"arq:job:{j}")]
            except RedisConnectionError:  # the suite restarts Redis meanwhile
                pending = job_ids
            if not pending:
                chaos.recovery_s.append((len(job_ids), time.monotonic() - started))
                return
            await asyncio.sleep(0.1)


async def inject_faults(
    redis_server: RedisServer,
    workers: list[WorkerProcess],
    worker_args: dict[str, Any],
    tmp_path: Path,
    chaos: Chaos,
    sending: asyncio.Task[None],
) -> None:
    redis = Redis.from_url(redis_server.url)
    recoveries: list[asyncio.Task[None]] = []
    for round_number in range(KILLS):
        await asyncio.sleep(1.0)
        held = await in_progress_jobs(redis)
        for _ in range(100):  # kill mid-job: wait until the worker holds some
            if held:
                break
            await asyncio.sleep(0.02)
            held = await in_progress_jobs(redis)
        await asyncio.to_thread(workers[0].kill)
        chaos.kills += 1
        held = await in_progress_jobs(redis)  # the killed worker's jobs stay marked in progress
        recoveries.append(
            asyncio.create_task(wait_recovered(redis_server.url, held, chaos, time.monotonic()))
        )
        workers[0] = WorkerProcess(
            redis_server.url, tmp_path / f"w0-{round_number}.log", **worker_args
        )
        if round_number == 0:
            await asyncio.to_thread(workers[1].terminate)
            chaos.terminations += 1
            workers[1] = WorkerProcess(
                redis_server.url, tmp_path / "w1-after-term.log", **worker_args
            )
        if round_number == 1:
            await redis.aclose()
            await asyncio.to_thread(redis_server.stop)
            await asyncio.sleep(1.0)  # deliveries meanwhile must get 503 and be retried
            await asyncio.to_thread(redis_server.start)
            chaos.redis_restarts += 1
            redis = Redis.from_url(redis_server.url)
    await sending
    await asyncio.gather(*recoveries)
    await redis.aclose()


async def test_no_event_is_lost_or_applied_twice_under_crashes_and_restarts(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    chaos = Chaos()
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    receiver = ReceiverProcess(redis_server.url, tmp_path / "receiver.log")
    worker_args = {
        "handlers": "",
        "index_source_key": TARGET,
        "api_url": f"{sandbox.url}/v1",
        "api_key": API_KEY,
        "api_user": API_USER,
        "job_timeout_s": JOB_TIMEOUT_S,
        "shutdown_grace_s": 2,
        "max_tries": 20,
        "webhook_secret": WEBHOOK_SECRET,
    }
    workers = [
        WorkerProcess(redis_server.url, tmp_path / f"w{i}.log", **worker_args) for i in range(2)
    ]
    keys = [f"fault-{i:05d}" for i in range(EVENTS)]
    try:
        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(connector=connector) as session:
            await sandbox.wait_ready(session)
            await receiver.wait_ready(session)
            for chunk in range(0, EVENTS, 100):
                await asyncio.gather(
                    *(sandbox.store(session, k) for k in keys[chunk : chunk + 100])
                )

            async def send_all() -> None:
                for chunk in range(0, EVENTS, 8):
                    batch = keys[chunk : chunk + 8]
                    await asyncio.gather(
                        *(
                            deliver(session, receiver.url, parsing_event(k, ORIGIN), chaos)
                            for k in batch
                        )
                    )

            started = time.monotonic()
            sending = asyncio.create_task(send_all())
            await inject_faults(redis_server, workers, worker_args, tmp_path, chaos, sending)
            async with Redis.from_url(redis_server.url) as fresh:
                for _ in range(1800):  # liveness: up to three minutes to drain
                    if not await fresh.zcard("hrflow:queue"):
                        break
                    await asyncio.sleep(0.1)
                elapsed_s = time.monotonic() - started
                queued_left = await fresh.zcard("hrflow:queue")
                dead_letters = await fresh.zcard("hrflow:queue:dead-letters")
                jobs_left = [k async for k in fresh.scan_iter("arq:job:*")]
            copies = await sandbox.profiles_in(session, TARGET)
            calls = await sandbox.calls(session)
    finally:
        for worker in workers:
            worker.close()
        receiver.close()
        sandbox.close()

    references = Counter(p.get("reference") for p in copies)
    expected = {f"origin-{k}" for k in keys}
    handled_once = sum(1 for ref in expected if references[ref] == 1)
    duplicates = sum(n - 1 for n in references.values() if n > 1)
    lost = len(expected - set(references))
    recovery = ", ".join(f"{n} jobs in {s:.1f} s" for n, s in chaos.recovery_s)
    print(
        f"\nfaults: {EVENTS} events sent in {elapsed_s:.1f} s; {chaos.kills} SIGKILL, "
        f"{chaos.terminations} SIGTERM, {chaos.redis_restarts} Redis restart; "
        f"{chaos.retried_deliveries} deliveries re-sent after a 503 or refused connection; "
        f"handled once {handled_once}, lost {lost}, duplicates {duplicates}; "
        f"recovery of the jobs a SIGKILLed worker held: [{recovery}]; sandbox calls {dict(calls)}; "
        f"left queued {queued_left}, dead letters {dead_letters}"
    )
    assert (chaos.kills, chaos.terminations, chaos.redis_restarts) == (KILLS, 1, 1)
    assert lost == 0
    assert duplicates == 0
    assert handled_once == EVENTS
    assert set(references) == expected
    assert (queued_left, dead_letters, jobs_left) == (0, 0, [])
