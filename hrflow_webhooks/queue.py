"""The queue seam: the only module that knows how events sit on Redis.

The receiver calls :func:`enqueue_events`; the workers are arq workers whose
job function is :data:`JOB_FUNCTION`. Jobs use arq's own layout (a job key
``arq:job:<id>`` plus a member of the queue's sorted set) serialised as JSON,
but are written by one Lua script, so a delivery costs one round trip however
many events it carries, and the dedup check and the enqueue are atomic: an
event is either marked seen *and* queued, or neither.

Key layout (``<p>`` is the queue name, ``hrflow:queue`` by default):

============================= ==============================================
``<p>``                        arq's queue (sorted set of job ids by run time)
``arq:job:<event id>``         the job: ``{"f", "a": [event], "k", "t", "et"}``
``<p>:seen:<event id>``        dedup marker, expires after the dedup window
``<p>:done:<event id>``        hash handler → outcome, one per event
``<p>:dead:<dead-letter id>``  one dead letter (JSON), no expiry
``<p>:dead-letters``           sorted set of dead-letter ids by time
``<p>:unrouted``               hash canonical type → events with no handler
============================= ==============================================
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hrflow_webhooks.events import Event

JOB_FUNCTION = "handle_event"
JOB_KEY_PREFIX = "arq:job:"  # arq's own prefix: its worker reads jobs from there
JOB_KEY_PREFIX_BYTES = JOB_KEY_PREFIX.encode()
# Events per script call when callers are batched; a bigger call would hold Redis for longer.
MAX_BATCH_EVENTS = 1_000
# Script calls in flight at once. With one, the receiver idled while Redis (sharing the
# machine's cores) answered; a second keeps both busy. More did not help (docs/benchmarks.md).
MAX_CALLS_IN_FLIGHT = 2


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Every Redis key the service owns, derived from the queue name."""

    queue: str

    def seen(self, event_id: str) -> str:
        return f"{self.queue}:seen:{event_id}"

    def done(self, event_id: str) -> str:
        return f"{self.queue}:done:{event_id}"

    def dead_letter(self, dead_letter_id: str) -> str:
        return f"{self.queue}:dead:{dead_letter_id}"

    @property
    def dead_letters(self) -> str:
        return f"{self.queue}:dead-letters"

    @property
    def unrouted(self) -> str:
        return f"{self.queue}:unrouted"

    @property
    def health_check(self) -> str:
        return f"{self.queue}:health-check"  # arq's default for a queue name

    @staticmethod
    def job(job_id: str) -> str:
        return JOB_KEY_PREFIX + job_id


# KEYS: queue, then (seen key, job key) per event. ARGV: window s, score ms, then job per event.
# Returns 1 per queued event, 0 per duplicate.
# The seen marker is written last. Redis does not roll a script back; it refuses a script for
# lack of memory only at its first write (tests/test_queue.py), but should any write fail
# half-way, an event may then be queued without its marker (a retried delivery rewrites the
# same job id: harmless), never marked without its job (a retried delivery would be
# acknowledged as a duplicate and the event lost).
_ENQUEUE_SCRIPT = """
local window, score = ARGV[1], ARGV[2]
local queued = {}
for i = 2, #KEYS, 2 do
  local n = i / 2
  if redis.call('EXISTS', KEYS[i]) == 1 then
    queued[n] = 0
  else
    redis.call('SET', KEYS[i + 1], ARGV[n + 2])
    redis.call('ZADD', KEYS[1], score, string.sub(KEYS[i + 1], #'arq:job:' + 1))
    redis.call('SET', KEYS[i], '1', 'EX', window)
    queued[n] = 1
  end
end
return queued
"""


# KEYS: the event's done hash. ARGV: handler name, dedup window s. One call, atomic: the
# marker never exists without its expiry, in one round trip instead of MULTI/EXEC's four.
MARK_DONE_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], 'ok')
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""


def resp_bulk(value: bytes) -> bytes:
    """One command argument as Redis reads it (a RESP bulk string), as redis-py packs it."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def serialize_job(event: Event, enqueue_time_ms: int, job_try: int | None = None) -> bytes:
    """arq's job layout, as JSON rather than arq's default pickle."""
    job: dict[str, Any] = {
        "t": job_try,
        "f": JOB_FUNCTION,
        "a": [event.to_dict()],
        "k": {},
        "et": enqueue_time_ms,
    }
    return orjson.dumps(job)


def deserialize_job(data: bytes) -> dict[str, Any]:
    job: dict[str, Any] = orjson.loads(data)
    return job


@dataclass(frozen=True, slots=True)
class PackedArguments:
    """A script call's keys then arguments, packed (:func:`resp_bulk`), and how many."""

    packed: list[bytes]  # each item may hold several arguments
    keys: int
    count: int  # keys and arguments


