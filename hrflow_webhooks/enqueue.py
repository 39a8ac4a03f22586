"""The enqueue path: group commit over connections of its own.

The script and the layout it writes are :mod:`hrflow_webhooks.queue`'s; this module
only decides how events reach Redis: batched per event-loop turn, packed once per
caller, over :class:`ScriptConnection` (docs/benchmarks.md). The receiver's deliveries
and the reconciler's finds both come this way, so deduplication, coalescing, per-subject
order and the event log apply to both alike.

With ``HRFLOW_REDIS_MIN_REPLICAS_ACK`` = N > 0, each batch's script is followed, in the
same write and on the same connection, by ``WAIT N <timeout>``: the batch's callers are
answered only once N replicas hold its writes (no extra round trip), and with fewer in
time they get :class:`ReplicasBehindError` (the receiver answers 503; the events may be
queued already, and HrFlow's resend then merges or is a duplicate, as any resend).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hrflow_webhooks.event_log import logged_subject
from hrflow_webhooks.events import ONCE, Event
from hrflow_webhooks.queue import (
    ENQUEUE_SCRIPT,
    ENQUEUE_STRIDE,
    EVENT_LOG_MAX_ENTRIES,
    QueueKeys,
    new_run_id,
    serialize_job,
    tag_of,
)
from hrflow_webhooks.settings import Settings

# Events per script call when callers are batched; a bigger call would hold Redis for longer.
MAX_BATCH_EVENTS = 1_000
# Script calls in flight at once. With one, the receiver idled while Redis (sharing the
# machine's cores) answered; a second keeps both busy. More did not help (docs/benchmarks.md).
MAX_CALLS_IN_FLIGHT = 2


def resp_bulk(value: bytes) -> bytes:
    """One command argument as Redis reads it (a RESP bulk string), as redis-py packs it."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


@dataclass(frozen=True, slots=True)
class PackedArguments:
    """A script call's keys then arguments, packed (:func:`resp_bulk`), and how many."""

    packed: list[bytes]  # each item may hold several arguments
    keys: int
    count: int  # keys and arguments


def _log_arguments(event_id: bytes, subject: bytes, event_type: bytes) -> bytes:
    """The event log's arguments of one event, packed in one operation (resp_bulk's format):
    three calls cost the receiver's hot path a measurable share (docs/benchmarks.md)."""
    return b"$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(event_id), event_id, len(subject), subject, len(event_type), event_type,
    )  # fmt: skip


def packed_script_call(command: bytes, arguments: PackedArguments) -> list[bytes]:
    """EVALSHA/EVAL as Redis reads it; ``command`` is the packed name and SHA (or script)."""
    head = b"*%d\r\n%s%s" % (3 + arguments.count, command, resp_bulk(b"%d" % arguments.keys))
    return [head, *arguments.packed]


class ReplicasBehindError(RedisError):
    """Fewer replicas than required acknowledged a batch in time: its events are not yet
    safe from the primary's loss."""

    def __init__(self, acknowledged: int, required: int) -> None:
        super().__init__(f"{acknowledged} of {required} replicas acknowledged the enqueue in time")
        self.acknowledged = acknowledged
        self.required = required


@dataclass(frozen=True, slots=True)
class ReplicaAck:
    """How many replicas must hold a script call's writes before it counts, and how long to
    wait for them (``WAIT``)."""

    replicas: int
    timeout_ms: int

    @classmethod
    def required_by(cls, settings: Settings) -> ReplicaAck | None:
        if settings.redis_min_replicas_ack < 1:
            return None
        return cls(settings.redis_min_replicas_ack, settings.redis_replica_ack_timeout_ms)

    def packed(self) -> bytes:
        return b"*3\r\n" + b"".join(
            resp_bulk(value) for value in (b"WAIT", b"%d" % self.replicas, b"%d" % self.timeout_ms)
        )


class ScriptConnection:
    """A Redis connection of the queue's own, for its script calls, one call at a time.

    Not the client's pool, for latency: each pool checkout polls the connection for
    unread data, which suspends the caller for an event-loop turn, and with a socket
    timeout redis-py 5 sends through ``asyncio.wait_for``: on Python 3.11, a task and two
    more turns. Under load a turn is a burst of deliveries, so a script call waited for
    several bursts and the receiver idled (docs/benchmarks.md). This connection has no
    unread data between calls by construction: a call that fails, times out or is
    cancelled leaves it disconnected, and the next call connects afresh. One deadline
    covers the call, and the replicas' acknowledgement when ``replica_ack`` asks for one.
    """

    def __init__(self, redis: Redis, script: str, replica_ack: ReplicaAck | None = None) -> None:
        pool = redis.connection_pool
        self.timeout_s: float | None = pool.connection_kwargs.get("socket_timeout")
        # The deadline below replaces the socket timeout, so reads and writes carry none.
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection: AbstractConnection = pool.connection_class(**kwargs)
        # Redis names scripts by SHA-1: an identifier, not a security measure.
        sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        self._evalsha = resp_bulk(b"EVALSHA") + resp_bulk(sha.encode())
        self._eval = resp_bulk(b"EVAL") + resp_bulk(script.encode())
        self._replica_ack = replica_ack
        self._wait = [replica_ack.packed()] if replica_ack else []

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
                    # was lost, its events read as duplicates or as merged into the runs the
                    # first one queued (the delivery is queued either way).
                    return await self._evaluate(arguments)
        except TimeoutError as error:  # redis-py's own type, like its socket timeout
            await self.close()
            raise RedisTimeoutError("Redis did not answer the enqueue script in time") from error
        except (ResponseError, ReplicasBehindError):
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
            [*packed_script_call(command, arguments), *self._wait], check_health=False
        )
        try:
            reply = await self._connection.read_response()
        except ResponseError:
            if self._wait:  # WAIT's answer is on its way all the same: read it, stay in step
                await self._connection.read_response()
            raise
        if self._replica_ack is not None:
            acknowledged = int(await self._connection.read_response())
            if acknowledged < self._replica_ack.replicas:
                raise ReplicasBehindError(acknowledged, self._replica_ack.replicas)
        return reply

    async def close(self) -> None:
        await self._connection.disconnect(nowait=True)


