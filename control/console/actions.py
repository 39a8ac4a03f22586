"""The console's actions (POST): log in and out, replay and purge dead letters.

Each answers with a redirect (303) to a page that shows the result, so reloading that page
never repeats the action. Replays go through ``DeadLetters.replay``, the CLI's path: one
script claims the letter and queues its run, so two operators clicking at once replay once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from control.console import readings
from control.console.access import (
    COOKIE_NAME,
    SESSION_LIFETIME_S,
    Access,
    new_session_cookie,
    safe_next,
    session_ends_at,
    token_is_valid,
)
from control.console.filters import FilterError, letter_filter
from control.console.guard import (
    FormError,
    client_of,
    is_foreign,
    live_access,
    login_required,
    read_form,
    refused,
    served_over_https,
    throttle_of,
    token_of,
    told_to_wait,
    wrong_token,
)
from control.console.pages import notice_of, stores_of
from control.console.rendering import query, render


def _to(path: str, **params: str | int) -> RedirectResponse:
    suffix = f"?{query(params)}" if params else ""
    return RedirectResponse(path + suffix, status_code=303)


# --- logging in and out -----------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    if await live_access(request) is not None:
        return _to(safe_next(request.query_params.get("next")))
    next_path = safe_next(request.query_params.get("next"))
    context = {"next": next_path, "message": None, "notice": notice_of(request)}
    return render(request, "login.html", context, None)


async def login(request: Request) -> Response:
    if is_foreign(request):
        return refused(request, None, "this login came from another site's page")
    if (waiting := told_to_wait(request)) is not None:
        return waiting
    try:
        form = await read_form(request)
    except FormError as error:
        return refused(request, None, error.reason, error.status)
    if not token_is_valid(token_of(request), form.get("token", "")):
        wrong_token(request)
        return login_required(request, "That token is not the console's.")
    throttle_of(request).succeeded(client_of(request))
    response = _to(safe_next(form.get("next")))
    response.set_cookie(
        COOKIE_NAME,
        new_session_cookie(token_of(request), time.time()),
        max_age=SESSION_LIFETIME_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=served_over_https(request),  # plain http on loopback would drop it
    )
    return response


async def logout(request: Request, access: Access, form: Mapping[str, str]) -> Response:
    if access.session is not None:  # a Bearer request has no session to end
        cookie = request.cookies[COOKIE_NAME]
        remaining_s = math.ceil(session_ends_at(cookie) - time.time())
        stores = stores_of(request)
        if remaining_s > 0:
            await stores.redis.set(stores.keys.console_revoked(access.session), 1, ex=remaining_s)
    response = _to("/login", notice="logged-out")
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


# --- dead letters -----------------------------------------------------------------------------


async def replay_one(request: Request, access: Access, form: Mapping[str, str]) -> Response:
    stores = stores_of(request)
    row = await readings.letter(stores, request.path_params["letter_id"])
    if row is None or not await stores.letters.replay(row.id):
        return _to("/dead-letters", notice="replay-gone")
    return _to(f"/events/{row.event_id}", notice="replayed")


async def replay_matching(request: Request, access: Access, form: Mapping[str, str]) -> Response:
    stores = stores_of(request)
    try:
        where = letter_filter(form)
    except FilterError as error:
        return refused(request, access, str(error), 400)
    rows = await readings.letter_rows(stores, where, None)
    replayed = [row.id for row in rows if await stores.letters.replay(row.id)]
    return _to("/dead-letters", notice="replayed-all", count=len(replayed))


async def purge(request: Request, access: Access, form: Mapping[str, str]) -> Response:
    if form.get("confirm") != "yes":
        return refused(request, access, "tick the box to confirm the purge", 400)
    purged = await stores_of(request).letters.purge(request.path_params["letter_id"])
    return _to("/dead-letters", notice="purged" if purged else "purge-gone")
