"""Runs held on leases: a dead, frozen or cut-off worker's runs run elsewhere within seconds.

arq holds a claimed job with an in-progress key that expires ``job_timeout`` + 10 s
later: a killed worker's runs waited that long, and a run whose handler outlived it (a
sync handler still in its thread) could start again on another worker while it still
ran. Here:

- each worker process holds one **lease**, ``<queue>:lease:<lease id>``, a key that
  lives ``HRFLOW_WORKER_LEASE_S`` (5 s) and lists the claims the worker holds, by number;
  the worker renews it every quarter of that, for all its runs at once, with one
  ``PEXPIRE`` (or, when runs ended since, one script that also strikes their numbers);
- a **claim** writes ``<lease id>|<n>`` (its fencing token) into the run's in-progress
  key, with no expiry of its own, and adds ``n`` to the lease's list: the run is held
  while the lease lives and lists it, however long its handlers take. The claim script
  takes over any other run (``hrflow_webhooks.queue.CLAIM_SCRIPT``): one whose worker
  died, froze or lost Redis (the lease expired), and one whose worker no longer runs it
  although its claim is still there (its end was written to a primary that failed before
  its replicas copied it, or could not be written at all): its number was struck when
  its task ended. A worker's own stale claim is its to take again.
- every write of a run's outcome goes through a script that first checks the token and
  the lease (:class:`hrflow_webhooks.queue.Fence`): a worker that lost its lease cannot
  write over the run's new holder, so an outcome is written once;
- a worker gives its runs up **before anyone may take them over**: its own view of the
  lease ends 1.5 renewal intervals before the key can expire in Redis (counted from when
  the last successful renewal was *sent*). Then, or when a renewal finds the lease gone,
  the runs held under it are cancelled (a sync handler's thread cannot be: it finishes
  its call), no further write of theirs passes the fences, and a new lease, with a new
  id, holds the claims made from then on.

Renewals only ever strike numbers of claims that ended, never rewrite the list, so a
renewal that reaches Redis late (after a timeout, after a newer one) cannot drop a claim
made meanwhile. They use a fail-fast connection of their own: the job pool waits Redis
out, and a renewal must notice a Redis it cannot reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hrflow_webhooks.queue import RENEW_LEASE_SCRIPT, Fence, QueueKeys
from hrflow_webhooks.redis_setup import unreachable_reason
from workers import metrics

logger = logging.getLogger(__name__)

# Renewals per lease: two can fail (a Redis hiccup) and the runs go on.
RENEWALS_PER_LEASE = 4
# How much earlier than the key's earliest expiry the worker stops trusting its lease: more
# than one renewal interval, so that the renewal loop, which looks once per interval, gives
# the runs up before another worker can take them.
GIVE_UP_EARLY_INTERVALS = 1.5

RunsLost = Callable[[list[str]], None]


@dataclass(slots=True)
class Lease:
    """One lease of this worker: its id and, by this process's clock, until when it holds."""

    id: str
    key: str
    valid_until: float = 0.0  # time.monotonic(); 0: not taken yet
    lost: bool = False

    def valid(self) -> bool:
        return not self.lost and time.monotonic() < self.valid_until

    @property
    def taken(self) -> bool:
        return self.valid_until > 0


@dataclass(slots=True)
class Claim:
    """This worker's claim of one run: its fence, and whether its end was written."""

    run_id: str
    number: int  # the claim's number in its lease's list (the token's suffix)
    fence: Fence
    lease: Lease
    settled: bool = False  # the run's end is written (or given up): arq has nothing to add
    since: float = field(default_factory=time.monotonic)
    overdue: bool = False  # said to be held too long, once

    def held(self) -> bool:
        """Whether the run may take its next step here: the lease holds by our clock."""
        return self.lease.valid()


