"""The queue seam: once and latest events (dedup, coalescing, runs in subject order), group
commit under concurrent callers, and memory pressure (maxmemory with noeviction): Redis
refuses a whole enqueue script, the caller gets the error (the receiver answers 503), and
HrFlow's retries then queue every event exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hrflow_webhooks.enqueue import EventQueue, PackedArguments, packed_script_call, resp_bulk
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import (
    COALESCED,
    COUNT_UNROUTED_SCRIPT,
    DUPLICATE,
    OTHER_TYPES,
    QUEUED,
    UNROUTED_TYPES_MAX,
    QueueKeys,
    deserialize_job,
)
from tests.polling import eventually
from tests.redis_server import RedisServer
from tests.service import parsing_event, queued_event_ids, runs_of, update_event


@pytest.fixture
async def queue(redis: Redis) -> AsyncIterator[EventQueue]:
    async with EventQueue(redis, "hrflow:queue", dedup_window_s=60) as queue:
        yield queue


async def test_out_of_memory_refuses_and_a_retry_queues_every_event_once(
    redis: Redis, queue: EventQueue
) -> None:
    keys = QueueKeys("hrflow:queue")
    events = [
        Event.from_payload(parsing_event(f"oom-{i}", message="x" * 40_000)) for i in range(40)
    ]
    used = (await redis.info("memory"))["used_memory"]
    await redis.config_set("maxmemory", used + 400_000)  # room for some of the events, not all
    try:
        with pytest.raises(ResponseError, match="maxmemory"):
            await _deliver_one_by_one(queue, events)  # until Redis refuses
        for event in events:  # whatever was written, a marker never stands without its job
            if await redis.exists(keys.seen(event.id)):
                (run_id,) = await runs_of(redis, event)
                assert await redis.exists(keys.job(run_id))
                assert await redis.zscore(keys.queue, run_id) is not None
    finally:
        await redis.config_set("maxmemory", 0)
    flags = [(await queue.enqueue_events([event]))[0] for event in events]  # HrFlow's retries
    assert await redis.zcard(keys.queue) == len(events)
    assert [await redis.exists(keys.seen(e.id)) for e in events] == [1] * len(events)
    assert 0 < flags.count(DUPLICATE) < len(events)  # the first ones were already queued


async def _deliver_one_by_one(queue: EventQueue, events: list[Event]) -> None:
    for event in events:
        await queue.enqueue_events([event])


async def test_concurrent_callers_share_script_calls_and_each_learns_its_own_flags(
    redis: Redis, queue: EventQueue
) -> None:
    events = [Event.from_payload(parsing_event(f"pk-{n}")) for n in range(300)]
    await redis.config_resetstat()
    # Every event once, and a third of them a second time, all at once.
    callers = [queue.enqueue_events([event]) for event in events + events[::3]]
    flags = await asyncio.gather(*callers)

    first, again = flags[: len(events)], flags[len(events) :]
    assert sum(f == [True] for f in first) + sum(f == [True] for f in again) == len(events)
    for n, repeat in enumerate(again):  # an event and its repeat: exactly one was queued
        assert sorted([first[3 * n][0], repeat[0]]) == [False, True]
    assert await redis.zcard("hrflow:queue") == len(events)
    calls = (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
    assert calls < len(callers) / 10  # batched: a few calls, not one per caller
    # Callers arriving one at a time after the burst are still written (no writer is missed).
    for n in range(5):
        assert await queue.enqueue_events([Event.from_payload(parsing_event(f"late-{n}"))])


def _events(prefix: str, count: int = 1) -> list[Event]:
    return [Event.from_payload(parsing_event(f"{prefix}-{n}")) for n in range(count)]


def _ids(events: list[Event]) -> list[str]:
    return [event.id for event in events]


async def test_a_redis_restart_between_deliveries_costs_no_error(
    redis: Redis, redis_server: RedisServer, queue: EventQueue
) -> None:
    """The queue keeps its connections: after a restart the kept one is closed and Redis has
    forgotten the script. The next delivery reconnects and sends the script again."""
    before, after = _events("before"), _events("after")
    assert await queue.enqueue_events(before) == [True]
    await asyncio.to_thread(redis_server.restart)
    assert await queue.enqueue_events(after) == [True]
    assert await queued_event_ids(redis) == _ids(before + after)


async def test_a_connection_redis_dropped_is_replaced_and_the_script_runs_once(
    redis: Redis, queue: EventQueue
) -> None:
    await queue.enqueue_events(_events("first"))
    killed = await redis.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1  # the queue's own connection, idle since the first call
    await redis.config_resetstat()
    assert await queue.enqueue_events(_events("second")) == [True]
    stats = (await redis.info("commandstats"))["cmdstat_evalsha"]
    assert stats["calls"] == 1  # the dead connection's try never reached Redis


async def test_a_script_redis_forgot_is_sent_again(redis: Redis, queue: EventQueue) -> None:
    await queue.enqueue_events(_events("cached"))
    await redis.script_flush()
    assert await queue.enqueue_events(_events("flushed", 3)) == [True] * 3
    assert await redis.zcard("hrflow:queue") == 4


async def test_a_script_call_past_the_redis_timeout_fails_and_a_retry_queues_once(
    redis_server: RedisServer, redis: Redis
) -> None:
    """The client's socket timeout bounds a whole script call (the receiver answers 503),
    and the connection is not reused with a reply still owed on it."""
    impatient = Redis.from_url(redis_server.url, socket_timeout=0.2)
    event = _events("paused")
    try:
        async with EventQueue(impatient, "hrflow:queue", dedup_window_s=60) as queue:
            await redis.client_pause(1500, all=False)  # WRITE
            with pytest.raises(RedisTimeoutError):
                await queue.enqueue_events(event)
            await redis.client_unpause()
            await queue.enqueue_events(event)  # HrFlow's retry: queued now, or found queued
            assert await queued_event_ids(redis) == _ids(event)
            assert await queue.enqueue_events(_events("next")) == [True]
    finally:
        await redis.client_unpause()
        await impatient.aclose()


def test_a_packed_script_call_is_what_redis_py_would_send() -> None:
    keys = [b"hrflow:queue", b"seen:\xc3\xa9", b"arq:job:\r\n"]
    args = [b"86400", b"1700000000000", "é {}".encode(), b""]
    arguments = PackedArguments(
        [resp_bulk(keys[0]), resp_bulk(keys[1]) + resp_bulk(keys[2]), *map(resp_bulk, args)],
        keys=len(keys),
        count=len(keys) + len(args),
    )
    ours = packed_script_call(resp_bulk(b"EVALSHA") + resp_bulk(b"f" * 40), arguments)
    theirs = Connection().pack_command("EVALSHA", "f" * 40, len(keys), *keys, *args)
    assert b"".join(ours) == b"".join(theirs)


async def test_a_job_reads_back_as_the_event_it_was_made_of(
    redis: Redis, queue: EventQueue
) -> None:
    payload = parsing_event("pk-é", message="ligne 1\r\nligne 2 — Zoë")
    event = Event.from_payload(payload)
    assert await queue.enqueue_events([event]) == [True]
    (run_id,) = await runs_of(redis, event)
    job = deserialize_job(await redis.get(QueueKeys.job(run_id)))
    assert job["a"] == [event.to_dict()]
    assert job["f"] == "handle_event"


async def test_closing_the_queue_lets_a_batch_in_flight_finish_and_leaves_no_connection(
    redis: Redis,
) -> None:
    async def clients() -> int:
        return len(await redis.client_list())

    before = await clients()

    async def queue_connected() -> bool:  # the queue's connection is open and its call sent
        return await clients() > before

    queue = EventQueue(redis, "hrflow:queue", dedup_window_s=60)
    await redis.client_pause(300, all=False)  # WRITE: hold the script call
    caller = asyncio.ensure_future(queue.enqueue_events(_events("in-flight")))
    await eventually(queue_connected, interval_s=0.01)
    await queue.aclose()
    assert caller.done()  # answered before the close
    assert caller.result() == [True]
    assert await clients() == before


def test_arq_keeps_the_key_prefixes_the_layout_relies_on() -> None:
    from arq import constants

    assert QueueKeys.job("r") == constants.job_key_prefix + "r"
    assert QueueKeys.in_progress("r") == constants.in_progress_key_prefix + "r"
    assert QueueKeys.retry("r") == constants.retry_key_prefix + "r"
    assert QueueKeys.result("r") == constants.result_key_prefix + "r"


async def test_a_once_event_is_queued_once_inside_the_dedup_window(
    redis: Redis, queue: EventQueue
) -> None:
    event = Event.from_payload(parsing_event("once"))
    assert event.event_class == "once"
    assert await queue.enqueue_events([event, event]) == [QUEUED, DUPLICATE]
    assert await queue.enqueue_events([event]) == [DUPLICATE]
    (run_id,) = await runs_of(redis, event)
    assert run_id != event.id  # a run's id is its own, never the event's


async def test_identical_latest_events_merge_only_while_their_run_waits(
    redis: Redis, queue: EventQueue
) -> None:
    keys = QueueKeys("hrflow:queue")
    event = Event.from_payload(update_event("latest"))
    assert event.event_class == "latest"
    assert await queue.enqueue_events([event] * 10) == [QUEUED] + [COALESCED] * 9
    (first,) = await runs_of(redis, event)
    await redis.set(keys.in_progress(first), "1")  # a worker starts the run
    assert await queue.enqueue_events([event]) == [QUEUED]  # exactly one follow-up run
    assert await queue.enqueue_events([event] * 3) == [COALESCED] * 3  # merged into it
    first_again, follow_up = await runs_of(redis, event)
    assert first_again == first
    assert follow_up != first
    await redis.delete(keys.job(follow_up), keys.job(first))  # both runs finished (or were lost)
    assert await queue.enqueue_events([event]) == [QUEUED]  # never dropped after a run


async def test_events_of_one_subject_share_one_order_and_run_ids_never_repeat(
    redis: Redis, queue: EventQueue
) -> None:
    success = Event.from_payload(parsing_event("ordered"))
    update = Event.from_payload(update_event("ordered", family="storing"))
    other = Event.from_payload(update_event("someone-else"))
    assert success.subject == update.subject != other.subject
    await queue.enqueue_events([success, update, other])
    runs = await runs_of(redis, success)
    assert len(runs) == 2
    assert len(set(runs)) == 2
    assert sorted(await queued_event_ids(redis)) == sorted([success.id, update.id, other.id])
    assert (await runs_of(redis, other))[0] not in runs


async def test_a_notification_never_merges_into_a_run_that_has_done_something(
    redis: Redis, queue: EventQueue
) -> None:
    """A run deferred for a retry with a handler done would not run that handler again: an
    identical notification then gets a run of its own."""
    keys = QueueKeys("hrflow:queue")
    event = Event.from_payload(update_event("half-done"))
    assert await queue.enqueue_events([event]) == [QUEUED]
    (run_id,) = await runs_of(redis, event)
    await redis.hset(keys.done(run_id), "handler-a", "ok")  # type: ignore[misc]
    assert await queue.enqueue_events([event]) == [QUEUED]


async def test_only_identical_notifications_merge(redis: Redis, queue: EventQueue) -> None:
    update = update_event("differs")
    from_web = Event.from_payload({**update, "origin": "web"})
    from_api = Event.from_payload({**update, "origin": "api"})
    assert from_web.subject == from_api.subject
    assert await queue.enqueue_events([from_web, from_api]) == [QUEUED, QUEUED]


async def test_the_unrouted_table_holds_a_bounded_number_of_types(redis: Redis) -> None:
    keys = QueueKeys("hrflow:unrouted-test")
    count = redis.register_script(COUNT_UNROUTED_SCRIPT)
    for n in range(UNROUTED_TYPES_MAX + 44):
        await count(keys=[keys.unrouted], args=[f"signed.type.{n}", UNROUTED_TYPES_MAX])
    await count(keys=[keys.unrouted], args=["signed.type.0", UNROUTED_TYPES_MAX])
    table = await redis.hgetall(keys.unrouted)  # type: ignore[misc]
    assert len(table) == UNROUTED_TYPES_MAX + 1
    assert table[OTHER_TYPES.encode()] == b"44"
    assert table[b"signed.type.0"] == b"2"  # a type already in the table is still counted
