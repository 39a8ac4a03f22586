"""The console's search and filter forms, read into the stores' own query objects.

Times are what the CLI accepts (``2h``, ``30m``, ``1d`` ago, or ISO 8601, UTC when no zone):
one parser, ``control.cli.parse_since``, so the page and the terminal agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import typer

from control.cli import parse_since
from control.console.readings import LetterFilter
from hrflow_webhooks.event_log import LogQuery

SEARCH_LIMIT_MAX = 500
SEARCH_LIMIT_DEFAULT = 100
KINDS = ("delivery", "run", "handler", "replay")
OUTCOMES = (
    "queued", "coalesced", "duplicate",  # delivery (and replay: queued)
    "done", "dead_lettered", "skipped", "unrouted", "retry",  # run
    "ok", "failed", "skip", "dead",  # handler (and retry)
)  # fmt: skip


class FilterError(ValueError):
    """A field people typed that cannot be read; the message names it."""


@dataclass(frozen=True, slots=True)
class SearchForm:
    """The search form as typed, to show it back, and the query it stands for."""

    fields: Mapping[str, str]
    query: LogQuery
    filtered: bool  # any filter given (else: the latest entries)


def _field(params: Mapping[str, str], name: str) -> str | None:
    return (params.get(name) or "").strip() or None


LATEST_S = 86_400.0  # a search "until tomorrow" is fine; centuries ahead are not times


def is_number(value: str) -> bool:
    """Decimal ASCII digits only: str.isdigit() also accepts '²', which int() refuses."""
    return value.isascii() and value.isdigit()


def moment(params: Mapping[str, str], name: str) -> float | None:
    value = _field(params, name)
    if value is None:
        return None
    try:
        at = parse_since(value, time.time())
    except (typer.BadParameter, OverflowError, ValueError):
        raise FilterError(f"{name}: {value!r} is neither a duration (2h) nor ISO 8601") from None
    # The log's ids are milliseconds since 1970: a time outside them is no time to search.
    if not math.isfinite(at) or not 0 <= at <= time.time() + LATEST_S:
        raise FilterError(f"{name}: {value!r} is outside the event log's times")
    return at


def _limit(params: Mapping[str, str]) -> int:
    value = _field(params, "limit")
    if value is None:
        return SEARCH_LIMIT_DEFAULT
    if not is_number(value) or not 1 <= int(value) <= SEARCH_LIMIT_MAX:
        raise FilterError(f"limit: a number from 1 to {SEARCH_LIMIT_MAX}")
    return int(value)


def _choice(params: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    value = _field(params, name)
    if value is not None and value not in allowed:
        raise FilterError(f"{name}: one of {', '.join(allowed)}")
    return value


SEARCH_FIELDS = ("event_id", "profile_key", "type", "outcome", "kind", "since", "until", "limit")


def search_form(params: Mapping[str, str]) -> SearchForm:
    fields = {name: params.get(name, "") for name in SEARCH_FIELDS}
    query = LogQuery(
        event_id=_field(params, "event_id"),
        profile_key=_field(params, "profile_key"),
        type=_field(params, "type"),
        outcome=_choice(params, "outcome", OUTCOMES),
        kind=_choice(params, "kind", KINDS),
        since=moment(params, "since"),
        until=moment(params, "until"),
        limit=_limit(params),
    )
    filtered = any(fields[name] for name in SEARCH_FIELDS if name != "limit")
    return SearchForm(fields, query, filtered)


LETTER_FIELDS = ("type", "handler", "since")


def letter_filter(params: Mapping[str, str]) -> LetterFilter:
    return LetterFilter(
        type=_field(params, "type"),
        handler=_field(params, "handler"),
        since=moment(params, "since"),
    )
