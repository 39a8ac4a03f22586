"""A Redis Sentinel deployment on loopback for the failover tests: a primary, its replicas
and three Sentinels, each a redis-server process of its own, so that a test can SIGKILL the
primary, freeze a replica (SIGSTOP) and watch the Sentinels promote another."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path

from redis import Redis as SyncRedis

from tests.polling import eventually_sync
from tests.redis_server import RedisServer, free_port, redis_binary

MASTER_NAME = "hrflow"
DOWN_AFTER_MS = 1_000  # the Sentinels' verdict on a silent primary: fast, for a test


class LaggingLink:
    """A TCP relay in front of a Redis, in a thread of its own: what Redis sends reaches the
    other side ``delay_s`` late, as over a link between data centres, and what is still on
    the way when Redis dies is lost with it. (Freezing a replica cannot show that on
    loopback: the kernel buffers what it is sent, and it reads all of it on waking.)
    :meth:`cut` closes every connection through it and refuses new ones until
    :meth:`mend`: a client cut off from Redis."""

    def __init__(self, primary_port: int, delay_s: float = 0.0) -> None:
        self.primary_port, self.delay_s = primary_port, delay_s
        self.is_cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shut_down(self) -> None:
        """Everything of the relay's own ended, so that nothing is left for the collector."""
        if self._server is not None:
            self._server.close()
        self._close_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.stop()

    async def _relay(
        self, replica_in: asyncio.StreamReader, replica_out: asyncio.StreamWriter
    ) -> None:
        if self.is_cut:
            replica_out.close()
            return
        try:
            primary_in, primary_out = await asyncio.open_connection("127.0.0.1", self.primary_port)
        except OSError:
            replica_out.close()
            return
        self._writers |= {replica_out, primary_out}
        upstream = asyncio.create_task(self._pump(replica_in, primary_out, 0.0))
        await self._pump(primary_in, replica_out, self.delay_s)
        upstream.cancel()
        replica_out.close()  # the primary is gone: what was still on the way never arrives
        self._writers -= {replica_out, primary_out}

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay_s: float
    ) -> None:
        in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await in_flight.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                sink.write(chunk)
                await sink.drain()

        delivering = asyncio.create_task(deliver())
        with contextlib.suppress(OSError):
            while chunk := await source.read(65536):
                in_flight.put_nowait((time.monotonic() + delay_s, chunk))
        delivering.cancel()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        self.is_cut = True
        self._loop.call_soon_threadsafe(self._close_all)

    def mend(self) -> None:
        self.is_cut = False

    def _close_all(self) -> None:
        for writer in self._writers:
            writer.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop)
        self._thread.join(timeout=10)


class SentinelProcess:
    def __init__(self, folder: Path, primary_port: int, quorum: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = folder / "sentinel.conf"  # Sentinel rewrites its own file: one each
        self.config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {folder}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 2\n"
        )
        self.log = (folder / "sentinel.log").open("ab")
        self.process = subprocess.Popen(
            [redis_binary(), str(self.config), "--sentinel"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        eventually_sync(self._answers, f"sentinel on port {self.port}", ignoring=(OSError,))

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def primary_port(self) -> int | None:
        with SyncRedis(port=self.port, socket_timeout=1) as sentinel:
            address = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(address[1]) if address else None

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.log.close()


class SentinelGroup:
    """A primary with ``replicas`` replicas watched by three Sentinels (quorum 2); with
    ``link_delay_s``, the replicas follow the primary over a :class:`LaggingLink`."""

    def __init__(
        self, folder: Path, replicas: int, *redis_args: str, link_delay_s: float = 0.0
    ) -> None:
        self.folder = folder
        self.primary = RedisServer(folder / "primary", None, *redis_args)
        self.primary.start()
        self.link = LaggingLink(self.primary.port, link_delay_s) if link_delay_s else None
        upstream = self.link.port if self.link else self.primary.port
        following = ("--replicaof", "127.0.0.1", str(upstream))
        self.replicas = [
            RedisServer(folder / f"replica-{n}", None, *redis_args, *following)
            for n in range(replicas)
        ]
        for replica in self.replicas:
            replica.start()
        eventually_sync(self._replicas_online, "the replicas to sync")
        self.sentinels = [
            SentinelProcess(folder / f"sentinel-{n}", self.primary.port, quorum=2) for n in range(3)
        ]
        eventually_sync(self._sentinels_see_replicas, "the Sentinels to find the replicas")

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    @property
    def sentinel_setting(self) -> str:
        """HRFLOW_REDIS_SENTINELS for this group."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def settings(self) -> dict[str, str]:
        """The service's settings to find the primary through the Sentinels."""
        return {"redis_sentinels": self.sentinel_setting, "redis_sentinel_master": MASTER_NAME}

    def primary_url(self) -> str:
        """The primary the Sentinels name now (after a failover, a former replica)."""
        port = self.sentinels[0].primary_port()
        assert port is not None
        return f"redis://127.0.0.1:{port}/0"

    def _replicas_online(self) -> bool:
        with SyncRedis(port=self.primary.port) as primary:
            info = primary.info("replication")
        return sum(1 for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()
                   and v.get("state") == "online") == len(self.replicas)  # fmt: skip

    def _sentinels_see_replicas(self) -> bool:
        for sentinel in self.sentinels:
            with SyncRedis(port=sentinel.port) as client:
                found = client.sentinel_slaves(MASTER_NAME)
            if len([r for r in found if not r["is_sdown"]]) < len(self.replicas):
                return False
        return True

    def failed_over(self, old_port: int) -> bool:
        """Every Sentinel names a new primary, which answers as one."""
        ports = {sentinel.primary_port() for sentinel in self.sentinels}
        if len(ports) != 1 or old_port in ports or None in ports:
            return False
        (port,) = ports
        assert port is not None
        with SyncRedis(port=port, socket_timeout=1) as primary:
            return bool(primary.info("replication").get("role") == "master")

    def stop(self) -> None:
        if self.link is not None:
            self.link.close()
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                server.thaw()  # a frozen process cannot act on SIGTERM
            server.kill()
