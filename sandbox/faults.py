"""Fault and latency injection: what can go wrong with HrFlow, on demand.

A :class:`Fault` matches calls by endpoint (``"GET /v1/profile/indexing"``,
``"/v1/profile/indexing"`` for every method, or ``"*"``), applies to a share of
them (``rate``) and optionally to the next ``times`` matching calls only. It
adds latency and/or answers with a status (429 carries ``Retry-After``) or
hangs (``timeout``) for ``hang_s`` before answering 504, so clients time out.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Fault:
    endpoint: str = "*"
    status: int | None = None
    retry_after_s: float | None = None
    latency_ms: float = 0.0
    timeout: bool = False
    hang_s: float = 30.0
    rate: float = 1.0
    times: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)} (known: {sorted(known)})")
        fault = cls(**data)
        if not 0 <= fault.rate <= 1:
            raise ValueError("rate must be between 0 and 1")
        if fault.status is not None and not 400 <= fault.status <= 599:
            raise ValueError("status must be a 4xx or 5xx code")
        return fault

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, method: str, path: str) -> bool:
        return self.endpoint in ("*", path, f"{method} {path}")


@dataclass(slots=True)
class Outcome:
    """What the faults decided for one call."""

    latency_ms: float = 0.0
    status: int | None = None
    retry_after_s: float | None = None
    hang_s: float | None = None
    applied: list[str] = field(default_factory=list)


class Faults:
    def __init__(self, rng: random.Random) -> None:
        self.rules: list[Fault] = []
        self._rng = rng

    def add(self, fault: Fault) -> None:
        self.rules.append(fault)

    def clear(self) -> None:
        self.rules.clear()

    def decide(self, method: str, path: str) -> Outcome:
        outcome = Outcome()
        for fault in self.rules:
            if not self._applies(fault, method, path):
                continue
            outcome.latency_ms += fault.latency_ms
            outcome.applied.append(fault.endpoint)
            if outcome.status is None and outcome.hang_s is None:
                if fault.timeout:
                    outcome.hang_s = fault.hang_s
                elif fault.status is not None:
                    outcome.status = fault.status
                    outcome.retry_after_s = fault.retry_after_s
        self.rules = [f for f in self.rules if f.times is None or f.times > 0]
        return outcome

    def _applies(self, fault: Fault, method: str, path: str) -> bool:
        if not fault.matches(method, path) or (fault.times is not None and fault.times <= 0):
            return False
        if fault.rate < 1 and self._rng.random() >= fault.rate:
            return False
        if fault.times is not None:
            fault.times -= 1
        return True
