"""``python -m tests.console_screenshots``: docs/console-<page>.png, one per console page.

The state shown is made the way the service makes it: a Redis server of its own, the
sandbox HrFlow API, signed deliveries through the receiver, a live worker running the
built-in edit handler (one profile's edit answered 400 by the sandbox, so dead-lettered),
a reconciliation of the sandbox's source, and a few events left waiting in the queue.
The console is ``hrflow-webhooks console``; the browser is Debian's chromium, headless,
at a laptop's 1280 by 900.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from sandbox import JOHN_DOE_KEY, SAMPLE_SOURCE_KEY
from tests.console_fixtures import (
    ConsoleProcess,
    browser_log_in,
    chromium,
    console_settings,
    edit_registry,
    seed_service,
)
from tests.polling import eventually
from tests.processes import ROOT
from tests.redis_server import RedisServer
from tests.sandbox_fixtures import SandboxServer
from tests.service import enqueue, parsing_event
from workers.client import client_if_configured
from workers.reconcile import Reconciler
from workers.settings import create_worker

DOCS = ROOT / "docs"


def pages(john: Event, letter_id: str) -> dict[str, str]:
    return {
        "overview": "/",
        "events": f"/events?profile_key={JOHN_DOE_KEY}",
        "timeline": f"/events/{john.id}",
        "dead-letters": "/dead-letters",
        "dead-letter": f"/dead-letters/{letter_id}",
        "skips": "/skips",
        "unrouted": "/unrouted",
        "reconciliation": "/reconciliation",
    }


async def reconcile(settings: Settings, redis: Redis, http: aiohttp.ClientSession) -> None:
    client = client_if_configured(settings, http, redis)
    assert client is not None
    reconciler = Reconciler(redis, client, settings, edit_registry(settings))
    await reconciler.run([SAMPLE_SOURCE_KEY], None, "cli")


async def shoot(workdir: Path) -> list[Path]:
    redis_server = RedisServer(workdir / "redis")
    redis_server.start()
    try:
        async with SandboxServer() as sandbox, aiohttp.ClientSession() as http:
            settings = console_settings(sandbox, redis_server.url)
            redis = Redis.from_url(redis_server.url)
            await seed_service(settings, sandbox, http)
            await reconcile(settings, redis, http)
            # A live worker through the screenshots: its heartbeat is on the overview, and
            # the events left waiting for unknown profiles show as retries (404, in grace).
            worker = create_worker(settings, edit_registry(settings), handle_signals=False)
            running = asyncio.create_task(worker.main())
            keys = QueueKeys(settings.queue_name)
            await eventually(lambda: redis.exists(keys.workers), "the worker's heartbeat")
            [letter_id] = [m.decode() for m in await redis.zrange(keys.dead_letters, 0, -1)]
            await enqueue(settings, redis, *(parsing_event(f"waiting-{n}", "sk") for n in range(3)))
            john = Event.from_payload(parsing_event(JOHN_DOE_KEY, SAMPLE_SOURCE_KEY))
            try:
                return await asyncio.to_thread(_browse, settings, workdir, pages(john, letter_id))
            finally:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
                await worker.close()
                await redis.aclose()
    finally:
        redis_server.stop()


def _browse(settings: Settings, workdir: Path, paths: dict[str, str]) -> list[Path]:
    console = ConsoleProcess(settings)
    driver = chromium(workdir / "chromium-profile")
    try:
        browser_log_in(driver, console.url)
        saved = []
        for name, path in paths.items():
            driver.get(console.url + path)
            target = DOCS / f"console-{name}.png"
            driver.save_screenshot(str(target))
            saved.append(target)
        return saved
    finally:
        driver.quit()
        console.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        for path in asyncio.run(shoot(Path(workdir))):
            print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
