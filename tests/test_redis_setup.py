"""The one connect function (hrflow_webhooks.redis_setup) against real redis-server
processes: a connection that reaches a node which is a replica now is dropped, so that the
next attempt finds the primary, whether the answer was READONLY to a write or UNBLOCKED to a
blocked WAIT when the primary was demoted under it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from hrflow_webhooks.redis_setup import (
    ReplicaReachedError,
    connect_redis,
    sentinel_addresses,
    unreachable_reason,
)
from tests.redis_server import RedisServer
from tests.service import make_settings


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    servers = (RedisServer(tmp_path / "a"), RedisServer(tmp_path / "b"))
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.kill()


async def test_a_write_that_meets_a_replica_drops_the_connection(
    two_servers: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = two_servers
    async with Redis.from_url(replica.url) as admin:
        await admin.replicaof("127.0.0.1", str(primary.port))
    redis = connect_redis(make_settings(replica.url))
    try:
        with pytest.raises(ReplicaReachedError) as refused:
            await redis.set("k", "v")
        assert isinstance(refused.value, RedisConnectionError)  # what callers retry on
        assert unreachable_reason(refused.value) == "the node became a replica (failover under way)"
        assert await redis.get("k") is None  # reads still work: a fresh connection
    finally:
        await redis.aclose()


async def test_a_wait_blocked_when_its_primary_is_demoted_drops_the_connection(
    two_servers: tuple[RedisServer, RedisServer],
) -> None:
    """Redis answers a blocked WAIT with UNBLOCKED when its node becomes a replica: the
    connection must go, as with READONLY, or it stays on the demoted node."""
    demoted, new_primary = two_servers
    redis = connect_redis(make_settings(demoted.url))
    try:
        await redis.set("k", "v")
        waiting = asyncio.create_task(redis.execute_command("WAIT", 1, 0))  # type: ignore[no-untyped-call]
        await asyncio.sleep(0.2)  # blocked: the demoted node has no replica
        async with Redis.from_url(demoted.url) as admin:
            await admin.replicaof("127.0.0.1", str(new_primary.port))
        with pytest.raises(ReplicaReachedError):
            await waiting
    finally:
        await redis.aclose()


def test_sentinel_addresses_take_a_default_port() -> None:
    settings = make_settings(
        "redis://x", redis_sentinels="10.0.0.1:26380, sentinel-b ,[::1]:26381",
        redis_sentinel_master="hrflow",
    )  # fmt: skip
    assert sentinel_addresses(settings) == [
        ("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381),
    ]  # fmt: skip


def test_sentinels_without_the_primary_name_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="HRFLOW_REDIS_SENTINEL_MASTER"):
        make_settings("redis://x", redis_sentinels="127.0.0.1:26379")
