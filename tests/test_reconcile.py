"""Reconciliation against the sandbox HrFlow API: the webhooks it drops on purpose are found by
listing, queued through the normal path and handled exactly once; what was handled is never
queued again; a 429 or a 5xx stops the scan with its checkpoint unchanged."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from hrflow_client import HrflowClient
from hrflow_client.profiles import timestamp_of
from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.errors import PermanentError, SubjectGoneError, TransientError
from hrflow_webhooks.event_log import EventLog, LogQuery
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from sandbox import DEFAULT_API_KEY, DEFAULT_API_USER
from sandbox.faults import Fault
from tests.hostile_listing import HostileListing, endless, fresh_page, listed, page_of, stamp
from tests.polling import eventually
from tests.redis_server import RedisServer
from tests.sandbox_fixtures import SandboxServer
from tests.service import WEBHOOK_SECRET, drain, make_settings, receiver, recorder
from workers.handlers import edit
from workers.reconcile import ENQUEUE_SLICE, Reconciler, listed_event
from workers.registry import Registry
from workers.settings import create_worker

SOURCE = "reconciled"
KEYS = QueueKeys("hrflow:queue")


def _client(sandbox: SandboxServer, http: aiohttp.ClientSession) -> HrflowClient:
    return HrflowClient(http, sandbox.api_url, DEFAULT_API_KEY, DEFAULT_API_USER)


async def _create_and_update(client: HrflowClient, count: int) -> list[str]:
    """``count`` profiles created then updated through the API: two webhooks each."""
    keys = []
    for n in range(count):
        created = await client.profile_indexing_add_json(
            SOURCE, {"reference": f"ref-{n}", "text": "t", "info": {"summary": "first"}}
        )
        keys.append(created["key"])
        await client.profile_indexing_edit(SOURCE, {"info": {"summary": "second"}}, key=keys[-1])
    return keys


def _worker_calls(sandbox: SandboxServer, since: int) -> Counter[tuple[str, str]]:
    """(method, profile key) of the profile reads and writes after call number ``since``."""
    calls = sandbox.state.calls[since:]
    return Counter(
        (c["method"], c["query"].get("key") or c["body"].get("key"))
        for c in calls
        if c["path"] == "/v1/profile/indexing"
    )


def _registry(settings: Settings) -> Registry:
    """The edit handler when HRFLOW_EDIT_TAGS is set; else a handler of the storing events
    that does nothing (a reconciler queues nothing for a source no handler acts on)."""
    registry = Registry()
    edit.register(registry, settings)
    if not settings.edit_tags:
        for event_type in ("profile.storing.success", "profile.storing.update"):
            registry.add(event_type, _ok, name="nothing")
    return registry


def _reconciler(
    redis: Redis, sandbox: SandboxServer, http: aiohttp.ClientSession, settings: Settings
) -> Reconciler:
    return Reconciler(redis, _client(sandbox, http), settings, _registry(settings))


@asynccontextmanager
async def _sandbox(**options: Any) -> AsyncIterator[SandboxServer]:
    async with SandboxServer(**options) as server:
        yield server


def _dropping() -> Any:
    """The sandbox with its webhooks on and every delivery dropped, as when they go missing."""
    return _sandbox(
        webhook_url="http://127.0.0.1:9/unused", webhook_secret=WEBHOOK_SECRET, drop_webhooks=True
    )


async def test_dropped_webhooks_are_found_handled_once_and_not_queued_again(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with _dropping() as sandbox:
        settings = sandbox.settings(redis_server.url, edit_tags="reviewed=yes")
        began = time.time()
        keys = await _create_and_update(_client(sandbox, http), 200)
        assert len(sandbox.state.dropped_webhooks) == 400  # every delivery lost
        assert sandbox.state.webhooks == []
        reconciler = _reconciler(redis, sandbox, http, settings)

        first = await reconciler.run([SOURCE], since=began - 1)
        assert (first.scanned, first.enqueued, first.already_handled) == (200, 200, 0)
        assert (first.pages, first.stopped) == (2, None)
        before = len(sandbox.state.calls)
        await drain(settings, _registry(settings))
        handled = _worker_calls(sandbox, before)
        assert handled == Counter(
            {("GET", key): 1 for key in keys} | {("PUT", key): 1 for key in keys}
        )

        again = await reconciler.run([SOURCE])  # from the checkpoint the first one left
        assert (again.scanned, again.enqueued, again.already_handled) == (200, 0, 200)
        assert await redis.zcard(KEYS.queue) == 0

    log = EventLog(redis, KEYS)
    deliveries = await log.search(LogQuery(kind="delivery", limit=1_000))
    assert len(deliveries) == 200
    assert {(d.type, d.detail["via"]) for d in deliveries} == {
        ("profile.storing.success", "reconciler")
    }
    [newest, older] = await log.reconcile_runs()
    assert (newest.enqueued, older.enqueued, newest.trigger) == (0, 200, "cli")


async def test_with_webhooks_arriving_reconcile_finds_nothing_new(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = SandboxServer().settings(redis_server.url, edit_tags="reviewed=yes")
    async with receiver(settings) as server:
        url = f"{server.url}/webhook"
        async with _sandbox(webhook_url=url, webhook_secret=WEBHOOK_SECRET) as sandbox:
            settings = sandbox.settings(redis_server.url, edit_tags="reviewed=yes")
            began = time.time()
            await _create_and_update(_client(sandbox, http), 20)

            async def all_handled() -> bool:
                await drain(settings, _registry(settings))
                answered = [w for w in sandbox.state.webhooks if w["status"] is not None]
                return len(answered) == len(sandbox.state.webhooks) and not await redis.zcard(
                    KEYS.queue
                )

            await eventually(all_handled)
            assert sandbox.state.dropped_webhooks == []
            report = await _reconciler(redis, sandbox, http, settings).run(
                [SOURCE], since=began - 1
            )
    assert (report.scanned, report.enqueued, report.already_handled) == (20, 0, 20)


@pytest.mark.parametrize("status", [429, 503])
async def test_a_429_or_5xx_stops_the_scan_and_the_next_resumes_from_the_checkpoint(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession, status: int
) -> None:
    async with _dropping() as sandbox:
        settings = sandbox.settings(redis_server.url)
        await _create_and_update(_client(sandbox, http), 3)
        reconciler = _reconciler(redis, sandbox, http, settings)
        await redis.set(KEYS.reconcile_checkpoint(SOURCE), time.time() - 600)
        checkpoint = await redis.get(KEYS.reconcile_checkpoint(SOURCE))
        sandbox.state.faults.add(Fault(endpoint="GET /v1/storing/profiles", status=status, times=1))

        stopped = await reconciler.run([SOURCE])
        assert stopped.stopped == f"HrFlow: HTTP {status} on page 1 of source {SOURCE}"
        assert stopped.enqueued == 0
        assert await redis.get(KEYS.reconcile_checkpoint(SOURCE)) == checkpoint

        resumed = await reconciler.run([SOURCE])
        assert (resumed.stopped, resumed.enqueued) == (None, 3)
        assert float(await redis.get(KEYS.reconcile_checkpoint(SOURCE)) or 0) > float(checkpoint)
        [latest, first] = await EventLog(redis, KEYS).reconcile_runs()
        assert (latest.stopped, first.stopped) == (None, stopped.stopped)


async def test_a_changed_profile_is_queued_as_an_update_with_its_listed_state(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with _dropping() as sandbox:
        settings = sandbox.settings(redis_server.url, edit_tags="reviewed=yes")
        client = _client(sandbox, http)
        began = time.time()
        [key] = await _create_and_update(client, 1)
        reconciler = Reconciler(redis, client, settings, _registry(settings))
        await reconciler.run([SOURCE], since=began - 1)
        await drain(settings, _registry(settings))
        await asyncio.sleep(1.1)  # HrFlow stamps updated_at to the second
        await client.profile_indexing_edit(SOURCE, {"info": {"summary": "third"}}, key=key)

        report = await reconciler.run([SOURCE], since=began - 1)
        assert (report.enqueued, report.already_handled) == (1, 0)
        [update] = await EventLog(redis, KEYS).search(LogQuery(kind="delivery", limit=1))
        assert (update.type, update.profile_key) == ("profile.storing.update", key)


async def test_the_workers_reconcile_on_schedule_one_at_a_time(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with _dropping() as sandbox:
        settings = sandbox.settings(
            redis_server.url, edit_tags="reviewed=yes", reconcile_sources=SOURCE
        )
        keys = await _create_and_update(_client(sandbox, http), 5)
        workers = [
            create_worker(settings, _registry(settings), handle_signals=False) for _ in range(2)
        ]
        running = [asyncio.create_task(w.main()) for w in workers]
        try:

            async def reconciled_and_handled() -> bool:
                runs = await EventLog(redis, KEYS).reconcile_runs()
                return len(runs) == 1 and not await redis.zcard(KEYS.queue)

            await eventually(reconciled_and_handled)
            both_started = [w for w in workers if w.ctx.get("upkeep") is not None]
            assert len(both_started) == 2
        finally:
            for worker in workers:
                await worker.close()
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
    [report] = await EventLog(redis, KEYS).reconcile_runs()
    assert (report.trigger, report.sources, report.enqueued) == ("schedule", (SOURCE,), 5)
    assert await redis.exists(KEYS.reconcile_lock)  # spaces the next scan by the interval
    put = [c["body"]["key"] for c in sandbox.state.calls if c["method"] == "PUT"]
    assert Counter(put) == Counter({key: 2 for key in keys})  # the test's edit, then the handler's


async def test_a_short_since_leaves_an_older_checkpoint_where_it_was(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """Scanning back 10 minutes says nothing of the hours before: the next scan must still
    look there."""
    async with _dropping() as sandbox:
        settings = sandbox.settings(redis_server.url)
        await _create_and_update(_client(sandbox, http), 2)
        reconciler = _reconciler(redis, sandbox, http, settings)
        three_hours_ago = str(time.time() - 3 * 3_600).encode()
        await redis.set(KEYS.reconcile_checkpoint(SOURCE), three_hours_ago)
        await reconciler.run([SOURCE], since=time.time() + 3_600)  # sees nothing
        assert await redis.get(KEYS.reconcile_checkpoint(SOURCE)) == three_hours_ago
        resumed = await reconciler.run([SOURCE])  # from the checkpoint: finds both
        assert (resumed.scanned, resumed.enqueued) == (2, 2)
        assert float(await redis.get(KEYS.reconcile_checkpoint(SOURCE)) or 0) > time.time() - 120


async def test_a_source_hrflow_refuses_is_reported_and_the_others_are_scanned(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with _dropping() as sandbox:
        settings = sandbox.settings(redis_server.url)
        await _create_and_update(_client(sandbox, http), 2)
        reconciler = _reconciler(redis, sandbox, http, settings)
        report = await reconciler.run(["no-such-source", SOURCE], since=time.time() - 600)
    assert (report.scanned, report.enqueued) == (2, 2)
    assert report.stopped == "source no-such-source: HrFlow refused the listing (HTTP 400)"
    assert await redis.get(KEYS.reconcile_checkpoint("no-such-source")) is None
    [stored] = await EventLog(redis, KEYS).reconcile_runs()
    assert stored.stopped == report.stopped


LISTED_AT = "2026-11-30T18:00:00+0000"


async def _run_listed(redis: Redis, settings: Settings, registry: Registry) -> bytes | None:
    """A never-handled profile (pk-1) as the reconciler queues it, run by a worker with
    ``registry``: the handled state it leaves."""
    listed = {"key": "pk-1", "updated_at": LISTED_AT}
    event = Event.from_payload(listed_event(SOURCE, listed, "profile.storing.success"))
    assert event.type == "profile.storing.success"
    async with EventQueue(redis, settings.queue_name, 60) as queue:
        await queue.enqueue_events([event])
    await drain(settings, registry)
    state: bytes | None = await redis.get(KEYS.handled(SOURCE, "pk-1"))
    return state


async def _ok(event: Event, ctx: Any) -> None:
    pass


async def _gone(event: Event, ctx: Any) -> None:
    raise SubjectGoneError("still 404 after the grace period")


async def _broken(event: Event, ctx: Any) -> None:
    raise PermanentError("cannot help")


@pytest.mark.parametrize(
    ("registered", "handler", "sources", "handled"),
    [
        ("profile.parsing.success", _ok, None, False),  # unrouted: nobody listens to storing
        ("profile.storing.success", _ok, ["elsewhere"], False),  # not for this source
        ("profile.storing.success", _gone, None, False),  # the run is a skip
        ("profile.storing.success", _broken, None, False),  # dead-lettered
        ("profile.storing.success", _ok, None, True),
    ],
    ids=["unrouted", "other-source", "gone", "dead-lettered", "ok"],
)
async def test_only_a_run_whose_handler_ran_to_ok_marks_the_profile_handled(
    redis: Redis,
    redis_server: RedisServer,
    registered: str,
    handler: Any,
    sources: list[str] | None,
    handled: bool,
) -> None:
    """The reconciler's mark means "a handler acted on this state": a run nobody acted in
    must leave it unset, or the next scan calls the profile handled and never queues it."""
    settings = make_settings(redis_server.url, max_tries=1)
    registry = Registry()
    registry.add(registered, handler, name="h", sources=sources)
    state = await _run_listed(redis, settings, registry)
    assert not await redis.zcard(KEYS.queue)
    assert state == (str(int(timestamp_of(LISTED_AT) or 0)).encode() if handled else None)


async def test_a_handler_ok_on_an_earlier_try_still_marks_the_profile_handled(
    redis: Redis, redis_server: RedisServer
) -> None:
    """The ok of try 1 is known on try 2 only by its completion marker."""
    settings = make_settings(redis_server.url, max_tries=2)
    registry = Registry()
    tries: list[int] = []

    async def flaky(event: Event, ctx: Any) -> None:
        tries.append(ctx.job_try)
        raise (TransientError if ctx.job_try == 1 else PermanentError)("HrFlow said no")

    registry.add("profile.storing.success", _ok, name="a")
    registry.add("profile.storing.success", flaky, name="b")
    assert await _run_listed(redis, settings, registry) is not None
    assert tries == [1, 2]


async def test_profiles_are_announced_in_the_family_the_handlers_listen_to(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """README's first example listens to profile.parsing.success only: a storing event would
    run no handler, and must not be what the reconciler queues."""
    async with _dropping() as sandbox:
        settings = sandbox.settings(redis_server.url)
        registry = Registry()
        seen = recorder(registry, "profile.parsing.success")
        client = _client(sandbox, http)
        began = time.time()
        [key, *_] = await _create_and_update(client, 3)
        reconciler = Reconciler(redis, client, settings, registry)

        first = await reconciler.run([SOURCE], since=began - 1)
        assert (first.enqueued, first.stopped) == (3, None)
        await drain(settings, registry)
        assert {e.type for e in seen} == {"profile.parsing.success"}
        assert len(seen) == 3
        again = await reconciler.run([SOURCE], since=began - 1)
        assert (again.enqueued, again.already_handled) == (0, 3)

        await asyncio.sleep(1.1)  # HrFlow stamps updated_at to the second
        await client.profile_indexing_edit(SOURCE, {"info": {"summary": "third"}}, key=key)
        changed = await reconciler.run([SOURCE], since=began - 1)
        # Handled once: a first-time event again would be a lie, and no handler takes updates.
        assert (changed.enqueued, changed.no_handler, changed.already_handled) == (0, 1, 2)
    assert await redis.hgetall(KEYS.unrouted) == {}  # type: ignore[misc]


async def test_a_source_no_handler_acts_on_is_not_listed_and_the_report_says_so(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with _dropping() as sandbox:
        settings = sandbox.settings(redis_server.url)
        await _create_and_update(_client(sandbox, http), 1)
        registry = Registry()
        registry.add("profile.parsing.success", _ok, sources=["another-source"])
        listings_before = len(sandbox.state.calls_to("GET", "/v1/storing/profiles"))
        report = await Reconciler(redis, _client(sandbox, http), settings, registry).run([SOURCE])
        assert len(sandbox.state.calls_to("GET", "/v1/storing/profiles")) == listings_before
    assert (report.pages, report.enqueued) == (0, 0)
    assert report.stopped == (
        f"source {SOURCE}: no handler acts on profile.storing.* or profile.parsing.* events of it"
    )
    assert await redis.get(KEYS.reconcile_checkpoint(SOURCE)) is None


# --- hostile listings (tests.hostile_listing) ----------------------------------------------

FAR_FUTURE = "2999-01-01T00:00:00+0000"


def _reading(profile: dict[str, Any]) -> Registry:
    """Handlers of the storing events that read ``profile`` as fetch_profile reads HrFlow's:
    they tell the run the updated_at they saw."""
    registry = Registry()

    async def read(event: Event, ctx: Any) -> None:
        ctx.saw_state(profile.get("updated_at"))

    for event_type in ("profile.storing.success", "profile.storing.update"):
        registry.add(event_type, read, name="reader")
    return registry


async def _hostile_scan(
    redis: Redis, http: aiohttp.ClientSession, redis_url: str, profile: dict[str, Any]
) -> tuple[Any, Settings, Registry]:
    """One listing of the profile ``profile`` describes (its key and updated_at, if any)."""
    async with HostileListing(lambda page, limit: page_of([profile])) as hrflow:
        settings = hrflow.settings(redis_url)
        registry = _reading(profile)
        reconciler = Reconciler(redis, hrflow.client(http), settings, registry)
        report = await reconciler.run([SOURCE], since=time.time() - 600)
    return report, settings, registry


async def test_a_far_future_updated_at_is_taken_as_changed_and_never_kept_as_handled(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    profile = listed("pk-1", FAR_FUTURE)
    report, settings, registry = await _hostile_scan(redis, http, redis_server.url, profile)
    assert (report.enqueued, report.untrusted_dates) == (1, 1)
    await drain(settings, registry)  # its handler reads the same date from HrFlow
    assert await redis.get(KEYS.handled(SOURCE, "pk-1")) is None

    honest = time.time() - 5
    profile["updated_at"] = stamp(honest)  # a real change, later: it must be queued
    report, settings, registry = await _hostile_scan(redis, http, redis_server.url, profile)
    assert (report.enqueued, report.already_handled, report.untrusted_dates) == (1, 0, 0)
    await drain(settings, registry)
    assert await redis.get(KEYS.handled(SOURCE, "pk-1")) == str(int(honest)).encode()
    report, _, _ = await _hostile_scan(redis, http, redis_server.url, profile)
    assert (report.enqueued, report.already_handled) == (0, 1)


async def test_a_kept_mark_ahead_of_the_clock_is_not_trusted_and_is_replaced(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """What an older version kept from a hostile listing heals with the next real change."""
    await redis.set(KEYS.handled(SOURCE, "pk-1"), str(int(timestamp_of(FAR_FUTURE) or 0)))
    honest = time.time() - 5
    profile = listed("pk-1", stamp(honest))
    report, settings, registry = await _hostile_scan(redis, http, redis_server.url, profile)
    assert (report.enqueued, report.already_handled) == (1, 0)
    [queued] = await EventLog(redis, KEYS).search(LogQuery(kind="delivery", limit=1))
    assert queued.type == "profile.storing.update"  # it was handled once
    await drain(settings, registry)
    assert await redis.get(KEYS.handled(SOURCE, "pk-1")) == str(int(honest)).encode()


async def test_a_listing_without_updated_at_is_taken_as_changed(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    handled = str(int(time.time() - 100)).encode()
    await redis.set(KEYS.handled(SOURCE, "pk-1"), handled)
    profile = listed("pk-1", None)
    report, settings, registry = await _hostile_scan(redis, http, redis_server.url, profile)
    assert (report.enqueued, report.already_handled, report.untrusted_dates) == (1, 0, 1)
    await drain(settings, registry)
    assert await redis.get(KEYS.handled(SOURCE, "pk-1")) == handled  # nothing new was learnt


# --- the run's bounds ----------------------------------------------------------------------

# An endless listing stops answering (503) after this many pages: without bounds, a run
# would otherwise never end, and neither would its test.
ENDLESS_MOST_PAGES = 60


@pytest.mark.parametrize(
    ("bounds", "delay_s", "reason"),
    [
        ({"reconcile_max_pages": 3}, 0.0, "page_limit"),
        ({"reconcile_max_enqueued": 250}, 0.0, "enqueue_limit"),
        ({"reconcile_max_duration_s": 1.0}, 0.3, "time_limit"),
    ],
    ids=["pages", "enqueued", "time"],
)
async def test_a_listing_that_never_runs_out_stops_at_a_bound_with_a_report(
    redis: Redis,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    bounds: dict[str, Any],
    delay_s: float,
    reason: str,
) -> None:
    async with HostileListing(endless, delay_s, most_pages=ENDLESS_MOST_PAGES) as hrflow:
        settings = hrflow.settings(redis_server.url, **bounds)
        report = await _hostile_run(redis, hrflow, http, settings)
    assert report.stop_reason == reason
    assert report.stopped is not None
    assert report.stopped.endswith(f"of source {SOURCE}")
    assert len(hrflow.served) < ENDLESS_MOST_PAGES
    assert await redis.zcard(KEYS.queue) == report.enqueued
    if reason == "page_limit":
        assert (report.pages, report.enqueued) == (3, 300)
    if reason == "enqueue_limit":
        assert report.enqueued == 250
    assert await redis.get(KEYS.reconcile_checkpoint(SOURCE)) is None
    [stored] = await EventLog(redis, KEYS).reconcile_runs()
    assert stored == report


async def _hostile_run(
    redis: Redis, hrflow: HostileListing, http: aiohttp.ClientSession, settings: Settings
) -> Any:
    """One run over the last 10 minutes of ``hrflow``'s listing of SOURCE."""
    reconciler = Reconciler(redis, hrflow.client(http), settings, _registry(settings))
    return await reconciler.run([SOURCE], since=time.time() - 600)


