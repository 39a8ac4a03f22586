"""The job: one run of the handlers for an event.

A run is one execution of the handlers for an event, or for a group of
identical notifications that merged while it waited (``hrflow_webhooks.queue``).
arq gives at-least-once execution; this module turns it into "each handler's
effect once per run, or a dead letter with the reason, or a recorded skip":

- runs of one subject never overlap and start in arrival order: the claim
  script parks a run whose subject is busy; a job started by another claimer
  (the plain ``arq`` command) asks ``BEGIN_RUN_SCRIPT`` first and defers
  itself without using up a try;
- a completion marker per (run, handler) is written when a handler succeeds,
  so a re-run of the same run (retry, crash, SIGTERM) skips what already
  happened; the markers go with the run when it finishes
  (``FINISH_RUN_SCRIPT``), so a later run never skips a handler;
- a transient failure raises arq's ``Retry`` with exponential backoff and
  jitter (arq retries nothing else), honouring the error's Retry-After;
- a 404 on the event's own subject inside the grace period is waited for
  without using up a try; after it, the run records one skip;
- a permanent failure, or the last try, writes a dead letter;
- the run is held on its worker's lease (``workers.leases``): before each handler
  and each write the job checks that the lease still holds, and every write of the
  run's outcome is fenced by the claim's token, so a worker that was frozen or cut
  off past its lease gives the run up (another worker holds it) instead of writing
  a second outcome;
- arq treats its own ``job_timeout`` as final and would drop the event, so it
  must never be what ends a run: handlers stop at the run's deadline, the whole
  run (every Redis call of its bookkeeping included) has a second deadline just
  before arq's, and should arq's timer fire all the same (a handler blocked the
  event loop past it), the cancellation becomes a retry. A handler that blocks
  the loop is named in a log line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from arq import Retry

from hrflow_client.profiles import timestamp_of
from hrflow_webhooks.errors import SubjectGoneError, SubjectNotReadableError, retry_after_of
from hrflow_webhooks.event_log import packed_entry
from hrflow_webhooks.events import Event, profile_subject_parts
from hrflow_webhooks.queue import (
    BEGIN_RUN_SCRIPT,
    DONE,
    PARK_MS,
    RUN_MARKERS_LIFETIME_S,
    SKIPPED,
    UNROUTED_TYPES_MAX,
    Fence,
    QueueKeys,
    trusted_state,
)
from workers import metrics
from workers.arq_worker import CLAIMS, RUNS_CLAIMED_IN_ORDER
from workers.context import (
    EventLogger,
    HandlerContext,
    HandlerNotes,
    StateSeen,
    WorkerServices,
)
from workers.dead_letters import describe_error
from workers.failures import is_transient
from workers.leases import Claim, Leases
from workers.registry import Handler

logger = logging.getLogger(__name__)

# A handler step that holds the event loop this long is named in a warning: it also stalls
# every other run of the worker, and past the job timeout it makes arq's timer fire.
LOOP_BLOCK_WARNING_S = 1.0
NOT_FOUND_SKIP_REASON = "profile not found"


def deadline_margin_s(job_timeout_s: float) -> float:
    """Stop handlers this long before arq's own timeout fires, to write markers and retry."""
    return min(2.0, job_timeout_s / 4)


class HandlerTimeoutError(TimeoutError):
    """The job's time ran out before this handler finished or started."""


class LeaseLostError(Exception):
    """This worker no longer holds the run: its lease lapsed, or another worker claimed it."""


@dataclass(frozen=True, slots=True)
class Failure:
    handler: str
    error: BaseException

    @property
    def transient(self) -> bool:
        return is_transient(self.error)


