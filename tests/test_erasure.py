"""Erasure as a personal-data request needs it: after `hrflow-webhooks erase`, no key, no
stream entry and no file in Redis's data folder holds the profile key or its e-mail.

Redis runs with ``rdbcompression no`` so the snapshot and the AOF's base hold strings as
they are (a compressed one could hide the bytes from the grep), RDB snapshots on and the
AOF on, as a deployment that keeps both does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from hrflow_client.errors import BadRequest
from hrflow_webhooks.queue import QueueKeys
from tests.polling import eventually
from tests.redis_server import RedisServer
from tests.service import drain, enqueue, make_settings, parsing_event, update_event
from tests.test_cli import cli
from workers.registry import Registry

ERASED_KEY = "pk-erased-b7e1c2"
EMAIL = "hermione.granger@hogwarts.example"
KEPT_KEY = "pk-kept-3f9a0d"
SOURCE = "sk-1"


@pytest.fixture
async def snapshotting_redis(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, Redis]]:
    server = RedisServer(tmp_path / "redis", None, "--rdbcompression", "no", "--save", "3600 1")
    server.start()
    client = Redis.from_url(server.url)
    try:
        yield server, client
    finally:
        await client.aclose()
        server.stop()


def by_reference(reference: str, event_type: str = "profile.parsing.success") -> dict[str, Any]:
    return {
        "type": event_type,
        "origin": "api",
        "message": "Profile parsed",
        "profile": {"reference": reference, "source": {"key": SOURCE}},
    }


def with_email(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "profile": {**payload["profile"], "reference": EMAIL}}


async def refuse_the_erased_profile(event: Any, ctx: Any) -> None:
    """HrFlow's 400 as it may come: quoting the profile's e-mail."""
    if event["profile"].get("key") != KEPT_KEY:
        raise BadRequest(400, f"Invalid source fields: email {EMAIL} is taken", "PUT /v1/profile")


async def fill(redis: Redis, redis_url: str) -> None:
    """Runs done and dead-lettered, runs still queued, a write fingerprint and a lock: the
    profile named by key (with its e-mail as reference), and by its e-mail alone."""
    settings = make_settings(redis_url, max_tries=1)
    registry = Registry()
    for event_type in ("profile.parsing.success", "profile.parsing.update"):
        registry.add(event_type, refuse_the_erased_profile, name=f"refuse-{event_type}")
    await enqueue(
        settings, redis,
        with_email(parsing_event(ERASED_KEY, SOURCE)), by_reference(EMAIL),
        parsing_event(KEPT_KEY, SOURCE),
    )  # fmt: skip
    await drain(settings, registry)
    await enqueue(
        settings, redis,
        with_email(update_event(ERASED_KEY, SOURCE)),
        by_reference(EMAIL, "profile.parsing.update"), update_event(KEPT_KEY, SOURCE),
    )  # fmt: skip
    keys = QueueKeys(settings.queue_name)
    await redis.set(keys.written("builtin.index", SOURCE, ERASED_KEY), "fingerprint")
    await redis.set(keys.lock("builtin.index", f"sk-target:{EMAIL}"), "token", ex=600)


async def snapshot(redis: Redis) -> None:
    """A snapshot taken while the profile was there, as the `save` rule would take one."""
    before = int((await redis.info("persistence"))["rdb_saves"])
    await redis.bgsave()

    async def saved() -> bool:
        return int((await redis.info("persistence"))["rdb_saves"]) > before

    await eventually(saved, "the snapshot")


async def everything_in_redis(redis: Redis) -> list[bytes]:
    """Every key's name, its DUMP (a stream's deleted entries too), and what it holds."""
    found: list[bytes] = []
    async for key in redis.scan_iter(count=1_000):
        found += [key, await redis.dump(key) or b""]
        kind = (await redis.type(key)).decode()
        if kind == "stream":
            found += [repr(entry).encode() for entry in await redis.xrange(key)]
        elif kind == "hash":
            found.append(repr(await redis.hgetall(key)).encode())  # type: ignore[misc]
        elif kind == "list":
            found.append(repr(await redis.lrange(key, 0, -1)).encode())  # type: ignore[misc]
        elif kind == "zset":
            found.append(repr(await redis.zrange(key, 0, -1)).encode())
        elif kind == "set":
            found.append(repr(await redis.smembers(key)).encode())  # type: ignore[misc]
        elif kind == "string":
            found.append(await redis.get(key) or b"")
    return found


def files_holding(folder: Path, needle: bytes) -> list[str]:
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and needle in path.read_bytes()
    )


async def test_erase_leaves_no_trace_in_any_key_entry_or_file(
    snapshotting_redis: tuple[RedisServer, Redis],
) -> None:
    server, redis = snapshotting_redis
    await fill(redis, server.url)
    await snapshot(redis)
    for needle in (ERASED_KEY, EMAIL):  # the test can see what it looks for
        assert files_holding(server.data_dir, needle.encode())
        assert any(needle.encode() in found for found in await everything_in_redis(redis))

    code, out, err = await cli(
        "erase", "--profile-key", ERASED_KEY, "--reference", EMAIL,
        env={"REDIS_URL": server.url},
    )  # fmt: skip

    assert code == 0, err
    in_redis = await everything_in_redis(redis)
    for needle in (ERASED_KEY, EMAIL):
        assert not [found for found in in_redis if needle.encode() in found], needle
        assert files_holding(server.data_dir, needle.encode()) == [], needle
    assert any(KEPT_KEY.encode() in found for found in in_redis)  # not a flush
    assert files_holding(server.data_dir, KEPT_KEY.encode())
    assert "not reached:" in out


async def test_the_kept_entries_keep_their_ids_and_the_log_its_last_id(
    snapshotting_redis: tuple[RedisServer, Redis],
) -> None:
    server, redis = snapshotting_redis
    await fill(redis, server.url)
    log = QueueKeys("hrflow:queue").log
    before = await redis.xrange(log)
    last_id = (await redis.xinfo_stream(log))["last-generated-id"]
    kept = [(i, f) for i, f in before if f[b"s"].endswith(f"/key:{KEPT_KEY}".encode())]

    code, _, err = await cli(
        "erase", "--profile-key", ERASED_KEY, "--reference", EMAIL,
        env={"REDIS_URL": server.url},
    )  # fmt: skip

    assert code == 0, err
    assert await redis.xrange(log) == kept
    assert (await redis.xinfo_stream(log))["last-generated-id"] == last_id
    assert await redis.ttl(log) == -1


async def test_a_redis_that_refuses_config_and_bgrewriteaof_is_said_in_one_line(
    tmp_path: Path,
) -> None:
    renamed = ("--rename-command", "BGREWRITEAOF", "", "--rename-command", "CONFIG", "")
    server = RedisServer(tmp_path / "managed", None, *renamed)
    server.start()
    redis = Redis.from_url(server.url)
    try:
        await fill(redis, server.url)
        code, out, err = await cli(
            "erase", "--profile-key", ERASED_KEY, "--reference", EMAIL,
            env={"REDIS_URL": server.url},
        )  # fmt: skip
        in_redis = await everything_in_redis(redis)
    finally:
        await redis.aclose()
        server.stop()
    assert (code, err) == (0, "")
    erased, files, not_reached = out.splitlines()
    assert erased.startswith("erased 2 queued job(s), 2 dead letter(s)")
    assert files == (
        "files: Redis refused BGREWRITEAOF (managed Redis?), so the old file may still hold "
        "the erased data; CONFIG refused, so whether RDB snapshots are on is unknown: none written"
    )
    assert not_reached.startswith("not reached: ")
    assert not [found for found in in_redis if EMAIL.encode() in found]
