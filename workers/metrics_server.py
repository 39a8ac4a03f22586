"""Serving a worker's metrics on ``HRFLOW_WORKER_METRICS_PORT``.

One HTTP server per worker process, started in ``on_startup``. Why not
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): an arq
worker is one process running many jobs concurrently on asyncio, so one
process per container is the normal shape and each is a scrape target of its
own; multiprocess mode would add a shared directory that must be wiped at
every start, drop live gauges, and gains nothing without pre-forking. Several
workers on one host each get their own port.

Besides the process's counters (handler runs, retries, dead letters, pick-up
latency, HrFlow API calls), every scrape reads the queue from Redis: events
ready and deferred, the age of the oldest ready event and the dead letters
held. They are computed at scrape time, so they are exact however many workers
run, and every worker reports the same values (alert on ``max``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.redis_setup import connect_sync_redis
from hrflow_webhooks.settings import Settings
from workers.queue_stats import read_queue_stats_sync

logger = logging.getLogger(__name__)


class QueueCollector:
    """Queue gauges read from Redis on each scrape, with their own small connection pool."""

    def __init__(self, settings: Settings) -> None:
        self.keys = QueueKeys(settings.queue_name)
        self.redis: SyncRedis = connect_sync_redis(settings)  # Sentinel and TLS as elsewhere

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "hrflow_queue_redis_up", "1 if this scrape could read the queue from Redis, else 0."
        )
        try:
            stats = read_queue_stats_sync(self.redis, self.keys)
        except (RedisError, OSError):
            # A scrape must still answer: the 0 here is what an alert on Redis watches.
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        events = GaugeMetricFamily(
            "hrflow_queue_events",
            "Events on the queue: 'ready' are due (waiting or running), 'deferred' wait for a retry.",
            labels=["state"],
        )
        events.add_metric(["ready"], stats.ready)
        events.add_metric(["deferred"], stats.deferred)
        yield events
        yield GaugeMetricFamily(
            "hrflow_queue_oldest_ready_age_seconds",
            "How long the oldest due event has been waiting (0 when none is due).",
            value=stats.oldest_ready_age_s,
        )
        yield GaugeMetricFamily(
            "hrflow_queue_oldest_wait_seconds",
            "How long the oldest unfinished run has waited since it first became due, parked "
            "and retried runs included (0 when none waits).",
            value=stats.oldest_wait_s,
        )
        yield GaugeMetricFamily(
            "hrflow_dead_letters_stored",
            "Dead letters held in Redis now (replayed and purged ones excluded).",
            value=stats.dead_letters,
        )

    def close(self) -> None:
        self.redis.close()


class WorkerMetricsServer:
    """The process's default registry plus the queue gauges, on their own HTTP server."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.queue = QueueCollector(settings)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(REGISTRY)  # counters recorded anywhere in the process
        self.registry.register(self.queue)
        self.server: WSGIServer
        self.server, self._thread = start_http_server(
            port, addr=settings.metrics_host, registry=self.registry
        )

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
        self.queue.close()


# The server of each configured port in this process. arq's Worker.close() talks to Redis
# before on_shutdown, so during a Redis outage on_shutdown never runs and the server keeps
# its port; the worker `hrflow-webhooks worker` builds next must reuse it, not fail to bind.
_SERVERS: dict[int, WorkerMetricsServer] = {}


def start_worker_metrics(settings: Settings) -> WorkerMetricsServer | None:
    """Serve metrics when HRFLOW_WORKER_METRICS_PORT is set (0 picks a free port)."""
    port = settings.worker_metrics_port
    if port is None:
        return None
    if port in _SERVERS:
        return _SERVERS[port]
    server = WorkerMetricsServer(settings, port)
    if port:
        _SERVERS[port] = server
    logger.info(f"worker metrics served on {settings.metrics_host}:{server.port}")
    return server


def stop_worker_metrics(server: WorkerMetricsServer | None) -> None:
    if server is None:
        return
    for port, running in list(_SERVERS.items()):
        if running is server:
            del _SERVERS[port]
    server.close()
