"""The HrFlow client against the sandbox over real loopback HTTP, and the shared rate budget."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time

import aiohttp
import pytest
from redis.asyncio import Redis

from hrflow_client import (
    ApiError,
    BadRequest,
    HrflowClient,
    NotFound,
    RateLimited,
    RejectedRequest,
    Unauthorized,
    UpstreamError,
    profile_to_indexing_payload,
)
from hrflow_client.api import parse_retry_after
from hrflow_webhooks.errors import PermanentError, TransientError
from sandbox import DEFAULT_API_KEY, DEFAULT_API_USER, HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY
from sandbox.faults import Fault
from tests.redis_server import RedisServer
from tests.sandbox_fixtures import SandboxServer
from workers.failures import is_transient
from workers.rate_budget import SharedRateBudget


def _client(
    http: aiohttp.ClientSession, sandbox: SandboxServer, api_key: str = DEFAULT_API_KEY
) -> HrflowClient:
    return HrflowClient(http, sandbox.api_url, api_key, DEFAULT_API_USER)


async def test_get_returns_the_envelopes_data_and_sends_the_auth_headers(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    profile = await _client(http, sandbox).profile_indexing_get(
        SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY
    )
    assert profile["key"] == HARRY_POTTER_KEY
    assert profile["info"]["full_name"] == "Harry Potter"
    [call] = sandbox.state.calls
    assert (call["method"], call["path"], call["status"]) == ("GET", "/v1/profile/indexing", 200)
    assert call["query"] == {"source_key": SAMPLE_SOURCE_KEY, "key": HARRY_POTTER_KEY}


async def test_get_by_reference_and_parsing_get(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    client = _client(http, sandbox)
    profile = await client.profile_indexing_get(SAMPLE_SOURCE_KEY, reference="harry-potter")
    parsing = await client.profile_parsing_get(SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)
    assert profile["key"] == parsing["key"] == HARRY_POTTER_KEY
    assert parsing["parsing"]["info"]["summary"] == "Brief summary"


async def test_add_json_then_edit_round_trip(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    client = _client(http, sandbox)
    original = await client.profile_indexing_get(SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)
    payload = profile_to_indexing_payload(original, "copies")
    created = await client.profile_indexing_add_json("copies", payload)
    edited = await client.profile_indexing_edit("copies", {"text": "new"}, key=created["key"])
    assert edited["text"] == "new"
    assert edited["experiences"] == created["experiences"]
    post, put = sandbox.state.calls[1:]
    assert post["body"]["source_key"] == put["body"]["source_key"] == "copies"
    assert post["body"]["experiences"][0]["date_start"] == {"iso8601": "2016-01-01T00:00:00"}
    assert put["body"] == {"text": "new", "source_key": "copies", "key": created["key"]}


async def test_listing_pages_by_last_change_and_archiving_removes_from_it(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """The reconciliation primitive: pages of the source's profiles, most recently changed
    first, with HrFlow's meta; an archived profile leaves the listing."""
    client = _client(http, sandbox)
    created = [
        await client.profile_indexing_add_json("listed", {"reference": f"r-{n}", "text": "t"})
        for n in range(5)
    ]
    await client.profile_indexing_edit("listed", {"text": "changed"}, key=created[1]["key"])
    first = await client.storing_profiles_list(["listed"], limit=2)
    assert (first.page, first.max_page, first.total) == (1, 3, 5)
    assert [p["key"] for p in first.profiles] == [created[1]["key"], created[4]["key"]]
    last = await client.storing_profiles_list(["listed"], limit=2, page=3)
    assert [p["key"] for p in last.profiles] == [created[0]["key"]]
    await client.profile_storing_archive("listed", key=created[0]["key"])
    after = await client.storing_profiles_list(["listed"], limit=30)
    assert after.total == 4
    assert created[0]["key"] not in {p["key"] for p in after.profiles}
    with pytest.raises(BadRequest):  # HrFlow's answer to an unknown source
        await client.storing_profiles_list(["no-such-source"])


