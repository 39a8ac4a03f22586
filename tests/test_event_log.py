"""The event log: every event's path (delivery, coalescing, runs, handler outcomes, replays),
written by the scripts that already run, searchable, capped, trimmed, erasable, and free of
personal data. Real receiver, real workers, a real Redis and the sandbox HrFlow API."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from control.erasure import erase_profile
from hrflow_client.profiles import timestamp_of
from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.event_log import (
    REBUILD_COPY_LIFETIME_MS,
    EventLog,
    LogEntry,
    LogQuery,
    RebuildRefusedError,
)
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import SCAN_BATCH, SCAN_LOG_SCRIPT, QueueKeys
from sandbox import HARRY_POTTER_KEY, JOHN_DOE_KEY, SAMPLE_SOURCE_KEY
from sandbox.faults import Fault
from tests.redis_server import RedisServer
from tests.sandbox_fixtures import SandboxServer
from tests.service import (
    drain,
    enqueue,
    make_settings,
    parsing_event,
    receiver,
    signed_headers,
    update_event,
)
from workers.dead_letters import DeadLetters
from workers.handlers import edit
from workers.registry import Registry

KEYS = QueueKeys("hrflow:queue")
TAGS = "reviewed=yes"


def _path(entries: list[LogEntry]) -> list[tuple[str, str]]:
    return [(e.kind, e.outcome) for e in entries]


async def _deliver(settings: Any, http: aiohttp.ClientSession, *events: Any) -> list[str]:
    """Signed deliveries through the real receiver; their request ids."""
    request_ids = []
    async with receiver(settings) as server:
        for event in events:
            body = json.dumps(event)
            url = f"{server.url}/webhook"
            async with http.post(url, data=body, headers=signed_headers(event)) as answer:
                assert answer.status == 202, await answer.text()
                request_ids.append(answer.headers["x-request-id"])
    return request_ids


def _edit_registry(settings: Any) -> Registry:
    registry = Registry()
    edit.register(registry, settings)
    return registry


async def test_a_handled_delivery_leaves_its_whole_path_and_no_personal_data(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    event = Event.from_payload(parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    [request_id] = await _deliver(settings, http, dict(event))
    await drain(settings, _edit_registry(settings))

    timeline = await EventLog(redis, KEYS).timeline(event.id)
    assert _path(timeline) == [("delivery", "queued"), ("handler", "ok"), ("run", "done")]
    delivery, handler, run = timeline
    assert delivery.detail["request_id"] == request_id
    assert delivery.detail["via"] == "http"
    assert delivery.run_id == handler.run_id == run.run_id != ""
    assert delivery.profile_key == HARRY_POTTER_KEY
    assert delivery.source_key == SAMPLE_SOURCE_KEY
    assert handler.detail["handler"] == "builtin.edit"
    assert float(handler.detail["duration_ms"]) >= 0
    assert run.detail["try"] == "1"
    assert ":" in run.detail["worker"]
    assert int(run.detail["started_ms"]) >= int(delivery.at * 1000)

    # Nothing personal reached the log: no name, no text, no profile field.
    raw = repr(await redis.xrange(KEYS.log))
    for personal in ("Harry", "Potter", "Mathematic", "football"):
        assert personal not in raw


async def test_the_handled_state_is_hrflows_stamp_of_what_the_handler_read_and_wrote(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    event = Event.from_payload(parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    await _deliver(settings, http, dict(event))
    await drain(settings, _edit_registry(settings))
    # The handler read the profile, then wrote it back: the newest state it knows of is its
    # own write's, as HrFlow stamped it (the PUT's answer), not our clock.
    after = sandbox.state.profiles.get(SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)
    assert after is not None
    written_at = timestamp_of(after["updated_at"])
    assert written_at is not None
    handled = await redis.get(KEYS.handled(SAMPLE_SOURCE_KEY, HARRY_POTTER_KEY))
    assert handled is not None
    assert int(handled) == int(written_at)


async def test_duplicates_and_coalesced_notifications_point_at_their_run(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    once, latest = (Event.from_payload(p) for p in (parsing_event("pk-d"), update_event("pk-c")))
    async with EventQueue(redis, settings.queue_name, 60) as queue:
        await queue.enqueue_events([once, once], request_id="req-1")
        await queue.enqueue_events([latest, latest, latest], request_id="req-2")
    log = EventLog(redis, KEYS)
    first, duplicate = await log.timeline(once.id)
    assert (first.outcome, duplicate.outcome) == ("queued", "duplicate")
    assert first.run_id
    assert duplicate.run_id == ""
    queued, *merged = await log.timeline(latest.id)
    assert [m.outcome for m in merged] == ["coalesced", "coalesced"]
    assert {m.run_id for m in merged} == {queued.run_id}  # merged into the waiting run
    assert {e.detail["request_id"] for e in merged} == {"req-2"}


async def test_a_retry_a_dead_letter_and_its_replay_are_in_the_timeline(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    registry = _edit_registry(settings)
    log = EventLog(redis, KEYS)
    retried = Event.from_payload(parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=500, times=1))
    await _deliver(settings, http, dict(retried))
    await drain(settings, registry)
    timeline = await log.timeline(retried.id)
    assert _path(timeline) == [
        ("delivery", "queued"),
        ("handler", "retry"),
        ("run", "retry"),
        ("handler", "ok"),
        ("run", "done"),
    ]
    retry, retried_run = timeline[1:3]
    assert (retry.detail["error"], retry.detail["hrflow_status"]) == ("UpstreamError", "500")
    assert float(retried_run.detail["retry_in_s"]) > 0
    assert timeline[-1].detail["try"] == "2"

    dead_lettered = Event.from_payload(parsing_event(JOHN_DOE_KEY, SAMPLE_SOURCE_KEY))
    sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=400, times=1))
    await _deliver(settings, http, dict(dead_lettered))
    await drain(settings, registry)
    letters = DeadLetters(redis, KEYS)
    [letter_id] = await letters.ids()
    assert await letters.replay(letter_id)
    await drain(settings, registry)
    timeline = await log.timeline(dead_lettered.id)
    assert _path(timeline) == [
        ("delivery", "queued"),
        ("handler", "failed"),
        ("handler", "dead"),
        ("run", "dead_lettered"),
        ("replay", "queued"),
        ("handler", "ok"),
        ("run", "done"),
    ]
    failed, dead, _, replay = timeline[1:5]
    assert (failed.detail["hrflow_status"], dead.detail["hrflow_status"]) == ("400", "400")
    assert dead.detail["dead_letter_id"] == letter_id == replay.detail["dead_letter_id"]
    assert dead.detail["reason"] == "permanent error"
    assert replay.run_id == timeline[-1].run_id != timeline[0].run_id
    assert timeline[-2].detail["handler"] == "builtin.edit"


async def test_search_filters_across_slices_newest_first(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    events = [Event.from_payload(parsing_event(f"pk-{n}")) for n in range(4_500)]
    async with EventQueue(redis, settings.queue_name, 60) as queue:
        await queue.enqueue_events(events[:4_000])
        await queue.enqueue_events(events[:1])  # a duplicate, the newest entry
        # The log's times are milliseconds (stream ids): keep the boundary's millisecond
        # clear of entries on both sides, or "since" takes in the duplicate's.
        await asyncio.sleep(0.005)
        middle = time.time()
        await asyncio.sleep(0.005)
        await queue.enqueue_events(events[4_000:])
    log = EventLog(redis, KEYS)
    # pk-7 is thousands of entries (several slices) behind the newest.
    [found] = await log.search(LogQuery(profile_key="pk-7"))
    assert (found.event_id, found.outcome) == (events[7].id, "queued")
    assert [e.outcome for e in await log.search(LogQuery(profile_key="pk-0"))] == [
        "duplicate",
        "queued",
    ]
    assert len(await log.search(LogQuery(outcome="queued", limit=3_000))) == 3_000
    assert len(await log.search(LogQuery(outcome="duplicate"))) == 1
    newer = await log.search(LogQuery(since=middle, limit=10_000))
    assert len(newer) == 500
    assert newer[0].event_id == events[-1].id
    older = await log.search(LogQuery(until=middle, type="profile.parsing.success", limit=5))
    assert [e.outcome for e in older] == ["duplicate", "queued", "queued", "queued", "queued"]
    assert await log.search(LogQuery(profile_key="pk-4500")) == []
    [minute_now] = [c for _, c in (await log.minutes(2))[-1:]]
    assert sum(c.get("queued", 0) for _, c in await log.minutes(2)) == 4_500
    assert minute_now.get("queued", 0) + (await log.minutes(2))[0][1].get("queued", 0) == 4_500


async def test_a_scan_slice_ends_on_its_time_budget_not_its_entry_count(
    redis: Redis, redis_server: RedisServer
) -> None:
    """Every delivery waits behind a slice: a slice stops once its budget of Redis' time is
    spent, checked every SCAN_BATCH entries; the entry count only bounds it from above."""
    settings = make_settings(redis_server.url)
    events = [Event.from_payload(parsing_event(f"pk-{n}")) for n in range(3 * SCAN_BATCH)]
    async with EventQueue(redis, settings.queue_name, 60) as queue:
        await queue.enqueue_events(events)
    scan = redis.register_script(SCAN_LOG_SCRIPT)
    no_filter = ["delivery", "", "", "", "", ""]

    async def looked_at(budget_us: int) -> tuple[str, int]:
        last, found = await scan(
            keys=[KEYS.log], args=["-", "+", 2_000, "+", "match", *no_filter, budget_us]
        )
        return last.decode(), len(found)

    last, found = await looked_at(0)  # spent at once: one batch, and where to go on
    assert found == SCAN_BATCH
    assert last
    assert await looked_at(10_000_000) == ("", 3 * SCAN_BATCH)  # to the end of the log


async def test_the_log_is_capped_and_trimmed_past_its_retention(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    events = [Event.from_payload(parsing_event(f"cap-{n}")) for n in range(3_000)]
    async with EventQueue(redis, settings.queue_name, 60, log_max_entries=1_000) as queue:
        await queue.enqueue_events(events)
    length = await redis.xlen(KEYS.log)
    assert 1_000 <= length < 1_200  # MAXLEN ~ trims whole nodes of 100 entries
    oldest, newest = await redis.xrange(KEYS.log, count=1), await redis.xrevrange(KEYS.log, count=1)
    # Trimmed to what is as young as the newest entry: only that millisecond is kept.
    newest_ms = int(newest[0][0].decode().partition("-")[0])
    log = EventLog(redis, KEYS)
    assert await log.trim(retention_s=3_600) == 0  # nothing is an hour old
    removed = await log.trim_before(newest_ms)
    assert removed > 0
    assert oldest != await redis.xrange(KEYS.log, count=1)
    remaining = await redis.xrange(KEYS.log)
    assert remaining
    assert all(int(i.decode().partition("-")[0]) == newest_ms for i, _ in remaining)


async def test_erasure_removes_a_profiles_entries_and_handled_states_only(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    registry = Registry()
    registry.add("profile.storing.success", _nothing, name="nothing")
    listed = {"reconciler": {"updated_at": "2026-11-30T18:00:00+0000"}}
    gone = [_stored("pk-gone", "sk-a", **listed), _stored("pk-gone", "sk-b", **listed)]
    kept = _stored("pk-kept", "sk-a", **listed)
    unread = _stored("pk-unread", "sk-a")  # no handler read it, no reconciler listed it
    async with EventQueue(redis, settings.queue_name, 60) as queue:
        await queue.enqueue_events([Event.from_payload(p) for p in (*gone, kept, unread)])
    await drain(settings, registry)
    states = [KEYS.handled(s, k) for s, k in (("sk-a", "pk-gone"), ("sk-b", "pk-gone"))]
    kept_state, unread_state = KEYS.handled("sk-a", "pk-kept"), KEYS.handled("sk-a", "pk-unread")
    assert await redis.exists(*states, kept_state) == 3
    assert not await redis.exists(unread_state)  # a state is never made up from our clock
    # The log keeps only the newest entries: pk-gone's first source is no longer named there.
    first_source_entries = await EventLog(redis, KEYS).erase(
        subject=Event.from_payload(gone[0]).subject
    )
    assert first_source_entries.entries == 3

    report = await erase_profile(redis, KEYS, "pk-gone")
    assert (report.log_entries, report.handled_states) == (3, 2)  # both states, by pattern
    log = EventLog(redis, KEYS)
    assert await log.search(LogQuery(profile_key="pk-gone")) == []
    assert len(await log.search(LogQuery(profile_key="pk-kept"))) == 3
    assert await redis.exists(*states, kept_state) == 1
    assert "pk-gone" not in repr(await redis.xrange(KEYS.log))


async def test_an_empty_profile_key_erases_nothing(redis: Redis, redis_server: RedisServer) -> None:
    settings = make_settings(redis_server.url)
    await enqueue(settings, redis, parsing_event("pk-1"))
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="empty"):
            await erase_profile(redis, KEYS, empty)
    for empty_filter in ({}, {"profile_key": " "}, {"reference": ""}):
        with pytest.raises(ValueError, match="needs one of a subject, a profile key or"):
            await EventLog(redis, KEYS).erase(**empty_filter)
    assert await redis.xlen(KEYS.log) == 1


async def test_an_erasure_copies_what_is_appended_and_trimmed_during_its_rebuild(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    first = [parsing_event(f"pk-{n}") for n in range(6)] + [parsing_event("pk-gone")]
    await enqueue(settings, redis, *first)
    await redis.xadd(KEYS.log, {"k": "other"})  # an entry without the six fields
    second_oldest = (await redis.xrange(KEYS.log, count=2))[1][0]
    rebuild = EventLog(redis, KEYS).rebuild(profile_key="pk-gone", slice_entries=3)
    assert not await rebuild.copy_slice()  # three of eight copied
    # Meanwhile the receiver appends, some for the erased profile, and upkeep trims.
    later = [parsing_event("pk-gone", "sk-2"), parsing_event("pk-late"), update_event("pk-gone")]
    await enqueue(settings, redis, *later)
    assert await redis.xtrim(KEYS.log, minid=second_oldest, approximate=False) == 1
    expected = [
        (ident, fields) for ident, fields in await redis.xrange(KEYS.log)
        if not fields.get(b"s", b"").endswith(b"/key:pk-gone")
    ]  # fmt: skip
    last_id = (await redis.xinfo_stream(KEYS.log))["last-generated-id"]
    assert not await rebuild.copy_slice()

    erased = await rebuild.finish()

    assert await redis.xrange(KEYS.log) == expected
    assert erased.entries == 3
    assert erased.subjects == {"profile/sk-1/key:pk-gone", "profile/sk-2/key:pk-gone"}
    assert (await redis.xinfo_stream(KEYS.log))["last-generated-id"] == last_id
    assert await redis.exists(KEYS.log_copy) == 0
    await enqueue(settings, redis, parsing_event("pk-after"))  # the log goes on, ids ascending
    assert (await redis.xrange(KEYS.log))[-1][0] > last_id


async def test_a_second_erasure_waits_for_the_first_rebuild_and_a_dead_ones_copy_expires(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    await enqueue(settings, redis, *[parsing_event(f"pk-{n}") for n in range(4)])
    log = EventLog(redis, KEYS)
    first = log.rebuild(profile_key="pk-0", slice_entries=2)
    await first.copy_slice()
    with pytest.raises(RebuildRefusedError, match=r"^another erasure is rebuilding the event log$"):
        await log.erase(profile_key="pk-1")
    assert 0 < await redis.pttl(KEYS.log_copy) <= REBUILD_COPY_LIFETIME_MS
    assert (await first.finish()).entries == 1
    assert (await log.erase(profile_key="pk-1")).entries == 1
    assert await redis.xlen(KEYS.log) == 2


async def test_erasing_every_entry_leaves_an_empty_log_that_keeps_its_last_id(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    await enqueue(settings, redis, parsing_event("pk-only"), update_event("pk-only"))
    last_id = (await redis.xinfo_stream(KEYS.log))["last-generated-id"]
    assert (await EventLog(redis, KEYS).erase(profile_key="pk-only")).entries == 2
    assert await redis.xlen(KEYS.log) == 0
    assert (await redis.xinfo_stream(KEYS.log))["last-generated-id"] == last_id
    await redis.delete(KEYS.log)
    assert (await EventLog(redis, KEYS).erase(profile_key="pk-only")).entries == 0
    assert await redis.exists(KEYS.log, KEYS.log_copy) == 0


async def test_a_profile_named_by_reference_is_logged_by_its_hash(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    by_reference = parsing_event("unused")
    by_reference["profile"] = {"reference": "jane.doe@example.com", "source": {"key": "sk-1"}}
    [event] = await enqueue(settings, redis, by_reference)
    assert event.subject == "profile/sk-1/reference:jane.doe@example.com"  # the queue's
    [entry] = await EventLog(redis, KEYS).timeline(event.id)
    assert entry.subject.startswith("profile/sk-1/reference#")
    assert "jane" not in repr(await redis.xrange(KEYS.log))


async def test_a_profile_key_search_does_not_match_a_job_of_the_same_key(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    job = {"type": "job.storing.success", "job": {"key": "k-1", "board": {"key": "b-1"}}}
    await enqueue(settings, redis, parsing_event("k-1"), job)
    [found] = await EventLog(redis, KEYS).search(LogQuery(profile_key="k-1"))
    assert found.subject.startswith("profile/")


def _stored(profile_key: str, source_key: str, **extra: Any) -> dict[str, Any]:
    return {**parsing_event(profile_key, source_key, **extra), "type": "profile.storing.success"}


async def _nothing(event: Any, ctx: Any) -> None:
    return None


async def test_a_handler_that_skips_on_purpose_is_a_skip_with_its_reason(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    first = parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY)
    echo = Event.from_payload(update_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    await _deliver(settings, http, first)
    await drain(settings, _edit_registry(settings))
    await _deliver(settings, http, dict(echo))  # the echo of the handler's own PUT
    await drain(settings, _edit_registry(settings))
    [_, handler, run] = await EventLog(redis, KEYS).timeline(echo.id)
    assert (handler.outcome, handler.detail["reason"]) == ("skip", "echo of our own write")
    assert run.outcome == "done"
