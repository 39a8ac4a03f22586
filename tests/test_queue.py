"""The queue seam: group commit under concurrent callers, and memory pressure (maxmemory
with noeviction): Redis refuses a whole enqueue script, the caller gets the error (the
receiver answers 503), and HrFlow's retries then queue every event exactly once."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import EventQueue, QueueKeys
from tests.service import parsing_event


async def test_out_of_memory_refuses_and_a_retry_queues_every_event_once(redis: Redis) -> None:
    queue = EventQueue(redis, "hrflow:queue", dedup_window_s=60)
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
                assert await redis.exists(keys.job(event.id))
                assert await redis.zscore(keys.queue, event.id) is not None
    finally:
        await redis.config_set("maxmemory", 0)
    flags = [(await queue.enqueue_events([event]))[0] for event in events]  # HrFlow's retries
    assert await redis.zcard(keys.queue) == len(events)
    assert [await redis.exists(keys.seen(e.id)) for e in events] == [1] * len(events)
    assert 0 < flags.count(False) < len(events)  # the first ones were already queued


async def _deliver_one_by_one(queue: EventQueue, events: list[Event]) -> None:
    for event in events:
        await queue.enqueue_events([event])


async def test_concurrent_callers_share_script_calls_and_each_learns_its_own_flags(
    redis: Redis,
) -> None:
    queue = EventQueue(redis, "hrflow:queue", dedup_window_s=60)
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
