"""Signed payload bytes → events. Pure: no I/O, one typed error with a reason."""

from __future__ import annotations

from typing import Any

import orjson

from hrflow_webhooks.events import Event

MAX_EVENTS_PER_DELIVERY = 1_000
# HrFlow's names are a few dozen ASCII characters; a type is logged and counted by name.
MAX_TYPE_CHARS = 128
TOO_DEEP = "signed payload nests too deep to be queued (orjson writes at most 255 levels)"


class BadPayloadError(ValueError):
    """The signature is valid but the payload is not one event or an array of events."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _checked_event(item: Any, position: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise BadPayloadError(f"{position} is not a JSON object")
    event_type = item.get("type")
    if not isinstance(event_type, str) or not event_type.strip():
        raise BadPayloadError(f"{position} has no 'type' string")
    if len(event_type) > MAX_TYPE_CHARS or not (event_type.isascii() and event_type.isprintable()):
        raise BadPayloadError(
            f"{position} has a 'type' that is not printable ASCII of at most {MAX_TYPE_CHARS} "
            "characters"
        )
    return item


def _events(items: list[Any], received_at: float, single: bool) -> list[Event]:
    try:
        return [
            Event.from_payload(
                _checked_event(item, "payload" if single else f"element {i}"), received_at
            )
            for i, item in enumerate(items)
        ]
    except orjson.JSONEncodeError:
        # orjson reads 1,024 levels of nesting but writes 255: the event id (and the queued
        # job) could not be written, so the payload cannot be queued.
        raise BadPayloadError(TOO_DEEP) from None


def decode_events(payload: bytes, received_at: float) -> list[Event]:
    """One JSON object, or an array of them, each with a ``type``."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadPayloadError("signed payload is not valid JSON") from None
    if isinstance(data, dict):
        return _events([data], received_at, single=True)
    if not isinstance(data, list):
        raise BadPayloadError("signed payload is neither a JSON object nor an array of objects")
    if not data:
        raise BadPayloadError("signed payload is an empty array")
    if len(data) > MAX_EVENTS_PER_DELIVERY:
        raise BadPayloadError(f"more than {MAX_EVENTS_PER_DELIVERY} events in one delivery")
    return _events(data, received_at, single=False)
