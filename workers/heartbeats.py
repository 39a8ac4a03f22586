"""Each worker's heartbeat, for the console: arq's health key holds one value for all
workers (the last writer's), so each worker also keeps its own field in one hash.

A worker writes its field every health-check interval and removes it when it stops; a
field older than :data:`FORGET_AFTER_S` (a killed worker's) is removed by the next
heartbeat of any worker. A worker is alive while its field is younger than
:data:`ALIVE_INTERVALS` intervals.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from hrflow_webhooks.queue import QueueKeys

FORGET_AFTER_S = 3_600.0
ALIVE_INTERVALS = 3


def worker_name() -> str:
    """How the event log and the console name a worker: its host (a container's id) and
    its process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    worker_id: str  # host:pid
    at: float  # epoch s
    running: int
    complete: int
    retried: int
    failed: int

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.at)

    def alive(self, interval_s: float, now: float | None = None) -> bool:
        return self.age_s(now) < ALIVE_INTERVALS * interval_s

    def to_json(self) -> bytes:
        fields = (self.at, self.running, self.complete, self.retried, self.failed)
        return orjson.dumps(fields)

    @classmethod
    def from_json(cls, worker_id: str, raw: bytes) -> WorkerBeat | None:
        try:
            at, running, complete, retried, failed = orjson.loads(raw)
            return cls(worker_id, float(at), int(running), int(complete), int(retried), int(failed))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None  # not ours (another version's format): shown as nothing


async def record_heartbeat(redis: Redis, keys: QueueKeys, beat: WorkerBeat) -> None:
    await redis.hset(keys.workers, beat.worker_id, beat.to_json().decode())  # type: ignore[misc]
    stale = [b.worker_id for b in await read_heartbeats(redis, keys) if b.age_s() > FORGET_AFTER_S]
    if stale:
        await redis.hdel(keys.workers, *stale)  # type: ignore[misc]


async def forget_worker(redis: Redis, keys: QueueKeys, worker_id: str) -> None:
    await redis.hdel(keys.workers, worker_id)  # type: ignore[misc]


async def read_heartbeats(redis: Redis, keys: QueueKeys) -> list[WorkerBeat]:
    """Every worker's last heartbeat, the most recent first."""
    raw: dict[bytes, bytes] = await redis.hgetall(keys.workers)  # type: ignore[misc]
    beats = [WorkerBeat.from_json(name.decode(), value) for name, value in raw.items()]
    return sorted((b for b in beats if b is not None), key=lambda b: b.at, reverse=True)
