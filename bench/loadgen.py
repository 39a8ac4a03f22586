"""An open-loop load generator at a fixed rate: ``python -m bench.loadgen URL FILE RATE SECONDS``.

wrk measures peak throughput (closed loop); latency at a given load needs
requests started on a schedule whatever the server does, so this process
sends delivery ``i`` at ``start + i / rate`` and prints one JSON line of counts.
Bounded: it stops after SECONDS or when the deliveries run out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from pathlib import Path

import aiohttp
import orjson

from bench.deliveries import read_deliveries

MAX_IN_FLIGHT = 256  # past this the server is overloaded: skip, count, and say so


async def send(
    session: aiohttp.ClientSession,
    url: str,
    header: str,
    body: bytes,
    counts: collections.Counter[str],
) -> None:
    headers = {"HTTP-HRFLOW-SIGNATURE": header, "Content-Type": "application/json"}
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            counts[str(response.status)] += 1
    except (aiohttp.ClientError, TimeoutError):
        counts["error"] += 1


async def run(url: str, path: Path, rate: float, duration_s: float) -> dict[str, object]:
    deliveries = read_deliveries(path)
    total = min(len(deliveries), int(rate * duration_s))
    counts: collections.Counter[str] = collections.Counter()
    in_flight: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()
        for number in range(total):
            delay = start + number / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= MAX_IN_FLIGHT:
                counts["skipped"] += 1
                continue
            task = asyncio.create_task(send(session, url, *deliveries[number], counts))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        elapsed = time.monotonic() - start
    return {"sent": total, "elapsed_s": elapsed, "statuses": dict(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("file", type=Path)
    parser.add_argument("rate", type=float)
    parser.add_argument("seconds", type=float)
    args = parser.parse_args()
    result = asyncio.run(run(args.url, args.file, args.rate, args.seconds))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
