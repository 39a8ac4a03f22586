"""Erasing a profile from Redis, for personal-data requests (``hrflow-webhooks erase``).

What can name a profile key in Redis, and what goes (every key class of
``hrflow_webhooks.queue``'s layout is listed there):

- runs whose event names the profile: the job (``arq:job:<run id>``), its
  member of the queue, arq's retry, in-progress and result keys, the run's
  completion markers, its place in its subject's order list and the
  notification's waiting pointer;
- dead letters whose stored event names it;
- the dedup markers of those events (``<q>:seen:<event id>``): no personal
  data, but they tie an event to the profile while its run or letter exists;
- the write fingerprints the built-in handlers keep to skip the echo of their
  own writes, and the handlers' locks named after the profile;
- the profile's entries in the event log (``<q>:log``) and its handled states
  (``<q>:handled:<subject tag>``) in every source the log names it in.

Order lists (named by a hash of the subject) and waiting pointers (named by the
event id, expiring with the dedup window) hold only run ids; order lists
disappear with the profile's last run. Dedup markers of
events whose run already finished and left no letter carry only the sha256 of
the event, not the profile key, and expire with the dedup window.
A job a worker is running at the moment of erasure may still finish and write
its effects: stop the workers first, or run ``erase`` again afterwards.

Like the CLI, this sits above the workers and uses their dead-letter store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from hrflow_webhooks.event_log import EventLog
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import (
    FORGET_RUN_SCRIPT,
    JOB_KEY_PREFIX,
    QueueKeys,
    deserialize_job,
    tag_of,
)
from workers.dead_letters import DeadLetters

SCAN_BATCH = 500


@dataclass(frozen=True, slots=True)
class ErasureReport:
    jobs: int
    dead_letters: int
    markers: int
    fingerprints: int
    log_entries: int = 0
    handled_states: int = 0

    @property
    def total(self) -> int:
        return (
            self.jobs + self.dead_letters + self.markers + self.fingerprints
            + self.log_entries + self.handled_states
        )  # fmt: skip


def names_profile(payload: Mapping[str, Any], profile_key: str) -> bool:
    """Whether an event payload is about ``profile_key`` (current or legacy field names)."""
    profile = payload.get("profile")
    if not isinstance(profile, Mapping):
        return False
    return profile_key in (profile.get("key"), profile.get("profile_key"))


def _job_event(raw: bytes) -> Mapping[str, Any] | None:
    """The event a job carries, or None for a job that is not ours (another format)."""
    try:
        job = deserialize_job(raw)
        event = job["a"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return event if isinstance(event, Mapping) else None


class ProfileEraser:
    def __init__(self, redis: Redis, keys: QueueKeys) -> None:
        self.redis = redis
        self.keys = keys
        self.dead_letters = DeadLetters(redis, keys)

    async def erase(self, profile_key: str) -> ErasureReport:
        if not profile_key.strip():  # an empty key would match every profile's traces
            raise ValueError("erase needs a profile key: an empty one would match every profile")
        jobs, job_events = await self._erase_jobs(profile_key)
        letters, letter_events = await self._erase_dead_letters(profile_key)
        markers = await self._erase_markers(job_events | letter_events)
        fingerprints = await self._erase_fingerprints(profile_key)
        logged, states = await self._erase_log(profile_key)
        return ErasureReport(jobs, letters, markers, fingerprints, logged, states)

    async def _erase_log(self, profile_key: str) -> tuple[int, int]:
        """(log entries, handled states) deleted; the states of every source, by pattern (the
        log may have dropped the entries that named them long before)."""
        erased = await EventLog(self.redis, self.keys).erase(profile_key=profile_key)
        pattern = glob_escape(self.keys.handled_prefix(profile_key)) + "*"
        states = [key async for key in self.redis.scan_iter(match=pattern, count=SCAN_BATCH)]
        deleted = int(await self.redis.delete(*states)) if states else 0
        return erased.entries, deleted

    async def _erase_jobs(self, profile_key: str) -> tuple[int, set[str]]:
        """(runs deleted, their event ids); one event may have several runs."""
        jobs = 0
        event_ids: set[str] = set()
        async for job_key in self.redis.scan_iter(match=JOB_KEY_PREFIX + "*", count=SCAN_BATCH):
            raw = await self.redis.get(job_key)
            data = None if raw is None else _job_event(raw)
            if data is None or not names_profile(data.get("payload") or {}, profile_key):
                continue
            event = Event.from_dict(data)
            await self._forget_run(job_key.decode()[len(JOB_KEY_PREFIX) :], event)
            event_ids.add(event.id)
            jobs += 1
        return jobs, event_ids

    async def _forget_run(self, run_id: str, event: Event) -> None:
        keys = self.keys
        run_keys = [
            keys.job(run_id),
            keys.retry(run_id),
            keys.in_progress(run_id),
            keys.result(run_id),
            keys.done(run_id),
        ]
        order = keys.order(tag_of(event.subject))
        script_keys = [keys.queue, order, keys.marker_of(event), *run_keys]
        await self.redis.eval(FORGET_RUN_SCRIPT, len(script_keys), *script_keys, run_id)  # type: ignore[misc]

    async def _erase_dead_letters(self, profile_key: str) -> tuple[int, set[str]]:
        # Letters are per (event, handler): several may share one event.
        erased: list[tuple[str, str]] = [
            (letter["id"], letter["event"]["id"])
            async for letter in self.dead_letters.iter()
            if names_profile(letter["event"].get("payload") or {}, profile_key)
        ]
        for letter_id, _ in erased:
            await self.dead_letters.purge(letter_id)
        return len(erased), {event_id for _, event_id in erased}

    async def _erase_markers(self, event_ids: set[str]) -> int:
        if not event_ids:
            return 0
        return int(await self.redis.delete(*[self.keys.seen(eid) for eid in event_ids]))

    async def _erase_fingerprints(self, profile_key: str) -> int:
        """Write fingerprints (``written:<h>:<src>:<key>``) and locks naming the profile."""
        escaped = glob_escape(profile_key)
        patterns = (
            f"{glob_escape(self.keys.written_prefix)}*:{escaped}",
            f"{glob_escape(self.keys.lock_prefix)}*{escaped}",
        )
        found: set[bytes] = set()
        for pattern in patterns:
            async for key in self.redis.scan_iter(match=pattern, count=SCAN_BATCH):
                found.add(key)
        return int(await self.redis.delete(*found)) if found else 0


def glob_escape(text: str) -> str:
    """Redis MATCH patterns treat these as wildcards; a key is matched literally."""
    return re.sub(r"([\\*?\[\]^])", r"\\\1", text)


async def erase_profile(redis: Redis, keys: QueueKeys, profile_key: str) -> ErasureReport:
    return await ProfileEraser(redis, keys).erase(profile_key)
