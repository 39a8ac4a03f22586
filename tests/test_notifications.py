"""Id-less notifications take effect: *latest* events are never dropped after a run, waiting
ones merge, runs of one subject never overlap, a profile not readable yet is waited for, and
the built-in handlers follow what HrFlow actually sends (both families, per source).

Real Redis, the receiver under uvicorn, arq workers and the sandbox HrFlow API on loopback;
every delivery is signed the way HrFlow signs it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from hrflow_webhooks.errors import PermanentError, SubjectNotReadableError, TransientError
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from sandbox import HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY
from tests.plugins import subjects
from tests.polling import eventually
from tests.processes import WorkerProcess
from tests.redis_server import RedisServer, free_port
from tests.sandbox_fixtures import SandboxServer
from tests.service import (
    answers,
    drain,
    enqueue,
    make_settings,
    parsing_event,
    receiver,
    run_leftovers,
    update_event,
)
from workers.context import HandlerContext
from workers.dead_letters import DeadLetters
from workers.handlers import edit, index
from workers.handlers.common import skips_key, subject_not_found
from workers.registry import Registry

TARGET = "target-source"
TAGS = "reviewed=yes"


def _builtin_registry(settings: Settings) -> Registry:
    registry = Registry()
    edit.register(registry, settings)  # edit first: the copy then carries the tags
    index.register(registry, settings)
    return registry


def _origin(sandbox: SandboxServer, key: str = HARRY_POTTER_KEY) -> dict[str, Any]:
    profile = sandbox.state.profiles.get(SAMPLE_SOURCE_KEY, key)
    assert profile is not None
    return profile


def _copies(sandbox: SandboxServer) -> list[dict[str, Any]]:
    return [p for p in sandbox.state.profiles.all() if p["source"]["key"] == TARGET]


def _set_summary(sandbox: SandboxServer, summary: str) -> None:
    profile = _origin(sandbox)
    sandbox.state.profiles.edit(profile, {"info": {**profile["info"], "summary": summary}})


def _origin_reads(sandbox: SandboxServer) -> int:
    return sum(
        1
        for call in sandbox.state.calls_to("GET")
        if call["query"].get("source_key") == SAMPLE_SOURCE_KEY
    )


async def _writes(sandbox: SandboxServer) -> list[tuple[str, str]]:
    return [
        (c["method"], (c.get("body") or {}).get("source_key", ""))
        for c in sandbox.state.calls
        if c["method"] in ("POST", "PUT")
    ]


# --- latest events are never dropped after a run ------------------------------------------------


async def test_three_changes_announced_by_identical_updates_all_reach_the_copy_in_order(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET)
    registry = _builtin_registry(settings)
    update = update_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY)
    seen = []
    async with receiver(settings) as server:
        for summary in ("first change", "second change", "third change"):
            _set_summary(sandbox, summary)
            status, body = await server.post(http, update)  # byte-identical every time
            assert (status, body["queued"], body["duplicates"]) == (202, 1, 0), body
            await drain(settings, registry)
            (copy,) = _copies(sandbox)
            seen.append(copy["info"]["summary"])
    assert seen == ["first change", "second change", "third change"]
    assert await run_leftovers(redis) == []


async def test_ten_identical_waiting_updates_cost_one_fetch(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET)
    update = update_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY)
    async with receiver(settings) as server:
        answers = [await server.post(http, update) for _ in range(10)]
    assert [(a[1]["queued"], a[1]["coalesced"]) for a in answers] == [(1, 0)] + [(0, 1)] * 9
    await drain(settings, _builtin_registry(settings))
    assert _origin_reads(sandbox) == 1
    assert len(_copies(sandbox)) == 1


async def test_a_delivery_while_its_run_runs_gets_exactly_one_follow_up(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    registry = Registry()
    started, release = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    @registry.on("profile.parsing.update")
    async def slow(event: Event, ctx: HandlerContext) -> None:
        runs.append(ctx.services.keys.queue)
        started.set()
        await release.wait()

    update = update_event("busy")
    async with receiver(settings) as server:
        assert (await server.post(http, update))[1]["queued"] == 1
        draining = asyncio.create_task(drain(settings, registry))
        await asyncio.wait_for(started.wait(), 30)
        answers = [(await server.post(http, update))[1] for _ in range(3)]
        release.set()
        await draining
    # The first one while running queued a follow-up (its job id is its own, so finishing
    # the running run cannot delete it); the next two merged into that follow-up.
    assert [(a["queued"], a["coalesced"]) for a in answers] == [(1, 0), (0, 1), (0, 1)]
    assert len(runs) == 2
    assert await run_leftovers(redis) == []


async def test_a_dead_letter_never_makes_a_later_identical_event_skip_its_handler(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url, max_tries=3)
    registry = Registry()
    effects: list[int] = []

    @registry.on("profile.parsing.update")
    async def flaky(event: Event, ctx: HandlerContext) -> None:
        mode = await ctx.redis.lpop("test:modes")  # type: ignore[misc]
        if mode == b"permanent":
            raise PermanentError("injected permanent failure")
        if mode == b"transient":
            raise TransientError("injected transient failure")
        effects.append(ctx.job_try)

    await redis.rpush("test:modes", "permanent")  # type: ignore[misc]
    await enqueue(settings, redis, update_event("flaky"))
    await drain(settings, registry)
    letters = DeadLetters(redis, QueueKeys(settings.queue_name))
    assert await letters.count() == 1
    assert effects == []
    assert await run_leftovers(redis) == []  # no marker outlives its run

    await redis.rpush("test:modes", "transient")  # type: ignore[misc]
    await enqueue(settings, redis, update_event("flaky"))  # the same notification, later
    await drain(settings, registry)
    assert effects == [2]  # its retry ran the handler: no leftover marker skipped it
    (letter_id,) = await letters.ids()
    assert await letters.replay(letter_id)
    await drain(settings, registry)
    assert effects == [2, 1]
    assert await letters.count() == 0
    assert await run_leftovers(redis) == []


# --- per-subject order --------------------------------------------------------------------------


async def test_two_workers_never_overlap_runs_of_one_profile_and_every_change_lands(
    redis: Redis, redis_server: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    ports = [free_port(), free_port()]
    workers = [
        WorkerProcess(
            redis_server.url,
            tmp_path / f"w{i}.log",
            handlers="tests.plugins.subjects",
            worker_metrics_port=port,
        )
        for i, port in enumerate(ports)
    ]
    hot, others = "hot-profile", [f"other-{n}" for n in range(50)]

    async def both_workers_started() -> bool:
        # A worker serves its metrics at the end of its start-up, just before it polls.
        return all([await answers(http, f"http://127.0.0.1:{port}/metrics") for port in ports])

    try:
        await eventually(both_workers_started)
        async with receiver(settings) as server:
            for n, other in enumerate(others, start=1):
                await redis.set(subjects.state_key(hot), n)
                assert (await server.post(http, update_event(hot)))[0] == 202
                await redis.set(subjects.state_key(other), n)
                assert (await server.post(http, update_event(other)))[0] == 202
                await asyncio.sleep(0.01)  # deliveries keep arriving while runs run
            await eventually(lambda: _drained(redis, settings))
    finally:
        for worker in workers:
            worker.close()
    assert await subjects.overlaps(redis) == 0
    assert await subjects.last_seen(redis, hot) == 50  # the last change was read
    for n, other in enumerate(others, start=1):
        assert await subjects.last_seen(redis, other) == n
    hot_runs = await subjects.runs(redis, hot)
    assert 2 <= hot_runs <= 50  # merged while waiting, never below "one run after each start"
    assert await subjects.workers_seen(redis) == 2  # both workers took part


async def _drained(redis: Redis, settings: Settings) -> bool:
    return not await redis.zcard(settings.queue_name) and not await run_leftovers(redis)


# --- not readable yet, or gone ------------------------------------------------------------------


async def test_a_profile_not_readable_yet_is_indexed_once_it_appears(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET, not_found_grace_s=60)
    harry = _origin(sandbox)
    sandbox.state.profiles.clear()  # parsed, not indexed yet: HrFlow answers 404 for a while

    async def index_later() -> None:
        await asyncio.sleep(1.5)
        body = {k: v for k, v in harry.items() if k not in ("id", "source", "archive")}
        sandbox.state.profiles.add(SAMPLE_SOURCE_KEY, body, key=HARRY_POTTER_KEY)

    async with receiver(settings) as server:
        assert (await server.post(http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY)))[0]
    await asyncio.gather(index_later(), drain(settings, _builtin_registry(settings)))
    assert len(_copies(sandbox)) == 1
    statuses = [c["status"] for c in sandbox.state.calls_to("GET") if "reference" not in c["query"]]
    assert statuses.count(404) >= 1
    assert statuses[-1] == 200
    assert await DeadLetters(redis, QueueKeys(settings.queue_name)).count() == 0


async def test_a_profile_that_never_appears_is_one_skip_not_a_dead_letter_per_handler(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(
        redis_server.url, index_source_key=TARGET, edit_tags=TAGS, not_found_grace_s=1
    )
    async with receiver(settings) as server:
        await server.post(http, parsing_event("never-indexed", SAMPLE_SOURCE_KEY))
    await drain(settings, _builtin_registry(settings))
    assert await DeadLetters(redis, QueueKeys(settings.queue_name)).count() == 0
    skips = await redis.hgetall(skips_key(settings))  # type: ignore[misc]
    assert skips == {b"profile.parsing.success:profile not found": b"1"}
    assert await run_leftovers(redis) == []


async def test_waiting_for_a_subject_never_runs_a_done_handler_again(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url, not_found_grace_s=60)
    registry = Registry()
    runs: dict[str, int] = {"steady": 0, "fetching": 0}

    @registry.on("profile.parsing.success", name="steady")
    async def steady(event: Event) -> None:
        runs["steady"] += 1

    @registry.on("profile.parsing.success", name="fetching")
    async def fetching(event: Event, ctx: HandlerContext) -> None:
        runs["fetching"] += 1
        if runs["fetching"] <= 3:  # not indexed yet, three times
            raise subject_not_found(ctx)

    await enqueue(settings, redis, parsing_event("slow-to-index"))
    await drain(settings, registry)
    assert runs == {"steady": 1, "fetching": 4}
    assert await DeadLetters(redis, QueueKeys(settings.queue_name)).count() == 0


async def test_a_subject_still_unreadable_after_the_grace_period_uses_up_tries(
    redis: Redis, redis_server: RedisServer
) -> None:
    """A plugin that keeps raising "not readable yet" cannot hold its subject forever."""
    settings = make_settings(redis_server.url, not_found_grace_s=0.5, max_tries=3)
    registry = Registry()

    @registry.on("profile.parsing.success")
    async def never_readable(event: Event) -> None:
        raise SubjectNotReadableError("plugin says: not yet")

    await enqueue(settings, redis, parsing_event("never"))
    await drain(settings, registry)
    (letter,) = [
        letter async for letter in DeadLetters(redis, QueueKeys(settings.queue_name)).iter()
    ]
    assert letter["reason"] == "still failing after 3 tries"
    assert await run_leftovers(redis) == []


# --- what HrFlow actually sends ------------------------------------------------------------------


async def test_a_workspace_sending_only_storing_events_is_indexed_and_edited(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET, edit_tags=TAGS)
    storing = {
        **parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY),
        "type": "profile.storing.success",
    }
    async with receiver(settings) as server:
        assert (await server.post(http, storing))[0] == 202
    await drain(settings, _builtin_registry(settings))
    assert {"name": "reviewed", "value": "yes"} in _origin(sandbox)["tags"]
    (copy,) = _copies(sandbox)
    assert {"name": "reviewed", "value": "yes"} in copy["tags"]

    _set_summary(sandbox, "changed in HrFlow")
    async with receiver(settings) as server:
        update = update_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY, family="storing")
        assert (await server.post(http, update))[0] == 202
    await drain(settings, _builtin_registry(settings))
    assert _copies(sandbox)[0]["info"]["summary"] == "changed in HrFlow"


async def test_both_families_announcing_one_profile_write_it_once(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET, edit_tags=TAGS)
    parsed = parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY)
    async with receiver(settings) as server:
        for family in ("parsing", "storing"):
            assert (await server.post(http, {**parsed, "type": f"profile.{family}.success"}))[0]
    await drain(settings, _builtin_registry(settings))
    assert await _writes(sandbox) == [("PUT", SAMPLE_SOURCE_KEY), ("POST", TARGET)]
    skips = await redis.hgetall(skips_key(settings))  # type: ignore[misc]
    # The second run found the profile and its copy as it would write them: no write.
    assert {name.split(b":")[0]: int(n) for name, n in skips.items()} == {
        b"builtin.edit": 1,
        b"builtin.index": 1,
    }


async def test_handlers_pick_sources_and_other_sources_are_neither_failures_nor_unrouted(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(
        redis_server.url, index_source_key=TARGET, index_from_sources="elsewhere"
    )
    async with receiver(settings) as server:
        assert (await server.post(http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY)))[0]
    await drain(settings, _builtin_registry(settings))
    assert _copies(sandbox) == []
    assert sandbox.state.calls == []
    keys = QueueKeys(settings.queue_name)
    assert await redis.hgetall(keys.unrouted) == {}  # type: ignore[misc]
    assert await DeadLetters(redis, keys).count() == 0

    registry = Registry()
    picked: list[str | None] = []

    @registry.on("profile.parsing.update", sources=["wanted"])
    async def only_wanted(event: Event) -> None:
        picked.append(event.source_key)

    plain = make_settings(redis_server.url)
    async with receiver(plain) as server:
        for source in ("wanted", "unwanted"):
            await server.post(http, update_event("pk", source))
    await drain(plain, registry)
    assert picked == ["wanted"]
