"""What the client waits on before each request: a rate budget, shared or not.

The client only needs ``await budget.acquire()``; where the tokens live (one
process, or Redis for every worker: ``workers.rate_budget``) is the caller's choice.
"""

from __future__ import annotations

from typing import Protocol


class RateBudget(Protocol):
    async def acquire(self) -> None:
        """Return once the caller may send one request."""
