"""Runs held on leases, their writes fenced (workers.leases), with a real Redis and real arq
workers in this process: a run is never run twice at once, a stale worker's writes are
refused, and arq's own bookkeeping of a run is ours."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from redis.asyncio import Redis

from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import (
    DONE,
    FINISH_RUN_SCRIPT,
    MARK_HANDLER_SCRIPT,
    RUN_MARKERS_LIFETIME_S,
    QueueKeys,
)
from tests.polling import eventually
from tests.redis_ha import LaggingLink
from tests.redis_server import RedisServer
from tests.service import (
    drain,
    enqueue,
    make_settings,
    parsing_event,
    polling,
    recorder,
    run_leftovers,
    runs_of,
    update_event,
)
from workers.arq_worker import Worker
from workers.context import HandlerContext
from workers.dead_letters import DeadLetters
from workers.registry import Registry
from workers.settings import create_worker

KEYS = QueueKeys("hrflow:queue")


async def commands(redis: Redis, name: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def test_a_handled_run_costs_arq_one_transaction_not_two(
    redis: Redis, redis_server: RedisServer
) -> None:
    """arq's finish transaction (MULTI, DEL, ZREM, ZREM, DEL, EXEC) is replaced by nothing
    after the job's own finish script, which already removed the run: each run costs arq's
    start transaction only. Fails when arq stops calling ``Worker.finish_job``, and with it
    the fencing of its writes."""
    settings = make_settings(redis_server.url)
    registry = Registry()
    handled = recorder(registry, "profile.parsing.success")
    await enqueue(settings, redis, *(parsing_event(f"pk-{n}") for n in range(20)))
    before = await commands(redis, "exec")
    await drain(settings, registry)
    assert len(handled) == 20
    assert await commands(redis, "exec") - before == 20
    assert await run_leftovers(redis) == []


async def test_a_retry_is_rescheduled_by_the_fenced_script(
    redis: Redis, redis_server: RedisServer
) -> None:
    """arq's Retry goes through ``Worker.finish_job``: the run is due later, its claim gone,
    with no transaction of arq's."""
    settings = make_settings(redis_server.url, retry_base_s=30, retry_max_s=30)
    registry = Registry()

    @registry.on("profile.parsing.success")
    async def failing(event: Event) -> None:
        raise ConnectionError("HrFlow is down")

    (event,) = await enqueue(settings, redis, parsing_event())
    (run_id,) = await runs_of(redis, event)
    before = await commands(redis, "exec")
    await drain(settings, registry, max_burst_jobs=1)
    due_ms = await redis.zscore(settings.queue_name, run_id)
    assert due_ms is not None
    assert due_ms > timestamp_ms() + 10_000  # a backoff of 15 to 30 s
    assert not await redis.exists(in_progress_key_prefix + run_id)
    assert await commands(redis, "exec") - before == 1  # arq's start of the try only


async def claimed_by(worker: Worker, run_id: str) -> str:
    [claimed] = await worker._claim([run_id], 1)
    return claimed.token


async def test_a_worker_that_lost_its_claim_can_write_nothing_of_the_run(
    redis: Redis, redis_server: RedisServer
) -> None:
    """Worker A claims a run, its lease lapses (frozen), worker B takes the run over. Every
    write of A's is refused by its script: marker, dead letter, finish, retry; B's pass."""
    settings = make_settings(redis_server.url)
    (event,) = await enqueue(settings, redis, parsing_event())
    (run_id,) = await runs_of(redis, event)
    a, b = (create_worker(settings, Registry(), handle_signals=False) for _ in "ab")
    for worker in (a, b):
        await worker.leases.start()
    try:
        await claimed_by(a, run_id)
        stale = a.leases.claim_of(run_id)
        assert stale is not None
        await redis.delete(a.leases.lease.key)  # A froze past its lease
        await claimed_by(b, run_id)
        live = b.leases.claim_of(run_id)
        assert live is not None

        mark = redis.register_script(MARK_HANDLER_SCRIPT)
        for claim, marked in ((stale, 0), (live, 1)):
            args: list[str | int] = ["h", RUN_MARKERS_LIFETIME_S, DONE, claim.fence.token]
            assert await mark(keys=[KEYS.done(run_id), *claim.fence.keys], args=args) == marked
        letters = DeadLetters(redis, KEYS)
        error = ValueError("bad")
        assert await letters.add(event, run_id, "h", error, 1, "x", stale.fence) is None
        assert await letters.count() == 0

        await a.finish_job(run_id, False, None, None, False, 60_000, None)  # A's retry
        assert await redis.get(in_progress_key_prefix + run_id) == live.fence.token.encode()
        assert await redis.zscore(KEYS.queue, run_id) is not None

        finish = redis.register_script(FINISH_RUN_SCRIPT)
        order = KEYS.order_of_run(run_id)
        assert order is not None
        for claim, finished in ((stale, 0), (live, 1)):
            keys = [KEYS.queue, order, KEYS.job(run_id), KEYS.done(run_id), KEYS.log]
            keys += [KEYS.queue, KEYS.retry(run_id), *claim.fence.keys]
            args = [run_id, timestamp_ms(), 1000, "", 60, claim.fence.token]
            assert await finish(keys=keys, args=args) == finished
        assert await run_leftovers(redis) == []
    finally:
        for worker in (a, b):
            await worker.leases.stop()


