"""The event model and HrFlow's event names.

An :class:`Event` is what travels from the receiver to the workers. It behaves
as a read-only mapping over the payload HrFlow signed, so SDK-style callbacks
written as ``webhook_data["profile"]["key"]`` keep working, and it carries what
the SDK never had: a stable id, the canonical type, the time we received it,
its class and its subject.

HrFlow's webhooks are state-change notifications without an id or a timestamp,
so every event has a **class**:

- ``once``: ``*.success`` ("parsed/saved for the 1st time") and ``*.error``
  happen once per subject. A redelivery inside the dedup window is a duplicate.
- ``latest``: ``*.update`` and every type this table does not know announce
  that the subject's state changed. Two of them can be byte-identical and still
  mean two changes, so they are never dropped once handled: a new one runs again.

The **subject** is what the event is about (``profile/<source key>/key:<key>``,
``job/<board key>/key:<key>``, by reference when there is no key, or the event
itself when the payload names nothing). Runs for one subject never overlap.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

_STEPS = ("parsing", "storing", "searching", "scoring", "revealing", "reasoning", "embedding")
_STATUSES = ("success", "update", "error")

CURRENT_EVENT_NAMES: frozenset[str] = frozenset(
    {
        f"{obj}.{step}.{status}"
        for obj in ("profile", "job")
        for step in _STEPS
        for status in _STATUSES
    }
    | {f"action.{step}.{status}" for step in ("stage", "rating") for status in ("success", "error")}
    | {f"agent.{step}.{status}" for step in ("training", "scoring") for status in _STATUSES}
)

# Older names HrFlow (and its Python SDK v4) still uses, mapped to today's names.
LEGACY_STEP_NAMES: Mapping[str, str] = {
    "profile.parse": "profile.parsing",
    "profile.indexing": "profile.storing",
    "profile.score": "profile.scoring",
    "job.parse": "job.parsing",
    "job.indexing": "job.storing",
    "job.score": "job.scoring",
    "job.train": "agent.training",
}
_LEGACY_STATUSES = (*_STATUSES, "start")
LEGACY_EVENT_NAMES: Mapping[str, str] = {
    f"{old}.{status}": f"{new}.{status}"
    for old, new in LEGACY_STEP_NAMES.items()
    for status in _LEGACY_STATUSES
}
KNOWN_EVENT_NAMES: frozenset[str] = CURRENT_EVENT_NAMES | frozenset(LEGACY_EVENT_NAMES)


EventClass = Literal["once", "latest"]
ONCE: EventClass = "once"
LATEST: EventClass = "latest"
_ONCE_STATUSES = ("success", "error")


ONCE_EVENT_NAMES: frozenset[str] = frozenset(
    name for name in CURRENT_EVENT_NAMES if name.endswith(_ONCE_STATUSES)
)


def event_class_of(canonical_type: str) -> EventClass:
    """``once`` for today's ``*.success`` and ``*.error``; ``latest`` for the rest, unknown too.

    An unknown type is ``latest`` because that is the safe side: a notification
    we cannot classify is run again rather than dropped as a duplicate.
    """
    return ONCE if canonical_type in ONCE_EVENT_NAMES else LATEST


class UnknownEventNameError(ValueError):
    """A handler was registered for a name HrFlow never sends."""


def canonical_event_name(name: str) -> str:
    """Today's name for ``name``; unknown names are kept as sent (they may gain a handler)."""
    return LEGACY_EVENT_NAMES.get(name, name)


