"""Throughput of the built-in edit handler against the sandbox HrFlow API with injected latency.

``python -m bench.edit_throughput [--events 1000] [--latency-ms 100] [--max-jobs 100 ...]``

Each event costs the handler two HrFlow calls (GET the profile, PUT the changes),
each delayed by ``--latency-ms`` in the sandbox, so one event takes at least
twice the latency and a worker's throughput is bounded by
``max_jobs / (2 * latency)``. The sandbox runs in its own process, so its CPU
is not charged to the measured worker; events are queued straight on Redis
(the receiver is measured elsewhere) and one arq worker in this process drains
them in burst mode. Every run checks that each profile was written once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr
from redis.asyncio import Redis

from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.events import Event
from hrflow_webhooks.logs import configure_logging
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from sandbox import DEFAULT_API_KEY, DEFAULT_API_USER
from tests.polling import eventually
from tests.redis_server import RedisServer, free_port
from tests.service import answers
from workers.dead_letters import DeadLetters
from workers.handlers import edit
from workers.registry import Registry
from workers.settings import create_worker

SOURCE_KEY = "bench-source"


def _profile(i: int) -> dict[str, Any]:
    return {
        "key": f"bench{i:035d}",
        "info": {"full_name": f"Bench Person {i}", "summary": "Benchmark profile"},
        "experiences": [
            {
                "title": "Engineer",
                "company": "Bench Corp",
                "date_start": {"iso8601": "2019-01-01T00:00:00"},
                "date_end": {"iso8601": "2021-01-01T00:00:00"},
            }
        ],
        "tags": [],
    }


def _event(i: int, run: int) -> Event:
    profile = {"key": f"bench{i:035d}", "reference": None, "source": {"key": SOURCE_KEY}}
    payload = {"type": "profile.parsing.success", "origin": "api", "message": f"run {run}"}
    return Event.from_payload({**payload, "profile": profile})


async def _prepare(http: aiohttp.ClientSession, sandbox_url: str, events: int) -> None:
    async with http.post(f"{sandbox_url}/_sandbox/reset") as answer:
        answer.raise_for_status()
    for i in range(events):
        body = {"source_key": SOURCE_KEY, "profile": _profile(i)}
        async with http.post(f"{sandbox_url}/_sandbox/profiles", json=body) as answer:
            answer.raise_for_status()


async def _calls(http: aiohttp.ClientSession, sandbox_url: str) -> list[dict[str, Any]]:
    async with http.get(f"{sandbox_url}/_sandbox/calls") as answer:
        calls: list[dict[str, Any]] = (await answer.json())["calls"]
    return calls


async def measure(
    redis_url: str, sandbox_url: str, sandbox_pid: int, events: int, max_jobs: int, run: int
) -> dict[str, Any]:
    settings = Settings(
        redis_url=redis_url,
        api_url=f"{sandbox_url}/v1",
        api_key=SecretStr(DEFAULT_API_KEY),
        api_user=DEFAULT_API_USER,
        edit_tags={"benchmark": "edit"},
        worker_max_jobs=max_jobs,
        job_timeout_s=60,
    )
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    async with aiohttp.ClientSession() as http:
        await _prepare(http, sandbox_url, events)
        async with EventQueue(redis, settings.queue_name, settings.dedup_window_s) as queue:
            await queue.enqueue_events([_event(i, run) for i in range(events)])
        registry = Registry()
        edit.register(registry, settings)
        worker = create_worker(settings, registry, burst=True, handle_signals=False)
        sandbox_cpu_started = cpu_seconds(sandbox_pid)
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            await worker.main()
        finally:
            await worker.close()
        elapsed_s = time.perf_counter() - started
        worker_cpu_s = time.process_time() - cpu_started
        sandbox_cpu_s = cpu_seconds(sandbox_pid) - sandbox_cpu_started
        calls = await _calls(http, sandbox_url)
    dead = await DeadLetters(redis, QueueKeys(settings.queue_name)).count()
    await redis.aclose()
    puts = sum(1 for c in calls if c["method"] == "PUT" and c["status"] == 200)
    return {
        "events": events,
        "max_jobs": max_jobs,
        "elapsed_s": round(elapsed_s, 2),
        "events_per_s": round(events / elapsed_s, 1),
        # CPU near elapsed time means the worker process, not HrFlow's latency, is the limit.
        "worker_cpu_s": round(worker_cpu_s, 2),
        "sandbox_cpu_s": round(sandbox_cpu_s, 2),
        "ceiling_events_per_s": None,
        "puts_ok": puts,
        "api_calls": len(calls),
        "dead_letters": dead,
        "jobs_complete": worker.jobs_complete,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_sandbox(port: int, latency_ms: float) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "sandbox", "--port", str(port), "--no-seed",
        "--latency-ms", str(latency_ms),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    process.stdout.readline()  # the banner: the port is about to be bound
    return process


async def _wait_for(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: answers(http, url), url)


async def main_async(
    args: argparse.Namespace, redis_url: str, sandbox_url: str, sandbox_pid: int
) -> list[dict[str, Any]]:
    await _wait_for(f"{sandbox_url}/_sandbox/faults")
    results = []
    for run, max_jobs in enumerate(args.max_jobs):
        result = await measure(redis_url, sandbox_url, sandbox_pid, args.events, max_jobs, run)
        result["ceiling_events_per_s"] = round(max_jobs / (2 * args.latency_ms / 1000), 1)
        result["latency_ms"] = args.latency_ms
        results.append(result)
        print(orjson.dumps(result).decode(), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.edit_throughput", description=__doc__)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--max-jobs", type=int, nargs="+", default=[100])
    args = parser.parse_args()
    configure_logging("WARNING", "text")
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(Path(tmp) / "redis")
        redis_server.start()
        port = free_port()
        sandbox = _start_sandbox(port, args.latency_ms)
        try:
            asyncio.run(main_async(args, redis_server.url, f"http://127.0.0.1:{port}", sandbox.pid))
        finally:
            sandbox.terminate()
            sandbox.wait(timeout=10)
            redis_server.stop()


if __name__ == "__main__":
    main()
