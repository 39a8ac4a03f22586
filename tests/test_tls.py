"""Redis over TLS as managed Redis serves it: a real redis-server answering TLS only, with a
self-signed certificate (Heroku's kind). With ``?ssl_cert_reqs=none`` in ``REDIS_URL`` the
receiver, a worker process, the CLI and the console all use it; without it, each says in one
line why it cannot (the workers' pool once dropped the query string and retried for
minutes without a word while the receiver answered 202)."""

from __future__ import annotations

import asyncio
import html
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.console_fixtures import BEARER, ConsoleServer
from tests.plugins import behaviour
from tests.polling import eventually
from tests.processes import WorkerProcess
from tests.redis_server import TlsRedisServer, free_port
from tests.service import ReceiverServer, make_settings, parsing_event
from tests.test_cli import cli

UNTRUSTED = "TLS: the server's certificate is not trusted (self-signed?)"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(tmp_path / "redis-tls")
    server.start()
    yield server
    server.kill()


async def test_every_process_uses_a_tls_redis_with_a_self_signed_certificate(
    tls_redis: TlsRedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    url = tls_redis.trusting_url
    settings = make_settings(url)
    metrics_port = free_port()
    worker = WorkerProcess(url, tmp_path / "worker.log", worker_metrics_port=metrics_port)
    try:
        async with ReceiverServer(settings) as receiver:
            event = parsing_event("pk-tls")
            status, body = await receiver.post(http, event)
            assert status == 202, body
            async with Redis.from_url(url) as redis:

                async def handled() -> bool:
                    effects = await redis.lrange(behaviour.EFFECTS_KEY, 0, -1)
                    return body["event_ids"][0].encode() in effects

                await eventually(handled, "the worker's run, over TLS")
        scrape = f"http://127.0.0.1:{metrics_port}/metrics"
        async with http.get(scrape) as metrics:  # its queue gauges read Redis, over TLS too
            assert "hrflow_queue_redis_up 1.0" in await metrics.text()
        code, out, err = await cli("dead-letters", "list", env={"REDIS_URL": url})
        assert (code, out.strip()) == (0, "no dead letters"), err
        code, out, err = await cli("check", env={"REDIS_URL": url})
        assert "unreachable" not in out + err
        async with (
            ConsoleServer(settings) as console,
            http.get(f"{console.url}/", headers=BEARER) as page,
        ):
            assert page.status == 200
            assert "Redis is unreachable" not in await page.text()
    finally:
        worker.close()


async def test_without_trusting_the_certificate_each_process_says_why_in_one_line(
    tls_redis: TlsRedisServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = tls_redis.url  # no ssl_cert_reqs: the self-signed certificate is refused
    settings = make_settings(url)
    worker = WorkerProcess(url, tmp_path / "worker.log")
    try:
        with caplog.at_level(logging.ERROR, logger="hrflow_webhooks.durability"):
            async with ReceiverServer(settings) as receiver:
                status, body = await receiver.post(http, parsing_event("pk-tls"))
                assert status == 503, body  # never a 202 for an event Redis does not hold
        assert any(getattr(r, "reason", "").startswith(UNTRUSTED) for r in caplog.records), (
            "the receiver's durability watch names the certificate"
        )

        async def worker_says_why() -> bool:
            return any(
                json.loads(line).get("reason", "").startswith(UNTRUSTED)
                for line in (tmp_path / "worker.log").read_text().splitlines()
                if line.startswith("{")
            )

        await eventually(worker_says_why, "the worker's one line")
        code, out, _ = await cli("check", env={"REDIS_URL": url})
        assert code == 1
        assert out.startswith(f"problem: redis is unreachable: {UNTRUSTED}")
        code, _, err = await cli("dead-letters", "list", env={"REDIS_URL": url})
        assert code == 1
        assert err.startswith(f"error: redis is unreachable: {UNTRUSTED}")
        assert len(err.strip().splitlines()) == 1  # one line, no traceback
        async with (
            ConsoleServer(settings) as console,
            http.get(f"{console.url}/", headers=BEARER) as page,
        ):
            assert page.status == 503
            assert f"Redis is unreachable: {UNTRUSTED}" in html.unescape(await page.text())
        assert worker.alive()  # it keeps trying, and says so
        assert await asyncio.to_thread(worker.terminate) == 0  # and stops when told, cleanly
        assert "Traceback" not in (tmp_path / "worker.log").read_text()
    finally:
        worker.close()
