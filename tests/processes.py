"""Worker processes for crash and signal tests: the real command lines, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control.commands import worker_argv

ROOT = Path(__file__).resolve().parent.parent
PROCFILE_WORKER = tuple(worker_argv())
ARQ_CLI = (
    sys.executable, "-m", "arq", "workers.settings.WorkerSettings",
    "--custom-log-dict", "hrflow_webhooks.logs.ARQ_LOG_CONFIG",
)  # fmt: skip


def worker_env(redis_url: str, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRFLOW_")}
    env.update(
        {
            "REDIS_URL": redis_url,
            "HRFLOW_HANDLERS": "tests.plugins.behaviour",
            "HRFLOW_RETRY_BASE_S": "0.05",
            "HRFLOW_RETRY_MAX_S": "0.2",
            "HRFLOW_LOG_FORMAT": "json",
        }
    )
    env.update({f"HRFLOW_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class WorkerProcess:
    """``hrflow-webhooks worker``, as the Procfile runs it, or with ``command=ARQ_CLI`` the
    plain ``arq workers.settings.WorkerSettings`` that arq users know."""

    def __init__(
        self,
        redis_url: str,
        log_path: Path,
        command: Sequence[str] = PROCFILE_WORKER,
        **settings: Any,
    ) -> None:
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=worker_env(redis_url, **settings),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.alive():
            self.kill()
        self.log.close()
