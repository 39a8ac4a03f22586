"""Dead letters: events a handler could not process, kept in Redis with the reason until a
person replays or purges them. They never expire, unlike arq's result keys.

One dead letter per (event, handler); its id is derived from both, so failing
again after a replay overwrites the same entry instead of piling up copies.
A dead letter marks its handler ``dead`` in its run's completion markers, so
the run's other retries skip it; those markers go with the run, so a later
run of an identical event is never skipped because of a dead letter. A replay
queues a new run of the event for that handler only, behind the subject's
other runs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from hrflow_webhooks.event_log import packed_entry
from hrflow_webhooks.events import Event
from hrflow_webhooks.queue import (
    DEAD,
    DEAD_LETTER_SCRIPT,
    EVENT_LOG_MAX_ENTRIES,
    REPLAY_SCRIPT,
    RUN_MARKERS_LIFETIME_S,
    Fence,
    QueueKeys,
    new_run_id,
    serialize_job,
    tag_of,
)


def dead_letter_id(event_id: str, handler: str) -> str:
    return hashlib.sha256(f"{event_id}\n{handler}".encode()).hexdigest()[:20]


def describe_error(error: BaseException) -> dict[str, Any]:
    """The error as stored: type, message and, for HrFlow API errors, status and message."""
    return {
        "type": type(error).__name__,
        "message": str(error)[:1_000],
        "status": getattr(error, "status", None),
        "hrflow_message": getattr(error, "hrflow_message", None),
        "transient": getattr(error, "transient", None),
    }


@dataclass(frozen=True, slots=True)
class DeadLetters:
    redis: Redis
    keys: QueueKeys
    log_max_entries: int = EVENT_LOG_MAX_ENTRIES
    _write_script: Any = field(init=False)  # redis-py's AsyncScript, registered once

    def __post_init__(self) -> None:
        object.__setattr__(self, "_write_script", self.redis.register_script(DEAD_LETTER_SCRIPT))

    async def add(
        self,
        event: Event,
        run_id: str,
        handler: str,
        error: BaseException,
        tries: int,
        reason: str,
        fence: Fence | None = None,
    ) -> str | None:
        """The letter's id; None when ``fence`` says the run is no longer the writer's (its
        new holder writes the outcome)."""
        letter_id = dead_letter_id(event.id, handler)
        now = time.time()
        letter = {
            "id": letter_id,
            "event": event.to_dict(),
            "run_id": run_id,
            "handler": handler,
            "reason": reason,
            "error": describe_error(error),
            "tries": tries,
            "received_at": event.received_at,
            "dead_at": now,
        }
        fence = fence or Fence.unfenced(run_id, self.keys)
        keys = [self.keys.dead_letter(letter_id), self.keys.dead_letters, self.keys.done(run_id)]
        args = [letter_id, orjson.dumps(letter), repr(now), handler, RUN_MARKERS_LIFETIME_S]
        written = await self._write_script(
            keys=[*keys, *fence.keys], args=[*args, DEAD, fence.token]
        )
        return letter_id if written else None

    async def get(self, letter_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.dead_letter(letter_id))
        return None if raw is None else dict(orjson.loads(raw))

    async def ids(self, since: float | None = None) -> list[str]:
        members = await self.redis.zrangebyscore(
            self.keys.dead_letters, "-inf" if since is None else since, "+inf"
        )
        return [m.decode() for m in members]

    async def iter(
        self, event_type: str | None = None, since: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        for letter_id in await self.ids(since):
            letter = await self.get(letter_id)
            if letter is None:
                continue
            event = letter["event"]
            if event_type in (None, event["type"], event["canonical_type"]):
                yield letter

    async def count(self) -> int:
        return int(await self.redis.zcard(self.keys.dead_letters))

    async def replay(self, letter_id: str) -> bool:
        """Queue a new run of the event for this handler only, through the normal job path.

        One script claims the letter and queues the run, so replaying twice (or from two
        terminals at once) queues it once, and a crash cannot leave it half replayed.
        False: nothing to replay.
        """
        letter = await self.get(letter_id)
        if letter is None:
            return False
        event = Event.from_dict(letter["event"])
        now_ms = int(time.time() * 1000)
        subject_tag = tag_of(event.subject)
        keys = [
            self.keys.queue,
            self.keys.dead_letters,
            self.keys.dead_letter(letter_id),
            self.keys.order(subject_tag),
            self.keys.log,
        ]
        job = serialize_job(event, now_ms, handlers=[letter["handler"]])
        run_id = new_run_id(subject_tag)
        detail = {"dead_letter_id": letter_id, "handler": letter["handler"]}
        entry = packed_entry(
            "replay", event.id, run_id, event.subject, event.canonical_type, "queued", detail
        )
        args = [letter_id, run_id, job, str(now_ms), self.log_max_entries, *entry]
        replayed = self.redis.eval(REPLAY_SCRIPT, len(keys), *keys, *args)  # type: ignore[arg-type]
        return bool(await replayed)  # type: ignore[misc]

    async def purge(self, letter_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.dead_letters, letter_id)
            pipe.delete(self.keys.dead_letter(letter_id))
            removed, deleted = await pipe.execute()
        return bool(removed or deleted)
