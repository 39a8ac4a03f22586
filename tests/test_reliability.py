"""Retries, dead letters, replay, timeouts, crashes and signals, with a real Redis and real
worker processes. The behaviour plugin (tests/plugins/behaviour.py) lets each event choose
how its handler fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from control.health import check
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys
from tests.plugins import behaviour
from tests.polling import eventually
from tests.processes import ARQ_CLI, PROCFILE_WORKER, WorkerProcess
from tests.redis_server import RedisServer
from tests.service import (
    ReceiverServer,
    drain,
    enqueue,
    key_exists,
    make_settings,
    parsing_event,
    polling,
    run_leftovers,
    runs_of,
    update_event,
)
from workers.context import HandlerContext
from workers.dead_letters import DeadLetters
from workers.jobs import retry_delay_s
from workers.queue_stats import QueueStats, read_queue_stats
from workers.registry import Registry
from workers.settings import create_worker


def behaviour_registry() -> Registry:
    registry = Registry()
    behaviour.register(registry)
    return registry


def behaviour_and_steady_registry() -> tuple[Registry, list[str]]:
    """The behaviour handler plus "steady", which always succeeds and records its runs."""
    registry = behaviour_registry()
    steady_runs: list[str] = []

    @registry.on("profile.parsing.success", name="steady")
    async def steady(event: Event, ctx: HandlerContext) -> None:
        steady_runs.append(event.id)

    return registry, steady_runs


async def effects(redis: Redis) -> list[str]:
    return [e.decode() for e in await redis.lrange(behaviour.EFFECTS_KEY, 0, -1)]  # type: ignore[misc]


async def tries(redis: Redis, event: Event) -> int:
    return int(await redis.hget(behaviour.TRIES_KEY, event.id) or 0)  # type: ignore[misc]


def test_backoff_grows_exponentially_with_jitter_and_honours_retry_after() -> None:
    delays = [retry_delay_s(n, base_s=1, max_s=300, retry_after_s=None) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(300, 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert retry_delay_s(1, base_s=1, max_s=300, retry_after_s=30) == 30
    assert retry_delay_s(20, base_s=1, max_s=10, retry_after_s=None) <= 10


@pytest.mark.parametrize("retry_after_s", [31_536_000, 1e300, float("inf")])
def test_a_retry_after_never_defers_past_the_longest_backoff(retry_after_s: float) -> None:
    """A year-long Retry-After (a CDN's, or a plugin's) would hold the profile's order that
    long: it is capped like the backoff."""
    assert retry_delay_s(1, base_s=1, max_s=300, retry_after_s=retry_after_s) == 300


@pytest.mark.parametrize("retry_after_s", [float("nan"), -5.0, 0.0])
def test_a_meaningless_retry_after_leaves_the_backoff(retry_after_s: float) -> None:
    assert 0.5 <= retry_delay_s(1, base_s=1, max_s=300, retry_after_s=retry_after_s) <= 1


async def test_transient_failures_are_retried_until_success(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url, max_tries=5)
    (event,) = await enqueue(settings, redis, parsing_event(test={"fail_transient": 2}))
    await drain(settings, behaviour_registry())
    assert await tries(redis, event) == 3
    assert await effects(redis) == [event.id]
    assert await DeadLetters(redis, QueueKeys(settings.queue_name)).count() == 0


async def test_retry_after_sets_the_next_run_time(redis: Redis, redis_server: RedisServer) -> None:
    settings = make_settings(redis_server.url, retry_base_s=0.1, retry_max_s=60)
    (event,) = await enqueue(
        settings, redis, parsing_event(test={"fail_transient": 1, "retry_after_s": 30})
    )
    (run_id,) = await runs_of(redis, event)
    before_ms = time.time() * 1000
    await drain(settings, behaviour_registry(), max_burst_jobs=1)
    score = await redis.zscore(settings.queue_name, run_id)
    assert score is not None
    assert score - before_ms >= 29_000  # Retry-After (30 s) wins over our 0.1 s backoff


async def test_a_year_long_retry_after_defers_the_run_by_the_longest_backoff_only(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url, retry_max_s=60)
    (event,) = await enqueue(
        settings, redis, parsing_event(test={"fail_transient": 1, "retry_after_s": 31_536_000})
    )
    (run_id,) = await runs_of(redis, event)
    before_ms = time.time() * 1000
    await drain(settings, behaviour_registry(), max_burst_jobs=1)
    score = await redis.zscore(settings.queue_name, run_id)
    assert score is not None
    assert 0 < score - before_ms <= 61_000  # HRFLOW_RETRY_MAX_S, not a year
    assert await tries(redis, event) == 1  # and the capped wait used a try


async def test_permanent_failure_is_dead_lettered_at_once_and_replay_completes_it_once(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url, max_tries=5)
    keys = QueueKeys(settings.queue_name)
    (event,) = await enqueue(settings, redis, parsing_event(test={"fail_permanent": True}))
    await drain(settings, behaviour_registry())
    assert await tries(redis, event) == 1
    dead_letters = DeadLetters(redis, keys)
    (letter_id,) = await dead_letters.ids()
    letter = await dead_letters.get(letter_id)
    assert letter is not None
    assert (letter["handler"], letter["reason"], letter["tries"]) == (
        "behaviour",
        "permanent error",
        1,
    )
    assert letter["error"]["type"] == "PermanentError"
    assert letter["event"]["id"] == event.id
    assert await redis.ttl(keys.dead_letter(letter_id)) == -1  # never expires

    await redis.set("test:fixed", 1)
    assert await dead_letters.replay(letter_id) is True
    assert await dead_letters.replay(letter_id) is False  # a second replay does nothing
    await drain(settings, behaviour_registry())
    assert await effects(redis) == [event.id]
    assert await dead_letters.count() == 0
    assert await redis.zcard(keys.queue) == 0


async def test_a_replay_runs_only_the_dead_lettered_handler(
    redis: Redis, redis_server: RedisServer
) -> None:
    # A replay is a first try too (a new job, job_try 1): it must still honour the markers.
    settings = make_settings(redis_server.url)
    registry, steady_runs = behaviour_and_steady_registry()

    (event,) = await enqueue(settings, redis, parsing_event(test={"fail_permanent": True}))
    await drain(settings, registry)
    dead_letters = DeadLetters(redis, QueueKeys(settings.queue_name))
    (letter_id,) = await dead_letters.ids()
    await redis.set("test:fixed", 1)
    assert await dead_letters.replay(letter_id) is True
    await drain(settings, registry)
    assert steady_runs == [event.id]
    assert await effects(redis) == [event.id]
    assert await run_leftovers(redis) == []  # markers went with the runs


async def test_tries_exhausted_lands_in_dead_letters_with_the_count(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url, max_tries=3)
    (event,) = await enqueue(settings, redis, parsing_event(test={"fail_transient": 99}))
    await drain(settings, behaviour_registry())
    assert await tries(redis, event) == 3
    dead_letters = DeadLetters(redis, QueueKeys(settings.queue_name))
    (letter,) = [letter async for letter in dead_letters.iter()]
    assert letter["tries"] == 3
    assert letter["reason"] == "still failing after 3 tries"
    assert letter["error"]["type"] == "TransientError"


async def test_a_retry_reruns_only_the_handlers_that_have_not_succeeded(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    registry, steady_runs = behaviour_and_steady_registry()

    (event,) = await enqueue(settings, redis, parsing_event(test={"fail_transient": 2}))
    await drain(settings, registry)
    assert steady_runs == [event.id]  # ran once although the event ran three times
    assert await tries(redis, event) == 3
    assert await run_leftovers(redis) == []  # the run, its markers and its order are gone


async def test_a_handler_past_the_job_deadline_is_retried_not_dropped(
    redis: Redis, redis_server: RedisServer
) -> None:
    # job_timeout 3 s: our deadline fires at 1 s, well before arq's own (final) timeout.
    settings = make_settings(redis_server.url, job_timeout_s=3)
    (event,) = await enqueue(settings, redis, parsing_event(test={"sleep_s": 30}))
    await drain(settings, behaviour_registry())
    assert await tries(redis, event) == 2
    assert await effects(redis) == [event.id]


async def test_an_exception_of_an_unknown_kind_is_retried_then_dead_lettered(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url, max_tries=2)
    registry = Registry()
    runs: list[int] = []

    @registry.on("profile.parsing.success")
    async def broken(event: Event, ctx: HandlerContext) -> None:
        runs.append(ctx.job_try)
        raise RuntimeError("bug in a plugin")

    await enqueue(settings, redis, parsing_event())
    await drain(settings, registry)
    assert runs == [1, 2]
    (letter,) = [
        letter async for letter in DeadLetters(redis, QueueKeys(settings.queue_name)).iter()
    ]
    assert (letter["error"]["type"], letter["error"]["message"]) == (
        "RuntimeError",
        "bug in a plugin",
    )


async def test_tries_lost_to_crashes_end_in_dead_letters_not_silence(
    redis: Redis, redis_server: RedisServer
) -> None:
    """arq drops a job past max_tries without a trace; we dead-letter it on the extra try."""
    settings = make_settings(redis_server.url, max_tries=3)
    (event,) = await enqueue(settings, redis, parsing_event())
    (run_id,) = await runs_of(redis, event)
    await redis.set(QueueKeys.retry(run_id), 3)  # three earlier tries that never reported back
    await drain(settings, behaviour_registry())
    assert await effects(redis) == []
    (letter,) = [
        letter async for letter in DeadLetters(redis, QueueKeys(settings.queue_name)).iter()
    ]
    assert letter["reason"] == "tries exhausted"
    assert "never finished" in letter["error"]["message"]


async def test_a_try_past_the_limit_that_is_interrupted_still_ends_in_a_dead_letter(
    redis: Redis, redis_server: RedisServer
) -> None:
    """arq would delete a job past its own try limit before our code runs: its limit is off,
    so however many tries were lost, the next one writes the dead letter."""
    settings = make_settings(redis_server.url, max_tries=3)
    (event,) = await enqueue(settings, redis, parsing_event())
    (run_id,) = await runs_of(redis, event)
    await redis.set(QueueKeys.retry(run_id), 7)  # the dead-lettering try itself was lost too
    await drain(settings, behaviour_registry())
    (letter,) = [
        letter async for letter in DeadLetters(redis, QueueKeys(settings.queue_name)).iter()
    ]
    assert letter["reason"] == "tries exhausted"


# --- real worker processes -----------------------------------------------------------------


async def test_sigkill_mid_job_loses_nothing(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The killed worker's job runs again once its lease expires (HRFLOW_WORKER_LEASE_S)."""
    settings = make_settings(redis_server.url, job_timeout_s=2)
    (event,) = await enqueue(settings, redis, parsing_event(test={"sleep_s": 60}))
    first = WorkerProcess(redis_server.url, tmp_path / "w1.log", job_timeout_s=2, worker_lease_s=2)
    try:
        await eventually(lambda: _tries_at_least(redis, event, 1))
        killed_at = time.monotonic()
        first.kill()
    finally:
        first.close()
    second = WorkerProcess(redis_server.url, tmp_path / "w2.log", job_timeout_s=2)
    try:
        await eventually(lambda: _has_effect(redis, event))
        recovery_s = time.monotonic() - killed_at
    finally:
        second.close()
    assert await effects(redis) == [event.id]
    # It waited for the lease, renewed every 0.5 s, to expire: 1.5 to 2 s after the kill.
    assert recovery_s >= 1


