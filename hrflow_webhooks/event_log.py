"""The event log: what happened to every event, for operators, without personal data.

Each event's path is one stream (``QueueKeys.log``, layout in :mod:`hrflow_webhooks.queue`),
written by the scripts that already run, so it costs no round trip of its own:

- ``delivery`` (enqueue script): queued, coalesced (into which run) or duplicate, with
  the request id and how it came (``http`` or ``reconciler``);
- ``handler`` (finish or retry): ok, retry, failed, skip or dead, with the error class,
  HrFlow's status code, the reason and the dead letter's id;
- ``run`` (finish or retry): done, dead_lettered, skipped, unrouted or retry, with the
  worker, the try, its start and duration, and the retry delay;
- ``replay``: a dead letter queued again.

Every entry holds keys (event id, run id, subject: source and profile keys), types,
outcomes, timings and error classes, never a profile's content or an error's message.
Reading is a slice at a time (:data:`~hrflow_webhooks.queue.SCAN_LOG_SCRIPT`), so a search
over the whole log never holds Redis for long. Erasing a subject rebuilds the log without
its entries, a slice at a time too (:data:`~hrflow_webhooks.queue.REBUILD_LOG_SCRIPT`):
``XDEL`` would only flag them, and their bytes would stay in memory and in every file Redis
writes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from hrflow_webhooks.queue import (
    LOG_FIELDS,
    REBUILD_LOG_SCRIPT,
    SCAN_LOG_SCRIPT,
    QueueKeys,
    tag_of,
)

# A scan script call ends after this much of Redis' time (checked every SCAN_BATCH entries),
# or this many entries, whichever comes first: a delivery waits at most about that long
# behind a search (docs/benchmarks.md, P8).
SCAN_SLICE_BUDGET_US = 1_000
SCAN_SLICE = 2_000
# Entries copied per call of an erasure's rebuild: about a millisecond of Redis' time too (5 µs
# an entry, most of it Lua turning the entry into a reply and back into an XADD).
REBUILD_SLICE = 200
# How long the copy outlives its last slice: a rebuild that died leaves it this long.
REBUILD_COPY_LIFETIME_MS = 60_000
RECONCILE_RUNS_KEPT = 100
# Redis memory per entry, measured by the load suite (278 B): for when MEMORY USAGE is refused.
MEASURED_ENTRY_BYTES = 280.0


def logged_subject(subject: str) -> str:
    """The subject as the log keeps it: a reference (often an e-mail address or an ATS id)
    by its hash, so the log names profiles by key only."""
    if "/reference:" not in subject:
        return subject
    head, _, reference = subject.partition("/reference:")
    return head + logged_reference(reference)


def logged_reference(reference: str) -> str:
    """How a subject by reference ends in the log."""
    return f"/reference#{tag_of(reference)}"


def packed_entry(
    kind: str,
    event_id: str,
    run_id: str,
    subject: str,
    event_type: str,
    outcome: str,
    detail: Mapping[str, object] | None = None,
) -> list[str]:
    """One entry as the scripts append it: the field count, then the fields (append_log)."""
    k, e, r, s, t, o = LOG_FIELDS
    packed = [k, kind, e, event_id, r, run_id, s, logged_subject(subject), t, event_type]
    packed += (o, outcome)
    if detail:
        for name, value in detail.items():
            if value is not None:
                packed += (name, str(value))
    packed.insert(0, str(len(packed)))
    return packed


@dataclass(frozen=True, slots=True)
class LogEntry:
    entry_id: str  # the stream id, "<ms>-<n>"
    at: float  # epoch seconds
    kind: str  # delivery | run | handler | replay
    event_id: str
    run_id: str  # "" when none (a duplicate delivery)
    subject: str
    type: str
    outcome: str
    detail: Mapping[str, str]

    @classmethod
    def from_stream(cls, entry_id: bytes | str, fields: list[bytes | str]) -> LogEntry:
        text = [f.decode() if isinstance(f, bytes) else f for f in fields]
        values = dict(zip(text[::2], text[1::2], strict=True))
        ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        kind, event_id, run_id, subject, event_type, outcome = (
            values.pop(name, "") for name in LOG_FIELDS
        )
        return cls(
            ident, _ms_of(ident) / 1000, kind, event_id, run_id, subject, event_type, outcome,
            values,
        )  # fmt: skip

    @property
    def profile_key(self) -> str | None:
        """The profile key of a profile subject (``profile/<source>/key:<key>``)."""
        head, _, key = self.subject.partition("/key:")
        return key if head.startswith("profile/") and key else None

    @property
    def source_key(self) -> str | None:
        kind, _, rest = self.subject.partition("/")
        return rest.partition("/")[0] or None if kind in ("profile", "job") else None


@dataclass(frozen=True, slots=True)
class LogQuery:
    event_id: str | None = None
    profile_key: str | None = None
    type: str | None = None
    outcome: str | None = None
    kind: str | None = None
    since: float | None = None  # epoch seconds
    until: float | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    started_at: float
    finished_at: float
    trigger: str  # cli | schedule
    sources: tuple[str, ...]
    since: float | None
    scanned: int
    enqueued: int
    already_handled: int
    pages: int
    stopped: str | None  # None: complete; else why it stopped early
    already_queued: int = 0  # found waiting already (merged into its run, or a duplicate)
    no_handler: int = 0  # listed, but no handler acts on the event that would announce it
    untrusted_dates: int = 0  # listed updated_at missing or ahead of the clock: taken as changed
    # Why it stopped, for machines (``stopped`` says it to people): page_limit, enqueue_limit,
    # time_limit, redis_memory, hrflow (a 429 or 5xx), error; or, a source left unfinished,
    # refused, no_handler, truncated. None: complete.
    stop_reason: str | None = None
    truncated: int = 0  # listed beyond the page size asked for: not looked at
    paused_s: float = 0.0  # waiting for Redis' memory to clear the receiver's mark

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> ReconcileReport:
        fields: dict[str, Any] = orjson.loads(data)
        fields["sources"] = tuple(fields["sources"])
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Erased:
    entries: int
    subjects: frozenset[str]  # what the deleted entries were about


def _ms_of(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _bound(at: float | None, default: str) -> str:
    return default if at is None else str(int(at * 1000))


class RebuildRefusedError(RuntimeError):
    """The log cannot be rebuilt now: another erasure is rebuilding it, its copy expired
    mid-rebuild, or the log has consumer groups."""


# The rebuild script's refusals start with one of these words (redis.error_reply).
_REFUSALS = ("ERASING ", "GROUPS ")


class LogRebuild:
    """One erasure's copy of the log without the erased entries, a slice a call; appends
    go on meanwhile, and :meth:`finish` copies them too before the copy replaces the log."""

    def __init__(
        self, script: Any, keys: QueueKeys, suffix: str, prefix: str, slice_entries: int
    ) -> None:
        self._script = script  # redis-py's AsyncScript of REBUILD_LOG_SCRIPT
        self._keys = [keys.log, keys.log_copy]
        self._filter = [suffix, prefix]
        self._slice = slice_entries
        self._step, self._start = "first", "-"
        self._dropped, self._subjects = 0, set[str]()

    async def copy_slice(self) -> bool:
        """Copy the next slice; True once caught up with the log's end."""
        looked = await self._call()
        self._step = "last" if looked < self._slice else "next"
        return self._step == "last"

    async def finish(self) -> Erased:
        """Copy until caught up, then, in one call, what was appended since, and swap."""
        while self._step != "last":
            await self.copy_slice()
        await self._call()
        return Erased(self._dropped, frozenset(self._subjects))

    async def _call(self) -> int:
        args = [self._step, self._start, self._slice, REBUILD_COPY_LIFETIME_MS, *self._filter]
        try:
            last, looked, dropped, *subjects = await self._script(keys=self._keys, args=args)
        except ResponseError as error:
            refusal = str(error)
            if not refusal.startswith(_REFUSALS):
                raise
            raise RebuildRefusedError(refusal.partition(" ")[2]) from None
        self._dropped += int(dropped)
        self._subjects.update(_text(subject) for subject in subjects)
        if last:
            self._start = "(" + _text(last)
        return int(looked)


