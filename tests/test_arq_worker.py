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

from hrflow_webhooks.queue import RENEW_LEASE_SCRIPT
from tests.polling import eventually
from tests.redis_server import RedisServer
from tests.service import (
    enqueue,
    make_settings,
    parsing_event,
    polling,
    recorder,
    runs_of,
    update_event,
)
from workers.arq_worker import Claimed, Worker
from workers.registry import Registry
from workers.settings import create_worker


@pytest.fixture
async def pool(redis: Redis, redis_server: RedisServer) -> AsyncIterator[ArqRedis]:
    arq_pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
    yield arq_pool
    await arq_pool.aclose()


@pytest.fixture
async def leased() -> AsyncIterator[list[Worker]]:
    """Workers whose leases a test started; their leases are stopped after it."""
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        await worker.leases.stop()


async def worker_on(pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]) -> Worker:
    worker = create_worker(
        make_settings(redis_server.url), Registry(), redis_pool=pool, handle_signals=False
    )
    assert isinstance(worker, Worker)
    await worker.leases.start()
    leased.append(worker)
    return worker


def ids_and_scores(claimed: list[Claimed]) -> list[tuple[str, int]]:
    return [(c.run_id, c.score) for c in claimed]


async def test_claims_due_queued_jobs_not_in_progress_in_queue_order(
    pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]
) -> None:
    worker = await worker_on(pool, redis_server, leased)
    now = timestamp_ms()
    queue = worker.queue_name
    await pool.zadd(queue, {"a": now - 5, "busy": now - 4, "later": now + 60_000, "d": now - 3})
    await pool.zadd(queue, {"e": now - 2})
    await pool.set(in_progress_key_prefix + "busy", b"1")  # arq's own worker's claim

    claimed = await worker._claim(["a", "busy", "later", "gone", "d", "e"], 2)

    assert ids_and_scores(claimed) == [("a", now - 5), ("d", now - 3)]  # at most 2, in order
    lease_id = worker.leases.lease.id
    for claim in claimed:
        # The claim is the worker's fencing token, held by its lease: no expiry of its own.
        assert claim.token.startswith(f"{lease_id}|")
        assert await pool.get(in_progress_key_prefix + claim.run_id) == claim.token.encode()
        assert await pool.pttl(in_progress_key_prefix + claim.run_id) == -1
    assert claimed[0].token != claimed[1].token
    assert not await pool.exists(in_progress_key_prefix + "e")
    assert not await pool.exists(in_progress_key_prefix + "later")


async def test_a_run_held_by_a_lease_that_is_gone_is_taken_over(
    pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]
) -> None:
    """A claim holds while its lease key lives: a dead worker's runs are claimed again as
    soon as its lease expires, a live one's never."""
    first = await worker_on(pool, redis_server, leased)
    second = await worker_on(pool, redis_server, leased)
    await pool.zadd(first.queue_name, {"r1": timestamp_ms() - 2, "r2": timestamp_ms() - 1})
    [held, _] = await first._claim(["r1", "r2"], 2)
    assert await second._claim(["r1", "r2"], 2) == []  # the first worker's lease lives

    await pool.delete(first.leases.lease.key)  # as if it died and its lease expired
    taken = await second._claim(["r1", "r2"], 2)

    assert ids_and_scores(taken) == [("r1", held.score), ("r2", held.score + 1)]
    assert all(c.token.startswith(second.leases.lease.id + "|") for c in taken)


async def test_a_run_its_holder_no_longer_lists_is_taken_over(
    pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]
) -> None:
    """A claim whose run its worker no longer runs (its end was written to a primary that
    failed before a replica copied it, or not at all) is still there, under a live lease:
    the holder's next renewal strikes the claim's number from its list, and another worker
    takes the run."""
    first = await worker_on(pool, redis_server, leased)
    second = await worker_on(pool, redis_server, leased)
    await pool.zadd(first.queue_name, {"r": timestamp_ms() - 1, "s": timestamp_ms() - 1})
    [r, s] = await first._claim(["r", "s"], 2)
    assert (r.token, s.token) == (f"{first.leases.lease.id}|0", f"{first.leases.lease.id}|1")
    assert await pool.get(first.leases.lease.key) == b",0,1,"
    await first.leases.renew()
    assert await second._claim(["r", "s"], 2) == []  # listed: held

    first.leases.forget("r")  # the run's task ended; its claim is still in Redis
    await first.leases.renew()

    assert await pool.get(first.leases.lease.key) == b",1,"
    [taken] = await second._claim(["r", "s"], 2)
    assert taken.run_id == "r"
    assert taken.token.startswith(second.leases.lease.id + "|")


