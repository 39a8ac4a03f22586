"""Hostile clients and a steady stream of good deliveries, for the hostile-client suite
(tests/test_hostile.py) and bench row P6.

Each attack runs until its ``stop`` event is set, re-opening what the receiver closes,
so it keeps its pressure up for the whole measurement. None of them has the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.procs import ROOT, deployed_env, deployed_web_command, terminate
from tests.polling import eventually
from tests.service import signed_body_headers

# Runs until ``stop`` is set; what its awaitable returns is not used (one attack is a gather).
Attack = Callable[[str, int, asyncio.Event], Awaitable[object]]


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError):
        await asyncio.sleep(0.05)
        return None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def giant_headers(host: str, port: int, stop: asyncio.Event, size: int = 100_000_000) -> None:
    """One connection at a time streaming a ``size``-byte header, as fast as it can."""
    chunk = b"a" * 65_536
    while not stop.is_set():
        opened = await _open(host, port)
        if opened is None:
            continue
        reader, writer = opened
        writer.write(b"POST /webhook HTTP/1.1\r\nhost: x\r\nx-junk: ")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < size and not stop.is_set() and not reader.at_eof():
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
        await _close(writer)


def _held_connections(first_bytes: bytes, trickle: bytes | None) -> Attack:
    """Connections that send ``first_bytes`` then hold on (sending ``trickle`` each second)."""

    async def hold_one(host: str, port: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            opened = await _open(host, port)
            if opened is None:
                continue
            reader, writer = opened
            with contextlib.suppress(OSError):
                writer.write(first_bytes)
                while not stop.is_set() and not reader.at_eof():
                    if trickle:
                        writer.write(trickle)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(65_536), 1.0)
            await _close(writer)

    async def attack(host: str, port: int, stop: asyncio.Event, connections: int = 1_100) -> None:
        await asyncio.gather(*(hold_one(host, port, stop) for _ in range(connections)))

    return attack


idle_connections = _held_connections(b"", None)
slowloris = _held_connections(b"POST /webhook HTTP/1.1\r\n", b"x")
stalled_bodies = _held_connections(
    b"POST /webhook HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{", None
)


def bad_signature_request(payload_bytes: int) -> tuple[bytes, dict[str, str]]:
    """A payload of about ``payload_bytes`` with a well-formed signature made with a wrong key."""
    body = json.dumps({"type": "profile.parsing.success", "message": "x" * payload_bytes}).encode()
    return body, signed_body_headers(body, "not-the-secret")


async def bad_signature_flood(
    host: str, port: int, stop: asyncio.Event, payload_bytes: int = 1_000_000, clients: int = 8
) -> None:
    body, headers = bad_signature_request(payload_bytes)
    url = f"http://{host}:{port}/webhook"

    async def one_client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one_client(session) for _ in range(clients)))


ATTACKS: dict[str, Attack] = {
    "giant headers": lambda host, port, stop: asyncio.gather(
        *(giant_headers(host, port, stop) for _ in range(4))
    ),
    "idle connections": idle_connections,
    "slowloris": slowloris,
    "stalled bodies": stalled_bodies,
    "bad-signature flood": bad_signature_flood,
}


@dataclass
class GoodTraffic:
    """What a steady stream of signed deliveries met: statuses and latencies."""

    statuses: list[int] = field(default_factory=list)  # 0: no answer (refused, reset, timeout)
    latencies_s: list[float] = field(default_factory=list)
    event_keys: list[str] = field(default_factory=list)  # profile keys answered 202

    @property
    def success_rate(self) -> float:
        return self.statuses.count(202) / len(self.statuses) if self.statuses else 0.0

    @property
    def p99_s(self) -> float:
        if len(self.latencies_s) < 2:
            return max(self.latencies_s, default=0.0)
        return statistics.quantiles(self.latencies_s, n=100)[98]


async def good_deliveries(
    url: str, secret: str, rate_per_s: float, duration_s: float, label: str
) -> GoodTraffic:
    """Signed deliveries at ``rate_per_s``, each on a new connection (as a webhook sender
    does), each with 10 s to be answered."""
    traffic = GoodTraffic()
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        key = f"{label}-{n}"
        event = {
            "type": "profile.parsing.success",
            "origin": "api",
            "profile": {"key": key, "source": {"key": "hostile-bench"}},
        }
        body = json.dumps(event).encode()
        started = time.perf_counter()
        status = 0
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with session.post(
                url, data=body, headers=signed_body_headers(body, secret)
            ) as response:
                await response.read()
                status = response.status
        traffic.statuses.append(status)
        traffic.latencies_s.append(time.perf_counter() - started)
        if status == 202:
            traffic.event_keys.append(key)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        count = int(rate_per_s * duration_s)
        start = time.perf_counter()
        for n in range(count):
            await asyncio.sleep(max(0.0, start + n / rate_per_s - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, n)))
        await asyncio.gather(*tasks)
    return traffic


async def under_attack(
    attack: Attack | None, host: str, port: int, good: Callable[[], Awaitable[GoodTraffic]]
) -> GoodTraffic:
    """``good`` traffic while ``attack`` runs (started a second before, stopped after)."""
    if attack is None:
        return await good()
    stop = asyncio.Event()
    attacking = asyncio.ensure_future(attack(host, port, stop))
    await asyncio.sleep(1.0)
    try:
        return await good()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(attacking, 15)


# The open-file limit of the receiver under attack: a small container's or dyno's.
FD_LIMIT = 1_024


@contextlib.contextmanager
def deployed_receiver(
    redis_url: str, secret: str, port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The Procfile's web line with default settings, under an open-file limit of 1,024."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            deployed_web_command(port, open_files=FD_LIMIT),
            env=deployed_env(redis_url, secret),
            stdout=output,
            stderr=output,
            cwd=ROOT,
        )
    try:
        yield process
    finally:
        terminate(process, timeout_s=20)


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


async def until_answering(url: str, secret: str, timeout_s: float = 30.0) -> None:
    async def accepts_a_delivery() -> bool:
        return (await good_deliveries(url, secret, 10, 0.1, "up")).statuses == [202]

    await eventually(accepts_a_delivery, f"a 202 from {url}", timeout_s=timeout_s)
