"""Waiting for what another task or process makes true: one helper for async code, one for
sync code (tests that drive subprocesses, the bench), with the same rules.

Liveness, not speed: a check is retried until it holds or a generous limit passes, so a
broken system fails its test with a message instead of hanging the suite, and no test
asserts how fast a condition came true (README: speed lives in ``bench/``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_S = 60.0
INTERVAL_S = 0.02  # checks are loopback calls: cheap enough to repeat this often


def _gave_up(what: str, timeout_s: float, last_error: BaseException | None) -> AssertionError:
    why = f" (last check raised {last_error!r})" if last_error is not None else ""
    return AssertionError(f"gave up waiting for {what} after {timeout_s:g} s{why}")


def _name_of(check: object) -> str:
    return str(getattr(check, "__name__", "the condition"))


async def eventually(
    check: Callable[[], Awaitable[T]],
    what: str | None = None,
    *,
    timeout_s: float = TIMEOUT_S,
    interval_s: float = INTERVAL_S,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """Await ``check()`` until it returns something truthy, and return that.

    ``ignoring``: exceptions that mean "not yet" (a server still starting refuses
    connections); any other exception from ``check`` fails at once.
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = await check()
        except ignoring as error:
            last_error = error
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            raise _gave_up(what or _name_of(check), timeout_s, last_error)
        await asyncio.sleep(interval_s)


def eventually_sync(
    check: Callable[[], T],
    what: str | None = None,
    *,
    timeout_s: float = TIMEOUT_S,
    interval_s: float = INTERVAL_S,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """:func:`eventually` for code without an event loop: blocks between checks."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
        except ignoring as error:
            last_error = error
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            raise _gave_up(what or _name_of(check), timeout_s, last_error)
        time.sleep(interval_s)
