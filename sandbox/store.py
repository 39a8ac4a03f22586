"""The sandbox's in-memory profiles, stored the way HrFlow answers them (the read shape).

Writes arrive in the write shape (dates as ``{"iso8601": ...}``) and are stored
as HrFlow would return them: dates as strings, server fields added (``id``,
``key``, the ``source`` object, timestamps, experience/education ``key``,
location ``gmaps``/``fields``). A PUT replaces each top-level field it sends.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import time
from typing import Any

from sandbox.samples import SAMPLE_SOURCE_KEY, SAMPLES

_COMPUTED_LOCATION = {"gmaps": None, "fields": None}


class DuplicateReferenceError(ValueError):
    """A source already holds a profile with this reference."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime())


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
        self._ids = itertools.count(1)

    def seed(self) -> None:
        for key, sample in SAMPLES.items():
            self.add(SAMPLE_SOURCE_KEY, sample(), key=key)

    def clear(self) -> None:
        self._profiles.clear()

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

    def add(self, source_key: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """Index a written profile; raise when its reference is taken in the source."""
        reference = body.get("reference")
        if reference and self.get(source_key, reference=reference) is not None:
            raise DuplicateReferenceError(reference)
        number = next(self._ids)
        key = key or hashlib.sha1(f"{source_key}:{number}".encode()).hexdigest()  # noqa: S324
        now = _now()
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
            "created_at": body.get("created_at") or now,
            "updated_at": now,
        }
        for name, value in body.items():
            if name not in ("source_key", "key", "reference", "created_at"):
                profile[name] = _read_field(name, value)
        self._profiles.setdefault(source_key, {})[key] = profile
        return copy.deepcopy(profile)

    def edit(self, profile: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        for name, value in body.items():
            if name not in ("source_key", "key"):
                profile[name] = _read_field(name, value)
        profile["updated_at"] = _now()
        return copy.deepcopy(profile)
