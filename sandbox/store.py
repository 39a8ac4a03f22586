"""The sandbox's in-memory profiles, stored the way HrFlow answers them (the read shape).

Writes arrive in the write shape (dates as ``{"iso8601": ...}``) and are stored
as HrFlow would return them: dates as strings, server fields added (``id``,
``key``, the ``source`` object, timestamps, experience/education ``key``,
location ``gmaps``/``fields``). A PUT replaces each top-level field it sends.

Timestamps. ``created_at``/``updated_at``/``archive`` are emitted as GET emits them,
``2020-07-29T11:45:37+0000``: whole seconds, however they were written (a written
``created_at`` such as ``2020-07-29T11:45:37Z`` is normalised). Behind them the store keeps
nanoseconds from a clock that never repeats or goes back, so the listing's sort by
``updated_at`` orders two writes of the same second in the order they happened: a test can
PUT and at once find that profile first, which whole seconds alone could not promise.

Archiving keeps the profile: it stays readable by key or reference, with ``archive``
set to when it was archived (``null`` again once unarchived), and its reference stays
taken. Only the listing leaves archived profiles out (see :meth:`ProfileStore.page`).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from sandbox.samples import SAMPLE_SOURCE_KEY, SAMPLES

_COMPUTED_LOCATION = {"gmaps": None, "fields": None}


class DuplicateReferenceError(ValueError):
    """A source already holds a profile with this reference."""


_NS = 1_000_000_000
_DAY_NS = 86_400 * _NS
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def stamp(ns: int) -> str:
    """A time as HrFlow's GET answers carry it: whole seconds, ``+0000``."""
    moment = _EPOCH + timedelta(microseconds=ns // 1000)
    return moment.isoformat(timespec="seconds").removesuffix("+00:00") + "+0000"


def _written_time(value: Any) -> int | None:
    """A written ``created_at`` (any ISO 8601 form; no zone means UTC) in ns, or None
    when it does not parse or falls outside years 1 to 9999 once in UTC."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    return (moment - _EPOCH) // _MICROSECOND * 1000  # exact, before 1970 too


def day_start(day: date) -> int:
    """Midnight UTC starting ``day``, in ns."""
    return (day - _EPOCH.date()).days * _DAY_NS


class _Clock:
    """Wall-clock nanoseconds, strictly increasing: two writes never share a time, and a
    clock stepped back (NTP) cannot reorder later writes before earlier ones."""

    def __init__(self) -> None:
        self._last = 0

    def now(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        return self._last


@dataclass(slots=True)
class _Times:
    created: int
    updated: int


@dataclass(frozen=True, slots=True)
class ListQuery:
    """``GET /v1/storing/profiles``'s parameters, checked (:func:`sandbox.app.list_query`)."""

    source_keys: tuple[str, ...]
    key: str | None = None
    reference: str | None = None
    page: int = 1
    limit: int = 30
    sort_by: Literal["created_at", "updated_at"] = "created_at"
    descending: bool = True
    created_min: date | None = None
    created_max: date | None = None


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page and the ``meta`` HrFlow sends with it (``max_page`` is 0 when nothing
    matches: there is no page to fetch)."""

    profiles: list[dict[str, Any]]  # copies: the caller may trim them
    page: int
    max_page: int
    total: int


def _location(location: Any) -> Any:
    if not isinstance(location, dict):
        return location
    return {"text": None, "lat": None, "lng": None, **location, **_COMPUTED_LOCATION}


def _date(value: Any) -> Any:
    return value.get("iso8601") if isinstance(value, dict) else value


def _period(period: dict[str, Any]) -> dict[str, Any]:
    stored = dict(period)
    stored["key"] = hashlib.sha1(repr(sorted(period.items())).encode()).hexdigest()  # noqa: S324
    stored["date_start"] = _date(period.get("date_start"))
    stored["date_end"] = _date(period.get("date_end"))
    if "location" in period:
        stored["location"] = _location(period["location"])
    return stored


def _read_field(name: str, value: Any) -> Any:
    """One written top-level field as HrFlow would send it back."""
    if name in ("experiences", "educations") and isinstance(value, list):
        return [_period(p) if isinstance(p, dict) else p for p in value]
    if name == "info" and isinstance(value, dict):
        return {**value, "location": _location(value.get("location") or {"text": None})}
    return copy.deepcopy(value)


class ProfileStore:
    def __init__(self) -> None:
        self._profiles: dict[str, dict[str, dict[str, Any]]] = {}  # source key → key → profile
        self._times: dict[int, _Times] = {}  # profile id → precise times
        self._ids = itertools.count(1)
        self._clock = _Clock()

    def seed(self) -> None:
        for key, sample in SAMPLES.items():
            self.add(SAMPLE_SOURCE_KEY, sample(), key=key)

    def clear(self) -> None:
        self._profiles.clear()
        self._times.clear()

    def has_source(self, source_key: str) -> bool:
        """Whether the source exists: seeded, or created by a profile written to it."""
        return source_key in self._profiles

    def all(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(p) for source in self._profiles.values() for p in source.values()]

    def get(
        self, source_key: str, key: str | None = None, reference: str | None = None
    ) -> dict[str, Any] | None:
        profiles = self._profiles.get(source_key, {})
        if key:
            found = profiles.get(key)
            return (
                None if found is None or (reference and found["reference"] != reference) else found
            )
        return next(
            (p for p in profiles.values() if reference and p["reference"] == reference), None
        )

    def get_by_email(self, source_key: str, email: str) -> dict[str, Any] | None:
        """The oldest profile of the source whose ``info.email`` is ``email``."""
        return next(
            (
                p
                for p in self._profiles.get(source_key, {}).values()
                if isinstance(p.get("info"), dict) and p["info"].get("email") == email
            ),
            None,
        )

    def add(self, source_key: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """Index a written profile; raise when its reference is taken in the source."""
        reference = body.get("reference")
        if reference and self.get(source_key, reference=reference) is not None:
            raise DuplicateReferenceError(reference)
        number = next(self._ids)
        key = key or hashlib.sha1(f"{source_key}:{number}".encode()).hexdigest()  # noqa: S324
        now = self._clock.now()
        profile: dict[str, Any] = {
            "id": number,
            "key": key,
            "reference": reference,
            "archive": None,
            "source": {
                "id": 1,
                "key": source_key,
                "name": source_key,
                "type": "api",
                "subtype": "http_api",
            },
            "created_at": stamp(now),
            "updated_at": stamp(now),
        }
        self._times[number] = _Times(created=now, updated=now)
        self._set_created_at(profile, body.get("created_at"))
        for name, value in body.items():
            if name not in ("source_key", "key", "reference", "created_at"):
                profile[name] = _read_field(name, value)
        self._profiles.setdefault(source_key, {})[key] = profile
        return copy.deepcopy(profile)

    def edit(self, profile: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        for name, value in body.items():
            if name == "created_at":
                self._set_created_at(profile, value)
            elif name not in ("source_key", "key"):
                profile[name] = _read_field(name, value)
        self._touch(profile)
        return copy.deepcopy(profile)

    def archive(self, profile: dict[str, Any], archived: bool) -> bool:
        """Archive or unarchive; False when it already was (nothing written, no new
        ``updated_at``: the listing's sort by ``updated_at`` tracks changes)."""
        if (profile["archive"] is not None) == archived:
            return False
        self._touch(profile)
        profile["archive"] = profile["updated_at"] if archived else None
        return True

    def page(self, query: ListQuery) -> ListPage:
        """One page of the sources' profiles, archived ones left out, as HrFlow's listing
        (meant to enumerate what is live) is understood to do; ties of a written
        ``created_at`` are broken by creation order, so pages never overlap."""
        found = [
            profile
            for source_key in dict.fromkeys(query.source_keys)
            for profile in self._profiles.get(source_key, {}).values()
            if self._listed(profile, query)
        ]
        found.sort(key=lambda p: self._sort_key(p, query.sort_by), reverse=query.descending)
        start = (query.page - 1) * query.limit
        chosen = found[start : start + query.limit]
        return ListPage(
            profiles=[copy.deepcopy(p) for p in chosen],
            page=query.page,
            max_page=math.ceil(len(found) / query.limit),
            total=len(found),
        )

    def _listed(self, profile: dict[str, Any], query: ListQuery) -> bool:
        if profile["archive"] is not None:
            return False
        if query.key and profile["key"] != query.key:
            return False
        if query.reference and profile["reference"] != query.reference:
            return False
        created = self._times[profile["id"]].created
        if query.created_min and created < day_start(query.created_min):
            return False
        return not (query.created_max and created >= day_start(query.created_max) + _DAY_NS)

    def _sort_key(self, profile: dict[str, Any], sort_by: str) -> tuple[int, int]:
        times = self._times[profile["id"]]
        return (times.created if sort_by == "created_at" else times.updated), profile["id"]

    def _set_created_at(self, profile: dict[str, Any], written: Any) -> None:
        """A written ``created_at`` (the ATS's date) in GET's format; one that does not
        parse is kept as written and sorts by when the sandbox stored the profile."""
        if written is None:
            return
        moment = _written_time(written)
        if moment is None:
            profile["created_at"] = written
            return
        self._times[profile["id"]].created = moment
        profile["created_at"] = stamp(moment)

    def _touch(self, profile: dict[str, Any]) -> None:
        now = self._clock.now()
        self._times[profile["id"]].updated = now
        profile["updated_at"] = stamp(now)
