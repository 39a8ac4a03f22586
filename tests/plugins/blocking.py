"""A test plugin with the classic plugin bug: blocking the event loop (``time.sleep`` inside
``async def``) for longer than the job timeout, on the first try of events whose profile key
ends in ``-block``. Every run of it is recorded, so the fault suite can count its effects.

``HRFLOW_TEST_BLOCK_S`` (default 6) sets how long it blocks.
"""

from __future__ import annotations

import logging
import os
import time

from hrflow_webhooks.events import Event
from workers.context import HandlerContext
from workers.registry import Registry

EFFECTS_KEY = "test:blocking:effects"
TRIES_KEY = "test:blocking:tries"
BLOCK_S = float(os.environ.get("HRFLOW_TEST_BLOCK_S", "6"))
# Written in the same step as the block, so each line is one block that really happened (a
# run cut off by the stall before this step never blocks).
BLOCKING_NOW = "test plugin blocks the event loop now"
logger = logging.getLogger(__name__)


async def block_once(event: Event, ctx: HandlerContext) -> None:
    key = str(event["profile"]["key"])
    tries = int(await ctx.redis.hincrby(TRIES_KEY, key, 1))  # type: ignore[misc]
    if key.endswith("-block") and tries == 1:
        logger.warning(BLOCKING_NOW)
        time.sleep(BLOCK_S)
    await ctx.redis.sadd(EFFECTS_KEY, key)  # type: ignore[misc]


def register(registry: Registry) -> None:
    registry.add("profile.parsing.success", block_once, name="blocking")
