"""Pre-signed deliveries, written to a file the load generators replay.

Signing happens before the clock starts, so a generator spends its time
sending. Each event is unique (its profile key carries the run tag and a
counter): a repeated event would take the receiver's cheaper duplicate path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench.procs import WEBHOOK_SECRET
from hrflow_webhooks.signatures import sign

EVENT_TYPE = "profile.parsing.success"


def bench_profile_key(tag: str, number: int) -> str:
    return f"bench-{tag}-{number}"


def bench_event(tag: str, number: int, source_key: str = "sk-1") -> dict[str, Any]:
    """The shape of a real ``profile.parsing.success`` delivery; keys only, no personal data."""
    profile_key = bench_profile_key(tag, number)
    return {
        "type": EVENT_TYPE,
        "origin": "api",
        "message": "Profile parsed",
        "profile": {"key": profile_key, "reference": None, "source": {"key": source_key}},
    }


def write_deliveries(path: Path, tag: str, count: int) -> Path:
    """``count`` lines of ``<signature header>\\t<body>`` (the Python SDK's scheme)."""
    secret = WEBHOOK_SECRET.encode()
    with path.open("wb") as out:
        for number in range(count):
            body = orjson.dumps(bench_event(tag, number))
            out.write(sign(body, secret).encode() + b"\t" + body + b"\n")
    return path


def read_deliveries(path: Path) -> list[tuple[str, bytes]]:
    deliveries: list[tuple[str, bytes]] = []
    for line in path.read_bytes().splitlines():
        header, _, body = line.partition(b"\t")
        deliveries.append((header.decode(), body))
    return deliveries
