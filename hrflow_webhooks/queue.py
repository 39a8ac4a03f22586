"""The queue seam and the one owner of the Redis layout.

Every key the service writes and every Lua script it runs are defined here;
the receiver, the workers, dead letters, erasure, health and stats import them
instead of building key strings. The receiver runs :data:`ENQUEUE_SCRIPT` (``hrflow_webhooks.enqueue``);
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

**Leases and fencing** (``workers.leases``). A claim holds its run while the
claimer's lease key lives and lists the run; the claim script takes over any
other. Every write of a run's outcome (handler marker, dead letter,
finish, retry, release) runs in a script that first checks the run's claim is
still the writer's (:class:`Fence`): a worker that lost its lease cannot write
over the run's new holder, so an outcome is written once.

**Per-subject order.** Runs of one subject run one at a time, in arrival order:
the claim only takes a run that heads its subject's order list; a run behind
another is parked (its score moved later) without taking a worker slot or a
try, and the run ahead wakes it when it finishes (:data:`FINISH_RUN_SCRIPT`).

**How long a run has waited.** The queue's score is when a run is due next: a parked
run is re-scored every poll and a retried one is scored later, so neither looks old
there, even when it has held its profile for hours. The first time a run is parked or
retried, its due time goes into ``<q>:due-since``, and it leaves with the run; the oldest
wait (:data:`OLDEST_WAIT_SCRIPT`) is the older of that set's first entry and the queue's.

Key layout (``<q>`` is the queue name, ``hrflow:queue`` by default):

================================ ===============================================
``<q>``                          arq's queue (sorted set of run ids by due time)
``arq:job:<run id>``             the job: ``{"f", "a": [event], "k", "t", "et"}``
``arq:in-progress:<run id>``     the claim of a run: ``<lease id>|<n>``, its fencing token
                                 (``1`` when arq's own worker claimed it; ``arq:retry:``:
                                 its tries)
``<q>:lease:<lease id>``         a worker's lease: the numbers of the claims it holds
                                 (``,n,n,``); while it lives and lists a claim, it holds
``<q>:order:<subject tag>``      list of the subject's run ids, oldest first
``<q>:due-since``                sorted set: a parked or retried run → when it first became
                                 due (ms); the queue's score moves, this does not
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
``<q>:workers``                  hash worker id → its last heartbeat (JSON)
``<q>:log``                      the event log (a stream, capped; see below)
``<q>:log:erasing``              the log's copy while an erasure rebuilds it (seconds)
``<q>:handled:<key>:<source>``   the newest state of a profile the service handled (tags)
``<q>:reconcile:checkpoint:<s>`` the reconciler's checkpoint for a source tag
``<q>:reconcile:runs``           the reconciler's reports, newest first (100)
``<q>:reconcile:lock``           the reconciler's lock across workers
``<q>:console:revoked:<nonce>``  a console session logged out, until it would have expired
================================ ===============================================

**The event log** is one stream, written in the scripts that already run: the
enqueue script adds a ``delivery`` entry per event, the finish script a
``run`` entry and the run's ``handler`` entries, the replay script a ``replay``
entry; a retry writes its entries in one call (:data:`APPEND_LOG_SCRIPT`). Each
entry starts with the same six fields (:data:`LOG_FIELDS`), so the search script
filters by position, and holds keys, types, outcomes, timings and error classes,
never a profile's content. ``XADD ... MAXLEN ~`` caps it; the workers' upkeep
trims what is older than the retention (``XTRIM MINID``). Erasure rebuilds it without
the erased entries (:data:`REBUILD_LOG_SCRIPT`): ``XDEL`` would leave their bytes behind.

Tags are sha256 prefixes, and event ids sha256 digests: key names stay short and
hold no profile key.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from hrflow_webhooks.events import ONCE, Event

JOB_FUNCTION = "handle_event"
# arq's own prefixes (arq.constants; tests/test_queue.py checks they still match): its
# worker reads jobs from there.
JOB_KEY_PREFIX = "arq:job:"
IN_PROGRESS_KEY_PREFIX = "arq:in-progress:"
RETRY_KEY_PREFIX = "arq:retry:"
RESULT_KEY_PREFIX = "arq:result:"
JOB_KEY_PREFIX_BYTES = JOB_KEY_PREFIX.encode()
DUE_SINCE_SUFFIX = ":due-since"
# The Lua line that names the due-since set of the queue in KEYS[1] (keys derived, as in the
# claim script: arq's layout already assumes one Redis server).
_DUE_SINCE_LUA = f"local due_since = KEYS[1] .. '{DUE_SINCE_SUFFIX}'\n"
# How long a run whose subject is busy stays parked before the claim looks at it again. The
# run ahead wakes it when it finishes; this only bounds recovery when that run was lost.
PARK_MS = 2_000
# A run's completion markers outlive any run's retries (tries x backoff, grace); the run's
# finish removes them, this only bounds what a lost run leaves behind.
RUN_MARKERS_LIFETIME_S = 86_400
# Completion-marker values of a run's handlers: a retry of the run skips every one of them.
DONE, DEAD, SKIPPED = "ok", "dead", "skip"
# How far ahead of our clock a profile's state (HrFlow's updated_at) may be and still be
# trusted: clocks disagree by seconds; a state years ahead (a broken or hostile listing) kept
# as the handled mark would hide every real change until then.
HANDLED_STATE_MAX_AHEAD_S = 60


def trusted_state(state_s: float | None, now_s: float) -> float | None:
    """A profile's state (epoch s) if it can be kept as a handled mark, else None."""
    return state_s if state_s is not None and state_s <= now_s + HANDLED_STATE_MAX_AHEAD_S else None


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

    @property
    def due_since(self) -> str:
        return self.queue + DUE_SINCE_SUFFIX

    def seen(self, event_id: str) -> str:
        return f"{self.queue}:seen:{event_id}"

    def console_revoked(self, session_nonce: str) -> str:
        return f"{self.queue}:console:revoked:{session_nonce}"

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

    @property
    def workers(self) -> str:
        return f"{self.queue}:workers"

    def lease(self, lease_id: str) -> str:
        return f"{self.lease_prefix}{lease_id}"

    @property
    def lease_prefix(self) -> str:
        return f"{self.queue}:lease:"

    # --- the event log and reconciliation -------------------------------------------------
    @property
    def log(self) -> str:
        return f"{self.queue}:log"

    @property
    def log_copy(self) -> str:
        return f"{self.queue}:log:erasing"

    def handled(self, source_key: str, profile_key: str) -> str:
        """Named by the profile key's tag first, so erasure finds every source's by pattern."""
        return f"{self.handled_prefix(profile_key)}{tag_of(source_key)}"

    def handled_prefix(self, profile_key: str) -> str:
        return f"{self.queue}:handled:{tag_of(profile_key)}:"

    def reconcile_checkpoint(self, source_key: str) -> str:
        return f"{self.queue}:reconcile:checkpoint:{tag_of(source_key)}"

    @property
    def reconcile_runs(self) -> str:
        return f"{self.queue}:reconcile:runs"

    @property
    def reconcile_lock(self) -> str:
        return f"{self.queue}:reconcile:lock"

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


