"""The console's pages (GET): read, shape, render. Nothing here writes to Redis."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from control.console import readings
from control.console.access import Access
from control.console.filters import (
    KINDS,
    LETTER_FIELDS,
    OUTCOMES,
    SEARCH_FIELDS,
    FilterError,
    is_number,
    letter_filter,
    search_form,
)
from control.console.readings import Stores
from control.console.rendering import render

# Sentences for the notices actions redirect with: a fixed set, so a crafted link cannot
# make the console say anything else.
NOTICES = {
    "replayed": "Replay queued: the timeline below shows it; a worker runs it next.",
    "replayed-all": "Replays queued.",
    "replay-gone": "Nothing replayed: that dead letter was already replayed or purged.",
    "purged": "Dead letter purged.",
    "purge-gone": "Nothing purged: that dead letter was already gone.",
    "logged-out": "Logged out.",
}


def stores_of(request: Request) -> Stores:
    stores: Stores = request.state.stores
    return stores


def notice_of(request: Request) -> str | None:
    notice = NOTICES.get(request.query_params.get("notice", ""))
    count = request.query_params.get("count", "")
    if notice is not None and is_number(count):
        notice = f"{notice} ({int(count)})"
    return notice


def _page(
    request: Request, access: Access, template: str, section: str, **context: Any
) -> Response:
    full = {"section": section, "notice": notice_of(request), **context}
    return render(request, template, full, access)


async def healthz(request: Request) -> Response:
    """For `hrflow-webhooks run`'s readiness probe: says nothing about the service."""
    return PlainTextResponse("ok")


async def overview(request: Request, access: Access) -> Response:
    data = await readings.overview(stores_of(request))
    return _page(request, access, "overview.html", "overview", data=data, now=time.time())


async def events(request: Request, access: Access) -> Response:
    params = dict(request.query_params)
    fields = {name: params.get(name, "") for name in SEARCH_FIELDS}
    entries, error, filtered = [], None, True
    try:
        form = search_form(params)
    except FilterError as problem:
        error = str(problem)
    else:
        async with stores_of(request).scan_log() as log:
            entries, filtered = await log.search(form.query), form.filtered
    return _page(
        request, access, "events.html", "events", kinds=KINDS, outcomes=OUTCOMES,
        fields=fields, entries=entries, filtered=filtered, error=error,
    )  # fmt: skip


async def timeline(request: Request, access: Access) -> Response:
    event_id = request.path_params["event_id"]
    async with stores_of(request).scan_log() as log:
        entries = await log.timeline(event_id)
    return _page(request, access, "timeline.html", "events", event_id=event_id, entries=entries)


async def dead_letters(request: Request, access: Access) -> Response:
    params = {name: request.query_params.get(name, "") for name in LETTER_FIELDS}
    stores = stores_of(request)
    try:
        where = letter_filter(params)
    except FilterError as error:
        return _page(
            request,
            access,
            "dead_letters.html",
            "dead-letters",
            rows=[],
            total=0,
            fields=params,
            error=str(error),
            shown=0,
        )
    rows = await readings.letter_rows(stores, where, None)
    shown = rows[: readings.LETTERS_SHOWN]
    return _page(
        request,
        access,
        "dead_letters.html",
        "dead-letters",
        rows=shown,
        total=len(rows),
        fields=params,
        error=None,
        shown=len(shown),
    )


async def dead_letter(request: Request, access: Access) -> Response:
    row = await readings.letter(stores_of(request), request.path_params["letter_id"])
    if row is None:
        context = {"section": "dead-letters", "reason": "No such dead letter (replayed or purged?)"}
        return render(request, "error.html", context, access, status=404)
    return _page(request, access, "dead_letter.html", "dead-letters", row=row)


async def skips(request: Request, access: Access) -> Response:
    rows = await readings.skips(stores_of(request))
    return _page(request, access, "skips.html", "skips", rows=rows)


async def unrouted(request: Request, access: Access) -> Response:
    rows = await readings.unrouted(stores_of(request))
    return _page(request, access, "unrouted.html", "unrouted", rows=rows)


async def reconciliation(request: Request, access: Access) -> Response:
    runs = await stores_of(request).log.reconcile_runs()
    sources = stores_of(request).settings.reconcile_sources
    return _page(
        request, access, "reconciliation.html", "reconciliation", runs=runs, sources=sources
    )
