"""The operator console: a web app, on its own port, to see what happened to every event and
replay what failed. ``hrflow-webhooks console`` serves it; docs/console.md describes it.

Modules: ``app`` (routes, middleware, lifespan), ``access`` (token, session cookie, CSRF:
pure functions), ``guard`` (the wrappers and headers every route goes through), ``pages``
and ``actions`` (GET and POST endpoints), ``readings`` (what pages show, read from Redis),
``filters`` (search forms), ``chart`` (the overview's SVG bars), ``rendering`` (Jinja2),
``serve`` (start-up rules and uvicorn).
"""

from __future__ import annotations

from control.console.app import create_app

__all__ = ["create_app"]
