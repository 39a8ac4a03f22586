"""Observability end to end: metrics counted against the events sent, logs and metrics free of
personal data and secrets, and the operator's health check.

Everything runs for real: uvicorn on a loopback port, the test's redis-server, an arq
worker serving its metrics over HTTP. Prometheus counters are process-global, so counts
are checked as deltas between a scrape before and a scrape after.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from arq import Worker, func
from arq.connections import RedisSettings, create_pool
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from bench.procs import terminate
from control.commands import web_argv, worker_argv
from control.health import check
from hrflow_client.metrics import record_api_call, record_rate_wait
from hrflow_webhooks.errors import PermanentError
from hrflow_webhooks.events import Event
from hrflow_webhooks.logs import BatchedLineHandler, configure_logging
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from receiver.metrics import ENQUEUE_BUCKETS_S, ReceiverCollector, ReceiverCounts
from sandbox import DEFAULT_API_KEY, DEFAULT_API_USER, HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY, samples
from tests.polling import eventually
from tests.redis_server import RedisServer, free_port
from tests.sandbox_fixtures import SandboxServer
from tests.service import (
    METRICS_HEADERS,
    WEBHOOK_SECRET,
    ReceiverServer,
    answers,
    make_settings,
    parsing_event,
    polling,
    receiver,
    recorder,
    signed_headers,
)
from workers.context import HandlerContext
from workers.metrics_server import (
    WorkerMetricsServer,
    start_worker_metrics,
    stop_worker_metrics,
)
from workers.plugins import build_registry
from workers.registry import Registry
from workers.settings import create_worker

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- helpers ---------------------------------------------------------------------------------


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every label set that includes ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url, headers=METRICS_HEADERS) as response:
        assert response.status == 200
        return await response.text()


async def wait_until_drained(redis: Redis, settings: Settings) -> None:
    queue = QueueKeys(settings.queue_name).queue

    async def queue_is_empty() -> bool:
        return int(await redis.zcard(queue)) == 0

    await eventually(queue_is_empty)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, registry: Registry) -> AsyncIterator[Worker]:
    """A long-running (not burst) worker, so its metrics server is up while the test scrapes."""
    worker = create_worker(settings, registry, handle_signals=False)
    async with polling(worker) as task:

        async def started() -> bool:
            if task.done():
                task.result()  # a start-up error surfaces here
            return "metrics_server" in worker.ctx

        await eventually(started, "the worker's metrics server")
        yield worker


def worker_metrics_url(worker: Worker) -> str:
    server: WorkerMetricsServer = worker.ctx["metrics_server"]
    return f"http://127.0.0.1:{server.port}/metrics"


# --- metrics against the events sent ---------------------------------------------------------


async def test_receiver_and_worker_metrics_count_the_events_sent(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    sent = 5
    settings = make_settings(redis_server.url, worker_metrics_port=0)
    registry = Registry()
    seen = recorder(registry, "profile.parsing.success")
    async with receiver(settings) as server:
        before = parse_metrics(await get_text(http, f"{server.url}/metrics"))
        for i in range(sent):
            assert (await server.post(http, parsing_event(f"pk-{i}")))[0] == 202
        assert (await server.post(http, parsing_event("pk-0")))[1]["duplicates"] == 1
        assert (await server.post(http, {"type": "profile.teleporting.success"}))[0] == 202
        wrong = signed_headers(parsing_event(), "not-the-secret")
        assert (await server.post(http, parsing_event(), headers=wrong))[0] == 401
        after = parse_metrics(await get_text(http, f"{server.url}/metrics"))

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("hrflow_webhook_deliveries_total", outcome="queued") == sent + 1
    assert delta("hrflow_webhook_deliveries_total", outcome="duplicate") == 1
    assert delta("hrflow_webhook_deliveries_total", outcome="bad_signature") == 1
    parsing = "profile.parsing.success"
    assert delta("hrflow_webhook_events_total", canonical_type=parsing, queued="yes") == sent
    assert delta("hrflow_webhook_events_total", canonical_type=parsing, queued="no") == 1
    assert delta("hrflow_webhook_events_total", canonical_type="other", queued="yes") == 1
    assert delta("hrflow_webhook_enqueue_seconds_count") == sent + 2
    assert value(after, "hrflow_webhook_requests_in_flight") == 0

    async with running_worker(settings, registry) as worker:
        await wait_until_drained(redis, settings)
        after = parse_metrics(await get_text(http, worker_metrics_url(worker)))

    assert len(seen) == sent
    runs = {"canonical_type": parsing, "handler": "recorder"}
    assert delta("hrflow_worker_handler_runs_total", **runs, outcome="ok") == sent
    assert delta("hrflow_worker_handler_seconds_count", **runs) == sent
    assert delta("hrflow_worker_handler_runs_total", canonical_type="other") == 1
    assert delta("hrflow_worker_pickup_seconds_count") == sent + 1
    assert delta("hrflow_worker_retries_total") == 0
    assert delta("hrflow_worker_dead_letters_total") == 0
    assert value(after, "hrflow_queue_redis_up") == 1
    assert value(after, "hrflow_queue_events", state="ready") == 0
    assert value(after, "hrflow_queue_events", state="deferred") == 0
    assert value(after, "hrflow_queue_oldest_ready_age_seconds") == 0
    assert value(after, "hrflow_dead_letters_stored") == 0


async def test_queue_gauges_read_depth_age_and_dead_letters_from_redis(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    keys = QueueKeys(settings.queue_name)
    async with receiver(settings) as server:
        _, _body = await server.post(http, [parsing_event(f"pk-{i}") for i in range(4)])
    first, _, _, last = [run.decode() for run in await redis.zrange(keys.queue, 0, -1)]
    now_ms = time.time() * 1000
    await redis.zadd(keys.queue, {first: now_ms - 120_000}, xx=True)  # due two minutes ago
    await redis.zadd(keys.queue, {last: now_ms + 600_000}, xx=True)  # a retry, later
    await redis.zadd(keys.dead_letters, {"letter-1": now_ms, "letter-2": now_ms})
    metrics = WorkerMetricsServer(settings, 0)
    try:
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        samples = parse_metrics(await get_text(http, url))
        redis_server.stop()
        try:
            while_down = parse_metrics(await get_text(http, url))
        finally:
            redis_server.start()
    finally:
        metrics.close()
    assert value(samples, "hrflow_queue_redis_up") == 1
    assert value(samples, "hrflow_queue_events", state="ready") == 3
    assert value(samples, "hrflow_queue_events", state="deferred") == 1
    assert 120 <= value(samples, "hrflow_queue_oldest_ready_age_seconds") < 3_600
    assert value(samples, "hrflow_dead_letters_stored") == 2
    assert value(while_down, "hrflow_queue_redis_up") == 0
    assert ("hrflow_queue_events", (("state", "ready"),)) not in while_down


async def test_a_worker_started_again_without_shutdown_reuses_its_metrics_port(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """arq's close() runs on_shutdown only after a Redis call succeeds; when it fails the
    server keeps its port, and the next worker of the process must not fail to bind it."""
    settings = make_settings(redis_server.url, worker_metrics_port=free_port())
    first = start_worker_metrics(settings)
    second = start_worker_metrics(settings)
    try:
        assert first is not None
        assert second is first
        url = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
        assert value(parse_metrics(await get_text(http, url)), "hrflow_queue_redis_up") == 1
    finally:
        stop_worker_metrics(second)
    third = start_worker_metrics(settings)  # the port was released and forgotten
    stop_worker_metrics(third)
    assert third is not first


def test_client_metrics_keep_profile_keys_and_queries_out_of_labels() -> None:
    key = "c4ade5ca8f3ebab04acc5e91fde5f9bb400d60cb"
    before = parse_metrics(_exposition())
    record_api_call(f"get /v1/profile/indexing?source_key=sk&key={key}", 200, 0.05)
    record_api_call(f"PUT /v1/profiles/{key}/tags", 429, 0.01)
    record_api_call("POST /v1/profile/indexing", None, 10.0)
    record_rate_wait(0.2)
    record_rate_wait(0.0)
    after = parse_metrics(_exposition())

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    calls = "hrflow_api_calls_total"
    assert delta(calls, endpoint="GET /v1/profile/indexing", status="200") == 1
    assert delta(calls, endpoint="PUT /v1/profiles/{id}/tags", status="429") == 1
    assert delta(calls, endpoint="POST /v1/profile/indexing", status="error") == 1
    assert delta("hrflow_api_call_seconds_count", endpoint="POST /v1/profile/indexing") == 1
    assert delta("hrflow_api_rate_wait_seconds_count") == 1
    assert delta("hrflow_api_rate_wait_seconds_sum") == pytest.approx(0.2)
    assert key not in _exposition()


def _exposition() -> str:
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY).decode()


# --- personal data and secrets stay out of logs and metrics ----------------------------------

# The HrFlow docs' sample profile (profile-indexing-post.txt), with the contact details the
# docs leave blank filled in, so that each kind of personal value is there to leak.
HARRY_POTTER: dict[str, Any] = {
    "key": "c4ade5ca8f3ebab04acc5e91fde5f9bb400d60cb",
    "source": {"key": "source_key"},
    "info": {
        "full_name": "Harry Potter",
        "first_name": "Harry",
        "last_name": "Potter",
        "date_birth": "1990-08-09T00:00:00+0000",
        "email": "harry.potter@hogwarts.example",
        "phone": "+44 7700 900202",
        "location": {"text": "4 Privet Drive, Little Whinging"},
        "urls": {"linkedin": "https://www.linkedin.com/in/harry-potter-0202"},
        "summary": "Brief summary",
    },
    "text": "Harry Potter 0202 Brief summary Mathematic Departement Developping Mathematicien",
    "experiences": [
        {"title": "Lead", "description": "Developping.", "company": "Mathematic Departement"}
    ],
    "educations": [{"title": "Mathematicien", "school": "University", "description": "Sorting"}],
}
PERSONAL_VALUES = (
    "Harry",
    "Potter",
    "harry.potter@hogwarts.example",
    "hogwarts",
    "7700 900202",
    "1990-08-09",
    "Privet Drive",
    "linkedin.com/in",
    "Brief summary",
    "Mathematic Departement",
    "Developping",
    "Mathematicien",
)
API_KEY = "api-secret-do-not-log-3f9a"


async def look_and_log(event: Event, ctx: HandlerContext) -> None:
    """A careless handler: puts the whole profile into ``extra`` and the metrics endpoint."""
    info = event["profile"]["info"]
    ctx.logger.info("read the profile", extra={"profile": event["profile"], "email": info["email"]})
    record_api_call(
        f"GET /v1/profile/indexing?key={event['profile']['key']}&e={info['email']}", 200, 0.1
    )


async def fail_permanently(event: Event, ctx: HandlerContext) -> None:
    info = event["profile"]["info"]
    raise PermanentError(f"cannot index {info['full_name']} <{info['email']}>")


async def fail_every_time(event: Event, ctx: HandlerContext) -> None:
    raise RuntimeError(f"upstream rejected {event['profile']['info']['phone']}")  # transient


def register_careless_handlers(registry: Registry) -> None:
    registry.add("profile.parsing.success", look_and_log, name="look_and_log")
    registry.add("profile.parsing.success", fail_permanently, name="fail_permanently")
    registry.add("profile.parsing.success", fail_every_time, name="fail_every_time")


@contextlib.contextmanager
def production_logging() -> Iterator[None]:
    """The service's own logging set-up (JSON on stderr, arq's filter) for one test, at DEBUG."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "arq.worker")
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    levels = {n: logging.getLogger(n).level for n in names}
    configure_logging("DEBUG", "json")
    for name in names:  # uvicorn's config set WARNING on its loggers: let everything through
        logging.getLogger(name).setLevel(logging.NOTSET)
    try:
        yield
    finally:
        for handler in root.handlers:
            if isinstance(handler, BatchedLineHandler):
                handler.close()  # its batched lines are written now, its thread stops
        root.handlers[:], _ = saved_root
        root.setLevel(saved_root[1])
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(levels[name])


