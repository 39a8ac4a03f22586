"""A fake HrFlow listing on loopback, for what the sandbox never answers: dates in the far
future or missing, pages that never run out, a page far longer than asked for, a ``meta``
that is not numbers. Each test says what each page holds; the server records the pages it
served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from hrflow_client import HrflowClient
from hrflow_webhooks.settings import Settings
from tests.sandbox_fixtures import LoopbackServer
from tests.service import make_settings

API_KEY, API_USER = "hostile-key", "hostile@example.com"
# (page, limit asked) -> the answer's "data" and "meta"
Pages = Callable[[int, int], Mapping[str, Any]]


def stamp(epoch_s: float) -> str:
    """HrFlow's updated_at format."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(epoch_s))


def listed(key: str, updated_at: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {"key": key, "reference": None, "source": {"key": "any"}}
    if updated_at is not None:
        item["updated_at"] = updated_at
    return item


def page_of(items: list[dict[str, Any]], page: int = 1, max_page: int = 1) -> dict[str, Any]:
    meta = {"page": page, "maxPage": max_page, "count": len(items), "total": len(items)}
    return {"data": items, "meta": meta}


def fresh_page(count: int, prefix: str = "fresh") -> dict[str, Any]:
    """One page of ``count`` profiles changed now, and no page after it."""
    now = stamp(time.time())
    return page_of([listed(f"{prefix}-{n}", now) for n in range(count)])


def endless(page: int, limit: int) -> Mapping[str, Any]:
    """Always another full page of fresh profiles, and always more pages to come."""
    now = stamp(time.time())
    items = [listed(f"endless-{page}-{n}", now) for n in range(limit)]
    return page_of(items, page, max_page=page + 1)


class HostileListing(LoopbackServer):
    def __init__(self, pages: Pages, delay_s: float = 0.0, most_pages: int | None = None):
        """``most_pages``: after serving that many, answer 503 (a listing that misbehaves
        without end would otherwise keep today's code, and its test, going forever)."""
        self.pages = pages
        self.delay_s = delay_s
        self.most_pages = most_pages
        self.served: list[int] = []
        self.limits: list[int] = []
        app = web.Application()
        app.router.add_get("/v1/storing/profiles", self._list)
        super().__init__(app)

    async def _list(self, request: web.Request) -> web.Response:
        if self.most_pages is not None and len(self.served) >= self.most_pages:
            return web.json_response({"code": 503, "message": "enough"}, status=503)
        page, limit = int(request.query["page"]), int(request.query["limit"])
        self.served.append(page)
        self.limits.append(limit)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        body = {"code": 200, "message": "List of profiles", **self.pages(page, limit)}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def client(self, http: aiohttp.ClientSession) -> HrflowClient:
        return HrflowClient(http, self.api_url, API_KEY, API_USER)

    def settings(self, redis_url: str, **overrides: Any) -> Settings:
        values = {"api_url": self.api_url, "api_key": API_KEY, "api_user": API_USER}
        return make_settings(redis_url, **{**values, **overrides})
