"""Interleaved wrk A/B of two receiver trees, each serving the Procfile's web line.

    .venv/bin/python -m bench.ab TREE_A TREE_B [--reps 6] [--seconds 5]

Each tree is a checkout (a git worktree of another commit, say): its receiver runs with the
tree first on PYTHONPATH, both against one Redis. Runs alternate A, B then B, A; the medians
of deliveries per second and receiver CPU per delivery are printed, and B ÷ A.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

import redis

from bench import measure
from bench.deliveries import write_deliveries
from bench.procs import WEBHOOK_SECRET, cpu_seconds, deployed_env, terminate, wait_for_http
from control.commands import web_argv
from tests.redis_server import RedisServer, free_port

CONNECTIONS = 64


def start_receiver(tree: Path, redis_url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = deployed_env(redis_url, WEBHOOK_SECRET) | {"PYTHONPATH": str(tree)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            web_argv(port, "127.0.0.1"), cwd=tree, env=env, stdout=out, stderr=out
        )
    return process, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("tree_a", type=Path)
    parser.add_argument("tree_b", type=Path)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hrflow-ab-"))
    server = RedisServer(work / "redis")
    server.start()
    client = redis.Redis.from_url(server.url)
    deliveries = write_deliveries(work / "deliveries.txt", "ab", 400_000)
    trees = {"A": args.tree_a.resolve(), "B": args.tree_b.resolve()}
    started = {
        name: start_receiver(tree, server.url, work / f"{name}.log") for name, tree in trees.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in trees}
    cpu_us: dict[str, list[float]] = {name: [] for name in trees}
    try:
        for _, url in started.values():
            wait_for_http(f"{url}/healthz")
            measure.run_wrk(url, deliveries, 2, CONNECTIONS)  # warm-up
        for rep in range(args.reps):
            for name in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                process, url = started[name]
                client.flushall()
                before = cpu_seconds(process.pid)
                result = measure.run_wrk(url, deliveries, args.seconds, CONNECTIONS)
                assert result.not_2xx == 0, f"{name}: {result.not_2xx} answers were not 2xx"
                rates[name].append(result.requests_per_s)
                cpu_us[name].append((cpu_seconds(process.pid) - before) / result.requests * 1e6)
    finally:
        for process, _ in started.values():
            terminate(process)
        server.stop()
    for name, tree in trees.items():
        print(
            f"{name} {tree}: {[round(r) for r in rates[name]]}/s, median "
            f"{statistics.median(rates[name]):,.0f}/s, {statistics.median(cpu_us[name]):.1f} µs CPU"
        )
    print(f"B / A: {statistics.median(rates['B']) / statistics.median(rates['A']):.3f}")


if __name__ == "__main__":
    main()
