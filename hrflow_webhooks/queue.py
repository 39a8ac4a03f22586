"""The queue seam and the one owner of the Redis layout.

Every key the service writes and every Lua script it runs are defined here;
the receiver, the workers, dead letters, erasure, health and stats import them
instead of building key strings. The receiver calls :func:`EventQueue.enqueue_events`;
the workers are arq workers whose job function is :data:`JOB_FUNCTION`. Jobs
use arq's own layout (a job key plus a member of the queue's sorted set),
serialised as JSON, so arq's format stays behind this module.

**Runs.** A run is one execution of the handlers for an event (or for a group
of identical waiting notifications). Its id is ``<subject tag>.<n>``, with ``n``
unique per process that queued it (:func:`new_run_id`): never the event id, so
finishing an old run can never delete a newer one, and the claim script finds
the run's subject from the id alone. One script per delivery decides, per event (``events.Event``):

- a *once* event already seen inside the dedup window is a duplicate (0);
- a *latest* event identical to one whose run is still waiting (queued, parked
  or deferred for a retry with none of its handlers done, and not running)
  merges into it (2): that run reads the subject's current state anyway;
- otherwise a new run is queued (1) and appended to its subject's order list.

**Per-subject order.** Runs of one subject run one at a time, in arrival order:
the claim only takes a run that heads its subject's order list; a run behind
another is parked (its score moved later) without taking a worker slot or a
try, and the run ahead wakes it when it finishes (:data:`FINISH_RUN_SCRIPT`).

Key layout (``<q>`` is the queue name, ``hrflow:queue`` by default):

================================ ===============================================
``<q>``                          arq's queue (sorted set of run ids by due time)
``arq:job:<run id>``             the job: ``{"f", "a": [event], "k", "t", "et"}``
``arq:in-progress:<run id>``     arq's claim of a run (``arq:retry:``: its tries)
``<q>:order:<subject tag>``      list of the subject's run ids, oldest first
``<q>:seen:<event id>``          once events: dedup marker, for the dedup window
``<q>:waiting:<event id>``       latest events: the newest run of this notification
``<q>:done:<run id>``            hash handler → ok | dead, while the run lives
``<q>:dead:<dead-letter id>``    one dead letter (JSON), no expiry
``<q>:dead-letters``             sorted set of dead-letter ids by time
``<q>:unrouted``                 hash canonical type → events with no handler (256 types)
``<q>:skipped``                  hash ``<handler>:<reason>`` → events skipped
``<q>:written:<h>:<src>:<key>``  a handler's write fingerprint (echo detection)
``<q>:lock:<h>:<name>``          a handler's lock across workers
``<q>:api-budget``               the HrFlow API rate budget (token bucket)
``<q>:redis-marker``             start marker: gone or replaced means Redis lost its data
``<q>:data-loss``                the notice of a detected loss (an hour)
``<q>:readyz``                   the receiver's readiness probe write
``<q>:health-check``             arq's worker health key
================================ ===============================================

Tags are sha256 prefixes, and event ids sha256 digests: key names stay short and
hold no profile key.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import secrets
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

from hrflow_webhooks.events import ONCE, Event

JOB_FUNCTION = "handle_event"
# arq's own prefixes (arq.constants; tests/test_queue.py checks they still match): its
# worker reads jobs from there.
JOB_KEY_PREFIX = "arq:job:"
IN_PROGRESS_KEY_PREFIX = "arq:in-progress:"
RETRY_KEY_PREFIX = "arq:retry:"
RESULT_KEY_PREFIX = "arq:result:"
JOB_KEY_PREFIX_BYTES = JOB_KEY_PREFIX.encode()
# Events per script call when callers are batched; a bigger call would hold Redis for longer.
MAX_BATCH_EVENTS = 1_000
# Script calls in flight at once. With one, the receiver idled while Redis (sharing the
# machine's cores) answered; a second keeps both busy. More did not help (docs/benchmarks.md).
MAX_CALLS_IN_FLIGHT = 2
# How long a run whose subject is busy stays parked before the claim looks at it again. The
# run ahead wakes it when it finishes; this only bounds recovery when that run was lost.
PARK_MS = 2_000
# A run's completion markers outlive any run's retries (tries x backoff, grace); the run's
# finish removes them, this only bounds what a lost run leaves behind.
RUN_MARKERS_LIFETIME_S = 86_400
# Completion-marker values of a run's handlers: a retry of the run skips every one of them.
DONE, DEAD, SKIPPED = "ok", "dead", "skip"
# Outcomes of the enqueue script, per event.
DUPLICATE, QUEUED, COALESCED = 0, 1, 2
_TAG_HEX = 24  # 96 bits: a collision would only serialise (or merge) two subjects' runs


def tag_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_TAG_HEX]


# Run ids: a random prefix per process and a counter. Unique across processes without a Redis
# round trip or command per run (a Redis counter cost the receiver's script one more command).
_RUN_PREFIX = secrets.token_hex(6)
_run_numbers = itertools.count()


def _new_run_prefix() -> None:
    """A forked child (a server that imports the app before forking) gets a prefix of its own."""
    global _RUN_PREFIX, _run_numbers
    _RUN_PREFIX = secrets.token_hex(6)
    _run_numbers = itertools.count()


os.register_at_fork(after_in_child=_new_run_prefix)


def new_run_id(subject_tag: str) -> str:
    return f"{subject_tag}.{_RUN_PREFIX}{next(_run_numbers):x}"


def subject_tag_of_run(run_id: str) -> str | None:
    """The subject tag of a run id; None for ids of the older layout (the event id)."""
    tag, dot, number = run_id.partition(".")
    return tag if dot and number else None


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Every Redis key the service owns, derived from the queue name."""

    queue: str

    # --- runs and their order ------------------------------------------------------------
    def order(self, subject_tag: str) -> str:
        return f"{self.queue}:order:{subject_tag}"

    def order_of_run(self, run_id: str) -> str | None:
        tag = subject_tag_of_run(run_id)
        return None if tag is None else self.order(tag)

    @property
    def order_prefix(self) -> str:
        return self.order("")

    def seen(self, event_id: str) -> str:
        return f"{self.queue}:seen:{event_id}"

    def waiting(self, event_id: str) -> str:
        return f"{self.queue}:waiting:{event_id}"

    def marker_of(self, event: Event) -> str:
        """The key the enqueue script decides with: dedup (once) or waiting run (latest)."""
        return self.seen(event.id) if event.event_class == ONCE else self.waiting(event.id)

    def done(self, run_id: str) -> str:
        return f"{self.queue}:done:{run_id}"

    # --- what handlers and operators leave ---------------------------------------------------
    def dead_letter(self, dead_letter_id: str) -> str:
        return f"{self.queue}:dead:{dead_letter_id}"

    @property
    def dead_letters(self) -> str:
        return f"{self.queue}:dead-letters"

    @property
    def unrouted(self) -> str:
        return f"{self.queue}:unrouted"

    @property
    def skipped(self) -> str:
        return f"{self.queue}:skipped"

    @property
    def written_prefix(self) -> str:
        return f"{self.queue}:written:"

    def written(self, handler: str, source_key: str, profile_key: str) -> str:
        return f"{self.written_prefix}{handler}:{source_key}:{profile_key}"

    @property
    def lock_prefix(self) -> str:
        return f"{self.queue}:lock:"

    def lock(self, handler: str, name: str) -> str:
        return f"{self.lock_prefix}{handler}:{name}"

    @property
    def api_budget(self) -> str:
        return f"{self.queue}:api-budget"

    @property
    def start_marker(self) -> str:
        return f"{self.queue}:redis-marker"

    @property
    def data_loss(self) -> str:
        return f"{self.queue}:data-loss"

    @property
    def readiness_probe(self) -> str:
        return f"{self.queue}:readyz"

    @property
    def health_check(self) -> str:
        return f"{self.queue}:health-check"  # arq's default for a queue name

    # --- arq's keys of a run --------------------------------------------------------------
    @staticmethod
    def job(job_id: str) -> str:
        return JOB_KEY_PREFIX + job_id

    @staticmethod
    def in_progress(job_id: str) -> str:
        return IN_PROGRESS_KEY_PREFIX + job_id

    @staticmethod
    def retry(job_id: str) -> str:
        return RETRY_KEY_PREFIX + job_id

    @staticmethod
    def result(job_id: str) -> str:
        return RESULT_KEY_PREFIX + job_id


