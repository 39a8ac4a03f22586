"""Prometheus metrics of the receiver. Label values are bounded: outcomes, reasons, known types.

The webhook path counts every delivery, thousands a second. prometheus_client's
``Counter.inc`` and ``Histogram.observe`` take a lock and check their state on
each call, which cost the receiver about 3.5 µs per delivery (docs/benchmarks.md).
The receiver runs one event loop, so it counts in plain integers, and a
collector hands them to prometheus_client when ``/metrics`` is scraped: the
names, labels and exposition format stay prometheus_client's.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hmac
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hrflow_webhooks.events import KNOWN_EVENT_NAMES, Event
from hrflow_webhooks.queue import COALESCED, DUPLICATE, QUEUED
from receiver.protocol import CLOSED

ENQUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


# The enqueue script's outcome (hrflow_webhooks.queue) as the "queued" label's value.
_QUEUED_LABEL = {QUEUED: "yes", DUPLICATE: "no", COALESCED: "coalesced"}


class ReceiverCounts:
    """What the receiver counts, as plain numbers (one event loop: no lock needed)."""

    def __init__(self) -> None:
        self.deliveries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()
        self.enqueue_buckets = [0] * (len(ENQUEUE_BUCKETS_S) + 1)  # the last one is +Inf
        self.enqueue_sum_s = 0.0
        self.in_flight = 0

    def delivery(self, outcome: str, reason: str = "") -> None:
        self.deliveries[outcome, reason] += 1

    def events_received(self, received: Sequence[Event], outcomes: Sequence[int]) -> None:
        for event, outcome in zip(received, outcomes, strict=True):
            # Unknown types count as "other", so they cannot grow the label values.
            known = event.canonical_type in KNOWN_EVENT_NAMES
            self.events[event.canonical_type if known else "other", _QUEUED_LABEL[outcome]] += 1

    def enqueued_in(self, seconds: float) -> None:
        self.enqueue_buckets[bisect.bisect_left(ENQUEUE_BUCKETS_S, seconds)] += 1
        self.enqueue_sum_s += seconds


class ReceiverCollector(Collector):
    """Exposes :class:`ReceiverCounts` under the receiver's metric names."""

    def __init__(self, counts: ReceiverCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        yield _counter_family(
            "hrflow_webhook_deliveries",
            "Webhook deliveries by outcome (queued, coalesced, duplicate, bad_signature, bad_request, "
            "too_large, unavailable) and, for bad signatures, the reason.",
            ["outcome", "reason"],
            self.counts.deliveries,
        )
        yield _counter_family(
            "hrflow_webhook_events",
            "Events received, by canonical type (unknown types count as 'other') and whether "
            "queued (yes), a duplicate (no) or merged into a waiting run (coalesced).",
            ["canonical_type", "queued"],
            self.counts.events,
        )
        closed = CounterMetricFamily(
            "hrflow_webhook_connections_closed",
            "Connections the receiver closed itself, by why: header_too_large (431), "
            "head_timeout and body_timeout (408), idle, evicted (to make room under "
            "HRFLOW_MAX_CONNECTIONS), over_capacity.",
            labels=["reason"],
        )
        for reason, count in sorted(CLOSED.items()):
            closed.add_metric([reason], count)
        yield closed
        yield self._enqueue_histogram()
        yield GaugeMetricFamily(
            "hrflow_webhook_requests_in_flight",
            "Webhook requests being handled now.",
            value=self.counts.in_flight,
        )

    def _enqueue_histogram(self) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        bounds = [*map(str, ENQUEUE_BUCKETS_S), "+Inf"]
        for bound, count in zip(bounds, self.counts.enqueue_buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(
            "hrflow_webhook_enqueue_seconds",
            "Time from having the request body to the event being durably queued.",
            buckets=buckets,
            sum_value=self.counts.enqueue_sum_s,
        )


def _counter_family(
    name: str, documentation: str, labels: list[str], counts: Mapping[tuple[str, str], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, count in sorted(counts.items()):
        family.add_metric(list(label_values), count)
    return family


COUNTS = ReceiverCounts()
REGISTRY.register(ReceiverCollector(COUNTS))


NOT_ON_THIS_PORT = (
    "metrics are not served on the webhook port: scrape HRFLOW_RECEIVER_METRICS_PORT, or set "
    "HRFLOW_METRICS_TOKEN and send it as a bearer token"
)


def endpoint(token: str | None) -> Callable[[Request], Awaitable[Response]]:
    """``GET /metrics`` on the public webhook port: only with the bearer token, when one is set."""
    expected = f"Bearer {token}".encode() if token else None

    async def metrics(request: Request) -> Response:
        if expected is None:
            return JSONResponse({"error": "not_found", "reason": NOT_ON_THIS_PORT}, 404)
        supplied = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(supplied, expected):
            reason = "GET /metrics needs 'Authorization: Bearer <HRFLOW_METRICS_TOKEN>'"
            return JSONResponse({"error": "unauthorized", "reason": reason}, 401)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return metrics


async def serve_metrics(host: str, port: int) -> asyncio.Server:
    """``GET /metrics`` on a port of its own (``HRFLOW_RECEIVER_METRICS_PORT``), in the
    receiver's event loop. The port is shared by the processes of ``--workers N``
    (SO_REUSEPORT): each scrape reaches one of them, as on the webhook port."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            found = head.startswith((b"GET /metrics ", b"GET /metrics?"))
            body = generate_latest() if found else b"not found\n"
            status = b"200 OK" if found else b"404 Not Found"
            content_type = CONTENT_TYPE_LATEST.encode() if found else b"text/plain"
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, content_type, len(body), body)
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that went away, or not HTTP: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, reuse_port=True, limit=8_192)
