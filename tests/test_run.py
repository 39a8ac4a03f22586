"""`hrflow-webhooks run` as a newcomer runs it, and the worker that outlives Redis outages.

The run test starts the real command in a fresh working directory (no `.run`
state) on free ports, runs the `send` command it prints, checks the sandbox saw
the profile edited, kills a worker to see it restarted, then sends Ctrl-C's
SIGINT to the process group and checks every process it started is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from control.runner import (
    RunError,
    claim_service_env,
    load_or_create_secret,
    release_service_env,
    running_service_env,
)
from hrflow_webhooks.enqueue import EventQueue
from hrflow_webhooks.events import Event
from tests.polling import eventually, eventually_sync
from tests.redis_server import RedisServer, free_port
from tests.service import make_settings, parsing_event, recorder
from workers.process import WorkerLoop
from workers.registry import Registry
from workers.settings import create_worker

HANG_GUARD_S = 90.0  # only stops a broken run from hanging the suite; nothing is timed


# For run's output and its process tree: every check reads /proc, so not too often.
wait_for = functools.partial(eventually_sync, timeout_s=HANG_GUARD_S, interval_s=0.1)


def parent_of(pid: int) -> int | None:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat_line.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> set[int]:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    parents = {pid: parent_of(pid) for pid in pids}
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def child_pids(root: int, marker: str) -> set[int]:
    """Descendants with ``marker`` as one of their arguments."""
    pids = set()
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                pids.add(pid)
    return pids


class RunProcess:
    """`hrflow-webhooks run` in its own process group, its output collected line by line."""

    def __init__(self, cwd: Path, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HRFLOW_")}
        env.pop("REDIS_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "control.cli", "run", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def line_with(self, text: str) -> str | None:
        return next((line for line in list(self.lines) if text in line), None)

    def ctrl_c(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        return self.process.wait(timeout=HANG_GUARD_S)


@pytest.fixture
def run_process(tmp_path: Path) -> Iterator[tuple[RunProcess, dict[str, int]]]:
    ports = {
        "port": free_port(),
        "sandbox-port": free_port(),
        "redis-port": free_port(),
        "console-port": free_port(),
    }
    args = [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    run = RunProcess(tmp_path, args)
    yield run, ports
    if run.process.poll() is None:  # a failed test: leave nothing behind
        for pid in descendants(run.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.process.kill()
        run.process.wait()


def sandbox_calls(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sandbox/calls") as answer:
        calls: list[dict[str, Any]] = json.load(answer)["calls"]
    return calls


def edited_with_tag(calls: list[dict[str, Any]], profile_key: str) -> bool:
    return any(
        call["method"] == "PUT"
        and call["path"] == "/v1/profile/indexing"
        and call["status"] == 200
        and (call["body"] or {}).get("key") == profile_key
        and {"name": "processed_by", "value": "hrflow-webhooks"} in call["body"].get("tags", [])
        for call in calls
    )


def test_run_prints_a_send_command_that_works_and_ctrl_c_stops_everything(
    run_process: tuple[RunProcess, dict[str, int]], tmp_path: Path
) -> None:
    run, ports = run_process
    command_line = wait_for(lambda: run.line_with(" send profile.parsing.success "), "banner")
    assert command_line is not None  # wait_for returns only a truthy value
    secret_line = run.line_with("webhook secret")
    assert secret_line is not None
    assert (tmp_path / ".run" / "webhook-secret").read_text().strip() in secret_line
    assert f"http://127.0.0.1:{ports['port']}/webhook" in "\n".join(run.lines)
    started = descendants(run.process.pid)
    assert len(started) >= 4  # redis, sandbox, receiver, worker

    argv = shlex.split(command_line.strip())
    argv[0] = str(Path(sys.executable).parent / "hrflow-webhooks")  # as the user would run it
    sent = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.startswith("202 ")
    profile_key = argv[argv.index("--profile-key") + 1]
    wait_for(lambda: edited_with_tag(sandbox_calls(ports["sandbox-port"]), profile_key), "edit")
    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert json.loads(again.stdout.split(" ", 1)[1])["queued"] == 1  # a new event, not a dup

    # Commands run beside `run` reach its embedded Redis, not whatever answers on 6379.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HRFLOW_", "REDIS_"))}
    for command in (["check"], ["dead-letters", "list"]):
        done = subprocess.run(
            [argv[0], *command], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"redis://127.0.0.1:{ports['redis-port']}/0" in done.stderr
    assert (tmp_path / ".run" / "service.env").exists()
    # ... and `reconcile` lists the sandbox's profiles: the edited one is already handled.
    source_key = argv[argv.index("--source-key") + 1]
    reconcile = [argv[0], "reconcile", "--source", source_key, "--since", "1h"]
    done = subprocess.run(reconcile, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = re.match(
        r"scanned (\d+) profile\(s\) on \d+ page\(s\): enqueued (\d+), already handled (\d+)",
        done.stdout,
    )
    assert figures is not None, done.stdout
    scanned, enqueued, handled = (int(n) for n in figures.groups())
    assert handled >= 1
    assert scanned >= enqueued + handled

    [worker] = child_pids(run.process.pid, "worker")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: run.line_with("worker.1 exited with code -9"), "the supervisor to notice")
    restarted = wait_for(lambda: child_pids(run.process.pid, "worker") - {worker}, "a new worker")
    started |= restarted

    assert run.ctrl_c() == 0
    assert run.lines[-1] == "all processes stopped"
    assert not (tmp_path / ".run" / "service.env").exists()
    assert [pid for pid in started if alive(pid)] == []
    assert (tmp_path / ".run" / "redis" / "appendonlydir").is_dir()  # AOF on, in .run


def test_the_children_die_with_run_when_it_is_killed(
    run_process: tuple[RunProcess, dict[str, int]],
) -> None:
    """SIGKILL gives `run` no chance to stop its children: they must not outlive it."""
    run, _ = run_process
    wait_for(lambda: run.line_with(" send profile.parsing.success "), "banner")
    started = descendants(run.process.pid)
    assert len(started) >= 4  # redis, sandbox, receiver, worker
    run.process.kill()
    run.process.wait()
    wait_for(lambda: not [pid for pid in started if alive(pid)], "the children to die with run")


def test_the_service_env_is_trusted_only_while_its_run_holds_it(tmp_path: Path) -> None:
    """A file left by a killed run (or naming a reused pid) is unlocked: ignored. One that
    others may write is ignored too. A second run in the same state directory is refused."""
    env_file = tmp_path / "service.env"
    env_file.write_text(f"RUN_PID={os.getpid()}\nREDIS_URL=redis://127.0.0.1:1/0\n")
    assert running_service_env(tmp_path) == {}  # nobody holds it
    fd = claim_service_env(env_file)
    try:
        os.pwrite(fd, b"RUN_PID=1\nREDIS_URL=redis://127.0.0.1:1/0\n", 0)
        assert running_service_env(tmp_path)["REDIS_URL"] == "redis://127.0.0.1:1/0"
        with pytest.raises(RunError, match="another `hrflow-webhooks run` uses"):
            claim_service_env(env_file)
        env_file.chmod(0o666)
        assert running_service_env(tmp_path) == {}
    finally:
        release_service_env(env_file, fd)
    assert not env_file.exists()


def test_redis_url_from_the_environment_wins_over_a_running_run(tmp_path: Path) -> None:
    fd = claim_service_env(tmp_path / "service.env")
    try:
        os.pwrite(fd, b"RUN_PID=1\nREDIS_URL=redis://127.0.0.1:1/0\n", 0)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HRFLOW_", "REDIS_"))}
        probe = "from pathlib import Path; from control.cli import service_settings as s; "
        probe += "print(s(Path(__import__('sys').argv[1])).redis_url)"
        for extra, expected in (
            ({}, "redis://127.0.0.1:1/0"),
            ({"HRFLOW_REDIS_URL": "redis://elsewhere:2/0"}, "redis://elsewhere:2/0"),
            ({"REDIS_URL": "redis://elsewhere:3/0"}, "redis://elsewhere:3/0"),
        ):
            done = subprocess.run(
                [sys.executable, "-c", probe, str(tmp_path)],
                env=env | extra, capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert done.stdout.strip() == expected
    finally:
        release_service_env(tmp_path / "service.env", fd)


def test_the_secret_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "webhook-secret"
    first = load_or_create_secret(path)
    assert len(first) >= 40
    assert load_or_create_secret(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def still_running(task: asyncio.Task[None]) -> None:
    """Surface the worker loop's error at once if it died, rather than waiting to the limit."""
    if task.done():
        task.result()
        raise AssertionError("the worker loop returned before it was stopped")