@dataclass(frozen=True, slots=True)
class Fence:
    """What a write of a run's outcome must prove: the run's claim is still the writer's.

    ``token`` is the claim's (``<lease id>|<n>``) and ``lease`` its lease key; a run claimed
    by arq's own worker (no lease) has the token ``''``, which every fenced script lets
    through, as before leases. Scripts take the two keys then the token (``_HOLDS_LUA``).
    """

    in_progress: str
    lease: str
    token: str

    @classmethod
    def unfenced(cls, run_id: str, keys: QueueKeys) -> Fence:
        return cls(QueueKeys.in_progress(run_id), keys.queue, "")

    @property
    def keys(self) -> list[str]:
        return [self.in_progress, self.lease]


# Whether the writer still holds the run: its claim token is the run's, and its lease lives.
_HOLDS_LUA = """
local function holds(in_progress, lease, token)
  if token == '' then return true end
  return redis.call('GET', in_progress) == token and redis.call('EXISTS', lease) == 1
end
"""

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

# The event log's entries: kind, event id, run id, subject, type, outcome, then the kind's own
# fields (hrflow_webhooks.event_log). The scripts append entries packed as a field count then
# the fields, so one call carries any number of entries of any shape.
LOG_FIELDS = ("k", "e", "r", "s", "t", "o")
# The event log's size cap (HRFLOW_EVENT_LOG_MAX_ENTRIES's default): about 10 MB of Redis.
EVENT_LOG_MAX_ENTRIES = 100_000
_APPEND_LOG_LUA = """
local function append_log(log, cap, args, from)
  local i = from
  while i <= #args do
    local n = tonumber(args[i])
    redis.call('XADD', log, 'MAXLEN', '~', cap, '*', unpack(args, i + 1, i + n))
    i = i + 1 + n
  end
end
"""

