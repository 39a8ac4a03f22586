"""End to end: signed delivery → uvicorn → Redis → arq worker → registered handler."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import aiohttp
import pytest
from redis.asyncio import Redis

from control.commands import web_argv
from hrflow_webhooks.queue import QueueKeys
from tests.polling import eventually
from tests.processes import ROOT
from tests.redis_server import RedisServer, free_port
from tests.service import (
    METRICS_HEADERS,
    drain,
    make_settings,
    parsing_event,
    receiver,
    recorder,
    signed_body_headers,
    signed_headers,
)
from workers.registry import Registry


async def test_a_signed_delivery_reaches_its_handler_exactly_once(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    registry = Registry()
    seen = recorder(registry, "profile.parsing.success")
    event = parsing_event()
    async with receiver(settings) as server:
        status, body = await server.post(http, event)
    assert status == 202
    assert body["queued"] == 1
    assert body["duplicates"] == 0
    await drain(settings, registry)
    assert [dict(e) for e in seen] == [event]
    assert seen[0].id == body["event_ids"][0]
    assert seen[0].canonical_type == "profile.parsing.success"


async def test_an_array_of_three_events_runs_three_times(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    registry = Registry()
    seen = recorder(registry, "profile.parsing.success")
    events = [parsing_event(f"pk-{i}") for i in range(3)]
    async with receiver(settings) as server:
        status, body = await server.post(http, events)
    assert (status, body["queued"], len(body["event_ids"])) == (202, 3, 3)
    await drain(settings, registry)
    assert sorted(e["profile"]["key"] for e in seen) == ["pk-0", "pk-1", "pk-2"]


async def test_a_duplicate_delivery_is_acknowledged_and_not_run_twice(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    registry = Registry()
    seen = recorder(registry, "profile.parsing.success")
    event = parsing_event()
    async with receiver(settings) as server:
        first = await server.post(http, event)
        # Same event, other key order: the same event id.
        reordered = dict(reversed(list(event.items())))
        second = await server.post(http, reordered)
    assert first[0] == second[0] == 202
    assert (first[1]["queued"], second[1]["queued"], second[1]["duplicates"]) == (1, 0, 1)
    assert first[1]["event_ids"] == second[1]["event_ids"]
    await drain(settings, registry)
    assert len(seen) == 1
    ttl = await redis.ttl(QueueKeys(settings.queue_name).seen(first[1]["event_ids"][0]))
    assert 0 < ttl <= settings.dedup_window_s


async def test_legacy_names_reach_handlers_of_the_current_name(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    registry = Registry()
    seen = recorder(registry, "profile.storing.success")
    async with receiver(settings) as server:
        await server.post(http, parsing_event(type="profile.indexing.success"))
    await drain(settings, registry)
    assert [(e.type, e.canonical_type) for e in seen] == [
        ("profile.indexing.success", "profile.storing.success")
    ]


async def test_unknown_types_are_queued_and_recorded_as_unrouted(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    async with receiver(settings) as server:
        status, body = await server.post(http, {"type": "profile.teleporting.success"})
    assert (status, body["queued"]) == (202, 1)
    await drain(settings, Registry())
    keys = QueueKeys(settings.queue_name)
    assert await redis.hget(keys.unrouted, "profile.teleporting.success") == b"1"  # type: ignore[misc]
    assert await redis.zcard(keys.dead_letters) == 0
    assert await redis.zcard(keys.queue) == 0


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"HTTP-HRFLOW-SIGNATURE": ""}, "empty"),
        ({"HTTP-HRFLOW-SIGNATURE": "garbage"}, "hex"),
        (
            {
                "http-hrflow-signature": signed_headers({"type": "x"}, "wrong")[
                    "HTTP-HRFLOW-SIGNATURE"
                ]
            },
            "does not match",
        ),
    ],
)
async def test_bad_signatures_get_401_with_a_reason_and_queue_nothing(
    redis: Redis,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    reason: str,
) -> None:
    settings = make_settings(redis_server.url)
    async with receiver(settings) as server:
        status, body = await server.post(http, parsing_event(), headers=headers)
    assert status == 401
    assert body["error"] == "invalid_signature"
    assert reason in body["reason"]
    assert await redis.zcard(QueueKeys(settings.queue_name).queue) == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([1, 2], "element 0 is not a JSON object"),
        ({"no": "type"}, "no 'type'"),
        ([], "empty array"),
        ("just a string", "neither"),
        ([parsing_event(), {"type": ""}], "element 1 has no 'type'"),
    ],
)
async def test_signed_but_malformed_payloads_get_400(
    redis: Redis,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    payload: object,
    reason: str,
) -> None:
    settings = make_settings(redis_server.url)
    async with receiver(settings) as server:
        status, body = await server.post(http, payload)
    assert (status, body["error"]) == (400, "bad_payload")
    assert reason in body["reason"]
    assert await redis.zcard(QueueKeys(settings.queue_name).queue) == 0


async def test_oversized_body_and_header_get_413(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url, max_body_bytes=4096)
    big = parsing_event(message="x" * 5000)
    async with receiver(settings) as server:
        status, _ = await server.post(http, big)
        assert status == 413
        headers = {**signed_headers(parsing_event()), "Content-Type": "application/json"}
        async with http.post(f"{server.url}/webhook", data=b"y" * 5000, headers=headers) as r:
            assert r.status == 413
    assert await redis.zcard(QueueKeys(settings.queue_name).queue) == 0


async def test_redis_down_gives_503_and_recovers_by_itself(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url, redis_timeout_s=0.5)
    registry = Registry()
    seen = recorder(registry, "profile.parsing.success")
    async with receiver(settings) as server:
        redis_server.stop()
        try:
            status, body = await server.post(http, parsing_event("while-down"))
            assert (status, body["error"]) == (503, "unavailable")
            async with http.get(f"{server.url}/readyz") as ready:
                assert ready.status == 503
        finally:
            redis_server.start()
        status, body = await server.post(http, parsing_event("while-down"))
        assert (status, body["queued"]) == (202, 1)  # not marked seen by the failed try
        async with http.get(f"{server.url}/readyz") as ready:
            assert ready.status == 200
    await drain(settings, registry)
    assert [e["profile"]["key"] for e in seen] == ["while-down"]


async def test_health_endpoints(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with receiver(make_settings(redis_server.url)) as server:
        async with http.get(f"{server.url}/healthz") as health:
            assert (health.status, await health.json()) == (200, {"status": "ok"})
        async with http.get(f"{server.url}/readyz") as ready:
            assert ready.status == 200


async def test_other_methods_and_paths_still_go_through_starlettes_router(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    # POST /webhook skips Starlette's router (receiver.app.ReceiverApp); nothing else does.
    async with receiver(make_settings(redis_server.url)) as server:
        async with http.get(f"{server.url}/webhook") as get:
            assert get.status == 405
        async with http.post(f"{server.url}/webhook/", allow_redirects=False) as trailing:
            assert trailing.status == 307  # Starlette's redirect to /webhook
        async with http.post(f"{server.url}/nowhere") as nowhere:
            assert nowhere.status == 404
    assert await redis.zcard(QueueKeys("hrflow:queue").queue) == 0


async def test_the_in_flight_gauge_counts_deliveries_waiting_on_redis(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with receiver(make_settings(redis_server.url)) as server:

        async def in_flight() -> float:
            async with http.get(f"{server.url}/metrics", headers=METRICS_HEADERS) as response:
                return metric_value(await response.text(), "hrflow_webhook_requests_in_flight")

        async def held_delivery_counted() -> bool:
            return await in_flight() == 1.0

        # Paused below the receiver's Redis timeout (2 s), and lifted as soon as it is seen.
        await redis.client_pause(1500, all=False)  # WRITE
        try:
            held = asyncio.create_task(server.post(http, parsing_event("held")))
            await eventually(held_delivery_counted, "the held delivery in the gauge")
        finally:
            await redis.client_unpause()
        status, body = await held
        done = await in_flight()
    assert done == 0.0
    assert (status, body["queued"]) == (202, 1)


def metric_value(exposition: str, name: str) -> float:
    [line] = [line for line in exposition.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


async def test_a_callers_request_id_is_echoed_only_when_short_and_printable(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with receiver(make_settings(redis_server.url)) as server:
        answers = []
        for request_id in ("req-42", "x" * 129, "two words"):
            headers = {**signed_headers(parsing_event(request_id[:10])), "x-request-id": request_id}
            async with http.post(f"{server.url}/webhook", json={}, headers=headers) as response:
                assert response.status == 202
                answers.append(response.headers["x-request-id"])
    assert answers[0] == "req-42"
    assert answers[1] != "x" * 129
    assert answers[2] != "two words"
    assert len(answers[1]) == len(answers[2]) == 32  # our own ids instead


async def test_an_event_in_the_header_fits_up_to_the_body_limit_and_is_refused_past_it(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """The payload travels base64-encoded in the signature header (4/3 of its size): the head
    limit leaves room for a payload of HRFLOW_MAX_BODY_BYTES, and no more gets through."""
    settings = make_settings(redis_server.url, max_body_bytes=100_000)
    async with receiver(settings) as server:
        for size, status in ((95_000, 202), (110_000, 413), (200_000, 431)):
            event = parsing_event(f"big-{size}", message="x" * size)
            headers = signed_headers(event)
            async with http.post(f"{server.url}/webhook", data=b"{}", headers=headers) as r:
                assert r.status == status, size
    assert await redis.zcard(QueueKeys(settings.queue_name).queue) == 1


def test_the_receiver_refuses_to_start_without_a_webhook_secret(redis_server: RedisServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRFLOW_")}
    env["REDIS_URL"] = redis_server.url
    port = str(free_port())
    result = subprocess.run(
        web_argv(int(port), "127.0.0.1"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if "HRFLOW_WEBHOOK_SECRET" in line]
    assert json.loads(line)["message"].startswith("HRFLOW_WEBHOOK_SECRET is not set")
    assert "Traceback" not in result.stderr


async def test_deeply_nested_or_oddly_typed_signed_payloads_get_400_with_a_reason_never_5xx(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """orjson reads 1,024 levels and writes 255: every depth gets 202 or a 400 saying why."""
    settings = make_settings(redis_server.url)
    statuses: dict[int, int] = {}
    async with receiver(settings) as server:
        for depth in (*range(248, 260), 300, 1_000, 1_023, 1_024, 1_030):
            event = json.dumps(parsing_event(f"deep-{depth}")).encode()
            data = event[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
            headers = signed_body_headers(data)
            async with http.post(f"{server.url}/webhook", data=data, headers=headers) as r:
                status, body = r.status, await r.json()
            statuses[depth] = status
            assert status in (202, 400), (depth, status, body)
            if status == 400:
                assert "nest" in body["reason"] or "not valid JSON" in body["reason"]
        for event_type in ("x" * 129, "profile.parsing.success\nforged line", "profilé.update"):
            status, body = await server.post(http, {**parsing_event(), "type": event_type})
            assert (status, body["error"]) == (400, "bad_payload")
            assert "printable ASCII" in body["reason"]
    assert statuses[248] == 202
    assert statuses[300] == 400
