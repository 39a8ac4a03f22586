"""The console as a Starlette app, built from explicit lists: routes, middleware, lifespan.

What each route requires is read in its line: ``page(...)`` needs access (a Bearer token or
a session cookie), ``action(...)`` also a same-origin form with the session's CSRF token.
Only ``/login``, ``/healthz`` and ``/static`` are open, and they show no data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from control.console import actions, pages
from control.console.guard import SecurityHeaders, action, page
from control.console.readings import Stores
from control.console.rendering import STATIC_DIR
from control.console.throttle import LoginThrottle
from hrflow_webhooks.redis_setup import connect_redis
from hrflow_webhooks.settings import Settings


def routes() -> list[BaseRoute]:
    return [
        Route("/", page(pages.overview), name="overview"),
        Route("/events", page(pages.events), name="events"),
        Route("/events/{event_id}", page(pages.timeline), name="timeline"),
        Route("/dead-letters", page(pages.dead_letters), name="dead-letters"),
        Route("/dead-letters/replay-matching", action(actions.replay_matching), methods=["POST"]),
        Route("/dead-letters/{letter_id}", page(pages.dead_letter), name="dead-letter"),
        Route("/dead-letters/{letter_id}/replay", action(actions.replay_one), methods=["POST"]),
        Route("/dead-letters/{letter_id}/purge", action(actions.purge), methods=["POST"]),
        Route("/skips", page(pages.skips), name="skips"),
        Route("/unrouted", page(pages.unrouted), name="unrouted"),
        Route("/reconciliation", page(pages.reconciliation), name="reconciliation"),
        Route("/login", actions.login_page, name="login"),
        Route("/login", actions.login, methods=["POST"]),
        Route("/logout", action(actions.logout), methods=["POST"]),
        Route("/healthz", pages.healthz),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]


def create_app(settings: Settings, token: str) -> Starlette:
    """The console over the Redis ``settings`` name, opened to ``token`` only."""
    if not token:
        raise ValueError("the console needs a token (control.console.serve decides it)")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        redis = connect_redis(settings)
        try:
            yield {"stores": Stores.over(redis, settings)}
        finally:
            await redis.aclose()

    app = Starlette(routes=routes(), middleware=[Middleware(SecurityHeaders)], lifespan=lifespan)
    app.state.token = token
    app.state.origin = settings.console_origin
    app.state.login_throttle = LoginThrottle()
    return app
