"""P7: what surviving the loss of a machine costs and gives, as deployed.

- **replica acknowledgement**: P1 (signed deliveries queued per second, one receiver
  process, the Procfile's line) against a primary with one local replica, with
  ``HRFLOW_REDIS_MIN_REPLICAS_ACK=1`` (a ``WAIT`` after each batch) and without it,
  alternating, beside the bare Starlette baseline;
- **Redis work per handled event, end to end**: wrk sends signed deliveries to the
  receiver while one worker (no-op handler) drains them; Redis CPU (INFO cpu) and
  commands (INFO commandstats, commands inside scripts and MULTI/EXEC counted) per
  handled event, with the commands that make them up, and the worker's CPU per event;
- **lease recovery**: a worker holding runs of 3 s handlers is SIGKILLed; the time until
  the other worker has done them all.
"""

from __future__ import annotations

import collections
import time
from typing import Any, cast

from redis import Redis

from bench import measure
from bench.deliveries import write_deliveries
from bench.handlers import SLOW_HANDLER_S, STARTED_KEY
from bench.procs import RECEIVER_APP, Processes, cpu_seconds, wait_for_http
from bench.rows import COUNTING, DISTINCT_DELIVERIES_PER_S, Config
from hrflow_webhooks.queue import QueueKeys
from tests.polling import eventually_sync
from tests.redis_server import RedisServer

SLOW = ["bench.handlers:register_slow"]
HELD_RUNS = 18
LEASE_S = 5.0  # HRFLOW_WORKER_LEASE_S's default: the deployed configuration
JOB_TIMEOUT_S = 20  # HRFLOW_JOB_TIMEOUT_S's default: what arq's own expiry would wait, + 10 s
KEYS = QueueKeys("hrflow:queue")


