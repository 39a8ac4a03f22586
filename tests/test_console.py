"""The operator console over HTTP: who gets in, which POSTs are refused, what pages show.

A real Redis, the real receiver and worker against the sandbox make the state (tests/
console_fixtures.py); the console is served by uvicorn on loopback and read with aiohttp.
The browser's view is tests/test_console_browser.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from pydantic import SecretStr
from redis.asyncio import Redis

from control.commands import console_argv
from control.console.access import (
    COOKIE_NAME,
    CSRF_FIELD,
    SESSION_LIFETIME_S,
    new_session_cookie,
    safe_next,
    session_is_valid,
)
from control.console.serve import ConsoleSetupError, check_port, decide_token
from control.console.throttle import LOGIN_FAILURES_ALLOWED
from control.runner import CONSOLE_TOKEN_FILE_NAME, RunOptions, banner, plan_run
from hrflow_client.errors import BadRequest
from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys, tag_of
from hrflow_webhooks.settings import Settings
from sandbox import HARRY_POTTER_KEY, JOHN_DOE_KEY, SAMPLE_SOURCE_KEY
from tests.console_fixtures import (
    BEARER,
    CONSOLE_TOKEN,
    PERSONAL_DATA,
    UNROUTED_TYPE,
    ConsoleProcess,
    ConsoleServer,
    console_settings,
    deliver,
    edit_registry,
    log_in,
    post,
    seed_service,
)
from tests.polling import eventually
from tests.processes import ROOT
from tests.redis_server import RedisServer
from tests.sandbox_fixtures import SandboxServer
from tests.service import drain, enqueue, make_settings, parsing_event
from workers.dead_letters import DeadLetters
from workers.heartbeats import WorkerBeat
from workers.registry import Registry
from workers.settings import create_worker

PAGES = ("/", "/events", "/dead-letters", "/skips", "/unrouted", "/reconciliation")


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str, CIMultiDictProxy[str]]:
    async with http.get(url, headers=headers or {}, allow_redirects=False) as answer:
        return answer.status, await answer.text(), answer.headers


async def letters(redis: Redis, settings: Settings) -> list[dict[str, object]]:
    store = DeadLetters(redis, QueueKeys(settings.queue_name))
    return [letter async for letter in store.iter()]


# --- access -----------------------------------------------------------------------------------


async def test_without_the_token_every_page_is_refused_with_the_login_form(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with ConsoleServer(make_settings(redis_server.url)) as console:
        wrong_bearers = 0
        for path in [*PAGES, "/events/abc", "/dead-letters/abc"]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "hrflow_console=x"}):
                status, body, answer = await get(http, console.url + path, headers)
                if "Authorization" in headers:  # a token try: past a few, the address waits
                    wrong_bearers += 1
                    if wrong_bearers > LOGIN_FAILURES_ALLOWED:
                        assert status == 429, (path, headers)
                        continue
                assert status == 401, (path, headers)
                assert 'action="/login"' in body
                assert answer["WWW-Authenticate"].startswith("Bearer")
        assert (await get(http, f"{console.url}/login"))[0] == 200
        assert (await get(http, f"{console.url}/healthz"))[1] == "ok"


async def test_the_login_form_sets_a_hardened_cookie_that_is_not_the_token(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with ConsoleServer(make_settings(redis_server.url)) as console:
        status, body, _ = await post(http, f"{console.url}/login", None, {"token": "nope"})
        assert status == 401
        assert "not the console" in body
        async with http.post(
            f"{console.url}/login",
            data={"token": CONSOLE_TOKEN, "next": "/skips"},
            allow_redirects=False,
        ) as answer:
            assert (answer.status, answer.headers["Location"]) == (303, "/skips")
            set_cookie = answer.headers["Set-Cookie"]
            cookie = answer.cookies[COOKIE_NAME].value
        assert "HttpOnly" in set_cookie
        assert "SameSite=strict" in set_cookie or "SameSite=Strict" in set_cookie
        assert CONSOLE_TOKEN not in set_cookie
        status, _, _ = await get(http, f"{console.url}/", {"Cookie": f"{COOKIE_NAME}={cookie}"})
        assert status == 200


def test_a_session_cookie_is_bound_to_the_token_and_expires() -> None:
    now = time.time()
    cookie = new_session_cookie(CONSOLE_TOKEN, now)
    assert session_is_valid(CONSOLE_TOKEN, cookie, now)
    assert not session_is_valid("rotated-token", cookie, now)
    assert not session_is_valid(CONSOLE_TOKEN, cookie, now + SESSION_LIFETIME_S + 1)
    issued, nonce, mac = cookie.split(".")
    assert not session_is_valid(CONSOLE_TOKEN, f"{int(issued) + 1}.{nonce}.{mac}", now)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("/events?x=1", "/events?x=1"), ("//evil.example", "/"), ("https://evil.example", "/"),
     ("/\\evil.example", "/"), (None, "/")],
)  # fmt: skip
def test_login_only_sends_back_to_the_console_itself(given: str | None, expected: str) -> None:
    assert safe_next(given) == expected


async def test_every_answer_carries_the_security_headers(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with ConsoleServer(make_settings(redis_server.url)) as console:
        for path, headers in (("/", BEARER), ("/", {}), ("/static/console.css", {})):
            _, _, answer = await get(http, console.url + path, headers)
            csp = answer["Content-Security-Policy"]
            assert "default-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp
            assert answer["X-Frame-Options"] == "DENY"
            assert answer["Referrer-Policy"] == "no-referrer"
            assert answer["Cache-Control"] == "no-store"


# --- actions: CSRF and origin -----------------------------------------------------------------


async def dead_letter_of_harry(
    settings: Settings, sandbox: SandboxServer, redis: Redis, http: aiohttp.ClientSession
) -> dict[str, object]:
    from sandbox.faults import Fault

    sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=400))
    await deliver(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    await drain(settings, edit_registry(settings))
    sandbox.state.faults.clear()
    [letter] = await letters(redis, settings)
    return letter


async def test_an_action_needs_the_sessions_csrf_token_and_the_consoles_origin(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
) -> None:
    settings = console_settings(sandbox, redis_server.url)
    letter = await dead_letter_of_harry(settings, sandbox, redis, http)
    async with ConsoleServer(settings) as console:
        session = await log_in(http, console.url)
        replay = f"{console.url}/dead-letters/{letter['id']}/replay"
        other = await log_in(http, console.url)  # another session: another CSRF token
        assert other.csrf != session.csrf
        refused = [
            await post(http, replay, session, {}),
            await post(http, replay, session, {"csrf": ""}),
            await post(http, replay, session, {"csrf": other.csrf}),
            await post(http, replay, session, {"csrf": session.csrf},
                       {"Origin": "https://evil.example"}),
            await post(http, replay, session, {"csrf": session.csrf}, {"Origin": "null"}),
            await post(
                http, replay, session, {"csrf": session.csrf}, {"Sec-Fetch-Site": "cross-site"}
            ),
            await post(
                http,
                replay,
                session,
                {"csrf": session.csrf},
                {"Origin": "null", "Sec-Fetch-Site": "same-site"},
            ),
        ]  # fmt: skip
        assert [status for status, _, _ in refused] == [403] * 7
        assert len(await letters(redis, settings)) == 1  # nothing was replayed
        assert (await post(http, replay, None, {"csrf": session.csrf}))[0] == 401

        # What chromium sends from the console's own form under Referrer-Policy: no-referrer.
        own_form = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
        status, _, location = await post(http, replay, session, {"csrf": session.csrf}, own_form)
        assert (status, location) == (303, f"/events/{letter['event']['id']}?notice=replayed")  # type: ignore[index]
        assert await letters(redis, settings) == []


async def test_a_bearer_client_acts_without_a_csrf_token(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
) -> None:
    """A browser never adds an Authorization header by itself: no cross-site forgery."""
    settings = console_settings(sandbox, redis_server.url)
    letter = await dead_letter_of_harry(settings, sandbox, redis, http)
    async with ConsoleServer(settings) as console:
        url = f"{console.url}/dead-letters/{letter['id']}/purge"
        assert (await post(http, url, None, {}, BEARER))[0] == 400  # the confirmation box
        assert (await post(http, url, None, {"confirm": "yes"}, BEARER))[0] == 303
    assert await letters(redis, settings) == []


# --- pages ------------------------------------------------------------------------------------


async def test_pages_show_the_service_state_and_no_personal_data(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
) -> None:
    settings = console_settings(sandbox, redis_server.url)
    await seed_service(settings, sandbox, http)
    [letter] = await letters(redis, settings)
    queued = await enqueue(settings, redis, parsing_event("pk-waiting", "sk-1"))
    async with ConsoleServer(settings) as console:
        pages = {path: await get(http, console.url + path, BEARER) for path in PAGES}
        timeline = await get(http, f"{console.url}/events/{letter['event']['id']}", BEARER)  # type: ignore[index]
        one = await get(http, f"{console.url}/dead-letters/{letter['id']}", BEARER)
    assert all(status == 200 for status, _, _ in [*pages.values(), timeline, one])
    overview = pages["/"][1]
    assert '<dd id="queue-ready">1</dd>' in overview
    assert '<a href="/dead-letters" id="dead-count">1</a>' in overview
    assert 'http-equiv="refresh"' in overview
    assert "<svg" in overview
    assert "AOF on, appendfsync always" in overview
    events = pages["/events"][1]
    assert queued[0].id[:12] in events
    letters_page = pages["/dead-letters"][1]
    assert f"profile/{SAMPLE_SOURCE_KEY}/key:{HARRY_POTTER_KEY}" in letters_page
    assert "permanent error" in letters_page
    assert "<b>400</b>" in letters_page
    assert "builtin.edit" in pages["/skips"][1]
    assert "echo of our own write" in pages["/skips"][1]
    assert UNROUTED_TYPE in pages["/unrouted"][1]
    assert "dead_lettered" in timeline[1]
    assert "BadRequest" in one[1]
    for _, body, _ in [*pages.values(), timeline, one]:
        for personal in PERSONAL_DATA:
            assert personal not in body


async def test_the_overview_lists_each_live_worker_and_forgets_a_stopped_one(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    settings = console_settings(sandbox, redis_server.url, health_check_interval_s=1)
    keys = QueueKeys(settings.queue_name)
    # A worker of another host that stopped beating two minutes ago: listed, not alive.
    gone = WorkerBeat("other-host:7", time.time() - 120, 0, 5, 0, 0)
    await redis.hset(keys.workers, gone.worker_id, gone.to_json().decode())  # type: ignore[misc]
    worker = create_worker(settings, Registry(), handle_signals=False)
    running = asyncio.create_task(worker.main())
    try:
        await eventually(lambda: _field_count(redis, keys.workers, 2), "the worker's heartbeat")
        async with ConsoleServer(settings) as console:
            _, beating, _ = await get(http, console.url + "/", BEARER)
            await worker.close()
            _, stopped, _ = await get(http, console.url + "/", BEARER)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert f'<tr class="alive"><td class="mono">{worker.worker_id}</td>' in beating
    assert '<tr class="gone"><td class="mono">other-host:7</td>' in beating
    assert "1 alive" in beating
    assert worker.worker_id not in stopped  # a worker that stops removes its heartbeat
    assert "0 alive" in stopped
    assert "No worker has reported" in stopped


async def _field_count(redis: Redis, key: str, count: int) -> bool:
    return int(await redis.hlen(key)) == count  # type: ignore[misc]


@pytest.mark.parametrize(
    ("path", "auth"),
    [
        ("/login?notice=logged-out&count=%C2%B2", False),  # '²' passes str.isdigit()
        ("/events?limit=%C2%B2", True),
        ("/events?since=0001-01-01", True),  # before the log's first possible id
        ("/events?until=1969-12-31T23:00", True),
        ("/events?since=" + "9" * 400 + "d", True),  # no finite time
    ],
)
async def test_odd_query_values_get_an_answer_never_a_5xx(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
    path: str,
    auth: bool,
) -> None:
    settings = console_settings(sandbox, redis_server.url)
    async with ConsoleServer(settings) as console:
        status, body, _ = await get(http, console.url + path, BEARER if auth else {})
    assert status < 500, body[:300]


async def test_the_search_finds_a_profiles_events_and_reads_times_like_the_cli(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
) -> None:
    settings = console_settings(sandbox, redis_server.url)
    await seed_service(settings, sandbox, http)
    async with ConsoleServer(settings) as console:
        found = await get(
            http, f"{console.url}/events?profile_key={JOHN_DOE_KEY}&kind=handler&since=1h", BEARER
        )
        nothing = await get(http, f"{console.url}/events?profile_key=nobody", BEARER)
        wrong = await get(http, f"{console.url}/events?since=yesterday", BEARER)
    assert found[0] == 200
    john = Event.from_payload(parsing_event(JOHN_DOE_KEY, SAMPLE_SOURCE_KEY))
    assert f"/events/{john.id}" in found[1]
    assert f"key:{HARRY_POTTER_KEY}" not in found[1]
    assert "0 entries" in nothing[1]
    assert wrong[0] == 200
    assert "since: &#39;yesterday&#39; is neither a duration" in wrong[1]


async def test_operators_searches_scan_the_log_one_at_a_time(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
) -> None:
    """Every delivery waits behind a slice of a search: three operators searching at once
    take turns (one scan at a time per console process), so Redis never has their slices
    interleaved. Seen from Redis: the scans used one connection, not three."""
    settings = console_settings(sandbox, redis_server.url)
    events = [Event.from_payload(parsing_event(f"pk-{n}")) for n in range(20_000)]
    async with EventQueue(redis, settings.queue_name, 60) as queue:
        for start in range(0, len(events), 2_000):
            await queue.enqueue_events(events[start : start + 2_000])
    async with ConsoleServer(settings) as console:
        searches = [
            get(http, f"{console.url}/events?profile_key=nobody-{n}", BEARER) for n in range(3)
        ]
        answers = await asyncio.gather(*searches)
        clients = await redis.client_list()
    assert [status for status, _, _ in answers] == [200] * 3
    scanners = [c for c in clients if c["cmd"] in ("evalsha", "eval")]
    assert len(scanners) == 1, clients


async def test_a_letters_source_key_is_escaped_and_hrflow_messages_are_not_shown(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    [event] = await enqueue(settings, redis, parsing_event("pk-x", "<script>alert(1)</script>"))
    error = BadRequest(400, "<i>quoting a profile</i>", "PUT /v1/profile/indexing")
    store = DeadLetters(redis, QueueKeys(settings.queue_name))
    letter_id = await store.add(event, "run-x", "builtin.edit", error, 1, "permanent error")
    async with ConsoleServer(settings) as console:
        listing = (await get(http, f"{console.url}/dead-letters", BEARER))[1]
        one = (await get(http, f"{console.url}/dead-letters/{letter_id}", BEARER))[1]
    for body in (listing, one):
        assert "<script>" not in body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
        assert "quoting a profile" not in body
        assert "<b>400</b>" in body or "<dd>400</dd>" in body


async def test_a_dead_letter_by_e_mail_reference_never_shows_an_e_mail_on_any_page(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    by_email = parsing_event("unused", "sk-x")
    by_email["profile"] = {"reference": "luna.lovegood@example.com", "source": {"key": "sk-x"}}
    [event] = await enqueue(settings, redis, by_email)
    quoted = (
        "Invalid source fields: email luna.lovegood@example.com, cc x.lovegood@quibbler.example"
    )
    error = BadRequest(400, quoted, "PUT /v1/profile/indexing")
    store = DeadLetters(redis, QueueKeys(settings.queue_name))
    letter_id = await store.add(event, "run-x", "builtin.edit", error, 1, "permanent error")
    async with ConsoleServer(settings) as console:
        paths = [
            *PAGES,
            f"/dead-letters/{letter_id}",
            f"/events/{event.id}",
            "/events?kind=delivery",
        ]
        pages = {path: await get(http, console.url + path, BEARER) for path in paths}
    assert all(status == 200 for status, _, _ in pages.values())
    for path, (_, body, _) in pages.items():
        assert not re.search(r"[\w.+-]+(@|&#64;)[\w-]+\.\w", body), path
        assert "lovegood" not in body, path
    for path in ("/dead-letters", f"/dead-letters/{letter_id}"):
        body = pages[path][1]
        assert f"profile/sk-x/reference#{tag_of('luna.lovegood@example.com')}" in body
        assert "BadRequest" in body
        assert "400" in body


async def test_replay_all_matching_replays_only_the_filtered_letters(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    events = await enqueue(
        settings, redis, parsing_event("pk-a", "sk"), parsing_event("pk-b", "sk")
    )
    store = DeadLetters(redis, QueueKeys(settings.queue_name))
    error = BadRequest(400, "bad", "PUT /v1/profile/indexing")
    kept = await store.add(events[0], "run-a", "index", error, 1, "permanent error")
    await store.add(events[1], "run-b", "builtin.edit", error, 1, "permanent error")
    async with ConsoleServer(settings) as console:
        session = await log_in(http, console.url)
        status, _, location = await post(
            http,
            f"{console.url}/dead-letters/replay-matching",
            session,
            {"csrf": session.csrf, "handler": "builtin.edit", "type": "", "since": "1h"},
        )
    assert (status, location) == (303, "/dead-letters?notice=replayed-all&count=1")
    assert await store.ids() == [kept]


# --- start-up rules ---------------------------------------------------------------------------


def test_the_token_rule_decides_by_the_interface() -> None:
    with pytest.raises(ConsoleSetupError, match="HRFLOW_CONSOLE_TOKEN is not set"):
        decide_token(Settings(console_host="0.0.0.0"))
    generated = decide_token(Settings(console_host="127.0.0.1"))
    assert generated.generated
    assert len(generated.value) >= 32
    given = decide_token(Settings(console_host="0.0.0.0", console_token=SecretStr("t" * 20)))
    assert (given.value, given.generated) == ("t" * 20, False)
    with pytest.raises(ConsoleSetupError, match="at least 16"):
        decide_token(Settings(console_host="127.0.0.1", console_token=SecretStr("guessable")))
    with pytest.raises(ConsoleSetupError, match="public webhook port"):
        check_port(Settings(console_port=8000), "8000")


def test_the_console_command_refuses_a_public_interface_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRFLOW_")}
    env["HRFLOW_CONSOLE_HOST"] = "0.0.0.0"
    result = subprocess.run(
        [sys.executable, "-m", "control.cli", "console"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "refuses to listen on 0.0.0.0" in result.stderr


def test_run_starts_the_console_on_loopback_with_a_kept_token(tmp_path: Path) -> None:
    options = RunOptions(state_dir=tmp_path, console_port=18_123)
    plan = plan_run(Settings(), options)
    [spec] = [spec for spec in plan.specs if spec.name == "console"]
    assert spec.argv == console_argv()
    assert spec.restart  # the service runs without it
    token = (tmp_path / CONSOLE_TOKEN_FILE_NAME).read_text().strip()
    assert (spec.env["HRFLOW_CONSOLE_TOKEN"], spec.env["HRFLOW_CONSOLE_PORT"]) == (token, "18123")
    assert plan_run(Settings(), options).env["HRFLOW_CONSOLE_TOKEN"] == token  # kept
    shown = banner(plan, options, Settings())
    assert f"console         http://127.0.0.1:18123/  (token {token}" in shown


# --- sessions ---------------------------------------------------------------------------------


async def try_token(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, str, str]:
    async with http.post(
        f"{url}/login", data={"token": token, "next": "/"}, allow_redirects=False
    ) as answer:
        return answer.status, await answer.text(), answer.headers.get("Retry-After", "")


async def test_wrong_tokens_are_throttled_per_client_address_and_logged_without_the_token(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past a few wrong tokens an address is told to wait (429, Retry-After) and its tries
    are not even checked, so guessing goes no faster than the throttle. Each wrong token,
    and the start of the wait, is a log line with the address and the count, never what
    was tried."""
    settings = console_settings(sandbox, redis_server.url)
    guesses = [f"guess-{n:02d}-{'x' * 20}" for n in range(LOGIN_FAILURES_ALLOWED + 3)]
    with caplog.at_level(logging.INFO, logger="control.console"):
        async with ConsoleServer(settings) as console:
            answers = [await try_token(http, console.url, guess) for guess in guesses]
            right = await try_token(http, console.url, CONSOLE_TOKEN)
    statuses = [status for status, _, _ in answers]
    assert statuses == [401] * LOGIN_FAILURES_ALLOWED + [429] * 3
    assert int(answers[-1][2]) > 0
    assert "too many wrong tokens" in answers[-1][1]
    assert right[0] == 429  # even the right token waits: a guess cannot learn it was right
    failed = [r for r in caplog.records if r.getMessage() == "console login refused"]
    assert [r.failures for r in failed] == list(range(1, LOGIN_FAILURES_ALLOWED + 1))  # type: ignore[attr-defined]
    (throttled,) = [r for r in caplog.records if r.getMessage() == "console login throttled"]
    assert {r.client for r in [*failed, throttled]} == {"127.0.0.1"}  # type: ignore[attr-defined]
    logged = "\n".join(str(r.__dict__) for r in caplog.records)
    assert not any(guess in logged for guess in guesses)
    assert CONSOLE_TOKEN not in logged


