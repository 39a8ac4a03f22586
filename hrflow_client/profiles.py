"""The HrFlow Profile object: lenient as read, strict as written, and the transform between.

HrFlow reads and writes profiles in two shapes (shared/hrflow-api/):

- **read** (``GET /v1/profile/indexing``): ``date_start``/``date_end`` of experiences
  and educations are plain strings; the answer carries server fields (``id``,
  ``key``, the ``source`` object, ``created_at``/``updated_at``, ``archive``,
  experience/education ``key``, location ``gmaps``/``fields``).
- **write** (``POST``/``PUT /v1/profile/indexing``): the same dates are objects
  ``{"iso8601": "2018-01-01T00:00:00"}``, the source is ``source_key``, and the
  server fields are not accepted.

:class:`Profile` parses the read shape and keeps unknown fields (HrFlow adds
fields over time). The ``Write*`` models describe the write shape and forbid
anything else; :func:`profile_to_indexing_payload` goes from the first to the
second. Only the experience/education dates are wrapped: ``info.date_birth``
and the label dates stay strings on write, as every write example shows.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

# --- read shape -------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class _LabelFields(BaseModel):
    """A label's fields, shared by the read model (lenient) and the write model (strict)."""

    stage: str | None = None
    job_key: str | None = None
    date_stage: str | None = None
    rating: float | None = None
    date_rating: str | None = None


class _ConsentFields(BaseModel):
    """The operations algorithmic consent covers, shared by the read and write models."""

    parsing: bool | None = None
    revealing: bool | None = None
    embedding: bool | None = None
    searching: bool | None = None
    scoring: bool | None = None
    reasoning: bool | None = None


class Item(_Lenient):
    """A certification, course, task, language, interest, tag or metadata."""

    name: str | None = None
    value: Any = None


class Skill(Item):
    type: str | None = None


class Location(_Lenient):
    text: str | None = None
    lat: float | str | None = None
    lng: float | str | None = None
    gmaps: Any = None
    fields: Any = None


def _date_text(value: Any) -> Any:
    """GET sends strings; accept an ``{"iso8601": ...}`` too, so written shapes read back."""
    if isinstance(value, dict):
        return value.get("iso8601")
    return value


class _Period(_Lenient):
    key: str | None = None
    title: str | None = None
    description: str | None = None
    location: Location | None = None
    date_start: str | None = None
    date_end: str | None = None
    certifications: list[Item] = Field(default_factory=list)
    courses: list[Item] = Field(default_factory=list)
    tasks: list[Item] = Field(default_factory=list)
    skills: list[Skill] = Field(default_factory=list)

    @field_validator("date_start", "date_end", mode="before")
    @classmethod
    def _dates(cls, value: Any) -> Any:
        return _date_text(value)


class Experience(_Period):
    company: str | None = None


class Education(_Period):
    school: str | None = None


class Info(_Lenient):
    full_name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: str | None = None
    date_birth: str | None = None
    gender: str | None = None
    location: Location | None = None
    urls: dict[str, Any] | list[Any] | None = None
    picture: str | None = None
    summary: str | None = None


class Label(_LabelFields, _Lenient):
    pass


class Consent(_ConsentFields, _Lenient):
    pass


class ConsentAlgorithmic(_Lenient):
    owner: Consent | None = None
    controller: Consent | None = None

    def allows(self, operation: str) -> bool:
        """Both the owner and the controller must have said yes; silence is no."""
        return all(
            party is not None and getattr(party, operation, None) is True
            for party in (self.owner, self.controller)
        )


class SourceRef(_Lenient):
    key: str | None = None