@dataclass
class Leases:
    """The worker's lease and its claims (see the module docstring)."""

    redis: Redis  # fail-fast, of its own
    keys: QueueKeys
    lease_s: float
    worker_id: str
    # Held longer than this, a run is said to be stuck (its handler does not return).
    overdue_after_s: float = float("inf")
    lease: Lease = field(init=False)
    claims: dict[str, Claim] = field(default_factory=dict)
    next_token: int = 0  # the number the next claim's fencing token ends with
    runs_lost: RunsLost | None = None  # the worker cancels the tasks of runs given up
    _ended: set[int] = field(default_factory=set)  # numbers to strike from the lease's list
    _task: asyncio.Task[None] | None = None
    _failing: str | None = None  # the renewal error last logged, said once
    _renew_script: Any = None

    def __post_init__(self) -> None:
        self.lease = self._new_lease()
        self._renew_script = self.redis.register_script(RENEW_LEASE_SCRIPT)

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    @property
    def interval_s(self) -> float:
        return self.lease_s / RENEWALS_PER_LEASE

    @property
    def trusted_s(self) -> float:
        """How long after a renewal was sent this worker still trusts its lease."""
        return self.lease_s - GIVE_UP_EARLY_INTERVALS * self.interval_s

    def _new_lease(self) -> Lease:
        lease_id = f"{self.worker_id}:{secrets.token_hex(4)}"
        return Lease(lease_id, self.keys.lease(lease_id))

    # --- the lease ------------------------------------------------------------------------
    async def start(self) -> None:
        """Take the first lease (waiting for Redis), then keep it in the background."""
        while True:
            if await self._take():
                break
            await asyncio.sleep(self.interval_s)
        self._task = asyncio.get_running_loop().create_task(self._keep_for_ever())

    async def _take(self) -> bool:
        sent = time.monotonic()
        try:
            await self.redis.set(self.lease.key, b",", px=self.lease_ms)  # no claim listed yet
        except (RedisError, OSError) as error:
            self._renewal_failed(error)
            return False
        self.lease.valid_until = sent + self.trusted_s
        self._ended.clear()  # numbers of an older lease: its list is gone with it
        return True

    async def _keep_for_ever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.renew()
            lease = self.lease
            if lease.taken and not lease.valid() and not lease.lost:
                await self._give_up(lease, "not renewed in time: redis unreachable")
            self._say_overdue()

    def _say_overdue(self) -> None:
        """A run held on and on blocks its subject's later runs, silently: say so, once a run,
        and count them. A sync handler waiting on a call without a timeout does it: its
        thread cannot be stopped, and starting the run elsewhere would overlap it."""
        now, overdue = time.monotonic(), 0
        for claim in self.claims.values():
            if now - claim.since < self.overdue_after_s:
                continue
            overdue += 1
            if not claim.overdue:
                claim.overdue = True
                logger.error(
                    "run held past its deadline: a handler has not returned (a blocking call "
                    "without a timeout?); its subject's later runs wait",
                    extra={"run_id": claim.run_id, "held_s": round(now - claim.since)},
                )
        metrics.RUNS_OVERDUE.set(overdue)

    async def renew(self) -> None:
        """One renewal: the lease's expiry pushed back, the numbers of ended runs struck."""
        lease = self.lease
        if not lease.taken:
            await self._take()  # the last lease was given up while Redis was away
            return
        sent, ended = time.monotonic(), sorted(self._ended)
        try:
            if ended:
                alive = await self._renew_script(keys=[lease.key], args=[self.lease_ms, *ended])
            else:  # nothing to strike: one plain command
                alive = await self.redis.pexpire(lease.key, self.lease_ms)
        except (RedisError, OSError) as error:
            self._renewal_failed(error)
            return
        if self._failing is not None:
            logger.info("worker lease renewed again", extra={"lease": lease.id})
            self._failing = None
        if not alive:
            await self._give_up(lease, "the lease expired in redis")
            return
        self._ended.difference_update(ended)
        if lease is self.lease and not lease.lost:
            lease.valid_until = sent + self.trusted_s

    async def _give_up(self, lease: Lease, why: str) -> None:
        """Every run held under ``lease`` is another worker's to run: cancel them here, and
        hold the claims made from now on under a new lease."""
        if lease.lost:
            return
        lease.lost = True
        metrics.LEASE_LAPSES.inc()
        runs = [run_id for run_id, claim in self.claims.items() if claim.lease is lease]
        logger.warning(
            "worker lease lapsed: its runs are given up, another worker runs them",
            extra={"lease": lease.id, "runs": len(runs), "reason": why, "lease_s": self.lease_s},
        )
        if self.runs_lost is not None and runs:
            self.runs_lost(runs)
        if lease is self.lease:
            self.lease = self._new_lease()
            await self._take()

    async def lapsed(self) -> None:
        """The claim script found the lease gone in Redis."""
        await self._give_up(self.lease, "the lease expired in redis")

    def _renewal_failed(self, error: BaseException) -> None:
        reason = unreachable_reason(error)
        if reason != self._failing:
            logger.warning(
                "worker lease not renewed: redis unavailable; its runs are given up if this lasts",
                extra={"reason": reason, "lease": self.lease.id, "lease_s": self.lease_s},
            )
            self._failing = reason

    def valid(self) -> bool:
        return self.lease.valid()

    # --- claims ---------------------------------------------------------------------------
    def hold(self, run_id: str, token: str) -> Claim:
        """A claim the claim script made under the current lease, numbered in its token."""
        number = int(token.rpartition("|")[2])
        self.next_token = max(self.next_token, number + 1)
        fence = Fence(QueueKeys.in_progress(run_id), self.lease.key, token)
        claim = self.claims[run_id] = Claim(run_id, number, fence, self.lease)
        return claim

    def claim_of(self, run_id: str) -> Claim | None:
        return self.claims.get(run_id)

    def forget(self, run_id: str) -> None:
        """The run's task ended: the next renewal strikes its claim from the lease's list, so
        even a claim whose end could not be written is taken over."""
        claim = self.claims.pop(run_id, None)
        if claim is not None and claim.lease is self.lease:
            self._ended.add(claim.number)

    # --- stopping -------------------------------------------------------------------------
    async def stop(self) -> None:
        """Drop the lease, so that any run still claimed under it is taken over at once
        rather than a lease later; then close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self.lease.key)
        await self.redis.aclose()
