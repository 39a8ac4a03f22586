"""The CLI as people run it: a real `hrflow-webhooks` process against a real receiver and Redis."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from control.cli import parse_since, redacted_letter
from control.erasure import erase_profile, glob_escape
from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.event_log import EventLog
from hrflow_webhooks.events import Event, event_id_of
from hrflow_webhooks.queue import QueueKeys, deserialize_job, tag_of
from sandbox import JOHN_DOE_KEY, SAMPLE_SOURCE_KEY
from tests.hostile_listing import API_KEY as HOSTILE_API_KEY
from tests.hostile_listing import API_USER as HOSTILE_API_USER
from tests.hostile_listing import HostileListing, fresh_page, listed
from tests.polling import eventually
from tests.redis_server import RedisServer, free_port
from tests.service import (
    WEBHOOK_SECRET,
    make_settings,
    parsing_event,
    queued_event_ids,
    receiver,
    runs_of,
)
from workers.dead_letters import DeadLetters

SCHEMES = ("python-sdk", "js-sdk", "docs", "body-hex")
PERSONAL = "harry.potter@hogwarts.example"


async def cli(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """Run `hrflow-webhooks ARGS` in its own process; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control.cli",
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- send: the wire format, checked independently of the product -------------------------------


class Capture:
    """An HTTP server that records the deliveries it gets and answers 202."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        return web.json_response({"captured": True}, status=202)


@pytest.fixture
async def capture() -> AsyncIterator[tuple[Capture, str]]:
    recorder = Capture()
    app = web.Application()
    app.router.add_post("/webhook", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield recorder, f"http://127.0.0.1:{port}/webhook"
    await runner.cleanup()


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def independent_check(scheme: str, header: str, body: bytes, secret: bytes) -> bytes:
    """The signed payload, if ``header`` is what HrFlow's sources say the scheme sends."""
    if scheme == "body-hex":
        assert header == hmac.new(secret, body, hashlib.sha256).hexdigest()
        return body
    signature, payload_part = header.split(".")
    payload = _b64(payload_part)
    if scheme == "python-sdk":
        expected = hmac.new(secret, payload, hashlib.sha256).hexdigest().encode()
        assert _b64(signature) == expected
    else:
        digest = hmac.new(secret, payload_part.encode(), hashlib.sha256).digest()
        encode = base64.b64encode if scheme == "js-sdk" else base64.urlsafe_b64encode
        assert signature.rstrip("=") == encode(digest).decode().rstrip("=")
    return payload


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_send_signs_the_event_as_each_hrflow_source_describes(
    capture: tuple[Capture, str], scheme: str
) -> None:
    recorder, url = capture
    code, out, _ = await cli(
        "send", "profile.parsing.success", "--profile-key", "pk-9", "--source-key", "sk-9",
        "--url", url, "--secret", "s3cret", "--scheme", scheme,
        "--message", "Profile parsing success",
    )  # fmt: skip
    assert code == 0
    assert out.startswith("202 ")
    [(headers, body)] = recorder.requests
    payload = independent_check(scheme, headers["HTTP-HRFLOW-SIGNATURE"], body, b"s3cret")
    assert json.loads(payload) == parsing_event("pk-9", "sk-9", message="Profile parsing success")
    assert json.loads(body) == json.loads(payload)


async def test_send_count_array_and_file(capture: tuple[Capture, str], tmp_path: Path) -> None:
    recorder, url = capture
    base = ("--url", url, "--secret", "s3cret")
    keys = ("--profile-key", "pk", "--source-key", "sk")
    await cli("send", "profile.storing.success", *keys, *base, "--count", "3")
    await cli("send", "profile.storing.success", *keys, *base, "--count", "2", "--array")
    payload_file = tmp_path / "payload.json"
    payload_file.write_bytes(b'{"type": "job.parsing.success",  "job": {"key": "jk"}}')
    code, _, _ = await cli("send", "job.parsing.success", "--file", str(payload_file), *base)
    assert code == 0
    bodies = [json.loads(body) for _, body in recorder.requests]
    assert len({json.dumps(b, sort_keys=True) for b in bodies[:3]}) == 3  # distinct events
    assert isinstance(bodies[3], list)
    assert len(bodies[3]) == 2
    assert recorder.requests[4][1] == payload_file.read_bytes()  # sent byte for byte