async def test_a_redis_error_in_the_poll_loop_does_not_end_the_worker(
    redis: Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """arq's poll loop has no ``try``: an error Redis answers with (here an ACL refusing the
    poll's read, as during a failover a replica refuses writes) ended the worker and every
    run in it. Ours backs off, says so once, and polls on: the same worker handles the event
    queued meanwhile. Fails when arq stops polling through ``_poll_iteration``."""
    settings = make_settings(redis_server.url)
    registry = Registry()
    handled = recorder(registry, "profile.parsing.success")
    worker = create_worker(settings, registry, handle_signals=False)
    await redis.acl_setuser("default", enabled=True, commands=["-zrangebyscore"])
    try:
        with caplog.at_level(logging.INFO, logger="workers.arq_worker"):
            async with polling(worker) as task:
                await eventually(
                    lambda: _logged(caplog, "redis error in the poll loop"), "the error, logged"
                )
                await enqueue(settings, redis, parsing_event())
                await asyncio.sleep(0.3)  # several refused polls
                await redis.acl_setuser("default", enabled=True, commands=["+zrangebyscore"])
                await eventually(lambda: _true(len(handled) == 1), "the event handled")
                await eventually(lambda: _logged(caplog, "redis answers again"), "the recovery")
                assert not task.done()  # the same worker, still polling
    finally:
        await redis.acl_setuser("default", enabled=True, commands=["+@all"])
    warnings = [r for r in caplog.records if "redis error in the poll loop" in r.getMessage()]
    assert len(warnings) == 1  # said once, however many polls it refused


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def _true(value: bool) -> bool:
    return value


SLOW_THREAD_S = 15.0  # past the 2 s job timeout + 10 s, when arq's claim used to expire


async def test_a_sync_handler_outliving_the_job_timeout_is_never_overlapped(
    redis: Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The overlap that arq's expiring claim allowed: a sync (SDK-style) handler still in its
    thread after the job timeout + 10 s lost the claim, a second worker ran the same run,
    finished first and woke the profile's next run, and the stale thread's write, made from
    what it read before the profile changed, landed last. Held on a lease, the run is never
    started elsewhere while its worker lives: one execution at a time, and the copy ends
    with the profile's latest state. The hold past the deadline is said once, as an ERROR:
    a thread that never returned would hold its profile's later runs for ever."""
    settings = make_settings(redis_server.url, job_timeout_s=2, retry_base_s=0.05)
    profile = {"version": 1}
    copy: list[int] = []  # the writes of the handler, in order
    running, overlaps = 0, 0
    lock = threading.Lock()
    first = threading.Event()

    def copy_profile(event: Event) -> None:  # an SDK-style callback: runs in a thread
        nonlocal running, overlaps
        with lock:
            running += 1
            overlaps += running > 1
            read = profile["version"]
        if not first.is_set():
            first.set()
            time.sleep(SLOW_THREAD_S)
        with lock:
            copy.append(read)
            running -= 1

    registry = Registry()
    registry.setHandler("profile.parsing.update", copy_profile)
    workers = [create_worker(settings, registry, handle_signals=False) for _ in "ab"]
    await enqueue(settings, redis, update_event("pk-slow"))
    caplog.set_level(logging.ERROR, logger="workers.leases")
    async with polling(workers[0]), polling(workers[1]):
        await eventually(lambda: _true(first.is_set()), "the slow thread started")
        profile["version"] = 2  # the profile changes while the slow thread runs
        await enqueue(settings, redis, update_event("pk-slow"))  # its webhook: a follow-up run

        async def settled() -> bool:
            return bool(copy) and copy[-1] == 2 and not await redis.zcard(KEYS.queue)

        await eventually(settled, "the latest state copied", timeout_s=60)
    assert overlaps == 0
    assert copy[0] == 1  # the stale write came first,
    assert copy[-1] == 2  # not last
    said = [r for r in caplog.records if r.getMessage().startswith("run held past its deadline")]
    assert len(said) == 1


async def test_a_worker_cut_off_from_redis_stops_its_handlers_before_anyone_takes_over(
    redis: Redis, redis_server: RedisServer
) -> None:
    """Worker A reaches Redis through a link that is then cut: its renewals fail, it gives
    its lease up a renewal and a half before the key can expire, and its handler is
    cancelled then. Worker B takes the run over once the lease
    expires in Redis. The handler never runs on both at once, and A's never gets to its
    write."""
    settings = make_settings(redis_server.url, worker_lease_s=2, job_timeout_s=30)
    link = LaggingLink(redis_server.port)
    running: list[str] = []
    writes: list[str] = []
    overlaps = 0
    registry = Registry()

    @registry.on("profile.parsing.success")
    async def slow(event: Event, ctx: HandlerContext) -> None:
        nonlocal overlaps
        me = ctx.services.worker_id + hex(id(ctx.services))
        running.append(me)
        overlaps += len(set(running)) > 1
        try:
            await asyncio.sleep(6)  # an HrFlow read, then a write
            writes.append(me)
        finally:
            running.remove(me)

    a = create_worker(make_settings(link.url, worker_lease_s=2, job_timeout_s=30), registry,
                      handle_signals=False)  # fmt: skip
    b = create_worker(settings, registry, handle_signals=False)
    try:
        async with polling(a):
            await enqueue(settings, redis, parsing_event("pk-cut"))
            await eventually(lambda: _true(bool(running)), "A's handler running")
            link.cut()
            async with polling(b):
                await eventually(lambda: _true(len(writes) == 1), "B's write", timeout_s=30)
            link.mend()  # A reaches Redis again, to stop cleanly
    finally:
        link.close()
    assert overlaps == 0
    assert writes == [b.worker_id + hex(id(b.ctx["services"]))]  # B's, and only B's
