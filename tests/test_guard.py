"""The connection guard (receiver.protocol): head limit, deadlines and the connection cap,
checked against the receiver app served by uvicorn with HttpProtocol on loopback, with raw
sockets so each test controls every byte the client sends and when.

Deadlines are set to a second or two here; the tests wait for the outcome by polling,
with room to spare, and never assert how fast it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import uvicorn
from redis.asyncio import Redis
from uvicorn.server import ServerState

from hrflow_webhooks.logs import OncePerInterval
from receiver.protocol import CLOSED, ConnectionLimits, HttpProtocol, default_max_head_bytes
from receiver.rejections import RejectionLog
from tests.polling import eventually
from tests.redis_server import RedisServer, free_port
from tests.service import (
    METRICS_HEADERS,
    make_settings,
    parsing_event,
    queued_event_ids,
    receiver,
    signed_body_headers,
    signed_headers,
)
from tests.test_protocol import RecordingTransport, json_202

WAIT_S = 15.0  # far above any deadline used here: only a broken guard waits this long


@contextlib.asynccontextmanager
async def connection(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def answer_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of the one response the server sends before closing."""
    raw = await asyncio.wait_for(reader.read(), WAIT_S)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(reader.read(), WAIT_S) == b""
    return True


def head(content_length: int, *extra: bytes) -> bytes:
    lines = [b"POST /webhook HTTP/1.1", b"host: test", b"content-length: %d" % content_length]
    return b"\r\n".join([*lines, *extra]) + b"\r\n\r\n"


async def deliver(http: aiohttp.ClientSession, url: str, key: str) -> int:
    event = parsing_event(key)
    data = json.dumps(event)
    async with http.post(f"{url}/webhook", data=data, headers=signed_headers(event)) as r:
        return r.status


def test_the_default_head_limit_holds_the_signature_header_of_a_max_size_payload() -> None:
    body_limit = 1_048_576
    payload_part = 4 * -(-body_limit // 3)  # base64url of the payload, padded
    assert default_max_head_bytes(body_limit) >= payload_part + 1 + 88 + 8_192


async def test_a_head_past_the_limit_gets_431_having_buffered_no_more_than_the_limit(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url, max_header_bytes=65_536)
    before = CLOSED["header_too_large"]
    async with receiver(settings) as server, connection(server.url) as (reader, writer):
        writer.write(b"POST /webhook HTTP/1.1\r\nx-junk: ")
        sent = 0
        while not reader.at_eof() and sent < 64 * 1_048_576:  # a 64 MiB header, streamed
            writer.write(b"a" * 65_536)
            sent += 65_536
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if reader._buffer:  # type: ignore[attr-defined]  # the answer has arrived
                break
        status, body = await answer_of(reader)
        assert (status, body["error"]) == (431, "header_too_large")
        assert sent < 64 * 1_048_576, "the server read the whole header before answering"
        assert await deliver(http, server.url, "after-431") == 202
    assert CLOSED["header_too_large"] == before + 1


async def test_the_protocol_feeds_the_parser_no_more_than_the_head_limit() -> None:
    """One read far past the limit: httptools sees only the limit, then the 431 goes out."""
    config = uvicorn.Config(json_202, http=HttpProtocol, log_level="warning", lifespan="off")
    config.load()
    protocol = HttpProtocol(config, ServerState(), app_state={})
    protocol.limits = ConnectionLimits(max_head_bytes=4_096)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"POST /webhook HTTP/1.1\r\nx-junk: " + b"a" * 10_000_000)
    protocol.coalescing.flush()
    fed = sum(len(name) + len(value) for name, value in protocol.headers or [])
    assert fed <= 4_096
    assert transport.writes[0].startswith(b"HTTP/1.1 431 ")
    protocol.connection_lost(None)


async def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(
    redis_server: RedisServer,
) -> None:
    settings = make_settings(redis_server.url, keep_alive_timeout_s=1)
    async with receiver(settings) as server, connection(server.url) as (reader, _):
        assert await closed_by_server(reader)


