"""The rows of issue 7. Each returns a dict for the JSON result: its figures, its baseline,
the ratio and the target. Baseline and subject runs alternate, and the figure is the median.
"""

from __future__ import annotations

import collections
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis

from bench import instructions, measure
from bench.deliveries import write_deliveries
from bench.handlers import IO_WAIT_S
from bench.procs import PYTHON, RECEIVER_APP, Processes, cpu_seconds, rss_bytes, wait_for_http
from hrflow_webhooks.queue import QueueKeys

# wrk replays its file in a loop: it must hold more deliveries than the receiver takes in a
# run, or the repeats take the receiver's cheaper duplicate path (P1's checks show it:
# jobs_queued < requests). 12,000/s was enough until the receiver passed 12,000/s.
DISTINCT_DELIVERIES_PER_S = 25_000
COUNTING = ["bench.handlers:register"]
TIMED = ["bench.handlers:register_timed"]
WAITING = ["bench.handlers:register_io"]


@dataclass(frozen=True)
class Config:
    smoke: bool
    work_dir: Path

    @property
    def reps(self) -> int:
        return 1 if self.smoke else 3

    @property
    def wrk_seconds(self) -> int:
        return 3 if self.smoke else 10

    @property
    def worker_events(self) -> int:
        return 2_000 if self.smoke else 10_000

    @property
    def latency_seconds(self) -> float:
        return 5.0 if self.smoke else 20.0

    @property
    def memory_events(self) -> int:
        return 5_000 if self.smoke else 100_000


def _ratio_row(
    target: float, baseline: list[float], subject: list[float], **extra: Any
) -> dict[str, Any]:
    ratios = [s / b for s, b in zip(subject, baseline, strict=True)]
    return {
        "baseline": measure.median(baseline),
        "subject": measure.median(subject),
        "ratio": measure.median(ratios),
        "ratios": ratios,
        "target": target,
        **extra,
    }


# --- P1: ingest --------------------------------------------------------------------------------


