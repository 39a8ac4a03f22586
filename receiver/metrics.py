"""Prometheus metrics of the receiver. Label values are bounded: outcomes, reasons, known types.

The webhook path counts every delivery, so it keeps the labelled children it has
used (``labels()`` formats and locks on every call) and counts requests in
flight with a plain integer that the gauge reads only when scraped.
"""

from __future__ import annotations

import functools
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


class InFlight:
    """Requests being handled now: a plain counter (one event loop), read by the gauge."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> None:
        self.count += 1

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1


IN_FLIGHT_REQUESTS = InFlight()
IN_FLIGHT.set_function(lambda: IN_FLIGHT_REQUESTS.count)


@functools.cache  # bounded: outcomes and reasons are fixed strings of this package
def _delivery_counter(outcome: str, reason: str) -> Counter:
    return DELIVERIES.labels(outcome, reason)


@functools.cache  # bounded: known canonical types, or "other"
def _event_counter(canonical_type: str, queued: bool) -> Counter:
    return EVENTS.labels(canonical_type, "yes" if queued else "no")


def delivery(outcome: str, reason: str = "") -> None:
    _delivery_counter(outcome, reason).inc()


def events(received: Sequence[Event], queued_flags: Sequence[bool]) -> None:
    for event, queued in zip(received, queued_flags, strict=True):
        # Unknown types count as "other", so they can grow neither the labels nor the cache.
        known = event.canonical_type in KNOWN_EVENT_NAMES
        _event_counter(event.canonical_type if known else "other", queued).inc()


async def endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