@pytest.mark.parametrize("command", [PROCFILE_WORKER, ARQ_CLI], ids=["procfile", "arq-cli"])
async def test_sigterm_lets_running_jobs_finish_within_the_grace_period(
    redis: Redis, redis_server: RedisServer, tmp_path: Path, command: tuple[str, ...]
) -> None:
    settings = make_settings(redis_server.url)
    (event,) = await enqueue(settings, redis, parsing_event(test={"sleep_s": 1.5}))
    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", command, shutdown_grace_s=10)
    try:
        await eventually(lambda: _tries_at_least(redis, event, 1))
        exit_code = await asyncio.to_thread(worker.terminate)
    finally:
        worker.close()
    assert exit_code == 0
    assert await effects(redis) == [event.id]
    assert await redis.zcard(settings.queue_name) == 0


async def test_sigterm_requeues_jobs_that_outlive_the_grace_period(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url)
    (event,) = await enqueue(settings, redis, parsing_event(test={"sleep_s": 60}))
    (run_id,) = await runs_of(redis, event)
    worker = WorkerProcess(redis_server.url, tmp_path / "w1.log", shutdown_grace_s=1)
    try:
        await eventually(lambda: _tries_at_least(redis, event, 1))
        await asyncio.to_thread(worker.terminate)
    finally:
        worker.close()
    assert await redis.zscore(settings.queue_name, run_id) is not None  # back in the queue
    assert not await redis.exists(QueueKeys.in_progress(run_id))  # free to run at once
    await drain(settings, behaviour_registry())
    assert await effects(redis) == [event.id]