# KEYS: queue, event log, then (marker, order list) per event: the marker is the seen key of a
# once event, the waiting key of a latest one. ARGV: window s, score ms, log cap, how the
# events came (http, reconciler...), then per event: class 'o' or 'l' followed by a new run id,
# job, event id, subject, type, request id. Returns per event 1 queued, 0 duplicate, 2
# coalesced.
# A latest event merges only into a run that is still waiting: its job exists, no worker holds
# it (arq's in-progress key) and none of its handlers is done (a retry would not run those
# again), so a notification that arrives once a run has read anything always gets a run
# after it. The seen marker is written after the run, and the log entry last. Redis does not
# roll a script back; it refuses a script for lack of memory only at its first write
# (tests/test_queue.py), but should any write fail half-way, an event may then be queued
# without its marker (a retried delivery queues it again: harmless), never marked without its
# job (a retried delivery would be acknowledged as a duplicate and the event lost).
ENQUEUE_STRIDE = 6
ENQUEUE_SCRIPT = (
    _NEW_RUN_LUA
    + """
local window, score, cap, via = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local names = {[0] = 'duplicate', [1] = 'queued', [2] = 'coalesced'}
local outcomes = {}
for n = 1, (#KEYS - 2) / 2 do
  local marker, order = KEYS[2 * n + 1], KEYS[2 * n + 2]
  local at = 4 + 6 * (n - 1)
  local class_and_run, job = ARGV[at + 1], ARGV[at + 2]
  local run_id = string.sub(class_and_run, 2)
  local logged_run = run_id
  if string.sub(class_and_run, 1, 1) == 'o' then
    if redis.call('EXISTS', marker) == 1 then
      outcomes[n], logged_run = 0, ''
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
      outcomes[n], logged_run = 2, waiting
    else
      new_run(run_id, order, job, score)
      redis.call('SET', marker, run_id, 'EX', window)
      outcomes[n] = 1
    end
  end
  redis.call('XADD', KEYS[2], '*', 'k', 'delivery', 'e', ARGV[at + 3], 'r', logged_run,
    's', ARGV[at + 4], 't', ARGV[at + 5], 'o', names[outcomes[n]],
    'request_id', ARGV[at + 6], 'via', via)
end
-- One trim per call, not per entry (a third of an entry's cost): the cap is approximate.
redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', cap)
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

# arq's checks for each candidate (still queued, due, not held by a live claim), then the
# subject's order, then the claim: the claimer's fencing token '<lease id>|<n>' in the
# in-progress key, with no expiry, and n added to the claimer's lease, which lists the claims
# its worker holds (',n,n,'; workers.leases). A claim holds while its lease lives and lists
# it: a run whose worker died, froze, lost Redis, or ended its task without writing its end
# (lost in a failover) is taken over; so is one of the claimer's own that it does not run
# (its candidates never include a run it is running). One claimed by arq's own worker (no
# lease: '1') is held while its key lives. A run whose subject is busy is parked.
# KEYS: the queue, the claimer's lease. ARGV: now (ms), most to claim, order prefix, park
# (ms), lease prefix, the claimer's lease id, its next claim number, then the candidates'
# ids. Only ids travel: with several workers most candidates are the other workers' running
# jobs, and arq reads five per free slot. (Keys are derived here, not declared: arq's layout
# already assumes one Redis server, not a cluster.)
# Returns 1 (the claimer's lease lives) or 0 (it is gone: nothing claimed), then id, score,
# token per claimed run, in queue order.
CLAIM_SCRIPT = (
    SUBJECT_FREE_LUA
    + _DUE_SINCE_LUA
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
local claimed, numbers = {1}, {}
local now, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local order_prefix, park = ARGV[3], tonumber(ARGV[4])
local lease_prefix, lease, number = ARGV[5], ARGV[6], tonumber(ARGV[7])
local leases = {} -- per holder's lease: the set of claim numbers it lists, false when gone
local function claims_listed_by(lease_id)
  local value = redis.call('GET', lease_prefix .. lease_id)
  if not value then return false end
  local listed = {}
  for n in string.gmatch(value, '[^,]+') do listed[n] = true end
  return listed
end
local function held(in_progress)
  local holder = redis.call('GET', in_progress)
  if not holder then return false end
  local holder_lease, n = string.match(holder, '^(.+)|(%d+)$')
  if not holder_lease then return true end
  if holder_lease == lease then return false end
  if leases[holder_lease] == nil then leases[holder_lease] = claims_listed_by(holder_lease) end
  local listed = leases[holder_lease]
  return listed and listed[n] == true
end
for i = 8, #ARGV do
  if #claimed > most * 3 then
    break
  end
  local run_id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], run_id)
  local in_progress = 'arq:in-progress:' .. run_id
  if score and tonumber(score) <= now and not held(in_progress) then
    if subject_free(run_id, order_prefix) then
      local token = lease .. '|' .. number
      redis.call('SET', in_progress, token)
      claimed[#claimed + 1] = run_id
      claimed[#claimed + 1] = score
      claimed[#claimed + 1] = token
      numbers[#numbers + 1] = number
      number = number + 1
    else
      redis.call('ZADD', due_since, 'NX', score, run_id)
      redis.call('ZADD', KEYS[1], now + park, run_id)
    end
  end
end
if #numbers > 0 then redis.call('APPEND', KEYS[2], table.concat(numbers, ',') .. ',') end
return claimed
"""
)

