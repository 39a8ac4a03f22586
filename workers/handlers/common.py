"""What the built-in handlers share: the profile's keys from an event, consent, skips, and
write-back loop suppression.

**Loop suppression.** Our own PUT makes HrFlow send ``profile.*.update`` (and
possibly another ``.success``) back for the same profile. After each write a
handler remembers a fingerprint of the profile as it will be stored (per
handler and profile, for ``HRFLOW_WRITE_ECHO_TTL_S``). An event whose fetched
profile has that exact fingerprint is our echo and is skipped; any real change
to the profile changes the fingerprint, so it is handled.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import LockNotOwnedError

from hrflow_client.api import HrflowClient
from hrflow_client.errors import NotFound
from hrflow_client.profiles import Profile
from hrflow_webhooks.errors import (
    HandlerError,
    PermanentError,
    SubjectGoneError,
    SubjectNotReadableError,
    TransientError,
)
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import QueueKeys
from hrflow_webhooks.settings import Settings
from workers.context import HandlerContext


class MissingProfileKeysError(PermanentError):
    """The event does not say which profile (and source) it is about."""


class NotConfiguredError(RuntimeError):
    """A built-in handler is enabled but the HrFlow API credentials are missing."""


@dataclass(frozen=True, slots=True)
class ProfileRef:
    profile_key: str
    source_key: str

    @property
    def log_fields(self) -> dict[str, str]:
        return {"profile_key": self.profile_key, "source_key": self.source_key}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def profile_ref_of(event: Event) -> ProfileRef:
    """The profile and source keys, wherever this sender put them.

    Current senders: ``profile.key`` + ``profile.source.key``; older ones
    ``profile.profile_key`` / ``profile.source_key`` or a top-level ``source.key``.
    """
    profile = event.get("profile")
    profile = profile if isinstance(profile, Mapping) else {}
    profile_key = _text(profile.get("key")) or _text(profile.get("profile_key"))
    source_key = event.source_key
    missing = [
        name
        for name, value in (("profile key", profile_key), ("source key", source_key))
        if value is None
    ]
    if profile_key is None or source_key is None:
        raise MissingProfileKeysError(
            f"event {event.type!r} has no {' and no '.join(missing)} (looked for profile.key, "
            "profile.profile_key, profile.source.key, profile.source_key and source.key)"
        )
    return ProfileRef(profile_key, source_key)


def require_api_credentials(settings: Settings, enabled_by: str) -> None:
    """Fail at start-up, not on the first event, when an enabled handler cannot call HrFlow."""
    if settings.api_key is None or not settings.api_user:
        raise NotConfiguredError(
            f"{enabled_by} enables a built-in handler, which needs HRFLOW_API_KEY and "
            "HRFLOW_API_USER to call the HrFlow API"
        )


def client_of(ctx: HandlerContext) -> HrflowClient:
    client = ctx.services.hrflow
    if client is None:
        raise PermanentError("no HrFlow API client: set HRFLOW_API_KEY and HRFLOW_API_USER")
    return client


def subject_not_found(ctx: HandlerContext) -> HandlerError:
    """What a 404 on the event's own subject means: not readable *yet* inside
    ``HRFLOW_NOT_FOUND_GRACE_S`` after the event was received (HrFlow sends parsing
    webhooks before indexing), gone after it. Plugins raise it the same way."""
    age_s = time.time() - ctx.event.received_at
    if age_s < ctx.settings.not_found_grace_s:
        return SubjectNotReadableError(f"{ctx.event.canonical_type}: subject not readable yet")
    return SubjectGoneError(
        f"{ctx.event.canonical_type}: subject still not found "
        f"{ctx.settings.not_found_grace_s:g} s after the event"
    )


async def fetch_profile(ctx: HandlerContext, ref: ProfileRef) -> Profile:
    """The event's profile as HrFlow has it now (the notification says only that it changed)."""
    if ctx.event.canonical_type.endswith(".error"):
        raise PermanentError(
            f"{ctx.event.canonical_type}: HrFlow says the subject of an error event cannot be "
            "retrieved; handle it without fetching"
        )
    try:
        data = await client_of(ctx).profile_indexing_get(ref.source_key, key=ref.profile_key)
    except NotFound:
        raise subject_not_found(ctx) from None
    if not isinstance(data, Mapping):
        raise PermanentError(f"HrFlow answered profile {ref.profile_key} without a profile object")
    profile = Profile.model_validate(data)
    ctx.saw_state(profile.updated_at)
    return profile


def skips_key(settings: Settings) -> str:
    """Hash ``<handler>:<reason>`` → count of events a handler skipped on purpose."""
    return QueueKeys(settings.queue_name).skipped


async def record_skip(ctx: HandlerContext, ref: ProfileRef | None, reason: str) -> None:
    await ctx.redis.hincrby(skips_key(ctx.settings), f"{ctx.handler}:{reason}", 1)  # type: ignore[misc]
    ctx.skipped(reason)
    fields = ref.log_fields if ref is not None else {}
    ctx.logger.info("event skipped", extra={**fields, "outcome": "skipped", "reason": reason})


async def consent_allows(
    ctx: HandlerContext, ref: ProfileRef, profile: Profile, operations: tuple[str, ...]
) -> bool:
    """With HRFLOW_REQUIRE_CONSENT, the owner and the controller must allow every operation."""
    if not ctx.settings.require_consent:
        return True
    consent = profile.consent_algorithmic
    refused = [op for op in operations if consent is None or not consent.allows(op)]
    if refused:
        await record_skip(ctx, ref, f"no consent for {'+'.join(refused)}")
        return False
    return True


class WriteEchoes:
    """Fingerprints of the profiles a handler wrote, so their echo events can be skipped."""

    def __init__(self, ctx: HandlerContext) -> None:
        self._redis = ctx.redis
        self._keys = ctx.services.keys
        self._handler = ctx.handler
        self._ttl_s = ctx.settings.write_echo_ttl_s

    def _key(self, ref: ProfileRef) -> str:
        return self._keys.written(self._handler, ref.source_key, ref.profile_key)

    async def is_echo(self, ref: ProfileRef, fingerprint: str) -> bool:
        written = await self._redis.get(self._key(ref))
        return written is not None and written.decode() == fingerprint

    async def remember(self, ref: ProfileRef, fingerprint: str) -> None:
        await self._redis.set(self._key(ref), fingerprint, ex=self._ttl_s)


@contextlib.asynccontextmanager
async def exclusive(ctx: HandlerContext, name: str) -> AsyncIterator[None]:
    """One holder at a time across worker processes, or a transient error to retry later.

    redis-py's ``Lock`` (a random token, released only by its owner). It expires with the
    job's timeout, so a killed worker cannot hold it forever.
    """
    key = ctx.services.keys.lock(ctx.handler, name)
    lock = ctx.redis.lock(key, timeout=ctx.settings.job_timeout_s, blocking=False)
    if not await lock.acquire():
        remaining_ms = await ctx.redis.pttl(key)
        raise TransientError(
            f"another worker holds {ctx.handler}'s lock on this profile",
            retry_after_s=max(0.1, remaining_ms / 1000),
        )
    try:
        yield
    finally:
        # Expired and taken by another holder meanwhile: theirs now, not ours to release.
        with contextlib.suppress(LockNotOwnedError):
            await lock.release()