async def test_a_worker_started_before_redis_says_so_and_works_once_redis_is_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis is down when the worker starts: it logs why, keeps trying, and then works.

    (arq's own start-up retried forever without a word: the worker looked alive and idle.)
    """
    server = RedisServer(tmp_path / "redis", free_port())
    settings = make_settings(server.url, shutdown_grace_s=0)
    registry = Registry()
    seen = recorder(registry, "profile.parsing.success")
    loop = WorkerLoop(
        settings,
        lambda: create_worker(settings, registry, handle_signals=False),
        restart_delay_s=0.05,
    )
    caplog.set_level(logging.ERROR, logger="workers")
    running = asyncio.create_task(loop.run())

    def unreachable() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "unreachable at start-up" in r.getMessage()]

    async def said_so_twice() -> bool:
        still_running(running)
        return len(unreachable()) >= 2

    async def handled() -> bool:
        still_running(running)
        return bool(seen)

    await eventually(said_so_twice)
    server.start()
    try:
        redis = Redis.from_url(server.url)
        event = Event.from_payload(parsing_event("pk-outage"))
        async with EventQueue(redis, settings.queue_name, 60) as queue:
            await queue.enqueue_events([event])
        await eventually(handled)
        loop.stop()
        await running
        assert [e.id for e in seen] == [event.id]
        assert unreachable()[0].__dict__["error_type"] == "ConnectionError"
        assert loop.restarts == 0
        await redis.aclose()
    finally:
        server.stop()


class _WorkerWithACancelledJob:
    """What arq's close() does when a stop without grace cancelled a job in its bookkeeping:
    it re-raises that job task's cancellation."""

    async def close(self) -> None:
        raise asyncio.CancelledError


async def test_a_job_cancelled_by_a_stop_does_not_crash_the_worker_loop() -> None:
    await WorkerLoop._close(_WorkerWithACancelledJob())  # type: ignore[arg-type]

    async def closing_while_cancelled() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # this task itself is being cancelled: that one is passed on
        await WorkerLoop._close(_WorkerWithACancelledJob())  # type: ignore[arg-type]

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(closing_while_cancelled())
