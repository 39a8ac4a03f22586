"""The sandbox speaks HrFlow's dialect: the official SDK works against it, and its faults,
recording, control endpoints, webhook and command line do what they say."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import aiohttp
import requests
from hrflow import Hrflow
from redis.asyncio import Redis

from hrflow_webhooks.queue import QueueKeys
from sandbox import DEFAULT_API_KEY, DEFAULT_API_USER, HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY
from tests.polling import eventually, eventually_sync
from tests.redis_server import RedisServer, free_port
from tests.sandbox_fixtures import SandboxServer
from tests.service import WEBHOOK_SECRET, make_settings, receiver


def _sdk(sandbox: SandboxServer, api_secret: str = DEFAULT_API_KEY) -> Any:
    # The SDK joins api_url and "profile/indexing" as strings: the trailing slash matters.
    return Hrflow(api_url=f"{sandbox.api_url}/", api_secret=api_secret, api_user=DEFAULT_API_USER)


async def test_the_official_sdk_reads_profiles_and_parsings(sandbox: SandboxServer) -> None:
    sdk = _sdk(sandbox)
    by_key = await asyncio.to_thread(sdk.profile.storing.get, SAMPLE_SOURCE_KEY, HARRY_POTTER_KEY)
    by_reference = await asyncio.to_thread(
        sdk.profile.storing.get, SAMPLE_SOURCE_KEY, reference="harry-potter"
    )
    parsing = await asyncio.to_thread(
        sdk.profile.parsing.get, SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY
    )
    assert (by_key["code"], by_key["message"]) == (200, "Profile details")
    assert by_key["data"]["key"] == by_reference["data"]["key"] == HARRY_POTTER_KEY
    assert by_key["data"]["experiences"][0]["date_start"] == "2016-01-01T00:00:00"
    assert parsing["code"] == 200
    assert parsing["data"]["parsing"]["info"]["full_name"] == "Harry Potter"


async def test_the_official_sdk_adds_and_edits_profiles(sandbox: SandboxServer) -> None:
    sdk = _sdk(sandbox)
    written = {
        "reference": "sdk-1",
        "info": {"full_name": "Ada Lovelace", "summary": "Analyst"},
        "experiences": [
            {"title": "Analyst", "date_start": {"iso8601": "1842-01-01T00:00:00"}, "date_end": None}
        ],
        "tags": [{"name": "origin", "value": "sdk"}],
    }
    added = await asyncio.to_thread(sdk.profile.storing.add_json, "sdk-source", written)
    key = added["data"]["key"]
    edited = await asyncio.to_thread(
        sdk.profile.storing.edit, "sdk-source", {"text": "Ada Lovelace Analyst"}, key
    )
    assert (added["code"], added["message"]) == (201, "Profile created")
    assert added["data"]["experiences"][0]["date_start"] == "1842-01-01T00:00:00"
    assert added["data"]["source"]["key"] == "sdk-source"
    assert (edited["code"], edited["data"]["text"]) == (200, "Ada Lovelace Analyst")
    assert edited["data"]["tags"] == [{"name": "origin", "value": "sdk"}]
    put = sandbox.state.calls_to("PUT")[0]
    assert put["body"] == {"text": "Ada Lovelace Analyst", "source_key": "sdk-source", "key": key}


async def test_the_sdk_sees_hrflows_errors(sandbox: SandboxServer) -> None:
    unauthorised = await asyncio.to_thread(
        _sdk(sandbox, "wrong").profile.storing.get, SAMPLE_SOURCE_KEY, HARRY_POTTER_KEY
    )
    missing = await asyncio.to_thread(_sdk(sandbox).profile.storing.get, SAMPLE_SOURCE_KEY, "nope")
    read_shape = {"experiences": [{"title": "x", "date_start": "2016-01-01T00:00:00"}]}
    invalid = await asyncio.to_thread(_sdk(sandbox).profile.storing.add_json, "s", read_shape)
    assert unauthorised["code"] == 401
    assert missing["code"] == 404
    assert (invalid["code"], invalid["message"]) == (400, "Invalid source fields")
    assert "experiences.0.date_start" in invalid["data"]["fields"][0]


async def test_missing_auth_headers_are_401(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    url = (
        f"{sandbox.api_url}/profile/indexing?source_key={SAMPLE_SOURCE_KEY}&key={HARRY_POTTER_KEY}"
    )
    async with http.get(url) as response:
        assert response.status == 401
        assert response.headers["Content-Type"] == "application/json"
    async with http.get(url, headers={"X-API-KEY": DEFAULT_API_KEY}) as response:
        assert response.status == 401


async def _control(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as response:
        return response.status, await response.json()


async def test_faults_by_endpoint_and_count_through_the_control_api(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    faults = {
        "faults": [
            {"endpoint": "GET /v1/profile/indexing", "status": 429, "retry_after_s": 2, "times": 1}
        ]
    }
    status, body = await _control(http, "POST", f"{sandbox.url}/_sandbox/faults", faults)
    assert (status, len(body["faults"])) == (200, 1)
    sdk = _sdk(sandbox)
    limited = await asyncio.to_thread(sdk.profile.storing.get, SAMPLE_SOURCE_KEY, HARRY_POTTER_KEY)
    then_ok = await asyncio.to_thread(sdk.profile.storing.get, SAMPLE_SOURCE_KEY, HARRY_POTTER_KEY)
    assert (limited["code"], then_ok["code"]) == (429, 200)
    _, calls = await _control(http, "GET", f"{sandbox.url}/_sandbox/calls")
    assert [c["status"] for c in calls["calls"]] == [429, 200]
    assert (await _control(http, "GET", f"{sandbox.url}/_sandbox/faults"))[1] == {"faults": []}


async def test_a_bad_fault_is_refused(sandbox: SandboxServer, http: aiohttp.ClientSession) -> None:
    status, body = await _control(http, "POST", f"{sandbox.url}/_sandbox/faults", {"stat": 500})
    assert status == 400
    assert "unknown fault fields" in body["error"]


async def test_a_fail_rate_fails_some_calls_and_latency_delays_every_answer(
    http: aiohttp.ClientSession,
) -> None:
    async with SandboxServer(fail_rate=0.5, status=503, latency_ms=20) as sandbox:
        sdk = _sdk(sandbox)
        for _ in range(20):
            await asyncio.to_thread(sdk.profile.storing.get, SAMPLE_SOURCE_KEY, HARRY_POTTER_KEY)
        statuses = [call["status"] for call in sandbox.state.calls]
        delays = [call["answered_at"] - call["at"] for call in sandbox.state.calls]
    assert set(statuses) == {200, 503}
    assert min(delays) >= 0.02


async def test_reset_restores_the_seeds_and_forgets_calls_and_faults(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    stored = {"source_key": "extra", "profile": {"reference": "r1", "info": {"summary": "s"}}}
    status, profile = await _control(http, "POST", f"{sandbox.url}/_sandbox/profiles", stored)
    assert (status, profile["source"]["key"], profile["info"]["location"]["gmaps"]) == (
        200,
        "extra",
        None,
    )
    await _control(http, "POST", f"{sandbox.url}/_sandbox/faults", {"status": 500})
    await _control(http, "GET", f"{sandbox.url}/v1/profile/indexing")
    _, listed = await _control(http, "GET", f"{sandbox.url}/_sandbox/profiles")
    assert len(listed["profiles"]) == 3
    await _control(http, "POST", f"{sandbox.url}/_sandbox/reset")
    _, listed = await _control(http, "GET", f"{sandbox.url}/_sandbox/profiles")
    assert {p["reference"] for p in listed["profiles"]} == {"harry-potter", "my_profile"}
    assert sandbox.state.calls == []
    assert sandbox.state.faults.rules == []


async def test_a_post_sends_a_signed_webhook_the_receiver_accepts(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    async with (
        receiver(settings) as server,
        SandboxServer(
            webhook_url=f"{server.url}/webhook", webhook_secret=WEBHOOK_SECRET
        ) as sandbox,
    ):
        added = await asyncio.to_thread(
            _sdk(sandbox).profile.storing.add_json, "fresh", {"info": {"summary": "s"}}
        )

        async def webhook_answered() -> bool:
            webhooks = sandbox.state.webhooks
            return bool(webhooks) and webhooks[-1]["status"] is not None

        await eventually(webhook_answered)
    assert sandbox.state.webhooks[0]["status"] == 202
    [job_id] = await redis.zrange(QueueKeys(settings.queue_name).queue, 0, -1)
    job = json.loads(await redis.get(QueueKeys.job(job_id.decode())))
    event = job["a"][0]["payload"]
    assert event["type"] == "profile.parsing.success"
    assert event["profile"] == {
        "key": added["data"]["key"],
        "reference": None,
        "source": {"key": "fresh"},
    }


def test_python_m_sandbox_serves_until_stopped() -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "sandbox",
        "--port",
        str(port),
        "--no-seed",
        "--latency-ms",
        "5",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline().decode()
        assert f"http://127.0.0.1:{port}/v1" in banner
        url = f"http://127.0.0.1:{port}/_sandbox/profiles"
        answer = eventually_sync(
            lambda: requests.get(url, timeout=1).json(), url, ignoring=(requests.ConnectionError,)
        )
        assert answer == {"profiles": []}
    finally:
        process.terminate()
        process.wait(timeout=10)
