"""Durability watched continuously (hrflow_webhooks.durability), with real redis-server
processes of their own: each risk is reported within seconds by a log line, the metric,
``/readyz?strict`` and ``hrflow-webhooks check``.

The receiver under test looks every 0.3 s; the tests poll for the outcome and never assert
how fast it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from control.health import check, health
from hrflow_webhooks.durability import (
    MANAGED_DECLARED,
    NONE_DECLARED,
    DurabilityWatch,
    assess,
)
from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from tests.plugins import behaviour
from tests.polling import eventually
from tests.processes import WorkerProcess
from tests.redis_server import RedisServer
from tests.service import (
    ReceiverServer,
    drain,
    enqueue,
    make_settings,
    parsing_event,
    queued_event_ids,
    recorder,
)
from workers.process import WorkerLoop
from workers.registry import Registry
from workers.settings import create_worker


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


def watched(url: str, **overrides: object) -> Settings:
    return make_settings(url, durability_check_interval_s=0.3, **overrides)


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[ReceiverServer]:
    async with ReceiverServer(settings) as server:
        yield server


async def strict_readiness(http: aiohttp.ClientSession, server: ReceiverServer) -> tuple[int, str]:
    async with http.get(f"{server.url}/readyz?strict") as response:
        body = await response.json()
        return response.status, body.get("reason", "")


def durability_ok() -> float | None:
    return REGISTRY.get_sample_value("hrflow_redis_durability_ok")


def risk_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "hrflow_webhooks.durability" and "risk" in r.__dict__
    ]


EVERYSEC = {"appendfsync": "everysec", "save": ""}
ALWAYS = {"appendfsync": "always", "save": ""}


def test_each_risk_of_the_declared_durability_is_named() -> None:
    fsync = make_settings("redis://x")
    aof_on = {"aof_enabled": 1, "aof_last_write_status": "ok", "maxmemory_policy": "noeviction"}
    assert assess(aof_on, EVERYSEC, fsync) == ([], [])
    (weak,) = assess(aof_on, EVERYSEC, make_settings("redis://x", redis_fsync="always"))[0]
    assert "appendfsync is 'everysec', weaker than 'always'" in weak
    risks, _ = assess({"aof_enabled": 0}, EVERYSEC, fsync)
    assert risks == ["AOF is off (appendonly no): a Redis restart loses every queued event"]
    (unknown,) = assess(aof_on, None, fsync)[0]  # CONFIG refused: fsync cannot be verified
    assert "appendfsync cannot be read" in unknown
    assert "HRFLOW_REDIS_DURABILITY=replicas" in unknown
    (failing,) = assess({**aof_on, "aof_last_write_status": "err"}, ALWAYS, fsync)[0]
    assert "AOF writes are failing" in failing
    (evicting,) = assess({**aof_on, "maxmemory_policy": "allkeys-lru"}, ALWAYS, fsync)[0]
    assert "allkeys-lru" in evicting


def test_replicas_durability_counts_replicas_online_and_caught_up() -> None:
    replicas = make_settings("redis://x", redis_durability="replicas", redis_min_replicas_ack=2)
    online = {"state": "online", "lag": 0, "ip": "10.0.0.2", "port": 6379, "offset": 1}
    info = {"aof_enabled": 1, "maxmemory_policy": "noeviction", "role": "master"}
    both = {**info, "slave0": online, "slave1": {**online, "lag": 1}}
    assert assess(both, EVERYSEC, replicas) == ([], [])
    lagging = {**info, "slave0": online, "slave1": {**online, "lag": 30}}
    (short,) = assess(lagging, EVERYSEC, replicas)[0]
    assert short.startswith("1 replica(s) online and caught up, of the 2")
    syncing = {**info, "slave0": {**online, "state": "wait_bgsave"}}
    (none_online,) = assess(syncing, EVERYSEC, replicas)[0]
    assert none_online.startswith("0 replica(s)")
    (replica,) = assess({**info, "role": "slave"}, EVERYSEC, replicas)[0]
    assert "is a replica" in replica
    _, (note,) = assess(both, None, replicas)  # CONFIG refused: said, not relied on
    assert "persistence cannot be read" in note
    assert "not relied on" in note


def test_replicas_durability_needs_a_primary_that_keeps_something_on_disk() -> None:
    """A primary with nothing on disk that restarts before a failover comes back empty, and
    its replicas copy the emptiness: AOF (everysec is enough) or an RDB save rule."""
    replicas = make_settings("redis://x", redis_durability="replicas", redis_min_replicas_ack=1)
    online = {"state": "online", "lag": 0}
    info = {"maxmemory_policy": "noeviction", "role": "master", "slave0": online}
    (forgetful,) = assess({**info, "aof_enabled": 0}, {"save": ""}, replicas)[0]
    assert "keeps nothing on disk" in forgetful
    assert assess({**info, "aof_enabled": 0}, {"save": "3600 1"}, replicas) == ([], [])
    assert assess({**info, "aof_enabled": 1}, EVERYSEC, replicas) == ([], [])


def test_none_durability_has_no_risk_and_says_so() -> None:
    for settings in (
        make_settings("redis://x", redis_durability="none"),
        make_settings("redis://x", redis_fsync="none"),  # the older spelling
    ):
        assert assess({"aof_enabled": 0, "maxmemory_policy": "allkeys-lru"}, None, settings) == (
            [],
            [NONE_DECLARED],
        )


def test_managed_durability_relies_on_the_provider_and_says_so() -> None:
    managed = make_settings("redis://x", redis_durability="managed")
    info = {"aof_enabled": 0, "maxmemory_policy": "noeviction"}
    assert assess(info, None, managed) == ([], [MANAGED_DECLARED])
    (evicting,), _ = assess({**info, "maxmemory_policy": "volatile-lru"}, None, managed)
    assert "volatile-lru" in evicting


async def test_a_redis_refusing_wait_fails_every_delivery_and_says_why(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A provider whose command list has no WAIT cannot honour replica acknowledgement: the
    delivery gets 503 (never a 202 that WAIT did not back), and check says why."""
    server_redis = RedisServer(tmp_path / "no-wait", None, "--rename-command", "WAIT", "")
    server_redis.start()
    settings = watched(server_redis.url, redis_durability="managed", redis_min_replicas_ack=1)
    try:
        async with serving(settings) as server:
            status, body = await server.post(http, parsing_event("pk-no-wait"))
            assert status == 503, body
            status, body = await server.post(http, parsing_event("pk-no-wait"))
            assert status == 503, body  # the connection stayed in step: the same answer
        found = await health(settings, 300)
    finally:
        server_redis.kill()
    assert any("refuses WAIT" in p for p in found.problems), found


