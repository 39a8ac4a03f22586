"""The deployment's health as an operator sees it: ``hrflow-webhooks check`` prints these
problems and exits non-zero when there is any.

Healthy means: Redis answers, at least one worker has reported recently, no
queued event has been due for longer than ``max_queue_age_s``, no run has waited
longer than ``HRFLOW_MAX_RUN_WAIT_S`` since it first became due (a retried or parked
run included: the queue re-scores those), and Redis can keep
what is acknowledged (``hrflow_webhooks.durability``: persistence as required,
memory under the high-water mark, no loss of data detected in the last hour). "Recently"
is arq's own rule: every worker rewrites ``<queue name>:health-check`` each
``HRFLOW_HEALTH_CHECK_INTERVAL_S`` with a time-to-live one second longer, so
the key exists exactly while some worker is alive and polling.

Messages name keys and numbers only: never the Redis URL, which may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hrflow_webhooks.durability import inspect_once
from hrflow_webhooks.queue import QueueKeys, long_wait_problems
from hrflow_webhooks.redis_setup import connect_redis, unreachable_reason
from hrflow_webhooks.settings import Settings
from workers.queue_stats import QueueStats, read_queue_stats


@dataclass(frozen=True, slots=True)
class Health:
    problems: list[str]  # each fails the check
    notes: list[str] = field(default_factory=list)  # said, not failing: see durability


async def check(settings: Settings, max_queue_age_s: float) -> list[str]:
    """Every problem found, as one sentence each; an empty list means healthy."""
    return (await health(settings, max_queue_age_s)).problems


async def health(settings: Settings, max_queue_age_s: float) -> Health:
    redis = connect_redis(settings)
    try:
        return await _health(redis, QueueKeys(settings.queue_name), settings, max_queue_age_s)
    except (RedisError, OSError) as error:
        return Health([f"redis is unreachable: {unreachable_reason(error)}"])
    finally:
        await redis.aclose()


async def _health(
    redis: Redis, keys: QueueKeys, settings: Settings, max_queue_age_s: float
) -> Health:
    worker_reported = bool(await redis.exists(keys.health_check))
    stats = await read_queue_stats(redis, keys)
    durability = await inspect_once(redis, settings)
    problems = [] if worker_reported else [_no_worker(keys, settings)]
    problems += _queue_problems(stats, max_queue_age_s)
    problems += long_wait_problems(stats.oldest_wait_s, settings.max_run_wait_s)
    problems += durability.problems()
    return Health(problems, list(durability.notes))


def _no_worker(keys: QueueKeys, settings: Settings) -> str:
    return (
        f"no worker has reported in the last {settings.health_check_interval_s + 1} s "
        f"(arq's key {keys.health_check} is missing)"
    )


def _queue_problems(stats: QueueStats, max_queue_age_s: float) -> list[str]:
    if stats.oldest_ready_age_s <= max_queue_age_s:
        return []
    return [
        f"the oldest queued event has waited {stats.oldest_ready_age_s:.0f} s, "
        f"over the {max_queue_age_s:g} s limit ({stats.ready} events due)"
    ]
