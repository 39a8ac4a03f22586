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

from tests.plugins import blocking
from tests.processes import ROOT, WorkerProcess, wait_until_answering
from tests.redis_server import RedisServer, free_port
from tests.service import WEBHOOK_SECRET, eventually, key_exists, parsing_event, signed_headers
from tests.test_load import ReceiverProcess

EVENTS = int(os.environ.get("HRFLOW_FAULT_EVENTS", "2000"))
KILLS = int(os.environ.get("HRFLOW_FAULT_KILLS", "3"))
ORIGIN, TARGET = "fault-origin", "fault-target"
API_KEY, API_USER = "sandbox-api-key", "sandbox@hrflow.local"
JOB_TIMEOUT_S = 4  # crash recovery bound: job_timeout + 10 s
SEND_PAUSE_S = 12 / EVENTS

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


def sandbox_worker_args(sandbox: SandboxProcess, **extra: Any) -> dict[str, Any]:
    """Worker settings: the built-in index handler against the sandbox, patient tries."""
    return {
        "index_source_key": TARGET,
        "api_url": f"{sandbox.url}/v1",
        "api_key": API_KEY,
        "api_user": API_USER,
        "job_timeout_s": JOB_TIMEOUT_S,
        "max_tries": 20,
        **extra,
    }


def _source_of(profile: dict[str, Any]) -> str | None:
    source = profile.get("source")
    return source.get("key") if isinstance(source, dict) else profile.get("source_key")