# --- send: against the real receiver -------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_send_is_queued_by_the_receiver_for_each_scheme(
    redis: Redis, redis_server: RedisServer, scheme: str
) -> None:
    settings = make_settings(redis_server.url)
    async with receiver(settings) as server:
        code, out, _ = await cli(
            "send", "profile.parsing.success", "--profile-key", "pk-1", "--source-key", "sk-1",
            "--url", f"{server.url}/webhook", "--scheme", scheme,
            "--message", "Profile parsing success",
            env={"HRFLOW_WEBHOOK_SECRET": WEBHOOK_SECRET},
        )  # fmt: skip
    assert code == 0, out
    status, answer = out.split(" ", 1)
    assert status == "202"
    expected = parsing_event("pk-1", "sk-1", message="Profile parsing success")
    assert json.loads(answer) == {
        "queued": 1,
        "coalesced": 0,
        "duplicates": 0,
        "event_ids": [event_id_of(expected)],
    }
    assert await queued_event_ids(redis, settings.queue_name) == [event_id_of(expected)]


async def test_the_same_send_twice_is_two_events_and_a_fixed_message_is_a_retry(
    redis: Redis, redis_server: RedisServer
) -> None:
    """The quick-start command run again (after `run` restarts with Redis remembering the
    first) must not read as a duplicate; --message makes HrFlow's byte-identical retry."""
    settings = make_settings(redis_server.url)
    command = (
        "send", "profile.parsing.success", "--profile-key", "pk-2", "--source-key", "sk-2",
    )  # fmt: skip
    answers = []
    async with receiver(settings) as server:
        target = ("--url", f"{server.url}/webhook", "--secret", WEBHOOK_SECRET)
        for extra in ((), (), ("--message", "retry"), ("--message", "retry")):
            code, out, _ = await cli(*command, *target, *extra)
            assert code == 0, out
            answers.append(json.loads(out.split(" ", 1)[1]))
    assert [(a["queued"], a["duplicates"]) for a in answers] == [(1, 0), (1, 0), (1, 0), (0, 1)]