def checked_event_name(name: str) -> str:
    """The canonical name of a known event, or an error that suggests the closest names."""
    if name in KNOWN_EVENT_NAMES:
        return canonical_event_name(name)
    close = difflib.get_close_matches(name, sorted(KNOWN_EVENT_NAMES), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownEventNameError(
        f"{name!r} is not an HrFlow event name (expected '<object>.<step>.<status>' such as "
        f"'profile.parsing.success'){hint} Pass allow_unknown=True to register it anyway."
    )


def event_id_of(payload: Mapping[str, Any]) -> str:
    """A stable id: the sha256 of the event's canonical JSON (sorted keys, no spaces).

    The same event signed by any scheme, with any key order or whitespace, has
    one id, which is what deduplication and replay protection need.
    """
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# Per object kind: its container (a profile's source, a job's board) and the older senders'
# field names for its key, reference and container key.
_KINDS = (
    ("profile", "source", "profile_key", "profile_reference", "source_key"),
    ("job", "board", "job_key", "job_reference", "board_key"),
)


def _container_key(obj: Mapping[str, Any], container: str, legacy: str) -> str | None:
    nested = obj.get(container)
    found = nested.get("key") if isinstance(nested, Mapping) else None
    return _text(found) or _text(obj.get(legacy))


def source_key_of(payload: Mapping[str, Any]) -> str | None:
    """The profile's source key (or the job's board key), wherever this sender put it.

    Current senders: ``profile.source.key``; older ones ``profile.source_key`` or a
    top-level ``source.key``.
    """
    for kind, container, _, _, legacy in _KINDS:
        obj = payload.get(kind)
        found = _container_key(obj, container, legacy) if isinstance(obj, Mapping) else None
        if found:
            return found
    return _text(_mapping(payload.get("source")).get("key"))


def profile_subject(source_key: str, profile_key: str) -> str:
    """The subject of a profile event that names its key (the reconciler builds it too)."""
    return f"profile/{source_key}/key:{profile_key}"


def profile_subject_parts(subject: str) -> tuple[str, str] | None:
    """(source key, profile key) of a profile subject by key; None for any other subject."""
    kind, _, rest = subject.partition("/")
    source_key, found, profile_key = rest.partition("/key:")
    if kind != "profile" or not found or not source_key or not profile_key:
        return None
    return source_key, profile_key


def subject_of(payload: Mapping[str, Any], event_id: str) -> str:
    """What the event is about: by key, else by reference, else the event itself."""
    profile = payload.get("profile")
    if type(profile) is dict:  # today's senders, on the receiver's hot path: one look
        key, source = profile.get("key"), profile.get("source")
        source_key = source.get("key") if type(source) is dict else None
        if type(key) is str and key and type(source_key) is str and source_key:
            return profile_subject(source_key, key)
    return _subject_of_any_shape(payload, event_id)


def _subject_of_any_shape(payload: Mapping[str, Any], event_id: str) -> str:
    for kind, container, legacy_key, legacy_reference, legacy_container in _KINDS:
        obj = payload.get(kind)
        if not isinstance(obj, Mapping):
            continue
        key = _text(obj.get("key")) or _text(obj.get(legacy_key))
        name = f"key:{key}" if key else None
        if name is None:
            reference = _text(obj.get("reference")) or _text(obj.get(legacy_reference))
            name = f"reference:{reference}" if reference else None
        if name is not None:
            source = _container_key(obj, container, legacy_container) or source_key_of(payload)
            return f"{kind}/{source or ''}/{name}"
    return f"event/{event_id}"


@dataclass(frozen=True, slots=True)
class Event(Mapping[str, Any]):
    id: str
    type: str
    canonical_type: str
    payload: Mapping[str, Any] = field(repr=False)
    received_at: float

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], received_at: float | None = None) -> Event:
        event_type = str(payload["type"])
        return cls(
            id=event_id_of(payload),
            type=event_type,
            canonical_type=canonical_event_name(event_type),
            payload=payload,
            received_at=time.time() if received_at is None else received_at,
        )

    # Derived, not stored: the receiver's hot path builds an Event per delivery, and the
    # queue's job carries only what cannot be derived.
    @property
    def event_class(self) -> EventClass:
        return event_class_of(self.canonical_type)

    @property
    def subject(self) -> str:
        return subject_of(self.payload, self.id)

    @property
    def source_key(self) -> str | None:
        return source_key_of(self.payload)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "canonical_type": self.canonical_type,
            "payload": self.payload,
            "received_at": self.received_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        return cls(
            id=data["id"],
            type=data["type"],
            canonical_type=data["canonical_type"],
            payload=data["payload"],
            received_at=data["received_at"],
        )

    # Mapping over the payload, so SDK-style callbacks read it like the SDK's dict.
    def __getitem__(self, key: str) -> Any:
        return self.payload[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.payload)

    def __len__(self) -> int:
        return len(self.payload)

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and other.id == self.id
