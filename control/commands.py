"""The service's process command lines: the one place they are written.

The Procfile is :data:`PROCFILE` verbatim and the Dockerfile's CMD is its web line
(tests/test_deploy.py checks both); ``hrflow-webhooks run``, the tests and the bench
start their processes from :func:`web_argv`, :func:`worker_argv` and :func:`console_argv`,
so what they measure and prove is what a platform runs.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

# uvicorn builds the app by calling the factory, so importing receiver.app (tests, the
# CLI) reads no environment. The HTTP protocol is the receiver's guard (receiver/protocol.py).
# uvicorn's access log is off: the receiver logs each queued delivery itself.
WEB = (
    "uvicorn receiver.app:create_app --factory --http receiver.protocol:HttpProtocol"
    " --host 0.0.0.0 --port ${PORT:-8000} --proxy-headers --no-access-log"
    " --workers ${WEB_CONCURRENCY:-1}"
)
WORKER = "hrflow-webhooks worker"
# The operator console listens on HRFLOW_CONSOLE_HOST:HRFLOW_CONSOLE_PORT (loopback:8100 by
# default), never on $PORT: it refuses to start there (control/console/serve.py).
CONSOLE = "hrflow-webhooks console"
PROCFILE: Mapping[str, str] = {"web": WEB, "worker": WORKER, "console": CONSOLE}


def procfile_text() -> str:
    return "".join(f"{name}: {command}\n" for name, command in PROCFILE.items())


def expand(command: str, env: Mapping[str, str]) -> list[str]:
    """The shell's ``${VAR:-default}`` / ``${VAR}`` expansion, then its word splitting."""

    def value(match: re.Match[str]) -> str:
        return env.get(match[1], match[2] or "")

    return shlex.split(re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", value, command))


def web_argv(port: int, host: str = "0.0.0.0", env: Mapping[str, str] | None = None) -> list[str]:
    """The Procfile's web line as a platform runs it (``PORT`` set), listening on ``host``,
    with uvicorn from this interpreter (a venv need not be on PATH)."""
    argv = expand(WEB, {"PORT": str(port), **(env or {})})
    argv[argv.index("--host") + 1] = host
    return _this_interpreter(argv)


def worker_argv() -> list[str]:
    return _this_interpreter(shlex.split(WORKER))


def console_argv() -> list[str]:
    return _this_interpreter(shlex.split(CONSOLE))


def _this_interpreter(argv: list[str]) -> list[str]:
    program, *arguments = argv
    if program == "uvicorn":
        return [sys.executable, "-m", "uvicorn", *arguments]
    if program == "hrflow-webhooks":
        return [sys.executable, "-m", "control.cli", *arguments]
    return [str(Path(sys.executable).parent / program), *arguments]
