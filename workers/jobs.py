"""The job: run every handler registered for one event, once each.

arq gives at-least-once execution; this module turns it into "each handler's
effect once, or a dead letter with the reason":

- a completion marker per (event, handler) is written when a handler
  succeeds, so a re-run (retry, crash, SIGTERM) skips what already happened;
- a transient failure raises arq's ``Retry`` with exponential backoff and
  jitter (arq retries nothing else), honouring the error's Retry-After;
- a permanent failure, or the last try, writes a dead letter;
- the whole run has a deadline below arq's ``job_timeout``, because arq
  treats its own timeout as final and would drop the event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from arq import Retry

from hrflow_webhooks.errors import is_transient, retry_after_of
from hrflow_webhooks.events import Event
from workers import metrics
from workers.context import EventLogger, HandlerContext, WorkerServices
from workers.dead_letters import DeadLetters
from workers.registry import Handler

logger = logging.getLogger("hrflow_webhooks.worker")


def deadline_margin_s(job_timeout_s: float) -> float:
    """Stop handlers this long before arq's own timeout fires, to write markers and retry."""
    return min(2.0, job_timeout_s / 4)


class HandlerTimeoutError(TimeoutError):
    """The job's time ran out before this handler finished or started."""


@dataclass(frozen=True, slots=True)
class Failure:
    handler: Handler
    error: BaseException

    @property
    def transient(self) -> bool:
        return is_transient(self.error)


