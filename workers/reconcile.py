"""Reconciliation: find the profile changes whose webhook never arrived, and queue them.

HrFlow publishes no retry policy, so a delivery lost on the way (an outage longer
than its retries, a wrong URL, a rotated secret) is gone unless we look. Like
Stripe's "process undelivered events", we list: ``GET /v1/storing/profiles`` of
each source, most recently changed first, back to the source's checkpoint. For
each profile, the service's handled state (``QueueKeys.handled``: the newest
``updated_at`` a finished run handled, kept as long as the event log) decides:

- none: never handled → a first-time event (``profile.<family>.success``);
- older than the listed ``updated_at``: changed since → ``profile.<family>.update``;
- otherwise: already handled.

A handled state is written only by a run in which a handler ran to ok
(``workers.jobs``), so an event queued here that no handler takes is never "handled".

**Which family.** HrFlow's listing tells of stored profiles, but handlers may listen to
``profile.storing.*``, to ``profile.parsing.*`` (README's first example) or to both (the
built-in ones). The reconciler announces each profile in the first family, storing then
parsing, whose handlers act on that source (:class:`Announcements`), never in both: a
handler of both families would run twice. A never-handled profile falls back to an update
event when only updates are taken; a changed one is never announced as a first-time event
(it was handled once), so with first-time handlers only it is counted as ``no_handler``. A
source no handler acts on is not listed at all, and the report says so.

The registry is the one of the process that runs the scan: a worker's own for the
scheduled scan; for ``hrflow-webhooks reconcile``, the registry the CLI builds exactly as a
worker does (installed plugins, ``HRFLOW_HANDLERS``, the built-in handlers' settings), so
the CLI runs with the workers' configuration. The running workers could publish their
routes in Redis instead; that is more state to keep true (workers come and go) for the one
case of a CLI run configured unlike the workers, and that case fails safe: a registry with
no handler for a source queues nothing and says why, and an event no worker routes is
counted unrouted and never marks the profile handled.

A queued event that merges into a waiting run, or is a duplicate of one queued
earlier, counts as *already queued*.

The events go through the normal enqueue path (deduplication, coalescing,
per-profile order, the event log), with ``origin: "reconciler"`` and the listed
``updated_at`` (so the run that handles them records that state), and the built-in
handlers and plugins act on them exactly as on a delivery.

**Bounds.** HrFlow's listing is untrusted input. A run asks for
``HRFLOW_RECONCILE_PAGE_SIZE`` profiles a page and looks at no more (a longer page is
truncated and counted, and the source's checkpoint stays); it ends at
``HRFLOW_RECONCILE_MAX_PAGES`` pages, ``HRFLOW_RECONCILE_MAX_ENQUEUED`` runs queued or
``HRFLOW_RECONCILE_MAX_DURATION_S``, whichever comes first; it queues
:data:`ENQUEUE_SLICE` events per script call, and before each slice waits while Redis'
memory is near the receiver's high-water mark. Every run, however it ends, leaves a report
with its ``stop_reason``.

Calls to HrFlow take the shared rate budget. A 429 or a 5xx stops the scan cleanly:
the checkpoint stays where it was, and the next scan starts from it again (what this
one queued is then found queued, merged or handled). A complete scan moves the
checkpoint to its own start, less a margin for HrFlow's clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError, ResponseError

from hrflow_client.api import HrflowClient, ProfilePage
from hrflow_client.errors import ApiError
from hrflow_client.profiles import timestamp_of
from hrflow_webhooks.enqueue import EventQueue, ReplicaAck
from hrflow_webhooks.event_log import EventLog, ReconcileReport
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QUEUED, QueueKeys, trusted_state
from hrflow_webhooks.settings import Settings
from workers import metrics
from workers.registry import Registry

logger = logging.getLogger(__name__)

# Events per enqueue script call: about 35 µs of Redis each, so a call holds it ~2 ms (a
# 100,000-item page in one call held it 3.3 s, and deliveries got 503 meanwhile).
ENQUEUE_SLICE = 50
# The reconciler pauses this far below the receiver's memory mark, checking again each
# MEMORY_PAUSE_S: the receiver keeps room for deliveries while a scan waits.
MEMORY_MARGIN = 0.1
MEMORY_PAUSE_S = 1.0
# Stop reasons that end the whole run; the others (refused, no_handler, truncated) end a
# source only.
_ENDING = ("page_limit", "enqueue_limit", "time_limit", "redis_memory", "hrflow", "error")
# HrFlow stamps updated_at with its own clock, to the second: a scan's checkpoint is its
# start less this, so a change stamped by a clock running behind ours is not skipped.
CHECKPOINT_MARGIN_S = 60.0
# The families a listed profile may be announced in, the first whose handlers act on it:
# the listing tells of stored profiles (storing), and many plugins listen to parsing only.
FAMILIES = ("storing", "parsing")


@dataclass(slots=True)
class _Tally:
    scanned: int = 0
    enqueued: int = 0
    already_handled: int = 0
    already_queued: int = 0
    pages: int = 0
    no_handler: int = 0
    untrusted_dates: int = 0
    truncated: int = 0
    paused_s: float = 0.0


@dataclass(slots=True)
class _SourceScan:
    source: str
    announcements: Announcements
    tally: _Tally
    budget: _Budget
    truncated: int = 0  # this source's: its checkpoint stays when any


@dataclass(frozen=True, slots=True)
class Announcements:
    """How a listed profile of one source is announced to the handlers: the event type for
    one never handled, and for one changed since it was; None where no handler would act."""

    never_handled: str | None
    changed: str | None

    @classmethod
    def for_source(cls, registry: Registry, source_key: str) -> Announcements:
        def first_routed(statuses: tuple[str, ...]) -> str | None:
            for status in statuses:
                for family in FAMILIES:
                    event_type = f"profile.{family}.{status}"
                    handlers = registry.handlers_for(event_type)
                    if any(h.accepts_source(source_key) for h in handlers):
                        return event_type
            return None

        # A first-time event for one never handled, else an update (its handler reads the
        # current state all the same); never a first-time event for one handled before.
        return cls(first_routed(("success", "update")), first_routed(("update",)))

    @property
    def none(self) -> bool:
        return self.never_handled is None and self.changed is None


def listed_event(
    source_key: str, item: Mapping[str, Any], event_type: str, *, trusted_date: bool = True
) -> dict[str, Any]:
    """The notification HrFlow would have sent for a listed profile (keys only, no content).
    Its listed ``updated_at`` goes along only when ``trusted_date``: the run records it as
    handled."""
    return {
        "type": event_type,
        "origin": "reconciler",
        "message": "found by reconciliation",
        "profile": {
            "key": item["key"],
            "reference": item.get("reference"),
            "source": {"key": source_key},
        },
        "reconciler": {"updated_at": item.get("updated_at") if trusted_date else None},
    }


class _Stop(Exception):
    """The run ends here: ``reason`` is the report's stop reason, ``text`` says it to people."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


