"""What the console's pages show, read from Redis and shaped for the templates.

Each page's data is one frozen dataclass built from the stores that own it: queue numbers
(``workers.queue_stats``), Redis durability (``hrflow_webhooks.durability``), the event log
and reconciliation reports (``hrflow_webhooks.event_log``), dead letters
(``workers.dead_letters``). Nothing here knows a key string: ``QueueKeys`` does.

What leaves this module is keys, types, outcomes, counts, error classes and HrFlow status
codes: never an event's payload, never an error's message, ours or HrFlow's (either may quote
a profile: "Invalid source fields" with the e-mail it refused, say), and a subject by
reference (often an e-mail address) only by its hash, as the event log keeps it. Redacting
a message instead (e-mail-like strings, long digit runs) would still show names, postal
addresses and phone numbers written with spaces: no pattern knows every shape of personal
data. ``hrflow-webhooks dead-letters show`` prints HrFlow's message to whoever holds Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from control.console.chart import DELIVERY_OUTCOMES, RUN_OUTCOMES, Chart, stacked_chart
from hrflow_webhooks.durability import RedisState, inspect_once
from hrflow_webhooks.event_log import EventLog, ReconcileReport, logged_subject
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys, long_wait_problems
from hrflow_webhooks.settings import Settings
from workers.dead_letters import DeadLetters
from workers.heartbeats import WorkerBeat, read_heartbeats
from workers.queue_stats import QueueStats, read_queue_stats

CHART_MINUTES = 60
# After each slice of a search (about 1 ms of Redis' time) the console rests this long, so a
# search leaves Redis to deliveries about two thirds of the time (docs/benchmarks.md, P8).
SEARCH_PAUSE_S = 0.002
LETTERS_SHOWN = 500  # one GET per letter: a page of thousands would hold Redis for long


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker's last heartbeat (``workers.heartbeats``)."""

    worker_id: str
    age_s: float
    alive: bool
    running: int
    complete: int
    retried: int
    failed: int


@dataclass(frozen=True, slots=True)
class Durability:
    state: RedisState
    aof_enabled: bool
    appendfsync: str | None  # None where CONFIG GET is refused (managed Redis)


@dataclass(frozen=True, slots=True)
class Overview:
    queue: QueueStats
    workers: list[WorkerRow]
    heartbeat_interval_s: int
    long_waits: list[str]  # check's sentence for a run waiting past HRFLOW_MAX_RUN_WAIT_S
    durability: Durability
    deliveries: Chart
    runs: Chart
    skips: int
    unrouted: int
    last_reconcile: ReconcileReport | None


@dataclass(frozen=True, slots=True)
class LetterRow:
    id: str
    dead_at: float
    event_id: str
    type: str
    subject: str
    handler: str
    reason: str
    tries: int
    error_type: str
    status: int | None


@dataclass(frozen=True, slots=True)
class LetterFilter:
    type: str | None = None
    handler: str | None = None
    since: float | None = None

    def matches(self, row: LetterRow) -> bool:
        return self.handler in (None, row.handler)


@dataclass(frozen=True, slots=True)
class Count:
    name: str
    detail: str
    count: int


@dataclass(frozen=True, slots=True)
class Stores:
    """The console's handles on Redis, made once in the app's lifespan.

    Reading the event log (searches, timelines, the overview's charts) goes through
    :meth:`scan_log`, one at a time per console process: each slice holds Redis about a
    millisecond, and two operators' scans interleaved would double what every delivery
    waits behind them (docs/benchmarks.md, P8)."""

    redis: Redis
    keys: QueueKeys
    settings: Settings
    log: EventLog
    letters: DeadLetters
    scanning: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def over(cls, redis: Redis, settings: Settings) -> Stores:
        keys = QueueKeys(settings.queue_name)
        letters = DeadLetters(redis, keys, settings.event_log_max_entries)
        return cls(redis, keys, settings, EventLog(redis, keys, SEARCH_PAUSE_S), letters)

    @contextlib.asynccontextmanager
    async def scan_log(self) -> AsyncIterator[EventLog]:
        async with self.scanning:
            yield self.log


# --- overview ---------------------------------------------------------------------------------


async def workers(stores: Stores) -> list[WorkerRow]:
    interval_s = stores.settings.health_check_interval_s
    beats = await read_heartbeats(stores.redis, stores.keys)
    return [_worker_row(beat, interval_s) for beat in beats]


