"""The workers' HrFlow client, wired from settings: credentials and the shared rate budget."""

from __future__ import annotations

import aiohttp
from redis.asyncio import Redis

from hrflow_client import HrflowClient
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from workers.rate_budget import SharedRateBudget


def client_if_configured(
    settings: Settings, session: aiohttp.ClientSession, redis: Redis
) -> HrflowClient | None:
    """The worker's client, or None when no API credentials are set (no handler needs one)."""
    if settings.api_key is None or not settings.api_user:
        return None
    budget = None
    if settings.api_rate_per_s is not None:
        budget = SharedRateBudget(
            redis, QueueKeys(settings.queue_name).api_budget, settings.api_rate_per_s
        )
    return HrflowClient(
        session, settings.api_url, settings.api_key.get_secret_value(), settings.api_user, budget
    )