async def test_a_late_renewal_cannot_drop_a_claim_made_meanwhile(
    pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]
) -> None:
    """A renewal only strikes the numbers of ended claims: one that reaches Redis after a
    claim was made (it timed out on the client, or an older one lands after a newer one)
    leaves that claim listed, so no other worker can take a run this one is running."""
    first = await worker_on(pool, redis_server, leased)
    second = await worker_on(pool, redis_server, leased)
    await pool.zadd(first.queue_name, {"r": timestamp_ms() - 1, "s": timestamp_ms() - 1})
    await first._claim(["r"], 1)
    first.leases.forget("r")
    late_renewal_args = [first.leases.lease_ms, 0]  # what the renewal sent: strike claim 0
    await first._claim(["s"], 1)  # claim 1, made before the renewal arrives
    renew = pool.register_script(RENEW_LEASE_SCRIPT)
    assert await renew(keys=[first.leases.lease.key], args=late_renewal_args) == 1
    assert await renew(keys=[first.leases.lease.key], args=late_renewal_args) == 1  # again
    assert await pool.get(first.leases.lease.key) == b",1,"
    assert await second._claim(["s"], 1) == []  # still held: its claim is listed


async def test_a_worker_takes_back_its_own_claim_it_does_not_run(
    pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]
) -> None:
    """A claim script whose reply was lost (the connection dropped after it ran) left a claim
    the worker never learnt of: the next poll offers the run again, and the worker, which
    does not run it, takes it back rather than hold it unknowingly."""
    worker = await worker_on(pool, redis_server, leased)
    await pool.zadd(worker.queue_name, {"r": timestamp_ms() - 1})
    [lost] = await worker._claim(["r"], 1)
    worker.leases.claims.clear()  # as if the reply had never arrived
    [again] = await worker._claim(["r"], 1)
    assert again.token != lost.token


async def test_a_worker_whose_lease_is_gone_claims_nothing_and_takes_a_new_one(
    pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]
) -> None:
    worker = await worker_on(pool, redis_server, leased)
    await pool.zadd(worker.queue_name, {"r": timestamp_ms() - 1})
    old = worker.leases.lease
    await pool.delete(old.key)  # frozen past its lease

    assert await worker._claim(["r"], 1) == []
    assert not await pool.exists(in_progress_key_prefix + "r")
    assert old.lost
    assert not old.valid()
    assert worker.leases.lease.id != old.id
    assert worker.leases.valid()
    [claim] = await worker._claim(["r"], 1)  # under the new lease
    assert claim.token.startswith(worker.leases.lease.id + "|")


async def test_two_workers_never_claim_the_same_job(
    pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]
) -> None:
    # One claim call at a time per worker, as its poll loop makes them; several workers.
    workers = [await worker_on(pool, redis_server, leased) for _ in range(4)]
    ids = [f"job-{n}" for n in range(200)]
    await pool.zadd(workers[0].queue_name, {job_id: timestamp_ms() - 1 for job_id in ids})

    claims = await asyncio.gather(*(w._claim(ids, 200) for w in workers))

    won = [claimed.run_id for claim in claims for claimed in claim]
    assert sorted(won) == sorted(ids)  # every job claimed once, by exactly one claim


async def test_a_refused_claim_starts_nothing_and_the_worker_polls_on(
    pool: ArqRedis, redis_server: RedisServer, leased: list[Worker]
) -> None:
    """Under maxmemory Redis refuses the claim's write; arq skips the job in that case too."""
    worker = await worker_on(pool, redis_server, leased)
    await pool.zadd(worker.queue_name, {"a": timestamp_ms() - 1})
    await pool.config_set("maxmemory", 1)
    try:
        assert await worker._claim(["a"], 1) == []
    finally:
        await pool.config_set("maxmemory", 0)
    assert not await pool.exists(in_progress_key_prefix + "a")
    score = int(await pool.zscore(worker.queue_name, "a"))
    assert ids_and_scores(await worker._claim(["a"], 1)) == [("a", score)]


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

    async def parked() -> bool:
        due_ms = await redis.zscore(settings.queue_name, second_run)
        return due_ms is not None and due_ms > timestamp_ms()  # queued, due again later

    async with polling(worker):
        await eventually(parked, "the second run parked behind the busy one")
        assert handled == []  # not started: it waits behind the busy run


async def test_a_run_arq_cannot_start_leaves_its_profiles_order_and_wakes_the_next(
    redis: Redis, redis_server: RedisServer
) -> None:
    """A job arq cannot read is dropped, as arq drops it; its run also leaves its profile's
    order list, at once: the run behind it starts without waiting to be parked and looked
    at again, and a profile with no run behind keeps no list for ever."""
    settings = make_settings(redis_server.url)
    registry = Registry()
    handled = recorder(registry, "profile.parsing.update")
    first, second, alone = await enqueue(
        settings,
        redis,
        parsing_event("pk-unreadable"),
        update_event("pk-unreadable"),
        parsing_event("pk-unreadable-alone"),
    )
    [first_run, _] = await runs_of(redis, first)
    [alone_run] = await runs_of(redis, alone)
    for run_id in (first_run, alone_run):
        await redis.set(f"arq:job:{run_id}", b"{not json")
    worker = create_worker(settings, registry, handle_signals=False)

    async def drained() -> bool:
        return int(await redis.zcard(settings.queue_name)) == 0

    async with polling(worker):
        await eventually(drained, "the unreadable runs dropped and the next one handled")
    assert [event.id for event in handled] == [second.id]
    assert await runs_of(redis, first) == []
    assert await runs_of(redis, alone) == []
