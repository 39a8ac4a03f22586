"""What a handler gets: the event and the worker's shared clients, created once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.asyncio import Redis

from hrflow_client.api import HrflowClient
from hrflow_client.profiles import timestamp_of
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import (
    APPEND_LOG_SCRIPT,
    COUNT_UNROUTED_SCRIPT,
    FINISH_RUN_SCRIPT,
    GIVE_BACK_TRY_SCRIPT,
    MARK_HANDLER_SCRIPT,
    QueueKeys,
)
from hrflow_webhooks.settings import Settings
from workers.dead_letters import DeadLetters
from workers.heartbeats import worker_name
from workers.registry import Registry


@dataclass(slots=True)
class WorkerServices:
    """Built in the worker's ``on_startup``, closed in ``on_shutdown``."""

    settings: Settings
    registry: Registry
    redis: Redis
    http: aiohttp.ClientSession
    keys: QueueKeys
    hrflow: HrflowClient | None = None  # None without HRFLOW_API_KEY/HRFLOW_API_USER
    extras: dict[str, Any] = field(default_factory=dict)  # plugins' own shared clients
    mark_handler_script: Any = field(init=False)  # redis-py's AsyncScript
    finish_run_script: Any = field(init=False)
    give_back_try_script: Any = field(init=False)
    count_unrouted_script: Any = field(init=False)
    append_log_script: Any = field(init=False)
    dead_letters: DeadLetters = field(init=False)
    worker_id: str = field(default_factory=worker_name)  # in the event log and the console

    def __post_init__(self) -> None:
        self.mark_handler_script = self.redis.register_script(MARK_HANDLER_SCRIPT)
        self.finish_run_script = self.redis.register_script(FINISH_RUN_SCRIPT)
        self.give_back_try_script = self.redis.register_script(GIVE_BACK_TRY_SCRIPT)
        self.count_unrouted_script = self.redis.register_script(COUNT_UNROUTED_SCRIPT)
        self.append_log_script = self.redis.register_script(APPEND_LOG_SCRIPT)
        self.dead_letters = DeadLetters(self.redis, self.keys, self.settings.event_log_max_entries)


class EventLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds the event id, type, handler and try to every line a handler logs."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


@dataclass(slots=True)
class StateSeen:
    """The newest state (HrFlow's ``updated_at``, epoch s) this run's handlers read of the
    event's subject: what the reconciler later counts as handled."""

    updated_at: float | None = None

    def saw(self, updated_at: str | float | None) -> None:
        seen = (
            float(updated_at) if isinstance(updated_at, int | float) else timestamp_of(updated_at)
        )
        if seen is not None and (self.updated_at is None or seen > self.updated_at):
            self.updated_at = seen


@dataclass(slots=True)
class HandlerNotes:
    """What one handler's run says of itself beyond succeeding or raising."""

    skip_reason: str | None = None


@dataclass(frozen=True, slots=True)
class HandlerContext:
    event: Event
    handler: str
    job_try: int
    logger: EventLogger
    services: WorkerServices
    state_seen: StateSeen = field(default_factory=StateSeen)
    notes: HandlerNotes = field(default_factory=HandlerNotes)

    def skipped(self, reason: str) -> None:
        """This handler chose to do nothing, for ``reason`` (no secret, no personal data):
        the event log shows it as a skip rather than ok."""
        self.notes.skip_reason = reason

    def saw_state(self, updated_at: str | float | None) -> None:
        """Tell the run which state of the event's subject this handler read (HrFlow's
        ``updated_at``, as GET sends it): reconciliation then knows it was handled."""
        self.state_seen.saw(updated_at)

    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def redis(self) -> Redis:
        return self.services.redis

    @property
    def http(self) -> aiohttp.ClientSession:
        return self.services.http
