"""Real processes on loopback: redis-server, uvicorn apps, bench workers, the sandbox API.

Every process is started here, tracked, and stopped by its own pid when the
bench leaves its ``Processes`` block, so a failed row leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from control.commands import PROCFILE, expand, web_argv
from tests.polling import eventually_sync
from tests.redis_server import RedisServer, free_port

PYTHON = sys.executable
WEBHOOK_SECRET = "bench-webhook-secret"
# The receiver runs the Procfile's web line (control.commands), as deployed. The bare
# endpoint runs the same line with its app and uvicorn's own httptools protocol in place of
# the receiver's, so the two differ by the receiver and nothing else.
RECEIVER_APP = "receiver.app:create_app"
BARE_APP = "bench.bare:app"


ROOT = Path(__file__).resolve().parent.parent


def deployed_web_command(port: int, open_files: int | None = None) -> list[str]:
    """The Procfile's web line as a platform runs it (``PORT`` set), optionally under an
    open-file limit (``ulimit -n``, as a small container or dyno has)."""
    argv = expand(PROCFILE["web"], {"PORT": str(port)})
    if open_files is None:
        return argv
    return ["sh", "-c", f'ulimit -n {open_files} && exec "$@"', "sh", *argv]


def deployed_env(redis_url: str, secret: str) -> dict[str, str]:
    """What a deployment sets: the secret and Redis, nothing else (every other setting default),
    with this interpreter's scripts (uvicorn, hrflow-webhooks) on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HRFLOW_", "REDIS_"))}
    return env | {
        "REDIS_URL": redis_url,
        "HRFLOW_WEBHOOK_SECRET": secret,
        "PATH": f"{Path(PYTHON).parent}:{env.get('PATH', '')}",
    }


def bare_argv(app: str, port: int) -> list[str]:
    """The deployed web line serving ``app`` over uvicorn's own httptools protocol."""
    argv = web_argv(port, "127.0.0.1")
    argv[argv.index(RECEIVER_APP)] = app
    argv.remove("--factory")
    argv[argv.index("--http") + 1] = "httptools"
    return argv


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def listens(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def answers(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310 (loopback only)
        return bool(answer.status == 200)
    return False


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    eventually_sync(lambda: listens(port), f"a listener on 127.0.0.1:{port}", timeout_s=timeout_s)


def wait_for_http(url: str, timeout_s: float = 20.0) -> None:
    eventually_sync(lambda: answers(url), f"200 from {url}", timeout_s=timeout_s)


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc (Linux): what the kernel charges the process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far: a figure other tenants cannot inflate."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Processes:
    """Owns the processes of one bench run; ``close`` stops each by its pid."""

    work_dir: Path
    log_level: str | None = None  # None: the deployed default (INFO)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis: RedisServer | None = None

    def start_redis(self) -> RedisServer:
        # The production configuration of README (AOF, fsync always): "durably queued" means it.
        self.redis = RedisServer(self.work_dir / "redis")
        self.redis.start()
        return self.redis

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    @property
    def redis_pid(self) -> int:
        assert self.redis is not None
        assert self.redis.process is not None
        return self.redis.process.pid

    def env(self, **extra: str) -> dict[str, str]:
        assert self.redis is not None
        env = deployed_env(self.redis.url, WEBHOOK_SECRET) | {"PYTHONUNBUFFERED": "1"}
        if self.log_level is not None:
            env["HRFLOW_LOG_LEVEL"] = self.log_level
        return env | extra

    def spawn(
        self, name: str, command: list[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        log = (self.work_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(command, env=dict(env), stdout=log, stderr=log)
        log.close()
        self.children.append(process)
        return process

    def start_app(
        self, name: str, app: str, *, wrapper: tuple[str, ...] = (), **env: str
    ) -> tuple[subprocess.Popen[bytes], str]:
        """One uvicorn process serving ``app`` (under ``wrapper``, e.g. valgrind); returns it
        and its base URL."""
        port = free_port()
        command = web_argv(port, "127.0.0.1") if app == RECEIVER_APP else bare_argv(app, port)
        process = self.spawn(name, [*wrapper, *command], self.env(**env))
        wait_for_port(port, timeout_s=120 if wrapper else 20)
        return process, f"http://127.0.0.1:{port}"

    def start_worker(
        self,
        name: str,
        plugins: list[str],
        *,
        arq_defaults: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        command = [PYTHON, "-m", "bench.worker", *plugins]
        if arq_defaults:
            command.append("--arq-defaults")
        return self.spawn(name, command, self.env(**(env or {})))

    def start_sandbox(self, latency_ms: int) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        command = [PYTHON, "-m", "sandbox", "--port", str(port), "--latency-ms", str(latency_ms)]
        process = self.spawn("sandbox", command, self.env())
        wait_for_port(port)
        return process, f"http://127.0.0.1:{port}"

    def stop(self, process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
        terminate(process, timeout_s)
        if process in self.children:
            self.children.remove(process)

    def close(self) -> None:
        for process in list(reversed(self.children)):
            self.stop(process)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


@contextlib.contextmanager
def processes(work_dir: Path, log_level: str | None = None) -> Iterator[Processes]:
    work_dir.mkdir(parents=True, exist_ok=True)
    owned = Processes(work_dir, log_level)
    try:
        yield owned
    finally:
        owned.close()