# A lease renewed: its expiry pushed back, and the numbers of its claims whose runs ended
# struck from its list (never the list rewritten: a renewal that arrives late cannot drop a
# claim made meanwhile). Returns 0 when the lease is gone. KEYS: the lease. ARGV: lease
# ms, then the numbers.
RENEW_LEASE_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local ended = {}
for i = 2, #ARGV do ended[ARGV[i]] = true end
local kept = {}
for n in string.gmatch(value, '[^,]+') do
  if not ended[n] then kept[#kept + 1] = n end
end
local listed = ','
if #kept > 0 then listed = ',' .. table.concat(kept, ',') .. ',' end
redis.call('SET', KEYS[1], listed, 'PX', ARGV[1])
return 1
"""

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

# A run that ends leaves its subject's order (the head, unless it was erased meanwhile) and
# wakes the run behind it, parked until now. ``order`` is the queue itself for a job of the
# older layout, which is in no order list.
_LEAVE_ORDER_LUA = """
local function leave_order(queue, order, run_id, now)
  if order == queue then return end
  redis.call('LREM', order, 1, run_id)
  local next_run = redis.call('LINDEX', order, 0)
  if next_run then
    local due = redis.call('ZSCORE', queue, next_run)
    if due and tonumber(due) > now then redis.call('ZADD', queue, now, next_run) end
  end
end
"""

# The run is over (handled, dead-lettered, skipped or unrouted): it leaves its subject's
# order, wakes the run behind it, and its job, markers and claim go, atomically, so nothing
# can run it again; arq's own finish has nothing left to do (workers.arq_worker). The same
# call keeps the profile's handled state (the newest wins, but a kept one further ahead of
# the clock than HANDLED_STATE_MAX_AHEAD_S is replaced: an older version could keep a hostile
# listing's) and appends the run's log entries.
# Refused (0) when the writer no longer holds the run (Fence): its new holder finishes it;
# 2 when the run is over already (the client re-sent a call that had run).
# KEYS: queue, order list (or the queue again for an older job), job, done hash, event log,
# handled-state key (or the queue again: not a profile), retry key, then the fence's keys.
# ARGV: run id, now ms, log cap, handled state ('' for none), its lifetime s, the fence's
# token, then the log entries, packed (append_log).
FINISH_RUN_SCRIPT = (
    _APPEND_LOG_LUA
    + _HOLDS_LUA
    + _LEAVE_ORDER_LUA
    + _DUE_SINCE_LUA
    + f"local max_ahead_s = {HANDLED_STATE_MAX_AHEAD_S}"
    + """
local queue, order, run_id, now = KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2])
if not holds(KEYS[8], KEYS[9], ARGV[6]) then
  if redis.call('EXISTS', KEYS[3]) == 0 then return 2 end -- over already (this call re-sent)
  return 0
