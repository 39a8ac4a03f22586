"""Connecting to Redis the same way in every process: one URL, or Sentinel; TLS as the URL says.

- ``REDIS_URL`` gives the database, user, password and TLS (``rediss://``, with redis-py's
  query parameters: ``?ssl_cert_reqs=none`` for a provider's self-signed certificate,
  ``ssl_ca_certs=<path>`` to trust a private CA). The query string reaches every process,
  the workers' pool included (arq's ``RedisSettings.from_dsn`` dropped it).
- With ``HRFLOW_REDIS_SENTINELS`` and ``HRFLOW_REDIS_SENTINEL_MASTER``, the primary's
  address comes from Sentinel, asked again for every new connection.
- Every connection talks to a primary only. A reply saying the node is now a replica
  (``READONLY``, or ``UNBLOCKED … master -> replica`` to a blocked ``WAIT``) drops the
  connection and raises :class:`ReplicaReachedError`, a ``ConnectionError``: the caller's
  retry (or the next command) connects afresh and finds the new primary, through Sentinel
  or through a DNS name that the provider moved. Without this, a managed Redis's failover
  left every pooled connection on the demoted node, refusing writes for ever.

Which process retries how is the caller's choice (``retry_forever``): the receiver fails
fast (a sender must get 503 in seconds), a worker's job pool waits Redis out.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    ResponseError,
    TimeoutError,
)
from redis.sentinel import Sentinel as SyncSentinel

from hrflow_webhooks.settings import Settings

# Sentinel's own default port, for a HRFLOW_REDIS_SENTINELS item without one.
SENTINEL_PORT = 26379
# How often an idle pooled connection is pinged before use: a connection the server or a
# proxy dropped meanwhile is replaced rather than failing the first command.
HEALTH_CHECK_INTERVAL_S = 30
# The workers' pool waits Redis out (a restart, a failover) instead of failing the job:
# reconnect attempts back off to this.
RETRY_BACKOFF_CAP_S = 2.0
_ONE_ATTEMPT = Retry(NoBackoff(), 0)


class ReplicaReachedError(ConnectionError):
    """The connection reached a node that is a replica now: it was dropped."""


def _demoted(error: ResponseError) -> bool:
    """A reply only a replica gives: READONLY to a write, UNBLOCKED to a blocked WAIT."""
    text = str(error)
    return (
        text.startswith(("READONLY", "UNBLOCKED")) or "You can't write against a read only" in text
    )


class _PrimaryOnly(AbstractConnection):
    """Drops the connection when the node answers as a replica (see the module docstring)."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as error:
            if not _demoted(error):
                raise
            await self.disconnect(nowait=True)
            raise ReplicaReachedError(
                "the node is a replica now (failover): reconnecting to the primary"
            ) from error


class PrimaryConnection(_PrimaryOnly, Connection):
    pass


class PrimarySSLConnection(_PrimaryOnly, SSLConnection):
    pass


class _SentinelPrimary(_PrimaryOnly, SentinelManagedConnection):
    """A connection to the primary Sentinel names, asked again at every attempt.

    redis-py before 6.4 connects to the address Sentinel gave with the connection's own
    retry policy (forever, in a worker), so after a failover it kept dialling the old
    primary and never asked Sentinel again (redis-py issue 3560). Here each attempt of
    that policy asks Sentinel, then makes one connection attempt.
    """

    async def connect_to(self, address: tuple[str, int]) -> None:
        policy, self.retry = self.retry, _ONE_ATTEMPT
        try:
            await super().connect_to(address)  # type: ignore[no-untyped-call]
        finally:
            self.retry = policy


class SentinelPrimaryConnection(_SentinelPrimary):
    pass


class SentinelPrimarySSLConnection(_SentinelPrimary, SentinelManagedSSLConnection):
    pass


class SentinelPrimaryPool(SentinelConnectionPool):
    """Sentinel's pool, closing its clients of the Sentinels too when it is closed."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # a full close, not the switch to a new primary
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.connection_pool.disconnect()


def _url_options(settings: Settings) -> tuple[dict[str, Any], bool]:
    """REDIS_URL's connection options, and whether it asks for TLS."""
    options: dict[str, Any] = dict(parse_url(settings.redis_url))
    connection_class = options.pop("connection_class", None)
    return options, connection_class is SSLConnection


def _tls_options(options: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in options.items() if name.startswith("ssl_")}


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    addresses = []
    for item in settings.redis_sentinels:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        addresses.append((host.strip("[]"), int(port) if port else SENTINEL_PORT))
    return addresses


