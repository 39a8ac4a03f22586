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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from arq import Worker as ArqWorker
from arq.utils import timestamp_ms
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from hrflow_webhooks.queue import CLAIM_SCRIPT, PARK_MS, QueueKeys
from workers.heartbeats import WorkerBeat, forget_worker, record_heartbeat, worker_name

logger = logging.getLogger(__name__)
# In the jobs' context: this worker claimed the run in its subject's order already.
RUNS_CLAIMED_IN_ORDER = "runs_claimed_in_order"


class Worker(ArqWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claim_script: Any = None
        self._order_prefix = QueueKeys(self.queue_name).order_prefix
        self.ctx[RUNS_CLAIMED_IN_ORDER] = True
        self.worker_id = worker_name()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        free = self.max_jobs - self.job_counter
        candidates = [job_id.decode() for job_id in job_ids]
        candidates = [job_id for job_id in candidates if not self._running_here(job_id)]
        if free <= 0 or not candidates:
            return
        for job_id, score in await self._claim(candidates, free):
            await self._start(job_id, score)

    def _running_here(self, job_id: str) -> bool:
        # A running task here already holds the job's in-progress key: skip it without
        # asking Redis. A finished task stays in ``tasks`` until the end of the poll, and
        # its job may be due again (retried), so only a task still running is skipped.
        task = self.tasks.get(job_id)
        return task is not None and not task.done()

    async def _claim(self, candidates: list[str], most: int) -> list[tuple[str, int]]:
        if self._claim_script is None:
            self._claim_script = self.pool.register_script(CLAIM_SCRIPT)
        lifetime_ms = int(self.in_progress_timeout_s * 1000)
        args = [timestamp_ms(), lifetime_ms, most, self._order_prefix, PARK_MS, *candidates]
        try:
            reply = await self._claim_script(keys=[self.queue_name], args=args)
        except ResponseError as error:
            # arq skips a job whose MULTI/EXEC Redis refuses (maxmemory, read-only replica)
            # and polls again; so does this. Other writes (health check, results) still
            # raise, which ends the worker and lets `hrflow-webhooks worker` restart it.
            logger.debug("job claim refused", extra={"error_type": type(error).__name__})
            return []
        return [
            (job_id.decode(), int(float(score)))
            for job_id, score in zip(reply[::2], reply[1::2], strict=True)
        ]

    async def _start(self, job_id: str, score: int) -> None:
        # As arq does once its MULTI/EXEC succeeded: a slot, a task, and the slot back when
        # the task ends. At most ``max_jobs - job_counter`` were claimed, so this never waits.
        await self.sem.acquire()
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job_id, score))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task

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
                await record_heartbeat(self.pool, QueueKeys(self.queue_name), self._beat())
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
        with contextlib.suppress(RedisError):  # stopping: a Redis away must not stop that
            await forget_worker(self.pool, QueueKeys(self.queue_name), self.worker_id)
        await super().close()