class EventLog:
    def __init__(self, redis: Redis, keys: QueueKeys, slice_pause_s: float = 0.0) -> None:
        """``slice_pause_s``: a rest between a scan's slices, for readers that must leave
        Redis to deliveries most of the time (the console's searches)."""
        self.redis = redis
        self.keys = keys
        self.slice_pause_s = slice_pause_s
        self._scan = redis.register_script(SCAN_LOG_SCRIPT)
        self._rebuild = redis.register_script(REBUILD_LOG_SCRIPT)

    async def search(self, query: LogQuery) -> list[LogEntry]:
        """The entries matching every filter given, newest first, at most ``query.limit``."""
        found: list[LogEntry] = []
        filters = _filters(query)
        cursor = _bound(query.until, "+")
        while len(found) < query.limit:
            last, matches = await self._slice(
                cursor, _bound(query.since, "-"), "-", "match", filters
            )
            found += (LogEntry.from_stream(ident, fields) for ident, fields in matches)
            if not last:
                break
            cursor = "(" + last
            await asyncio.sleep(self.slice_pause_s)
        return found[: query.limit]

    async def timeline(self, event_id: str, limit: int = 1_000) -> list[LogEntry]:
        """One event's path, oldest first: its deliveries, the runs they queued or merged
        into (coalesced events are identical, so they share the id), their handlers' outcomes
        and its replays."""
        newest_first = await self.search(LogQuery(event_id=event_id, limit=limit))
        return newest_first[::-1]

    async def minutes(self, minutes: int = 60) -> list[tuple[float, dict[str, int]]]:
        """Per minute of the last ``minutes``, oldest first: delivery and run outcomes."""
        now_minute = int(time.time() // 60)
        counts: dict[int, dict[str, int]] = defaultdict(dict)
        cursor = str((now_minute - minutes + 1) * 60_000)
        while True:
            last, tallies = await self._slice(cursor, "+", "+", "tally", _filters(LogQuery()))
            for name, count in zip(tallies[::2], tallies[1::2], strict=True):
                minute, _, outcome = _text(name).partition("|")
                bucket = counts[int(minute)]
                bucket[outcome] = bucket.get(outcome, 0) + int(count)
            if not last:
                break
            cursor = "(" + last
            await asyncio.sleep(self.slice_pause_s)
        first = now_minute - minutes + 1
        return [(m * 60.0, counts.get(m, {})) for m in range(first, now_minute + 1)]

    async def erase(
        self,
        subject: str | None = None,
        profile_key: str | None = None,
        reference: str | None = None,
    ) -> Erased:
        """Rebuild the log without the entries about ``subject``, or about a profile named by
        ``profile_key`` or by ``reference`` in any source (one of the three)."""
        return await self.rebuild(subject, profile_key, reference).finish()

    def rebuild(
        self,
        subject: str | None = None,
        profile_key: str | None = None,
        reference: str | None = None,
        slice_entries: int = REBUILD_SLICE,
    ) -> LogRebuild:
        suffix, prefix = _erased_subjects(subject, profile_key, reference)
        return LogRebuild(self._rebuild, self.keys, suffix, prefix, slice_entries)

    async def trim(self, retention_s: float) -> int:
        """Drop entries older than the retention; returns how many went."""
        return await self.trim_before(int((time.time() - retention_s) * 1000))

    async def trim_before(self, oldest_ms: int) -> int:
        # Exact: retention is a promise about personal-data requests too, not only memory.
        return int(await self.redis.xtrim(self.keys.log, minid=str(oldest_ms), approximate=False))

    async def footprint(self) -> tuple[int, float]:
        """(entries, the bytes of Redis' memory they hold, estimated)."""
        entries = int(await self.redis.xlen(self.keys.log))
        if entries == 0:
            return 0, 0.0
        return entries, entries * await self._bytes_per_entry(entries)

    async def shed(self, bytes_to_free: int, footprint: tuple[int, float]) -> tuple[int, int]:
        """Drop the oldest entries that hold about ``bytes_to_free`` of Redis' memory, of a
        log of ``footprint``; returns (entries dropped, entries kept). For a Redis over its
        high-water mark: the log is a record of events, never worth refusing an event for."""
        entries, log_bytes = footprint
        if entries == 0 or bytes_to_free <= 0:
            return 0, entries
        keep = max(entries - math.ceil(bytes_to_free / (log_bytes / entries)), 0)
        dropped = int(await self.redis.xtrim(self.keys.log, maxlen=keep, approximate=False))
        return dropped, keep  # exact: entries added since XLEN went too

    async def _bytes_per_entry(self, entries: int) -> float:
        # MEMORY USAGE samples a few of the stream's nodes: an estimate, cheap at any size.
        # Managed Redis may refuse it (ACL): then the size tests/test_load.py measures.
        try:
            stream_bytes = int(await self.redis.memory_usage(self.keys.log) or 0)
        except ResponseError:
            return MEASURED_ENTRY_BYTES
        return max(stream_bytes / entries, 1.0)

    async def reconcile_runs(self, limit: int = 50) -> list[ReconcileReport]:
        """The reconciler's reports, newest first."""
        stored = await self.redis.lrange(self.keys.reconcile_runs, 0, limit - 1)  # type: ignore[misc]
        return [ReconcileReport.from_json(item) for item in stored]

    async def add_reconcile_run(self, report: ReconcileReport) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self.keys.reconcile_runs, report.to_json())
            pipe.ltrim(self.keys.reconcile_runs, 0, RECONCILE_RUNS_KEPT - 1)
            await pipe.execute()

    async def _slice(
        self, start: str, end: str, direction: str, action: str, filters: list[str]
    ) -> tuple[str, Any]:
        last, result = await self._scan(
            keys=[self.keys.log],
            args=[start, end, SCAN_SLICE, direction, action, *filters, SCAN_SLICE_BUDGET_US],
        )
        return _text(last), result


def _erased_subjects(
    subject: str | None, profile_key: str | None, reference: str | None
) -> tuple[str, str]:
    """(suffix, prefix) of the subjects an erasure drops: one subject exactly, or a
    profile's in every source (never a job's of the same key)."""
    given = [value for value in (subject, profile_key, reference) if value is not None]
    if len(given) != 1 or not given[0].strip():  # no filter would erase the whole log
        raise ValueError("erase needs one of a subject, a profile key or a reference")
    if subject is not None:
        logged = logged_subject(subject)
        return logged, logged
    if profile_key is not None:
        return f"/key:{profile_key}", "profile/"
    return logged_reference(str(reference)), "profile/"


def _filters(query: LogQuery) -> list[str]:
    """The scan script's filters: kind, event id, subject suffix, type, outcome, prefix (a
    profile key matches profile subjects only, not a job's of the same key)."""
    suffix = f"/key:{query.profile_key}" if query.profile_key else ""
    prefix = "profile/" if query.profile_key else ""
    return [
        query.kind or "", query.event_id or "", suffix, query.type or "", query.outcome or "",
        prefix,
    ]  # fmt: skip


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