async def send_profile_deliveries(server: ReceiverServer, http: aiohttp.ClientSession) -> str:
    """Accepted, duplicate, badly signed and malformed deliveries, all carrying the profile."""
    event = parsing_event(profile=HARRY_POTTER, message="Profile parsed: Harry Potter")
    status, body = await server.post(http, event)
    assert (status, body["queued"]) == (202, 1)
    assert (await server.post(http, event))[1]["duplicates"] == 1
    assert (await server.post(http, event, signed_headers(event, "wrong-secret")))[0] == 401
    assert (await server.post(http, [event, {"profile": HARRY_POTTER}]))[0] == 400
    return str(body["event_ids"][0])


async def test_no_personal_data_or_secret_in_any_log_line_or_metric(
    redis: Redis,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(redis_server.url, worker_metrics_port=0, max_tries=2, api_key=API_KEY)
    registry = Registry()
    register_careless_handlers(registry)
    server = ReceiverServer(settings)  # uvicorn configures its logging here: ours goes after
    with production_logging():
        async with server:
            event_id = await send_profile_deliveries(server, http)
            receiver_metrics = await get_text(http, f"{server.url}/metrics")
        async with running_worker(settings, registry) as worker:
            await wait_until_drained(redis, settings)
            worker_metrics = await get_text(http, worker_metrics_url(worker))
    logged = capfd.readouterr().err
    lines = [json.loads(line) for line in logged.splitlines() if line.strip()]

    assert all(isinstance(line, dict) for line in lines)  # one JSON object per line
    _assert_the_story_is_logged(lines, event_id)
    assert await redis.zcard(QueueKeys(settings.queue_name).dead_letters) == 2
    signature = signed_headers(parsing_event(profile=HARRY_POTTER))["HTTP-HRFLOW-SIGNATURE"]
    forbidden = (*PERSONAL_VALUES, WEBHOOK_SECRET, API_KEY, signature)
    assert leaks_in(logged, forbidden) == []
    # Keys may be logged (they are how an operator finds a profile), never be a label.
    assert leaks_in(receiver_metrics, (*forbidden, HARRY_POTTER["key"])) == []
    assert leaks_in(worker_metrics, (*forbidden, HARRY_POTTER["key"])) == []


def leaks_in(text: str, forbidden: Sequence[str]) -> list[str]:
    return [word for word in forbidden if word.lower() in text.lower()]


def _assert_the_story_is_logged(lines: list[dict[str, Any]], event_id: str) -> None:
    """The capture must have worked: the lines an operator needs are there, with their fields."""
    by_message: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_message.setdefault(line["message"], []).append(line)
    queued = by_message["delivery queued"]
    assert {(q["event_id"], q["canonical_type"]) for q in queued if q["queued"]} == {
        (event_id, "profile.parsing.success")
    }
    assert all("request_id" in q and "duration_ms" in q for q in queued)
    rejected = by_message["rejected request"][0]
    assert rejected["outcome"] == "bad_signature"
    assert rejected["reason"].startswith("signature does not match")
    failed = {(f["handler"], f["outcome"], f["job_try"]) for f in by_message["handler failed"]}
    assert failed == {("fail_permanently", "failed", 1), ("fail_every_time", "retry", 1),
                      ("fail_every_time", "retry", 2)}  # fmt: skip
    assert all(
        f["event_id"] == event_id and "duration_ms" in f for f in by_message["handler failed"]
    )
    dead = {(d["handler"], d["reason"]) for d in by_message["event dead-lettered"]}
    assert dead == {
        ("fail_permanently", "permanent error"),
        ("fail_every_time", "still failing after 2 tries"),
    }
    assert any(line["logger"].startswith("arq") for line in lines)
    assert any(line["logger"] == "uvicorn.access" for line in lines)
    assert any(line["message"] == "read the profile" for line in lines)


async def echo(ctx: dict[str, Any], who: str) -> str:
    return "echoed"


async def test_arq_lines_never_carry_job_arguments(
    redis: Redis, redis_server: RedisServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """arq logs ``→ job_id:function(arguments)`` when a job starts; our filter drops that line.

    Our own jobs' arguments start with the event id, so arq's 80-character cut hides the
    payload anyway; a job whose first argument is an email shows what the filter is for.
    """
    email = "harry.potter@hogwarts.example"
    arq_settings = RedisSettings.from_dsn(redis_server.url)
    pool = await create_pool(arq_settings, default_queue_name="test:arq-args")
    job = await pool.enqueue_job("echo", email)
    await pool.aclose()
    assert job is not None
    worker = Worker(
        functions=[func(echo, name="echo")],
        redis_settings=arq_settings,
        queue_name="test:arq-args",
        burst=True,
        handle_signals=False,
        poll_delay=0.01,
    )
    with production_logging():
        try:
            await worker.main()
        finally:
            await worker.close()
    logged = capfd.readouterr().err
    assert f"{job.job_id}:echo" in logged  # arq's finish line is there: the capture works
    assert email not in logged


def service_env(redis_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRFLOW_")}
    env |= {"REDIS_URL": redis_url, "HRFLOW_WEBHOOK_SECRET": WEBHOOK_SECRET}
    return env | {f"HRFLOW_{name.upper()}": value for name, value in settings.items()}


@contextlib.contextmanager
def service_process(command: list[str], env: dict[str, str], log: Path) -> Iterator[None]:
    """A process of the service, as deployed; stopped with SIGTERM, killed if it hangs."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr)
        try:
            yield
        finally:
            terminate(process, timeout_s=30)


async def scrape_when_up(http: aiohttp.ClientSession, url: str) -> Samples:
    """The samples at ``url``, once its process listens."""
    text = await eventually(
        lambda: get_text(http, url), url, ignoring=(aiohttp.ClientConnectionError,)
    )
    return parse_metrics(text)


async def test_deployed_processes_write_only_json_lines_and_serve_their_metrics(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The Procfile's web and worker lines (control.commands), as separate processes."""
    receiver_port, metrics_port, receiver_metrics_port = free_port(), free_port(), free_port()
    env = service_env(
        redis_server.url,
        worker_metrics_port=str(metrics_port),
        receiver_metrics_port=str(receiver_metrics_port),
    )
    uvicorn = web_argv(receiver_port, "127.0.0.1")
    worker = worker_argv()
    base = f"http://127.0.0.1:{receiver_port}"
    events = [parsing_event(f"pk-{i}", type="profile.teleporting.success") for i in range(3)]
    events[0]["profile"] = HARRY_POTTER
    with (
        service_process(uvicorn, env, tmp_path / "receiver.log"),
        service_process(worker, env, tmp_path / "worker.log"),
    ):
        receiver_metrics = f"http://127.0.0.1:{receiver_metrics_port}/metrics"
        # The metrics port is up during the lifespan, before uvicorn's own port.
        await scrape_when_up(http, receiver_metrics)
        await eventually(lambda: answers(http, f"{base}/healthz"), "uvicorn's /healthz")
        async with http.get(f"{base}/metrics") as public:
            assert public.status == 404  # no token set: not on the public port
        for event in events:
            async with http.post(
                f"{base}/webhook", data=json.dumps(event), headers=signed_headers(event)
            ) as answer:
                assert answer.status == 202
        receiver_samples = await scrape_when_up(http, receiver_metrics)
        await wait_until_drained(redis, make_settings(redis_server.url))
        worker_samples = await scrape_when_up(http, f"http://127.0.0.1:{metrics_port}/metrics")

    deliveries = value(
        receiver_samples, "hrflow_webhook_deliveries_total", outcome="queued", reason=""
    )
    assert deliveries == 3
    unrouted = {"canonical_type": "other", "handler": "-", "outcome": "unrouted"}
    assert value(worker_samples, "hrflow_worker_handler_runs_total", **unrouted) == 3
    assert value(worker_samples, "hrflow_queue_redis_up") == 1
    for name in ("receiver.log", "worker.log"):
        text = (tmp_path / name).read_text()
        lines = [json.loads(line) for line in text.splitlines()]  # each one JSON, or fail
        assert len(lines) > 3, name
        assert all(isinstance(line, dict) for line in lines), name
        assert [v for v in PERSONAL_VALUES if v.lower() in text.lower()] == [], name
    # --no-access-log holds: each delivery is one line, the receiver's own, not two.
    receiver_lines = [
        json.loads(line) for line in (tmp_path / "receiver.log").read_text().splitlines()
    ]
    assert [line for line in receiver_lines if line["logger"] == "uvicorn.access"] == []
    assert sum(line["message"] == "delivery queued" for line in receiver_lines) == len(events)
    # uvicorn ends a SIGTERMed server by re-raising the signal (no exit hook runs): the
    # batched lines must be out by then, its last words included.
    assert receiver_lines[-1]["message"].startswith("Finished server process")


def harry_potter_with_contacts() -> dict[str, Any]:
    """The sandbox's seed, with the contact details the docs leave blank filled in."""
    profile = samples.harry_potter()
    profile["info"] |= {
        "email": HARRY_POTTER["info"]["email"],
        "phone": HARRY_POTTER["info"]["phone"],
        "location": HARRY_POTTER["info"]["location"],
        "urls": HARRY_POTTER["info"]["urls"],
    }
    return profile


async def test_built_in_handlers_and_the_client_log_no_profile_read_from_hrflow(
    redis: Redis,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The real path: the event names a profile, the index and edit handlers GET it from the
    (sandbox) HrFlow API, and their writes fail: a 400 dead-letters at once, 503s after retries."""
    async with SandboxServer() as api:
        api.state.profiles.clear()
        api.state.profiles.add(SAMPLE_SOURCE_KEY, harry_potter_with_contacts(), HARRY_POTTER_KEY)
        for endpoint, status in (
            ("POST /v1/profile/indexing", 400),
            ("PUT /v1/profile/indexing", 503),
        ):
            await http.post(
                f"{api.url}/_sandbox/faults", json={"endpoint": endpoint, "status": status}
            )
        settings = api.settings(
            redis_server.url,
            index_source_key="copies",
            edit_tags="screened=yes",
            max_tries=2,
            worker_metrics_port=0,
        )
        event = parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY)
        server = ReceiverServer(settings)
        with production_logging():
            async with server:
                assert (await server.post(http, event))[0] == 202
            async with running_worker(settings, build_registry(settings)) as worker:
                await wait_until_drained(redis, settings)
                worker_metrics = await get_text(http, worker_metrics_url(worker))
        calls = [f"{call['method']} {call['path']}" for call in api.state.calls]
    # The sandbox stands in for HrFlow's servers: its own access log is not the service's.
    logged = "\n".join(
        line
        for line in capfd.readouterr().err.splitlines()
        if '"logger":"aiohttp.access"' not in line
    )
    assert "GET /v1/profile/indexing" in calls  # the profile was read
    assert await redis.zcard(QueueKeys(settings.queue_name).dead_letters) == 2
    assert '"handler":"builtin.index"' in logged
    assert '"handler":"builtin.edit"' in logged
    api_calls = parse_metrics(worker_metrics)
    assert (
        total(
            api_calls, "hrflow_api_calls_total", endpoint="PUT /v1/profile/indexing", status="503"
        )
        >= 2
    )
    forbidden = (*PERSONAL_VALUES, WEBHOOK_SECRET, DEFAULT_API_KEY, DEFAULT_API_USER)
    assert leaks_in(logged, forbidden) == []
    assert leaks_in(worker_metrics, (*forbidden, HARRY_POTTER_KEY)) == []


# --- the operator's health check -------------------------------------------------------------


async def test_check_reports_that_no_worker_has_reported(
    redis: Redis, redis_server: RedisServer
) -> None:
    problems = await check(make_settings(redis_server.url), max_queue_age_s=300)
    assert len(problems) == 1
    assert problems[0].startswith("no worker has reported in the last 11 s")


async def test_check_is_clean_while_a_worker_heartbeats_and_not_after(
    redis: Redis, redis_server: RedisServer
) -> None:
    settings = make_settings(redis_server.url)
    health_key = QueueKeys(settings.queue_name).health_check

    async def heartbeat_written() -> bool:
        return bool(await redis.exists(health_key))

    async with running_worker(settings, Registry()):
        await eventually(heartbeat_written)
        assert await check(settings, max_queue_age_s=300) == []
    # arq deletes its key on a clean shutdown, so a stopped worker shows at once
    assert [p[:26] for p in await check(settings, 300)] == ["no worker has reported in "]


async def test_check_reports_an_event_waiting_too_long(
    redis: Redis, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url)
    keys = QueueKeys(settings.queue_name)
    async with receiver(settings) as server:
        _, _body = await server.post(http, parsing_event())
    await redis.set(keys.health_check, b"a worker", px=60_000)  # as arq's heartbeat does
    assert await check(settings, max_queue_age_s=300) == []
    [run_id] = await redis.zrange(keys.queue, 0, -1)
    await redis.zadd(keys.queue, {run_id: time.time() * 1000 - 400_000}, xx=True)
    problems = await check(settings, max_queue_age_s=300)
    assert len(problems) == 1
    assert "the oldest queued event has waited 400 s, over the 300 s limit" in problems[0]


async def test_check_reports_redis_unreachable(redis_server: RedisServer) -> None:
    settings = make_settings(redis_server.url, redis_timeout_s=0.5)
    redis_server.stop()
    try:
        problems = await check(settings, max_queue_age_s=300)
    finally:
        redis_server.start()
    assert problems == ["redis is unreachable: connection failed"]
    assert "127.0.0.1" not in problems[0]  # the URL may carry a password: never shown


def test_receiver_counts_expose_what_prometheus_client_would() -> None:
    """The receiver counts in plain ints: its histogram must read as prometheus_client's own."""
    registry = CollectorRegistry()
    reference = Histogram(
        "hrflow_webhook_enqueue_seconds", "reference", buckets=ENQUEUE_BUCKETS_S, registry=registry
    )
    counts = ReceiverCounts()
    for seconds in (0.0001, 0.0005, 0.0007, 0.001, 0.003, 0.02, 0.02, 0.3, 0.9, 1.0, 4.2):
        reference.observe(seconds)
        counts.enqueued_in(seconds)
    counts.delivery("queued")
    counts.delivery("bad_signature", "wrong secret")
    ours = {
        family.name: family
        for family in text_string_to_metric_families(
            generate_latest(registry_with(ReceiverCollector(counts))).decode()
        )
    }
    expected = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    got = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for sample in ours["hrflow_webhook_enqueue_seconds"].samples
    }
    assert got == pytest.approx(expected)
    deliveries = {
        tuple(sorted(s.labels.items())): s.value for s in ours["hrflow_webhook_deliveries"].samples
    }
    assert deliveries == {
        (("outcome", "queued"), ("reason", "")): 1,
        (("outcome", "bad_signature"), ("reason", "wrong secret")): 1,
    }


def registry_with(collector: ReceiverCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry
