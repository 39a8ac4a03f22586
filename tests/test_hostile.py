"""Hostile clients against the deployed command line (the Procfile's web line, default
settings, an open-file limit of 1,024), while signed deliveries flow at a steady rate.

Each attack (bench/attacks.py) runs for the whole stream: giant headers, idle
connections, slowloris and stalled bodies each past the file-descriptor limit, and a
flood of megabyte-sized requests with a bad signature. Every good delivery must get its
202 and be queued, and the receiver's memory must stay bounded. Run by
``make test-faults``; bench row P6 measures the same scenarios as ratios.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bench.attacks import (
    ATTACKS,
    GoodTraffic,
    deployed_receiver,
    good_deliveries,
    peak_rss_bytes,
    under_attack,
    until_answering,
)
from tests.redis_server import RedisServer, free_port
from tests.service import WEBHOOK_SECRET

pytestmark = pytest.mark.slow

GOOD_RATE_PER_S = 20
GOOD_SECONDS = 8
PEAK_RSS_LIMIT_BYTES = 300 * 1_048_576  # the receiver idles at ~50 MB


@pytest.fixture(autouse=True, scope="module")
def room_for_the_attackers() -> None:
    """1,100 attacking connections need more descriptors in this process than the receiver's."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8_192 and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65_536), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 2 * 1_100


@pytest.mark.parametrize("attack", [None, *ATTACKS])
async def test_good_deliveries_all_get_202_and_are_queued_under_attack(
    attack: str | None, tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        log_path = tmp_path / "receiver.log"
        with deployed_receiver(redis_server.url, WEBHOOK_SECRET, port, log_path) as receiver:
            async with Redis.from_url(redis_server.url) as redis:
                await until_answering(f"{url}/webhook", WEBHOOK_SECRET)
                await redis.flushall()

                async def good() -> GoodTraffic:
                    return await good_deliveries(
                        f"{url}/webhook", WEBHOOK_SECRET, GOOD_RATE_PER_S, GOOD_SECONDS, "good"
                    )

                chosen = ATTACKS[attack] if attack else None
                traffic = await under_attack(chosen, "127.0.0.1", port, good)
                queued = await redis.zcard("hrflow:queue")
            peak = peak_rss_bytes(receiver.pid)
            assert receiver.poll() is None, "the receiver died"
        log = log_path.read_text(errors="replace")
        rejection_lines = [line for line in log.splitlines() if '"rejected request' in line]
        statuses = {status: traffic.statuses.count(status) for status in set(traffic.statuses)}
        print(
            f"\n{attack or 'no attack'}: {len(traffic.statuses)} good deliveries, statuses "
            f"{statuses}, queued {queued}, receiver peak RSS "
            f"{peak / 1_048_576:.0f} MB, {len(rejection_lines)} log lines about rejections"
        )
        assert traffic.statuses == [202] * GOOD_RATE_PER_S * GOOD_SECONDS
        assert queued == len(traffic.event_keys)
        assert peak < PEAK_RSS_LIMIT_BYTES
        # One line, then one summary per 10 s: the attack runs ~10 s.
        assert len(rejection_lines) <= 4, "rejections must be logged at a bounded rate"
    finally:
        redis_server.kill()