class Profile(_Lenient):
    """A profile as ``GET /v1/profile/indexing`` answers it (``data``)."""

    id: Any = None
    key: str | None = None
    reference: str | None = None
    archive: Any = None
    source: SourceRef | None = None
    created_at: str | None = None
    updated_at: str | None = None
    consent_algorithmic: ConsentAlgorithmic | None = None
    info: Info = Field(default_factory=Info)
    text: str | None = None
    text_language: str | None = None
    experiences_duration: float | None = None
    educations_duration: float | None = None
    experiences: list[Experience] = Field(default_factory=list)
    educations: list[Education] = Field(default_factory=list)
    certifications: list[Item] = Field(default_factory=list)
    courses: list[Item] = Field(default_factory=list)
    tasks: list[Item] = Field(default_factory=list)
    skills: list[Skill] = Field(default_factory=list)
    languages: list[Item] = Field(default_factory=list)
    interests: list[Item] = Field(default_factory=list)
    tags: list[Item] = Field(default_factory=list)
    metadatas: list[Item] = Field(default_factory=list)
    labels: list[Label] = Field(default_factory=list)
    attachments: list[Any] = Field(default_factory=list)

    @field_validator(
        "experiences", "educations", "certifications", "courses", "tasks", "skills",
        "languages", "interests", "tags", "metadatas", "labels", "attachments",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _null_lists(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("info", mode="before")
    @classmethod
    def _null_info(cls, value: Any) -> Any:
        return {} if value is None else value


# --- write shape ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WriteItem(_Strict):
    name: str
    value: Any = None


class WriteSkill(WriteItem):
    type: Literal["hard", "soft"] | None = None


class WriteLocation(_Strict):
    text: str | None = None
    lat: float | str | None = None
    lng: float | str | None = None


class IsoDate(_Strict):
    iso8601: str


class _WritePeriod(_Strict):
    title: str | None = None
    description: str | None = None
    location: WriteLocation | None = None
    date_start: IsoDate | None = None
    date_end: IsoDate | None = None
    certifications: list[WriteItem] = Field(default_factory=list)
    courses: list[WriteItem] = Field(default_factory=list)
    tasks: list[WriteItem] = Field(default_factory=list)
    skills: list[WriteSkill] = Field(default_factory=list)


class WriteExperience(_WritePeriod):
    company: str | None = None


class WriteEducation(_WritePeriod):
    school: str | None = None


class WriteInfo(_Strict):
    full_name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: str | None = None
    date_birth: str | None = None
    gender: str | None = None
    location: WriteLocation | None = None
    urls: dict[str, Any] | list[Any] | None = None
    picture: str | None = None
    summary: str | None = None


class WriteLabel(_LabelFields, _Strict):
    pass


class WriteConsent(_ConsentFields, _Strict):
    pass


class WriteConsentAlgorithmic(_Strict):
    owner: WriteConsent | None = None
    controller: WriteConsent | None = None


class ProfileWrite(_Strict):
    """A POST/PUT ``/v1/profile/indexing`` body. PUT sends a subset, so only ``source_key``
    is required; ``key`` identifies the profile on PUT."""

    source_key: str
    key: str | None = None
    reference: str | None = None
    created_at: str | None = None
    consent_algorithmic: WriteConsentAlgorithmic | None = None
    info: WriteInfo | None = None
    text: str | None = None
    text_language: str | None = None
    experiences: list[WriteExperience] | None = None
    experiences_duration: float | None = None
    educations: list[WriteEducation] | None = None
    educations_duration: float | None = None
    certifications: list[WriteItem] | None = None
    courses: list[WriteItem] | None = None
    tasks: list[WriteItem] | None = None
    skills: list[WriteSkill] | None = None
    languages: list[WriteItem] | None = None
    interests: list[WriteItem] | None = None
    tags: list[WriteItem] | None = None
    metadatas: list[WriteItem] | None = None
    labels: list[WriteLabel] | None = None
    attachments: list[Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The body to send: only the fields that were set (a PUT replaces what it sends)."""
        return self.model_dump(mode="json", exclude_unset=True)


# --- the transform ----------------------------------------------------------------------------

# Fields copied as they are (after validation by the write models).
_PASS_THROUGH = (
    "reference", "created_at", "text", "text_language", "experiences_duration",
    "educations_duration", "certifications", "courses", "tasks", "skills", "languages",
    "interests", "tags", "metadatas", "labels", "attachments",
)  # fmt: skip
_LOCATION_FIELDS = ("text", "lat", "lng")  # gmaps/fields are computed by HrFlow
_URL_FIELDS = (
    "from_resume",
    "linkedin",
    "twitter",
    "facebook",
    "github",
)  # urls.picture is read-only


def _iso_date(value: str | None) -> dict[str, str] | None:
    return None if value is None else {"iso8601": value}


def _location(location: Location | None) -> dict[str, Any] | None:
    if location is None:
        return None
    return {name: getattr(location, name) for name in _LOCATION_FIELDS}


def _items(items: list[Item]) -> list[dict[str, Any]]:
    return [{"name": item.name, "value": item.value} for item in items if item.name]


def _skills(skills: list[Skill]) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "value": s.value, "type": s.type if s.type in ("hard", "soft") else None}
        for s in skills
        if s.name
    ]


def _period(period: _Period) -> dict[str, Any]:
    return {
        "title": period.title,
        "description": period.description,
        "location": _location(period.location),
        "date_start": _iso_date(period.date_start),
        "date_end": _iso_date(period.date_end),
        "certifications": _items(period.certifications),
        "courses": _items(period.courses),
        "tasks": _items(period.tasks),
        "skills": _skills(period.skills),
    }


def _urls(urls: dict[str, Any] | list[Any] | None) -> dict[str, Any] | list[Any] | None:
    if isinstance(urls, dict):
        return {name: urls[name] for name in _URL_FIELDS if name in urls}
    return urls


def _info(info: Info) -> dict[str, Any]:
    fields = info.model_dump(include=set(WriteInfo.model_fields) - {"location", "urls"})
    return {**fields, "location": _location(info.location), "urls": _urls(info.urls)}


def _pass_through(profile: Profile, name: str) -> Any:
    value = getattr(profile, name)
    if name == "skills":
        return _skills(value)
    if name == "labels":
        return [label.model_dump(include=set(WriteLabel.model_fields)) for label in value]
    if isinstance(value, list) and value and isinstance(value[0], Item):
        return _items(value)
    return value


def profile_to_indexing_payload(profile: Profile | dict[str, Any], source_key: str) -> ProfileWrite:
    """A fetched profile (GET shape) as a valid POST body for ``source_key``.

    Dropped: ``id``, ``key``, ``archive``, ``updated_at``, the ``source`` object
    (replaced by ``source_key``), experience/education ``key``, location
    ``gmaps``/``fields``, ``urls.picture`` and unknown fields. For a PUT, set
    ``key`` on the result (or send a subset: see :meth:`ProfileWrite.to_json`).
    """
    if not isinstance(profile, Profile):
        profile = Profile.model_validate(profile)
    body: dict[str, Any] = {"source_key": source_key}
    for name in _PASS_THROUGH:
        body[name] = _pass_through(profile, name)
    if profile.consent_algorithmic is not None:
        body["consent_algorithmic"] = profile.consent_algorithmic.model_dump(
            include={
                "owner": set(WriteConsent.model_fields),
                "controller": set(WriteConsent.model_fields),
            }
        )
    body["info"] = _info(profile.info)
    body["experiences"] = [_period(e) | {"company": e.company} for e in profile.experiences]
    body["educations"] = [_period(e) | {"school": e.school} for e in profile.educations]
    return ProfileWrite.model_validate(body)


def payload_fingerprint(payload: ProfileWrite) -> str:
    """A digest of what a profile holds, independent of key order and of ``source_key``/``key``."""
    content = payload.model_dump(mode="json", exclude={"source_key", "key"})
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def timestamp_of(value: str | None) -> float | None:
    """HrFlow's ``created_at``/``updated_at`` (``2026-11-30T18:00:00+0000``, a zone or not:
    then UTC) as epoch seconds; None when absent or unreadable."""
    if not value or not isinstance(value, str):  # a listing's odd item must not end a scan
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
