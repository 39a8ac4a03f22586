"""``make test-docker``: the production image, built and run in real containers.

tests/test_deploy.py reads the Dockerfile as text; this script runs it:

1. a Docker engine: Debian's docker.io is installed when dockerd is missing, and
   dockerd is started when no engine answers (and stopped again at the end);
2. the base image: python:3.11-slim when the registry answers, else an equivalent
   Debian bookworm base made once with debootstrap and cached (see build_local_base);
3. the image, built from the repository's Dockerfile;
4. on the host: a Redis (AOF on, as the durability watch wants) and the sandbox HrFlow
   API (the image does not ship it); in containers on the host's network: the web
   (the image's default command) and a worker (``hrflow-webhooks worker``).

Then it checks that both HEALTHCHECKs turn healthy, PID 1 is not root, a signed
``profile.parsing.success`` is accepted and handled (the worker tags the profile in the
sandbox), a badly signed one is refused, the console (the Procfile's ``console`` line,
in a third container) refuses a request without its token and shows the live worker with
it, and ``docker stop`` ends each cleanly within the grace period. Each summary line is one check; the first failure ends the run with
exit code 1 and its reason. Everything started is stopped or removed, failure or not.
Needs root (apt-get, dockerd, debootstrap, chroot). Logs go to .run/test-docker/.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from control.runner import die_with_parent, redis_answers
from sandbox import DEFAULT_API_KEY, DEFAULT_API_USER, JOHN_DOE_KEY, SAMPLE_SOURCE_KEY
from tests.service import signed_body_headers

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ROOT / ".run" / "test-docker"  # logs; .run is kept out of git and the build
IMAGE = "hrflow-webhooks:test"
UPSTREAM_BASE = "python:3.11-slim"
LOCAL_BASE = "hrflow-webhooks-base:bookworm"
BASE_LABEL = "org.hrflow-webhooks.base-recipe"
BASE_RECIPE = "3"  # bump when build_local_base changes what it makes: the cache is rebuilt
SUITE = "bookworm"  # the Debian release whose python3 is 3.11, as in the upstream base
DEFAULT_MIRROR = "http://deb.debian.org/debian"
LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # Debian's place for a host's own CAs
VENV_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DOCKERD_FLAGS = (
    # Every container and the build use the host's network: dockerd needs no bridge, and
    # has no reason to rewrite the host's firewall or switch IP forwarding on.
    "--bridge=none",
    "--iptables=false",
    "--ip-forward=false",
)
STORAGE_DRIVERS = ("overlay2", "vfs")  # vfs copies whole layers, but needs no overlayfs

APT_TIMEOUT_S = 900.0
ENGINE_TIMEOUT_S = 60.0
PULL_TIMEOUT_S = 120.0
DEBOOTSTRAP_TIMEOUT_S = 1_800.0
BUILD_TIMEOUT_S = 1_800.0
READY_TIMEOUT_S = 60.0
HEALTHY_TIMEOUT_S = 120.0
HANDLED_TIMEOUT_S = 60.0
# docker stop's default. README asks --stop-timeout 30 for workers, for the jobs running at
# a stop (HRFLOW_SHUTDOWN_GRACE_S, 25 s); an idle one must stop well within 10 s.
STOP_GRACE_S = 10
EDIT_TAG_NAME = "docker_smoke"


class SmokeError(Exception):
    """A step failed or a check did not hold; the message says which."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM: a BaseException, so no `except SmokeError` swallows it."""


