"""A test plugin whose behaviour each event chooses, through ``payload["test"]``:

- ``sleep_s`` (and ``sleep_tries``, default 1): sleep that long on the first tries;
- ``fail_transient``: raise a TransientError on the first N tries (``retry_after_s`` optional);
- ``fail_permanent``: raise a PermanentError until the Redis key ``test:fixed`` exists.

Each run counts its tries in ``test:tries`` and, on success, appends the event id to
``test:effects``: the effect whose count the reliability suites check.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hrflow_webhooks.errors import PermanentError, TransientError
from hrflow_webhooks.events import Event
from workers.context import HandlerContext
from workers.registry import Registry

EFFECTS_KEY = "test:effects"
TRIES_KEY = "test:tries"


async def behave(event: Event, ctx: HandlerContext) -> None:
    spec: dict[str, Any] = dict(event.payload.get("test") or {})
    tries = int(await ctx.redis.hincrby(TRIES_KEY, event.id, 1))  # type: ignore[misc]
    if spec.get("sleep_s") and tries <= int(spec.get("sleep_tries", 1)):
        await asyncio.sleep(float(spec["sleep_s"]))
    if tries <= int(spec.get("fail_transient", 0)):
        raise TransientError("injected transient failure", retry_after_s=spec.get("retry_after_s"))
    if spec.get("fail_permanent") and not await ctx.redis.exists("test:fixed"):
        raise PermanentError("injected permanent failure")
    await ctx.redis.rpush(EFFECTS_KEY, event.id)  # type: ignore[misc]


def register(registry: Registry) -> None:
    registry.add("profile.parsing.success", behave, name="behaviour")
