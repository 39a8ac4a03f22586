"""Fault injection with real processes: while N signed deliveries flow through one receiver
process into two worker processes running the built-in ``index`` handler against the
sandbox HrFlow API, the suite restarts the Redis server once (AOF, appendfsync always)
mid-flow, keeping it down while the sender goes on, then SIGKILLs workers several times
and SIGTERMs one once. Afterwards every event's effect - one copy of its profile in the
target source - exists exactly once, nothing is lost, and nothing is left queued or
dead-lettered; the deliveries refused meanwhile were re-sent, the runs each killed worker
held finished elsewhere, and the handler's re-executions are counted apart from duplicate
effects (which must be none).

HRFLOW_FAULT_EVENTS (default 2,000) and HRFLOW_FAULT_KILLS (default 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from hrflow_webhooks.queue import deserialize_job
from tests.plugins import blocking
from tests.polling import eventually
from tests.processes import ROOT, WorkerProcess
from tests.redis_server import RedisServer, free_port
from tests.sandbox_fixtures import SandboxServer
from tests.service import WEBHOOK_SECRET, answers, key_exists, parsing_event, signed_headers
from tests.test_load import ReceiverProcess
from workers.handlers.index import ORIGIN_METADATA

EVENTS = int(os.environ.get("HRFLOW_FAULT_EVENTS", "2000"))
KILLS = int(os.environ.get("HRFLOW_FAULT_KILLS", "3"))
ORIGIN, TARGET = "fault-origin", "fault-target"
API_KEY, API_USER = "sandbox-api-key", "sandbox@hrflow.local"
JOB_TIMEOUT_S = 4  # the Redis stall below outlasts it
# The workers' lease (HRFLOW_WORKER_LEASE_S's default): a killed worker's runs are taken over
# 3.75 to 5 s after the kill (renewed every quarter of it).
LEASE_S = 5.0
SEND_PAUSE_S = 24 / EVENTS  # between batches of 8 new events
# Long enough that the sender, going on at its pace, meets the outage several times over.
REDIS_DOWN_S = 1.5
# The sender's backoff after a refusal, as a webhook sender's: short, growing, capped.
RESEND_BASE_S, RESEND_MAX_S = 0.05, 0.4
DELIVERY_GIVE_UP_S = 120.0

pytestmark = pytest.mark.slow


class SandboxProcess:
    def __init__(self, log_path: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandbox", "--port", str(self.port), "--no-seed", *options],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        url = f"{self.url}/_sandbox/profiles"
        await eventually(lambda: answers(session, url), "the sandbox")

    async def store(self, session: aiohttp.ClientSession, key: str) -> None:
        profile = {"key": key, "text": "synthetic profile for fault injection"}
        body = {"source_key": ORIGIN, "profile": profile}
        async with session.post(f"{self.url}/_sandbox/profiles", json=body) as response:
            assert response.status == 200, await response.text()

    async def profiles_in(self, session: aiohttp.ClientSession, source_key: str) -> list[Any]:
        async with session.get(f"{self.url}/_sandbox/profiles") as response:
            profiles = (await response.json())["profiles"]
        return [p for p in profiles if _source_of(p) == source_key]

    async def calls(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Every API call the sandbox answered: method, path, query, body, status, time."""
        async with session.get(f"{self.url}/_sandbox/calls") as response:
            calls: list[dict[str, Any]] = (await response.json())["calls"]
        return calls

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


def sandbox_worker_args(sandbox: SandboxProcess, **extra: Any) -> dict[str, Any]:
    """Worker settings: the built-in index handler against the sandbox, patient tries."""
    return {
        "index_source_key": TARGET,
        "api_url": f"{sandbox.url}/v1",
        "api_key": API_KEY,
        "api_user": API_USER,
        "job_timeout_s": JOB_TIMEOUT_S,
        "max_tries": 20,
        **extra,
    }


def _source_of(profile: dict[str, Any]) -> str | None:
    source = profile.get("source")
    return source.get("key") if isinstance(source, dict) else profile.get("source_key")


@dataclass
class KillRecovery:
    """One SIGKILL: the runs the dead worker held (their profile keys), and how long after the
    kill the last of them finished on another worker."""

    killed_at: float  # wall clock, as the sandbox's call log and the workers' logs have it
    log: str  # the killed worker's log file
    held: list[str] = field(default_factory=list)
    finished: int = 0
    seconds: float | None = None  # None: none held, or some never finished (2 min wait)


