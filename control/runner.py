"""``hrflow-webhooks run``: the whole service on one machine, under a small process supervisor.

What starts, in order (each waits until the previous one answers):

1. an embedded ``redis-server`` (data in ``.run/redis``, AOF with ``appendfsync
   always``, ``noeviction``), only when neither ``REDIS_URL`` nor
   ``HRFLOW_REDIS_SENTINELS`` is set;
2. the sandbox HrFlow API (``python -m sandbox``), only when ``HRFLOW_API_KEY``
   is unset, with the built-in handlers pointed at it;
3. the receiver (the Procfile's web line, ``control.commands``);
4. the operator console (``hrflow-webhooks console``), on loopback, its token kept in
   ``.run/console-token`` unless ``HRFLOW_CONSOLE_TOKEN`` is set;
5. N workers (``hrflow-webhooks worker``).

Every child runs in its own session (process group), so Ctrl-C reaches the
supervisor only and the stop order is ours: workers and receiver first (they
may still write to Redis), then the sandbox, then Redis, which flushes its AOF
on SIGTERM. A group that outlives the grace period is killed, and every child
is waited for, so nothing is left running or as a zombie. Output is prefixed
per child, honcho/foreman style. A worker that dies is restarted with backoff;
any other child dying stops everything with a clear reason, since the service
cannot work without it (the console, which the service does not need, is restarted too).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from control.commands import console_argv, web_argv, worker_argv
from hrflow_webhooks.settings import Settings

DEFAULT_STATE_DIR = Path(".run")
SECRET_FILE_NAME = "webhook-secret"  # noqa: S105 (a file name, not a secret)
CONSOLE_TOKEN_FILE_NAME = "console-token"  # noqa: S105 (a file name, not a secret)
# While `run` runs: the environment other commands need to reach its service (its Redis),
# as lines a shell can source. Gone when `run` stops.
SERVICE_ENV_FILE_NAME = "service.env"
SANDBOX_API_KEY = "sandbox-api-key"
SANDBOX_API_USER = "sandbox@hrflow.local"
DEMO_EDIT_TAGS = "processed_by=hrflow-webhooks"

STOP_GRACE_S = 10.0  # per group, after SIGTERM, before SIGKILL
READY_TIMEOUT_S = 60.0
RESTART_BACKOFF_MAX_S = 30.0
STABLE_RUN_S = 60.0  # a worker up this long restarts with the shortest backoff again


class RunError(RuntimeError):
    """The local stack cannot start or keep running; the message says why."""


# --- the webhook secret -----------------------------------------------------------------------


def load_or_create_secret(path: Path) -> str:
    """The persisted local secret; generated once so HrFlow-side settings keep working."""
    if path.exists():
        secret = path.read_text().strip()
        if secret:
            return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    # Created private (0600) from the start: the secret is never world-readable, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    return secret


def webhook_secret(settings: Settings, state_dir: Path = DEFAULT_STATE_DIR) -> str:
    """HRFLOW_WEBHOOK_SECRET's newest secret when set, else the persisted local one."""
    if settings.webhook_secrets:
        return settings.webhook_secrets[0].get_secret_value()
    return load_or_create_secret(state_dir / SECRET_FILE_NAME)


# --- commands the supervisor, the Procfile and the Dockerfile share ---------------------------


def sandbox_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "sandbox", "--host", host, "--port", str(port)]


def redis_command(binary: str, port: int, data_dir: Path) -> list[str]:
    """The settings README asks of production Redis: nothing acknowledged may be lost."""
    return [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--maxmemory-policy", "noeviction",
        "--save", "",
    ]  # fmt: skip


def console_script() -> str:
    """How the user should call us: on PATH by name, else the venv's script path."""
    if shutil.which("hrflow-webhooks"):
        return "hrflow-webhooks"
    script = Path(sys.executable).parent / "hrflow-webhooks"
    with contextlib.suppress(ValueError):
        return str(script.relative_to(Path.cwd()))
    return str(script)