async def test_a_kept_alive_connection_is_closed_after_the_keep_alive_timeout(
    redis_server: RedisServer,
) -> None:
    """uvicorn's own keep-alive timer is not armed (HttpProtocol): the sweep closes it."""
    settings = make_settings(redis_server.url, keep_alive_timeout_s=1)
    async with receiver(settings) as server, connection(server.url) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        assert await closed_by_server(reader)


async def test_a_head_sent_a_byte_at_a_time_gets_408_at_the_head_deadline(
    redis_server: RedisServer,
) -> None:
    settings = make_settings(redis_server.url, head_timeout_s=1)
    async with receiver(settings) as server, connection(server.url) as (reader, writer):
        for byte in head(2):  # slowloris: well inside the keep-alive timeout each time
            writer.write(bytes([byte]))
            await writer.drain()
            if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.1)
        status, body = await answer_of(reader)
        assert (status, body["reason"]) == (408, "request head not received in time")


async def test_a_stalled_body_gets_408_at_the_body_deadline_and_nothing_is_queued(
    redis_server: RedisServer, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, body_timeout_s=1)
    event = parsing_event("stalled")
    data = json.dumps(event).encode()
    signature = signed_headers(event)["HTTP-HRFLOW-SIGNATURE"].encode()
    async with receiver(settings) as server, connection(server.url) as (reader, writer):
        writer.write(head(len(data), b"http-hrflow-signature: " + signature) + data[:10])
        status, body = await answer_of(reader)
    assert (status, body["reason"]) == (408, "request body not received in time")
    assert await queued_event_ids(redis) == []


