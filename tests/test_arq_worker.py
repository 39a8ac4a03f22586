"""The worker's one-round-trip job claim makes arq's checks: queued, due, not in progress."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from redis.asyncio import Redis

from tests.polling import eventually
from tests.redis_server import RedisServer
from tests.service import (
    enqueue,
    make_settings,
    parsing_event,
    recorder,
    runs_of,
    update_event,
)
from workers.arq_worker import Worker
from workers.registry import Registry
from workers.settings import create_worker


@pytest.fixture
async def pool(redis: Redis, redis_server: RedisServer) -> AsyncIterator[ArqRedis]:
    arq_pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
    yield arq_pool
    await arq_pool.aclose()


def worker_on(pool: ArqRedis, redis_server: RedisServer) -> Worker:
    worker = create_worker(
        make_settings(redis_server.url), Registry(), redis_pool=pool, handle_signals=False
    )
    assert isinstance(worker, Worker)
    return worker


async def test_claims_due_queued_jobs_not_in_progress_in_queue_order(
    pool: ArqRedis, redis_server: RedisServer
) -> None:
    worker = worker_on(pool, redis_server)
    now = timestamp_ms()
    queue = worker.queue_name
    await pool.zadd(queue, {"a": now - 5, "busy": now - 4, "later": now + 60_000, "d": now - 3})
    await pool.zadd(queue, {"e": now - 2})
    await pool.set(in_progress_key_prefix + "busy", b"1")

    claimed = await worker._claim(["a", "busy", "later", "gone", "d", "e"], 2)

    assert claimed == [("a", now - 5), ("d", now - 3)]  # at most 2, oldest first
    for job_id in ("a", "d"):
        ttl_ms = await pool.pttl(in_progress_key_prefix + job_id)
        assert 0 < ttl_ms <= worker.in_progress_timeout_s * 1000
    assert not await pool.exists(in_progress_key_prefix + "e")
    assert not await pool.exists(in_progress_key_prefix + "later")


async def test_two_workers_never_claim_the_same_job(
    pool: ArqRedis, redis_server: RedisServer
) -> None:
    first, second = worker_on(pool, redis_server), worker_on(pool, redis_server)
    ids = [f"job-{n}" for n in range(200)]
    await pool.zadd(first.queue_name, {job_id: timestamp_ms() - 1 for job_id in ids})

    claims = await asyncio.gather(*(w._claim(ids, 200) for w in (first, second, first, second)))

    won = [job_id for claim in claims for job_id, _ in claim]
    assert sorted(won) == sorted(ids)  # every job claimed once, by exactly one claim


async def test_a_refused_claim_starts_nothing_and_the_worker_polls_on(
    pool: ArqRedis, redis_server: RedisServer
) -> None:
    """Under maxmemory Redis refuses the claim's write; arq skips the job in that case too."""
    worker = worker_on(pool, redis_server)
    await pool.zadd(worker.queue_name, {"a": timestamp_ms() - 1})
    await pool.config_set("maxmemory", 1)
    try:
        assert await worker._claim(["a"], 1) == []
    finally:
        await pool.config_set("maxmemory", 0)
    assert not await pool.exists(in_progress_key_prefix + "a")
    assert await worker._claim(["a"], 1) == [("a", int(await pool.zscore(worker.queue_name, "a")))]


async def test_a_second_worker_takes_jobs_while_the_first_is_full(
    redis: Redis, redis_server: RedisServer
) -> None:
    """The first worker's running jobs stay at the head of the queue until they finish; a
    second worker must see past them (arq reads five ids per job slot) or it adds nothing."""
    from hrflow_webhooks.enqueue import EventQueue
    from hrflow_webhooks.events import Event
    from tests.service import parsing_event

    max_jobs = 3
    # Jobs far from their deadline: no retry frees a slot while the workers fill up.
    settings = make_settings(redis_server.url, worker_max_jobs=max_jobs, job_timeout_s=60)
    running, most_running = 0, 0
    release = asyncio.Event()
    registry = Registry()

    @registry.on("profile.parsing.success")
    async def hold(event: Event) -> None:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        await release.wait()
        running -= 1

    events = [Event.from_payload(parsing_event(f"pk-{n}")) for n in range(4 * max_jobs)]
    async with EventQueue(redis, settings.queue_name, 60) as queue:
        await queue.enqueue_events(events)
    workers = [create_worker(settings, registry, handle_signals=False, burst=True) for _ in "ab"]

    async def both_full() -> bool:
        return most_running == 2 * max_jobs

    async def release_when_both_are_full() -> None:
        with contextlib.suppress(AssertionError):  # the assert below tells
            await eventually(both_full)
        release.set()  # either way, or the burst workers would wait forever

    watcher = asyncio.create_task(release_when_both_are_full())
    await asyncio.gather(*(worker.main() for worker in workers))  # burst: until drained
    await watcher
    for worker in workers:
        await worker.close()
    assert most_running == 2 * max_jobs
    assert sum(worker.jobs_complete for worker in workers) == len(events)


async def test_arq_claims_through_our_start_jobs_a_run_behind_a_busy_one_waits(
    redis: Redis, redis_server: RedisServer
) -> None:
    """The hook the per-subject order relies on still fires: arq starts jobs through
    ``Worker.start_jobs``, which claims with our script. Two runs of one profile, the first
    held by another worker: arq's own start_jobs would start the second (it is queued, due
    and not in progress); ours parks it until the first is done."""
    settings = make_settings(redis_server.url)
    registry = Registry()
    handled = recorder(registry, "profile.parsing.update")
    first, second = await enqueue(
        settings, redis, parsing_event("pk-order"), update_event("pk-order")
    )
    [first_run, second_run] = await runs_of(redis, first)
    assert second_run in await runs_of(redis, second)
    await redis.set(in_progress_key_prefix + first_run, b"1", px=60_000)  # another worker's
    worker = create_worker(settings, registry, handle_signals=False)
    polling = asyncio.create_task(worker.main())

    async def parked() -> bool:
        due_ms = await redis.zscore(settings.queue_name, second_run)
        return due_ms is not None and due_ms > timestamp_ms()  # queued, due again later

    try:
        await eventually(parked, "the second run parked behind the busy one")
        assert handled == []  # not started: it waits behind the busy run
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await worker.close()
