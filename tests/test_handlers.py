"""The built-in handlers end to end: signed webhook → receiver → Redis → arq worker → handler →
the sandbox HrFlow API on loopback, where every call is recorded and checked."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from sandbox import HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY
from sandbox.faults import Fault
from tests.redis_server import RedisServer
from tests.sandbox_fixtures import SandboxServer
from tests.service import drain, parsing_event, receiver
from workers.dead_letters import DeadLetters
from workers.handlers import edit, index
from workers.handlers.common import NotConfiguredError, profile_ref_of, skips_key
from workers.plugins import build_registry
from workers.registry import Registry

TAGS = "reviewed=yes,pipeline=webhooks"  # as HRFLOW_EDIT_TAGS gives them
TAG_MAP = {"reviewed": "yes", "pipeline": "webhooks"}  # TAGS as the settings hold them
TARGET = "target-source"
HARRY_TEXT = (
    "Harry Potter Brief summary Lead Mathematic Departement Developping. Mathematicien "
    "University Description manual skill Creative spirit Writing skills Communication "
    "skill edu skill exp english football"
)
HARRY_EXPERIENCE_WRITTEN = {
    "title": "Lead",
    "company": "Mathematic Departement",
    "description": "Developping.",
    "location": {"text": "Paris", "lat": None, "lng": None},
    "date_start": {"iso8601": "2016-01-01T00:00:00"},
    "date_end": {"iso8601": "2018-07-01T00:00:00"},
    "certifications": [{"name": "certificate exp", "value": None}],
    "courses": [{"name": "course exp", "value": None}],
    "tasks": [{"name": "task exp", "value": None}],
    "skills": [{"name": "skill exp", "value": None, "type": "hard"}],
}


def _registry(settings: Settings) -> Registry:
    registry = Registry()
    edit.register(registry, settings)
    index.register(registry, settings)
    return registry


async def _run(
    settings: Settings, session: aiohttp.ClientSession, *events: Any, workers: int = 1
) -> list[Any]:
    """Deliver signed events through the real receiver, then drain the queue with workers."""
    async with receiver(settings) as server:
        for event in events:
            status, body = await server.post(session, event)
            assert status == 202, body
    registry = _registry(settings)
    return list(await asyncio.gather(*(drain(settings, registry) for _ in range(workers))))


def _calls(sandbox: SandboxServer, method: str | None = None) -> list[tuple[str, int]]:
    return [
        (c["method"], c["status"])
        for c in sandbox.state.calls
        if method is None or c["method"] == method
    ]


async def _skips(redis: Redis, settings: Settings) -> dict[str, int]:
    counts = await redis.hgetall(skips_key(settings))  # type: ignore[misc]
    return {name.decode(): int(count) for name, count in counts.items()}


async def _dead_letters(redis: Redis, settings: Settings) -> list[dict[str, Any]]:
    letters = DeadLetters(redis, QueueKeys(settings.queue_name))
    return [letter async for letter in letters.iter()]


def _stored(sandbox: SandboxServer, source_key: str, **lookup: str) -> dict[str, Any]:
    profile = sandbox.state.profiles.get(source_key, **lookup)
    assert profile is not None
    return profile


# --- edit ----------------------------------------------------------------------------------------


async def test_edit_puts_back_only_merged_tags_text_and_durations(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    await _run(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    assert _calls(sandbox) == [("GET", 200), ("PUT", 200)]
    get, put = sandbox.state.calls
    assert get["query"] == {"source_key": SAMPLE_SOURCE_KEY, "key": HARRY_POTTER_KEY}
    assert put["body"] == {
        "source_key": SAMPLE_SOURCE_KEY,
        "key": HARRY_POTTER_KEY,
        "tags": [
            {"name": "archive", "value": False},
            {"name": "reviewed", "value": "yes"},
            {"name": "pipeline", "value": "webhooks"},
        ],
        "text": HARRY_TEXT,
        "experiences_duration": 2.5,  # 2016-01-01 → 2018-07-01: 912 days
        "educations_duration": 2.0,  # 2016-01-01 → 2018-01-01: 731 days
    }
    stored = _stored(sandbox, SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)
    assert stored["experiences"][0]["date_start"] == "2016-01-01T00:00:00"  # untouched
    assert await _dead_letters(redis, settings) == []


async def test_edit_skips_the_echo_of_its_own_put_but_not_a_real_change(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    await _run(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    echo = parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY, message="Profile parsed (echo)")
    await _run(settings, http, echo)
    assert _calls(sandbox, "PUT") == [("PUT", 200)]
    assert await _skips(redis, settings) == {"builtin.edit:echo of our own write": 1}

    stored = _stored(sandbox, SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)
    sandbox.state.profiles.edit(stored, {"text": "", "tags": [{"name": "reviewed", "value": "no"}]})
    changed = parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY, message="Profile re-parsed")
    await _run(settings, http, changed)
    assert _calls(sandbox, "PUT") == [("PUT", 200), ("PUT", 200)]
    last_put = sandbox.state.calls_to("PUT")[-1]["body"]
    assert last_put["text"] == HARRY_TEXT
    assert last_put["tags"] == [
        {"name": "reviewed", "value": "yes"},
        {"name": "pipeline", "value": "webhooks"},
    ]
    assert "experiences_duration" not in last_put  # already there since the first PUT


async def test_edit_without_consent_is_skipped_with_the_reason(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS, require_consent=True)
    refused = {"owner": {"parsing": False}, "controller": {"parsing": True}}
    profile = sandbox.state.profiles.add(
        SAMPLE_SOURCE_KEY, {"consent_algorithmic": refused, "info": {"summary": "s"}}
    )
    await _run(
        settings,
        http,
        parsing_event(profile["key"], SAMPLE_SOURCE_KEY),
        parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY),  # consents: edited
    )
    puts = sandbox.state.calls_to("PUT")
    assert [p["body"]["key"] for p in puts] == [HARRY_POTTER_KEY]
    assert await _skips(redis, settings) == {"builtin.edit:no consent for parsing": 1}


# --- index ---------------------------------------------------------------------------------------


async def test_index_copies_into_the_target_then_edits_instead_of_duplicating(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET)
    await _run(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    assert _calls(sandbox) == [("GET", 200), ("GET", 404), ("POST", 201)]
    assert sandbox.state.calls[1]["query"] == {"source_key": TARGET, "reference": "harry-potter"}
    post = sandbox.state.calls[2]["body"]
    assert post["source_key"] == TARGET
    assert post["reference"] == "harry-potter"
    for read_only in ("id", "key", "source", "updated_at", "archive"):
        assert read_only not in post
    assert post["experiences"] == [HARRY_EXPERIENCE_WRITTEN]
    assert post["educations"][0]["date_start"] == {"iso8601": "2016-01-01T00:00:00"}
    assert post["educations"][0]["date_end"] == {"iso8601": "2018-01-01T00:00:00"}
    assert post["info"]["date_birth"] == "1990-08-09T00:00:00+0000"
    assert post["info"]["location"] == {"text": None, "lat": None, "lng": None}
    assert post["skills"][0] == {"name": "manual skill", "value": None, "type": "hard"}
    assert post["tags"] == [{"name": "archive", "value": False}]
    assert post["metadatas"] == [
        {"name": "hrflow_webhooks_origin", "value": f"{SAMPLE_SOURCE_KEY}/{HARRY_POTTER_KEY}"}
    ]
    copy_key = _stored(sandbox, TARGET, reference="harry-potter")["key"]

    # A real change in the origin is indexed again, as an edit of the same copy.
    origin = _stored(sandbox, SAMPLE_SOURCE_KEY, key=HARRY_POTTER_KEY)
    sandbox.state.profiles.edit(origin, {"info": {**origin["info"], "summary": "New summary"}})
    update = {
        **parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY),
        "type": "profile.parsing.update",
    }
    await _run(settings, http, update)
    assert _calls(sandbox)[3:] == [("GET", 200), ("GET", 200), ("PUT", 200)]
    put = sandbox.state.calls[5]["body"]
    assert (put["key"], put["source_key"], put["info"]["summary"]) == (
        copy_key,
        TARGET,
        "New summary",
    )
    assert put["experiences"] == [HARRY_EXPERIENCE_WRITTEN]
    copies = [p for p in sandbox.state.profiles.all() if p["source"]["key"] == TARGET]
    assert len(copies) == 1


async def test_index_skips_its_echoes_and_unchanged_redeliveries(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET)
    await _run(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    copy_key = _stored(sandbox, TARGET, reference="harry-potter")["key"]
    calls_before = len(sandbox.state.calls)
    target_echo = {**parsing_event(copy_key, TARGET), "type": "profile.parsing.update"}
    unchanged = {
        **parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY),
        "type": "profile.parsing.update",
    }
    await _run(settings, http, target_echo, unchanged)
    assert _calls(sandbox)[calls_before:] == [("GET", 200)]  # the unchanged origin, read once
    assert await _skips(redis, settings) == {
        "builtin.index:event from the target source": 1,
        "builtin.index:already indexed as is": 1,
    }


async def test_index_derives_a_reference_from_the_origin_key(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET)
    profile = sandbox.state.profiles.add(SAMPLE_SOURCE_KEY, {"info": {"full_name": "No Ref"}})
    await _run(settings, http, parsing_event(profile["key"], SAMPLE_SOURCE_KEY))
    [post] = sandbox.state.calls_to("POST")
    assert post["body"]["reference"] == f"origin-{profile['key']}"


async def test_index_waits_while_another_worker_indexes_the_same_profile(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, index_source_key=TARGET)
    lock = f"{settings.queue_name}:lock:builtin.index:{TARGET}:harry-potter"
    await redis.set(lock, "another worker", px=300)
    await _run(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    # First try: the origin is read, the lock is busy (transient). The retry writes once.
    assert _calls(sandbox) == [("GET", 200), ("GET", 200), ("GET", 404), ("POST", 201)]
    assert await redis.get(lock) is None  # released after the write
    assert await _dead_letters(redis, settings) == []


# --- transient failures are retried, permanent ones dead-lettered -------------------------------


async def test_429_with_retry_after_then_success(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    # Retry-After is a floor up to HRFLOW_RETRY_MAX_S, which caps it (test_reliability).
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS, retry_max_s=5)
    sandbox.state.faults.add(
        Fault(endpoint="GET /v1/profile/indexing", status=429, retry_after_s=0.4, times=1)
    )
    await _run(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    assert _calls(sandbox) == [("GET", 429), ("GET", 200), ("PUT", 200)]
    first, second = sandbox.state.calls[:2]
    assert second["at"] - first["at"] >= 0.4  # Retry-After is a floor for the retry's delay
    assert await _dead_letters(redis, settings) == []


async def test_500_then_success(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=500, times=1))
    await _run(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    assert _calls(sandbox) == [("GET", 200), ("PUT", 500), ("GET", 200), ("PUT", 200)]
    assert sandbox.state.calls[1]["body"] == sandbox.state.calls[3]["body"]
    assert await _dead_letters(redis, settings) == []


@pytest.mark.parametrize(
    ("case", "status", "error_type"),
    [
        ("bad request", 400, "BadRequest"),
        ("bad key", 401, "Unauthorized"),
        ("gone while written", 404, "NotFound"),
    ],
)
async def test_400_401_and_a_404_on_a_write_are_dead_lettered_at_once(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
    case: str,
    status: int,
    error_type: str,
) -> None:
    overrides: dict[str, Any] = {"edit_tags": TAGS}
    profile_key = HARRY_POTTER_KEY
    if case == "bad request":
        sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=400))
    elif case == "bad key":
        overrides["api_key"] = "wrong-key"
    else:  # a 404 on the event's own profile is waited for (tests/test_notifications.py)
        sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=404))
    settings = sandbox.settings(redis_server.url, **overrides)
    await _run(settings, http, parsing_event(profile_key, SAMPLE_SOURCE_KEY))
    [letter] = await _dead_letters(redis, settings)
    assert (letter["handler"], letter["reason"], letter["tries"]) == (
        "builtin.edit",
        "permanent error",
        1,
    )
    assert letter["error"]["type"] == error_type
    assert (letter["error"]["status"], letter["error"]["transient"]) == (status, False)
    assert letter["error"]["hrflow_message"]
    assert [s for _, s in _calls(sandbox)][-1] == status
    assert len(sandbox.state.calls) == (1 if case == "bad key" else 2)  # never retried


async def test_an_event_without_keys_is_dead_lettered_with_the_reason(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    event = {"type": "profile.parsing.success", "origin": "api", "profile": {"reference": "r"}}
    await _run(settings, http, event)
    [letter] = await _dead_letters(redis, settings)
    assert letter["error"]["type"] == "MissingProfileKeysError"
    assert "no profile key and no source key" in letter["error"]["message"]
    assert sandbox.state.calls == []


@pytest.mark.parametrize(
    "profile_part",
    [
        {"profile": {"key": "pk", "source": {"key": "sk"}}},
        {"profile": {"profile_key": "pk", "source_key": "sk"}},
        {"profile": {"profile_key": "pk"}, "source": {"key": "sk"}},
        {"profile": {"key": "pk", "source_key": "sk", "source": None}},
    ],
)
def test_keys_are_read_from_every_sender_shape(profile_part: dict[str, Any]) -> None:
    ref = profile_ref_of(Event.from_payload({"type": "profile.parsing.success", **profile_part}))
    assert (ref.profile_key, ref.source_key) == ("pk", "sk")


async def test_an_older_senders_event_is_handled(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    legacy = {
        "type": "profile.parse.success",
        "profile": {"profile_key": HARRY_POTTER_KEY, "source_key": SAMPLE_SOURCE_KEY},
    }
    await _run(settings, http, legacy)
    assert _calls(sandbox) == [("GET", 200), ("PUT", 200)]


# --- the shared rate budget ----------------------------------------------------------------------


async def test_two_workers_share_one_rate_budget(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    rate_per_s = 20.0
    settings = sandbox.settings(
        redis_server.url, edit_tags=TAGS, api_rate_per_s=rate_per_s, worker_max_jobs=3
    )
    keys = [
        sandbox.state.profiles.add(SAMPLE_SOURCE_KEY, {"info": {"full_name": f"P {i}"}})["key"]
        for i in range(14)
    ]
    workers = await _run(
        settings, http, [parsing_event(k, SAMPLE_SOURCE_KEY) for k in keys], workers=2
    )
    assert len(sandbox.state.calls_to("PUT")) == 14
    assert all(worker.jobs_complete > 0 for worker in workers)  # both took part
    times = sorted(call["at"] for call in sandbox.state.calls)
    window_s = 1.0
    busiest = max(sum(1 for t in times if start <= t < start + window_s) for start in times)
    # A limit, not a speed bound: rate x window + the one-token burst, +1 for edge rounding.
    assert busiest <= rate_per_s * window_s + 2


# --- registration --------------------------------------------------------------------------------


def test_the_plugins_register_nothing_when_disabled(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url)
    names = {handler.name for handler in build_registry(settings)}
    assert not names & {"builtin.index", "builtin.edit"}


def test_the_installed_plugins_register_when_enabled(redis_server: RedisServer) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        index_source_key=TARGET,
        edit_tags=TAG_MAP,
        api_key=SecretStr("k"),
        api_user="u",
    )
    registry = build_registry(settings)
    assert [h.name for h in registry.handlers_for("profile.parsing.success")][-2:] in (
        ["builtin.index", "builtin.edit"],
        ["builtin.edit", "builtin.index"],
    )
    assert "builtin.index" in {h.name for h in registry.handlers_for("profile.parsing.update")}


def test_an_enabled_handler_without_credentials_stops_the_start() -> None:
    with pytest.raises(NotConfiguredError, match="HRFLOW_API_KEY"):
        edit.register(Registry(), Settings(edit_tags=TAG_MAP))


async def test_a_sandbox_400_is_dead_lettered_then_replayed_once_from_the_cli(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """Issue 5's proof: a permanent 400 lands in dead letters with its reason; once the API
    is fixed, `hrflow-webhooks dead-letters replay` completes it; a second replay does nothing."""
    from tests.test_cli import cli

    settings = sandbox.settings(redis_server.url, edit_tags=TAGS)
    sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=400))
    await _run(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    [letter] = await _dead_letters(redis, settings)
    assert (letter["reason"], letter["error"]["status"]) == ("permanent error", 400)
    assert letter["error"]["hrflow_message"]

    sandbox.state.faults.clear()  # the API is fixed
    env = {"REDIS_URL": redis_server.url, "HRFLOW_QUEUE_NAME": settings.queue_name}
    assert (await cli("dead-letters", "replay", letter["id"], env=env))[0] == 0
    code, _, _ = await cli("dead-letters", "replay", letter["id"], env=env)
    assert code == 1  # nothing left to replay
    await drain(settings, _registry(settings))
    assert _calls(sandbox, "PUT") == [("PUT", 400), ("PUT", 200)]
    assert await _dead_letters(redis, settings) == []
    profile = sandbox.state.profiles.get(SAMPLE_SOURCE_KEY, HARRY_POTTER_KEY, None)
    assert profile is not None
    tags = profile["tags"]
    assert {"name": "reviewed", "value": "yes"} in tags
