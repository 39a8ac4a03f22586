"""Prometheus metrics of the HrFlow API client: calls by endpoint and status, their latency,
and the time spent waiting for the rate budget.

The client calls two functions and knows nothing of Prometheus:

- :func:`record_api_call` once per HTTP exchange (each retry is its own call);
- :func:`record_rate_wait` each time the rate budget made a call wait.

Labels stay bounded whatever the client passes: the endpoint loses its query
string (which holds profile keys) and any path segment that looks like an id,
and the status is a number class ("200", "429", ...) or "error" when no answer came.
"""

from __future__ import annotations

import re

from prometheus_client import Counter, Histogram

API_CALLS = Counter(
    "hrflow_api_calls",
    "HrFlow API calls by endpoint (method and path, no query) and HTTP status "
    "('error' when no answer came: timeout, connection).",
    ["endpoint", "status"],
)
API_SECONDS = Histogram(
    "hrflow_api_call_seconds",
    "HrFlow API call latency, from sending the request to reading the answer.",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RATE_WAIT_SECONDS = Histogram(
    "hrflow_api_rate_wait_seconds",
    "Time a call waited for the HrFlow rate budget (HRFLOW_API_RATE_PER_S) before it was sent.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# A segment with a digit and 16+ characters of hex/word/dash is an id (keys are 40-hex), not a route.
_ID_SEGMENT = re.compile(r"^(?=.*\d)[\w-]{16,}$")


def bounded_endpoint(endpoint: str) -> str:
    """``GET /v1/profile/indexing?key=..`` → ``GET /v1/profile/indexing``; ids → ``{id}``."""
    method, _, path = endpoint.strip().rpartition(" ")
    path = path.split("?", 1)[0].split("#", 1)[0]
    segments = ["{id}" if _ID_SEGMENT.match(s) else s for s in path.split("/")]
    return f"{method.upper()} {'/'.join(segments)}".strip()


def bounded_status(status: int | str | None) -> str:
    """An HTTP status as its number; anything else (no answer) as ``error``."""
    if isinstance(status, int) and 100 <= status <= 599:
        return str(status)
    return "error"


def record_api_call(endpoint: str, status: int | str | None, seconds: float) -> None:
    """One HTTP exchange with HrFlow: ``endpoint`` is ``"METHOD /path"``, status None if none."""
    label = bounded_endpoint(endpoint)
    API_CALLS.labels(label, bounded_status(status)).inc()
    API_SECONDS.labels(label).observe(max(0.0, seconds))


def record_rate_wait(seconds: float) -> None:
    """A call waited ``seconds`` for the rate budget; zero waits are not recorded."""
    if seconds > 0:
        RATE_WAIT_SECONDS.observe(seconds)