# A new run: its job, its place in the queue and in its subject's order. Shared by the enqueue
# and replay scripts; KEYS[1] is the queue. (No expiry on the order list: a run leaves it when
# it ends, and a head whose job is gone is skipped by the claim.)
_NEW_RUN_LUA = """
local function new_run(run_id, order, job, score)
  redis.call('SET', 'arq:job:' .. run_id, job)
  redis.call('ZADD', KEYS[1], score, run_id)
  redis.call('RPUSH', order, run_id)
end
"""

# KEYS: queue, then (marker, order list) per event: the marker is the seen key of a once
# event, the waiting key of a latest one. ARGV: window s, score ms, then (class 'o' or 'l'
# followed by a new run id, job) per event. Returns per event 1 queued, 0 duplicate, 2
# coalesced.
# A latest event merges only into a run that is still waiting: its job exists, no worker holds
# it (arq's in-progress key) and none of its handlers is done (a retry would not run those
# again), so a notification that arrives once a run has read anything always gets a run
# after it. The seen marker is written last. Redis does not roll a script back; it refuses a
# script for lack of memory only at its first write (tests/test_queue.py), but should any
# write fail half-way, an event may then be queued without its marker (a retried delivery
# queues it again: harmless), never marked without its job (a retried delivery would be
# acknowledged as a duplicate and the event lost).
_ENQUEUE_SCRIPT = (
    _NEW_RUN_LUA
    + """
local window, score = ARGV[1], ARGV[2]
local outcomes = {}
for n = 1, (#KEYS - 1) / 2 do
  local marker, order = KEYS[2 * n], KEYS[2 * n + 1]
  local class_and_run, job = ARGV[2 * n + 1], ARGV[2 * n + 2]
  local run_id = string.sub(class_and_run, 2)
  if string.sub(class_and_run, 1, 1) == 'o' then
    if redis.call('EXISTS', marker) == 1 then
      outcomes[n] = 0
    else
      new_run(run_id, order, job, score)
      redis.call('SET', marker, '1', 'EX', window)
      outcomes[n] = 1
    end
  else
    local waiting = redis.call('GET', marker)
    if waiting and redis.call('EXISTS', 'arq:job:' .. waiting) == 1
        and redis.call('EXISTS', 'arq:in-progress:' .. waiting) == 0
        and redis.call('EXISTS', KEYS[1] .. ':done:' .. waiting) == 0 then
      outcomes[n] = 2
    else
      new_run(run_id, order, job, score)
      redis.call('SET', marker, run_id, 'EX', window)
      outcomes[n] = 1
    end
  end
end
return outcomes
"""
)