# --- readiness probes -------------------------------------------------------------------------


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback URL we built)
            return 200 <= int(response.status) < 500
    except urllib.error.HTTPError as error:
        return error.code < 500
    except OSError:
        return False


# --- children ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    ready: Callable[[], bool] | None = None
    restart: bool = False  # restart when it dies (workers) or stop everything (the rest)


class Output:
    """Prefixes each child's lines with a timestamp and its name, one writer at a time."""

    COLOURS = ("36", "33", "32", "35", "34", "31")

    def __init__(self, stream: IO[str], width: int = 10) -> None:
        self.stream = stream
        self.width = width
        self.lock = threading.Lock()
        self.colour = stream.isatty()
        self._colours: dict[str, str] = {}

    def line(self, name: str, text: str) -> None:
        label = f"{time.strftime('%H:%M:%S')} {name:<{self.width}} |"
        if self.colour:
            code = self._colours.setdefault(name, self.COLOURS[len(self._colours) % 6])
            label = f"\x1b[{code}m{label}\x1b[0m"
        with self.lock:
            self.stream.write(f"{label} {text}\n")
            self.stream.flush()

    def say(self, text: str = "") -> None:
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when its parent (`run`) dies, even by SIGKILL, which no
    handler of ours can see (Linux only; elsewhere the children outlive a killed `run`)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(slots=True)
