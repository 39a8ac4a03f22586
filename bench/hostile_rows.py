"""P6: the receiver under hostile clients, as deployed (the Procfile's web line, default
settings, 1,024 open files), and the cost of refusing a bad signature.

- **P6 <attack>**: a steady stream of signed deliveries (each on a new connection, as a
  webhook sender opens them) while the attack runs; the success rate and the p99 latency
  ÷ the same stream without attack, in the same run.
- **P6 rejection**: receiver CPU per refused bad-signature delivery ÷ CPU per accepted
  delivery of the same size (a 256 KB payload, carried in the signature header as HrFlow
  does): at most 1.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from bench import attacks, measure
from bench.procs import WEBHOOK_SECRET, Processes, cpu_seconds
from tests.redis_server import free_port
from tests.service import signed_body_headers

PAYLOAD_BYTES = 262_144


def p6_hostile(procs: Processes, config: Any) -> dict[str, Any]:
    rate, seconds = (20, 3) if config.smoke else (50, 8)
    port = free_port()
    url = f"http://127.0.0.1:{port}/webhook"
    log = procs.work_dir / "p6-receiver.log"
    with attacks.deployed_receiver(procs.redis_url, WEBHOOK_SECRET, port, log) as receiver:
        return asyncio.run(_measure(url, port, receiver.pid, rate, seconds, config.smoke))


async def _measure(
    url: str, port: int, pid: int, rate: float, seconds: float, smoke: bool
) -> dict[str, Any]:
    await attacks.until_answering(url, WEBHOOK_SECRET)
    scenarios: dict[str, Any] = {}
    for name, attack in [("no attack", None), *attacks.ATTACKS.items()]:

        async def good(label: str = name) -> attacks.GoodTraffic:
            tag = label.replace(" ", "-")
            return await attacks.good_deliveries(url, WEBHOOK_SECRET, rate, seconds, tag)

        traffic = await attacks.under_attack(attack, "127.0.0.1", port, good)
        scenarios[name] = {
            "deliveries": len(traffic.statuses),
            "success_rate": traffic.success_rate,
            "p99_ms": traffic.p99_s * 1000,
        }
    calm = scenarios["no attack"]
    for result in scenarios.values():
        result["success_ratio"] = result["success_rate"] / calm["success_rate"]
        result["p99_ratio"] = result["p99_ms"] / calm["p99_ms"]
    rejection = await _rejection_cost(url, pid, 20 if smoke else 100)
    return {
        "scenarios": scenarios,
        "rejection": rejection,
        "peak_rss_mb": attacks.peak_rss_bytes(pid) / 1_048_576,
    }


async def _rejection_cost(url: str, pid: int, count: int) -> dict[str, Any]:
    """Server CPU per delivery, accepted vs refused, same size, interleaved rounds."""
    accepted: list[float] = []
    refused: list[float] = []
    async with aiohttp.ClientSession() as session:
        for round_number in range(3):
            for kind in ("accept", "refuse") if round_number % 2 == 0 else ("refuse", "accept"):
                requests = [_request(kind, f"r{round_number}-{n}") for n in range(count)]
                before = cpu_seconds(pid)
                statuses = await _send_all(session, url, requests)
                cpu_us = (cpu_seconds(pid) - before) / count * 1e6
                expected = 202 if kind == "accept" else 401
                if statuses != [expected] * count:
                    raise RuntimeError(f"{kind}: unexpected statuses {set(statuses)}")
                (accepted if kind == "accept" else refused).append(cpu_us)
    accept_us, refuse_us = measure.median(accepted), measure.median(refused)
    return {
        "payload_bytes": PAYLOAD_BYTES,
        "accept_cpu_us": accept_us,
        "refuse_cpu_us": refuse_us,
        "ratio": refuse_us / accept_us,
    }


def _request(kind: str, key: str) -> tuple[bytes, dict[str, str]]:
    event = {
        "type": "profile.parsing.success",
        "profile": {"key": key, "source": {"key": "p6"}},
        "message": "x" * PAYLOAD_BYTES,
    }
    body = json.dumps(event).encode()
    secret = WEBHOOK_SECRET if kind == "accept" else "not-the-secret"
    return body, signed_body_headers(body, secret)


async def _send_all(
    session: aiohttp.ClientSession, url: str, requests: list[tuple[bytes, dict[str, str]]]
) -> list[int]:
    semaphore = asyncio.Semaphore(4)

    async def send(body: bytes, headers: dict[str, str]) -> int:
        async with semaphore, session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status

    return list(await asyncio.gather(*(send(body, headers) for body, headers in requests)))
