"""Runs held on leases: a dead, frozen or cut-off worker's runs run elsewhere within seconds.

arq holds a claimed job with an in-progress key that expires ``job_timeout`` + 10 s
later: a killed worker's runs waited that long, and a run whose handler outlived it (a
sync handler still in its thread) could start again on another worker while it still
ran. Here:

- each worker process holds one **lease**, ``<queue>:lease:<lease id>``, a key that
  lives ``HRFLOW_WORKER_LEASE_S`` (5 s) and lists the runs the worker holds; the worker
  renews it every quarter of that with one ``SET … XX PX`` that rewrites the list, for
  all its runs at once;
- a **claim** writes ``<lease id>|<n>`` (its fencing token) into the run's in-progress
  key, with no expiry of its own, and adds the run to the lease's list: the run is held
  while the lease lives and lists it, however long its handlers take. The claim script
  takes over any other run (``hrflow_webhooks.queue.CLAIM_SCRIPT``): one whose worker
  died, froze or lost Redis (the lease expired), and one whose worker no longer runs it
  although its claim is still there (the run's end was written to a primary that failed
  before its replicas copied it, or could not be written at all): the next renewal's
  list leaves it out;
- every write of a run's outcome goes through a script that first checks the token and
  the lease (:class:`hrflow_webhooks.queue.Fence`): a worker that lost its lease cannot
  write over the run's new holder, so an outcome is written once;
- the worker itself stops a run at its next step once its lease may have lapsed (no
  renewal was sent within the lease): it starts no further handler of it;
- a renewal that finds the lease gone (the worker was frozen, or cut off from Redis, for
  longer than the lease) gives up every run held under it, and a new lease, with a new
  id, holds the claims made from then on.

Claims and renewals never cross: a renewal's list is taken, and written, while no claim
is in flight (:attr:`Leases.claiming`), so it cannot drop a run claimed meanwhile.

The renewals use a fail-fast connection of their own: the job pool retries forever,
and a renewal must notice a Redis it cannot reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hrflow_webhooks.queue import Fence, QueueKeys
from hrflow_webhooks.redis_setup import unreachable_reason

logger = logging.getLogger(__name__)

# Renewals per lease: three can fail (a Redis hiccup) before the lease lapses.
RENEWALS_PER_LEASE = 4


@dataclass(slots=True)
class Lease:
    """One lease of this worker: its id and, by this process's clock, how long it holds."""

    id: str
    key: str
    valid_until: float  # time.monotonic(); the lease may have lapsed after this
    lost: bool = False

    def valid(self) -> bool:
        return not self.lost and time.monotonic() < self.valid_until


@dataclass(slots=True)
class Claim:
    """This worker's claim of one run: its fence, and whether its end was written."""

    run_id: str
    fence: Fence
    lease: Lease
    settled: bool = False  # the run's end is written (or given up): arq has nothing to add

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
    lease: Lease = field(init=False)
    claims: dict[str, Claim] = field(default_factory=dict)
    next_token: int = 0  # the number the next claim's fencing token ends with
    # Held by each claim call and each renewal: a renewal's list includes every claim made.
    claiming: asyncio.Lock = field(default_factory=asyncio.Lock)
    _task: asyncio.Task[None] | None = None
    _failing: str | None = None  # the renewal error last logged, said once

    def __post_init__(self) -> None:
        self.lease = self._new_lease(valid_until=0.0)

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    def _new_lease(self, valid_until: float) -> Lease:
        lease_id = f"{self.worker_id}:{secrets.token_hex(4)}"
        return Lease(lease_id, self.keys.lease(lease_id), valid_until)

    # --- the lease ------------------------------------------------------------------------
    async def start(self) -> None:
        """Take the first lease (waiting for Redis), then renew it in the background."""
        while True:
            if await self._take_lease():
                break
            await asyncio.sleep(self.lease_s / RENEWALS_PER_LEASE)
        self._task = asyncio.get_running_loop().create_task(self._renew_for_ever())

    async def _take_lease(self) -> bool:
        sent = time.monotonic()
        try:
            await self.redis.set(self.lease.key, b",", px=self.lease_ms)  # no run listed yet
        except (RedisError, OSError) as error:
            self._renewal_failed(error)
            return False
        self.lease.valid_until = sent + self.lease_s
        return True

    async def _renew_for_ever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / RENEWALS_PER_LEASE)
            await self.renew()

    async def renew(self) -> None:
        """One renewal: the lease's list of runs rewritten, if the lease still lives."""
        async with self.claiming:
            lease, sent = self.lease, time.monotonic()
            held = [run_id for run_id, claim in self.claims.items() if claim.lease is lease]
            listed = f",{','.join(held)}," if held else ","
            try:
                alive = await self.redis.set(lease.key, listed, px=self.lease_ms, xx=True)
            except (RedisError, OSError) as error:
                self._renewal_failed(error)
                return
        if self._failing is not None:
            logger.info("worker lease renewed again", extra={"lease": self.lease.id})
            self._failing = None
        if alive:
            lease.valid_until = sent + self.lease_s
        else:
            await self.lapsed()

    async def lapsed(self) -> None:
        """The lease is gone in Redis: give up its runs, and hold new claims on a new one."""
        old = self.lease
        if old.lost:
            return
        old.lost = True
        given_up = sum(1 for claim in self.claims.values() if claim.lease is old)
        logger.warning(
            "worker lease lapsed: its runs are given up, another worker runs them",
            extra={"lease": old.id, "runs": given_up, "lease_s": self.lease_s},
        )
        self.lease = self._new_lease(valid_until=0.0)
        await self._take_lease()

    def _renewal_failed(self, error: BaseException) -> None:
        reason = unreachable_reason(error)
        if reason != self._failing:
            logger.warning(
                "worker lease not renewed: redis unavailable; runs stop at their next step "
                "once the lease lapses",
                extra={"reason": reason, "lease": self.lease.id, "lease_s": self.lease_s},
            )
            self._failing = reason

    def valid(self) -> bool:
        return self.lease.valid()

    # --- claims ---------------------------------------------------------------------------
    def hold(self, run_id: str, token: str) -> Claim:
        """A claim the claim script made, numbered from :attr:`next_token` on."""
        self.next_token += 1
        fence = Fence(QueueKeys.in_progress(run_id), self.lease.key, token)
        claim = self.claims[run_id] = Claim(run_id, fence, self.lease)
        return claim

    def claim_of(self, run_id: str) -> Claim | None:
        return self.claims.get(run_id)

    def forget(self, run_id: str) -> None:
        """The run's task ended: the next renewal's list leaves it out, so even a claim whose
        end could not be written is taken over."""
        self.claims.pop(run_id, None)

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