async def test_past_the_connection_cap_the_longest_idle_connection_makes_room(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """Slow connections fill the cap; a real delivery still connects and gets its 202."""
    settings = make_settings(redis_server.url, max_connections=8, keep_alive_timeout_s=60)
    before = CLOSED["evicted"]
    async with receiver(settings) as server, contextlib.AsyncExitStack() as stack:
        slow = [await stack.enter_async_context(connection(server.url)) for _ in range(8)]
        for _, writer in slow:
            writer.write(b"POST /webhook HTTP/1.1\r\n")  # and then nothing
            await writer.drain()
        assert await deliver(http, server.url, "through-the-cap") == 202
        assert await closed_by_server(slow[0][0])  # the oldest slow connection went
    assert CLOSED["evicted"] > before


async def test_a_flood_of_rejections_is_counted_exactly_and_logged_in_two_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RejectionLog(interval_s=0.2)
    with caplog.at_level(logging.WARNING, logger="receiver"):
        for n in range(1_000):
            log.note("bad_signature", "signature does not match", f"req-{n}")
        log.note("too_large", "request body exceeds HRFLOW_MAX_BODY_BYTES")

        async def summarised() -> bool:
            return len(caplog.records) == 2

        await eventually(summarised, timeout_s=WAIT_S)
    first, summary = caplog.records
    assert (first.outcome, first.request_id) == ("bad_signature", "req-0")  # type: ignore[attr-defined]
    assert summary.rejected == {  # type: ignore[attr-defined]
        "bad_signature: signature does not match": 999,
        "too_large: request body exceeds HRFLOW_MAX_BODY_BYTES": 1,
    }


async def test_metrics_are_not_on_the_webhook_port_without_a_token_and_need_it_with_one(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(redis_server.url, metrics_token=None)
    async with receiver(settings) as server, http.get(f"{server.url}/metrics") as response:
        assert response.status == 404
        assert "HRFLOW_RECEIVER_METRICS_PORT" in (await response.json())["reason"]
    async with receiver(make_settings(redis_server.url)) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.get(f"{server.url}/metrics", headers=headers) as response:
                assert response.status == 401
        async with http.get(f"{server.url}/metrics", headers=METRICS_HEADERS) as response:
            assert response.status == 200
            assert "hrflow_webhook_deliveries" in await response.text()


async def test_the_metrics_ports_listen_on_loopback_by_default(
    redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    settings = make_settings(redis_server.url, receiver_metrics_port=port)
    assert settings.metrics_host == "127.0.0.1"
    async with receiver(settings):
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert "hrflow_redis_durability_ok" in await response.text()
        listening = {conn.laddr for conn in _listening_sockets(port)}
        assert listening == {("127.0.0.1", port)}


def _listening_sockets(port: int) -> list[Any]:
    """This process's TCP sockets listening on ``port``, read from /proc/net/tcp."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, state = fields[1], fields[3]
        host_hex, port_hex = address.split(":")
        if int(port_hex, 16) == port and state == "0A":  # LISTEN
            host = socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
            found.append(SimpleNamespace(laddr=(host, port)))
    return found


class CountingParser:
    """httptools' parser, noting the size of each piece it is fed."""

    def __init__(self, parser: Any, fed: list[int]) -> None:
        self.parser, self.fed = parser, fed

    def feed_data(self, data: bytes) -> None:
        self.fed.append(len(data))
        self.parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


async def test_a_head_arriving_in_pieces_reaches_the_parser_in_one_piece() -> None:
    """httptools joins a header's pieces by concatenation (quadratic): it gets it whole."""
    config = uvicorn.Config(json_202, http=HttpProtocol, log_level="warning", lifespan="off")
    config.load()
    protocol = HttpProtocol(config, ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    fed: list[int] = []
    protocol.parser = CountingParser(protocol.parser, fed)  # type: ignore[assignment]
    head = b"POST /webhook HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 200_000 + b"\r\n"
    request = head + b"content-length: 2\r\n\r\n{}"
    for start in range(0, len(request), 1_000):
        protocol.data_received(request[start : start + 1_000])
    for _ in range(10):
        await asyncio.sleep(0)
    protocol.coalescing.flush()
    assert fed == [len(request)]
    assert transport.writes[0].startswith(b"HTTP/1.1 202 ")
    protocol.connection_lost(None)


async def test_an_upgrade_request_is_answered_as_plain_http_and_leaves_no_guard_entry(
    redis_server: RedisServer,
) -> None:
    async with receiver(make_settings(redis_server.url)) as server:
        async with connection(server.url) as (reader, writer):
            writer.write(
                b"GET /webhook HTTP/1.1\r\nhost: t\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
                b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
            assert head.split()[1] == b"405"  # /webhook takes POST only
        guard = server.server.server_state.hrflow_guard  # type: ignore[attr-defined]

        async def left() -> bool:
            return not guard.connections

        await eventually(left, timeout_s=WAIT_S)


async def test_requests_pipelined_behind_an_unanswered_one_are_not_read(
    redis_server: RedisServer, redis: Redis
) -> None:
    """The first is answered, then the connection closes; the rest are the client's to resend."""
    settings = make_settings(redis_server.url)
    requests = []
    for key in ("piped-1", "piped-2", "piped-3"):
        body = json.dumps(parsing_event(key)).encode()
        signature = signed_body_headers(body)["HTTP-HRFLOW-SIGNATURE"].encode()
        requests.append(head(len(body), b"http-hrflow-signature: " + signature) + body)
    async with receiver(settings) as server, connection(server.url) as (reader, writer):
        writer.write(requests[0])
        await writer.drain()
        await asyncio.sleep(0)  # let the first one be read alone
        writer.write(requests[1] + requests[2])
        answers = await asyncio.wait_for(reader.read(), WAIT_S)
    assert answers.count(b"HTTP/1.1 ") >= 1
    assert answers.startswith(b"HTTP/1.1 202 ")
    queued = len(await queued_event_ids(redis))
    assert queued == answers.count(b"HTTP/1.1 202 ")  # what was answered 202 is queued


def test_uvicorns_per_request_warnings_pass_once_per_interval() -> None:
    once = OncePerInterval(interval_s=60)
    record = logging.LogRecord(
        "uvicorn.error", logging.WARNING, __file__, 1, "Invalid HTTP request received.", None, None
    )
    other = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "other", None, None)
    assert [once.filter(record) for _ in range(1_000)].count(True) == 1
    assert once.filter(other)
