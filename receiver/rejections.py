"""Rejected requests, counted exactly and logged at a bounded rate.

Anyone can send the receiver bad requests, thousands a second: a log line for
each would fill the disk and drown the lines that matter. The first rejection
after a quiet period is logged at once, with its reason, so a misconfigured
secret shows up on the first delivery; the rest of the period is summed up in
one line per ``interval_s`` (outcome and reason → count). Metrics count every
one (``hrflow_webhook_deliveries``, ``hrflow_webhook_connections_closed``).
Reasons are the receiver's own sentences: nothing a client sent is logged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

logger = logging.getLogger(__name__)

SUMMARY_INTERVAL_S = 10.0


class RejectionLog:
    def __init__(self, interval_s: float = SUMMARY_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.suppressed: collections.Counter[str] = collections.Counter()
        self._quiet_until = 0.0
        self._summary: asyncio.TimerHandle | None = None

    def note(self, outcome: str, reason: str, request_id: str | None = None) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + self.interval_s
            fields = {"outcome": outcome, "reason": reason, "request_id": request_id}
            logger.warning("rejected request", extra=fields)
            return
        self.suppressed[f"{outcome}: {reason}"] += 1
        if self._summary is None:
            delay = self._quiet_until - now
            self._summary = asyncio.get_running_loop().call_later(delay, self._log_summary)

    def _log_summary(self) -> None:
        self._summary = None
        if not self.suppressed:
            return
        rejected, self.suppressed = dict(self.suppressed), collections.Counter()
        logger.warning(
            "rejected requests not logged one by one",
            extra={"rejected": rejected, "interval_s": self.interval_s},
        )
        # The summary opens a new period: what comes in it is summed up at its end.
        self._quiet_until = time.monotonic() + self.interval_s


REJECTIONS = RejectionLog()