@dataclass
class Chaos:
    """What the suite did, and what it measured, for the closing report."""

    kills: int = 0
    terminations: int = 0
    redis_restarts: int = 0
    acknowledged: int = 0
    acknowledged_at: dict[str, float] = field(default_factory=dict)  # profile key → when
    unacknowledged_at_stop: int = 0  # deliveries the sender still had to make when Redis stopped
    refusals: Counter[str] = field(default_factory=Counter)  # "503", or the connection error
    resent: set[str] = field(default_factory=set)  # the profile keys of the events re-sent
    recoveries: list[KillRecovery] = field(default_factory=list)

    @property
    def retried_deliveries(self) -> int:
        return sum(self.refusals.values())


async def deliver(
    session: aiohttp.ClientSession, url: str, event: dict[str, Any], chaos: Chaos
) -> None:
    """Deliver like HrFlow would: after a 503 (Redis unavailable) or a refused connection,
    re-send with a short exponential backoff until acknowledged."""
    body, headers = json.dumps(event).encode(), signed_headers(event)
    deadline = time.monotonic() + DELIVERY_GIVE_UP_S
    attempt = 0
    while True:
        try:
            async with session.post(f"{url}/webhook", data=body, headers=headers) as response:
                await response.read()
                if response.status == 202:
                    chaos.acknowledged += 1
                    chaos.acknowledged_at[event["profile"]["key"]] = time.time()
                    return
                assert response.status == 503, response.status  # nothing but unavailability
                refusal = "503"
        except aiohttp.ClientError as error:
            refusal = type(error).__name__
        chaos.refusals[refusal] += 1
        chaos.resent.add(event["profile"]["key"])
        assert time.monotonic() < deadline, "a delivery was never acknowledged"
        await asyncio.sleep(min(RESEND_MAX_S, RESEND_BASE_S * 2**attempt))
        attempt += 1


async def queue_empty(redis: Redis) -> bool:
    return not await redis.zcard("hrflow:queue")


async def in_progress_jobs(redis: Redis) -> list[str]:
    return [k.decode().split(":", 2)[2] async for k in redis.scan_iter("arq:in-progress:*")]


async def claims(redis: Redis) -> dict[str, bytes | None]:
    """The runs claimed now (arq's in-progress keys), each with its try counter. Together they
    name one claim: arq counts a try when a claimed run starts, so a later claim of the same
    run, once started, shows another count."""
    run_ids = await in_progress_jobs(redis)
    tries = await redis.mget([f"arq:retry:{r}" for r in run_ids]) if run_ids else []
    return dict(zip(run_ids, tries, strict=True))


async def restart_redis_mid_flow(
    redis_server: RedisServer, chaos: Chaos, sending: asyncio.Task[None]
) -> None:
    """Stop Redis once a quarter of the deliveries are acknowledged, and keep it down for
    REDIS_DOWN_S while the sender goes on at its pace: whatever it sends meanwhile is answered
    503 and must be re-sent. Gated on the sender's progress, not on a clock, so that the
    outage lands mid-flow however fast or slow the machine is."""
    while chaos.acknowledged < EVENTS // 4:
        if sending.done():
            await sending  # its error, if it failed
            raise AssertionError("the sender finished before Redis could be stopped")
        await asyncio.sleep(0.005)
    await asyncio.to_thread(redis_server.stop)
    # Nothing is acknowledged while Redis is down: these are all still to be sent, or re-sent.
    chaos.unacknowledged_at_stop = EVENTS - chaos.acknowledged
    await asyncio.sleep(REDIS_DOWN_S)
    await asyncio.to_thread(redis_server.start)
    chaos.redis_restarts += 1


