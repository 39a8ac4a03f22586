"""Watching, every few seconds, that Redis can still keep what the receiver acknowledged.

A 202 is a promise that the event survives; Redis keeps it only while its
configuration and its memory allow. Checked once at start-up, that promise
broke silently: AOF switched off at run time, a Redis restarted without
persistence (the whole queue gone, every health signal still "ok"), or memory
at ``maxmemory`` (writes refused, workers unable to claim). So the receiver and
every worker run a :class:`DurabilityWatch`, every
``HRFLOW_DURABILITY_CHECK_INTERVAL_S``:

- **what the deployment relies on** (``HRFLOW_REDIS_DURABILITY``): ``fsync``,
  AOF on with ``appendfsync`` at least ``HRFLOW_REDIS_FSYNC`` and its writes
  succeeding (``INFO persistence``, and ``CONFIG GET appendfsync``: where the
  server refuses ``CONFIG``, as managed Redis does, the policy cannot be read and
  that is said); ``replicas``, at least ``HRFLOW_REDIS_MIN_REPLICAS_ACK`` replicas
  online and caught up (``INFO replication``), the AOF not required; ``managed``,
  the provider's own guarantee (MemoryDB's multi-AZ log), which nothing here can
  check, said once; ``none``, nothing, said once. ``noeviction`` in all but ``none``
  (``INFO memory``); with ``HRFLOW_REDIS_MIN_REPLICAS_ACK``, the replicas too, and
  whether this Redis accepts ``WAIT`` at all.
  What a look cannot check and nothing relies on is a note, said once;
- **memory**: used ÷ ``maxmemory`` against ``HRFLOW_REDIS_MEMORY_HIGH_WATER``.
  Above it the watch first drops the event log's oldest entries (the log records
  events; it must never be why one is refused), down to 90 % of the mark; what
  is still over it is events, and the receiver answers 503 before Redis refuses
  writes, which leaves the workers room to claim and finish what is queued;
- **a Redis that lost its data**: the service keeps a start marker in Redis
  (a random token, no expiry). A marker missing or replaced while a process
  had seen it means Redis came back without its data: the watch logs an ERROR
  with how many events were queued at its last look, and records a notice in
  Redis (``DATA_LOSS_NOTICE_S``) so that ``check`` and ``/readyz?strict``
  report it to whoever looks next.

Every risk is an ERROR log line when it appears (and an INFO line when it
clears), the ``hrflow_redis_durability_ok`` gauge, ``GET /readyz?strict``
and ``hrflow-webhooks check``; a note is a WARNING line when it appears, and a
``note:`` line of ``check``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError

from hrflow_webhooks.event_log import EventLog
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.redis_setup import unreachable_reason
from hrflow_webhooks.settings import Settings

logger = logging.getLogger(__name__)

# How long a detected loss keeps `check` and /readyz?strict failing: long enough for any
# alert on them to fire, short enough that the service is not marked broken forever.
DATA_LOSS_NOTICE_S = 3_600
# Shedding the event log aims this far under the mark, so one look does not leave Redis
# just under it, to cross again with the next deliveries.
SHED_TO_MARK = 0.9
FSYNC_STRENGTH = {"no": 0, "everysec": 1, "always": 2}
# A replica counts as holding what it was sent when it acknowledged within this (Redis's
# replicas acknowledge every second).
REPLICA_LAG_MAX_S = 10
# In the INFO mapping the watch assesses: WAIT was refused (a provider's command list).
WAIT_REFUSED = "hrflow_wait_refused"
MANAGED_DECLARED = (
    "durability 'managed' is declared (HRFLOW_REDIS_DURABILITY): the provider's own "
    "guarantee is relied on, and nothing here can check it"
)
NONE_DECLARED = (
    "durability 'none' is declared (HRFLOW_REDIS_DURABILITY): acknowledged events are lost "
    "if Redis restarts without persistence or its primary fails"
)


@dataclass(frozen=True, slots=True)
class RedisState:
    """What one look at Redis found."""

    risks: tuple[str, ...]  # sentences: why acknowledged events could be lost
    notes: tuple[str, ...]  # what could not be checked, or was chosen, and nothing relies on
    memory_used: int
    memory_max: int  # 0: no maxmemory
    high_water: float
    queued: int
    loss_notice: str | None  # a loss detected in the last DATA_LOSS_NOTICE_S, said once

    @property
    def memory_ratio(self) -> float:
        return self.memory_used / self.memory_max if self.memory_max else 0.0

    @property
    def over_high_water(self) -> bool:
        return self.memory_max > 0 and self.memory_ratio >= self.high_water

    def problems(self) -> list[str]:
        """Everything ``check`` and ``/readyz?strict`` fail on."""
        found = list(self.risks)
        if self.over_high_water:
            found.append(self.memory_problem())
        if self.loss_notice:
            found.append(self.loss_notice)
        return found

    def memory_problem(self) -> str:
        return (
            f"redis memory is at {self.memory_ratio:.0%} of maxmemory, over the "
            f"{self.high_water:.0%} high-water mark (HRFLOW_REDIS_MEMORY_HIGH_WATER): "
            "deliveries get 503 until workers drain the queue or maxmemory is raised"
        )


async def _persistence_config(redis: Redis) -> dict[str, str] | None:
    """The AOF's fsync policy and the RDB snapshots' ``save`` rule, or None where the server
    refuses CONFIG (managed Redis)."""
    try:  # one name a call: CONFIG GET takes several only from Redis 7
        found: dict[str, str] = await redis.config_get("appendfsync")
        found |= await redis.config_get("save")
    except ResponseError:
        return None
    return found


async def _accepts_wait(redis: Redis) -> bool:
    """Whether WAIT runs here: ``WAIT 0 0`` returns at once where it does."""
    try:
        await redis.execute_command("WAIT", 0, 0)  # type: ignore[no-untyped-call]
    except ResponseError:
        return False
    return True


def assess(
    info: Mapping[str, Any], config: Mapping[str, str] | None, settings: Settings
) -> tuple[list[str], list[str]]:
    """Why this Redis could lose an acknowledged event (risks), and what could not be
    checked or was chosen though nothing relies on it (notes), for the declared durability.
    ``info``: INFO persistence, memory and (with replicas) replication; ``config``:
    ``appendfsync`` and ``save``, None where CONFIG is refused."""
    durability = settings.durability
    if durability == "none":
        return [], [NONE_DECLARED]
    risks, notes = _eviction_risks(info), []
    if durability == "fsync":
        risks += _aof_risks(info, None if config is None else config.get("appendfsync"),
                            settings.redis_fsync)  # fmt: skip
    elif durability == "managed":
        notes.append(MANAGED_DECLARED)
    elif config is None:
        notes.append(
            "the primary's persistence cannot be read: this Redis refuses CONFIG (as managed "
            "Redis does); not relied on: durability is 'replicas'"
        )
    else:
        risks += _forgetful_primary_risks(info, config)
    if durability == "replicas" or settings.redis_min_replicas_ack:
        risks += _replica_risks(info, settings.redis_min_replicas_ack)
    if info.get(WAIT_REFUSED):
        risks.append(
            "this Redis refuses WAIT, so HRFLOW_REDIS_MIN_REPLICAS_ACK cannot be honoured: "
            "every delivery gets 503; set it to 0 and declare the durability the provider gives"
        )
    return risks, notes


def _eviction_risks(info: Mapping[str, Any]) -> list[str]:
    policy = info.get("maxmemory_policy")
    if policy is None or policy == "noeviction":
        return []
    return [f"maxmemory-policy is '{policy}', not 'noeviction': Redis may evict jobs"]


def _aof_risks(info: Mapping[str, Any], appendfsync: str | None, fsync: str) -> list[str]:
    if not info.get("aof_enabled"):
        return ["AOF is off (appendonly no): a Redis restart loses every queued event"]
    risks = []
    if appendfsync is None:
        risks.append(
            "appendfsync cannot be read: this Redis refuses CONFIG (as managed Redis does), "
            "so durability 'fsync' cannot be verified: declare what it gives "
            "(HRFLOW_REDIS_DURABILITY=replicas with HRFLOW_REDIS_MIN_REPLICAS_ACK, or none)"
        )
    elif FSYNC_STRENGTH.get(appendfsync, 0) < FSYNC_STRENGTH[fsync]:
        risks.append(
            f"appendfsync is '{appendfsync}', weaker than '{fsync}' (HRFLOW_REDIS_FSYNC): "
            "a crash loses recent acknowledged events"
        )
    if info.get("aof_last_write_status") == "err":
        risks.append("AOF writes are failing (aof_last_write_status: err): check the disk")
    return risks


def _forgetful_primary_risks(info: Mapping[str, Any], config: Mapping[str, str]) -> list[str]:
    """Replicas copy what their primary holds: one that restarts with nothing on disk before
    a failover comes back empty, and its replicas then empty themselves too."""
    if info.get("aof_enabled") or config.get("save"):
        return []
    return [
        "the primary keeps nothing on disk (appendonly no, no save rule): restarted before a "
        "failover, it comes back empty and its replicas copy the emptiness; turn AOF on "
        "(everysec is enough beside replicas) or keep it from restarting on its own"
    ]


def _replica_risks(info: Mapping[str, Any], required: int) -> list[str]:
    if info.get("role") not in (None, "master"):
        return ["this Redis is a replica, not the primary: deliveries are refused (503)"]
    caught_up = sum(
        1
        for name, replica in info.items()
        if name.startswith("slave") and name[5:].isdigit() and isinstance(replica, dict)
        and replica.get("state") == "online" and int(replica.get("lag", 0)) <= REPLICA_LAG_MAX_S
    )  # fmt: skip
    if caught_up >= required:
        return []
    return [
        f"{caught_up} replica(s) online and caught up, of the {required} that must acknowledge "
        "each delivery (HRFLOW_REDIS_MIN_REPLICAS_ACK): deliveries get 503 until they are back"
    ]


class DurabilityWatch:
    """One process's view of Redis durability, refreshed every ``interval_s``."""

    def __init__(self, redis: Redis, settings: Settings, role: str) -> None:
        self.redis = redis
        self.keys = QueueKeys(settings.queue_name)
        self._event_log = EventLog(redis, self.keys)
        self.settings = settings
        self.role = role
        self.state: RedisState | None = None
        self.reachable = True
        # Read on the receiver's hot path: a plain attribute, set by each look.
        self.refusing_writes = False
        self._marker: bytes | None = None  # the start marker this process has seen
        self._logged_risks: frozenset[str] = frozenset()
        self._logged_notes: frozenset[str] = frozenset()
        self._shed_refusal: str | None = None  # the error last refusing a shed, logged once
        self._said_not_shed = False  # over the mark, not because of the log: said once
        self._acknowledged_since_look = 0  # events this process queued since the last look
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        STATE.watches.add(self)

    # --- what the receiver asks on its hot path -------------------------------------------
    def acknowledged(self, events: int) -> None:
        self._acknowledged_since_look += events

    # --- the loop -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        STATE.watches.discard(self)
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # The flag as well as the cancellation: redis-py can turn a cancellation that lands
        # in a read into a connection error, which look() reports and survives.
        while not self._stopping:
            await self.look()
            if not self._stopping:
                await asyncio.sleep(self.settings.durability_check_interval_s)

    async def look(self) -> RedisState | None:
        """One look; logs what changed. None when Redis could not be read."""
        try:
            state = await self._inspect()
            if state.over_high_water:
                await self._shed_event_log(state)
                # Read again even when this watch dropped nothing: another process's may have.
                state = await self._inspect(write=False)
            else:
                self._said_not_shed = False
        except (RedisError, OSError) as error:
            if self._stopping:
                return None  # a cancellation redis-py reported as a connection error
            if self.reachable:
                logger.error(
                    "redis unreachable: durability cannot be checked",
                    extra={
                        "error_type": type(error).__name__,
                        "reason": unreachable_reason(error),
                        "endpoint": self.role,
                    },
                )
            self.reachable = False
            return None
        if not self.reachable:
            logger.info("redis reachable again", extra={"endpoint": self.role})
        self.reachable = True
        self._log_changes(state)
        self.state = state
        self.refusing_writes = state.over_high_water
        return state

    async def _inspect(self, write: bool = True) -> RedisState:
        """Reads first: at maxmemory or on a read-only replica the writes below are refused,
        and what the reads found is what must be reported then."""
        info = await self.redis.info("persistence") | await self.redis.info("memory")
        if self.settings.durability == "replicas" or self.settings.redis_min_replicas_ack:
            info |= await self.redis.info("replication")
        if self.settings.redis_min_replicas_ack:
            info[WAIT_REFUSED] = not await _accepts_wait(self.redis)
        config = await _persistence_config(self.redis)
        queued = int(await self.redis.zcard(self.keys.queue))
        if write:
            lost_before = await self._check_marker()
            self._acknowledged_since_look = 0
            if lost_before is not None:
                await self._record_loss(lost_before)
        notice = await self.redis.get(self.keys.data_loss)
        risks, notes = assess(info, config, self.settings)
        return RedisState(
            risks=tuple(risks),
            notes=tuple(notes),
            memory_used=int(info.get("used_memory", 0)),
            memory_max=int(info.get("maxmemory", 0)),
            high_water=self.settings.redis_memory_high_water,
            queued=queued,
            loss_notice=notice.decode() if notice else None,
        )

    def _say_not_shed(self, state: RedisState, log_bytes: float) -> None:
        if self._said_not_shed:
            return
        self._said_not_shed = True
        logger.warning(
            "event log not shed",
            extra={
                "reason": "redis is over its memory mark, but not because of the event log",
                "memory_used": state.memory_used,
                "event_log_bytes": int(log_bytes),
                "endpoint": self.role,
            },
        )

    async def _shed_event_log(self, state: RedisState) -> None:
        """Free memory the event log holds, to below the mark with room to spare. Watches
        that shed at the same look trim to about the same length: the oldest entries go.
        Only where the log is what holds Redis over the mark: when the whole log could not
        bring Redis under it (a backlog, another application's keys), emptying it would
        refuse no fewer events and lose the record an operator reads during the incident."""
        mark = state.memory_max * state.high_water
        try:
            footprint = await self._event_log.footprint()
            if footprint[1] < state.memory_used - mark:
                self._say_not_shed(state, footprint[1])
                return
            to_free = int(state.memory_used - mark * SHED_TO_MARK)
            dropped, kept = await self._event_log.shed(to_free, footprint)
        except ResponseError as error:  # refused (a read-only replica, an ACL): said once
            if self._shed_refusal != type(error).__name__:
                self._shed_refusal = type(error).__name__
                logger.error(
                    "event log shed refused",
                    extra={"error_type": self._shed_refusal, "endpoint": self.role},
                )
            return
        self._shed_refusal = None
        if dropped:
            STATE.log_entries_shed += dropped
            logger.warning(
                "event log shed",
                extra={
                    "entries_dropped": dropped,
                    "entries_kept": kept,
                    "memory_used": state.memory_used,
                    "endpoint": self.role,
                },
            )

    async def _check_marker(self) -> int | None:
        """Events that may be gone when Redis lost its data since the last look, else None."""
        before: bytes | None = await self.redis.get(self.keys.start_marker)
        if before is None:
            fresh = secrets.token_hex(8).encode()
            try:
                if not await self.redis.set(self.keys.start_marker, fresh, nx=True):
                    before = await self.redis.get(self.keys.start_marker)  # another process's
            except (OutOfMemoryError, ReadOnlyError):
                fresh = b""  # not written: a later look writes it
        else:
            fresh = before
        seen, self._marker = self._marker, (before or fresh or None)
        if seen is None:
            if before is None:
                logger.info(
                    "start marker written: a new Redis, or one that lost its data while no "
                    "process of this service was running",
                    extra={"endpoint": self.role},
                )
            return None
        if before == seen:
            return None
        queued_at_last_look = self.state.queued if self.state else 0
        return queued_at_last_look + self._acknowledged_since_look

    async def _record_loss(self, events_at_risk: int) -> None:
        STATE.losses += 1
        notice = (
            f"redis lost its data (restarted without persistence, or flushed) at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: up to {events_at_risk} "
            "acknowledged events may be gone; reconcile from HrFlow"
        )
        logger.error(
            "redis lost its data: queued events may be gone",
            extra={"risk": "data_lost", "events_at_risk": events_at_risk, "endpoint": self.role},
        )
        with contextlib.suppress(OutOfMemoryError, ReadOnlyError):  # the log line has it
            await self.redis.set(self.keys.data_loss, notice, ex=DATA_LOSS_NOTICE_S)

    def _log_changes(self, state: RedisState) -> None:
        now = frozenset(state.risks + ((state.memory_problem(),) if state.over_high_water else ()))
        for risk in sorted(now - self._logged_risks):
            logger.error(
                "redis durability at risk",
                extra={"risk": risk, "events_at_risk": state.queued, "endpoint": self.role},
            )
        for risk in sorted(self._logged_risks - now):
            logger.info(
                "redis durability risk cleared", extra={"risk": risk, "endpoint": self.role}
            )
        self._logged_risks = now
        for note in sorted(frozenset(state.notes) - self._logged_notes):
            logger.warning("redis durability note", extra={"note": note, "endpoint": self.role})
        self._logged_notes = frozenset(state.notes)