def packed_script_call(command: bytes, arguments: PackedArguments) -> list[bytes]:
    """EVALSHA/EVAL as Redis reads it; ``command`` is the packed name and SHA (or script)."""
    head = b"*%d\r\n%s%s" % (3 + arguments.count, command, resp_bulk(b"%d" % arguments.keys))
    return [head, *arguments.packed]


class ScriptConnection:
    """A Redis connection of the queue's own, for its script calls, one call at a time.

    Not the client's pool, for latency: each pool checkout polls the connection for
    unread data, which suspends the caller for an event-loop turn, and with a socket
    timeout redis-py 5 sends through ``asyncio.wait_for``: on Python 3.11, a task and two
    more turns. Under load a turn is a burst of deliveries, so a script call waited for
    several bursts and the receiver idled (docs/benchmarks.md). This connection has no
    unread data between calls by construction: a call that fails, times out or is
    cancelled leaves it disconnected, and the next call connects afresh. One deadline
    covers the call.
    """

    def __init__(self, redis: Redis, script: str) -> None:
        pool = redis.connection_pool
        self.timeout_s: float | None = pool.connection_kwargs.get("socket_timeout")
        # The deadline below replaces the socket timeout, so reads and writes carry none.
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection: AbstractConnection = pool.connection_class(**kwargs)
        # Redis names scripts by SHA-1: an identifier, not a security measure.
        sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        self._evalsha = resp_bulk(b"EVALSHA") + resp_bulk(sha.encode())
        self._eval = resp_bulk(b"EVAL") + resp_bulk(script.encode())

    async def evaluate(self, arguments: PackedArguments) -> Any:
        """Run the script; one more try on a fresh connection if a kept one was found closed."""
        kept = self._connection.is_connected
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    return await self._evaluate(arguments)
                except RedisConnectionError:
                    if not kept:
                        raise
                    # Redis restarted or failed over, or dropped the idle connection, since
                    # the last call (the pool's checkout poll used to catch this). A second
                    # run cannot lose or double an event; if the first ran and only its reply
                    # was lost, its events read as duplicates (the delivery is still queued).
                    return await self._evaluate(arguments)
        except TimeoutError as error:  # redis-py's own type, like its socket timeout
            await self.close()
            raise RedisTimeoutError("Redis did not answer the enqueue script in time") from error
        except ResponseError:
            raise  # Redis answered (with an error): the connection is in step
        except BaseException:
            await self.close()  # a reply may still be on its way: never reuse the socket
            raise

    async def _evaluate(self, arguments: PackedArguments) -> Any:
        """EVALSHA, or EVAL when Redis does not know the script (restarted, SCRIPT FLUSH)."""
        try:
            return await self._command(self._evalsha, arguments)
        except NoScriptError:
            return await self._command(self._eval, arguments)

    async def _command(self, command: bytes, arguments: PackedArguments) -> Any:
        await self._connection.send_packed_command(
            packed_script_call(command, arguments), check_health=False
        )
        return await self._connection.read_response()

    async def close(self) -> None:
        await self._connection.disconnect(nowait=True)


@dataclass(slots=True)
class _Pending:
    """One caller's events, waiting for the batch that writes them."""

    events: int
    keys: bytes  # (seen key, job key) per event, packed
    jobs: bytes  # one job per event, packed
    done: asyncio.Future[list[bool]]


