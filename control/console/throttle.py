"""Login attempts, per client address: a few wrong tokens, then a wait.

A token bucket per address: :data:`LOGIN_FAILURES_ALLOWED` wrong tokens at once, then one
more every :data:`LOGIN_REFILL_S`. While an address waits, its tries are answered 429
without being checked, so a guesser learns nothing from them, the right token included.
The buckets live in the console process (one per process: a restart forgets them, which
costs a guesser a restart of ours per five guesses) and the oldest are forgotten past
:data:`ADDRESSES_KEPT`, so a flood of addresses cannot grow the process.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

LOGIN_FAILURES_ALLOWED = 5
LOGIN_REFILL_S = 12.0  # five a minute, at most
ADDRESSES_KEPT = 10_000


@dataclass(slots=True)
class _Bucket:
    tries: float
    at: float
    failures: int = 0  # wrong tokens from the address since it was last let in
    waiting: bool = False  # told to wait since its last wrong token


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def wait_s(self, address: str) -> float:
        """0 when ``address`` may try a token now; else how long until it may."""
        bucket = self._refilled(address)
        return 0.0 if bucket.tries >= 1 else (1 - bucket.tries) * LOGIN_REFILL_S

    def starts_waiting(self, address: str) -> bool:
        """True the first time an address is told to wait after a wrong token: said once."""
        bucket = self._refilled(address)
        started, bucket.waiting = not bucket.waiting, True
        return started

    def failed(self, address: str) -> int:
        """A wrong token from ``address``; returns its count of wrong tokens."""
        bucket = self._refilled(address)
        bucket.tries -= 1
        bucket.failures += 1
        bucket.waiting = False
        return bucket.failures

    def failures(self, address: str) -> int:
        return self._refilled(address).failures

    def succeeded(self, address: str) -> None:
        self._buckets.pop(address, None)

    def _refilled(self, address: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = _Bucket(float(LOGIN_FAILURES_ALLOWED), now)
            if len(self._buckets) > ADDRESSES_KEPT:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
            refill = (now - bucket.at) / LOGIN_REFILL_S
            bucket.tries = min(float(LOGIN_FAILURES_ALLOWED), bucket.tries + refill)
            bucket.at = now
        return bucket