@dataclass(slots=True)
class _Budget:
    """One run's bounds (HRFLOW_RECONCILE_*), on the loop's clock."""

    deadline: float
    max_pages: int
    max_enqueued: int

    @classmethod
    def of(cls, settings: Settings) -> _Budget:
        deadline = asyncio.get_running_loop().time() + settings.reconcile_max_duration_s
        return cls(deadline, settings.reconcile_max_pages, settings.reconcile_max_enqueued)

    def remaining_s(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def check_time(self, where: str) -> None:
        if self.remaining_s() <= 0:
            raise _Stop("time_limit", f"time limit (HRFLOW_RECONCILE_MAX_DURATION_S) {where}")


class Reconciler:
    def __init__(
        self, redis: Redis, client: HrflowClient, settings: Settings, registry: Registry
    ) -> None:
        self.redis = redis
        self.client = client
        self.settings = settings
        self.registry = registry
        self.keys = QueueKeys(settings.queue_name)

    async def run(
        self, sources: Sequence[str], since: float | None = None, trigger: str = "cli"
    ) -> ReconcileReport:
        """Scan each source back to ``since`` (or its checkpoint, or one interval ago), within
        the run's bounds. Always returns a report, and stores it when Redis takes it."""
        started = time.time()
        tally, problems = _Tally(), list[tuple[str, str]]()  # (stop reason, text)
        try:
            await self._scan_all(sources, since, started, tally, problems)
        except _Stop as stop:
            problems.append((stop.reason, stop.text))
        except Exception as error:  # Redis away, an answer nothing expected: said, reported
            problems.append(("error", f"{type(error).__name__} after {tally.pages} page(s)"))
        # The reason that ended the run (the last), else the first source's problem.
        ended = problems[-1] if problems and problems[-1][0] in _ENDING else None
        reason = ended or (problems[0] if problems else None)
        report = ReconcileReport(
            started, time.time(), trigger, tuple(sources), since, tally.scanned,
            tally.enqueued, tally.already_handled, tally.pages,
            "; ".join(text for _, text in problems) or None, tally.already_queued,
            tally.no_handler, tally.untrusted_dates, reason[0] if reason else None,
            tally.truncated, round(tally.paused_s, 1),
        )  # fmt: skip
        try:
            await EventLog(self.redis, self.keys).add_reconcile_run(report)
        except RedisError as error:  # the log line and the caller still have it
            logger.warning(
                "reconcile report not stored", extra={"error_type": type(error).__name__}
            )
        _report(report)
        return report

    async def _scan_all(
        self,
        sources: Sequence[str],
        since: float | None,
        started: float,
        tally: _Tally,
        problems: list[tuple[str, str]],
    ) -> None:
        budget = _Budget.of(self.settings)
        queue = EventQueue(
            self.redis, self.settings.queue_name, self.settings.dedup_window_s,
            self.settings.event_log_max_entries, via="reconciler",
            replica_ack=ReplicaAck.required_by(self.settings),
        )  # fmt: skip
        async with queue:
            for source in sources:
                announcements = Announcements.for_source(self.registry, source)
                if announcements.none:  # queuing would only add unrouted runs: not listed
                    problems.append((
                        "no_handler",
                        f"source {source}: no handler acts on profile.storing.* or "
                        "profile.parsing.* events of it",
                    ))  # fmt: skip
                    continue
                scan = _SourceScan(source, announcements, tally, budget)
                try:
                    await self._scan(queue, scan, since, started)
                except ApiError as error:  # this source only (unknown, refused): the others go on
                    problems.append((
                        "refused", f"source {source}: HrFlow refused the listing ({_answer(error)})"
                    ))  # fmt: skip
                    continue
                if scan.truncated:
                    problems.append((
                        "truncated",
                        f"source {source}: HrFlow sent pages longer than the "
                        f"{self.settings.reconcile_page_size} profiles asked for; "
                        f"{scan.truncated} profile(s) not looked at, its checkpoint stays",
                    ))  # fmt: skip

    async def _scan(
        self, queue: EventQueue, scan: _SourceScan, since: float | None, started: float
    ) -> None:
        """One source, newest changes first, until the floor, the last page or a bound."""
        source, budget, tally = scan.source, scan.budget, scan.tally
        checkpoint = await self._checkpoint(source)
        default = started - self.settings.reconcile_interval_s
        floor = since if since is not None else checkpoint if checkpoint is not None else default
        size = self.settings.reconcile_page_size
        page = 1
        while True:
            where = f"on page {page} of source {source}"
            if tally.pages >= budget.max_pages:
                raise _Stop("page_limit", f"page limit (HRFLOW_RECONCILE_MAX_PAGES) {where}")
            budget.check_time(where)
            listed = await self._page(source, page, size, budget, where)
            tally.pages += 1
            items = listed.profiles
            if len(items) > size:  # HrFlow ignored the page size: the rest is not looked at
                scan.truncated += len(items) - size
                tally.truncated += len(items) - size
                items = items[:size]
            fresh, reached_floor = _since_floor(items, floor)
            await self._queue_unhandled(queue, scan, fresh, where)
            if reached_floor or page >= listed.max_page:
                break
            page += 1
        # A scan that did not reach back to the checkpoint (a short --since) must not move it
        # over the time it skipped: what changed there would never be looked at again. Nor
        # one that did not look at every profile it was sent.
        if not scan.truncated and (checkpoint is None or floor <= checkpoint):
            await self.redis.set(
                self.keys.reconcile_checkpoint(source), started - CHECKPOINT_MARGIN_S
            )

    async def _page(
        self, source: str, page: int, size: int, budget: _Budget, where: str
    ) -> ProfilePage:
        try:
            async with asyncio.timeout(budget.remaining_s()):
                return await self.client.storing_profiles_list([source], page=page, limit=size)
        except TimeoutError:
            raise _Stop(
                "time_limit", f"time limit (HRFLOW_RECONCILE_MAX_DURATION_S) {where}"
            ) from None
        except ApiError as error:
            if not error.transient:
                raise
            raise _Stop("hrflow", f"HrFlow: {_answer(error)} {where}") from error

    async def _checkpoint(self, source: str) -> float | None:
        kept = await self.redis.get(self.keys.reconcile_checkpoint(source))
        return None if kept is None else float(kept)

    async def _queue_unhandled(
        self, queue: EventQueue, scan: _SourceScan, items: list[Mapping[str, Any]], where: str
    ) -> None:
        tally = scan.tally
        tally.scanned += len(items)
        if not items:
            return
        source, announcements = scan.source, scan.announcements
        states = await self.redis.mget(
            [self.keys.handled(source, str(item["key"])) for item in items]
        )
        events, now, untrusted = [], time.time(), 0
        for item, state in zip(items, states, strict=True):
            # A listed date missing, unreadable or ahead of the clock says nothing of whether
            # the profile changed: it is taken as changed, and never kept as handled.
            listed_at = trusted_state(timestamp_of(item.get("updated_at")), now)
            handled_at = trusted_state(_seconds(state), now)
            untrusted += listed_at is None
            if listed_at is not None and handled_at is not None and handled_at >= int(listed_at):
                tally.already_handled += 1
                continue
            event_type = announcements.never_handled if state is None else announcements.changed
            if event_type is None:
                tally.no_handler += 1  # e.g. handled once, and only first-time events are taken
                continue
            trusted = listed_at is not None
            events.append(
                Event.from_payload(listed_event(source, item, event_type, trusted_date=trusted))
            )
        if untrusted:
            tally.untrusted_dates += untrusted
            logger.warning(
                "listed updated_at missing or ahead of the clock: taken as changed",
                extra={"source": source, "profiles": untrusted},
            )
        await self._enqueue(queue, scan, events, where)

    async def _enqueue(
        self, queue: EventQueue, scan: _SourceScan, events: list[Event], where: str
    ) -> None:
        """A slice per script call (each holds Redis a few ms at most), each once Redis'
        memory is clear of the receiver's mark, until the enqueue limit."""
        tally, budget = scan.tally, scan.budget
        request_id = f"reconcile-{int(time.time())}"
        start = 0
        while start < len(events):
            room = budget.max_enqueued - tally.enqueued
            if room <= 0:
                raise _Stop(
                    "enqueue_limit", f"enqueue limit (HRFLOW_RECONCILE_MAX_ENQUEUED) {where}"
                )
            budget.check_time(where)
            await self._wait_for_memory(tally, budget, where)
            chunk = events[start : start + min(ENQUEUE_SLICE, room)]
            outcomes = await queue.enqueue_events(chunk, request_id)
            tally.enqueued += sum(1 for outcome in outcomes if outcome == QUEUED)
            tally.already_queued += sum(1 for outcome in outcomes if outcome != QUEUED)
            start += len(chunk)

    async def _wait_for_memory(self, tally: _Tally, budget: _Budget, where: str) -> None:
        """Pause while Redis' memory is within MEMORY_MARGIN of the receiver's high-water
        mark (it answers deliveries 503 past it): deliveries come before recovery."""
        pause_at = self.settings.redis_memory_high_water - MEMORY_MARGIN
        while True:
            try:
                memory = await self.redis.info("memory")
            except ResponseError:  # INFO refused (managed Redis ACL): the receiver's watch knows
                return
            used, most = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
            if not most or used / most < pause_at:
                return
            if budget.remaining_s() <= 0:
                raise _Stop(
                    "redis_memory",
                    f"redis memory stayed near the high-water mark (HRFLOW_REDIS_MEMORY_HIGH_WATER) "
                    f"until the time limit, {where}",
                )
            pause_s = min(MEMORY_PAUSE_S, budget.remaining_s())
            tally.paused_s += pause_s
            await asyncio.sleep(pause_s)


def _seconds(state: bytes | None) -> float | None:
    """A kept handled state, or None when unreadable (not ours to trust)."""
    try:
        return None if state is None else float(state)
    except ValueError:
        return None


def _since_floor(
    items: list[Mapping[str, Any]], floor: float
) -> tuple[list[Mapping[str, Any]], bool]:
    """The page's items changed since ``floor`` (with a key: nothing to queue for one without),
    and whether the page reached past the floor (the listing is newest first: the scan ends)."""
    fresh, reached = [], False
    for item in items:
        updated_at = timestamp_of(item.get("updated_at"))
        if updated_at is not None and updated_at < int(floor):
            reached = True
        elif isinstance(item.get("key"), str) and item["key"]:
            fresh.append(item)
    return fresh, reached


def _answer(error: ApiError) -> str:
    return f"HTTP {error.status}" if error.status else "no answer"


def _report(report: ReconcileReport) -> None:
    metrics.RECONCILE_PROFILES.labels("scanned").inc(report.scanned)
    metrics.RECONCILE_PROFILES.labels("enqueued").inc(report.enqueued)
    metrics.RECONCILE_PROFILES.labels("already_handled").inc(report.already_handled)
    metrics.RECONCILE_PROFILES.labels("already_queued").inc(report.already_queued)
    metrics.RECONCILE_PROFILES.labels("no_handler").inc(report.no_handler)
    metrics.RECONCILE_PROFILES.labels("untrusted_date").inc(report.untrusted_dates)
    metrics.RECONCILE_PROFILES.labels("truncated").inc(report.truncated)
    metrics.RECONCILE_RUNS.labels("stopped" if report.stopped else "complete").inc()
    logger.log(
        logging.WARNING if report.stopped else logging.INFO,
        "reconcile stopped early" if report.stopped else "reconcile finished",
        extra={
            "trigger": report.trigger,
            "scanned": report.scanned,
            "enqueued": report.enqueued,
            "already_handled": report.already_handled,
            "already_queued": report.already_queued,
            "no_handler": report.no_handler,
            "untrusted_dates": report.untrusted_dates,
            "truncated": report.truncated,
            "pages": report.pages,
            "paused_s": report.paused_s,
            "duration_ms": round((report.finished_at - report.started_at) * 1000, 1),
            "stop_reason": report.stop_reason,
            "reason": report.stopped,
        },
    )


# --- the workers' upkeep ---------------------------------------------------------------------

UPKEEP_INTERVAL_S = 60.0


async def upkeep(
    redis: Redis, client: HrflowClient | None, settings: Settings, registry: Registry
) -> None:
    """Every worker, forever: trim the event log past its retention and, when sources are
    set, reconcile them once per interval, one worker at a time (a lock that outlives the
    run until the interval is over, so the next due worker takes it then)."""
    keys = QueueKeys(settings.queue_name)
    log = EventLog(redis, keys)
    while True:
        try:
            await log.trim(settings.event_log_retention_s)
            if settings.reconcile_sources and client is not None:
                await _reconcile_if_due(redis, client, settings, keys, registry)
        except Exception as error:  # Redis away, HrFlow refused: the next round tries again
            logger.warning("upkeep failed", extra={"error_type": type(error).__name__})
        await asyncio.sleep(min(UPKEEP_INTERVAL_S, settings.reconcile_interval_s))


async def _reconcile_if_due(
    redis: Redis, client: HrflowClient, settings: Settings, keys: QueueKeys, registry: Registry
) -> None:
    lock = Lock(redis, keys.reconcile_lock, timeout=settings.reconcile_interval_s, blocking=False)
    if not await lock.acquire():
        return  # another worker ran it less than an interval ago, or runs it now
    keeper = asyncio.create_task(_hold(lock, settings.reconcile_interval_s))
    try:
        reconciler = Reconciler(redis, client, settings, registry)
        await reconciler.run(settings.reconcile_sources, None, "schedule")
    finally:
        keeper.cancel()


async def _hold(lock: Lock, timeout_s: float) -> None:
    """Keep a long scan's lock (no second worker starts one meanwhile); once it ends, the
    lock expires an interval after its last renewal, which spaces the scans."""
    while True:
        await asyncio.sleep(timeout_s / 3)
        try:
            await lock.reacquire()
        except (LockError, RedisError) as error:  # lost in a Redis stall: say so, scan on
            logger.warning("reconcile lock lost", extra={"error_type": type(error).__name__})
            return
