"""How the worker classifies what a handler raised: retry it, or give up now."""

from __future__ import annotations

import asyncio

import redis.exceptions

from hrflow_webhooks.errors import PermanentError, TransientError

_TRANSIENT_INFRASTRUCTURE: tuple[type[BaseException], ...] = (
    TimeoutError,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)


def is_transient(error: BaseException) -> bool:
    """Whether a retry may succeed. Unknown exceptions count as transient, up to the try limit."""
    if isinstance(error, PermanentError):
        return False
    if isinstance(error, (TransientError, *_TRANSIENT_INFRASTRUCTURE)):
        return True
    return not isinstance(error, ValueError | TypeError | KeyError | LookupError)