def p1_ingest(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    """Signed deliveries verified and durably queued per second vs a bare Starlette endpoint."""
    deliveries = write_deliveries(
        config.work_dir / "p1.txt", "p1", DISTINCT_DELIVERIES_PER_S * config.wrk_seconds
    )
    bare, bare_url = procs.start_app("bare", "bench.bare:app")
    receiver, receiver_url = procs.start_app("receiver", RECEIVER_APP)
    wait_for_http(f"{receiver_url}/healthz")
    connections = 64
    for url in (bare_url, receiver_url):  # warm-up: imports, JIT-free but caches and pools
        measure.run_wrk(url, deliveries, 1, connections)
    baseline: list[float] = []
    subject: list[float] = []
    baseline_cpu: list[float] = []  # server CPU µs per request: robust to noisy neighbours
    subject_cpu: list[float] = []
    checks: list[dict[str, int]] = []
    for rep in range(config.reps):
        for name in ("bare", "receiver") if rep % 2 == 0 else ("receiver", "bare"):
            redis.flushall()
            url, server = (bare_url, bare) if name == "bare" else (receiver_url, receiver)
            cpu_before = cpu_seconds(server.pid)
            result = measure.run_wrk(url, deliveries, config.wrk_seconds, connections)
            cpu_us = (cpu_seconds(server.pid) - cpu_before) / result.requests * 1e6
            if name == "bare":
                baseline.append(result.requests_per_s)
                baseline_cpu.append(cpu_us)
                continue
            subject.append(result.requests_per_s)
            subject_cpu.append(cpu_us)
            checks.append(
                {
                    "requests": result.requests,
                    "not_2xx": result.not_2xx,
                    "jobs_queued": measure.queue_length(redis),
                }
            )
    procs.stop(bare)
    procs.stop(receiver)
    redis.flushall()
    counted = {} if config.smoke else _p1_instructions(procs, redis, deliveries)
    return _ratio_row(
        0.5,
        baseline,
        subject,
        unit="deliveries/s",
        connections=connections,
        cpu_us_per_request={
            "baseline": measure.median(baseline_cpu),
            "subject": measure.median(subject_cpu),
        },
        checks=checks,
        **counted,
    )


def _p1_instructions(procs: Processes, redis: Redis, deliveries: Path) -> dict[str, Any]:
    """Instructions per request under callgrind: the CPU-work ratio, free of the noise."""
    if not instructions.available():
        return {"instructions_per_request": "skipped: valgrind is not installed"}
    counts = {}
    for role, app in (("baseline", "bench.bare:app"), ("subject", RECEIVER_APP)):
        counts[role] = instructions.instructions_per_request(procs, role, app, deliveries, 20)
        redis.flushall()
    counts["ratio"] = counts["baseline"] / counts["subject"]
    return {"instructions_per_request": counts}


# --- P5: scale-out, and the one-worker peak the latency row needs --------------------------------


def _worker_rate(
    procs: Processes,
    redis: Redis,
    config: Config,
    workers: int,
    tag: str,
    cpu_ms: dict[str, list[float]],
    plugins: list[str] = COUNTING,
    count: int | None = None,
    commands: dict[str, list[float]] | None = None,
) -> float:
    """Events per second that ``workers`` fresh worker processes handle from a full queue.

    ``commands`` collects Redis commands per event (INFO commandstats, scripts' and
    MULTI/EXEC's own commands included), for enqueueing and handling it."""
    redis.flushall()
    count = count or config.worker_events
    started = [procs.start_worker(f"worker-{i}", plugins) for i in range(workers)]
    measure.fill_queue(procs.redis_url, f"{tag}-warm", 200 * workers)
    measure.wait_handled(redis, 200 * workers, timeout_s=60)
    measure.reset_counters(redis)
    pids = [p.pid for p in started]
    events = measure.prepare_events(tag, count)
    cpu_before = sum(cpu_seconds(pid) for pid in pids), cpu_seconds(procs.redis_pid)
    commands_before = measure.redis_commands(redis)
    start = time.monotonic()
    measure.enqueue_prepared(procs.redis_url, events)
    measure.wait_handled(redis, count, timeout_s=300)
    rate = count / (time.monotonic() - start)
    if commands is not None:
        commands[f"{workers} workers"].append(
            (measure.redis_commands(redis) - commands_before) / count
        )
    cpu_ms[f"{workers} workers"].append(
        (sum(cpu_seconds(pid) for pid in pids) - cpu_before[0]) / count * 1000
    )
    cpu_ms[f"redis with {workers}"].append(
        (cpu_seconds(procs.redis_pid) - cpu_before[1]) / count * 1000
    )
    for process in started:
        procs.stop(process)
    return rate


def p5_scale_out(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    """2 worker processes vs 1, with handlers that wait on I/O like real ones (the target
    row), and with no-op handlers, where the pipeline's own CPU is all there is to scale."""
    io_events = config.worker_events // 2
    waiting = _scale_out(procs, redis, config, WAITING, io_events, "p5")
    no_op = _scale_out(procs, redis, config, COUNTING, config.worker_events, "p5-noop")
    return {**waiting, "handler_wait_ms": IO_WAIT_S * 1000, "no_op": no_op}


def _scale_out(
    procs: Processes,
    redis: Redis,
    config: Config,
    plugins: list[str],
    count: int,
    tag: str,
) -> dict[str, Any]:
    one: list[float] = []
    two: list[float] = []
    cpu_ms: dict[str, list[float]] = collections.defaultdict(list)  # CPU ms per event, all workers
    commands: dict[str, list[float]] = collections.defaultdict(list)
    for rep in range(config.reps):
        for workers in (1, 2) if rep % 2 == 0 else (2, 1):
            rate = _worker_rate(
                procs, redis, config, workers, f"{tag}-{rep}-{workers}", cpu_ms, plugins, count,
                commands,
            )  # fmt: skip
            (one if workers == 1 else two).append(rate)
    return _ratio_row(
        1.7,
        one,
        two,
        unit="events/s",
        events=count,
        cpu_ms_per_event={name: measure.median(values) for name, values in cpu_ms.items()},
        redis_commands_per_event={name: measure.median(v) for name, v in commands.items()},
    )


# --- P3: pick-up latency -------------------------------------------------------------------------


def _latency_run(
    procs: Processes, redis: Redis, config: Config, rate: float, arq_defaults: bool, tag: str
) -> dict[str, Any]:
    redis.flushall()
    receiver, url = procs.start_app("receiver", RECEIVER_APP)
    wait_for_http(f"{url}/healthz")
    worker = procs.start_worker("worker-latency", TIMED, arq_defaults=arq_defaults)
    measure.fill_queue(procs.redis_url, f"{tag}-warm", 20)
    measure.wait_handled(redis, 20, timeout_s=60)
    measure.reset_counters(redis)
    deliveries = write_deliveries(
        config.work_dir / "p3.txt", tag, int(rate * config.latency_seconds) + 1
    )
    command = [PYTHON, "-m", "bench.loadgen", f"{url}/webhook", str(deliveries), str(rate)]
    output = subprocess.run(
        [*command, str(config.latency_seconds)], capture_output=True, text=True, check=True
    ).stdout
    sent = json.loads(output)
    accepted = int(sent["statuses"].get("202", 0))
    measure.wait_handled(redis, accepted, timeout_s=120)
    pickups = measure.pickups_ms(redis)
    procs.stop(worker)
    procs.stop(receiver)
    return {
        "rate_per_s": rate,
        "accepted": accepted,
        "statuses": sent["statuses"],
        "p50_ms": measure.percentile(pickups, 0.50),
        "p99_ms": measure.percentile(pickups, 0.99),
        "samples": len(pickups),
    }


def _arq_default_peak(procs: Processes, redis: Redis, config: Config) -> float:
    redis.flushall()
    worker = procs.start_worker("worker-arq-defaults", COUNTING, arq_defaults=True)
    measure.fill_queue(procs.redis_url, "arq-warm", 10)
    measure.wait_handled(redis, 10, timeout_s=60)
    measure.reset_counters(redis)
    count = 60 if config.smoke else 200
    events = measure.prepare_events("arq-peak", count)
    start = time.monotonic()
    measure.enqueue_prepared(procs.redis_url, events)
    measure.wait_handled(redis, count, timeout_s=120)
    rate = count / (time.monotonic() - start)
    procs.stop(worker)
    return rate


def _pipeline_peak(procs: Processes, redis: Redis, config: Config) -> float:
    """Events handled per second by receiver + one worker while wrk saturates the receiver.

    Measured with every process of P3 running, because on a small machine they share the
    cores: the worker's rate alone (P5) overstates what the whole pipeline sustains.
    """
    redis.flushall()
    receiver, url = procs.start_app("receiver", RECEIVER_APP)
    wait_for_http(f"{url}/healthz")
    worker = procs.start_worker("worker-peak", COUNTING)
    measure.fill_queue(procs.redis_url, "peak-warm", 20)
    measure.wait_handled(redis, 20, timeout_s=60)
    measure.reset_counters(redis)
    seconds = 3 if config.smoke else 8
    deliveries = write_deliveries(
        config.work_dir / "p3-peak.txt", "p3-peak", DISTINCT_DELIVERIES_PER_S * seconds
    )
    start = time.monotonic()
    measure.run_wrk(url, deliveries, seconds, connections=64)
    rate = measure.handled(redis) / (time.monotonic() - start)
    procs.stop(worker)
    procs.stop(receiver)
    return rate


def p3_latency(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    """Each system at half its own peak: ours is far past what arq's defaults can absorb."""
    peak = _pipeline_peak(procs, redis, config)
    ours_rate = round(peak / 2)
    arq_rate = round(_arq_default_peak(procs, redis, config) / 2, 1)
    ours: list[dict[str, Any]] = []
    arq: list[dict[str, Any]] = []
    for rep in range(max(1, config.reps - 1)):
        for arq_defaults in (False, True) if rep % 2 == 0 else (True, False):
            rate = arq_rate if arq_defaults else ours_rate
            run = _latency_run(procs, redis, config, rate, arq_defaults, f"p3-{rep}-{arq_defaults}")
            (arq if arq_defaults else ours).append(run)
    p99_ours = measure.median([r["p99_ms"] for r in ours])
    p99_arq = measure.median([r["p99_ms"] for r in arq])
    return {
        "subject": {
            "p50_ms": measure.median([r["p50_ms"] for r in ours]),
            "p99_ms": p99_ours,
            "rate_per_s": ours_rate,
        },
        "baseline": {
            "p50_ms": measure.median([r["p50_ms"] for r in arq]),
            "p99_ms": p99_arq,
            "rate_per_s": arq_rate,
        },
        "ratio": p99_ours / p99_arq,
        "target": 0.05,
        "pipeline_peak_per_s": peak,
        "runs": {"ours": ours, "arq_defaults": arq},
    }


# --- P4: memory -----------------------------------------------------------------------------------


def _redis_keys(redis: Redis) -> dict[str, int]:
    classes = {
        ":seen:": "dedup markers",
        ":done:": "completion markers",
        ":order:": "subject order lists",
        ":waiting:": "waiting-run pointers",
        ":handled:": "handled states",
        "arq:job:": "jobs",
        "arq:in-progress:": "in-progress",
        "arq:retry:": "retry counters",
        "arq:result:": "results",
        ":lease:": "worker leases",
    }
    counts: dict[str, int] = {}
    for key in redis.scan_iter(count=1_000):
        name = key.decode()
        kind = next((label for part, label in classes.items() if part in name), name)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def p4_memory(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    redis.flushall()
    worker = procs.start_worker("worker-memory", COUNTING)
    measure.fill_queue(procs.redis_url, "p4-warm", 1_000)
    measure.wait_handled(redis, 1_000, timeout_s=120)
    redis.flushall()  # the warm-up's markers are not part of the growth
    rss_start = rss_bytes(worker.pid)
    redis_start = measure.used_memory(redis)
    samples: list[tuple[int, int]] = [(0, rss_start)]
    events = config.memory_events
    batch = 10_000
    for first in range(0, events, batch):
        count = min(batch, events - first)
        measure.fill_queue(procs.redis_url, f"p4-{first}", count)
        measure.wait_handled(redis, first + count, timeout_s=600)
        samples.append((first + count, rss_bytes(worker.pid)))
    time.sleep(0.5)  # let the last job's bookkeeping land
    keys = _redis_keys(redis)
    redis_end = measure.used_memory(redis)
    event_log = int(redis.memory_usage(QueueKeys("hrflow:queue").log, samples=0) or 0)  # type: ignore[arg-type]
    procs.stop(worker)
    rss_growth = samples[-1][1] - rss_start
    # A finished run leaves nothing of its own: no job, marker or order list.
    # The durability watch's start marker is one key; its loss notice appears because the
    # bench flushes Redis between rows while processes run (a loss it rightly reports).
    # By design since issue 16: the event log (one stream, capped at
    # HRFLOW_EVENT_LOG_MAX_ENTRIES), each profile's handled state (kept as long as the log,
    # for reconciliation) and the workers' heartbeats.
    expected = {
        "dedup markers",
        "handled states",
        "hrflow:queue:log",
        "hrflow:queue:workers",
        "bench:handled",
        "hrflow:queue:health-check",
        "hrflow:queue:redis-marker",
        "hrflow:queue:data-loss",
        "worker leases",  # the running worker's own lease (workers.leases)
    }
    leftovers = {kind: n for kind, n in keys.items() if kind not in expected}
    return {
        "events": events,
        "rss_start_mb": rss_start / 2**20,
        "rss_growth_mb": rss_growth / 2**20,
        "rss_samples": samples,
        "redis_growth_mb": (redis_end - redis_start) / 2**20,
        "redis_bytes_per_event": (redis_end - redis_start) / events,
        "redis_keys": keys,
        "event_log_mb": event_log / 2**20,
        "leftover_keys": leftovers,
        "target_rss_growth_mb": 20,
        "passes": rss_growth < 20 * 2**20 and not leftovers,
    }