# Whether a run may start: it heads its subject's order list (or is in none: an older
# layout's job). A head whose job is gone (erased, or dropped by arq) is skipped for good.
SUBJECT_FREE_LUA = """
local function subject_free(run_id, order_prefix)
  local tag = string.match(run_id, '^([0-9a-f]+)%.')
  if not tag then return true end
  local order = order_prefix .. tag
  while true do
    local head = redis.call('LINDEX', order, 0)
    if not head or head == run_id then return true end
    if redis.call('EXISTS', 'arq:job:' .. head) == 1 then
      return not redis.call('LPOS', order, run_id)
    end
    redis.call('LPOP', order)
  end
end
"""

# arq's checks for each candidate (still queued, due, not in progress anywhere), then the
# subject's order, then arq's own in-progress write; a run whose subject is busy is parked.
# KEYS: the queue. ARGV: now (ms), in-progress lifetime (ms), most to claim, order prefix, park
# (ms), then the candidates' ids. Only ids travel: with several workers most candidates are
# the other workers' running jobs, and arq reads five per free slot. (Keys are derived here,
# not declared: arq's layout already assumes one Redis server, not a cluster.)
# Returns id, score, id, score... in queue order.
CLAIM_SCRIPT = (
    SUBJECT_FREE_LUA
    + """
local claimed = {}
local now, lifetime, most = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local order_prefix, park = ARGV[4], tonumber(ARGV[5])
for i = 6, #ARGV do
  if #claimed >= most * 2 then
    break
  end
  local run_id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], run_id)
  local in_progress = 'arq:in-progress:' .. run_id
  if score and tonumber(score) <= now and redis.call('EXISTS', in_progress) == 0 then
    if subject_free(run_id, order_prefix) then
      redis.call('SET', in_progress, '1', 'PX', lifetime)
      claimed[#claimed + 1] = run_id
      claimed[#claimed + 1] = score
    else
      redis.call('ZADD', KEYS[1], now + park, run_id)
    end
  end
end
return claimed
"""
)