# --- processes ---------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    argv: Sequence[str],
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    stdin: IO[bytes] | None = None,
) -> str:
    """Run argv to its end; its stdout, or SmokeError with the tail of what it said."""
    what = " ".join(argv[:3])
    try:
        result = subprocess.run(
            list(argv),
            cwd=ROOT,
            env=None if env is None else dict(env),
            stdin=stdin,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SmokeError(f"`{what}` did not finish within {timeout_s:.0f}s") from None
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    if log is not None:
        log.write_text(out + err)
    if result.returncode != 0:
        where = f" (log: {log})" if log is not None else ""
        raise SmokeError(f"`{what}` exited {result.returncode}{where}:\n{tail(err or out)}")
    return out


def spawn(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            list(argv),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script only; it stops the rest
            preexec_fn=die_with_parent,  # dies with this script, even by SIGKILL
        )


def stop_process(process: subprocess.Popen[bytes], grace_s: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(ready: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def free_port() -> int:
    # 0.0.0.0: the web container binds every interface of the host's network.
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def http(
    url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=dict(headers or {}))  # noqa: S310 (loopback URLs we built)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def answers(url: str) -> bool:
    try:
        return http(url)[0] == 200
    except OSError:
        return False


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        raise SmokeError(f"{why} needs root: run `make test-docker` as root")


# --- Debian packages ---------------------------------------------------------------------------


def which(command: str) -> str | None:
    # Daemons live in sbin, which a non-login PATH may lack.
    return shutil.which(command, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


@functools.cache
def apt_update() -> None:
    run(["apt-get", "update", "-qq"], APT_TIMEOUT_S, env=apt_env())


def apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def ensure_command(command: str, package: str) -> str:
    """The command's path, installing Debian's package first when it is missing."""
    path = which(command)
    if path is not None:
        return path
    require_root(f"installing {package}")
    say(f"  .. {command} missing: installing Debian's {package}")
    apt_update()
    # No recommends: docker.io's (apparmor, criu, needrestart...) are not needed here.
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    run(install, APT_TIMEOUT_S, env=apt_env(), log=STATE_DIR / f"apt-{package}.log")
    path = which(command)
    if path is None:
        raise SmokeError(f"{package} is installed but {command} is not on PATH")
    return path


# --- the engine --------------------------------------------------------------------------------


def engine_version() -> str | None:
    """The engine's version when one answers, else None."""
    try:
        result = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = result.stdout.strip()
    return version if result.returncode == 0 and version else None


def storage_driver() -> str:
    return run(["docker", "info", "--format", "{{.Driver}}"], 30).strip()


def start_dockerd(log: Path) -> subprocess.Popen[bytes]:
    """dockerd in the background, overlay2 first, then vfs where overlayfs cannot mount."""
    require_root("starting dockerd")
    dockerd = ensure_command("dockerd", "docker.io")
    for driver in STORAGE_DRIVERS:
        process = spawn([dockerd, *DOCKERD_FLAGS, f"--storage-driver={driver}"], log)

        def settled(process: subprocess.Popen[bytes] = process) -> bool:
            return process.poll() is not None or engine_version() is not None

        if wait_for(settled, ENGINE_TIMEOUT_S) and process.poll() is None:
            return process
        stop_dockerd(process)
        say(f"  .. dockerd did not start with --storage-driver={driver} (see {log})")
    raise SmokeError(f"dockerd did not start with any of {', '.join(STORAGE_DRIVERS)}: {log}")


def stop_dockerd(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, 30)
    # It leaves the host network's namespace handle mounted in its exec root (/run/docker).
    unmount_below(Path("/run/docker"))


# --- the base image ----------------------------------------------------------------------------


def image_exists(image: str) -> bool:
    try:
        run(["docker", "image", "inspect", image], 30)
    except SmokeError:
        return False
    return True


def image_label(image: str, label: str) -> str | None:
    template = f'{{{{ index .Config.Labels "{label}" }}}}'
    try:
        return run(["docker", "image", "inspect", "--format", template, image], 30).strip()
    except SmokeError:
        return None


def base_image() -> tuple[str, str]:
    """(image, how it was had): upstream if pullable or present, else the local one."""
    try:
        run(["docker", "pull", "--quiet", UPSTREAM_BASE], PULL_TIMEOUT_S)
        return UPSTREAM_BASE, "pulled"
    except SmokeError as error:
        reason = str(error).splitlines()[-1]
    if image_exists(UPSTREAM_BASE):
        return UPSTREAM_BASE, f"registry unreachable, local copy ({reason})"
    say(f"  .. {UPSTREAM_BASE} cannot be pulled ({reason}): using a local Debian base")
    recipe = base_recipe()
    if image_label(LOCAL_BASE, BASE_LABEL) == recipe:
        return LOCAL_BASE, "cached local debootstrap base"
    started = time.monotonic()
    build_local_base(recipe)
    return LOCAL_BASE, f"local debootstrap base, built in {time.monotonic() - started:.0f}s"


def local_cas() -> list[Path]:
    return sorted(LOCAL_CAS.rglob("*.crt")) if LOCAL_CAS.is_dir() else []


def base_recipe() -> str:
    """What the cached base was made from: rebuilt when the recipe or the host's CAs change."""
    digest = hashlib.sha256(debian_mirror().encode())
    for cert in local_cas():
        digest.update(cert.read_bytes())
    return f"{BASE_RECIPE}-{digest.hexdigest()[:12]}"


def debian_mirror() -> str:
    """The mirror apt uses here for SUITE (deb822 .sources or one-line .list files)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if path.suffix == ".sources" and path.is_file():
            uri = _deb822_mirror(path.read_text())
        elif path.suffix == ".list" and path.is_file():
            uri = _one_line_mirror(path.read_text())
        else:
            continue
        if uri is not None:
            return uri
    return DEFAULT_MIRROR


def _deb822_mirror(text: str) -> str | None:
    for stanza in text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in stanza.splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith(("#", " ")):
                fields[name.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []):
            return fields.get("uris", [None])[0]
    return None


def _one_line_mirror(text: str) -> str | None:
    for line in text.splitlines():
        words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
        if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
            return words[1]
    return None


def build_local_base(recipe: str) -> None:
    """A python:3.11-slim stand-in: Debian bookworm, python3.11 in a venv at /opt/venv
    (first on PATH, so `python` and `pip` are the names the Dockerfile uses, and pip
    installs without touching Debian's PEP 668-managed python), the host's own CAs
    trusted (a TLS-inspecting proxy between the build and PyPI), imported as LOCAL_BASE.
    """
    require_root("debootstrap")
    debootstrap = ensure_command("debootstrap", "debootstrap")
    root = Path(tempfile.mkdtemp(prefix="hrflow-webhooks-base-", dir="/var/tmp"))
    # mkdtemp's 0700 would become the image's "/": no way through it for USER app (vfs
    # keeps it as it is; overlay2 happened to hide it).
    root.chmod(0o755)
    try:
        mirror = debian_mirror()
        say(f"  .. debootstrap {SUITE} from {mirror} (a few minutes, once)")
        argv = [debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates"]
        run(
            [*argv, SUITE, str(root), mirror],
            DEBOOTSTRAP_TIMEOUT_S,
            log=STATE_DIR / "debootstrap.log",
        )
        _trust_local_cas(root)
        _python_venv(root)
        _slim(root)
        _import(root, recipe)
    finally:
        _remove_rootfs(root)


def _chroot(root: Path, *argv: str, timeout_s: float = 600) -> None:
    env = {
        "PATH": VENV_PATH,
        "LANG": "C.UTF-8",
        "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }  # nothing of the host's environment (its pip config points at host-only paths)
    run([which("chroot") or "chroot", str(root), *argv], timeout_s, env=env)


def _trust_local_cas(root: Path) -> None:
    target = root / LOCAL_CAS.relative_to("/")
    target.mkdir(parents=True, exist_ok=True)
    for cert in local_cas():
        shutil.copyfile(cert, target / cert.name)
    _chroot(root, "update-ca-certificates")


def _python_venv(root: Path) -> None:
    _chroot(root, "/usr/bin/python3", "-m", "venv", "/opt/venv")


def _slim(root: Path) -> None:
    for pattern in ("var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for path in root.glob(pattern):
            if path.is_file():
                path.unlink()
    (root / "etc" / "resolv.conf").write_text("")  # the host's; Docker mounts its own


def _import(root: Path, recipe: str) -> None:
    changes = [
        f"ENV PATH={VENV_PATH}",
        "ENV LANG=C.UTF-8",
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",  # pip's certifi lacks host CAs
        f"LABEL {BASE_LABEL}={recipe}",
        'CMD ["python3"]',
    ]
    argv = ["docker", "import", *(f"--change={c}" for c in changes), "-", LOCAL_BASE]
    tar = subprocess.Popen(
        ["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
    )
    assert tar.stdout is not None
    try:
        run(argv, 600, stdin=tar.stdout)
    finally:
        tar.stdout.close()
        stop_process(tar, 10)


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True)


def unmount_below(root: Path) -> bool:
    """Unmount everything below root, deepest first; True when nothing is left."""
    for mount in _mounts_below(root):
        subprocess.run(["umount", "-l", mount], check=False, timeout=30)
    return not _mounts_below(root)


def _remove_rootfs(root: Path) -> None:
    # A failed debootstrap can leave /proc or /sys mounted inside: never delete through one.
    if not unmount_below(root):
        say(f"  .. {root} still has mounts: left in place")
        return
    shutil.rmtree(root, ignore_errors=True)


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    """What this run started; the ExitStack stops it in reverse order."""

    exits: ExitStack
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    tag: str = field(default_factory=lambda: secrets.token_hex(8))
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis_port: int = 0
    sandbox_url: str = ""
    web_port: int = 0

    def start(self, name: str, argv: Sequence[str], ready: Callable[[], bool]) -> None:
        process = spawn(argv, STATE_DIR / f"{name}.log")
        self.processes.append(process)
        self.exits.callback(stop_process, process, 10)
        if not wait_for(lambda: process.poll() is not None or ready(), READY_TIMEOUT_S):
            raise SmokeError(f"{name} did not answer within {READY_TIMEOUT_S:.0f}s")
        if process.poll() is not None:
            raise SmokeError(f"{name} exited with {process.returncode}: {STATE_DIR}/{name}.log")


def start_redis(stack: Stack) -> None:
    data = Path(stack.exits.enter_context(tempfile.TemporaryDirectory(prefix="hrflow-redis-")))
    stack.redis_port = port = free_port()
    # Never the host's 6379: an unrelated Redis may run there.
    argv = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction", "--save", "",
    ]  # fmt: skip
    stack.start("redis", argv, lambda: redis_answers(port))


def start_sandbox(stack: Stack) -> None:
    port = free_port()
    stack.sandbox_url = url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "sandbox", "--port", str(port)]
    stack.start("sandbox", argv, lambda: answers(f"{url}/_sandbox/calls"))


def docker_run(
    stack: Stack,
    role: str,
    env: Mapping[str, str],
    command: Sequence[str] = (),
    secret: Mapping[str, str] | None = None,
) -> str:
    name = f"hrflow-webhooks-smoke-{role}-{stack.run_id}"
    stack.exits.callback(remove_container, name)
    secret = secret or {}
    argv = [
        "docker", "run", "--detach", "--name", name, "--network", "host",
        # The Dockerfile's own check, polled every 2 s rather than 30 s.
        "--health-interval", "2s", "--health-start-period", "1s",
        *(f"--env={key}={value}" for key, value in env.items()),
        *(f"--env={key}" for key in secret),  # the value comes from our environment, not argv
        IMAGE, *command,
    ]  # fmt: skip
    run(argv, 120, env={**os.environ, **secret})
    return name


def remove_container(name: str) -> None:
    with contextlib.suppress(SmokeError):
        run(["docker", "logs", name], 60, log=STATE_DIR / f"{name}.log")  # for a post-mortem
    with contextlib.suppress(SmokeError):
        run(["docker", "rm", "--force", "--volumes", name], 60)
    if container_exists(name):
        raise SmokeError(f"container {name} could not be removed")


def container_exists(name: str) -> bool:
    try:
        run(["docker", "container", "inspect", name], 30)
    except SmokeError:
        return False
    return True


def container_state(name: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(
        run(["docker", "container", "inspect", "--format", "{{json .State}}", name], 30)
    )
    return state


# --- the checks --------------------------------------------------------------------------------


@dataclass
class Checks:
    passed: int = 0

    def ok(self, text: str) -> None:
        self.passed += 1
        say(f"  ok  {text}")


def wait_healthy(name: str) -> float:
    started = time.monotonic()
    deadline = started + HEALTHY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = container_state(name)
        if not state["Running"]:
            raise SmokeError(f"{name} exited with {state['ExitCode']}: {logs_tail(name)}")
        health = state.get("Health") or {}
        if health.get("Status") == "healthy":
            return time.monotonic() - started
        if health.get("Status") == "unhealthy":
            last = (health.get("Log") or [{}])[-1].get("Output", "")
            raise SmokeError(f"{name} HEALTHCHECK is unhealthy: {tail(last, 5)}")
        time.sleep(0.5)
    raise SmokeError(f"{name} was not healthy within {HEALTHY_TIMEOUT_S:.0f}s")


def logs_tail(name: str, lines: int = 10) -> str:
    """The container's last log lines (the service logs keys and ids, never profiles)."""
    try:
        result = subprocess.run(
            ["docker", "logs", "--tail", str(lines), name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "(no logs)"
    # The service logs to stderr: both streams, in that order.
    return "\n" + tail(result.stdout + result.stderr, lines)


def pid1(name: str, what: str) -> str:
    return run(["docker", "exec", name, "cat", f"/proc/1/{what}"], 30)


def pid1_uids(name: str) -> list[int]:
    """Real, effective, saved and filesystem uids of the container's PID 1."""
    for line in pid1(name, "status").splitlines():
        if line.startswith("Uid:"):
            return [int(uid) for uid in line.split()[1:]]
    raise SmokeError(f"{name}: no Uid line in /proc/1/status")


def check_processes(checks: Checks, web: str, worker: str) -> None:
    user = run(["docker", "image", "inspect", "--format", "{{.Config.User}}", IMAGE], 30)
    if user.strip() in ("", "root", "0"):
        raise SmokeError(f"the image's USER is {user.strip() or 'unset (root)'}")
    uids = {name: pid1_uids(name) for name in (web, worker)}
    if any(0 in ids for ids in uids.values()):
        raise SmokeError(f"a PID 1 runs as root: {uids}")
    checks.ok(f"image USER {user.strip()}; PID 1 of both containers runs as uid {uids[web][0]}")
    web_argv = pid1(web, "cmdline").split("\0")
    worker_argv = pid1(worker, "cmdline").split("\0")
    # The HEALTHCHECK picks /healthz or `check` by whether PID 1 is uvicorn.
    if not any(a.endswith("uvicorn") for a in web_argv) or "worker" not in worker_argv:
        raise SmokeError("web's PID 1 is not uvicorn, or the worker's is not `worker`")
    checks.ok("web's PID 1 is uvicorn (exec: it gets SIGTERM), the worker's is `worker`")
    probe = "import importlib.util as u; print(u.find_spec('sandbox') is None, u.find_spec('control') is not None)"
    found = run(["docker", "exec", web, "python", "-c", probe], 30).split()
    if found != ["True", "True"]:
        raise SmokeError(f"the image should hold control/ and not sandbox/: {found}")
    checks.ok("the image holds the product's packages and not the sandbox")


def send_event(stack: Stack, secret: str, message: str) -> int:
    event = {
        "type": "profile.parsing.success",
        "origin": "api",
        "message": message,  # distinct per delivery, so dedup keeps them apart
        "profile": {"key": JOHN_DOE_KEY, "reference": None, "source": {"key": SAMPLE_SOURCE_KEY}},
    }
    body = json.dumps(event).encode()
    headers = signed_body_headers(body, secret)  # HrFlow's python-sdk scheme
    return http(f"http://127.0.0.1:{stack.web_port}/webhook", body, headers)[0]


def sandbox_get(stack: Stack, path: str) -> Any:
    status, body = http(f"{stack.sandbox_url}{path}")
    if status != 200:
        raise SmokeError(f"sandbox {path} answered {status}")
    return json.loads(body)


def profile_tagged(stack: Stack) -> bool:
    """The worker's PUT reached the sandbox and the profile now carries this run's tag."""
    puts = [
        call
        for call in sandbox_get(stack, "/_sandbox/calls")["calls"]
        if (call["method"], call["path"], call.get("status"))
        == ("PUT", "/v1/profile/indexing", 200)
        and isinstance(call.get("body"), dict)
        and call["body"].get("key") == JOHN_DOE_KEY
    ]
    if not puts:
        return False
    profiles = sandbox_get(stack, "/_sandbox/profiles")["profiles"]
    [profile] = [p for p in profiles if p["key"] == JOHN_DOE_KEY]
    return {"name": EDIT_TAG_NAME, "value": stack.tag} in profile.get("tags", [])


def check_event(checks: Checks, stack: Stack, worker: str) -> None:
    refused = send_event(stack, "not-" + stack.secret, "badly signed")
    if refused != 401:
        raise SmokeError(f"a badly signed event got HTTP {refused}, not 401")
    checks.ok("a badly signed event is refused: HTTP 401")
    started = time.monotonic()
    accepted = send_event(stack, stack.secret, f"docker smoke {stack.run_id}")
    if accepted != 202:
        raise SmokeError(f"the signed profile.parsing.success got HTTP {accepted}, not 202")
    checks.ok("a signed profile.parsing.success is accepted: HTTP 202")
    if not wait_for(lambda: profile_tagged(stack), HANDLED_TIMEOUT_S, 0.5):
        raise SmokeError(
            f"the event was not handled within {HANDLED_TIMEOUT_S:.0f}s: no PUT of the "
            f"profile with this run's tag in the sandbox; worker: {logs_tail(worker)}"
        )
    took = time.monotonic() - started
    checks.ok(f"the worker handled it: the sandbox's profile got this run's tag in {took:.1f}s")


def check_console(checks: Checks, stack: Stack) -> str:
    """The Procfile's console line in the image: templates and CSS shipped, token enforced."""
    port = free_port()
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{stack.redis_port}/0",
        "HRFLOW_CONSOLE_HOST": "0.0.0.0",  # all interfaces of the host network, as deployed
        "HRFLOW_CONSOLE_PORT": str(port),
    }
    token = secrets.token_urlsafe(24)
    console = docker_run(
        stack, "console", env, ["hrflow-webhooks", "console"], {"HRFLOW_CONSOLE_TOKEN": token}
    )
    url = f"http://127.0.0.1:{port}/"
    if not wait_for(lambda: answers(f"{url}healthz"), HEALTHY_TIMEOUT_S, 0.5):
        raise SmokeError(f"the console did not answer on {url}healthz: {logs_tail(console)}")
    refused = http(url)[0]
    status, body = http(url, headers={"Authorization": f"Bearer {token}"})
    page = body.decode(errors="replace")
    if refused != 401 or status != 200 or "Overview" not in page or "1 alive" not in page:
        raise SmokeError(f"console: {refused} without the token, {status} with it: {page[:300]}")
    checks.ok("console container: 401 without the token; its overview shows the live worker")
    return console


def check_stop(checks: Checks, name: str, role: str) -> None:
    started = time.monotonic()
    run(["docker", "stop", "--time", str(STOP_GRACE_S), name], STOP_GRACE_S + 60)
    took = time.monotonic() - started
    state = container_state(name)
    if state["Running"] or state["ExitCode"] != 0 or state["OOMKilled"]:
        raise SmokeError(f"{role} stopped with exit code {state['ExitCode']}: {logs_tail(name)}")
    if took >= STOP_GRACE_S:
        raise SmokeError(f"{role} took {took:.1f}s to stop: killed at the {STOP_GRACE_S}s grace")
    checks.ok(f"{role} stops on SIGTERM in {took:.1f}s (grace {STOP_GRACE_S}s), exit code 0")


# --- the run -----------------------------------------------------------------------------------


def prepare_engine(checks: Checks, stack: Stack) -> None:
    started_here = engine_version() is None
    if started_here:
        process = start_dockerd(STATE_DIR / "dockerd.log")
        stack.processes.append(process)
        stack.exits.callback(stop_dockerd, process)  # last: after the containers went
    version = engine_version()
    how = "started by this run, stopped at its end" if started_here else "already running"
    checks.ok(f"docker engine {version} answers ({storage_driver()}, {how})")


def build_image(checks: Checks) -> None:
    base, how = base_image()
    checks.ok(f"base image {base} ({how})")
    started = time.monotonic()
    argv = ["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}"]
    # The legacy builder: BuildKit would need buildx, and an entitlement for host network.
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    run([*argv, "--tag", IMAGE, "."], BUILD_TIMEOUT_S, env=env, log=STATE_DIR / "build.log")
    checks.ok(f"image {IMAGE} built from the Dockerfile in {time.monotonic() - started:.0f}s")


def start_service(checks: Checks, stack: Stack) -> tuple[str, str]:
    start_redis(stack)
    start_sandbox(stack)
    checks.ok(f"host Redis (AOF on) and sandbox API answer, run {stack.run_id}")
    redis_url = f"redis://127.0.0.1:{stack.redis_port}/0"
    stack.web_port = free_port()
    web_env = {"PORT": str(stack.web_port), "REDIS_URL": redis_url}
    web = docker_run(stack, "web", web_env, secret={"HRFLOW_WEBHOOK_SECRET": stack.secret})
    worker_env = {
        "REDIS_URL": redis_url,
        "HRFLOW_API_URL": f"{stack.sandbox_url}/v1",
        "HRFLOW_API_KEY": DEFAULT_API_KEY,
        "HRFLOW_API_USER": DEFAULT_API_USER,
        "HRFLOW_EDIT_TAGS": f"{EDIT_TAG_NAME}={stack.tag}",  # the built-in edit handler
    }
    worker = docker_run(stack, "worker", worker_env, ["hrflow-webhooks", "worker"])
    for name, role in ((web, "web"), (worker, "worker")):
        checks.ok(f"{role} container HEALTHCHECK healthy after {wait_healthy(name):.1f}s")
    return web, worker


def smoke(checks: Checks) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    for old_log in STATE_DIR.glob("*.log"):
        old_log.unlink()  # an earlier run's: the logs there are this run's only
    with ExitStack() as exits:
        stack = Stack(exits)
        prepare_engine(checks, stack)
        build_image(checks)
        web, worker = start_service(checks, stack)
        check_processes(checks, web, worker)
        check_event(checks, stack, worker)
        console = check_console(checks, stack)
        check_stop(checks, console, "console")
        check_stop(checks, web, "web")
        check_stop(checks, worker, "worker")
    # The ExitStack removed the containers and stopped every process it started.
    if any(p.poll() is None for p in stack.processes):
        raise SmokeError("a process this run started is still running")
    checks.ok("cleanup: containers removed; Redis, sandbox (and a dockerd started here) stopped")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)  # unwinds the ExitStack: all is stopped


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    checks = Checks()
    say("make test-docker: the production image in real containers")
    try:
        smoke(checks)
    except (SmokeError, Interrupted) as error:
        what = f"interrupted by {error}" if isinstance(error, Interrupted) else str(error)
        say(f"FAIL {what}")
        say(f"{checks.passed} passed, 1 failed")
        return 1
    say(f"{checks.passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
