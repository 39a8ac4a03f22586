"""arq worker settings: ``arq workers.settings.WorkerSettings`` runs a worker.

That command builds arq's own ``Worker``; ``create_worker`` (``hrflow-webhooks
worker``, the Procfile's) builds ``workers.arq_worker.Worker``, which claims due
jobs in one round trip with the same checks and keys, so both can share a queue.

arq's defaults are tuned away from, on purpose:

- ``poll_delay`` 0.5 s → 10 ms, and ``max_jobs`` 10 → 100: the defaults cap a
  worker near 20 jobs/s with up to half a second of pick-up delay;
- ``job_timeout`` 300 s → 20 s: the time budget of one try. Our job stops its
  handlers 2 s before, because arq treats its own timeout as final. It no
  longer bounds crash recovery: runs are held on the worker's lease
  (``workers.leases``), so a killed worker's runs run elsewhere within
  ``HRFLOW_WORKER_LEASE_S``;
- arq's ``max_tries`` is effectively off (:data:`ARQ_MAX_TRIES`): arq deletes a
  job past it before our code runs, with no dead letter. Ours is enforced by the
  job, whose try past ``HRFLOW_MAX_TRIES`` only dead-letters what is pending, and
  is retried itself if it is interrupted (a Redis stall, a SIGTERM);
- ``queue_read_limit`` stays arq's 5 x ``max_jobs``: another worker's running jobs
  stay at the head of the queue until they finish, and a poll that read only
  ``max_jobs`` ids saw nothing else, so a second worker added nothing;
- ``health_check_interval`` 3600 s → 10 s, so the health key means something;
- ``job_completion_wait``: on SIGTERM stop taking jobs, let running ones finish
  within the grace period, and cancel (re-queue) the rest;
- jobs are JSON, not pickle; no result keys are kept (dead letters hold failures);
- the Redis pool is ours (``hrflow_webhooks.redis_setup``), handed to arq: it
  keeps ``REDIS_URL``'s TLS parameters (arq's ``RedisSettings.from_dsn`` drops the
  query string), finds the primary through Sentinel when configured, and retries
  forever, so a Redis restart or a failover pauses the worker instead of killing it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import orjson
from arq import func
from arq.connections import ArqRedis

from hrflow_webhooks.logs import configure_logging
from hrflow_webhooks.queue import JOB_FUNCTION, QueueKeys
from hrflow_webhooks.redis_setup import connect_redis, connection_pool
from hrflow_webhooks.settings import Settings
from workers.arq_worker import Worker
from workers.client import client_if_configured
from workers.context import WorkerServices
from workers.heartbeats import worker_name
from workers.jobs import handle_event
from workers.leases import Leases
from workers.metrics_server import start_worker_metrics, stop_worker_metrics
from workers.plugins import build_registry
from workers.reconcile import upkeep
from workers.registry import Registry

# A run held this long past the job timeout is said to be stuck (workers.leases): arq's own
# expiry used to end the hold then, and start the run again while it still ran.
OVERDUE_AFTER_DEADLINE_S = 10.0
# arq's own try limit, out of reach: the job enforces HRFLOW_MAX_TRIES (see above).
ARQ_MAX_TRIES = 2**31 - 1


def job_pool(settings: Settings) -> ArqRedis:
    """arq's client on the service's own pool (see the module docstring); arq closes it."""
    return ArqRedis(
        connection_pool(settings, retry_forever=True),
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
        default_queue_name=settings.queue_name,
    )


def _make_startup(settings: Settings, registry: Registry | None) -> Any:
    async def on_startup(ctx: dict[str, Any]) -> None:
        timeout = aiohttp.ClientTimeout(total=settings.api_timeout_s)
        ctx["services"] = WorkerServices(
            settings=settings,
            registry=registry if registry is not None else build_registry(settings),
            redis=ctx["redis"],
            http=(http := aiohttp.ClientSession(timeout=timeout, json_serialize=_json_dumps)),
            keys=QueueKeys(settings.queue_name),
            hrflow=client_if_configured(settings, http, ctx["redis"]),
        )
        ctx["metrics_server"] = start_worker_metrics(settings)
        services = ctx["services"]
        ctx["upkeep"] = asyncio.create_task(
            upkeep(services.redis, services.hrflow, settings, services.registry)
        )

    return on_startup


async def on_shutdown(ctx: dict[str, Any]) -> None:
    stop_worker_metrics(ctx.get("metrics_server"))
    keeper: asyncio.Task[None] | None = ctx.get("upkeep")
    if keeper is not None:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    services: WorkerServices | None = ctx.get("services")
    if services is not None:
        await services.http.close()


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def worker_options(settings: Settings, registry: Registry | None = None) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker``; ``registry`` overrides plugin loading (tests)."""
    return {
        "functions": [
            func(
                handle_event,  # type: ignore[arg-type]
                name=JOB_FUNCTION,
                timeout=settings.job_timeout_s,
                max_tries=ARQ_MAX_TRIES,
            )
        ],
        "queue_name": settings.queue_name,
        "redis_pool": job_pool(settings),
        "max_jobs": settings.worker_max_jobs,
        "poll_delay": settings.worker_poll_delay_s,
        # arq's own default: a poll sees past the other workers' running jobs at the head.
        "queue_read_limit": settings.worker_max_jobs * 5,
        "job_timeout": settings.job_timeout_s,
        "keep_result": 0,
        "max_tries": ARQ_MAX_TRIES,
        "health_check_interval": settings.health_check_interval_s,
        "job_completion_wait": settings.shutdown_grace_s,
        "retry_jobs": True,
        "job_serializer": orjson.dumps,
        "job_deserializer": orjson.loads,
        "on_startup": _make_startup(settings, registry),
        "on_shutdown": on_shutdown,
    }


def create_worker(settings: Settings, registry: Registry | None = None, **overrides: Any) -> Worker:
    """``hrflow-webhooks worker``'s worker: arq's options, and runs held on a lease."""
    leases = Leases(
        connect_redis(settings), QueueKeys(settings.queue_name), settings.worker_lease_s,
        worker_name(), overdue_after_s=settings.job_timeout_s + OVERDUE_AFTER_DEADLINE_S,
    )  # fmt: skip
    return Worker(**{**worker_options(settings, registry), "leases": leases, **overrides})


def __getattr__(name: str) -> Any:
    """``WorkerSettings`` is built on first use, so importing this module reads no environment."""
    if name != "WorkerSettings":
        raise AttributeError(name)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return type("WorkerSettings", (), worker_options(settings))