def test_replicas_durability_without_a_replica_count_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="HRFLOW_REDIS_MIN_REPLICAS_ACK"):
        make_settings("redis://x", redis_durability="replicas")


async def test_aof_switched_off_at_run_time_is_reported_by_log_metric_readyz_and_check(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    settings = watched(own_redis.url)
    async with serving(settings) as server:
        assert await strict_readiness(http, server) == (200, "")
        assert not [p for p in await check(settings, 300) if "AOF" in p]
        async with Redis.from_url(own_redis.url) as redis:
            await redis.config_set("appendonly", "no")
        with caplog.at_level(logging.INFO, logger="hrflow_webhooks.durability"):

            async def reported() -> bool:
                return (await strict_readiness(http, server))[0] == 503

            await eventually(reported, timeout_s=30)
            _, reason = await strict_readiness(http, server)
            assert "AOF is off" in reason
            async with http.get(f"{server.url}/readyz") as plain:
                assert plain.status == 200  # still taking deliveries: only the strict probe fails
            assert durability_ok() == 0
            assert any("AOF is off" in p for p in await check(settings, 300))
            async with Redis.from_url(own_redis.url) as redis:
                await redis.config_set("appendonly", "yes")

            async def cleared() -> bool:
                return (await strict_readiness(http, server))[0] == 200

            await eventually(cleared, timeout_s=30)
    risks = [(r.levelname, r.message, r.risk) for r in risk_lines(caplog)]  # type: ignore[attr-defined]
    assert ("ERROR", "redis durability at risk", risks[0][2]) in risks
    assert "AOF is off" in risks[0][2]
    assert any(level == "INFO" and "cleared" in message for level, message, _ in risks)


async def test_a_redis_restarted_without_its_data_is_reported_with_the_events_at_risk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    """Redis comes back empty (no persistence): the queue is gone, and the service says so."""
    first = RedisServer(tmp_path / "before")
    first.start()
    settings = watched(first.url)
    async with serving(settings) as server:
        async with Redis.from_url(first.url) as redis:
            await enqueue(settings, redis, *(parsing_event(f"lost-{n}") for n in range(7)))
            assert len(await queued_event_ids(redis)) == 7

        async def seen_queue() -> bool:
            state = _watch_of(server).state
            return state is not None and state.queued == 7

        await eventually(seen_queue, timeout_s=30)
        first.kill()
        empty = RedisServer(tmp_path / "after", first.port, "--appendonly", "no")
        empty.start()
        try:
            with caplog.at_level(logging.ERROR, logger="hrflow_webhooks.durability"):

                async def reported() -> bool:
                    return any(r.message.startswith("redis lost its data") for r in caplog.records)

                await eventually(reported, timeout_s=30)
            (lost,) = [r for r in caplog.records if r.message.startswith("redis lost its data")]
            assert lost.events_at_risk >= 7  # type: ignore[attr-defined]
            status, reason = await strict_readiness(http, server)
            assert status == 503
            assert "AOF is off" in reason or "lost its data" in reason
            problems = await check(settings, 300)
            assert any("up to 7 acknowledged events may be gone" in p for p in problems)
            assert REGISTRY.get_sample_value("hrflow_redis_data_loss_detected_total") >= 1  # type: ignore[operator]
        finally:
            empty.kill()


def _watch_of(server: ReceiverServer) -> DurabilityWatch:
    app = server.server.config.loaded_app
    while not hasattr(app, "state"):  # uvicorn wraps the app in its middlewares
        app = app.app
    watch: DurabilityWatch = app.state.receiver.durability
    return watch


async def deliver_until_refused(
    http: aiohttp.ClientSession, server: ReceiverServer, start: int, most: int
) -> tuple[list[str], int]:
    """Deliveries until the receiver answers 503; the keys it acknowledged, and the next n."""
    acknowledged: list[str] = []
    for n in range(start, start + most):
        status, _ = await server.post(http, parsing_event(f"fill-{n}", message="x" * 200))
        if status == 503:
            return acknowledged, n + 1
        assert status == 202, status
        acknowledged.append(f"fill-{n}")
    raise AssertionError(f"no 503 after {most} deliveries")


async def test_at_the_memory_mark_deliveries_get_503_workers_drain_and_deliveries_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    """Fill Redis to the high-water mark under load → 503s → a worker drains the queue to
    empty → the receiver accepts again; every acknowledged event was handled."""
    # Room above the mark for the watch's lag (one interval of deliveries) and for what a
    # draining worker holds in Redis meanwhile: claimed runs, markers, and the replies it
    # reads, which Redis counts as used memory (about 0.7 MB here at 100 jobs at once).
    server_redis = RedisServer(tmp_path / "small", None, "--maxmemory", "6mb")
    server_redis.start()
    settings = watched(server_redis.url, redis_memory_high_water=0.5)
    registry = Registry()
    handled = recorder(registry, "profile.parsing.success")
    try:
        async with serving(settings) as server:
            with caplog.at_level(logging.ERROR, logger="hrflow_webhooks.durability"):
                acknowledged, n = await deliver_until_refused(http, server, 0, 20_000)

                async def watched_over_the_mark() -> bool:
                    # The first 503 may be Redis's own refusal, just before the watch looks.
                    return _watch_of(server).refusing_writes

                await eventually(watched_over_the_mark, timeout_s=30)
            async with http.get(f"{server.url}/readyz") as ready:
                assert ready.status == 503
                assert "high-water mark" in (await ready.json())["reason"]
            assert durability_ok() == 0
            assert any("high-water mark" in p for p in await check(settings, 300))
            assert any("high-water mark" in r.risk for r in risk_lines(caplog))  # type: ignore[attr-defined]
            assert len(acknowledged) > 500
            await drain(settings, registry)
            async with Redis.from_url(server_redis.url) as redis:
                assert await queued_event_ids(redis) == []

            async def accepting() -> bool:
                status, _ = await server.post(http, parsing_event(f"after-{n}"))
                return status == 202

            await eventually(accepting, timeout_s=30)
        assert {event.payload["profile"]["key"] for event in handled} >= set(acknowledged)
    finally:
        server_redis.kill()


@pytest.mark.parametrize("memory_command", ["allowed", "denied"])
async def test_over_the_memory_mark_the_event_log_gives_way_to_events(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    http: aiohttp.ClientSession,
    memory_command: str,
) -> None:
    """A Redis filled by the event log, not by events (one event queued, the log holding
    its 20,000 repeated deliveries): the watch drops the log's oldest entries until Redis
    is under its mark, and the receiver accepts again, without a worker or an operator.
    Also where the service's Redis user may not run MEMORY (an ACL, as managed Redis has)."""
    server_redis = RedisServer(tmp_path / "small", None, "--maxmemory", "8mb")
    server_redis.start()
    url = server_redis.url
    if memory_command == "denied":
        async with Redis.from_url(url) as admin:
            rules = ("on", ">secret-pw", "~*", "&*", "+@all", "-memory")
            await admin.execute_command("ACL", "SETUSER", "service", *rules)
        url = url.replace("redis://", "redis://service:secret-pw@")
    settings = watched(url, redis_memory_high_water=0.5)
    event, after = (Event.from_payload(parsing_event(key)) for key in ("repeated", "after"))
    log = QueueKeys(settings.queue_name).log
    try:
        async with Redis.from_url(server_redis.url) as redis:
            async with EventQueue(redis, settings.queue_name, 3_600) as queue:
                for _ in range(40):
                    await queue.enqueue_events([event] * 500)
            filled = await redis.xlen(log)
            assert int((await redis.info("memory"))["used_memory"]) > 4 * 2**20  # the mark
            assert await queued_event_ids(redis) == [event.id]
            with caplog.at_level(logging.WARNING, logger="hrflow_webhooks.durability"):
                async with serving(settings) as server:

                    async def accepting() -> bool:
                        status, _ = await server.post(http, parsing_event("after"))
                        return status == 202

                    await eventually(accepting, timeout_s=30)
            kept = await redis.xlen(log)
            assert 0 < kept < filled  # the oldest went; the newest stay
            [(_, newest)] = await redis.xrevrange(log, count=1)
            assert newest[b"e"].decode() == after.id
            assert await queued_event_ids(redis) == [event.id, after.id]
        sheds = [r for r in caplog.records if r.getMessage() == "event log shed"]
        dropped = sum(r.entries_dropped for r in sheds)  # type: ignore[attr-defined]
        assert sheds
        assert dropped == filled + 1 - kept
    finally:
        server_redis.kill()


async def test_over_the_memory_mark_from_elsewhere_the_event_log_keeps_its_entries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    """Redis over its mark because of something else (ballast here; a backlog, another
    application's keys): emptying the log would not bring it under, so the log keeps its
    entries, which are what an operator reads during the incident, and the watch says why
    once. With the ballast gone the receiver accepts again."""
    server_redis = RedisServer(tmp_path / "small", None, "--maxmemory", "8mb")
    server_redis.start()
    settings = watched(server_redis.url, redis_memory_high_water=0.5)
    log = QueueKeys(settings.queue_name).log
    try:
        async with Redis.from_url(server_redis.url) as redis:
            async with EventQueue(redis, settings.queue_name, 3_600) as queue:
                event = Event.from_payload(parsing_event("repeated"))
                for _ in range(4):
                    await queue.enqueue_events([event] * 500)
            filled = await redis.xlen(log)
            for n in range(8):
                await redis.set(f"ballast:{n}", b"x" * 500_000)
            with caplog.at_level(logging.WARNING, logger="hrflow_webhooks.durability"):
                async with serving(settings) as server:

                    async def refusing() -> bool:
                        status, _ = await server.post(http, parsing_event("refused"))
                        return status == 503

                    await eventually(refusing, timeout_s=30)
                    await asyncio.sleep(3 * settings.durability_check_interval_s)  # looks
                    assert await redis.xlen(log) == filled  # nothing shed in vain
                    await redis.delete(*(f"ballast:{n}" for n in range(8)))

                    async def accepting() -> bool:
                        status, _ = await server.post(http, parsing_event("after"))
                        return status == 202

                    await eventually(accepting, timeout_s=30)
        assert not [r for r in caplog.records if r.getMessage() == "event log shed"]
        (said,) = [r for r in caplog.records if r.getMessage() == "event log not shed"]
        assert said.reason == "redis is over its memory mark, but not because of the event log"  # type: ignore[attr-defined]
    finally:
        server_redis.kill()


async def fill_past_maxmemory(redis: Redis) -> None:
    """Ballast, then maxmemory set below what Redis uses: every write that grows it is refused."""
    for n in range(4):
        await redis.set(f"ballast:{n}", b"x" * 500_000)
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used - 200_000)
    with pytest.raises(OutOfMemoryError):
        await redis.set("one-more", "x")