async def test_a_worker_survives_a_redis_restart(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url)
    worker = WorkerProcess(redis_server.url, tmp_path / "w.log")
    try:
        (before,) = await enqueue(settings, redis, parsing_event("before"))
        await eventually(lambda: _has_effect(redis, before))
        await redis.aclose()
        redis_server.restart()
        async with Redis.from_url(redis_server.url) as fresh:
            (after,) = await enqueue(settings, fresh, parsing_event("after"))
            await eventually(lambda: _has_effect(fresh, after))  # the one worker ran it...
            assert worker.alive()  # ...and is still the same process
            assert await effects(fresh) == [before.id, after.id]  # AOF kept the first effect
    finally:
        worker.close()


async def _tries_at_least(redis: Redis, event: Event, count: int) -> bool:
    return await tries(redis, event) >= count


async def _has_effect(redis: Redis, event: Event) -> bool:
    return event.id in await effects(redis)


# --- arq's own timeout never ends a run --------------------------------------------------------


@pytest.mark.parametrize("awaits_after_blocking", [False, True], ids=["returns", "awaits"])
async def test_a_handler_blocking_the_event_loop_is_named_and_its_event_is_not_lost(
    redis: Redis,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    awaits_after_blocking: bool,
) -> None:
    """Past arq's timeout either way. A handler that awaits after blocking meets arq's
    cancellation there (not only its own deadline): it must still be named, and retried."""
    settings = make_settings(redis_server.url, job_timeout_s=2)
    registry = Registry()
    effects: list[int] = []

    @registry.on("profile.parsing.success", name="sleepy")
    async def sleepy(event: Event, ctx: HandlerContext) -> None:
        if ctx.job_try == 1:
            time.sleep(2.6)  # the plugin bug under test: past the timeout
            if awaits_after_blocking:
                await asyncio.sleep(0.05)  # the overdue timers fire meanwhile
        effects.append(ctx.job_try)

    await enqueue(settings, redis, parsing_event())
    with caplog.at_level(logging.WARNING, logger="workers"):
        worker = await drain(settings, registry)
    assert "event loop blocked 2.6 s by handler sleepy" in caplog.messages
    assert effects == ([2] if awaits_after_blocking else [1, 2])  # retried, not dropped
    assert (worker.jobs_failed, worker.jobs_complete) == (0, 1)
    assert await DeadLetters(redis, QueueKeys(settings.queue_name)).count() == 0