def _retry_options(settings: Settings, retry_forever: bool) -> dict[str, Any]:
    if not retry_forever:
        return {
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
            "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        }
    # The job pool: no per-command timeout (each one would go through asyncio's timeout
    # machinery, a measurable share of a worker's CPU per job; the job has a deadline of its
    # own) and a kernel-level one instead, so a primary whose host vanished without closing
    # the connection is noticed in seconds, not after TCP's quarter of an hour.
    return {
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_keepalive": True,
        "socket_keepalive_options": _dead_peer_options(settings.redis_timeout_s),
        "retry_on_error": [ConnectionError, TimeoutError, OSError],
        "retry": Retry(ExponentialBackoff(cap=RETRY_BACKOFF_CAP_S, base=0.05), -1),
    }


def _dead_peer_options(timeout_s: float) -> dict[int, int]:
    """TCP options that end a connection whose peer is gone: idle, probed every second
    after ``timeout_s``; with a reply awaited, unacknowledged data for twice that."""
    seconds = max(1, round(timeout_s))
    return {
        socket.TCP_KEEPIDLE: seconds,
        socket.TCP_KEEPINTVL: 1,
        socket.TCP_KEEPCNT: 3,
        socket.TCP_USER_TIMEOUT: 2 * seconds * 1000,
    }


def connection_pool(settings: Settings, *, retry_forever: bool = False) -> ConnectionPool:
    """The pool of every Redis client of the service (see the module docstring)."""
    options, tls = _url_options(settings)
    options |= _retry_options(settings, retry_forever)
    if not settings.redis_sentinels:
        options["connection_class"] = PrimarySSLConnection if tls else PrimaryConnection
        return ConnectionPool(**options)
    sentinel_options = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        **_tls_options(options),
    }
    if tls:
        sentinel_options["ssl"] = True
    if settings.redis_sentinel_password is not None:
        sentinel_options["password"] = settings.redis_sentinel_password.get_secret_value()
    sentinel = Sentinel(sentinel_addresses(settings), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    options.pop("host", None)
    options.pop("port", None)
    options["connection_class"] = SentinelPrimarySSLConnection if tls else SentinelPrimaryConnection
    return SentinelPrimaryPool(settings.redis_sentinel_master, sentinel, **options)  # type: ignore[no-untyped-call]


def connect_redis(settings: Settings, *, retry_forever: bool = False) -> Redis:
    """A client on :func:`connection_pool`; closing the client closes its pool."""
    return Redis.from_pool(connection_pool(settings, retry_forever=retry_forever))


def connect_sync_redis(settings: Settings) -> SyncRedis:
    """A blocking client for threads (the workers' metrics scrapes), found the same way."""
    options, tls = _url_options(settings)
    options |= {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "ssl": tls,
    }
    if not settings.redis_sentinels:
        return SyncRedis(**options)
    sentinel_options: dict[str, Any] = {"socket_timeout": settings.redis_timeout_s, "ssl": tls}
    sentinel_options |= _tls_options(options)
    if settings.redis_sentinel_password is not None:
        sentinel_options["password"] = settings.redis_sentinel_password.get_secret_value()
    options.pop("host", None)
    options.pop("port", None)
    sentinel = SyncSentinel(sentinel_addresses(settings), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    client: SyncRedis = sentinel.master_for(settings.redis_sentinel_master, **options)  # type: ignore[no-untyped-call]
    return client


def unreachable_reason(error: BaseException) -> str:
    """Why Redis could not be used, in one line a person can act on.

    Built from the error's type and cause, never from its text: that names the host and
    may be long. No URL, no password.
    """
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                "TLS: the server's certificate is not trusted (self-signed?): add "
                "?ssl_cert_reqs=none to REDIS_URL, or ssl_ca_certs=<CA file>"
            )
        if isinstance(cause, ssl.SSLError):
            return "TLS handshake failed: does the server speak TLS on this port (rediss://)?"
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, AuthenticationError) or "NOAUTH" in str(error)[:16]:
        return "authentication failed: check the user and password in REDIS_URL"
    if isinstance(error, ReplicaReachedError):
        return "the node became a replica (failover under way)"
    if "No master found" in str(error)[:40]:
        return "Sentinel names no primary (failover under way, or a wrong HRFLOW_REDIS_SENTINEL_MASTER)"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, ConnectionError | OSError):
        return "connection failed"
    return type(error).__name__