class Child:
    spec: ChildSpec
    output: Output
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    _pump: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self.process = subprocess.Popen(
            list(self.spec.argv),
            env=dict(self.spec.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C and our kills stay apart
            preexec_fn=die_with_parent,
        )
        self.started_at = time.monotonic()
        self._pump = threading.Thread(
            target=self._copy_output, args=(self.process.stdout,), daemon=True
        )
        self._pump.start()

    def _copy_output(self, stdout: IO[bytes]) -> None:
        for raw in stdout:
            self.output.line(self.spec.name, raw.decode(errors="replace").rstrip())

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal_group(self, signum: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def stop(self, grace_s: float) -> None:
        """SIGTERM the group, wait, SIGKILL what is left, and reap the child."""
        if self.process is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.output.say(f"{self.spec.name} did not stop within {grace_s:.0f}s: killing it")
        # Grandchildren (uvicorn's workers, say) may outlive the leader: kill the whole group.
        self.signal_group(signal.SIGKILL)
        self.process.wait()
        if self._pump is not None:
            self._pump.join(timeout=2)


# --- the supervisor ---------------------------------------------------------------------------


class Supervisor:
    def __init__(self, output: Output, grace_s: float = STOP_GRACE_S) -> None:
        self.output = output
        self.grace_s = grace_s
        self.children: list[Child] = []
        self.stopping = threading.Event()

    def request_stop(self, signum: int, _frame: object = None) -> None:
        if not self.stopping.is_set():
            self.output.say(f"\n{signal.Signals(signum).name} received: stopping everything")
        self.stopping.set()

    def start(self, spec: ChildSpec) -> Child:
        child = Child(spec, self.output)
        self.children.append(child)
        child.start()
        self._wait_ready(child)
        return child

    def _wait_ready(self, child: Child) -> None:
        if child.spec.ready is None:
            return
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not child.spec.ready():
            code = child.exit_code()
            if code is not None:
                raise RunError(f"{child.spec.name} exited with code {code} while starting")
            if self.stopping.is_set():
                raise RunError(f"stopped while {child.spec.name} was starting")
            if time.monotonic() > deadline:
                raise RunError(f"{child.spec.name} was not ready after {READY_TIMEOUT_S:.0f}s")
            self.stopping.wait(0.05)

    def watch(self) -> int:
        """Until a stop is requested: restart dead workers; return 1 if another child dies."""
        while not self.stopping.wait(0.2):
            for child in self.children:
                code = child.exit_code()
                if code is None:
                    continue
                if not child.spec.restart:
                    self.output.say(
                        f"{child.spec.name} exited unexpectedly with code {code}: "
                        "the service cannot run without it, stopping everything"
                    )
                    return 1
                self._restart(child, code)
        return 0

    def _restart(self, child: Child, code: int) -> None:
        ran_s = time.monotonic() - child.started_at
        child.restarts = 0 if ran_s > STABLE_RUN_S else child.restarts + 1
        delay = min(RESTART_BACKOFF_MAX_S, 0.5 * 2**child.restarts)
        self.output.say(
            f"{child.spec.name} exited with code {code} after {ran_s:.0f}s: "
            f"restarting it in {delay:.1f}s"
        )
        if not self.stopping.wait(delay):
            child.start()

    def stop_all(self) -> None:
        """Reverse start order, so Redis goes last and everyone can finish writing to it."""
        for child in reversed(self.children):
            child.stop(self.grace_s)


# --- `run` ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    sandbox: bool | None = None  # None: on when HRFLOW_API_KEY is unset
    sandbox_port: int = 8001
    redis_port: int = 6390
    state_dir: Path = DEFAULT_STATE_DIR
    console_port: int | None = None  # None: HRFLOW_CONSOLE_PORT (8100)


@dataclass(frozen=True, slots=True)
class Plan:
    """What `run` will start and the environment its children share."""

    specs: list[ChildSpec]
    env: dict[str, str]
    secret: str
    redis_url: str
    embedded_redis: bool
    sandbox_url: str | None
    console_url: str


def child_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    # The one place the CLI reads os.environ: children inherit the user's environment.
    return {**os.environ, **overrides}


def _overrides(settings: Settings, options: RunOptions, secret: str) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "HRFLOW_LOG_FORMAT": settings.log_format}
    if "log_format" not in settings.model_fields_set:
        env["HRFLOW_LOG_FORMAT"] = "text"  # people read `run`'s output; JSON is for machines
    if not settings.webhook_secrets:
        env["HRFLOW_WEBHOOK_SECRET"] = secret
    if "redis_url" not in settings.model_fields_set and not settings.redis_sentinels:
        env["REDIS_URL"] = f"redis://127.0.0.1:{options.redis_port}/0"
    if settings.console_token is None:
        # Kept like the webhook secret, so a browser's session survives a restart of `run`.
        token_file = options.state_dir / CONSOLE_TOKEN_FILE_NAME
        env["HRFLOW_CONSOLE_TOKEN"] = load_or_create_secret(token_file)
    env["HRFLOW_CONSOLE_PORT"] = str(console_port(settings, options))
    return env


def console_port(settings: Settings, options: RunOptions) -> int:
    return settings.console_port if options.console_port is None else options.console_port


def console_url(settings: Settings, options: RunOptions) -> str:
    return f"http://{_connect_host(settings.console_host)}:{console_port(settings, options)}/"


def _sandbox_overrides(settings: Settings, sandbox_url: str) -> dict[str, str]:
    env = {
        "HRFLOW_API_URL": f"{sandbox_url}/v1",
        "HRFLOW_API_KEY": SANDBOX_API_KEY,
        "HRFLOW_API_USER": SANDBOX_API_USER,
    }
    if not settings.edit_tags:
        env["HRFLOW_EDIT_TAGS"] = DEMO_EDIT_TAGS
    return env


def plan_run(settings: Settings, options: RunOptions) -> Plan:
    secret = webhook_secret(settings, options.state_dir)
    overrides = _overrides(settings, options, secret)
    use_sandbox = settings.api_key is None if options.sandbox is None else options.sandbox
    sandbox_url = f"http://127.0.0.1:{options.sandbox_port}" if use_sandbox else None
    if sandbox_url is not None:
        overrides |= _sandbox_overrides(settings, sandbox_url)
    env = child_environment(overrides)
    embedded_redis = "REDIS_URL" in overrides
    specs: list[ChildSpec] = []
    if embedded_redis:
        specs.append(_redis_spec(options, env))
    if sandbox_url is not None:
        specs.append(
            ChildSpec(
                "sandbox",
                sandbox_command("127.0.0.1", options.sandbox_port),
                env,
                ready=lambda: http_answers(f"{sandbox_url}/_sandbox/calls"),
            )
        )
    receiver_url = f"http://{_connect_host(options.host)}:{options.port}"
    specs.append(
        ChildSpec(
            "web.1",
            web_argv(options.port, options.host),
            env,
            ready=lambda: http_answers(f"{receiver_url}/healthz"),
        )
    )
    console = console_url(settings, options)
    specs.append(
        ChildSpec(
            "console",
            console_argv(),
            env,
            ready=lambda: http_answers(f"{console}healthz"),
            restart=True,  # the service runs without it: a crash is not a reason to stop
        )
    )
    specs += [
        ChildSpec(f"worker.{n}", worker_argv(), env, restart=True)
        for n in range(1, options.workers + 1)
    ]
    redis_url = overrides.get("REDIS_URL", settings.redis_url)
    return Plan(specs, env, secret, redis_url, embedded_redis, sandbox_url, console)


def _redis_spec(options: RunOptions, env: Mapping[str, str]) -> ChildSpec:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RunError(
            "redis-server is not on PATH: install it (Debian: apt-get install redis-server; "
            "`make run` does) or set REDIS_URL to a Redis you run"
        )
    data_dir = options.state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    return ChildSpec(
        "redis",
        redis_command(binary, options.redis_port, data_dir),
        env,
        ready=lambda: redis_answers(options.redis_port),
    )


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _check_ports(plan: Plan, options: RunOptions, settings: Settings) -> None:
    wanted = [("--port", options.host, options.port)]
    console = ("--console-port", settings.console_host, console_port(settings, options))
    wanted.append(console)
    if plan.embedded_redis:
        wanted.append(("--redis-port", "127.0.0.1", options.redis_port))
    if plan.sandbox_url is not None:
        wanted.append(("--sandbox-port", "127.0.0.1", options.sandbox_port))
    for flag, host, port in wanted:
        if not port_is_free(host, port):
            raise RunError(f"port {port} is already in use: pick another with {flag}")


def send_command(options: RunOptions) -> str:
    """The demo: a parsing event for a profile the sandbox is seeded with."""
    from sandbox import JOHN_DOE_KEY, SAMPLE_SOURCE_KEY

    parts = [
        console_script(),
        "send",
        "profile.parsing.success",
        "--profile-key",
        JOHN_DOE_KEY,
        "--source-key",
        SAMPLE_SOURCE_KEY,
    ]
    if (options.host, options.port) != ("127.0.0.1", 8000):
        parts += ["--url", f"http://{_connect_host(options.host)}:{options.port}/webhook"]
    if options.state_dir != DEFAULT_STATE_DIR:
        parts += ["--state-dir", str(options.state_dir)]
    return shlex.join(parts)


def _service_env_lines(plan: Plan, options: RunOptions) -> list[str]:
    where = options.state_dir / SERVICE_ENV_FILE_NAME
    lines = [f"dead-letters, check and erase run from this folder find this Redis ({where})"]
    if plan.embedded_redis:  # a REDIS_URL of the user's may hold a password: not echoed
        lines[0] += "; from elsewhere:"
        lines.append(f"  export REDIS_URL={plan.redis_url}")
    return [*lines, ""]


def banner(plan: Plan, options: RunOptions, settings: Settings) -> str:
    url = f"http://{_connect_host(options.host)}:{options.port}/webhook"
    if settings.webhook_secrets:
        secret_line = f"{plan.secret}  (from HRFLOW_WEBHOOK_SECRET)"
    else:
        secret_line = f"{plan.secret}  (saved in {options.state_dir / SECRET_FILE_NAME})"
    redis_line = (
        f"{plan.redis_url}  (embedded, data in {options.state_dir / 'redis'})"
        if plan.embedded_redis
        else "through Sentinel (HRFLOW_REDIS_SENTINELS)"
        if settings.redis_sentinels
        else "from REDIS_URL"
    )
    api_line = (
        f"sandbox at {plan.sandbox_url}  (see {plan.sandbox_url}/_sandbox/calls)"
        if plan.sandbox_url
        else f"{settings.api_url}"
    )
    return "\n".join(
        [
            "",
            "hrflow-webhooks is running",
            f"  webhook URL     {url}",
            f"  webhook secret  {secret_line}",
            f"  redis           {redis_line}",
            f"  HrFlow API      {api_line}",
            f"  workers         {options.workers}",
            f"  console         {plan.console_url}  ({_console_token_line(settings, options)})",
            "",
            "Send a signed test event:",
            f"  {send_command(options)}",
            "",
            *_service_env_lines(plan, options),
            "Press Ctrl-C to stop.",
            "",
        ]
    )


def _console_token_line(settings: Settings, options: RunOptions) -> str:
    if settings.console_token is not None:
        return "token from HRFLOW_CONSOLE_TOKEN"
    token_file = options.state_dir / CONSOLE_TOKEN_FILE_NAME
    return f"token {load_or_create_secret(token_file)}, saved in {token_file}"


def claim_service_env(path: Path) -> int:
    """Open ``path`` and hold an exclusive lock on it for as long as this `run` runs.

    Readers trust the file only while that lock is held, so a file left by a killed run,
    or one whose pid was reused since, is never taken for a running service. A second `run`
    in the same state directory is refused here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(
            f"another `hrflow-webhooks run` uses {path.parent}: stop it, or pass --state-dir"
        ) from None
    os.fchmod(fd, 0o600)  # it may name a Redis URL with a password
    return fd


def write_service_env(fd: int, plan: Plan) -> None:
    """What `dead-letters`, `check`, `erase` and `reconcile` read to find this run's Redis
    (and its sandbox API)."""
    lines = [f"# written by hrflow-webhooks run (pid {os.getpid()}); removed when it stops"]
    lines += [f"RUN_PID={os.getpid()}", f"REDIS_URL={plan.redis_url}"]
    if plan.sandbox_url is not None:  # `reconcile` lists the sandbox's profiles (dev keys)
        lines += [
            f"HRFLOW_API_URL={plan.sandbox_url}/v1",
            f"HRFLOW_API_KEY={SANDBOX_API_KEY}",
            f"HRFLOW_API_USER={SANDBOX_API_USER}",
        ]
        # ... and queues what the workers' handlers act on: the demo's edit handler too.
        if plan.env.get("HRFLOW_EDIT_TAGS"):
            lines.append(f"HRFLOW_EDIT_TAGS={plan.env['HRFLOW_EDIT_TAGS']}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, ("\n".join(lines) + "\n").encode(), 0)


def release_service_env(path: Path, fd: int) -> None:
    path.unlink(missing_ok=True)  # while still locked: no reader trusts a stale file
    os.close(fd)


def running_service_env(state_dir: Path) -> dict[str, str]:
    """The environment a running `run` left in ``state_dir``, or {} if none runs there:
    the file must be this user's, writable by nobody else, and locked by its `run`."""
    try:
        fd = os.open(state_dir / SERVICE_ENV_FILE_NAME, os.O_RDONLY)
    except OSError:
        return {}
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return {}
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # a running `run` holds it
        else:
            return {}  # nobody holds it: left by a run that was killed
        text = os.pread(fd, 65_536, 0).decode(errors="replace")
    finally:
        os.close(fd)
    return dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )


def run(settings: Settings, options: RunOptions, stream: IO[str] = sys.stdout) -> int:
    """Start everything, print how to use it, supervise until Ctrl-C; 0 on a clean stop."""
    plan = plan_run(settings, options)
    _check_ports(plan, options, settings)
    output = Output(stream)
    supervisor = Supervisor(output)
    previous = {
        signum: signal.signal(signum, supervisor.request_stop)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    service_env = options.state_dir / SERVICE_ENV_FILE_NAME
    try:
        service_env_fd = claim_service_env(service_env)
    except RunError as error:
        output.say(f"error: {error}")
        return 1
    try:
        for spec in plan.specs:
            supervisor.start(spec)
        write_service_env(service_env_fd, plan)
        output.say(banner(plan, options, settings))
        return supervisor.watch()
    except RunError as error:
        output.say(f"error: {error}")
        return 1
    finally:
        release_service_env(service_env, service_env_fd)
        supervisor.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        output.say("all processes stopped")