async def test_send_exits_non_zero_when_the_receiver_refuses(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    async with receiver(settings) as server:
        code, out, _ = await cli(
            "send", "profile.parsing.success", "--profile-key", "pk", "--source-key", "sk",
            "--url", f"{server.url}/webhook", "--secret", "not-the-secret",
        )  # fmt: skip
    assert code == 1
    assert out.startswith("401 ")
    assert await redis.zcard(settings.queue_name) == 0


async def test_send_reads_the_secret_run_saved(
    capture: tuple[Capture, str], tmp_path: Path
) -> None:
    recorder, url = capture
    (tmp_path / "webhook-secret").write_text("saved-secret\n")
    code, _, _ = await cli(
        "send", "profile.parsing.success", "--profile-key", "pk", "--source-key", "sk",
        "--url", url, "--state-dir", str(tmp_path), "--scheme", "body-hex",
    )  # fmt: skip
    assert code == 0
    [(headers, body)] = recorder.requests
    independent_check("body-hex", headers["HTTP-HRFLOW-SIGNATURE"], body, b"saved-secret")


# --- dead letters -----------------------------------------------------------------------------


def personal_event(profile_key: str = "pk-dead") -> Event:
    payload = parsing_event(profile_key, "sk-dead")
    payload["profile"]["info"] = {"email": PERSONAL}  # a sender may put more than keys
    return Event.from_payload(payload)


async def add_letter(redis: Redis, event: Event, handler: str = "h.edit") -> str:
    error = ValueError(f"invalid field for {PERSONAL}")
    letter_id = await DeadLetters(redis, QueueKeys("hrflow:queue")).add(
        event, "finished-run", handler, error, 3, "permanent error"
    )
    assert letter_id is not None  # unfenced: always written
    return letter_id


async def test_dead_letters_list_show_replay_purge(redis: Redis, redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url}
    event = personal_event()
    replayed_id = await add_letter(redis, event, "h.edit")
    purged_id = await add_letter(redis, event, "h.index")

    code, table, _ = await cli("dead-letters", "list", env=env)
    assert code == 0
    assert replayed_id in table
    assert purged_id in table
    assert "pk-dead" in table
    code, shown, _ = await cli("dead-letters", "show", replayed_id, env=env)
    assert code == 0
    letter = json.loads(shown)
    assert letter["event"]["payload"]["profile"] == {
        "key": "pk-dead",
        "reference": None,
        "source": {"key": "sk-dead"},
    }
    assert letter["error"]["type"] == "ValueError"
    listed = (await cli("dead-letters", "list", "--json", env=env))[1]
    assert PERSONAL not in table + shown + listed

    assert (await cli("dead-letters", "replay", replayed_id, env=env))[0] == 0
    keys = QueueKeys("hrflow:queue")
    [run_id] = [m.decode() for m in await redis.zrange(keys.queue, 0, -1)]
    job = deserialize_job(await redis.get(keys.job(run_id)))
    assert (job["a"][0]["id"], job["k"]) == (event.id, {"handlers": ["h.edit"]})  # that one only
    assert (await cli("dead-letters", "replay", replayed_id, env=env))[0] == 1  # once only
    assert (await cli("dead-letters", "purge", purged_id, env=env))[0] == 0
    assert await redis.zcard(keys.dead_letters) == 0
    assert (await cli("dead-letters", "show", purged_id, env=env))[0] == 1


async def test_dead_letters_replay_all_filters_by_type(
    redis: Redis, redis_server: RedisServer
) -> None:
    env = {"REDIS_URL": redis_server.url}
    parsing = await add_letter(redis, personal_event("pk-a"))
    storing_event = Event.from_payload({**parsing_event("pk-b"), "type": "profile.storing.success"})
    storing = await add_letter(redis, storing_event)
    code, out, _ = await cli(
        "dead-letters", "replay", "--all", "--type", "profile.storing.success", "--since", "1h",
        env=env,
    )  # fmt: skip
    assert code == 0
    assert out.splitlines() == ["replayed 1 dead letter(s)", storing]
    remaining = await DeadLetters(redis, QueueKeys("hrflow:queue")).ids()
    assert remaining == [parsing]


def test_since_takes_durations_and_iso_times() -> None:
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("90s", now=100.0) == 10.0
    assert parse_since("2026-01-01T00:00:00", now=0.0) == 1_767_225_600.0
    assert parse_since("2026-01-01T01:00:00+01:00", now=0.0) == 1_767_225_600.0


def test_a_redacted_letter_keeps_keys_and_drops_the_rest() -> None:
    event = personal_event()
    letter = {
        "id": "x",
        "handler": "h",
        "reason": "r",
        "tries": 1,
        "received_at": 1.0,
        "dead_at": 2.0,
        "error": {"type": "ValueError", "message": PERSONAL, "status": 400},
        "event": event.to_dict(),
    }
    shown = json.dumps(redacted_letter(letter))
    assert PERSONAL not in shown
    assert '"status": 400' in shown
    assert "pk-dead" in shown


# --- erase ------------------------------------------------------------------------------------


async def _traces(redis: Redis) -> set[str]:
    return {key.decode() async for key in redis.scan_iter()}


async def test_erase_removes_every_trace_of_one_profile_only(redis: Redis) -> None:
    keys = QueueKeys("hrflow:queue")
    gone = [Event.from_payload(parsing_event("pk-gone", message=str(n))) for n in range(2)]
    kept = Event.from_payload(parsing_event("pk-kept"))
    async with EventQueue(redis, keys.queue, dedup_window_s=60) as queue:
        await queue.enqueue_events([*gone, kept])
    await add_letter(redis, Event.from_payload(parsing_event("pk-gone", message="dead")))
    await add_letter(redis, kept)
    gone_runs = [run for event in gone for run in await runs_of(redis, event)]
    await redis.hset(keys.done(gone_runs[0]), "h.index", "ok")  # type: ignore[misc]
    await redis.set(keys.retry(gone_runs[0]), 1)
    await redis.set(f"{keys.queue}:written:w.edit:sk-1:pk-gone", "fp")
    await redis.set(f"{keys.queue}:written:w.edit:sk-1:pk-gone-not", "fp")
    before = await _traces(redis)

    report = await erase_profile(redis, keys, "pk-gone")

    after = await _traces(redis)
    assert (report.jobs, report.dead_letters, report.fingerprints) == (2, 1, 1)
    traces = [e.id for e in gone] + gone_runs + [keys.order(tag_of(gone[0].subject))]
    assert not [key for key in after if any(trace in key for trace in traces)]
    assert f"{keys.queue}:written:w.edit:sk-1:pk-gone" not in after
    assert f"{keys.queue}:written:w.edit:sk-1:pk-gone-not" in after
    assert await queued_event_ids(redis) == [kept.id]
    remaining = [letter async for letter in DeadLetters(redis, keys).iter()]
    assert [letter["event"]["id"] for letter in remaining] == [kept.id]
    assert keys.seen(kept.id) in after
    assert report.log_entries == 2  # the two deliveries' entries, in the log's one stream
    # + the run's markers, arq's retry key and the subject's emptied order list, not counted
    assert len(before) - len(after) == report.total - report.log_entries + 3


async def test_erase_command_reports_what_it_removed(
    redis: Redis, redis_server: RedisServer
) -> None:
    async with EventQueue(redis, "hrflow:queue", 60) as queue:
        await queue.enqueue_events([Event.from_payload(parsing_event("pk-x"))])
    code, out, _ = await cli("erase", "--profile-key", "pk-x", env={"REDIS_URL": redis_server.url})
    assert code == 0
    assert out.splitlines() == [
        "erased 1 queued job(s), 0 dead letter(s), 1 marker(s), 0 write fingerprint(s), "
        "1 event-log entries, 0 handled state(s)",
        "files: AOF rewritten; RDB snapshots off, none written",  # the test Redis: save ""
        "not reached: snapshots and backups taken before, the files of replicas, "
        "and the disk blocks the old files freed",
    ]
    assert await redis.zcard("hrflow:queue") == 0


async def test_erase_needs_a_profile_key_or_a_reference(redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url}
    for args in ([], ["--reference", " "], ["--profile-key", "pk-1", "--reference", ""]):
        code, _, err = await cli("erase", *args, env=env)
        assert code == 1
        assert "--profile-key, --reference or both" in err or "is empty" in err


async def test_erase_says_when_another_erasure_is_rebuilding_the_log(
    redis: Redis, redis_server: RedisServer
) -> None:
    async with EventQueue(redis, "hrflow:queue", 60) as queue:
        await queue.enqueue_events([Event.from_payload(parsing_event(f"pk-{n}")) for n in range(3)])
    other = EventLog(redis, QueueKeys("hrflow:queue")).rebuild(profile_key="pk-0", slice_entries=1)
    await other.copy_slice()
    code, out, err = await cli(
        "erase", "--profile-key", "pk-1", env={"REDIS_URL": redis_server.url}
    )
    assert (code, out) == (1, "")
    assert err.strip() == (
        "error: erase stopped at the event log (another erasure is rebuilding the event log): "
        "run it again"
    )
    await other.finish()


def test_glob_escape_matches_keys_literally() -> None:
    assert glob_escape("a*b?[c]") == r"a\*b\?\[c\]"


# --- sandbox ----------------------------------------------------------------------------------


async def sandbox_answer(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    """(status, JSON) once the sandbox listens; it takes a moment to start."""

    async def answer() -> tuple[int, Any]:
        async with http.get(url, headers=headers) as response:
            return response.status, await response.json()

    return await eventually(answer, url, ignoring=(aiohttp.ClientConnectionError,))


@pytest.mark.parametrize(("seed", "profiles"), [("--seed", 1), ("--no-seed", 0)])
async def test_sandbox_command_passes_its_fault_and_seed_options(
    seed: str, profiles: int, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "sandbox", "--port", str(port), seed,
        "--fail-rate", "1", "--status", "429",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _, listed = await sandbox_answer(http, f"{base}/_sandbox/profiles")
        status, _ = await sandbox_answer(
            http,
            f"{base}/v1/profile/indexing?source_key={SAMPLE_SOURCE_KEY}&key={JOHN_DOE_KEY}",
            {"X-API-KEY": "sandbox-api-key", "X-USER-EMAIL": "sandbox@hrflow.local"},
        )
    finally:
        process.terminate()
        await process.wait()
    assert status == 429
    keys = [p["key"] for p in listed["profiles"] if p.get("key") == JOHN_DOE_KEY]
    assert len(keys) == profiles


async def test_send_suggests_the_right_name_for_a_misspelt_event_type() -> None:
    code, _, err = await cli(
        "send", "profile.parsing.succes", "--profile-key", "k", "--source-key", "s"
    )
    assert code == 2
    assert "did you mean 'profile.parsing.success'" in err
    assert "--allow-unknown" in err


async def test_version_is_printed() -> None:
    code, out, _ = await cli("--version")
    assert code == 0
    assert out.strip() == "hrflow-webhooks 0.1.0"


async def test_dead_letters_with_redis_down_is_one_line_not_a_traceback() -> None:
    code, _, err = await cli(
        "dead-letters", "list", env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    )
    assert code == 1
    assert err.strip() == "error: redis is unreachable: connection failed"


async def test_help_marks_required_options_and_has_no_type_noise() -> None:
    for command in (["erase"], ["send"], ["run"], ["dead-letters", "list"]):
        code, out, _ = await cli(*command, "--help")
        assert code == 0
        assert "<bool>" not in out, command
    _, reconcile_help, _ = await cli("reconcile", "--help")
    assert "[required]" in reconcile_help


# --- reconcile ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listing", "reason"),
    [
        ("huge", "truncated"),  # one page of 100,000 profiles, when 100 were asked for
        ("garbled", "error"),  # a meta whose page count is not a number
    ],
)
async def test_reconcile_on_a_hostile_listing_ends_in_one_line_and_a_report(
    redis: Redis, redis_server: RedisServer, listing: str, reason: str
) -> None:
    huge = fresh_page(100_000)
    garbled = {"data": [listed("pk-1", None)], "meta": {"page": 1, "maxPage": "many"}}
    answer = huge if listing == "huge" else garbled
    async with HostileListing(lambda page, limit: answer) as hrflow:
        env = {
            "REDIS_URL": redis_server.url,
            "HRFLOW_API_URL": hrflow.api_url,
            "HRFLOW_API_KEY": HOSTILE_API_KEY,
            "HRFLOW_API_USER": HOSTILE_API_USER,
            "HRFLOW_EDIT_TAGS": "reviewed=yes",  # a handler of the storing events
        }
        code, out, err = await cli("reconcile", "--source", "sk-1", "--since", "1h", env=env)
    assert code == 1
    assert out.startswith("scanned ")
    assert "Traceback" not in err
    [line] = [text for text in err.splitlines() if text.startswith("error: ")]
    assert line.startswith(f"error: stopped early ({reason})")
    [report] = await EventLog(redis, QueueKeys("hrflow:queue")).reconcile_runs()
    assert report.stop_reason == reason
    assert await redis.zcard("hrflow:queue") == (100 if listing == "huge" else 0)