class EventQueue:
    """Enqueue events on Redis with deduplication, atomically, with group commit.

    Concurrent callers share round trips: while ``max_in_flight`` script calls
    are in flight, new callers wait in a batch, and the next call writes the
    whole batch. One busy receiver thus pays for a few Redis calls per
    event-loop turn instead of one per delivery (the Redis client's Python
    overhead, not Redis, was the cost), and a lone delivery still goes out at
    once. Each caller returns only after the script that wrote its events has
    answered: an acknowledged event is durably queued, as before. Calls in
    flight together stay correct: Redis runs scripts one at a time, and with
    ``appendfsync always`` it syncs a script's writes before any later reply.
    The calls go over the queue's own connections (:class:`ScriptConnection`):
    close them with :meth:`aclose`, or use the queue as ``async with``.
    """

    def __init__(
        self,
        redis: Redis,
        queue_name: str,
        dedup_window_s: int,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_in_flight: int = MAX_CALLS_IN_FLIGHT,
    ) -> None:
        self.redis = redis
        self.keys = QueueKeys(queue_name)
        self._seen_prefix = self.keys.seen("").encode()
        self._queue_key = resp_bulk(queue_name.encode())
        self._window = b"%d" % dedup_window_s
        self.max_batch_events = max_batch_events
        # One connection per writer: a writer takes one when it starts, returns it when done.
        self._connections = tuple(
            ScriptConnection(redis, _ENQUEUE_SCRIPT) for _ in range(max_in_flight)
        )
        self._free_connections = list(self._connections)
        self._waiting: list[_Pending] = []
        self._writing = 0  # writer tasks running; each sends batches while callers wait
        self._writers: set[asyncio.Task[None]] = set()  # strong references, for the loop
        # The loop is looked up once: on Python 3.11 each lookup is a getpid() system call.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def enqueue_events(self, events: Sequence[Event]) -> list[bool]:
        """Queue each event not seen within the dedup window; True where it was queued."""
        now_ms = int(time.time() * 1000)
        # Packed here, per caller: redis-py's pack_command took 3.6 µs per event in the
        # receiver's writer, which every caller of a batch waits for (docs/benchmarks.md).
        keys: list[bytes] = []
        jobs: list[bytes] = []
        for event in events:
            event_id = event.id.encode()
            keys += (
                resp_bulk(self._seen_prefix + event_id),
                resp_bulk(JOB_KEY_PREFIX_BYTES + event_id),
            )
            jobs.append(resp_bulk(serialize_job(event, now_ms)))
        loop = self._loop or self._bind_loop()
        pending = _Pending(len(events), b"".join(keys), b"".join(jobs), loop.create_future())
        self._waiting.append(pending)
        if self._writing < len(self._connections):
            self._writing += 1
            writer = loop.create_task(self._write_batches())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        # A caller that goes away cancels only its own future: a writer task, not the
        # caller, sends the batch, so the other callers' events are written all the same.
        return await pending.done

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    async def aclose(self) -> None:
        """Let the batches being written finish, then close the queue's own connections.

        Closing under a writer would read as a dropped connection, and the writer would
        open a new one (its one retry) that nothing then closes. Each call has a deadline,
        so the wait is bounded. The Redis client's pool is the caller's to close.
        """
        if self._writers:
            await asyncio.wait(self._writers)
        for connection in self._connections:
            await connection.close()

    async def __aenter__(self) -> EventQueue:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _write_batches(self) -> None:
        connection = self._free_connections.pop()  # there are as many as writers may run
        try:
            while self._waiting:
                await self._write(connection, self._next_batch())
        finally:  # no await between the last check of _waiting and this: no caller is missed
            self._writing -= 1
            self._free_connections.append(connection)

    def _next_batch(self) -> list[_Pending]:
        """Callers in arrival order, up to ``max_batch_events`` (always at least one caller)."""
        taken, events = 0, 0
        for pending in self._waiting:
            if taken and events + pending.events > self.max_batch_events:
                break
            taken, events = taken + 1, events + pending.events
        batch, self._waiting = self._waiting[:taken], self._waiting[taken:]
        return batch

    async def _write(self, connection: ScriptConnection, batch: list[_Pending]) -> None:
        events = sum(pending.events for pending in batch)
        window_and_score = resp_bulk(self._window) + resp_bulk(b"%d" % (time.time() * 1000))
        arguments = PackedArguments(
            [self._queue_key, *[p.keys for p in batch], window_and_score, *[p.jobs for p in batch]],
            keys=1 + 2 * events,
            count=1 + 2 * events + 2 + events,
        )
        try:
            flags = await connection.evaluate(arguments)
        except Exception as error:  # every caller of the batch learns of the failure
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(error)
            return
        except BaseException:  # cancelled (shutdown): its callers are cancelled, not left waiting
            for pending in batch + self._waiting:
                pending.done.cancel()
            self._waiting = []
            raise
        start = 0
        for pending in batch:
            end = start + pending.events
            if not pending.done.done():
                pending.done.set_result([bool(flag) for flag in flags[start:end]])
            start = end