# Gives back the try arq counted when this start of the run did not use it (its subject was
# busy, or not readable yet). Idempotent, so a command the client re-sends after a dropped
# connection cannot grant a try: the counter only goes down to the floor (this try - 1).
_GIVE_BACK_TRY_LUA = """
local function give_back_try(retry_key, floor)
  if (tonumber(redis.call('GET', retry_key)) or 0) > tonumber(floor) then
    redis.call('DECR', retry_key)
  end
end
"""

# KEYS: the run's retry key. ARGV: floor (see above).
GIVE_BACK_TRY_SCRIPT = _GIVE_BACK_TRY_LUA + "give_back_try(KEYS[1], ARGV[1])"

# For a worker that did not claim through the claim script (the plain `arq` command): the
# job asks here first. KEYS: the run's retry key. ARGV: run id, order prefix, floor. 1: go
# on. 0: the subject is busy; the try is given back, and the job defers itself.
BEGIN_RUN_SCRIPT = (
    SUBJECT_FREE_LUA
    + _GIVE_BACK_TRY_LUA
    + """
if subject_free(ARGV[1], ARGV[2]) then return 1 end
give_back_try(KEYS[1], ARGV[3])
return 0
"""
)

# The run is over (handled, dead-lettered, skipped or unrouted): it leaves its subject's
# order, wakes the run behind it, and its job and markers go, atomically, so nothing can run
# it again even if arq's own bookkeeping after it fails. KEYS: queue, order list (or the
# queue again for an older job), job, done hash. ARGV: run id, now ms.
FINISH_RUN_SCRIPT = """
local queue, order, run_id, now = KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2])
if order ~= queue then
  redis.call('LREM', order, 1, run_id) -- the head, unless the run was erased meanwhile
  local next_run = redis.call('LINDEX', order, 0)
  if next_run then
    local due = redis.call('ZSCORE', queue, next_run)
    if due and tonumber(due) > now then redis.call('ZADD', queue, now, next_run) end
  end
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', queue, run_id)
"""

# Erasure: a run leaves the queue, its subject's order and the (type, subject)'s waiting
# pointer. KEYS: queue, order list, the event's marker, then the run's own keys to delete.
# ARGV: run id.
FORGET_RUN_SCRIPT = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then
  redis.call('DEL', KEYS[3])