async def wait_recovered(
    url: str,
    at_kill: dict[str, bytes | None],
    earlier: set[tuple[str, bytes | None]],
    recovery: KillRecovery,
    killed_s: float,  # monotonic clock
) -> None:
    """Which runs the killed worker held, and the time until the last finished elsewhere.

    A live worker ends each run here within milliseconds (the sandbox answers at once),
    releasing its claim; only a dead worker's claim outlives it, unchanged, until its lease
    expires (3.75 to 5 s after the kill) and another worker takes the run over, which counts
    a try. So the claims there at the kill and unchanged half a lease later are the dead
    worker's, less those an earlier kill left behind (``earlier``: already there at that
    kill).
    """
    await asyncio.sleep(LEASE_S / 2)
    async with Redis.from_url(url) as redis:
        now = await claims(redis)
        dead = [r for r, t in at_kill.items() if (r, t) not in earlier and r in now and now[r] == t]
        # A run that finished just before the kill (arq's release of its claim still to come)
        # has no job left: nothing to run again, so not held.
        jobs = {r: raw for r in dead if (raw := await redis.get(f"arq:job:{r}")) is not None}
        recovery.held = [
            deserialize_job(raw)["a"][0]["payload"]["profile"]["key"] for raw in jobs.values()
        ]
        pending = list(jobs)
        for _ in range(1200):
            pending = [r for r in pending if await redis.exists(f"arq:job:{r}")]
            if not pending:
                break
            await asyncio.sleep(0.1)
        recovery.finished = len(jobs) - len(pending)
        if jobs and not pending:
            recovery.seconds = time.monotonic() - killed_s


async def kill_workers(
    redis_url: str,
    workers: list[WorkerProcess],
    worker_args: dict[str, Any],
    tmp_path: Path,
    chaos: Chaos,
) -> list[asyncio.Task[None]]:
    """SIGKILL the first worker KILLS times, each while the workers hold runs, starting a new
    one each time; SIGTERM the second once. Returns the tasks that measure each recovery."""
    recoveries: list[asyncio.Task[None]] = []
    earlier: set[tuple[str, bytes | None]] = set()
    async with Redis.from_url(redis_url) as redis:
        for round_number in range(KILLS):
            await asyncio.sleep(1.0)
            for _ in range(100):  # kill mid-run: wait until the workers hold some
                if await in_progress_jobs(redis):
                    break
                await asyncio.sleep(0.02)
            await asyncio.to_thread(workers[0].kill)
            chaos.kills += 1
            recovery = KillRecovery(killed_at=time.time(), log=Path(workers[0].log.name).name)
            chaos.recoveries.append(recovery)
            at_kill = await claims(redis)
            recoveries.append(
                asyncio.create_task(
                    wait_recovered(redis_url, at_kill, set(earlier), recovery, time.monotonic())
                )
            )
            earlier |= set(at_kill.items())
            workers[0] = WorkerProcess(
                redis_url, tmp_path / f"w0-{round_number}.log", **worker_args
            )
            if round_number == 1:
                await asyncio.to_thread(workers[1].terminate)
                chaos.terminations += 1
                workers[1] = WorkerProcess(redis_url, tmp_path / "w1-after-term.log", **worker_args)
    return recoveries


async def inject_faults(
    redis_server: RedisServer,
    workers: list[WorkerProcess],
    worker_args: dict[str, Any],
    tmp_path: Path,
    chaos: Chaos,
    sending: asyncio.Task[None],
) -> None:
    # The Redis restart first, kills after: a kill's runs are told apart by their claims
    # outliving the job timeout unchanged, which holds for a live worker's claims only while
    # it can reach Redis to release them. No outage may fall inside that window.
    await restart_redis_mid_flow(redis_server, chaos, sending)
    recoveries = await kill_workers(redis_server.url, workers, worker_args, tmp_path, chaos)
    await sending
    await asyncio.gather(*recoveries)