async def test_a_redis_stall_longer_than_the_job_timeout_ends_in_a_retry_not_a_lost_event(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url, job_timeout_s=2)
    registry = Registry()
    effects: list[int] = []

    @registry.on("profile.parsing.success")
    async def stalls_redis(event: Event, ctx: HandlerContext) -> None:
        effects.append(ctx.job_try)
        if ctx.job_try == 1:  # the job's bookkeeping now meets a Redis that does not answer
            await ctx.redis.client_pause(3500, all=True)

    await enqueue(settings, redis, parsing_event())
    worker = await drain(settings, registry)
    assert effects == [1, 2]
    assert (worker.jobs_failed, worker.jobs_complete) == (0, 1)
    assert await run_leftovers(redis) == []


async def test_a_sync_handler_past_the_deadline_never_overlaps_its_subjects_next_run(
    redis: Redis, redis_server: RedisServer
) -> None:
    """A thread cannot be cancelled: the run waits for it before its retry or the subject's
    next run may start."""
    settings = make_settings(redis_server.url, job_timeout_s=2)
    registry = Registry()
    lock = threading.Lock()
    running, most_at_once, finished = 0, 0, []

    def slow_the_first_time(event: Event, event_type: str) -> None:  # the SDK's shape
        nonlocal running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
            first = event_type not in finished
        time.sleep(2.5 if first else 0.01)  # past the job's deadline, the first time
        with lock:
            running -= 1
            finished.append(event_type)

    registry.add("profile.parsing.update", slow_the_first_time)
    registry.add("profile.storing.update", slow_the_first_time)
    await enqueue(
        settings,
        redis,
        update_event("sync-subject"),
        update_event("sync-subject", family="storing"),
    )
    await drain(settings, registry)
    assert most_at_once == 1
    assert set(finished) == {"profile.parsing.update", "profile.storing.update"}
    assert await run_leftovers(redis) == []


