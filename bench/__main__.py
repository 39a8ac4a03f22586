"""``python -m bench``: run the rows of issue 7 and record the result.

``--smoke`` is the short CI mode (about a minute; its figures are indicative
only). A full run of every row also rewrites docs/benchmarks.md and
docs/benchmarks.png unless ``--no-docs``. Results go to bench/results/
(gitignored) as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from redis import Redis

from bench import console_rows, ha_rows, hostile_rows, rows
from bench.procs import processes

RESULTS = Path(__file__).with_name("results")
ROWS = ("P1", "P5", "P3", "P4", "P2", "P6", "P8", "P7")


def run(config: rows.Config, selected: set[str], log_level: str | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with processes(config.work_dir, log_level) as procs:
        redis = Redis.from_url(procs.start_redis().url)
        if "P1" in selected:
            results["P1"] = rows.p1_ingest(procs, redis, config)
        if "P5" in selected:
            results["P5"] = rows.p5_scale_out(procs, redis, config)
        if "P3" in selected:
            results["P3"] = rows.p3_latency(procs, redis, config)
        if "P4" in selected:
            results["P4"] = rows.p4_memory(procs, redis, config)
        if "P2" in selected:
            results["P2"] = p2_or_skip(procs, redis, config)
        if "P6" in selected:
            redis.flushall()
            results["P6"] = hostile_rows.p6_hostile(procs, config)
        if "P8" in selected:
            results["P8"] = console_rows.p8_console_search(procs, redis, config)
        if "P7" in selected:  # last: it attaches a replica for a while
            redis.flushall()
            results["P7"] = ha_rows.p7_availability(procs, redis, config)
        redis.close()
    return results


def p2_or_skip(procs: Any, redis: Redis, config: rows.Config) -> dict[str, Any]:
    if importlib.util.find_spec("sandbox.__main__") is None:
        return {"skipped": "the sandbox HrFlow API (python -m sandbox) is not installed yet"}
    from bench import handled_rows  # needs the sandbox and the edit handler

    return handled_rows.p2_edit(procs, redis, config)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="short CI run (about a minute)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated, e.g. P1,P5")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.*")
    parser.add_argument(
        "--log-level",
        default=None,
        help="log level of the measured processes (default: the deployed default, INFO)",
    )
    args = parser.parse_args()
    selected = {row.strip().upper() for row in args.rows.split(",")}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hrflow-bench-") as work:
        config = rows.Config(smoke=args.smoke, work_dir=Path(work))
        results = run(config, selected, args.log_level)
    record: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else "full",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": round(time.monotonic() - started, 1),
        "rows": results,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = record["when"].replace(":", "")
    complete = selected >= set(ROWS)
    latest = (
        f"latest-{record['mode']}.json" if complete else f"latest-{record['mode']}-partial.json"
    )
    for name in (f"{record['mode']}-{stamp}.json", latest):
        (RESULTS / name).write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
    # The docs show one complete run: a smoke run or a subset of rows does not replace it.
    if not args.smoke and not args.no_docs and complete:
        from bench.report import write_docs  # matplotlib only when there is a plot to draw

        write_docs(record)


if __name__ == "__main__":
    main()
