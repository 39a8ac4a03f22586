"""Built-in handler ``index``: copy each parsed profile into another source.

Enabled by ``HRFLOW_INDEX_SOURCE_KEY=<target source key>``. On a new profile
(``profile.parsing.success`` or ``profile.storing.success``) and a changed one
(``profile.parsing.update`` or ``profile.storing.update``): fetch the profile as
it is now from the event's source and index it into the target source, so the
copy follows the profile. Parsing webhooks are off by default at HrFlow, so many
workspaces send only the storing family; a workspace that sends both gets one
write per change: the second run finds the copy as it would write it (the write
fingerprint) and skips. ``HRFLOW_INDEX_FROM_SOURCES`` limits the origin sources. Idempotent: the copy's reference
is the profile's own reference, or ``origin-<profile key>`` when it has none,
and a target profile with that reference is edited (PUT) instead of
duplicated. The copy also records its origin in a metadata entry.

Events about profiles of the target source itself are skipped: they are the
echoes of our own writes.
"""

from __future__ import annotations

from hrflow_client.api import HrflowClient
from hrflow_client.errors import NotFound
from hrflow_client.profiles import (
    Profile,
    ProfileWrite,
    WriteItem,
    payload_fingerprint,
    profile_to_indexing_payload,
)
from hrflow_webhooks.events import Event
from hrflow_webhooks.settings import Settings
from workers.context import HandlerContext
from workers.handlers.common import (
    ProfileRef,
    WriteEchoes,
    client_of,
    consent_allows,
    exclusive,
    fetch_profile,
    profile_ref_of,
    record_skip,
    require_api_credentials,
)
from workers.registry import Registry

HANDLER_NAME = "builtin.index"
EVENT_TYPES = (
    "profile.parsing.success",
    "profile.parsing.update",
    "profile.storing.success",
    "profile.storing.update",
)
ORIGIN_METADATA = "hrflow_webhooks_origin"
# Copying a profile into a searchable source processes its parsed data and embeds it.
CONSENT_NEEDED = ("parsing", "embedding")


def origin_reference(ref: ProfileRef) -> str:
    return f"origin-{ref.profile_key}"


def index_payload(profile: Profile, ref: ProfileRef, target_source_key: str) -> ProfileWrite:
    """The profile as a POST body for the target: a reference, and its origin as metadata."""
    payload = profile_to_indexing_payload(profile, target_source_key)
    origin = WriteItem(name=ORIGIN_METADATA, value=f"{ref.source_key}/{ref.profile_key}")
    metadatas = [m for m in payload.metadatas or [] if m.name != ORIGIN_METADATA]
    return payload.model_copy(
        update={
            "reference": payload.reference or origin_reference(ref),
            "metadatas": [*metadatas, origin],
        }
    )


async def _target_key(client: HrflowClient, target: str, reference: str) -> str | None:
    try:
        existing = await client.profile_indexing_get(target, reference=reference)
    except NotFound:
        return None
    key = existing.get("key") if isinstance(existing, dict) else None
    return key if isinstance(key, str) else None


async def index_profile(event: Event, ctx: HandlerContext) -> None:
    target = ctx.settings.index_source_key
    if target is None:  # registered only when set; a settings object swapped under us
        return
    ref = profile_ref_of(event)
    if ref.source_key == target:
        await record_skip(ctx, ref, "event from the target source")
        return
    profile = await fetch_profile(ctx, ref)
    if not await consent_allows(ctx, ref, profile, CONSENT_NEEDED):
        return
    payload = index_payload(profile, ref, target)
    fingerprint = payload_fingerprint(payload)
    echoes = WriteEchoes(ctx)
    if await echoes.is_echo(ref, fingerprint):
        await record_skip(ctx, ref, "already indexed as is")
        return
    reference = payload.reference or origin_reference(ref)  # index_payload always set one
    # Two events for one profile at once would both find no copy and both POST: one at a time.
    async with exclusive(ctx, f"{target}:{reference}"):
        await _write(ctx, client_of(ctx), target, payload, reference, ref)
    await echoes.remember(ref, fingerprint)


async def _write(
    ctx: HandlerContext,
    client: HrflowClient,
    target: str,
    payload: ProfileWrite,
    reference: str,
    ref: ProfileRef,
) -> None:
    key = await _target_key(client, target, reference)
    if key is None:
        await client.profile_indexing_add_json(target, payload)
    else:
        await client.profile_indexing_edit(target, payload, key=key)
    outcome = "created" if key is None else "edited"
    ctx.logger.info("profile indexed", extra={**ref.log_fields, "outcome": outcome})


def register(registry: Registry, settings: Settings) -> None:
    """Entry point ``index``: registers nothing unless HRFLOW_INDEX_SOURCE_KEY is set."""
    if not settings.index_source_key:
        return
    require_api_credentials(settings, "HRFLOW_INDEX_SOURCE_KEY")
    for event_type in EVENT_TYPES:
        registry.add(
            event_type, index_profile, name=HANDLER_NAME, sources=settings.index_from_sources
        )