def retry_delay_s(job_try: int, base_s: float, max_s: float, retry_after_s: float | None) -> float:
    """Exponential backoff with full jitter in its upper half; never below Retry-After, never
    above ``max_s``: a year-long Retry-After (a CDN's, or a plugin's) would hold the run, and
    every later change of its profile behind it, for that year. (NaN or a negative one leaves
    the backoff: ``max`` keeps its first argument when the comparison is false.)"""
    ceiling = min(max_s, base_s * 2 ** (job_try - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    return min(max(delay, retry_after_s or 0.0), max_s)


def not_found_delay_s(age_s: float, grace_s: float) -> float:
    """Backoff while a subject is not readable yet: about its age (so doubling), at most 30 s,
    and the last wait lands just past the grace period, where the run gives up."""
    return max(0.2, min(age_s, 30.0, grace_s - age_s + 0.1))


@dataclass(frozen=True, slots=True)
class RunClock:
    """The run's deadlines, all before arq's own ``job_timeout`` (which is final)."""

    handlers_until: float  # loop time
    bookkeeping_until: float

    @classmethod
    def start(cls, job_timeout_s: float) -> RunClock:
        now = asyncio.get_running_loop().time()
        margin = deadline_margin_s(job_timeout_s)
        return cls(now + job_timeout_s - margin, now + job_timeout_s - margin / 4)

    def overran(self) -> bool:
        return asyncio.get_running_loop().time() >= self.bookkeeping_until


class TimedSteps:
    """Awaits a coroutine, timing each step it runs on the event loop.

    A step is the code between two awaits: one that takes seconds blocks every other
    run of this worker (``time.sleep`` inside ``async def``), and only a step's own
    duration tells which handler did it.
    """

    __slots__ = ("_coroutine", "longest_step_s")

    def __init__(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self._coroutine = coroutine
        self.longest_step_s = 0.0

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine = self._coroutine
        value: Any = None
        error: BaseException | None = None
        while True:
            started = time.perf_counter()
            try:
                yielded = coroutine.send(value) if error is None else coroutine.throw(error)
            except StopIteration:
                return
            finally:
                self.longest_step_s = max(self.longest_step_s, time.perf_counter() - started)
            value, error = None, None
            try:
                value = yield yielded
            except BaseException as caught:  # cancellation too: the handler sees it
                error = caught


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What arq tells the job about this run."""

    run_id: str
    job_try: int
    score_ms: int | None
    claimed_in_order: bool
    only_handlers: tuple[str, ...] | None = None  # a replay runs the dead-lettered ones
    claim: Claim | None = None  # None: claimed by arq's own worker, which holds no lease

    @classmethod
    def from_arq(cls, arq_ctx: dict[str, Any], handlers: list[str] | None) -> RunInfo:
        run_id = str(arq_ctx["job_id"])
        leases: Leases | None = arq_ctx.get(CLAIMS)
        return cls(
            run_id=run_id,
            job_try=int(arq_ctx["job_try"]),
            score_ms=arq_ctx.get("score"),
            claimed_in_order=bool(arq_ctx.get(RUNS_CLAIMED_IN_ORDER)),
            only_handlers=None if handlers is None else tuple(handlers),
            claim=None if leases is None else leases.claim_of(run_id),
        )


async def handle_event(
    arq_ctx: dict[str, Any], event_data: dict[str, Any], handlers: list[str] | None = None
) -> str:
    """arq's entry point: one job per run. Returns the outcome, for tests and logs."""
    services: WorkerServices = arq_ctx["services"]
    event = Event.from_dict(event_data)
    info = RunInfo.from_arq(arq_ctx, handlers)
    run = EventRun(services, event, info, RunClock.start(services.settings.job_timeout_s))
    try:
        # The whole run, bookkeeping included, ends before arq's timeout: the worker's Redis
        # client retries forever, and a Redis stall must end in a retry, not in arq's timeout.
        async with asyncio.timeout_at(run.clock.bookkeeping_until):
            return await run.execute()
    except Retry:
        raise
    except LeaseLostError as lost:
        return run.given_up(lost)
    except asyncio.CancelledError:
        # The worker gave its lease up (workers.leases), arq's timer fired (a handler held
        # the loop past the job timeout), or the worker is stopping. The first: the run is
        # another worker's now. The others: a retry, never arq's final "timed out"; when
        # stopping, arq cancels the job's caller as well and re-queues the run itself.
        if run.lease_lost():
            return run.given_up(LeaseLostError("this worker's lease lapsed: run cancelled"))
        if run.clock.overran():
            logger.error("run overran the job timeout, will retry", extra=run.log_fields)
        else:
            logger.info("run cancelled, will run again", extra=run.log_fields)
        raise Retry(defer=run.backoff_s(None)) from None
    except Exception as error:
        # Our own bookkeeping failed or ran out of time (Redis went away or stalled). arq
        # would record the job as failed and drop it: retry instead; the try limit bounds it.
        logger.warning(
            "job bookkeeping failed, will retry",
            extra={**run.log_fields, "error_type": type(error).__name__},
        )
        raise Retry(defer=run.backoff_s(None)) from error


class EventRun:
    def __init__(
        self, services: WorkerServices, event: Event, info: RunInfo, clock: RunClock
    ) -> None:
        self.services = services
        self.event = event
        self.info = info
        self.clock = clock
        self.settings = services.settings
        self.keys: QueueKeys = services.keys
        claim = info.claim
        self.fence = claim.fence if claim else Fence.unfenced(info.run_id, services.keys)
        self.handlers: dict[str, Handler | None] = {}  # set by execute()
        self.markers_written = 0  # this try's completion markers (done, dead or skip)
        # A handler ran to ok in this run (this try, or an earlier one's marker): only then
        # is the profile's state recorded as handled (see _handled_state).
        self.acted = False
        self.started_at = time.time()
        self.state_seen = StateSeen()
        self.log_entries: list[str] = []  # this try's event-log entries, packed
        self.log_fields = {
            "event_id": event.id,
            "run_id": info.run_id,
            "canonical_type": event.canonical_type,
            "job_try": info.job_try,
        }
        if info.score_ms is not None and info.job_try == 1:
            metrics.PICKUP_SECONDS.observe(max(0.0, time.time() - info.score_ms / 1000))

    def backoff_s(self, retry_after_s: float | None) -> float:
        s = self.settings
        return retry_delay_s(self.info.job_try, s.retry_base_s, s.retry_max_s, retry_after_s)

    async def execute(self) -> str:
        if not await self._subject_free():
            raise Retry(defer=PARK_MS / 1000)  # its try was given back
        registered = self.services.registry.handlers_for(self.event.canonical_type)
        if not registered and self.info.only_handlers is None:
            return await self._unrouted()
        handlers = self._handlers_to_run(registered)
        if not handlers:
            return await self._finish("not for these sources")
        self.handlers = handlers
        if self.info.job_try > self.settings.max_tries:
            # Only reachable when earlier tries never reported back (worker killed, timeout).
            lost = HandlerTimeoutError(
                f"gave up after {self.info.job_try - 1} tries that never finished"
            )
            pending = await self._pending(list(handlers))
            await self._dead_letter([Failure(name, lost) for name in pending], "tries exhausted")
            return await self._finish("dead_lettered" if pending else "done")
        failures = await self._run_pending(await self._pending(list(handlers)))
        return await self._settle(failures)

    # --- before the handlers -----------------------------------------------------------------

    async def _subject_free(self) -> bool:
        if self.info.claimed_in_order:
            return True
        free = await self.services.redis.eval(  # type: ignore[misc]
            BEGIN_RUN_SCRIPT,
            1,
            self.keys.retry(self.info.run_id),
            self.info.run_id,
            self.keys.order_prefix,
            str(self.info.job_try - 1),
        )
        return bool(free)

    def _handlers_to_run(self, registered: tuple[Handler, ...]) -> dict[str, Handler | None]:
        """This run's handlers by name, in order: those for the event's source, or a
        replay's (None: a replayed handler that is no longer registered)."""
        if self.info.only_handlers is not None:
            by_name = {h.name: h for h in registered}
            return {name: by_name.get(name) for name in self.info.only_handlers}
        source_key = self.event.source_key
        return {h.name: h for h in registered if h.accepts_source(source_key)}

    async def _unrouted(self) -> str:
        await self.services.count_unrouted_script(
            keys=[self.keys.unrouted], args=[self.event.canonical_type, UNROUTED_TYPES_MAX]
        )
        metrics.handler_outcome(self.event.canonical_type, "-", "unrouted")
        logger.info("no handler for event type", extra={**self.log_fields, "outcome": "unrouted"})
        return await self._finish("unrouted")

    async def _pending(self, names: list[str]) -> list[str]:
        if self.info.job_try == 1:  # a run's first try has no markers: one round trip less
            return names
        # HGETALL, not HKEYS: the same one command, and an earlier try's ok counts as acted.
        finished = await self.services.redis.hgetall(self.keys.done(self.info.run_id))  # type: ignore[misc]
        self.acted = self.acted or DONE.encode() in finished.values()
        finished_names = {name.decode() for name in finished}
        return [name for name in names if name not in finished_names]

    # --- the handlers --------------------------------------------------------------------------

    async def _run_pending(self, pending: list[str]) -> list[Failure]:
        failures: list[Failure] = []
        for position, name in enumerate(pending):
            error = await self._run_one(name)
            if error is not None:
                failures.append(Failure(name, error))
                continue
            self.acted = True
            finishes_now = position == len(pending) - 1 and not failures
            if not finishes_now:  # the finish removes the run with its markers: none needed
                await self._mark(name, DONE)
        return failures

    async def _run_one(self, name: str) -> BaseException | None:
        self._hold()  # no handler starts once the run may be another worker's
        handler = self.handlers.get(name)
        if handler is None:
            return LookupError(f"handler {name!r} is no longer registered for this event type")
        fields = {**self.log_fields, "handler": name}
        notes = HandlerNotes()
        ctx = HandlerContext(
            self.event, name, self.info.job_try, EventLogger(logger, fields), self.services,
            self.state_seen, notes,
        )  # fmt: skip
        steps = TimedSteps(handler.run(self.event, ctx))
        started = time.perf_counter()
        try:
            error = await self._outcome_of(steps)
        finally:  # also when arq's timer cancels the run: that is when it matters most
            self._warn_if_blocked(name, steps.longest_step_s)
        self._report(name, error, time.perf_counter() - started, notes.skip_reason)
        return error

    async def _outcome_of(self, steps: TimedSteps) -> BaseException | None:
        try:
            async with asyncio.timeout_at(self.clock.handlers_until):
                await steps
        except TimeoutError:
            return HandlerTimeoutError("job deadline reached")
        except Exception as caught:
            return caught
        return None

    def _warn_if_blocked(self, name: str, longest_step_s: float) -> None:
        if longest_step_s >= LOOP_BLOCK_WARNING_S:
            logger.warning(
                f"event loop blocked {longest_step_s:.1f} s by handler {name}",
                extra={**self.log_fields, "handler": name, "blocked_s": round(longest_step_s, 2)},
            )

    def _report(
        self, name: str, error: BaseException | None, duration_s: float, skip_reason: str | None
    ) -> None:
        fields = {**self.log_fields, "handler": name}
        outcome = "ok" if error is None else ("retry" if is_transient(error) else "failed")
        metrics.handler_outcome(self.event.canonical_type, name, outcome, duration_s)
        logged = "skip" if error is None and skip_reason is not None else outcome
        detail: dict[str, object] = {
            "duration_ms": round(duration_s * 1000, 1),
            "reason": skip_reason,
        }
        self._log_handler(name, logged, error, detail)
        logger.log(
            logging.INFO if error is None else logging.WARNING,
            "handler finished" if error is None else "handler failed",
            extra={
                **fields,
                "outcome": outcome,
                "duration_ms": round(duration_s * 1000, 1),
                "error_type": None if error is None else type(error).__name__,
            },
        )

    # --- after the handlers --------------------------------------------------------------------

    async def _settle(self, failures: list[Failure]) -> str:
        if not failures:
            return await self._finish("done")
        gone = [f for f in failures if isinstance(f.error, SubjectGoneError)]
        permanent = [f for f in failures if not f.transient and f not in gone]
        transient = [f for f in failures if f.transient]
        await self._skip_gone(gone, finishing=not transient)
        await self._dead_letter(permanent, "permanent error")
        if not transient:
            return await self._finish("dead_lettered" if permanent else "skipped")
        if self._only_waiting_for_subject(transient):
            await self._wait_for_subject()
        if self.info.job_try >= self.settings.max_tries:
            await self._dead_letter(transient, f"still failing after {self.info.job_try} tries")
            return await self._finish("dead_lettered")
        delay = self.backoff_s(max((retry_after_of(f.error) or 0.0) for f in transient))
        metrics.RETRIES.labels(metrics.bounded_type(self.event.canonical_type)).inc()
        logger.info(
            "event will be retried", extra={**self.log_fields, "retry_in_s": round(delay, 2)}
        )
        await self._log_retry(delay, "handler failed")
        raise Retry(defer=delay)

    def _only_waiting_for_subject(self, transient: list[Failure]) -> bool:
        """Whether this try only found the subject not readable yet, inside the grace period:
        then it does not count. Past the grace period (a plugin's own error, or clocks that
        disagree) it counts like any retry, so the run cannot wait forever. A first try that
        marked handlers done counts: the next one must not be a first try, which reads no
        markers."""
        if not all(isinstance(f.error, SubjectNotReadableError) for f in transient):
            return False
        if time.time() - self.event.received_at >= self.settings.not_found_grace_s:
            return False
        return self.info.job_try > 1 or self.markers_written == 0

    async def _wait_for_subject(self) -> None:
        """Not readable yet, inside the grace period: retry later without using up a try."""
        age_s = time.time() - self.event.received_at
        delay = not_found_delay_s(age_s, self.settings.not_found_grace_s)
        self._hold()  # a try is given back only to a run this worker still holds
        await self.services.give_back_try_script(
            keys=[self.keys.retry(self.info.run_id)], args=[self.info.job_try - 1]
        )
        logger.info(
            "subject not readable yet, will retry",
            extra={**self.log_fields, "retry_in_s": round(delay, 2)},
        )
        await self._log_retry(delay, "subject not readable yet")
        raise Retry(defer=delay)

    async def _skip_gone(self, gone: list[Failure], *, finishing: bool) -> None:
        """One skip per run, however many handlers found the subject gone."""
        if not gone:
            return
        await self.services.redis.hincrby(  # type: ignore[misc]
            self.keys.skipped, f"{self.event.canonical_type}:{NOT_FOUND_SKIP_REASON}", 1
        )
        logger.info(
            "event skipped",
            extra={**self.log_fields, "outcome": "skipped", "reason": NOT_FOUND_SKIP_REASON},
        )
        for failure in gone:
            self._log_handler(failure.handler, "skip", None, {"reason": NOT_FOUND_SKIP_REASON})
        if not finishing:  # a retry follows: these handlers must not run again in this run
            for failure in gone:
                await self._mark(failure.handler, SKIPPED)

    async def _mark(self, handler: str, value: str) -> None:
        self._hold()
        self.markers_written += 1
        marked = await self.services.mark_handler_script(
            keys=[self.keys.done(self.info.run_id), *self.fence.keys],
            args=[handler, RUN_MARKERS_LIFETIME_S, value, self.fence.token],
        )
        if not marked:
            raise LeaseLostError("marker refused: another worker holds the run")

    async def _finish(self, outcome: str) -> str:
        self._hold()
        run_id = self.info.run_id
        order = self.keys.order_of_run(run_id) or self.keys.queue
        handled_key, state = self._handled_state()
        self._log_run(outcome)
        s = self.settings
        finished = await self.services.finish_run_script(
            keys=[
                self.keys.queue, order, self.keys.job(run_id), self.keys.done(run_id),
                self.keys.log, handled_key, self.keys.retry(run_id), *self.fence.keys,
            ],
            args=[
                run_id, int(time.time() * 1000), s.event_log_max_entries, state,
                s.event_log_retention_s, self.fence.token, *self.log_entries,
            ],
        )  # fmt: skip
        if not finished:
            raise LeaseLostError("finish refused: another worker holds the run")
        if self.info.claim is not None:  # 1, or 2: a re-sent call found the run over already
            self.info.claim.settled = True  # its claim went with it: arq has nothing to add
        return outcome

    # --- the lease ---------------------------------------------------------------------------

    def _hold(self) -> None:
        """Go on only while this worker's lease holds the run (workers.leases)."""
        if self.lease_lost():
            raise LeaseLostError("this worker's lease lapsed")

    def lease_lost(self) -> bool:
        claim = self.info.claim
        return claim is not None and not claim.held()

    def given_up(self, lost: LeaseLostError) -> str:
        """The run is another worker's now: nothing more is written here. arq's end of the
        try gives the claim back, unless the new holder's token replaced it already."""
        logger.warning(
            "run given up: another worker runs it",
            extra={**self.log_fields, "reason": str(lost), "outcome": "given_up"},
        )
        return "given_up"

    # --- the event log and the handled state ---------------------------------------------------

    def _handled_state(self) -> tuple[str, str]:
        """The profile's handled-state key and the state this run handled ('' for none).

        Only a run in which a handler ran to ok handled anything: an unrouted run, one no
        handler takes for its source, one whose handlers all failed, were dead-lettered or
        found the profile gone acted on no state, and recording one would have the
        reconciler call the profile handled when nobody handled it. (A handler that returned
        after choosing to do nothing, ``ctx.skipped``, did act: it decided on the state it
        saw, and would decide the same again.)

        The state is the newest of what the handlers read or wrote (HrFlow's ``updated_at``)
        and what the reconciler listed when it queued the event (the run started after that
        listing, so its handlers saw that state or a newer one). A run that learnt neither
        records nothing: a state made up from our clock could hide a change it never saw,
        and the reconciler would rather queue a profile once more than miss it. Nor is a
        state ahead of our clock kept (``trusted_state``): HrFlow's answer is not trusted
        that far.
        """
        if not self.acted:
            return self.keys.queue, ""
        parts = profile_subject_parts(self.event.subject)
        hint = self.event.get("reconciler")
        listed = timestamp_of(hint.get("updated_at")) if isinstance(hint, Mapping) else None
        now = time.time()
        candidates = (self.state_seen.updated_at, listed)
        seen = [s for s in candidates if s is not None and trusted_state(s, now) is not None]
        if parts is None or not seen:
            return self.keys.queue, ""
        source_key, profile_key = parts
        return self.keys.handled(source_key, profile_key), str(int(max(seen)))

    def _log_handler(
        self, handler: str, outcome: str, error: BaseException | None, detail: dict[str, object]
    ) -> None:
        if error is not None:
            described = describe_error(error)
            detail = {**detail, "error": described["type"], "hrflow_status": described["status"]}
        self._log("handler", outcome, {"handler": handler, **detail})

    def _log_run(self, outcome: str, detail: dict[str, object] | None = None) -> None:
        self._log(
            "run",
            outcome,
            {
                "worker": self.services.worker_id,
                "try": self.info.job_try,
                "started_ms": int(self.started_at * 1000),
                "duration_ms": round((time.time() - self.started_at) * 1000, 1),
                **(detail or {}),
            },
        )

    def _log(self, kind: str, outcome: str, detail: dict[str, object]) -> None:
        e = self.event
        self.log_entries += packed_entry(
            kind, e.id, self.info.run_id, e.subject, e.canonical_type, outcome, detail
        )

    async def _log_retry(self, delay_s: float, reason: str) -> None:
        """A try that ends in a retry writes its entries here (a finish writes them itself)."""
        self._hold()
        self._log_run("retry", {"retry_in_s": round(delay_s, 2), "reason": reason})
        await self.services.append_log_script(
            keys=[self.keys.log], args=[self.settings.event_log_max_entries, *self.log_entries]
        )
        self.log_entries = []

    async def _dead_letter(self, failures: list[Failure], reason: str) -> None:
        for failure in failures:
            self.markers_written += 1  # the letter marks its handler dead in this run
            self._hold()
            letter_id = await self.services.dead_letters.add(
                    self.event, self.info.run_id, failure.handler, failure.error,
                    self.info.job_try, reason, self.fence,
            )  # fmt: skip
            if letter_id is None:
                raise LeaseLostError("dead letter refused: another worker holds the run")
            metrics.DEAD_LETTERS.labels(
                metrics.bounded_type(self.event.canonical_type), failure.handler
            ).inc()
            self._log_handler(
                failure.handler, "dead", failure.error,
                {"dead_letter_id": letter_id, "reason": reason},
            )  # fmt: skip
            logger.error(
                "event dead-lettered",
                extra={
                    **self.log_fields,
                    "handler": failure.handler,
                    "dead_letter_id": letter_id,
                    "reason": reason,
                    "error_type": type(failure.error).__name__,
                },
            )