async def test_a_worker_meeting_an_out_of_memory_redis_keeps_running_and_drains_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its heartbeat refused (OOM), the worker used to end and restart in a loop."""
    server_redis = RedisServer(tmp_path / "full")
    server_redis.start()
    settings = watched(server_redis.url, health_check_interval_s=1)
    registry = Registry()
    handled = recorder(registry, "profile.parsing.success")
    loop = WorkerLoop(settings, lambda: create_worker(settings, registry, handle_signals=False))
    running: asyncio.Task[None] | None = None
    try:
        async with Redis.from_url(server_redis.url) as redis:
            await enqueue(settings, redis, *(parsing_event(f"oom-{n}") for n in range(5)))
            await fill_past_maxmemory(redis)
            with caplog.at_level(logging.WARNING, logger="workers"):
                running = asyncio.create_task(loop.run())

                async def heartbeat_refused() -> bool:
                    return any("out of memory" in r.message for r in caplog.records)

                await eventually(heartbeat_refused, timeout_s=30)
                await redis.delete(*await redis.keys("ballast:*"))  # room again

                async def drained() -> bool:
                    return len(handled) == 5

                await eventually(drained, timeout_s=30)
            assert loop.restarts == 0
    finally:
        loop.stop()
        if running is not None:
            await running
        server_redis.kill()


async def test_check_reports_a_full_redis_as_full_not_as_unreachable(tmp_path: Path) -> None:
    """Its reads come first: at maxmemory the writes are refused, the findings still stand."""
    server_redis = RedisServer(tmp_path / "full-check")
    server_redis.start()
    settings = make_settings(server_redis.url)
    try:
        async with Redis.from_url(server_redis.url) as redis:
            await fill_past_maxmemory(redis)
        problems = await check(settings, 300)
        assert any("high-water mark" in p for p in problems), problems
        assert not any("unreachable" in p for p in problems), problems
    finally:
        server_redis.kill()


# --- a Redis as managed providers serve it: CONFIG refused, AOF every second, replicas -------


@pytest.fixture
def managed_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and a replica that refuse CONFIG and write their AOF every second."""
    managed = ("--rename-command", "CONFIG", "", "--appendfsync", "everysec")
    primary = RedisServer(tmp_path / "managed", None, *managed)
    primary.start()
    following = ("--replicaof", "127.0.0.1", str(primary.port))
    replica = RedisServer(tmp_path / "managed-replica", None, *managed, *following)
    replica.start()
    yield primary, replica
    replica.kill()
    primary.kill()


