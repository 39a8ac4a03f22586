"""Surviving the loss of a machine, with real processes on loopback (``make test-faults``).

**Sentinel failover.** A primary, two replicas and three Sentinels (down-after 1 s), each a
redis-server process; one receiver and two worker processes find the primary through the
Sentinels only, and run the built-in ``index`` handler against the sandbox HrFlow API,
whose records count what was handled. A sender resends every delivery not answered 2xx.
The replicas follow the primary over a 100 ms link (:class:`tests.redis_ha.LaggingLink`),
and the primary is SIGKILLed a third of the way in, with a backlog queued, taking what
the link still carried; the Sentinels promote a replica. With
``HRFLOW_REDIS_MIN_REPLICAS_ACK=1`` no event answered 2xx may be lost, and before the run a
freeze (SIGSTOP) of both replicas must hold every delivery at 503 until they resume. The
same run with acknowledgement off must lose some events answered 2xx: the control that
shows the run can see a loss.

**Leases.** A worker SIGKILLed while it holds runs of 3 s handlers: they complete on the
other worker within the lease plus the handler (the figure ``make bench`` reports). A worker
SIGSTOPped mid-handler for longer than its lease but shorter than the run's deadline, then
SIGCONTed: its run was taken over, its outcome is written once, no dead letter, and the
profile's next event is handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.redis_setup import connect_redis
from tests.plugins import behaviour
from tests.polling import eventually
from tests.processes import WorkerProcess
from tests.redis_ha import SentinelGroup
from tests.redis_server import RedisServer
from tests.service import WEBHOOK_SECRET, enqueue, make_settings, parsing_event
from tests.test_faults import (
    ORIGIN,
    TARGET,
    Chaos,
    Effects,
    SandboxProcess,
    deliver,
    sandbox_worker_args,
)
from tests.test_load import ReceiverProcess

EVENTS = int(os.environ.get("HRFLOW_FAILOVER_EVENTS", "2000"))
SEND_RATE_PER_S = 150  # new events a second, as a busy HrFlow workspace might send
# HrFlow's answers take this long, and each worker runs this many at once: the workers drain
# about 110 events a second, so a backlog is queued when the primary dies, as in production
# at a peak (with no backlog, everything answered 2xx is handled within milliseconds, and a
# lost write would go unseen).
API_LATENCY_MS, WORKER_MAX_JOBS = 50, 8
LINK_DELAY_S = 0.1  # the replicas follow the primary over a 100 ms link
BACK_WITHIN_S = 30.0  # the receiver answers 2xx again this soon after the primary's death
KEYS = QueueKeys("hrflow:queue")

pytestmark = pytest.mark.slow


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    # The AOF every second, as README asks beside replicas: a primary restarted with nothing
    # on disk would come back empty and empty its replicas. A 202 waits for a replica only.
    persistence = ("--appendonly", "yes", "--appendfsync", "everysec")
    group = SentinelGroup(tmp_path / "redis", 2, *persistence, link_delay_s=LINK_DELAY_S)
    yield group
    group.stop()


@dataclass
class FailoverRun:
    """What one failover run did and measured."""

    acknowledged: int = 0
    handled: int = 0
    lost: list[str] = field(default_factory=list)
    killed_at: float = 0.0
    refused_s: float = 0.0  # from the primary's death to the first 2xx after it
    failover_s: float = 0.0  # until the Sentinels named a new primary
    backlog_at_kill: int = 0  # runs queued on the primary when it died
    re_executions: int = 0
    duplicate_copies: int = 0
    dead_letters: int = 0
    refusals: Counter[str] = field(default_factory=Counter)  # "503", or the connection error
    held_at_freeze: int = 0  # deliveries answered 2xx while both replicas were frozen
    worker_restarts: int = 0
    workers_alive: bool = False
    handled_after_failover: list[int] = field(default_factory=list)  # per worker


@dataclass
class Sender:
    """HrFlow as a sender: every delivery resent until it is answered 2xx (test_faults')."""

    url: str
    session: aiohttp.ClientSession
    record: Chaos = field(default_factory=Chaos)

    def deliver(self, key: str) -> asyncio.Task[None]:
        event = parsing_event(key, ORIGIN)
        return asyncio.create_task(deliver(self.session, self.url, event, self.record))

    @property
    def acknowledged(self) -> dict[str, float]:
        return self.record.acknowledged_at


async def send_paced(sender: Sender, keys: list[str]) -> None:
    deliveries = []
    for n, key in enumerate(keys):
        deliveries.append(sender.deliver(key))
        if n % 8 == 7:
            await asyncio.sleep(8 / SEND_RATE_PER_S)
    await asyncio.gather(*deliveries)


async def replicas_hold_deliveries(group: SentinelGroup, sender: Sender, keys: list[str]) -> int:
    """Freeze both replicas: deliveries are refused (none answered 2xx) until they resume.
    Returns how many were answered 2xx while frozen (must be 0)."""
    for replica in group.replicas:
        replica.freeze()
    sending = [sender.deliver(key) for key in keys]
    await asyncio.sleep(2.0)
    held = sum(1 for key in keys if key in sender.acknowledged)
    for replica in group.replicas:
        replica.thaw()
    await asyncio.gather(*sending)
    return held


async def kill_primary(group: SentinelGroup, sender: Sender, run: FailoverRun) -> None:
    """A third of the way in, the primary's host dies with what its link to the replicas
    still carried, and the Sentinels promote a replica."""
    while len(sender.acknowledged) < EVENTS // 3:
        await asyncio.sleep(0.005)
    async with Redis.from_url(group.primary.url) as primary:
        run.backlog_at_kill = int(await primary.zcard(KEYS.queue))
    old_port = group.primary.port
    group.primary.kill()
    run.killed_at = time.time()
    await eventually(
        lambda: asyncio.to_thread(group.failed_over, old_port), "a new primary", timeout_s=60
    )
    run.failover_s = time.time() - run.killed_at


def handled_after(log: Path, moment: float) -> int:
    """Runs the worker of ``log`` handled after ``moment`` (its 'profile indexed' lines)."""
    count = 0
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            count += record.get("message") == "profile indexed" and record["ts"] > moment
    return count


def restarts_logged(logs: list[Path]) -> int:
    return sum(
        1 for log in logs for line in log.read_text().splitlines() if "worker stopped" in line
    )


async def fail_over(tmp_path: Path, group: SentinelGroup, replicas_ack: int) -> FailoverRun:
    run = FailoverRun()
    settings: dict[str, Any] = {**group.settings(), "redis_min_replicas_ack": replicas_ack}
    settings["redis_durability"] = "replicas" if replicas_ack else "none"
    sandbox = SandboxProcess(tmp_path / "sandbox.log", "--latency-ms", str(API_LATENCY_MS))
    receiver = ReceiverProcess("redis://localhost/0", tmp_path / "receiver.log", **settings)
    worker_args = sandbox_worker_args(
        sandbox, handlers="", webhook_secret=WEBHOOK_SECRET, worker_max_jobs=WORKER_MAX_JOBS,
        **settings,
    )  # fmt: skip
    logs = [tmp_path / f"w{n}.log" for n in range(2)]
    workers = [WorkerProcess("redis://localhost/0", log, **worker_args) for log in logs]
    keys = [f"failover-{n:05d}" for n in range(EVENTS)]
    held_keys, flowing_keys = (keys[:10], keys[10:]) if replicas_ack else ([], keys)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            sender = Sender(receiver.url, session)
            await sandbox.wait_ready(session)
            await receiver.wait_ready(session)
            for chunk in range(0, EVENTS, 100):
                await asyncio.gather(
                    *(sandbox.store(session, k) for k in keys[chunk : chunk + 100])
                )
            if held_keys:
                run.held_at_freeze = await replicas_hold_deliveries(group, sender, held_keys)
            killing = asyncio.create_task(kill_primary(group, sender, run))
            await send_paced(sender, flowing_keys)
            await killing
            async with Redis.from_url(group.primary_url()) as primary:

                async def drained() -> bool:
                    return not await primary.zcard(KEYS.queue)

                await eventually(drained, "the queue drained on the new primary", timeout_s=120)
                run.dead_letters = int(await primary.zcard(KEYS.dead_letters))
            calls = await sandbox.calls(session)
            copies = await sandbox.profiles_in(session, TARGET)
        run.workers_alive = all(worker.alive() for worker in workers)
    finally:
        for worker in workers:
            worker.close()
        receiver.close()
        sandbox.close()
    effects = Effects.of(calls, copies)
    run.acknowledged = len(sender.acknowledged)
    run.handled = sum(1 for key in sender.acknowledged if effects.copies[key])
    run.lost = sorted(key for key in sender.acknowledged if not effects.copies[key])
    after_kill = [at for at in sender.acknowledged.values() if at > run.killed_at]
    run.refused_s = min(after_kill) - run.killed_at if after_kill else float("inf")
    run.re_executions = effects.re_executions
    run.duplicate_copies = effects.duplicates
    run.refusals = sender.record.refusals
    run.worker_restarts = restarts_logged(logs)
    failed_over_at = run.killed_at + run.failover_s
    run.handled_after_failover = [handled_after(log, failed_over_at) for log in logs]
    return run


def report(title: str, run: FailoverRun) -> str:
    return (
        f"\n{title}: {EVENTS} events at {SEND_RATE_PER_S}/s, replicas {LINK_DELAY_S * 1000:g} ms "
        f"behind, the primary SIGKILLed a third of the way in with {run.backlog_at_kill} runs queued; "
        f"new primary named {run.failover_s:.1f} s "
        f"after the kill; deliveries refused for {run.refused_s:.1f} s after it "
        f"({dict(run.refusals)} refusals, all re-sent)\n"
        f"  answered 2xx {run.acknowledged}, handled {run.handled}, lost {len(run.lost)}"
        f"{' ' + str(run.lost[:10]) if run.lost else ''}; handler re-executions "
        f"{run.re_executions}, duplicate copies {run.duplicate_copies}, dead letters "
        f"{run.dead_letters}; worker restarts {run.worker_restarts}, workers alive "
        f"{run.workers_alive}, runs each handled after the failover "
        f"{run.handled_after_failover}; 2xx while both replicas were frozen: {run.held_at_freeze}"
    )


async def test_a_sentinel_failover_loses_no_event_answered_2xx_with_replica_acknowledgement(
    tmp_path: Path, sentinel_group: SentinelGroup
) -> None:
    run = await fail_over(tmp_path, sentinel_group, replicas_ack=1)
    print(report("failover, HRFLOW_REDIS_MIN_REPLICAS_ACK=1", run))
    assert run.held_at_freeze == 0  # no 2xx while no replica could acknowledge
    assert run.acknowledged == EVENTS  # every delivery answered 2xx in the end
    assert run.lost == []
    assert run.handled == EVENTS
    assert run.backlog_at_kill > 0  # the primary died with work queued
    assert run.refused_s < BACK_WITHIN_S
    assert run.workers_alive
    assert run.worker_restarts == 0  # the workers followed the failover without a restart,
    assert all(run.handled_after_failover)  # each of them: none is stuck on the old primary
    assert (run.duplicate_copies, run.dead_letters) == (0, 0)


async def test_a_sentinel_failover_without_replica_acknowledgement_reports_what_it_lost(
    tmp_path: Path, sentinel_group: SentinelGroup
) -> None:
    """The same failover with acknowledgement off: what was answered 2xx while replication
    lagged is gone with the primary. This is the control of the test above: the run must
    see the loss the setting prevents (about 100 ms of deliveries at the kill), or a clean
    result there would prove nothing."""
    run = await fail_over(tmp_path, sentinel_group, replicas_ack=0)
    print(report("failover, HRFLOW_REDIS_MIN_REPLICAS_ACK=0", run))
    assert run.lost  # answered 2xx, never handled: the primary died before the link copied it
    assert run.acknowledged == EVENTS
    assert run.refused_s < BACK_WITHIN_S
    assert run.workers_alive


async def test_a_pool_retrying_for_ever_follows_the_failover(sentinel_group: SentinelGroup) -> None:
    """The workers' pool retries a lost connection for ever. redis-py before 6.4 retried the
    address Sentinel gave with that policy, so it kept dialling the dead primary and never
    asked again (issue 3560): this write waited for ever. Each attempt asks Sentinel here."""
    settings = make_settings("redis://localhost/0", **sentinel_group.settings())
    redis = connect_redis(settings, retry_forever=True)
    try:
        await redis.set("before", 1)
        assert await redis.execute_command("WAIT", 2, 5_000) == 2  # type: ignore[no-untyped-call]
        sentinel_group.primary.kill()
        killed = time.monotonic()
        await asyncio.wait_for(redis.set("after", 1), BACK_WITHIN_S)
        print(f"\nretrying pool: a write {time.monotonic() - killed:.1f} s after the kill")
        port = redis.connection_pool.connection_kwargs.get("port")  # Sentinel gives it
        assert await redis.get("before") == b"1"  # copied before the kill: on the new primary
        assert port is None or port != sentinel_group.primary.port
    finally:
        await redis.aclose()


# --- leases -----------------------------------------------------------------------------------

HANDLER_S = 3.0
LEASE_S = 5.0  # the default


async def handler_starts(redis: Redis, event_id: str) -> int:
    return int(await redis.hget(behaviour.TRIES_KEY, event_id) or 0)  # type: ignore[misc]


async def test_a_killed_workers_runs_complete_elsewhere_within_the_lease(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url)
    slow = {"sleep_s": HANDLER_S, "sleep_tries": 99}
    events = await enqueue(
        settings, redis, *(parsing_event(f"pk-held-{n}", test=slow) for n in range(18))
    )
    first = WorkerProcess(redis_server.url, tmp_path / "first.log")
    second: WorkerProcess | None = None
    try:

        async def all_started() -> bool:
            starts = [await handler_starts(redis, e.id) for e in events]
            return all(n == 1 for n in starts)

        await eventually(all_started, "the first worker running all 18 runs")
        second = WorkerProcess(redis_server.url, tmp_path / "second.log")
        await eventually(lambda: _leases(redis, 2), "the second worker's lease")
        first.kill()
        killed_at = time.monotonic()

        async def all_done() -> bool:
            done = await redis.lrange(behaviour.EFFECTS_KEY, 0, -1)  # type: ignore[misc]
            return len(done) == len(events) and not await redis.zcard(KEYS.queue)

        await eventually(all_done, "every held run done elsewhere", timeout_s=120)
        recovered_s = time.monotonic() - killed_at
    finally:
        first.close()
        if second is not None:
            second.close()
    print(
        f"\nlease: 18 runs of {HANDLER_S:g} s handlers held by a SIGKILLed worker were done on "
        f"the other worker {recovered_s:.2f} s after the kill (lease {LEASE_S:g} s)"
    )
    assert await redis.zcard(KEYS.queue) == 0
    assert [await handler_starts(redis, e.id) for e in events] == [2] * len(events)
    # The lease (renewed every 1.25 s, so 3.75 to 5 s after the kill), then a poll and the
    # 3 s handler; a second of slack for a loaded machine. arq's expiry took 20 + 10 s + 3 s.
    assert recovered_s <= LEASE_S + HANDLER_S + 1.0


async def _leases(redis: Redis, count: int) -> bool:
    return len([k async for k in redis.scan_iter(match=f"{KEYS.lease_prefix}*")]) >= count


def _log_entries(entries: list[Any], run_id: str, kind: str) -> list[dict[str, str]]:
    found = []
    for _, fields in entries:
        entry = {k.decode(): v.decode() for k, v in fields.items()}
        if entry["r"] == run_id and entry["k"] == kind:
            found.append(entry)
    return found


async def test_a_frozen_worker_wakes_to_find_its_run_taken_over_and_writes_nothing(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url)
    slow = {"sleep_s": HANDLER_S}
    (event,) = await enqueue(settings, redis, parsing_event("pk-frozen", test=slow))
    [run_id] = [r.decode() for r in await redis.zrange(KEYS.queue, 0, -1)]
    frozen = WorkerProcess(redis_server.url, tmp_path / "frozen.log")
    other: WorkerProcess | None = None
    try:
        await eventually(lambda: _true(handler_starts(redis, event.id), 1), "the handler")
        other = WorkerProcess(redis_server.url, tmp_path / "other.log")
        await eventually(lambda: _leases(redis, 2), "the other worker's lease")
        await asyncio.sleep(1.0)  # mid-handler
        frozen.process.send_signal(19)  # SIGSTOP: longer than its lease, within the deadline
        await asyncio.sleep(1.0)
        (next_event,) = await enqueue(settings, redis, parsing_event("pk-frozen", origin="x"))
        await asyncio.sleep(10.0)
        taken_over = _log_entries(await redis.xrange(KEYS.log), run_id, "run")
        frozen.process.send_signal(18)  # SIGCONT, 12 s later
        await eventually(lambda: _gave_up(tmp_path / "frozen.log"), "the frozen worker's word")
        await eventually(lambda: _queue_empty(redis), "the profile's next event handled")
        await asyncio.sleep(1.0)  # whatever the woken worker would still write
        log = await redis.xrange(KEYS.log)
        alive = frozen.alive()
        other_pid = other.process.pid
    finally:
        frozen.close()
        if other is not None:
            other.close()
    runs = _log_entries(log, run_id, "run")
    effects = await redis.lrange(behaviour.EFFECTS_KEY, 0, -1)  # type: ignore[misc]
    print(
        f"\nfrozen: a worker SIGSTOPped 12 s mid-handler (lease {LEASE_S:g} s): its run's "
        f"outcomes in the event log {[r['o'] for r in runs]}, handler effects "
        f"{len(effects)} (the frozen handler's step completes when it wakes), dead letters "
        f"{await redis.zcard(KEYS.dead_letters)}"
    )
    assert alive
    # Done by the other worker while the frozen one slept (not when it woke), and only then.
    assert [(r["o"], r["worker"].rsplit(":", 1)[1]) for r in taken_over] == [
        ("done", str(other_pid))
    ]
    assert [r["o"] for r in runs] == ["done"]
    assert await redis.zcard(KEYS.dead_letters) == 0
    assert next_event.id.encode() in effects  # the profile's next event was handled


async def _true(value: Any, expected: int) -> bool:
    return bool(await value >= expected)


async def _gave_up(log: Path) -> bool:
    text = log.read_text()
    return "run given up" in text or "worker lease lapsed" in text


async def _queue_empty(redis: Redis) -> bool:
    return not await redis.zcard(KEYS.queue)