end
leave_order(queue, order, run_id, now)
redis.call('DEL', KEYS[3], KEYS[4], KEYS[7], KEYS[8])
redis.call('ZREM', queue, run_id)
redis.call('ZREM', due_since, run_id)
local state = tonumber(ARGV[4])
if state and KEYS[6] ~= queue then
  local kept = tonumber(redis.call('GET', KEYS[6]))
  if not kept or state > kept or kept > now / 1000 + max_ahead_s then kept = state end
  redis.call('SET', KEYS[6], string.format('%d', kept), 'EX', ARGV[5])
end
append_log(KEYS[5], ARGV[3], ARGV, 7)
return 1
"""
)

# arq's ends of a try, fenced (workers.arq_worker): a worker that no longer holds the run
# changes nothing. Each returns 1 done, 0 refused.
# A retry: the run is due again ARGV[2] ms later (0: at its old time), and its claim goes.
# KEYS: queue, then the fence's keys. ARGV: run id, score increment ms, token.
RETRY_RUN_SCRIPT = (
    _HOLDS_LUA
    + _DUE_SINCE_LUA
    + """
if not holds(KEYS[2], KEYS[3], ARGV[3]) then return 0 end
if tonumber(ARGV[2]) ~= 0 then
  local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if due then redis.call('ZADD', due_since, 'NX', due, ARGV[1]) end
  redis.call('ZINCRBY', KEYS[1], ARGV[2], ARGV[1])
end
redis.call('DEL', KEYS[2])
return 1
"""
)

# A claim given back (a try cancelled, or ended without writing its end): the run is due
# again at once. Its token only, not its lease: a worker gives back what it claimed even after
# its lease lapsed, unless another worker took the run over meanwhile. KEYS: the in-progress
# keys. ARGV: their tokens.
RELEASE_RUNS_SCRIPT = """
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    released = released + redis.call('DEL', KEYS[i])
  end
end
return released
"""

# A run arq cannot start (its job expired or unreadable): it goes, as arq would drop it, and
# leaves its subject's order (a list with no run behind would stay for ever). KEYS: queue,
# job, retry key, order list (or the queue again for an older job), then the fence's keys.
# ARGV: run id, token, now ms.
DROP_RUN_SCRIPT = (
    _HOLDS_LUA
    + _DUE_SINCE_LUA
    + _LEAVE_ORDER_LUA
    + """
if not holds(KEYS[5], KEYS[6], ARGV[2]) then return 0 end
leave_order(KEYS[1], KEYS[4], ARGV[1], tonumber(ARGV[3]))
redis.call('DEL', KEYS[2], KEYS[3], KEYS[5])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', due_since, ARGV[1])
return 1
"""
)

# A retry's log entries, in one call. KEYS: the event log. ARGV: cap, then the entries, packed.
APPEND_LOG_SCRIPT = _APPEND_LOG_LUA + "append_log(KEYS[1], ARGV[1], ARGV, 2)"

# Erasure: a run leaves the queue, its subject's order and the (type, subject)'s waiting
# pointer. KEYS: queue, order list, the event's marker, then the run's own keys to delete.
# ARGV: run id.
FORGET_RUN_SCRIPT = (
    _DUE_SINCE_LUA
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', due_since, ARGV[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then
  redis.call('DEL', KEYS[3])
end
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
"""
)

# The oldest wait, in ms: from the first due time of the oldest parked or retried run still
# queued, or the queue's oldest score, whichever is older (0 when nothing waits). An entry
# whose run left the queue another way (arq's own worker, a restore) is dropped on the way,
# a bounded number per call, so a leftover can neither raise a false alarm for ever nor make
# one call long. KEYS: the queue. ARGV: now ms.
OLDEST_WAIT_SCRIPT = (
    _DUE_SINCE_LUA
    + """
local now = tonumber(ARGV[1])
local oldest = now
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then oldest = math.min(oldest, tonumber(first[2])) end
for _ = 1, 100 do
  local entry = redis.call('ZRANGE', due_since, 0, 0, 'WITHSCORES')
  if not entry[1] then break end
  if redis.call('ZSCORE', KEYS[1], entry[1]) then
    oldest = math.min(oldest, tonumber(entry[2]))
    break
  end
  redis.call('ZREM', due_since, entry[1])
end
return math.floor(now - oldest)
"""
)


