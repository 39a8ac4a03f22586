"""Prometheus metrics of the receiver. Label values are bounded: outcomes, reasons, known types."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from hrflow_webhooks.events import KNOWN_EVENT_NAMES, Event

DELIVERIES = Counter(
    "hrflow_webhook_deliveries",
    "Webhook deliveries by outcome (queued, duplicate, bad_signature, bad_request, too_large, "
    "unavailable) and, for bad signatures, the reason.",
    ["outcome", "reason"],
)
EVENTS = Counter(
    "hrflow_webhook_events",
    "Events received, by canonical type (unknown types count as 'other') and whether queued.",
    ["canonical_type", "queued"],
)
ENQUEUE_SECONDS = Histogram(
    "hrflow_webhook_enqueue_seconds",
    "Time from having the request body to the event being durably queued.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
IN_FLIGHT = Gauge("hrflow_webhook_requests_in_flight", "Webhook requests being handled now.")


def delivery(outcome: str, reason: str = "") -> None:
    DELIVERIES.labels(outcome, reason).inc()


def events(received: Sequence[Event], queued_flags: Sequence[bool]) -> None:
    for event, queued in zip(received, queued_flags, strict=True):
        known = event.canonical_type in KNOWN_EVENT_NAMES
        EVENTS.labels(event.canonical_type if known else "other", "yes" if queued else "no").inc()


async def endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