async def inspect_once(redis: Redis, settings: Settings) -> RedisState:
    """A read-only look (``check``): configuration, memory and a recorded loss. It writes
    nothing: the marker is the running processes' to keep."""
    watch = DurabilityWatch(redis, settings, "check")
    try:
        state = await watch._inspect(write=False)
    finally:
        await watch.stop()
    return state


@dataclass
class _ProcessState:
    watches: set[DurabilityWatch] = field(default_factory=set)
    losses: int = 0
    log_entries_shed: int = 0


STATE = _ProcessState()


class DurabilityCollector(Collector):
    """The process's watches as metrics (the receiver's /metrics, the worker's server)."""

    def collect(self) -> Iterator[Metric]:
        states = [w.state for w in STATE.watches if w.state is not None]
        ok = GaugeMetricFamily(
            "hrflow_redis_durability_ok",
            "1 when Redis can keep what was acknowledged (persistence as required, memory under "
            "the high-water mark, no recent data loss), else 0.",
        )
        ok.add_metric([], int(bool(states) and not any(s.problems() for s in states)))
        yield ok
        ratio = GaugeMetricFamily(
            "hrflow_redis_memory_used_ratio", "Redis used_memory ÷ maxmemory (0: no maxmemory)."
        )
        ratio.add_metric([], max((s.memory_ratio for s in states), default=0.0))
        yield ratio
        lost = CounterMetricFamily(
            "hrflow_redis_data_loss_detected",
            "Times this process found that Redis had lost its data (start marker gone).",
        )
        lost.add_metric([], STATE.losses)
        yield lost
        shed = CounterMetricFamily(
            "hrflow_event_log_shed_entries",
            "Event-log entries this process dropped to bring Redis under its high-water mark.",
        )
        shed.add_metric([], STATE.log_entries_shed)
        yield shed


REGISTRY.register(DurabilityCollector())
