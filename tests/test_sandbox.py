"""The sandbox speaks HrFlow's dialect: the official SDK works against it, and its faults,
recording, control endpoints, webhook and command line do what they say."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import requests
from aiohttp import web
from hrflow import Hrflow
from redis.asyncio import Redis

from hrflow_webhooks.queue import QueueKeys
from sandbox import (
    DEFAULT_API_KEY,
    DEFAULT_API_USER,
    HARRY_POTTER_KEY,
    JOHN_DOE_KEY,
    SAMPLE_SOURCE_KEY,
)
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
        "--drop-webhooks",
        "--no-update-webhooks",
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
        switches = requests.get(f"http://127.0.0.1:{port}/_sandbox/webhooks", timeout=5).json()
        assert (switches["drop"], switches["updates"]) == (True, False)
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_the_cli_sandbox_command_passes_the_webhook_switches(
    http: aiohttp.ClientSession,
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "sandbox", "--port", str(port), "--no-seed",
        "--drop-webhooks", "--no-update-webhooks",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/_sandbox/webhooks"

    async def switches() -> Any:
        async with http.get(url) as response:
            return await response.json()

    try:
        answer = await eventually(switches, url, ignoring=(aiohttp.ClientConnectionError,))
    finally:
        process.terminate()
        await process.wait()
    assert (answer["drop"], answer["updates"], answer["sent"], answer["dropped"]) == (
        True,
        False,
        0,
        0,
    )


# --- the listing, archiving and timestamps ---------------------------------------------------

AUTH = {"X-API-KEY": DEFAULT_API_KEY, "X-USER-EMAIL": DEFAULT_API_USER}
GET_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0000$")  # as GET answers it


async def _api(
    http: aiohttp.ClientSession,
    sandbox: SandboxServer,
    method: str,
    path: str,
    params: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    url = f"{sandbox.api_url}/{path}"
    async with http.request(method, url, params=params, json=body, headers=AUTH) as response:
        return response.status, await response.json()


async def _add(
    http: aiohttp.ClientSession, sandbox: SandboxServer, source_key: str, **fields: Any
) -> dict[str, Any]:
    status, answer = await _api(
        http, sandbox, "POST", "profile/indexing", body={"source_key": source_key, **fields}
    )
    assert status == 201, answer
    profile: dict[str, Any] = answer["data"]
    return profile


async def _list(
    http: aiohttp.ClientSession, sandbox: SandboxServer, *source_keys: str, **params: str
) -> tuple[int, Any]:
    query = {"source_keys": json.dumps(list(source_keys)), **params}
    return await _api(http, sandbox, "GET", "storing/profiles", params=query)


def _keys(answer: Any) -> list[str]:
    return [profile["key"] for profile in answer["data"]]


async def test_the_listing_pages_65_profiles_30_at_a_time(http: aiohttp.ClientSession) -> None:
    async with SandboxServer(seed=False) as sandbox:
        added = [(await _add(http, sandbox, "many", reference=f"r{i}"))["key"] for i in range(65)]
        pages = [await _list(http, sandbox, "many", page=str(page)) for page in (1, 2, 3, 4)]
        ascending = await _list(http, sandbox, "many", order_by="asc", limit="10")
    assert [status for status, _ in pages] == [200] * 4
    assert [answer["meta"] for _, answer in pages] == [
        {"page": 1, "maxPage": 3, "count": 30, "total": 65},
        {"page": 2, "maxPage": 3, "count": 30, "total": 65},
        {"page": 3, "maxPage": 3, "count": 5, "total": 65},
        {"page": 4, "maxPage": 3, "count": 0, "total": 65},
    ]
    assert pages[0][1]["message"] == "List of profiles"
    # The default order is newest created first, so the three pages are the adds reversed.
    assert [key for _, answer in pages for key in _keys(answer)] == added[::-1]
    assert _keys(ascending[1]) == added[:10]
    assert ascending[1]["meta"] == {"page": 1, "maxPage": 7, "count": 10, "total": 65}


async def test_sort_by_updated_at_puts_the_profile_just_edited_first(
    http: aiohttp.ClientSession,
) -> None:
    async with SandboxServer(seed=False) as sandbox:
        keys = [(await _add(http, sandbox, "s", reference=f"r{i}"))["key"] for i in range(5)]
        status, edited = await _api(
            http, sandbox, "PUT", "profile/indexing", body={"source_key": "s", "key": keys[1]}
        )
        _, newest = await _list(http, sandbox, "s", sort_by="updated_at", order_by="desc")
        _, oldest = await _list(http, sandbox, "s", sort_by="updated_at", order_by="asc")
        _, by_creation = await _list(http, sandbox, "s", sort_by="created_at", order_by="desc")
    # Five adds and a PUT usually share a second: then only the precise times order them.
    assert status == 200
    assert _keys(newest) == [keys[1], keys[4], keys[3], keys[2], keys[0]]
    assert _keys(oldest) == _keys(newest)[::-1]
    assert _keys(by_creation) == keys[::-1]
    assert GET_TIME.match(edited["data"]["updated_at"])
    assert edited["data"]["updated_at"] >= edited["data"]["created_at"]
    assert all(GET_TIME.match(p["updated_at"]) for p in newest["data"])


async def test_the_listing_filters_by_source_key_and_reference_and_refuses_unknown_sources(
    http: aiohttp.ClientSession,
) -> None:
    async with SandboxServer(seed=False) as sandbox:
        a1 = await _add(http, sandbox, "a", reference="ref-a1")
        a2 = await _add(http, sandbox, "a", reference="ref-a2")
        b1 = await _add(http, sandbox, "b", reference="ref-b1")
        _, only_a = await _list(http, sandbox, "a")
        _, both = await _list(http, sandbox, "a", "b", order_by="asc")
        _, by_key = await _list(http, sandbox, "a", "b", key=b1["key"])
        _, by_reference = await _list(http, sandbox, "a", reference="ref-a2")
        _, elsewhere = await _list(http, sandbox, "b", reference="ref-a2")
        unknown = await _list(http, sandbox, "a", "nope")
        malformed = await _api(
            http, sandbox, "GET", "storing/profiles", params={"source_keys": "a"}
        )
        bad_sort = await _list(http, sandbox, "a", sort_by="scoring")
    assert _keys(only_a) == [a2["key"], a1["key"]]
    assert _keys(both) == [a1["key"], a2["key"], b1["key"]]
    assert [p["source"]["key"] for p in both["data"]] == ["a", "a", "b"]
    assert _keys(by_key) == [b1["key"]]
    assert _keys(by_reference) == [a2["key"]]
    assert elsewhere["data"] == []
    assert elsewhere["meta"] == {"page": 1, "maxPage": 0, "count": 0, "total": 0}
    assert unknown == (
        400,
        {"code": 400, "message": "Invalid parameters. Unable to find object: source"},
    )
    assert malformed[0] == bad_sort[0] == 400
    assert "source_keys" in malformed[1]["message"]


async def test_return_profile_chooses_whole_profiles_or_keys_and_dates(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    _, whole = await _list(http, sandbox, SAMPLE_SOURCE_KEY, return_profile="true")
    _, light = await _list(http, sandbox, SAMPLE_SOURCE_KEY, return_profile="false")
    _, default = await _list(http, sandbox, SAMPLE_SOURCE_KEY)
    _, got = await _api(
        http,
        sandbox,
        "GET",
        "profile/indexing",
        params={"source_key": SAMPLE_SOURCE_KEY, "key": HARRY_POTTER_KEY},
    )
    harry = next(p for p in whole["data"] if p["key"] == HARRY_POTTER_KEY)
    assert harry == got["data"]  # the GET shape: string dates, server fields
    assert harry["experiences"][0]["date_start"] == "2016-01-01T00:00:00"
    assert default == light
    assert [set(p) for p in light["data"]] == [
        {"key", "reference", "source", "created_at", "updated_at"}
    ] * 2
    summary = next(p for p in light["data"] if p["key"] == HARRY_POTTER_KEY)
    assert summary == {
        "key": HARRY_POTTER_KEY,
        "reference": "harry-potter",
        "source": {"key": SAMPLE_SOURCE_KEY},
        "created_at": got["data"]["created_at"],
        "updated_at": got["data"]["updated_at"],
    }


async def test_created_at_is_written_in_any_iso_form_answered_in_gets_and_filters_by_day(
    http: aiohttp.ClientSession,
) -> None:
    async with SandboxServer(seed=False) as sandbox:
        old = await _add(http, sandbox, "s", reference="old", created_at="2020-07-29T11:45:37Z")
        older = await _add(http, sandbox, "s", reference="older", created_at="2019-01-02")
        fresh = await _add(http, sandbox, "s", reference="fresh")
        _, ascending = await _list(http, sandbox, "s", order_by="asc")
        _, in_2020 = await _list(
            http, sandbox, "s", created_at_min="2020-07-29", created_at_max="2020-07-29"
        )
        _, until_2020 = await _list(http, sandbox, "s", created_at_max="2020-07-28")
        bad_day = await _list(http, sandbox, "s", created_at_min="2020-07-29T00:00:00")
    assert old["created_at"] == "2020-07-29T11:45:37+0000"
    assert older["created_at"] == "2019-01-02T00:00:00+0000"
    assert GET_TIME.match(fresh["created_at"])
    assert fresh["created_at"] == fresh["updated_at"]
    assert _keys(ascending) == [older["key"], old["key"], fresh["key"]]
    assert _keys(in_2020) == [old["key"]]
    assert _keys(until_2020) == [older["key"]]
    assert bad_day[0] == 400


async def _archive(
    http: aiohttp.ClientSession, sandbox: SandboxServer, **body: Any
) -> tuple[int, Any]:
    return await _api(http, sandbox, "PATCH", "profile/indexing/archive", body=body)


async def test_an_archived_profile_leaves_the_listing_and_stays_readable(
    http: aiohttp.ClientSession,
) -> None:
    async with SandboxServer(seed=False) as sandbox:
        ada = await _add(http, sandbox, "s", reference="ada", info={"email": "ada@example.com"})
        bob = await _add(http, sandbox, "s", reference="bob")
        archived = await _archive(http, sandbox, source_key="s", key=ada["key"], is_archive=1)
        _, listed = await _list(http, sandbox, "s")
        _, filtered = await _list(http, sandbox, "s", key=ada["key"])
        _, read = await _api(
            http, sandbox, "GET", "profile/indexing", params={"source_key": "s", "key": ada["key"]}
        )
        again = await _archive(http, sandbox, source_key="s", reference="ada", is_archive=1)
        duplicate = await _api(
            http, sandbox, "POST", "profile/indexing", body={"source_key": "s", "reference": "ada"}
        )
        unarchived = await _archive(
            http, sandbox, source_key="s", email="ada@example.com", is_archive=0
        )
        _, back = await _list(http, sandbox, "s", sort_by="updated_at")
        _, reread = await _api(
            http, sandbox, "GET", "profile/indexing", params={"source_key": "s", "key": ada["key"]}
        )
        missing = await _archive(http, sandbox, source_key="s", key="nope", is_archive=1)
        no_flag = await _archive(http, sandbox, source_key="s", key=bob["key"])
        no_profile = await _archive(http, sandbox, source_key="s", is_archive=1)
    assert archived == (
        200,
        {"code": 200, "message": "Profile archived", "data": {"key": ada["key"]}},
    )
    assert _keys(listed) == [bob["key"]]
    assert listed["meta"]["total"] == 1
    assert filtered["data"] == []
    assert read["data"]["archive"] == read["data"]["updated_at"]
    assert GET_TIME.match(read["data"]["archive"])
    assert again[0] == 200
    assert duplicate[0] == 400  # archived, not deleted: the reference is still taken
    assert unarchived[1]["message"] == "Profile unarchived"
    assert _keys(back) == [ada["key"], bob["key"]]  # unarchiving is a write: newest updated_at
    assert reread["data"]["archive"] is None
    assert missing[0] == 404
    assert no_flag[0] == no_profile[0] == 400


async def test_the_official_sdk_lists_and_archives(sandbox: SandboxServer) -> None:
    sdk = _sdk(sandbox)
    added = await asyncio.to_thread(
        sdk.profile.storing.add_json,
        SAMPLE_SOURCE_KEY,
        {"reference": "sdk-ada", "info": {"full_name": "Ada", "email": "ada@example.com"}},
    )
    first = await asyncio.to_thread(
        sdk.profile.storing.list, [SAMPLE_SOURCE_KEY], limit=2, sort_by="updated_at"
    )
    whole = await asyncio.to_thread(
        sdk.profile.storing.list, [SAMPLE_SOURCE_KEY], return_profile=True, order_by="asc"
    )
    by_key = await asyncio.to_thread(
        sdk.profile.storing.archive, SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY
    )
    by_email = await asyncio.to_thread(
        sdk.profile.storing.archive, SAMPLE_SOURCE_KEY, email="ada@example.com"
    )
    left = await asyncio.to_thread(sdk.profile.storing.list, [SAMPLE_SOURCE_KEY])
    unknown = await asyncio.to_thread(sdk.profile.storing.list, ["nope"])
    assert (first["code"], first["message"]) == (200, "List of profiles")
    assert first["meta"] == {"page": 1, "maxPage": 2, "count": 2, "total": 3}
    assert first["data"][0]["key"] == added["data"]["key"]
    assert [p["info"]["full_name"] for p in whole["data"]] == ["Harry Potter", "John Doe", "Ada"]
    assert (by_key["code"], by_key["message"], by_key["data"]) == (
        200,
        "Profile archived",
        {"key": HARRY_POTTER_KEY},
    )
    assert by_email["data"] == {"key": added["data"]["key"]}
    assert [p["key"] for p in left["data"]] == [JOHN_DOE_KEY]
    assert (unknown["code"], unknown["message"]) == (
        400,
        "Invalid parameters. Unable to find object: source",
    )
    listing = sandbox.state.calls_to("GET", "/v1/storing/profiles")[0]["query"]
    assert listing["source_keys"] == json.dumps([SAMPLE_SOURCE_KEY])
    assert listing["return_profile"] == "False"  # requests writes Python's bool as it prints
    patches = sandbox.state.calls_to("PATCH", "/v1/profile/indexing/archive")
    assert patches[1]["body"] == {
        "source_key": SAMPLE_SOURCE_KEY,
        "profile_email": "ada@example.com",
        "is_archive": 1,
    }


# --- webhooks: updates and the drop switch ---------------------------------------------------


@contextlib.asynccontextmanager
async def _webhook_target() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback URL that accepts webhooks (202), and the events it received."""
    received: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/webhook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/webhook", received
    finally:
        await runner.cleanup()