async def _script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha")
    )


async def test_a_page_longer_than_asked_is_truncated_and_the_checkpoint_stays(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """One page of 100,000 profiles was one enqueue call that held Redis 3.3 s."""
    huge = fresh_page(100_000)
    async with HostileListing(lambda page, limit: huge) as hrflow:
        settings = hrflow.settings(redis_server.url)
        report = await _hostile_run(redis, hrflow, http, settings)
    assert hrflow.limits == [settings.reconcile_page_size]
    assert (report.scanned, report.enqueued, report.truncated) == (100, 100, 99_900)
    assert report.stop_reason == "truncated"
    assert await redis.get(KEYS.reconcile_checkpoint(SOURCE)) is None


async def test_a_page_is_queued_in_slices_of_a_few_milliseconds_each(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    full = fresh_page(1_000)
    async with HostileListing(lambda page, limit: full) as hrflow:
        settings = hrflow.settings(redis_server.url, reconcile_page_size=1_000)
        before = await _script_calls(redis)
        report = await _hostile_run(redis, hrflow, http, settings)
        calls = await _script_calls(redis) - before
    assert (report.enqueued, report.stop_reason) == (1_000, None)
    assert calls >= 1_000 // ENQUEUE_SLICE  # no call carries more than a slice


async def test_the_scan_waits_while_redis_memory_is_near_the_receivers_mark(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    some = fresh_page(10)
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", str(int(used * 1.5)))  # 67%: over a 50% mark
    try:
        async with HostileListing(lambda page, limit: some) as hrflow:
            settings = hrflow.settings(
                redis_server.url, redis_memory_high_water=0.5, reconcile_max_duration_s=1.0
            )
            report = await _hostile_run(redis, hrflow, http, settings)
    finally:
        await redis.config_set("maxmemory", "0")
    assert (report.stop_reason, report.enqueued, report.scanned) == ("redis_memory", 0, 10)
    assert report.paused_s > 0
    assert await redis.zcard(KEYS.queue) == 0


async def test_the_workers_scheduled_scan_of_an_endless_listing_stops_and_reports(
    redis: Redis, redis_server: RedisServer
) -> None:
    async with HostileListing(endless, most_pages=ENDLESS_MOST_PAGES) as hrflow:
        settings = hrflow.settings(
            redis_server.url, reconcile_sources=SOURCE, reconcile_max_pages=2
        )
        worker = create_worker(settings, _registry(settings), handle_signals=False)
        running = asyncio.create_task(worker.main())
        try:
            runs = await eventually(lambda: EventLog(redis, KEYS).reconcile_runs())
        finally:
            await worker.close()
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    [report] = runs
    assert (report.trigger, report.stop_reason, report.pages) == ("schedule", "page_limit", 2)
    assert len(hrflow.served) == 2