def _worker_row(beat: WorkerBeat, interval_s: float) -> WorkerRow:
    return WorkerRow(
        beat.worker_id, beat.age_s(), beat.alive(interval_s), beat.running, beat.complete,
        beat.retried, beat.failed,
    )  # fmt: skip


async def durability(stores: Stores) -> Durability:
    state = await inspect_once(stores.redis, stores.settings)
    persistence = await stores.redis.info("persistence")
    return Durability(state, bool(persistence.get("aof_enabled")), await _appendfsync(stores))


async def _appendfsync(stores: Stores) -> str | None:
    try:
        found: dict[str, str] = await stores.redis.config_get("appendfsync")
    except ResponseError:  # CONFIG refused, as managed Redis often does: shown as unknown
        return None
    return found.get("appendfsync")


async def overview(stores: Stores) -> Overview:
    # One after the other: a dozen loopback round trips, every 10 s, by one operator.
    async with stores.scan_log() as log:
        minutes = await log.minutes(CHART_MINUTES)
    runs = await stores.log.reconcile_runs(limit=1)
    queue = await read_queue_stats(stores.redis, stores.keys)
    return Overview(
        queue=queue,
        workers=await workers(stores),
        heartbeat_interval_s=stores.settings.health_check_interval_s,
        long_waits=long_wait_problems(queue.oldest_wait_s, stores.settings.max_run_wait_s),
        durability=await durability(stores),
        deliveries=stacked_chart("Deliveries per minute", minutes, DELIVERY_OUTCOMES),
        runs=stacked_chart("Runs per minute", minutes, RUN_OUTCOMES),
        skips=await _hash_total(stores.redis, stores.keys.skipped),
        unrouted=await _hash_total(stores.redis, stores.keys.unrouted),
        last_reconcile=runs[0] if runs else None,
    )


# --- dead letters ---------------------------------------------------------------------------


def letter_row(letter: Mapping[str, Any]) -> LetterRow:
    event = Event.from_dict(letter["event"])
    error = letter.get("error") or {}
    return LetterRow(
        id=str(letter["id"]),
        dead_at=float(letter["dead_at"]),
        event_id=event.id,
        type=event.canonical_type,
        subject=logged_subject(event.subject),
        handler=str(letter["handler"]),
        reason=str(letter["reason"]),
        tries=int(letter["tries"]),
        error_type=str(error.get("type", "?")),
        status=error.get("status"),
    )


async def letter_rows(stores: Stores, where: LetterFilter, limit: int | None) -> list[LetterRow]:
    """Matching dead letters, newest first; at most ``limit`` (None: all, for actions)."""
    rows: list[LetterRow] = []
    async for letter in stores.letters.iter(where.type, where.since):
        row = letter_row(letter)
        if where.matches(row):
            rows.append(row)
    rows.reverse()  # the store lists oldest first; people look for the latest
    return rows if limit is None else rows[:limit]


async def letter(stores: Stores, letter_id: str) -> LetterRow | None:
    found = await stores.letters.get(letter_id)
    return None if found is None else letter_row(found)


# --- skips and unrouted types ---------------------------------------------------------------


async def _hash_counts(redis: Redis, key: str) -> dict[str, int]:
    raw = await redis.hgetall(key)  # type: ignore[misc]
    return {_text(name): int(count) for name, count in raw.items()}


async def _hash_total(redis: Redis, key: str) -> int:
    return sum((await _hash_counts(redis, key)).values())


async def skips(stores: Stores) -> list[Count]:
    """``<handler or event type>:<reason>`` → count, most frequent first."""
    counts = await _hash_counts(stores.redis, stores.keys.skipped)
    rows = [_skip_row(name, count) for name, count in counts.items()]
    return sorted(rows, key=lambda row: (-row.count, row.name, row.detail))


def _skip_row(name: str, count: int) -> Count:
    what, _, reason = name.partition(":")
    return Count(what, reason, count)


async def unrouted(stores: Stores) -> list[Count]:
    counts = await _hash_counts(stores.redis, stores.keys.unrouted)
    return sorted(
        (Count(name, "", count) for name, count in counts.items()),
        key=lambda row: (-row.count, row.name),
    )


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