async def test_edits_send_updates_and_the_drop_switch_counts_what_it_drops(
    http: aiohttp.ClientSession,
) -> None:
    async with (
        _webhook_target() as (url, received),
        SandboxServer(seed=False, webhook_url=url, webhook_secret=WEBHOOK_SECRET) as sandbox,
    ):
        switches = f"{sandbox.url}/_sandbox/webhooks"

        async def add_and_edit(reference: str) -> None:
            await _add(http, sandbox, "s", reference=reference)
            body = {"source_key": "s", "reference": reference, "text": "edited"}
            assert (await _api(http, sandbox, "PUT", "profile/indexing", body=body))[0] == 200

        async def answered() -> bool:
            return all(w["status"] is not None for w in sandbox.state.webhooks)

        await add_and_edit("sent")
        assert len(sandbox.state.webhooks) == 2  # counted as soon as the call is answered
        await eventually(answered)
        dropping = await _control(http, "POST", switches, {"drop": True})
        await add_and_edit("dropped")
        await _control(http, "POST", switches, {"drop": False, "updates": False})
        await add_and_edit("adds-only")
        await eventually(answered)
        _, report = await _control(http, "GET", switches)
        refused = await _control(http, "POST", switches, {"drop": "yes"})
        await _control(http, "POST", f"{sandbox.url}/_sandbox/reset")
        _, after_reset = await _control(http, "GET", switches)
    assert dropping[1]["drop"] is True
    assert (report["drop"], report["updates"], report["sent"], report["dropped"]) == (
        False,
        False,
        3,
        2,
    )
    sent = sorted((w["type"], w["profile"]["reference"], w["status"]) for w in report["webhooks"])
    assert sent == [
        ("profile.parsing.success", "adds-only", 202),
        ("profile.parsing.success", "sent", 202),
        ("profile.storing.update", "sent", 202),
    ]
    dropped = sorted((w["type"], w["profile"]["reference"]) for w in report["dropped_webhooks"])
    assert dropped == [
        ("profile.parsing.success", "dropped"),
        ("profile.storing.update", "dropped"),
    ]
    assert sorted((e["type"], e["profile"]["reference"]) for e in received) == [
        (kind, reference) for kind, reference, _ in sent
    ]
    assert refused[0] == 400
    assert (after_reset["drop"], after_reset["updates"], after_reset["sent"]) == (False, True, 0)