@dataclass(slots=True)
class _Pending:
    """One caller's events, waiting for the batch that writes them."""

    events: int
    keys: bytes  # (marker, order list) per event, packed
    runs: bytes  # (class and run id, job, then the log's fields) per event, packed
    done: asyncio.Future[list[int]]


class EventQueue:
    """Enqueue events on Redis with deduplication and coalescing, atomically, with group commit.

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
        log_max_entries: int = EVENT_LOG_MAX_ENTRIES,
        via: str = "http",
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_in_flight: int = MAX_CALLS_IN_FLIGHT,
        replica_ack: ReplicaAck | None = None,
    ) -> None:
        self.redis = redis
        self.keys = QueueKeys(queue_name)
        self._queue_and_log_keys = resp_bulk(queue_name.encode()) + resp_bulk(
            self.keys.log.encode()
        )
        self._log_arguments = resp_bulk(b"%d" % log_max_entries) + resp_bulk(via.encode())
        self._seen_prefix = self.keys.seen("").encode()  # marker_of(), without a call per event
        self._waiting_prefix = self.keys.waiting("").encode()
        self._order_prefix = self.keys.order_prefix.encode()
        self._window = b"%d" % dedup_window_s
        self.max_batch_events = max_batch_events
        # One connection per writer: a writer takes one when it starts, returns it when done.
        self._connections = tuple(
            ScriptConnection(redis, ENQUEUE_SCRIPT, replica_ack) for _ in range(max_in_flight)
        )
        self._free_connections = list(self._connections)
        self._waiting: list[_Pending] = []
        self._writing = 0  # writer tasks running; each sends batches while callers wait
        self._writers: set[asyncio.Task[None]] = set()  # strong references, for the loop
        # The loop is looked up once: on Python 3.11 each lookup is a getpid() system call.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def enqueue_events(self, events: Sequence[Event], request_id: str = "") -> list[int]:
        """Per event: :data:`QUEUED`, :data:`DUPLICATE` (once) or :data:`COALESCED` (latest).

        ``request_id`` goes to the event log with each event (the receiver's delivery id).
        """
        now_ms = int(time.time() * 1000)
        request = resp_bulk(request_id.encode())
        # Packed here, per caller: redis-py's pack_command took 3.6 µs per event in the
        # receiver's writer, which every caller of a batch waits for (docs/benchmarks.md).
        keys: list[bytes] = []
        runs: list[bytes] = []
        for event in events:
            subject = event.subject
            subject_tag = tag_of(subject)
            event_id = event.id.encode()
            once = event.event_class == ONCE
            marker = (self._seen_prefix if once else self._waiting_prefix) + event_id
            flag = "o" if once else "l"
            keys += (resp_bulk(marker), resp_bulk(self._order_prefix + subject_tag.encode()))
            run = flag + new_run_id(subject_tag)
            runs += (
                resp_bulk(run.encode()),
                resp_bulk(serialize_job(event, now_ms)),
                _log_arguments(
                    event_id,
                    # A reference is logged by its hash; the common case costs no call.
                    (logged_subject(subject) if "/reference:" in subject else subject).encode(),
                    event.canonical_type.encode(),
                ),
                request,
            )
        loop = self._loop or self._bind_loop()
        pending = _Pending(len(events), b"".join(keys), b"".join(runs), loop.create_future())
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
        fixed_arguments = (
            resp_bulk(self._window) + resp_bulk(b"%d" % (time.time() * 1000)) + self._log_arguments
        )
        arguments = PackedArguments(
            [
                self._queue_and_log_keys,
                *[p.keys for p in batch],
                fixed_arguments,
                *[p.runs for p in batch],
            ],
            keys=2 + 2 * events,
            count=2 + 2 * events + 4 + ENQUEUE_STRIDE * events,
        )
        try:
            outcomes = await connection.evaluate(arguments)
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
                pending.done.set_result(outcomes[start:end])
            start = end