def retry_delay_s(job_try: int, base_s: float, max_s: float, retry_after_s: float | None) -> float:
    """Exponential backoff with full jitter in its upper half; never below Retry-After."""
    ceiling = min(max_s, base_s * 2 ** (job_try - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, retry_after_s or 0.0)


async def handle_event(arq_ctx: dict[str, Any], event_data: dict[str, Any]) -> str:
    """arq's entry point: one job per event. Returns the outcome, for tests and logs."""
    services: WorkerServices = arq_ctx["services"]
    event = Event.from_dict(event_data)
    job_try = int(arq_ctx["job_try"])
    # The receiver queues an event under its own id; replays use another job id. The first
    # try of the receiver's job can have no completion markers to honour: nothing ran yet.
    first_run = job_try == 1 and arq_ctx.get("job_id") == event.id
    run = EventRun(services, event, job_try, arq_ctx.get("score"), first_run=first_run)
    try:
        return await run.execute()
    except Retry:
        raise
    except Exception as error:
        # Our own bookkeeping failed (Redis went away mid-job...). arq would record the job
        # as failed and drop it: retry instead; the try limit still bounds this.
        logger.warning(
            "job bookkeeping failed, will retry",
            extra={"event_id": event.id, "job_try": job_try, "error_type": type(error).__name__},
        )
        s = services.settings
        raise Retry(defer=retry_delay_s(job_try, s.retry_base_s, s.retry_max_s, None)) from error


class EventRun:
    def __init__(
        self,
        services: WorkerServices,
        event: Event,
        job_try: int,
        score_ms: int | None,
        *,
        first_run: bool = False,
    ) -> None:
        self.services = services
        self.event = event
        self.job_try = job_try
        self.first_run = first_run
        self.settings = services.settings
        self.dead_letters = DeadLetters(services.redis, services.keys)
        self.log_fields = {
            "event_id": event.id,
            "canonical_type": event.canonical_type,
            "job_try": job_try,
        }
        if score_ms is not None and job_try == 1:
            metrics.PICKUP_SECONDS.observe(max(0.0, time.time() - score_ms / 1000))

    async def execute(self) -> str:
        handlers = self.services.registry.handlers_for(self.event.canonical_type)
        if not handlers:
            return await self._unrouted()
        if self.job_try > self.settings.max_tries:
            # Only reachable when earlier tries never reported back (worker killed, arq timeout).
            pending = await self._pending(handlers)
            lost = HandlerTimeoutError(
                f"gave up after {self.job_try - 1} tries that never finished"
            )
            await self._dead_letter([Failure(h, lost) for h in pending], "tries exhausted")
            return "dead_lettered" if pending else "done"
        failures = await self._run_pending(await self._pending(handlers))
        return await self._settle(failures)

    async def _unrouted(self) -> str:
        await self.services.redis.hincrby(  # type: ignore[misc]
            self.services.keys.unrouted, self.event.canonical_type, 1
        )
        metrics.handler_outcome(self.event.canonical_type, "-", "unrouted")
        logger.info("no handler for event type", extra={**self.log_fields, "outcome": "unrouted"})
        return "unrouted"

    async def _pending(self, handlers: tuple[Handler, ...]) -> list[Handler]:
        if self.first_run:  # one Redis round trip less per event (docs/benchmarks.md)
            return list(handlers)
        finished = await self.services.redis.hkeys(  # type: ignore[misc]
            self.services.keys.done(self.event.id)
        )
        finished_names = {name.decode() for name in finished}
        return [h for h in handlers if h.name not in finished_names]

    async def _run_pending(self, pending: list[Handler]) -> list[Failure]:
        deadline = (
            asyncio.get_running_loop().time()
            + self.settings.job_timeout_s
            - deadline_margin_s(self.settings.job_timeout_s)
        )
        failures: list[Failure] = []
        for handler in pending:
            error = await self._run_one(handler, deadline)
            if error is None:
                await self._mark_done(handler)
            else:
                failures.append(Failure(handler, error))
        return failures

    async def _run_one(self, handler: Handler, deadline: float) -> BaseException | None:
        fields = {**self.log_fields, "handler": handler.name}
        ctx = HandlerContext(
            self.event, handler.name, self.job_try, EventLogger(logger, fields), self.services
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                await handler.run(self.event, ctx)
        except TimeoutError:
            error: BaseException | None = HandlerTimeoutError("job deadline reached")
        except Exception as caught:
            error = caught
        else:
            error = None
        duration = time.perf_counter() - started
        outcome = "ok" if error is None else ("retry" if is_transient(error) else "failed")
        metrics.handler_outcome(self.event.canonical_type, handler.name, outcome, duration)
        logger.log(
            logging.INFO if error is None else logging.WARNING,
            "handler finished" if error is None else "handler failed",
            extra={
                **fields,
                "outcome": outcome,
                "duration_ms": round(duration * 1000, 1),
                "error_type": None if error is None else type(error).__name__,
            },
        )
        return error

    async def _mark_done(self, handler: Handler) -> None:
        done_key = self.services.keys.done(self.event.id)
        await self.services.mark_done_script(
            keys=[done_key], args=[handler.name, self.settings.dedup_window_s]
        )

    async def _settle(self, failures: list[Failure]) -> str:
        if not failures:
            return "done"
        permanent = [f for f in failures if not f.transient]
        transient = [f for f in failures if f.transient]
        await self._dead_letter(permanent, "permanent error")
        if not transient:
            return "dead_lettered"
        if self.job_try >= self.settings.max_tries:
            await self._dead_letter(transient, f"still failing after {self.job_try} tries")
            return "dead_lettered"
        delay = retry_delay_s(
            self.job_try,
            self.settings.retry_base_s,
            self.settings.retry_max_s,
            max((retry_after_of(f.error) or 0.0) for f in transient),
        )
        metrics.RETRIES.labels(self.event.canonical_type).inc()
        logger.info(
            "event will be retried", extra={**self.log_fields, "retry_in_s": round(delay, 2)}
        )
        raise Retry(defer=delay)

    async def _dead_letter(self, failures: list[Failure], reason: str) -> None:
        for failure in failures:
            letter_id = await self.dead_letters.add(
                self.event, failure.handler.name, failure.error, self.job_try, reason
            )
            metrics.DEAD_LETTERS.labels(self.event.canonical_type, failure.handler.name).inc()
            logger.error(
                "event dead-lettered",
                extra={
                    **self.log_fields,
                    "handler": failure.handler.name,
                    "dead_letter_id": letter_id,
                    "reason": reason,
                    "error_type": type(failure.error).__name__,
                },
            )
