"""Prometheus metrics of a worker process. Labels: event type, handler name, outcome only."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from hrflow_webhooks.events import KNOWN_EVENT_NAMES

HANDLER_RUNS = Counter(
    "hrflow_worker_handler_runs",
    "Handler runs by canonical event type, handler and outcome (ok, retry, failed, unrouted).",
    ["canonical_type", "handler", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "hrflow_worker_handler_seconds",
    "Handler run time.",
    ["canonical_type", "handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RETRIES = Counter("hrflow_worker_retries", "Events scheduled for a retry.", ["canonical_type"])
DEAD_LETTERS = Counter(
    "hrflow_worker_dead_letters", "Handlers dead-lettered.", ["canonical_type", "handler"]
)
PICKUP_SECONDS = Histogram(
    "hrflow_worker_pickup_seconds",
    "Time from an event being queued to its first try starting.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0),
)

RUNS_OVERDUE = Gauge(
    "hrflow_worker_runs_overdue",
    "Runs this worker has held longer than the job timeout + 10 s: a handler that does not "
    "return (a blocking call without a timeout); their subjects' later runs wait.",
)
LEASE_LAPSES = Counter(
    "hrflow_worker_lease_lapses",
    "Times this worker gave its lease up (Redis unreachable, or the process frozen, for "
    "longer than the lease allows); its runs were taken over.",
)

RECONCILE_PROFILES = Counter(
    "hrflow_reconcile_profiles",
    "Profiles the reconciler listed, by result (scanned, enqueued, already_handled, "
    "already_queued, no_handler, untrusted_date, truncated).",
    ["result"],
)
RECONCILE_RUNS = Counter(
    "hrflow_reconcile_runs", "Reconciliation scans, by outcome (complete, stopped).", ["outcome"]
)


def bounded_type(canonical_type: str) -> str:
    """Unknown types (unrouted events) are whatever a signed sender wrote: one label for all."""
    return canonical_type if canonical_type in KNOWN_EVENT_NAMES else "other"


def handler_outcome(
    canonical_type: str, handler: str, outcome: str, duration_s: float | None = None
) -> None:
    event_type = bounded_type(canonical_type)
    HANDLER_RUNS.labels(event_type, handler, outcome).inc()
    if duration_s is not None:
        HANDLER_SECONDS.labels(event_type, handler).observe(duration_s)