async def test_a_bad_key_is_unauthorized_and_permanent(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(Unauthorized) as caught:
        await _client(http, sandbox, "wrong").profile_indexing_get(SAMPLE_SOURCE_KEY, key="k")
    error = caught.value
    assert (error.status, error.transient, is_transient(error)) == (401, False, False)
    assert isinstance(error, PermanentError)
    assert "Unauthorized" in (error.hrflow_message or "")
    assert error.endpoint == "GET profile/indexing"


async def test_an_unknown_profile_is_not_found(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(NotFound) as caught:
        await _client(http, sandbox).profile_indexing_get(SAMPLE_SOURCE_KEY, key="nope")
    assert caught.value.status == 404
    assert not is_transient(caught.value)


async def test_a_body_breaking_the_write_shape_is_a_bad_request(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    raw = await _client(http, sandbox).profile_indexing_get(SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)
    raw.pop("id")
    raw.pop("source")  # the GET shape as is: string dates, server fields
    with pytest.raises(BadRequest) as caught:
        await _client(http, sandbox).profile_indexing_add_json("copies", raw)
    assert (caught.value.status, caught.value.hrflow_message) == (400, "Invalid source fields")
    assert not is_transient(caught.value)


async def test_429_carries_retry_after_and_is_transient(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    sandbox.state.faults.add(Fault(status=429, retry_after_s=7, times=1))
    client = _client(http, sandbox)
    with pytest.raises(RateLimited) as caught:
        await client.profile_indexing_get(SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)
    error = caught.value
    assert (error.status, error.retry_after_s, error.transient) == (429, 7.0, True)
    assert isinstance(error, TransientError)
    assert await client.profile_indexing_get(SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)


@pytest.mark.parametrize(
    ("status", "error_type"), [(500, UpstreamError), (503, UpstreamError), (403, RejectedRequest)]
)
async def test_other_statuses_are_classified(
    sandbox: SandboxServer, http: aiohttp.ClientSession, status: int, error_type: type[ApiError]
) -> None:
    sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=status))
    with pytest.raises(error_type) as caught:
        await _client(http, sandbox).profile_indexing_edit(SAMPLE_SOURCE_KEY, {}, key="k")
    assert caught.value.status == status
    assert caught.value.transient is (status >= 500)
    assert is_transient(caught.value) is (status >= 500)


async def test_a_timeout_is_an_upstream_error_without_status(sandbox: SandboxServer) -> None:
    sandbox.state.faults.add(Fault(timeout=True, hang_s=1.0))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.1)) as short:
        with pytest.raises(UpstreamError) as caught:
            await _client(short, sandbox).profile_indexing_get(SAMPLE_SOURCE_KEY, key="k")
    assert (caught.value.status, caught.value.hrflow_message) == (None, "timed out")
    assert is_transient(caught.value)


async def test_a_refused_connection_is_an_upstream_error(http: aiohttp.ClientSession) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    client = HrflowClient(http, f"http://127.0.0.1:{port}/v1", "k", "u")
    with pytest.raises(UpstreamError) as caught:
        await client.profile_indexing_get("s", key="k")
    assert caught.value.status is None
    assert "connection failed" in str(caught.value)


async def test_error_messages_never_carry_the_body(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(BadRequest) as caught:
        await _client(http, sandbox).profile_indexing_add_json(
            "copies", {"info": {"full_name": "Secret Person"}, "experiences": [{"date_start": "x"}]}
        )
    assert "Secret Person" not in str(caught.value)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 50 < (parse_retry_after(in_a_minute) or 0) <= 60


async def test_the_rate_budget_is_shared_by_two_processes_clients(
    redis: Redis, redis_server: RedisServer
) -> None:
    """Two Redis connections stand for two worker processes: together they stay in budget."""
    rate_per_s = 40.0
    other = Redis.from_url(redis_server.url)
    budgets = [
        SharedRateBudget(redis, "budget", rate_per_s),
        SharedRateBudget(other, "budget", rate_per_s),
    ]
    taken: list[float] = []

    async def take(budget: SharedRateBudget) -> None:
        for _ in range(12):
            await budget.acquire()
            taken.append(time.monotonic())

    await asyncio.gather(*(take(b) for b in budgets))
    await other.aclose()
    taken.sort()
    window_s = 0.25
    busiest = max(sum(1 for t in taken if start <= t < start + window_s) for start in taken)
    # At most rate * window + the one-token burst (+1 for the tick rounding at the edges).
    assert busiest <= rate_per_s * window_s + 2
    assert len(taken) == 24


def test_a_budget_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        SharedRateBudget(Redis(), "k", 0)