def p7_availability(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    return {
        "replica_ack": _replica_ack(procs, redis, config),
        "redis_per_event": _redis_per_event(procs, redis, config),
        "lease_recovery": _lease_recovery(procs, redis, config),
    }


# --- P1 with and without replica acknowledgement ------------------------------------------------


def _replica_online(redis: Redis) -> bool:
    info = cast(dict[str, Any], redis.info("replication"))
    return bool(info.get("slave0", {}).get("state") == "online")


def _replica_ack(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    assert procs.redis is not None
    replica = RedisServer(
        config.work_dir / "replica", None, "--replicaof", "127.0.0.1", str(procs.redis.port)
    )
    replica.start()
    eventually_sync(lambda: _replica_online(redis), "the replica online")
    deliveries = write_deliveries(
        config.work_dir / "p7.txt", "p7", DISTINCT_DELIVERIES_PER_S * config.wrk_seconds
    )
    servers = {
        "bare": procs.start_app("bare-p7", "bench.bare:app"),
        "no ack": procs.start_app("receiver-p7", RECEIVER_APP),
        "ack 1": procs.start_app(
            "receiver-p7-ack", RECEIVER_APP, HRFLOW_REDIS_MIN_REPLICAS_ACK="1"
        ),
    }
    for name, (_, url) in servers.items():
        if name != "bare":  # the bare app answers /webhook only
            wait_for_http(f"{url}/healthz")
        measure.run_wrk(url, deliveries, 1, 64)  # warm-up
    rates: dict[str, list[float]] = collections.defaultdict(list)
    not_2xx: dict[str, int] = collections.Counter()
    names = list(servers)
    for rep in range(config.reps):
        for name in names[rep % 3 :] + names[: rep % 3]:  # each goes first once
            redis.flushall()
            result = measure.run_wrk(servers[name][1], deliveries, config.wrk_seconds, 64)
            rates[name].append(result.requests_per_s)
            not_2xx[name] += result.not_2xx
    for process, _ in servers.values():
        procs.stop(process)
    replica.kill()
    redis.flushall()
    return {
        "unit": "deliveries/s",
        "rates": {name: measure.median(values) for name, values in rates.items()},
        "p1_ratio_no_ack": measure.median(
            [a / b for a, b in zip(rates["no ack"], rates["bare"], strict=True)]
        ),
        "p1_ratio_ack_1": measure.median(
            [a / b for a, b in zip(rates["ack 1"], rates["bare"], strict=True)]
        ),
        "ack_1_vs_no_ack": measure.median(
            [a / b for a, b in zip(rates["ack 1"], rates["no ack"], strict=True)]
        ),
        "not_2xx": dict(not_2xx),
    }


# --- Redis work per handled event, receiver and worker ------------------------------------------


def _redis_cpu_s(redis: Redis) -> float:
    info = cast(dict[str, Any], redis.info("cpu"))
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _command_calls(redis: Redis) -> dict[str, int]:
    stats = cast(dict[str, dict[str, int]], redis.info("commandstats"))
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def _redis_per_event(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    redis.flushall()
    receiver, url = procs.start_app("receiver-p7-cost", RECEIVER_APP)
    wait_for_http(f"{url}/healthz")
    worker = procs.start_worker("worker-p7-cost", COUNTING)
    measure.fill_queue(procs.redis_url, "p7-warm", 200)
    measure.wait_handled(redis, 200, timeout_s=60)
    measure.reset_counters(redis)
    deliveries = write_deliveries(
        config.work_dir / "p7-cost.txt", "p7-cost", DISTINCT_DELIVERIES_PER_S * config.wrk_seconds
    )
    cpu_before, calls_before = _redis_cpu_s(redis), _command_calls(redis)
    worker_cpu_before = cpu_seconds(worker.pid)
    result = measure.run_wrk(url, deliveries, config.wrk_seconds, 64)
    events = result.requests - result.not_2xx
    measure.wait_handled(redis, events, timeout_s=300)
    time.sleep(0.2)  # the last finishes land
    cpu_s = _redis_cpu_s(redis) - cpu_before
    calls = _command_calls(redis)
    worker_cpu_s = cpu_seconds(worker.pid) - worker_cpu_before
    procs.stop(worker)
    procs.stop(receiver)
    per_event = {
        name: (n - calls_before.get(name, 0)) / events
        for name, n in calls.items()
        if n - calls_before.get(name, 0) > 0
    }
    return {
        "events": events,
        "redis_cpu_us_per_event": cpu_s / events * 1e6,
        "redis_commands_per_event": sum(per_event.values()),
        "commands": dict(sorted(per_event.items(), key=lambda item: -item[1])),
        "worker_cpu_ms_per_event": worker_cpu_s / events * 1000,
        "lease_renewals_per_worker_per_s": 4 / LEASE_S,
    }


# --- lease recovery ------------------------------------------------------------------------------


def _leases(redis: Redis) -> int:
    return sum(1 for _ in redis.scan_iter(match=f"{KEYS.lease_prefix}*"))


def _started(redis: Redis) -> int:
    return int(cast(bytes | None, redis.get(STARTED_KEY)) or 0)


def _lease_recovery_once(procs: Processes, redis: Redis, rep: int) -> float:
    redis.flushall()
    holder = procs.start_worker(f"worker-p7-held-{rep}", SLOW)
    measure.fill_queue(procs.redis_url, f"p7-held-{rep}", HELD_RUNS)
    eventually_sync(lambda: _started(redis) == HELD_RUNS, "the runs held", timeout_s=60)
    other = procs.start_worker(f"worker-p7-other-{rep}", SLOW)
    eventually_sync(lambda: _leases(redis) == 2, "the other worker's lease", timeout_s=60)
    holder.kill()
    killed = time.monotonic()
    holder.wait(timeout=10)
    procs.stop(holder)
    measure.wait_handled(redis, HELD_RUNS, timeout_s=120)
    recovered_s = time.monotonic() - killed
    procs.stop(other)
    return recovered_s


def _lease_recovery(procs: Processes, redis: Redis, config: Config) -> dict[str, Any]:
    seconds = [_lease_recovery_once(procs, redis, rep) for rep in range(config.reps)]
    return {
        "held_runs": HELD_RUNS,
        "handler_s": SLOW_HANDLER_S,
        "lease_s": LEASE_S,
        "seconds": seconds,
        "median_s": measure.median(seconds),
        "bound_s": LEASE_S + SLOW_HANDLER_S,
        "arq_expiry_bound_s": JOB_TIMEOUT_S + 10 + SLOW_HANDLER_S,
    }
