"""A real redis-server process for the tests: its own port, its own data folder, AOF on.

Fault tests stop, kill and restart it; data survives a restart (appendfsync always),
as it would in a production deployment set up as README says.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

from tests.polling import eventually_sync


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not on PATH: `make test` installs Debian's redis-server package"
        )
    return binary


class RedisServer:
    def __init__(self, data_dir: Path, port: int | None = None, *args: str) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.args = args  # after the defaults: redis-server keeps the last value of an option
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        eventually_sync(
            self._answers_ping, f"redis-server to answer on port {self.port}", ignoring=(OSError,)
        )

    def stop(self) -> None:
        """Graceful stop (SIGTERM): Redis flushes the AOF and exits."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: a host that stops answering (a network partition, a frozen VM)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _answers_ping(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:  # a bad option: fail now, not at the limit
            raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate and its key for localhost, made by openssl: a provider's self-signed one."""
    folder.mkdir(parents=True, exist_ok=True)
    certificate, key = folder / "redis.crt", folder / "redis.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(certificate),
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return certificate, key


class TlsRedisServer(RedisServer):
    """redis-server answering TLS only, with a self-signed certificate (Heroku's kind)."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.certificate, key = self_signed_certificate(data_dir / "tls")
        port = free_port()
        tls = (
            "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.certificate),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.certificate),
            "--tls-auth-clients", "no",
        )  # fmt: skip
        super().__init__(data_dir, port, *tls, *args)

    @property
    def url(self) -> str:
        """Without ``ssl_cert_reqs``: the certificate is verified, and refused."""
        return f"rediss://127.0.0.1:{self.port}/0"

    @property
    def trusting_url(self) -> str:
        return f"{self.url}?ssl_cert_reqs=none"

    def _answers_ping(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
            context.wrap_socket(raw) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