async def replica_online(redis: Redis) -> bool:
    info = await redis.info("replication")
    return bool(info.get("slave0", {}).get("state") == "online")


async def test_a_redis_refusing_config_runs_and_says_once_what_it_cannot_check(
    managed_redis: tuple[RedisServer, RedisServer],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under ``fsync`` durability (the default) ``check`` once said ``ok`` here without
    knowing ``appendfsync``: now it says it cannot verify it. Under ``replicas`` the service
    runs (receiver, worker, check), and says once, as a note, what it cannot check; under
    ``none`` it says what was chosen. No ERROR line from the looks every 0.3 s."""
    primary, _ = managed_redis
    async with Redis.from_url(primary.url) as redis:
        await eventually(lambda: replica_online(redis), "the replica online")
    fsync = await health(watched(primary.url), 300)
    assert any("appendfsync cannot be read" in p for p in fsync.problems), fsync

    replicas = watched(primary.url, redis_durability="replicas", redis_min_replicas_ack=1)
    worker = WorkerProcess(
        primary.url, tmp_path / "worker.log", redis_durability="replicas", redis_min_replicas_ack=1
    )
    try:
        with caplog.at_level(logging.INFO, logger="hrflow_webhooks.durability"):
            async with serving(replicas) as server:
                status, body = await server.post(http, parsing_event("pk-managed"))
                assert status == 202, body
                assert await strict_readiness(http, server) == (200, "")
                async with Redis.from_url(primary.url) as redis:

                    async def handled() -> bool:
                        done = await redis.lrange(behaviour.EFFECTS_KEY, 0, -1)
                        return body["event_ids"][0].encode() in done

                    await eventually(handled, "the worker's run")
                await asyncio.sleep(1.5)  # five more looks
        report = await health(replicas, 300)
    finally:
        worker.close()
    assert report.problems == []
    [note] = report.notes
    assert "persistence cannot be read" in note
    assert "not relied on" in note
    durability_lines = [r for r in caplog.records if r.name == "hrflow_webhooks.durability"]
    assert [r for r in durability_lines if r.levelno >= logging.ERROR] == []
    assert [getattr(r, "note", None) for r in durability_lines if r.levelno == logging.WARNING] == [
        note
    ]  # said once
    worker_lines = (tmp_path / "worker.log").read_text().splitlines()
    assert not [line for line in worker_lines if '"level":"error"' in line]

    none = await health(watched(primary.url, redis_durability="none"), 300)
    assert none.notes == [NONE_DECLARED]
    assert not [p for p in none.problems if "appendfsync" in p]
