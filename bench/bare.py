"""P1's baseline: the least a Starlette endpoint can do with a webhook, read the body, answer 202."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def receive(request: Request) -> Response:
    await request.body()
    return Response(status_code=202)


app = Starlette(routes=[Route("/webhook", receive, methods=["POST"])])
