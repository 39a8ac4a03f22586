"""Erasing a profile from Redis, for personal-data requests (``hrflow-webhooks erase``).

A profile is named by its key (``--profile-key``), by a reference (``--reference``: an
e-mail address or an ATS id, which HrFlow's events carry when they have no key), or both.
What can name it in Redis, and what goes (every key class of ``hrflow_webhooks.queue``'s
layout is listed there):

- runs whose event names the profile: the job (``arq:job:<run id>``), its
  member of the queue, arq's retry, in-progress and result keys, the run's
  completion markers, its place in its subject's order list and the
  notification's waiting pointer;
- dead letters whose stored event names it, or whose error quotes its key or reference
  (HrFlow's 400 about another profile may quote this one's e-mail);
- the dedup markers of those events (``<q>:seen:<event id>``): no personal
  data, but they tie an event to the profile while its run or letter exists;
- the write fingerprints the built-in handlers keep to skip the echo of their
  own writes (by key), and the handlers' locks named after the key or the reference;
- the profile's entries in the event log (``<q>:log``; a reference is logged by its hash
  and matched by it), and its handled states (``<q>:handled:<subject tag>``, by key) in
  every source the log names it in. The log is rebuilt without them
  (:meth:`hrflow_webhooks.event_log.EventLog.erase`): ``XDEL`` would keep their bytes.

Then the files (:func:`rewrite_files`): the AOF is rewritten from what Redis now holds
(``BGREWRITEAOF``), and a fresh snapshot replaces ``dump.rdb`` when RDB snapshots are on,
each waited for. Where the server refuses (managed Redis), that is said, not fatal.
Nothing here reaches snapshots or backups taken before, a replica's own files, or the disk
blocks the old files freed (:data:`NOT_REACHED`).

Order lists (named by a hash of the subject) and waiting pointers (named by the
event id, expiring with the dedup window) hold only run ids; order lists
disappear with the profile's last run. Dedup markers of
events whose run already finished and left no letter carry only the sha256 of
the event, not the profile key, and expire with the dedup window.
Write fingerprints and handled states are named by the key only: erasing by reference
alone leaves them; give the key too when it is known.
A job a worker is running at the moment of erasure may still finish and write
its effects: stop the workers first, or run ``erase`` again afterwards.

Like the CLI, this sits above the workers and uses their dead-letter store.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

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
# The files: how often INFO persistence is read while Redis writes them, and for how long.
FILES_POLL_S = 0.1
FILES_WAIT_S = 600.0
NOT_REACHED = (
    "not reached: snapshots and backups taken before, the files of replicas, "
    "and the disk blocks the old files freed"
)


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


@dataclass(frozen=True, slots=True)
class ErasedProfile:
    """Whom an erasure is about: a profile key, a reference, or both."""

    profile_key: str | None = None
    reference: str | None = None

    def __post_init__(self) -> None:
        given = [value for value in (self.profile_key, self.reference) if value is not None]
        if not given or not all(value.strip() for value in given):
            # an empty name would match every profile's traces
            raise ValueError(
                "erase needs a profile key or a reference: an empty one would match every profile"
            )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(value for value in (self.profile_key, self.reference) if value is not None)

    def named_in(self, payload: Mapping[str, Any]) -> bool:
        """Whether an event payload is about this profile (current or legacy field names)."""
        profile = payload.get("profile")
        if not isinstance(profile, Mapping):
            return False
        keys = (profile.get("key"), profile.get("profile_key"))
        references = (profile.get("reference"), profile.get("profile_reference"))
        return (self.profile_key is not None and self.profile_key in keys) or (
            self.reference is not None and self.reference in references
        )

    def quoted_in(self, texts: Iterable[object]) -> bool:
        """Whether a text quotes the key or the reference as a whole word (``pk-1`` is not
        quoted in ``pk-10``)."""
        return any(
            _quoting(name).search(text)
            for name in self.names
            for text in texts
            if isinstance(text, str)
        )


def _quoting(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w.@+-]){re.escape(name)}(?![\w@+-]|\.\w)")


def names_profile(payload: Mapping[str, Any], profile_key: str) -> bool:
    """Whether an event payload is about ``profile_key`` (current or legacy field names)."""
    return ErasedProfile(profile_key=profile_key).named_in(payload)


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

    async def erase(self, erased: ErasedProfile) -> ErasureReport:
        jobs, job_events = await self._erase_jobs(erased)
        letters, letter_events = await self._erase_dead_letters(erased)
        markers = await self._erase_markers(job_events | letter_events)
        fingerprints = await self._erase_fingerprints(erased)
        logged, states = await self._erase_log(erased)
        return ErasureReport(jobs, letters, markers, fingerprints, logged, states)

    async def _erase_log(self, erased: ErasedProfile) -> tuple[int, int]:
        """(log entries, handled states) deleted; the states of every source, by pattern (the
        log may have dropped the entries that named them long before)."""
        log = EventLog(self.redis, self.keys)
        entries, states = 0, 0
        if erased.reference is not None:
            entries += (await log.erase(reference=erased.reference)).entries
        if erased.profile_key is not None:
            entries += (await log.erase(profile_key=erased.profile_key)).entries
            pattern = glob_escape(self.keys.handled_prefix(erased.profile_key)) + "*"
            found = [key async for key in self.redis.scan_iter(match=pattern, count=SCAN_BATCH)]
            states = int(await self.redis.delete(*found)) if found else 0
        return entries, states

    async def _erase_jobs(self, erased: ErasedProfile) -> tuple[int, set[str]]:
        """(runs deleted, their event ids); one event may have several runs."""
        jobs = 0
        event_ids: set[str] = set()
        async for job_keys in self._job_key_batches():
            for job_key, raw in zip(job_keys, await self.redis.mget(job_keys), strict=True):
                data = None if raw is None else _job_event(raw)
                if data is None or not erased.named_in(data.get("payload") or {}):
                    continue
                event = Event.from_dict(data)
                await self._forget_run(job_key.decode()[len(JOB_KEY_PREFIX) :], event)
                event_ids.add(event.id)
                jobs += 1
        return jobs, event_ids

    async def _job_key_batches(self) -> AsyncIterator[list[bytes]]:
        """Job keys a SCAN batch at a time, for one MGET each rather than a round trip per job
        (docs/benchmarks.md, erasure)."""
        batch: list[bytes] = []
        async for job_key in self.redis.scan_iter(match=JOB_KEY_PREFIX + "*", count=SCAN_BATCH):
            batch.append(job_key)
            if len(batch) == SCAN_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

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

    async def _erase_dead_letters(self, erased: ErasedProfile) -> tuple[int, set[str]]:
        # Letters are per (event, handler): several may share one event.
        found: list[tuple[str, str]] = [
            (letter["id"], letter["event"]["id"])
            async for letter in self.dead_letters.iter()
            if erased.named_in(letter["event"].get("payload") or {})
            or erased.quoted_in((letter.get("error") or {}).values())
        ]
        for letter_id, _ in found:
            await self.dead_letters.purge(letter_id)
        return len(found), {event_id for _, event_id in found}

    async def _erase_markers(self, event_ids: set[str]) -> int:
        if not event_ids:
            return 0
        return int(await self.redis.delete(*[self.keys.seen(eid) for eid in event_ids]))

    async def _erase_fingerprints(self, erased: ErasedProfile) -> int:
        """Write fingerprints (``written:<h>:<src>:<key>``) and locks naming the profile."""
        patterns = [
            f"{glob_escape(self.keys.lock_prefix)}*{glob_escape(name)}" for name in erased.names
        ]
        if erased.profile_key is not None:
            patterns.append(
                f"{glob_escape(self.keys.written_prefix)}*:{glob_escape(erased.profile_key)}"
            )
        found: set[bytes] = set()
        for pattern in patterns:
            async for key in self.redis.scan_iter(match=pattern, count=SCAN_BATCH):
                found.add(key)
        return int(await self.redis.delete(*found)) if found else 0


def glob_escape(text: str) -> str:
    """Redis MATCH patterns treat these as wildcards; a key is matched literally."""
    return re.sub(r"([\\*?\[\]^])", r"\\\1", text)


async def erase_profile(
    redis: Redis, keys: QueueKeys, profile_key: str | None = None, reference: str | None = None
) -> ErasureReport:
    return await ProfileEraser(redis, keys).erase(ErasedProfile(profile_key, reference))


# --- the files ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilesReport:
    """What became of each file Redis writes, a phrase each."""

    aof: str
    snapshot: str

    @property
    def line(self) -> str:
        return f"files: {self.aof}; {self.snapshot}"


@dataclass(frozen=True, slots=True)
class _Background:
    """A file Redis writes in a forked child, and the INFO persistence fields that tell."""

    command: tuple[str, ...]
    running: tuple[str, ...]  # fields that are 1 while it is under way or scheduled
    status: str  # 'ok' once the last one succeeded


AOF_REWRITE = _Background(
    ("BGREWRITEAOF",),
    ("aof_rewrite_in_progress", "aof_rewrite_scheduled"),
    "aof_last_bgrewrite_status",
)
# SCHEDULE: with an AOF rewrite under way, the snapshot is taken after it rather than refused.
SNAPSHOT = _Background(
    ("BGSAVE", "SCHEDULE"), ("rdb_bgsave_in_progress",), "rdb_last_bgsave_status"
)


async def rewrite_files(redis: Redis) -> FilesReport:
    """Rewrite the AOF and, when RDB snapshots are on, take a fresh one, each from what Redis
    holds after the erasure; waits for each file to be written."""
    try:
        info = await redis.info("persistence")
    except ResponseError:
        return FilesReport(
            "INFO persistence refused: the AOF was not rewritten", "no snapshot written"
        )
    if not info.get("aof_enabled"):
        aof = "AOF off, nothing to rewrite"
    else:
        aof = await _write(redis, AOF_REWRITE, "AOF rewritten")
    snapshot = await _fresh_snapshot(redis)
    return FilesReport(aof, snapshot)


async def _fresh_snapshot(redis: Redis) -> str:
    try:
        save: dict[str, str] = await redis.config_get("save")
    except ResponseError:
        return "CONFIG refused, so whether RDB snapshots are on is unknown: none written"
    if not save.get("save"):
        # A snapshot here would be loaded at the next start of a Redis without AOF.
        return "RDB snapshots off, none written"
    return await _write(redis, SNAPSHOT, "fresh snapshot written over dump.rdb")


async def _write(redis: Redis, job: _Background, done: str) -> str:
    """Start ``job`` (after one already under way, which may predate the erasure) and wait."""
    name = job.command[0]
    while True:
        try:
            await redis.execute_command(*job.command)  # type: ignore[no-untyped-call]
            break
        except ResponseError as error:
            if "in progress" not in str(error):
                return f"Redis refused {name} (managed Redis?), so the old file may still hold the erased data"
            if not await _finished(redis, job):
                return f"{name} still running after {FILES_WAIT_S:g} s: see INFO persistence"
    if not await _finished(redis, job):
        return f"{name} still running after {FILES_WAIT_S:g} s: see INFO persistence"
    info = await redis.info("persistence")
    if info.get(job.status) != "ok":
        return f"{name} failed ({job.status}: see the Redis log), so the old file may still hold the erased data"
    return done


async def _finished(redis: Redis, job: _Background) -> bool:
    deadline = time.monotonic() + FILES_WAIT_S
    while time.monotonic() < deadline:
        info = await redis.info("persistence")
        if not any(int(info.get(field, 0)) for field in job.running):
            return True
        await asyncio.sleep(FILES_POLL_S)
    return False
