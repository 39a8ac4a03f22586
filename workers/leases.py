"""Runs held on leases: a dead, frozen or cut-off worker's runs run elsewhere within seconds.

arq holds a claimed job with an in-progress key that expires ``job_timeout`` + 10 s
later: a killed worker's runs waited that long, and a run whose handler outlived it (a
sync handler still in its thread) could start again on another worker while it still
ran. Here:

- each worker process holds one **lease**, ``<queue>:lease:<lease id>``, a key that
  lives ``HRFLOW_WORKER_LEASE_S`` (5 s) and that the worker renews with one ``PEXPIRE``
  every quarter of that, for all its runs at once;
- a **claim** writes ``<lease id>|<n>`` (its fencing token) into the run's in-progress
  key, with no expiry of its own: the run is held while the lease lives, however long
  its handlers take, and the claim script takes over a run whose lease is gone
  (``hrflow_webhooks.queue.CLAIM_SCRIPT``);
- every write of a run's outcome goes through a script that first checks the token and
  the lease (:class:`hrflow_webhooks.queue.Fence`): a worker that lost its lease cannot
  write over the run's new holder, so an outcome is written once;
- the worker itself stops a run at its next step once its lease may have lapsed (no
  renewal was sent within the lease): it starts no further handler of it;
- a renewal that finds the lease gone (``PEXPIRE`` answers 0: the worker was frozen,
  or cut off from Redis, for longer than the lease) gives up every run held under it,
  and a new lease, with a new id, holds the claims made from then on.

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

from hrflow_webhooks.queue import RELEASE_RUNS_SCRIPT, Fence, QueueKeys
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
    unreleased: dict[str, Fence] = field(default_factory=dict)  # ended runs still claimed
    next_token: int = 0  # the number the next claim's fencing token ends with
    _task: asyncio.Task[None] | None = None
    _failing: str | None = None  # the renewal error last logged, said once
    _release_script: object = None

    def __post_init__(self) -> None:
        self.lease = self._new_lease(valid_until=0.0)
        self._release_script = self.redis.register_script(RELEASE_RUNS_SCRIPT)

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
            await self.redis.set(self.lease.key, b"1", px=self.lease_ms)
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
        """One renewal: a ``PEXPIRE`` (with the releases owed, when any, in one script)."""
        sent = time.monotonic()
        try:
            alive = await self.redis.pexpire(self.lease.key, self.lease_ms)
            await self._release_owed()
        except (RedisError, OSError) as error:
            self._renewal_failed(error)
            return
        if self._failing is not None:
            logger.info("worker lease renewed again", extra={"lease": self.lease.id})
            self._failing = None
        if alive:
            self.lease.valid_until = sent + self.lease_s
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
        """The run's task ended; a claim whose end was never written is released later."""
        claim = self.claims.pop(run_id, None)
        if claim is not None and not claim.settled:
            self.unreleased[run_id] = claim.fence

    async def _release_owed(self) -> None:
        if not self.unreleased:
            return
        owed = dict(self.unreleased)
        await self._release_script(  # type: ignore[operator]
            keys=[fence.in_progress for fence in owed.values()],
            args=[fence.token for fence in owed.values()],
        )
        for run_id in owed:
            self.unreleased.pop(run_id, None)

    # --- stopping -------------------------------------------------------------------------
    async def stop(self) -> None:
        """Release what is owed and drop the lease, so that any run still claimed under it
        is taken over at once rather than a lease later; then close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self._release_owed()
            await self.redis.delete(self.lease.key)
        await self.redis.aclose()