end
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
"""

# Unrouted events by type, in a table of at most ARGV[2] types: a type that does not fit is
# counted under OTHER_TYPES. KEYS: the unrouted hash. ARGV: type, most types.
UNROUTED_TYPES_MAX = 256
OTHER_TYPES = "(other types)"
COUNT_UNROUTED_SCRIPT = f"""
local field = ARGV[1]
if redis.call('HEXISTS', KEYS[1], field) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then
  field = '{OTHER_TYPES}'
end
redis.call('HINCRBY', KEYS[1], field, 1)
"""

# KEYS: the run's done hash. ARGV: handler name, marker lifetime s, value (ok | dead). One
# call, atomic: the marker never exists without its expiry.
MARK_HANDLER_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: queue, dead-letter index, the letter, the order list. ARGV: letter id, new run id, job,
# score ms. Claims the letter and queues a new run for it, or returns 0.
REPLAY_SCRIPT = (
    _NEW_RUN_LUA
    + """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
new_run(ARGV[2], KEYS[4], ARGV[3], ARGV[4])
redis.call('DEL', KEYS[3])
return 1
"""
)


# The HrFlow API rate budget (hrflow_webhooks.client.rate), a token bucket. KEYS: bucket. ARGV: rate per s, burst, key TTL ms. Returns 0 (token taken) or ms to wait.
RATE_BUDGET_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local last_ms = tonumber(state[2]) or now_ms
tokens = math.min(burst, tokens + math.max(0, now_ms - last_ms) * rate / 1000)
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now_ms))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return wait_ms
"""


def resp_bulk(value: bytes) -> bytes:
    """One command argument as Redis reads it (a RESP bulk string), as redis-py packs it."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def serialize_job(
    event: Event, enqueue_time_ms: int, handlers: Sequence[str] | None = None
) -> bytes:
    """arq's job layout, as JSON rather than arq's default pickle. ``handlers``: a replay's."""
    job: dict[str, Any] = {
        "t": None,
        "f": JOB_FUNCTION,
        "a": [event.to_dict()],
        "k": {} if handlers is None else {"handlers": list(handlers)},
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
                    # was lost, its events read as duplicates or as merged into the runs the
                    # first one queued (the delivery is queued either way).
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
    keys: bytes  # (marker, order list) per event, packed
    runs: bytes  # (class and run id, job) per event, packed
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
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_in_flight: int = MAX_CALLS_IN_FLIGHT,
    ) -> None:
        self.redis = redis
        self.keys = QueueKeys(queue_name)
        self._queue_key = resp_bulk(queue_name.encode())
        self._seen_prefix = self.keys.seen("").encode()  # marker_of(), without a call per event
        self._waiting_prefix = self.keys.waiting("").encode()
        self._order_prefix = self.keys.order_prefix.encode()
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

    async def enqueue_events(self, events: Sequence[Event]) -> list[int]:
        """Per event: :data:`QUEUED`, :data:`DUPLICATE` (once) or :data:`COALESCED` (latest)."""
        now_ms = int(time.time() * 1000)
        # Packed here, per caller: redis-py's pack_command took 3.6 µs per event in the
        # receiver's writer, which every caller of a batch waits for (docs/benchmarks.md).
        keys: list[bytes] = []
        runs: list[bytes] = []
        for event in events:
            subject_tag = tag_of(event.subject)
            once = event.event_class == ONCE
            marker = (self._seen_prefix if once else self._waiting_prefix) + event.id.encode()
            flag = "o" if once else "l"
            keys += (resp_bulk(marker), resp_bulk(self._order_prefix + subject_tag.encode()))
            run = flag + new_run_id(subject_tag)
            runs += (resp_bulk(run.encode()), resp_bulk(serialize_job(event, now_ms)))
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
        fixed_arguments = resp_bulk(self._window) + resp_bulk(b"%d" % (time.time() * 1000))
        arguments = PackedArguments(
            [self._queue_key, *[p.keys for p in batch], fixed_arguments, *[p.runs for p in batch]],
            keys=1 + 2 * events,
            count=1 + 2 * events + 2 + 2 * events,
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