@dataclass
class Chaos:
    """What the suite did, and what it measured, for the closing report."""

    kills: int = 0
    terminations: int = 0
    sending_at_restart: bool = False
    kills_holding_jobs: int = 0  # each must show up in recovery_s
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
        chaos.kills_holding_jobs += bool(held)
        recoveries.append(
            asyncio.create_task(wait_recovered(redis_server.url, held, chaos, time.monotonic()))
        )
        workers[0] = WorkerProcess(
            redis_server.url, tmp_path / f"w0-{round_number}.log", **worker_args
        )
        if round_number == 0:  # while deliveries flow: they get 503 and are re-sent
            chaos.sending_at_restart = not sending.done()
            await redis.aclose()
            await asyncio.to_thread(redis_server.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(redis_server.start)
            chaos.redis_restarts += 1
            redis = Redis.from_url(redis_server.url)
        if round_number == 1:
            await asyncio.to_thread(workers[1].terminate)
            chaos.terminations += 1
            workers[1] = WorkerProcess(
                redis_server.url, tmp_path / "w1-after-term.log", **worker_args
            )
    await sending
    await asyncio.gather(*recoveries)
    await redis.aclose()


async def test_no_event_is_lost_or_applied_twice_under_crashes_and_restarts(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    chaos = Chaos()
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    receiver = ReceiverProcess(redis_server.url, tmp_path / "receiver.log")
    worker_args = sandbox_worker_args(
        sandbox, handlers="", shutdown_grace_s=2, webhook_secret=WEBHOOK_SECRET
    )
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
                    # Paced like a webhook sender (about 3 s for 2,000), so that every fault
                    # lands while deliveries flow.
                    await asyncio.sleep(SEND_PAUSE_S)

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
    assert chaos.sending_at_restart  # Redis went down while deliveries were flowing...
    assert chaos.retried_deliveries > 0  # ...and those refused were re-sent, and counted
    assert lost == 0
    assert duplicates == 0
    assert handled_once == EVENTS
    assert set(references) == expected
    assert (queued_left, dead_letters, jobs_left) == (0, 0, [])
    assert calls["POST 201"] == EVENTS  # one copy created per event, whatever was retried
    # Every kill that left jobs held saw them finish elsewhere (wait_recovered gives up
    # silently after two minutes: a missing entry is a run never recovered).
    assert chaos.kills_holding_jobs >= 1
    assert len(chaos.recovery_s) == chaos.kills_holding_jobs


# --- a Redis stall and a loop-blocking plugin ---------------------------------------------------

STALL_EVENTS = 200
STALL_BLOCKED = 10  # events whose plugin run blocks its worker's event loop past the timeout
STALL_PAUSE_MS = 6_000  # longer than the job timeout (4 s)
EDIT_TAG = {"name": "stall", "value": "survived"}


async def _stall_outcomes(
    sandbox: SandboxProcess, session: aiohttp.ClientSession, redis: Redis, keys: list[str]
) -> dict[str, Any]:
    """Per handler: events handled (seen in the sandbox or the plugin's record), dead-lettered,
    and lost (neither)."""
    async with session.get(f"{sandbox.url}/_sandbox/profiles") as response:
        profiles = (await response.json())["profiles"]
    copies = Counter(p.get("reference") for p in profiles if _source_of(p) == TARGET)
    tagged = {
        p["key"] for p in profiles if _source_of(p) == ORIGIN and EDIT_TAG in (p.get("tags") or [])
    }
    blocked_ran = {k.decode() for k in await redis.smembers(blocking.EFFECTS_KEY)}  # type: ignore[misc]
    dead: set[tuple[str, str]] = set()
    for letter_id in await redis.zrange("hrflow:queue:dead-letters", 0, -1):
        raw = await redis.get(f"hrflow:queue:dead:{letter_id.decode()}")
        letter = json.loads(raw)
        dead.add((letter["handler"], letter["event"]["payload"]["profile"]["key"]))
    handled = {
        "builtin.index": {k for k in keys if copies[f"origin-{k}"] >= 1},
        "builtin.edit": tagged,
        "blocking": blocked_ran,
    }
    return {
        handler: {
            "handled": len(done & set(keys)),
            "dead": sum(1 for k in keys if (handler, k) in dead),
            "lost": sorted(k for k in keys if k not in done and (handler, k) not in dead),
        }
        for handler, done in handled.items()
    } | {"duplicate_copies": sum(n - 1 for n in copies.values() if n > 1)}


async def test_no_event_is_lost_to_a_redis_stall_or_a_loop_blocking_plugin(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    receiver = ReceiverProcess(redis_server.url, tmp_path / "receiver.log")
    worker_args = sandbox_worker_args(
        sandbox,
        handlers="tests.plugins.blocking",
        edit_tags=f"{EDIT_TAG['name']}={EDIT_TAG['value']}",
        test_block_s=STALL_PAUSE_MS / 1000,
    )
    logs = [tmp_path / f"stall-w{i}.log" for i in range(2)]
    workers = [WorkerProcess(redis_server.url, log, **worker_args) for log in logs]
    keys = [
        f"stall-{i:04d}" + ("-block" if i % (STALL_EVENTS // STALL_BLOCKED) == 7 else "")
        for i in range(STALL_EVENTS)
    ]
    chaos = Chaos()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
            await sandbox.wait_ready(session)
            await receiver.wait_ready(session)
            await asyncio.gather(*(sandbox.store(session, k) for k in keys))

            async def send_all() -> None:
                for chunk in range(0, STALL_EVENTS, 8):
                    await asyncio.gather(
                        *(
                            deliver(session, receiver.url, parsing_event(k, ORIGIN), chaos)
                            for k in keys[chunk : chunk + 8]
                        )
                    )
                    await asyncio.sleep(0.1)  # about 2.5 s in all: the stall lands mid-flow

            health = "hrflow:queue:health-check"
            await eventually(lambda: key_exists(redis, health))  # the workers poll
            sending = asyncio.create_task(send_all())
            held = []
            for _ in range(400):  # pause Redis while the workers hold runs
                held = await in_progress_jobs(redis)
                if len(held) >= 4:
                    break
                await asyncio.sleep(0.01)
            sending_at_pause = not sending.done()
            await redis.execute_command("CLIENT", "PAUSE", STALL_PAUSE_MS, "ALL")
            await sending
            for _ in range(1800):  # liveness: up to three minutes to drain
                if not await redis.zcard("hrflow:queue"):
                    break
                await asyncio.sleep(0.1)
            queued_left = await redis.zcard("hrflow:queue")
            outcomes = await _stall_outcomes(sandbox, session, redis, keys)
    finally:
        for worker in workers:
            worker.close()
        receiver.close()
        sandbox.close()
    lines = [line for log in logs for line in log.read_text().splitlines()]
    blocked_lines = sum(1 for line in lines if "event loop blocked" in line)
    blocks = sum(1 for line in lines if blocking.BLOCKING_NOW in line)
    print(
        f"\nstall: {STALL_EVENTS} events, Redis paused {STALL_PAUSE_MS} ms (job timeout "
        f"{JOB_TIMEOUT_S} s) while workers held {len(held)} runs; {blocks} plugin runs blocked "
        f"the event loop {STALL_PAUSE_MS / 1000:g} s ({STALL_BLOCKED} events set to), "
        f"{blocked_lines} 'event loop blocked' log lines; {chaos.retried_deliveries} "
        f"deliveries re-sent after a 503; "
        f"per handler {outcomes}; left queued {queued_left}"
    )
    assert len(held) >= 4  # the stall hit runs in flight...
    assert sending_at_pause  # ...while deliveries were still arriving
    # Each block that happened was named. (A run the stall cut off before the plugin's
    # blocking step never blocks: most do.)
    assert blocks >= STALL_BLOCKED // 2
    assert blocked_lines == blocks
    assert chaos.retried_deliveries > 0  # deliveries during the stall got 503 and were re-sent
    for handler in ("builtin.index", "builtin.edit", "blocking"):
        assert outcomes[handler]["lost"] == [], handler
        assert outcomes[handler]["handled"] + outcomes[handler]["dead"] == STALL_EVENTS
    assert outcomes["duplicate_copies"] == 0
    assert queued_left == 0