def outcomes_logged(logs: Iterable[Path]) -> dict[str, list[tuple[str, float]]]:
    """Per profile key, each run of the index handler that reached an outcome (indexed or
    skipped), as the workers logged it: (log file, time)."""
    outcomes: dict[str, list[tuple[str, float]]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line a SIGKILL cut short
                continue
            if record.get("message") in ("profile indexed", "event skipped"):
                key = record.get("profile_key")
                outcomes.setdefault(key, []).append((log.name, record["ts"]))
    return outcomes


def ran_again_elsewhere(
    recovery: KillRecovery, outcomes: dict[str, list[tuple[str, float]]]
) -> int:
    """The held runs another worker's log shows reaching an outcome after the kill: a check
    of the claims' reading of who held what, from the workers' side."""
    return sum(
        1 for key in recovery.held
        if any(log != recovery.log and at > recovery.killed_at for log, at in outcomes.get(key, []))
    )  # fmt: skip


# --- effects, counted from the sandbox's own records ------------------------------------------


def _origin_key(write: Any) -> str | None:
    """The origin profile a copy (or a write of one) names in its metadata, in ORIGIN."""
    if not isinstance(write, dict):
        return None
    for item in write.get("metadatas") or []:
        if isinstance(item, dict) and item.get("name") == ORIGIN_METADATA:
            source, _, key = str(item.get("value")).partition("/")
            return key if source == ORIGIN else None
    return None


@dataclass(frozen=True)
class Effects:
    """Per origin profile: the index handler's runs and writes as the sandbox saw them, and
    the copies in the target.

    Copies are matched to their origin by the metadata the handler writes, not by reference,
    and POSTs are counted whatever the answer: the sandbox refuses a second copy with a
    reference it holds, so counting stored copies by reference could never see a duplicate.
    """

    runs: dict[str, list[float]]  # when each handler run began: its GET of the origin profile
    # Keyed by the origin profile named; None pools the copies and writes that name none.
    posts: Counter[str | None]  # copies created or attempted (a refused second POST included)
    puts: Counter[str | None]  # a copy re-written in place: a re-run that found it
    copies: Counter[str | None]  # copies in the target naming it as their origin

    @classmethod
    def of(cls, calls: list[dict[str, Any]], profiles: list[dict[str, Any]]) -> Effects:
        indexing = [c for c in calls if c["path"] == "/v1/profile/indexing"]
        runs: dict[str, list[float]] = {}
        writes: dict[str, Counter[str | None]] = {"POST": Counter(), "PUT": Counter()}
        for call in indexing:
            query = call["query"]
            body = call["body"] if isinstance(call["body"], dict) else {}
            if call["method"] == "GET" and query.get("source_key") == ORIGIN:
                runs.setdefault(query.get("key"), []).append(call["at"])
            elif call["method"] in writes and _source_of(body) == TARGET:
                writes[call["method"]][_origin_key(body)] += 1
        copies = Counter(_origin_key(p) for p in profiles if _source_of(p) == TARGET)
        return cls(runs, writes["POST"], writes["PUT"], copies)

    def effects(self, key: str | None) -> int:
        """Copies of one origin profile made or attempted, whichever count is larger."""
        return max(self.posts[key], self.copies[key])

    @property
    def duplicates(self) -> int:
        return sum(max(0, self.effects(key) - 1) for key in {*self.posts, *self.copies})

    @property
    def total_runs(self) -> int:
        return sum(len(times) for times in self.runs.values())

    @property
    def re_executions(self) -> int:
        """Handler runs beyond each event's first."""
        return sum(len(times) - 1 for times in self.runs.values())

    def handled_once(self, keys: Iterable[str]) -> int:
        return sum(1 for k in keys if self.copies[k] == 1 and self.effects(k) == 1)

    def ran_before(self, key: str, moment: float) -> bool:
        return any(at < moment for at in self.runs.get(key, []))


async def test_the_duplicate_count_sees_copies_the_sandbox_refused_or_filed_elsewhere(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """The crash suite's duplicate check must be able to fail. Two second copies: one the
    sandbox refuses (its reference is taken), one under another reference. Counted by
    reference, as the suite once did, the stored copies show neither."""
    headers = {"X-API-KEY": API_KEY, "X-USER-EMAIL": API_USER}
    writes = [("a", "origin-a"), ("a", "origin-a"), ("b", "origin-b"), ("b", "elsewhere-b")]
    statuses = []
    for key, reference in writes:
        origin = {"name": ORIGIN_METADATA, "value": f"{ORIGIN}/{key}"}
        body = {"source_key": TARGET, "reference": reference, "text": key, "metadatas": [origin]}
        async with http.post(
            f"{sandbox.api_url}/profile/indexing", json=body, headers=headers
        ) as response:
            statuses.append(response.status)
    copies = [p for p in sandbox.state.profiles.all() if _source_of(p) == TARGET]
    effects = Effects.of(sandbox.state.calls, copies)
    by_reference = Counter(p["reference"] for p in copies)
    assert statuses == [201, 400, 201, 201]  # the second copy of "a" refused by reference
    assert sum(n - 1 for n in by_reference.values()) == 0  # so by reference: no duplicate
    assert (effects.posts["a"], effects.copies["a"]) == (2, 1)
    assert (effects.posts["b"], effects.copies["b"]) == (2, 2)
    assert effects.duplicates == 2
    assert effects.handled_once(["a", "b"]) == 0


async def test_no_event_is_lost_or_applied_twice_under_crashes_and_restarts(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    chaos = Chaos()
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    receiver = ReceiverProcess(redis_server.url, tmp_path / "receiver.log")
    worker_args = sandbox_worker_args(
        sandbox, handlers="", shutdown_grace_s=2, webhook_secret=WEBHOOK_SECRET
    )
    workers = [
        WorkerProcess(redis_server.url, tmp_path / f"w{i}.log", **worker_args) for i in range(2)
    ]
    keys = [f"fault-{i:05d}" for i in range(EVENTS)]
    try:
        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(connector=connector) as session:
            await sandbox.wait_ready(session)
            await receiver.wait_ready(session)
            for chunk in range(0, EVENTS, 100):
                await asyncio.gather(
                    *(sandbox.store(session, k) for k in keys[chunk : chunk + 100])
                )

            async def send_all() -> None:
                # Paced like a webhook sender (8 new events every SEND_PAUSE_S: about 3 s for
                # 2,000), which goes on sending new events while it re-sends refused ones:
                # each delivery is on its own, so the outage meets a stream, not one batch.
                deliveries: list[asyncio.Task[None]] = []
                for chunk in range(0, EVENTS, 8):
                    deliveries += [
                        asyncio.create_task(
                            deliver(session, receiver.url, parsing_event(k, ORIGIN), chaos)
                        )
                        for k in keys[chunk : chunk + 8]
                    ]
                    await asyncio.sleep(SEND_PAUSE_S)
                await asyncio.gather(*deliveries)

            sent_s: list[float] = []  # how long the sender took, outage and re-sends included
            started = time.monotonic()
            sending = asyncio.create_task(send_all())
            sending.add_done_callback(lambda _: sent_s.append(time.monotonic() - started))
            await inject_faults(redis_server, workers, worker_args, tmp_path, chaos, sending)
            async with Redis.from_url(redis_server.url) as fresh:
                with contextlib.suppress(AssertionError):  # liveness; what is left is asserted
                    await eventually(lambda: queue_empty(fresh), timeout_s=180, interval_s=0.1)
                drained_s = time.monotonic() - started
                queued_left = await fresh.zcard("hrflow:queue")
                dead_letters = await fresh.zcard("hrflow:queue:dead-letters")
                jobs_left = [k async for k in fresh.scan_iter("arq:job:*")]
            copies = await sandbox.profiles_in(session, TARGET)
            calls = await sandbox.calls(session)
    finally:
        for worker in workers:
            worker.close()
        receiver.close()
        sandbox.close()

    effects = Effects.of(calls, copies)
    statuses = Counter(
        f"{c['method']} {c['status']}" for c in calls if c["path"].endswith("/indexing")
    )
    references = {p.get("reference") for p in copies}
    lost = sum(1 for k in keys if not effects.copies[k])
    handled_once = effects.handled_once(keys)
    resent_once = effects.handled_once(chaos.resent)
    # Runs a kill cut off after their first call to HrFlow: each must run again, so each is
    # one re-execution at least, whatever else happened.
    forced = sum(1 for r in chaos.recoveries for k in r.held if effects.ran_before(k, r.killed_at))
    held = [len(r.held) for r in chaos.recoveries]
    outcomes = outcomes_logged(sorted(tmp_path.glob("w*.log")))
    ran_again = [ran_again_elsewhere(r, outcomes) for r in chaos.recoveries]
    last = ", ".join("-" if r.seconds is None else f"{r.seconds:.1f}" for r in chaos.recoveries)
    print(
        f"\nfaults: {EVENTS} events; the sender done in {sent_s[0]:.1f} s (outage and re-sends "
        f"included), the queue drained {drained_s:.1f} s after the first delivery; "
        f"{chaos.kills} SIGKILL, {chaos.terminations} SIGTERM, {chaos.redis_restarts} Redis restart\n"
        f"  Redis down {REDIS_DOWN_S:g} s with {chaos.unacknowledged_at_stop} of {EVENTS} "
        f"deliveries unacknowledged: {chaos.retried_deliveries} refused {dict(chaos.refusals)} "
        f"and re-sent, for {len(chaos.resent)} events, handled once: {resent_once}\n"
        f"  the SIGKILLed workers held {held} runs ({forced} cut off after calling HrFlow), "
        f"of which {ran_again} ran again on another worker, the last {last} s after the kill "
        f"(a dead worker's claims are taken over once its {LEASE_S:g} s lease expires)\n"
        f"  handler runs {effects.total_runs} for {EVENTS} events: {effects.re_executions} "
        f"re-executions; copies written by {sum(effects.posts.values())} POSTs "
        f"({statuses['POST 201']} answered 201) and {sum(effects.puts.values())} in-place PUTs\n"
        f"  handled once {handled_once}, lost {lost}, duplicate effects {effects.duplicates}; "
        f"left queued {queued_left}, dead letters {dead_letters}"
    )
    assert (chaos.kills, chaos.terminations, chaos.redis_restarts) == (KILLS, 1, 1)
    # Redis went down while deliveries were flowing, they were refused with a 503 and re-sent,
    # and each of those events took effect once.
    assert chaos.unacknowledged_at_stop > 0
    assert chaos.refusals["503"] > 0
    assert len(chaos.resent) > 0
    assert resent_once == len(chaos.resent)
    # Each kill's held runs were the dead worker's: each ran again on another worker after
    # the kill, and all were finished (the wait gives up after two minutes). At least one kill
    # cut runs off.
    assert ran_again == held
    assert [r.finished for r in chaos.recoveries] == held
    assert all(r.seconds is not None for r in chaos.recoveries if r.held)
    assert sum(held) >= 1
    assert effects.re_executions >= forced
    assert sum(effects.puts.values()) <= effects.re_executions  # only a re-run finds its copy
    assert effects.total_runs == EVENTS + effects.re_executions  # every event's handler ran
    assert (lost, effects.duplicates, handled_once) == (0, 0, EVENTS)
    assert references == {f"origin-{k}" for k in keys}
    assert sum(effects.posts.values()) == statuses["POST 201"] == EVENTS
    assert (queued_left, dead_letters, jobs_left) == (0, 0, [])


# --- a Redis stall and a loop-blocking plugin ---------------------------------------------------

STALL_EVENTS = 200
STALL_BLOCKED = 10  # events whose plugin run blocks its worker's event loop past the timeout
STALL_PAUSE_MS = 6_000  # longer than the job timeout (4 s)
EDIT_TAG = {"name": "stall", "value": "survived"}


async def _stall_outcomes(
    sandbox: SandboxProcess, session: aiohttp.ClientSession, redis: Redis, keys: list[str]
) -> dict[str, Any]:
    """Per handler: events handled (seen in the sandbox or the plugin's record), dead-lettered,
    and lost (neither)."""
    async with session.get(f"{sandbox.url}/_sandbox/profiles") as response:
        profiles = (await response.json())["profiles"]
    copies = Counter(p.get("reference") for p in profiles if _source_of(p) == TARGET)
    tagged = {
        p["key"] for p in profiles if _source_of(p) == ORIGIN and EDIT_TAG in (p.get("tags") or [])
    }
    blocked_ran = {k.decode() for k in await redis.smembers(blocking.EFFECTS_KEY)}  # type: ignore[misc]
    dead: set[tuple[str, str]] = set()
    for letter_id in await redis.zrange("hrflow:queue:dead-letters", 0, -1):
        raw = await redis.get(f"hrflow:queue:dead:{letter_id.decode()}")
        letter = json.loads(raw)
        dead.add((letter["handler"], letter["event"]["payload"]["profile"]["key"]))
    handled = {
        "builtin.index": {k for k in keys if copies[f"origin-{k}"] >= 1},
        "builtin.edit": tagged,
        "blocking": blocked_ran,
    }
    return {
        handler: {
            "handled": len(done & set(keys)),
            "dead": sum(1 for k in keys if (handler, k) in dead),
            "lost": sorted(k for k in keys if k not in done and (handler, k) not in dead),
        }
        for handler, done in handled.items()
    } | {"duplicate_copies": Effects.of(await sandbox.calls(session), profiles).duplicates}


def _blocks_and_lines(logs: list[Path]) -> tuple[int, int]:
    """Blocks of the event loop that happened, and the worker's lines naming them."""
    lines = [line for log in logs for line in log.read_text().splitlines()]
    blocks = sum(1 for line in lines if blocking.BLOCKING_NOW in line)
    return blocks, sum(1 for line in lines if "event loop blocked" in line)


async def _every_block_named(logs: list[Path]) -> bool:
    blocks, named = _blocks_and_lines(logs)
    return named >= blocks


async def test_no_event_is_lost_to_a_redis_stall_or_a_loop_blocking_plugin(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    sandbox = SandboxProcess(tmp_path / "sandbox.log")
    receiver = ReceiverProcess(redis_server.url, tmp_path / "receiver.log")
    worker_args = sandbox_worker_args(
        sandbox,
        handlers="tests.plugins.blocking",
        edit_tags=f"{EDIT_TAG['name']}={EDIT_TAG['value']}",
        test_block_s=STALL_PAUSE_MS / 1000,
    )
    logs = [tmp_path / f"stall-w{i}.log" for i in range(2)]
    workers = [WorkerProcess(redis_server.url, log, **worker_args) for log in logs]
    keys = [
        f"stall-{i:04d}" + ("-block" if i % (STALL_EVENTS // STALL_BLOCKED) == 7 else "")
        for i in range(STALL_EVENTS)
    ]
    chaos = Chaos()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
            await sandbox.wait_ready(session)
            await receiver.wait_ready(session)
            await asyncio.gather(*(sandbox.store(session, k) for k in keys))

            async def send_all() -> None:
                for chunk in range(0, STALL_EVENTS, 8):
                    await asyncio.gather(
                        *(
                            deliver(session, receiver.url, parsing_event(k, ORIGIN), chaos)
                            for k in keys[chunk : chunk + 8]
                        )
                    )
                    await asyncio.sleep(0.1)  # about 2.5 s in all: the stall lands mid-flow

            health = "hrflow:queue:health-check"
            await eventually(lambda: key_exists(redis, health))  # the workers poll
            sending = asyncio.create_task(send_all())

            async def four_runs_held() -> list[str]:
                held = await in_progress_jobs(redis)
                return held if len(held) >= 4 else []

            # Pause Redis while the workers hold runs: the stall must hit runs in flight.
            held = await eventually(four_runs_held, interval_s=0.01)
            sending_at_pause = not sending.done()
            await redis.client_pause(STALL_PAUSE_MS, all=True)
            await sending
            with contextlib.suppress(AssertionError):  # liveness; what is left is asserted
                await eventually(lambda: queue_empty(redis), timeout_s=180, interval_s=0.1)
            queued_left = await redis.zcard("hrflow:queue")
            outcomes = await _stall_outcomes(sandbox, session, redis, keys)
            # A blocking run's worker looks dead to the others (its lease lapses), so the run
            # may be done elsewhere while the block goes on: let the last block end and be named.
            with contextlib.suppress(AssertionError):  # asserted below
                await eventually(lambda: _every_block_named(logs), timeout_s=STALL_PAUSE_MS / 500)
    finally:
        for worker in workers:
            worker.close()
        receiver.close()
        sandbox.close()
    blocks, blocked_lines = _blocks_and_lines(logs)
    print(
        f"\nstall: {STALL_EVENTS} events, Redis paused {STALL_PAUSE_MS} ms (job timeout "
        f"{JOB_TIMEOUT_S} s) while workers held {len(held)} runs; {blocks} plugin runs blocked "
        f"the event loop {STALL_PAUSE_MS / 1000:g} s ({STALL_BLOCKED} events set to), "
        f"{blocked_lines} 'event loop blocked' log lines; {chaos.retried_deliveries} "
        f"deliveries re-sent after a 503; "
        f"per handler {outcomes}; left queued {queued_left}"
    )
    assert sending_at_pause  # the stall hit runs in flight while deliveries still arrived
    # Each block that happened was named. (A run the stall cut off before the plugin's
    # blocking step never blocks: most do.)
    assert blocks >= STALL_BLOCKED // 2
    assert blocked_lines == blocks
    assert chaos.retried_deliveries > 0  # deliveries during the stall got 503 and were re-sent
    for handler in ("builtin.index", "builtin.edit", "blocking"):
        assert outcomes[handler]["lost"] == [], handler
        assert outcomes[handler]["handled"] + outcomes[handler]["dead"] == STALL_EVENTS
    assert outcomes["duplicate_copies"] == 0
    assert queued_left == 0