async def test_closing_a_worker_whose_job_ended_in_an_error_still_closes_everything(
    redis: Redis, redis_server: RedisServer
) -> None:
    """arq's close() stopped at a job task that raised, before on_shutdown and the pool."""
    settings = make_settings(redis_server.url)
    worker = create_worker(settings, Registry(), handle_signals=False)
    running = asyncio.create_task(worker.async_run())
    await eventually(lambda: key_exists(redis, QueueKeys(settings.queue_name).health_check))

    async def in_arqs_bookkeeping() -> None:  # what a stop without grace cancels
        await asyncio.shield(asyncio.sleep(0.3))

    worker.tasks["a-run"] = asyncio.create_task(in_arqs_bookkeeping())
    await asyncio.sleep(0.05)
    await worker.close()
    assert worker.ctx["services"].http.closed  # on_shutdown ran
    assert not await redis.exists(QueueKeys(settings.queue_name).health_check)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running


async def test_a_run_held_back_by_retries_shows_its_wait_wherever_an_operator_looks(
    redis: Redis, redis_server: RedisServer
) -> None:
    """A run deferred by its retries keeps its profile's next change parked behind it. The
    queue re-scores both (the parked one every poll), so its score never looks old: the wait
    counts from when each first became due, and `check`, /readyz?strict and the metrics say
    so past HRFLOW_MAX_RUN_WAIT_S. Once the run ends, nothing is left to raise an alarm."""
    settings = make_settings(redis_server.url, retry_max_s=60, max_run_wait_s=1)
    keys = QueueKeys(settings.queue_name)
    held, _ = await enqueue(
        settings,
        redis,
        parsing_event("pk-held", test={"fail_transient": 1, "retry_after_s": 60}),
        update_event("pk-held"),
    )
    worker = create_worker(settings, behaviour_registry(), handle_signals=False)
    async with polling(worker):

        async def waited_past_the_limit() -> QueueStats | None:
            stats = await read_queue_stats(redis, keys)
            return stats if stats.oldest_wait_s > 1.5 else None

        stats = await eventually(waited_past_the_limit, "the held run's wait past the limit")
        assert stats is not None
        assert stats.deferred + stats.ready == 2  # the retry and the run parked behind it
        assert stats.oldest_ready_age_s < stats.oldest_wait_s  # re-scored: it looks young
        (problem,) = [p for p in await check(settings, max_queue_age_s=300) if "waited" in p]
        assert "over the 1 s limit (HRFLOW_MAX_RUN_WAIT_S)" in problem
        async with ReceiverServer(settings) as server, aiohttp.ClientSession() as http:
            response = await http.get(f"{server.url}/readyz?strict")
            assert response.status == 503
            assert any("waited" in p for p in (await response.json())["problems"])

        run_id, _ = await runs_of(redis, held)  # the held run heads its profile's order
        await redis.zadd(keys.queue, {run_id: 0})  # its retry is due now: it succeeds

        async def both_handled() -> bool:
            return int(await redis.zcard(keys.queue)) == 0

        await eventually(both_handled, "the held run and the one behind it handled")
    assert (await read_queue_stats(redis, keys)).oldest_wait_s == 0
    assert await redis.zcard(keys.due_since) == 0
    assert await effects(redis) == [held.id]