async def test_logging_out_revokes_the_session_on_the_server(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """A cookie copied before logout (another tab, a stolen copy) no longer opens a page."""
    settings = console_settings(sandbox, redis_server.url)
    async with ConsoleServer(settings) as console:
        session = await log_in(http, console.url)
        assert (await get(http, f"{console.url}/", session.headers))[0] == 200
        status, _, location = await post(
            http, f"{console.url}/logout", session, {CSRF_FIELD: session.csrf}
        )
        assert (status, location) == (303, "/login?notice=logged-out")
        assert (await get(http, f"{console.url}/", session.headers))[0] == 401
        other = await log_in(http, console.url)  # other sessions live on
        assert (await get(http, f"{console.url}/", other.headers))[0] == 200


async def test_the_same_origin_check_trusts_the_configured_origin_not_the_host_header(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """A page at a name rebound to the console's address (DNS rebinding) sends its own name
    as both Host and Origin: a check built from Host lets it through. The console's origin
    is configured (HRFLOW_CONSOLE_ORIGIN behind a proxy; its loopback addresses otherwise)."""
    settings = console_settings(sandbox, redis_server.url)
    async with ConsoleServer(settings) as console:
        port = console.url.rsplit(":", 1)[1]
        rebound = {"Host": f"rebound.example:{port}", "Origin": f"http://rebound.example:{port}"}
        status, body, _ = await post(http, f"{console.url}/login", None, {"token": "x"}, rebound)
        assert (status, "another site" in body) == (403, True)
        own = {"Origin": f"http://localhost:{port}"}
        assert (await post(http, f"{console.url}/login", None, {"token": "x"}, own))[0] == 401
    proxied = console_settings(
        sandbox, redis_server.url, console_origin="https://console.example.com"
    )
    async with ConsoleServer(proxied) as console:
        behind = {"Origin": "https://console.example.com"}
        form = {"token": CONSOLE_TOKEN, "next": "/"}
        async with http.post(
            f"{console.url}/login", data=form, headers=behind, allow_redirects=False
        ) as answer:
            assert answer.status == 303
            assert "Secure" in answer.headers["Set-Cookie"]  # the operators' origin is https
        port = console.url.rsplit(":", 1)[1]
        local = {"Origin": f"http://127.0.0.1:{port}"}  # not where operators open it now
        assert (await post(http, f"{console.url}/login", None, form, local))[0] == 403


async def test_the_cookie_is_secure_when_a_trusted_proxy_says_https(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """Behind a TLS-terminating proxy the console itself speaks http: the proxy's
    X-Forwarded-Proto (trusted from FORWARDED_ALLOW_IPS, loopback by default) decides."""
    settings = console_settings(sandbox, redis_server.url)
    form = {"token": CONSOLE_TOKEN, "next": "/"}
    async with ConsoleServer(settings) as console:
        for proto, secure in (("https", True), ("http", False)):
            async with http.post(
                f"{console.url}/login",
                data=form,
                headers={"X-Forwarded-Proto": proto},
                allow_redirects=False,
            ) as answer:
                assert answer.status == 303
                assert ("Secure" in answer.headers["Set-Cookie"]) is secure


async def test_wrong_bearer_tokens_are_throttled_with_the_login_form(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """A Bearer header is a token try like the login form's: guessing through it goes no
    faster, and a waiting address is answered 429 before its token is looked at."""
    settings = console_settings(sandbox, redis_server.url)
    async with ConsoleServer(settings) as console:
        statuses = []
        for n in range(LOGIN_FAILURES_ALLOWED + 1):
            wrong = {"Authorization": f"Bearer guess-{n}-{'x' * 20}"}
            statuses.append((await get(http, f"{console.url}/", wrong))[0])
        right = (await get(http, f"{console.url}/", BEARER))[0]
        form = (await try_token(http, console.url, CONSOLE_TOKEN))[0]
    assert statuses == [401] * LOGIN_FAILURES_ALLOWED + [429]
    assert (right, form) == (429, 429)


async def test_the_deployed_console_throttles_the_socket_address_not_a_forwarded_one(
    redis: Redis, redis_server: RedisServer, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """X-Forwarded-For is trusted only from FORWARDED_ALLOW_IPS, and the console trusts no
    proxy unless that is set: a client on loopback (a port-forward, a tunnel) cannot pick a
    new address per guess."""
    settings = console_settings(sandbox, redis_server.url)
    console = ConsoleProcess(settings)
    try:
        statuses = []
        for n in range(LOGIN_FAILURES_ALLOWED + 1):
            forged = {"X-Forwarded-For": f"10.0.0.{n}"}
            form = {"token": f"guess-{n}-{'x' * 20}"}
            statuses.append((await post(http, f"{console.url}/login", None, form, forged))[0])
    finally:
        console.stop()
    assert statuses == [401] * LOGIN_FAILURES_ALLOWED + [429]