def long_wait_problems(oldest_wait_s: float, limit_s: float) -> list[str]:
    """What `check`, /readyz?strict and the console say of the oldest wait."""
    if oldest_wait_s <= limit_s:
        return []
    return [
        f"a run has waited {oldest_wait_s:.0f} s since it first became due, over the "
        f"{limit_s:g} s limit (HRFLOW_MAX_RUN_WAIT_S): its profile's later changes wait "
        "behind it"
    ]


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

# KEYS: the run's done hash, then the fence's keys. ARGV: handler name, marker lifetime s,
# value (ok | dead | skip), the fence's token. One call, atomic: the marker never exists
# without its expiry. Returns 1, or 0 refused (the writer no longer holds the run).
_MARK_HANDLER_LUA = """
local function mark_handler(done, handler, lifetime, value)
  redis.call('HSET', done, handler, value)
  redis.call('EXPIRE', done, lifetime)
end
"""
MARK_HANDLER_SCRIPT = (
    _HOLDS_LUA
    + _MARK_HANDLER_LUA
    + """
if not holds(KEYS[2], KEYS[3], ARGV[4]) then return 0 end
mark_handler(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
return 1
"""
)

# A dead letter, and its handler marked dead in its run, or nothing (0) when the writer no
# longer holds the run. KEYS: the letter, the dead-letter index, the run's done hash, then the
# fence's keys. ARGV: letter id, the letter (JSON), now (s), handler, marker lifetime s, the
# marker's value (dead), token.
DEAD_LETTER_SCRIPT = (
    _HOLDS_LUA
    + _MARK_HANDLER_LUA
    + """
if not holds(KEYS[4], KEYS[5], ARGV[7]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
mark_handler(KEYS[3], ARGV[4], ARGV[5], ARGV[6])
return 1
"""
)

# KEYS: queue, dead-letter index, the letter, the order list, the event log. ARGV: letter id,
# new run id, job, score ms, log cap, then the replay's log entry, packed (append_log). Claims
# the letter and queues a new run for it, or returns 0.
REPLAY_SCRIPT = (
    _NEW_RUN_LUA
    + _APPEND_LOG_LUA
    + """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
new_run(ARGV[2], KEYS[4], ARGV[3], ARGV[4])
redis.call('DEL', KEYS[3])
append_log(KEYS[5], ARGV[5], ARGV, 6)
return 1
"""
)

# The event log, read a slice at a time so no call holds Redis long: entries of
# KEYS[1] from ARGV[1] towards ARGV[2] (XRANGE order when ARGV[4] is '+', XREVRANGE when '-'),
# in batches of SCAN_BATCH, until ARGV[3] entries were looked at or ARGV[12] microseconds of
# Redis' time went (a slice is bounded by time, not entries: an entry's cost varies by
# machine and action, and every delivery waits behind the slice). ARGV[5]: 'match' returns
# the matching entries; 'tally' counts delivery and run entries per minute and outcome
# ('minute|outcome', count pairs). Filters on the leading fields, '' for any: ARGV[6] kind,
# [7] event id, [8] subject suffix, [9] type, [10] outcome, [11] subject prefix. Returns the
# id of the last entry looked at ('' at the end of the range), then the result.
SCAN_BATCH = 50
SCAN_LOG_SCRIPT = (
    f"local batch = {SCAN_BATCH}\n"
    + """
local from, to, most, direction, action = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local kind, event, suffix, type, outcome = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local prefix, budget_us = ARGV[11], tonumber(ARGV[12])
local found, tally = {}, {}
local function visit(entry)
  local f = entry[2]
  if (kind == '' or f[2] == kind) and (event == '' or f[4] == event)
      and (suffix == '' or string.sub(f[8], -#suffix) == suffix)
      and (prefix == '' or string.sub(f[8], 1, #prefix) == prefix)
      and (type == '' or f[10] == type) and (outcome == '' or f[12] == outcome) then
    if action == 'tally' then
      if f[2] == 'delivery' or f[2] == 'run' then
        local minute = math.floor(tonumber(string.match(entry[1], '^(%d+)')) / 60000)
        local name = minute .. '|' .. f[12]
        tally[name] = (tally[name] or 0) + 1
      end
    else
      found[#found + 1] = entry
    end
  end
end
local function micros()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local started, looked, last = micros(), 0, ''
while true do
  local want, got = math.min(batch, most - looked), nil
  if direction == '+' then
    got = redis.call('XRANGE', KEYS[1], from, to, 'COUNT', want)
  else
    got = redis.call('XREVRANGE', KEYS[1], from, to, 'COUNT', want)
  end
  for _, entry in ipairs(got) do visit(entry) end
  looked = looked + #got
  if #got < want then
    last = '' -- the end of the range
    break
  end
  last = got[#got][1]
  if looked >= most or micros() - started >= budget_us then break end
  from = '(' .. last
end
if action == 'tally' then
  for name, n in pairs(tally) do
    found[#found + 1] = name
    found[#found + 1] = n
  end
end
return {last, found}
"""
)

