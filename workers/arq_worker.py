"""arq's ``Worker`` with job starts claimed in one Redis round trip per poll.

arq starts jobs one at a time: for each due id it WATCHes the in-progress key,
then EXISTS, ZSCORE and MULTI/PSETEX/EXEC, four round trips per id, while the
poll loop waits. Those ids include the worker's own running jobs (an id stays
in the queue until its job finishes) and, with several workers, the other
workers' jobs, which lose the WATCH race. Profiled, that serial start was what
capped a worker near half of ``max_jobs ÷ handler time`` and kept a second
worker from adding throughput.

Here one Lua script (``hrflow_webhooks.queue.CLAIM_SCRIPT``) makes the same
checks and the same write for every candidate at once, atomically (so two
workers can never both claim an id, as with WATCH), and the jobs are then
started exactly as arq starts them. The same script keeps each subject's runs
in order: a run behind another run of its subject is parked, not claimed, so it
takes no slot and no try while it waits (``RUNS_CLAIMED_IN_ORDER`` tells the
job so).

A claim is held on the worker's lease (``workers.leases``), not on arq's
in-progress expiry, and arq's own ends of a run (``finish_job``,
``finish_failed_job``) are replaced by fenced scripts: they change nothing once
another worker holds the run, and nothing at all after the job's own finish
script, which already removed the run (arq's transaction deleted those keys a
second time). tests/test_arq_worker.py fails when arq stops calling them.

arq's poll loop has no ``try``: a Redis error in it (a failover's refused write,
an ACL, ``MISCONF``) ended the worker with its running jobs. Here the loop backs
off, says so once, and polls on; the runs in flight carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

from arq import Worker as ArqWorker
from arq.utils import timestamp_ms
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError

from hrflow_webhooks.queue import (
    CLAIM_SCRIPT,
    DROP_RUN_SCRIPT,
    PARK_MS,
    RELEASE_RUNS_SCRIPT,
    RETRY_RUN_SCRIPT,
    QueueKeys,
)
from hrflow_webhooks.redis_setup import unreachable_reason
from workers.heartbeats import WorkerBeat, forget_worker, record_heartbeat
from workers.leases import Claim, Leases

logger = logging.getLogger(__name__)
# In the jobs' context: this worker claimed the run in its subject's order already.
RUNS_CLAIMED_IN_ORDER = "runs_claimed_in_order"
# In the jobs' context: the worker's Leases, where a job finds its run's claim.
CLAIMS = "claims"
# The poll loop's backoff after a Redis error, doubling to this.
POLL_BACKOFF_MAX_S = 2.0


@dataclass(frozen=True, slots=True)
class Claimed:
    run_id: str
    score: int
    token: str


class Worker(ArqWorker):
    def __init__(self, *args: Any, leases: Leases, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leases = leases
        self.keys = QueueKeys(self.queue_name)
        self._scripts: dict[str, Any] = {}
        self.ctx[RUNS_CLAIMED_IN_ORDER] = True
        self.ctx[CLAIMS] = leases
        leases.runs_lost = self._cancel_runs
        self.worker_id = leases.worker_id
        self._poll_error: str | None = None  # the poll loop's last error, said once
        self._poll_backoff_s = 0.0

    def _script(self, lua: str) -> Any:
        """redis-py's AsyncScript for ``lua`` on arq's pool, registered once."""
        script = self._scripts.get(lua)
        if script is None:
            script = self._scripts[lua] = self.pool.register_script(lua)
        return script

    async def main(self) -> None:
        await self.leases.start()
        await super().main()

    # --- the poll loop ----------------------------------------------------------------------
    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as error:
            await self._back_off(error)
            return
        if self._poll_error is not None:
            logger.info("redis answers again: polling on", extra={"reason": self._poll_error})
            self._poll_error, self._poll_backoff_s = None, 0.0

    async def _back_off(self, error: BaseException) -> None:
        reason = unreachable_reason(error)
        self._poll_backoff_s = min(POLL_BACKOFF_MAX_S, max(0.05, self._poll_backoff_s * 2))
        if reason != self._poll_error:
            logger.warning(
                "redis error in the poll loop: backing off, runs in flight carry on",
                extra={"error_type": type(error).__name__, "reason": reason},
            )
            self._poll_error = reason
        await asyncio.sleep(self._poll_backoff_s)

    # --- claiming ---------------------------------------------------------------------------
    async def start_jobs(self, job_ids: list[bytes]) -> None:
        free = self.max_jobs - self.job_counter
        candidates = [job_id.decode() for job_id in job_ids]
        candidates = [job_id for job_id in candidates if not self._running_here(job_id)]
        if free <= 0 or not candidates or not self.leases.valid():
            return  # without a lease that holds, a claim would hold nothing
        for claimed in await self._claim(candidates, free):
            await self._start(claimed)

    def _running_here(self, job_id: str) -> bool:
        # A running task here already holds the job's in-progress key: skip it without
        # asking Redis. A finished task stays in ``tasks`` until the end of the poll, and
        # its job may be due again (retried), so only a task still running is skipped.
        task = self.tasks.get(job_id)
        return task is not None and not task.done()

    async def _claim(self, candidates: list[str], most: int) -> list[Claimed]:
        lease = self.leases.lease
        args = [
            timestamp_ms(), most, self.keys.order_prefix, PARK_MS, self.keys.lease_prefix,
            lease.id, self.leases.next_token, *candidates,
        ]  # fmt: skip
        try:
            reply = await self._script(CLAIM_SCRIPT)(keys=[self.queue_name, lease.key], args=args)
        except (OutOfMemoryError, ReadOnlyError) as error:
            # arq skips a job whose MULTI/EXEC Redis refuses (maxmemory, read-only replica)
            # and polls again; so does this. Any other error (a script that fails) reaches
            # the poll loop, which says so and backs off: never a worker that silently
            # claims nothing.
            logger.debug("job claim refused", extra={"error_type": type(error).__name__})
            return []
        if not reply[0]:  # our lease is gone in Redis: nothing was claimed
            if lease is self.leases.lease:
                await self.leases.lapsed()
            return []
        return self._held(reply)

    def _held(self, reply: list[Any]) -> list[Claimed]:
        """The claims of a claim script's reply, held under the worker's lease at once."""
        rest = reply[1:]
        claimed = [
            Claimed(job_id.decode(), int(float(score)), token.decode())
            for job_id, score, token in zip(rest[::3], rest[1::3], rest[2::3], strict=True)
        ]
        for claim in claimed:
            self.leases.hold(claim.run_id, claim.token)
        return claimed

    async def _start(self, claimed: Claimed) -> None:
        # As arq does once its MULTI/EXEC succeeded: a slot, a task, and the slot back when
        # the task ends. At most ``max_jobs - job_counter`` were claimed, so this never waits.
        job_id = claimed.run_id
        await self.sem.acquire()
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job_id, claimed.score))
        task.add_done_callback(lambda _: self._run_ended(job_id))
        self.tasks[job_id] = task

    def _cancel_runs(self, run_ids: list[str]) -> None:
        """The lease these runs were held under is given up: stop their handlers now (the job
        ends them as given up). A sync handler's thread finishes its call regardless."""
        for run_id in run_ids:
            task = self.job_tasks.get(run_id)
            if task is not None and not task.done():
                task.cancel()

    def _run_ended(self, job_id: str) -> None:
        self._release_sem_dec_counter_on_complete()
        self.leases.forget(job_id)  # its end unwritten, the next renewal lets it be taken over

    # --- arq's ends of a run, fenced ------------------------------------------------------------
    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's end of a try: nothing after the job's own finish; else the retry's new due
        time, or the claim given back (a cancelled try runs again at once)."""
        claim = self.leases.claim_of(job_id)
        if claim is None or claim.settled:
            return
        if incr_score and not finish:
            keys = [self.queue_name, *claim.fence.keys]
            args = [job_id, incr_score, claim.fence.token]
            await self._script(RETRY_RUN_SCRIPT)(keys=keys, args=args)
        else:  # cancelled (SIGTERM), or ended without writing its end: it runs again
            await self._release(claim)
        claim.settled = True

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """arq could not start the run (its job expired or is unreadable): dropped, as arq
        drops it, unless another worker holds it now."""
        claim = self.leases.claim_of(job_id)
        if claim is None or claim.settled:
            return
        order = self.keys.order_of_run(job_id) or self.queue_name
        keys = [self.queue_name, self.keys.job(job_id), self.keys.retry(job_id), order]
        await self._script(DROP_RUN_SCRIPT)(
            keys=[*keys, *claim.fence.keys], args=[job_id, claim.fence.token, timestamp_ms()]
        )
        claim.settled = True

    async def _release(self, claim: Claim) -> None:
        await self._script(RELEASE_RUNS_SCRIPT)(
            keys=[claim.fence.in_progress], args=[claim.fence.token]
        )

    async def record_health(self) -> None:
        """arq's heartbeat, which a Redis out of memory no longer turns into a restart.

        The heartbeat is a write: at ``maxmemory`` Redis refuses it, and arq's main loop
        ended the worker, which came back and died again, draining nothing. The claim
        and the run's own writes either succeed or fail alone, so the worker keeps
        finishing (and so freeing) what it can; the durability watch reports the memory.
        """
        last = self._last_health_check
        try:
            await super().record_health()
            if self._last_health_check != last:  # arq wrote its key: one interval is over
                await record_heartbeat(self.pool, self.keys, self._beat())
        except OutOfMemoryError:
            logger.warning(
                "heartbeat refused: redis is out of memory",
                extra={"error_type": "OutOfMemoryError"},
            )

    def _beat(self) -> WorkerBeat:
        return WorkerBeat(
            self.worker_id, time.time(), sum(not t.done() for t in self.tasks.values()),
            self.jobs_complete, self.jobs_retried, self.jobs_failed,
        )  # fmt: skip

    async def close(self) -> None:
        """arq's close(), which does not stop at a job task that ended in an error.

        arq gathers its job tasks first and stops at the first one that raised (a job
        cancelled inside arq's own bookkeeping by a stop without grace, a READONLY reply),
        skipping ``on_shutdown`` (the worker's HTTP session) and the pool's close: every
        restart of ``hrflow-webhooks worker`` then leaked both.
        """
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)  # as arq does first: cancel what still runs
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        await self.leases.stop()  # after the runs: what they still hold is taken over at once
        with contextlib.suppress(RedisError):  # stopping: a Redis away must not stop that
            await forget_worker(self.pool, self.keys, self.worker_id)
        await super().close()
