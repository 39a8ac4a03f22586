"""Built-in handler ``edit``: enrich each parsed profile in place.

Enabled by ``HRFLOW_EDIT_TAGS=name=value,name2=value2``. On a new profile
(``profile.parsing.success`` or ``profile.storing.success``) and a changed one
(``profile.parsing.update`` or ``profile.storing.update``: a re-parse replaces
the profile and can drop our tags): fetch the profile as it is now and PUT back,
to its own source, only what changes, plus the identifiers:

- ``tags``: ours merged in, one tag per name (our value wins over an older one);
- ``text`` when empty: names, summary, experiences and educations (title,
  company or school, description), skills, languages and interests, as the
  docs' example text does (HrFlow strongly recommends a text field);
- ``experiences_duration`` / ``educations_duration`` when missing: years
  covered by the periods' dates, overlaps counted once, an open end is today.

A profile that already has all of it is not written, so the echo of our own
PUT (``profile.storing.update``) and the second family's announcement of the
same profile change nothing. ``HRFLOW_EDIT_SOURCES`` limits the sources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from hrflow_client.profiles import (
    Education,
    Experience,
    Item,
    Profile,
    ProfileWrite,
    payload_fingerprint,
    profile_to_indexing_payload,
    timestamp_of,
)
from hrflow_webhooks.events import Event
from hrflow_webhooks.settings import Settings
from workers.context import HandlerContext
from workers.handlers.common import (
    WriteEchoes,
    client_of,
    consent_allows,
    fetch_profile,
    profile_ref_of,
    record_skip,
    require_api_credentials,
)
from workers.registry import Registry

HANDLER_NAME = "builtin.edit"
EVENT_TYPES = (
    "profile.parsing.success",
    "profile.parsing.update",
    "profile.storing.success",
    "profile.storing.update",
)
CONSENT_NEEDED = ("parsing",)
_DAYS_PER_YEAR = 365.25


# --- what changes ------------------------------------------------------------------------------


def merged_tags(tags: list[Item], ours: Mapping[str, str]) -> list[dict[str, Any]]:
    """Existing tags with ours merged in: one tag per name of ours, order kept."""
    merged: list[dict[str, Any]] = []
    placed: set[str] = set()
    for tag in tags:
        name = tag.name
        if not name:
            continue
        if name not in ours:
            merged.append({"name": name, "value": tag.value})
        elif name not in placed:  # a second tag of one of our names is a duplicate: dropped
            placed.add(name)
            merged.append({"name": name, "value": ours[name]})
    merged += [{"name": name, "value": value} for name, value in ours.items() if name not in placed]
    return merged


def _names(items: Iterable[Item]) -> list[str | None]:
    return [item.name for item in items]


def profile_text(profile: Profile) -> str:
    """The text HrFlow recommends: names, summary, then each experience and education."""
    info = profile.info
    name = info.full_name or " ".join(n for n in (info.first_name, info.last_name) if n)
    parts: list[str | None] = [name, info.summary]
    for experience in profile.experiences:
        parts += [experience.title, experience.company, experience.description]
    for education in profile.educations:
        parts += [education.title, education.school, education.description]
    parts += _names(profile.skills) + _names(profile.languages) + _names(profile.interests)
    return " ".join(part.strip() for part in parts if part and part.strip())


def _moment(value: str | None) -> datetime | None:
    stamp = timestamp_of(value)
    return None if stamp is None else datetime.fromtimestamp(stamp, UTC).replace(tzinfo=None)


def years_covered(periods: Iterable[Experience | Education], now: datetime) -> float | None:
    """Years covered by the periods' dates, overlaps once; None when no period has a start."""
    spans = []
    for period in periods:
        start, end = _moment(period.date_start), _moment(period.date_end) or now
        if start is not None and end > start:
            spans.append((start, end))
    if not spans:
        return None
    total_days, covered_until = 0.0, None
    for start, end in sorted(spans):
        if covered_until is not None:
            start = max(start, covered_until)
        if end > start:
            total_days += (end - start).total_seconds() / 86_400
        covered_until = end if covered_until is None else max(covered_until, end)
    return round(total_days / _DAYS_PER_YEAR, 2)


def profile_changes(profile: Profile, tags: Mapping[str, str], now: datetime) -> dict[str, Any]:
    """The fields to PUT (empty: nothing to do)."""
    changes: dict[str, Any] = {}
    current_tags = [{"name": t.name, "value": t.value} for t in profile.tags if t.name]
    new_tags = merged_tags(profile.tags, tags)
    if new_tags != current_tags:
        changes["tags"] = new_tags
    if not (profile.text or "").strip():
        text = profile_text(profile)
        if text:
            changes["text"] = text
    for field, periods in (
        ("experiences_duration", profile.experiences),
        ("educations_duration", profile.educations),
    ):
        if getattr(profile, field) is None:
            years = years_covered(periods, now)
            if years is not None:
                changes[field] = years
    return changes


# --- the handler -------------------------------------------------------------------------------


async def edit_profile(event: Event, ctx: HandlerContext) -> None:
    ref = profile_ref_of(event)
    profile = await fetch_profile(ctx, ref)
    if not await consent_allows(ctx, ref, profile, CONSENT_NEEDED):
        return
    current = profile_to_indexing_payload(profile, ref.source_key)
    echoes = WriteEchoes(ctx)
    if await echoes.is_echo(ref, payload_fingerprint(current)):
        await record_skip(ctx, ref, "echo of our own write")
        return
    changes = profile_changes(
        profile, ctx.settings.edit_tags, datetime.now(UTC).replace(tzinfo=None)
    )
    if not changes:
        await record_skip(ctx, ref, "nothing to change")
        return
    body = ProfileWrite.model_validate({"source_key": ref.source_key, **changes})
    edited = await client_of(ctx).profile_indexing_edit(ref.source_key, body, key=ref.profile_key)
    if isinstance(edited, Mapping):  # our own write's state: handled, its echo is skipped
        ctx.saw_state(edited.get("updated_at"))
    written = ProfileWrite.model_validate({**current.to_json(), **changes})
    await echoes.remember(ref, payload_fingerprint(written))
    ctx.logger.info("profile edited", extra={**ref.log_fields, "outcome": "edited"})


def register(registry: Registry, settings: Settings) -> None:
    """Entry point ``edit``: registers nothing unless HRFLOW_EDIT_TAGS is set."""
    if not settings.edit_tags:
        return
    require_api_credentials(settings, "HRFLOW_EDIT_TAGS")
    for event_type in EVENT_TYPES:
        registry.add(event_type, edit_profile, name=HANDLER_NAME, sources=settings.edit_sources)