# The event log rebuilt without an erased subject's entries (hrflow_webhooks.event_log). XDEL
# only flags an entry in its node: its bytes stay in memory, in snapshots and in a rewritten
# AOF. So the survivors are copied, a slice a call, into a stream of their own with their ids,
# and the last call copies what was appended meanwhile, replays on the copy the trims the log
# had meanwhile (they only ever drop the oldest entries), keeps the log's last id (new ids
# stay after every id it gave) and renames the copy over the log: nothing appended is lost.
# The log has no consumer groups; a rebuild would lose them, so it refuses a log with any.
# KEYS: the log, its copy. ARGV: 'first' | 'next' | 'last' (all that remain), where to start
# (an XRANGE start), most entries to look at, the copy's lifetime ms (a rebuild that died
# leaves no copy behind for long), subject suffix, subject prefix (an entry is dropped when
# its subject has both). Returns the last id looked at ('' for none), how many looked at,
# how many dropped, then the distinct subjects dropped.
REBUILD_LOG_SCRIPT = """
local log, copy, step, from, most = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local suffix, prefix = ARGV[5], ARGV[6]
local function stream_info(key)
  local flat, info = redis.call('XINFO', 'STREAM', key), {}
  for i = 1, #flat, 2 do info[flat[i]] = flat[i + 1] end
  return info
end
if step == 'first' then
  if redis.call('EXISTS', copy) == 1 then
    return redis.error_reply('ERASING another erasure is rebuilding the event log')
  end
  if redis.call('EXISTS', log) == 1 and stream_info(log)['groups'] > 0 then
    return redis.error_reply('GROUPS the event log has consumer groups: a rebuild loses them')
  end
  redis.call('XADD', copy, 'MAXLEN', '0', '0-1', 'k', '') -- an empty stream, before any id
elseif redis.call('EXISTS', copy) == 0 then
  return redis.error_reply('ERASING the copy of the event log expired mid-rebuild')
end
local entries
if step == 'last' then
  entries = redis.call('XRANGE', log, from, '+')
else
  entries = redis.call('XRANGE', log, from, '+', 'COUNT', most)
end
local dropped, subjects, found = 0, {}, {}
for _, entry in ipairs(entries) do
  local subject = entry[2][8] or ''
  if string.sub(subject, -#suffix) == suffix and string.sub(subject, 1, #prefix) == prefix then
    dropped = dropped + 1
    if not subjects[subject] then
      subjects[subject] = true
      found[#found + 1] = subject
    end
  else
    redis.call('XADD', copy, entry[1], unpack(entry[2]))
  end
end
local last = ''
if #entries > 0 then last = entries[#entries][1] end
if step ~= 'last' then
  redis.call('PEXPIRE', copy, ARGV[4])
elseif redis.call('EXISTS', log) == 0 then
  redis.call('DEL', copy)
else
  local info = stream_info(log)
  local oldest = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
  if oldest then
    redis.call('XTRIM', copy, 'MINID', oldest[1])
  else
    redis.call('XTRIM', copy, 'MAXLEN', '0')
  end
  redis.call('XSETID', copy, info['last-generated-id'], 'ENTRIESADDED', info['entries-added'],
    'MAXDELETEDID', info['max-deleted-entry-id'])
  redis.call('RENAME', copy, log)
  redis.call('PERSIST', log)
end
return {last, #entries, dropped, unpack(found)}
"""

# The HrFlow API rate budget (workers.rate_budget), a token bucket. KEYS: bucket. ARGV: rate per s, burst, key TTL ms. Returns 0 (token taken) or ms to wait.
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
