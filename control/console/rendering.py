"""Templates: one Jinja2 environment with autoescape on for every template, and the few
filters the pages share (times in UTC, ages, counts).

Data is never marked safe: whatever a dead letter or the log holds is escaped.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from control.console.access import CSRF_FIELD, Access

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"

NAVIGATION = (
    ("overview", "/", "Overview"),
    ("events", "/events", "Events"),
    ("dead-letters", "/dead-letters", "Dead letters"),
    ("skips", "/skips", "Skips"),
    ("unrouted", "/unrouted", "Unrouted types"),
    ("reconciliation", "/reconciliation", "Reconciliation"),
)


def utc(epoch_s: float | None) -> str:
    if epoch_s is None:
        return "-"
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float | None) -> str:
    """A duration people read at a glance: 0.4 s, 42 s, 12 min, 3.5 h, 2.0 d."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7_200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3_600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def megabytes(size: int) -> str:
    return f"{size / 1_048_576:.1f} MB"


def query(params: Mapping[str, Any]) -> str:
    """A link's query string from the non-empty parameters."""
    return urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the page, not blank output
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters |= {"utc": utc, "age": age, "megabytes": megabytes, "query": query}
    env.globals |= {"navigation": NAVIGATION, "csrf_field": CSRF_FIELD}
    return env


TEMPLATES = Jinja2Templates(env=environment())


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any],
    access: Access | None,
    status: int = 200,
) -> Response:
    """A page; ``access`` gives its forms their CSRF token and shows the logout button."""
    full = {"access": access, "section": context.get("section", ""), "notice": None, **context}
    return TEMPLATES.TemplateResponse(request, template, full, status_code=status)
