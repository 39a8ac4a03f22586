"""uvicorn's httptools protocol, guarded against hostile clients, writing each response in one
``send()`` instead of two.

**The guard.** The receiver listens on a public URL: any client may open connections
and send bytes without the secret. httptools buffers a header of any size (its cost
grows with the square of the size), and uvicorn closes neither a connection that
never sends a request nor one that sends it a byte at a time. :class:`HttpProtocol`
adds, per server (:class:`ConnectionGuard`):

- a limit on the request head (request line and headers), counted as bytes arrive:
  past ``max_head_bytes`` the client gets ``431`` and the connection is closed, with
  at most the limit buffered;
- deadlines: a new or kept-alive connection must start a request within
  ``keep_alive_s``, send its head within ``head_timeout_s`` and its body within
  ``body_timeout_s`` (``408``, then closed). One sweep a second checks them all, so
  the hot path pays an attribute write per phase, not a timer;
- a cap on open connections, below the file-descriptor limit: past it, the connection
  idle or waiting for bytes the longest is closed to make room, so a flood of slow
  connections cannot keep a real delivery from connecting.

**One write per response.**

uvicorn writes a response's status line and headers as soon as the app starts
the response, then the body in a second write. Every write to a TCP socket is
a system call, a segment on the wire and, on the client's side, a wake-up: for
a webhook's small JSON answer, the second write costs as much as the first. Under
load the two writes took a fifth of the receiver's CPU (py-spy, docs/benchmarks.md).

:class:`HttpProtocol` holds the writes of a response and sends them together
when the response is complete. A write that is not followed by the end of its
response in the same event-loop step (a streamed body, ``100 Continue``) goes
out on the next step, so nothing waits on the application.

Serve the receiver with it: ``uvicorn receiver.app:create_app --factory --http receiver.protocol:HttpProtocol``
(the Procfile, the Dockerfile and ``make run`` do).
"""

from __future__ import annotations

import asyncio
import collections
import resource
from dataclasses import dataclass, field
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from receiver.rejections import REJECTIONS

# Past this many bytes held, writes go out at once: uvicorn pauses a sender whose client reads
# slowly only once the real transport's buffer passes its high-water mark (64 KiB by default),
# so a streamed body must reach that buffer as it is written, not at the next loop step.
MAX_HELD_BYTES = 65_536


class CoalescingTransport(asyncio.Transport):
    """A transport whose writes wait, in order, until :meth:`flush` or the next loop step."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        chunk = bytes(data)  # a copy only if the caller could still change it
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)  # bytes, whatever a memoryview's item size
        if self._pending_bytes >= MAX_HELD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending = self._pending
        self._pending, self._pending_bytes = [], 0
        if self.transport.is_closing():
            return  # the connection is gone or going: the socket would refuse it (uvloop raises)
        self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def discard(self) -> None:
        """Forget what is held: the peer has gone."""
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        self.flush()  # what was written before close() still goes out, as with the socket's
        self.transport.close()

    def abort(self) -> None:
        self.discard()
        self.transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + self._pending_bytes

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)


# File descriptors kept free below the process's limit for what is not a client connection:
# the Redis pools, the listening sockets, log files, the event loop's own.
FD_HEADROOM = 64
# A webhook receiver needs few connections at once; containers often allow a million files.
MAX_DEFAULT_CONNECTIONS = 4_096
# Room in the request head for the request line and the headers other than the signature.
HEAD_ALLOWANCE_BYTES = 16_384
# The signature header's parts other than the payload: python-sdk's base64url hex digest
# (88 characters, the longest variant) and the dot.
SIGNATURE_PART_BYTES = 89
SWEEP_INTERVAL_S = 1.0
# After a refusal, what the client still sends is read and dropped for this long (or up to
# LINGER_BYTES) before closing: closing with unread data would reset the connection, and the
# client could lose the answer that says why (nginx's lingering close).
LINGER_S = 2.0
LINGER_BYTES = 4 * 1_048_576


def default_max_head_bytes(max_body_bytes: int) -> int:
    """A head that can carry the signature header of a ``max_body_bytes`` payload.

    HrFlow's signature header holds the whole payload, base64url-encoded (4 bytes per 3),
    after the signature part; the rest of a request head fits in ``HEAD_ALLOWANCE_BYTES``.
    """
    return 4 * -(-max_body_bytes // 3) + SIGNATURE_PART_BYTES + HEAD_ALLOWANCE_BYTES


def default_max_connections() -> int:
    """The open-file limit less ``FD_HEADROOM`` (accepting never fails for lack of a
    descriptor), and at most ``MAX_DEFAULT_CONNECTIONS``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = MAX_DEFAULT_CONNECTIONS + FD_HEADROOM
    return max(16, min(MAX_DEFAULT_CONNECTIONS, soft - FD_HEADROOM))


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_head_bytes: int = default_max_head_bytes(1_048_576)
    keep_alive_s: float = 5.0
    head_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    max_connections: int = field(default_factory=default_max_connections)


# A connection's phase. Plain ints, not an enum: compared several times per request, and an
# enum member lookup costs a descriptor call each time.
IDLE = 0  # no request yet, or between two requests of a kept-alive connection
HEAD = 1  # reading the request line and headers
BODY = 2  # reading the body
BUSY = 3  # the request is read; the application has it, or its answer is being written
CLOSING = 4  # refused: the answer is sent, what the client still sends is read and dropped


# Why the guard closed connections, counted for /metrics (receiver.metrics).
CLOSED: collections.Counter[str] = collections.Counter()
HEAD_TOO_LARGE = "request head exceeds HRFLOW_MAX_HEADER_BYTES"
HEAD_LATE = "request head not received in time"
BODY_LATE = "request body not received in time"
END_OF_HEAD = b"\r\n\r\n"


def _closed(why: str, reason: str) -> None:
    CLOSED[why] += 1
    REJECTIONS.note(why, reason)


class ConnectionGuard:
    """The open connections of one server, their deadlines and their cap.

    The hot path does not track phases: each sweep reads a connection's phase off its
    own state and uvicorn's (:meth:`HttpProtocol.phase`) and notes when it last changed.
    Heads and bodies are timed from the request's first byte; idle and busy connections
    from the first sweep that saw them so (to within ``SWEEP_INTERVAL_S``). Overriding the
    parser callbacks to time each phase cost the receiver 13k instructions per delivery.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: ConnectionLimits) -> None:
        self.loop = loop
        self.limits = limits
        self.connections: dict[HttpProtocol, None] = {}  # in the order they were opened
        self._sweeping: asyncio.TimerHandle | None = None

    def admit(self, protocol: HttpProtocol) -> bool:
        """Register a new connection; False when it must be closed (every other is busy)."""
        self.connections[protocol] = None
        if self._sweeping is None:
            self._sweeping = self.loop.call_later(SWEEP_INTERVAL_S, self.sweep)
        if len(self.connections) <= self.limits.max_connections:
            return True
        victim = self._oldest_waiting(protocol)
        if victim is None:
            _closed("over_capacity", "connection limit reached and every connection busy")
            return False
        _closed("evicted", "connection limit reached: the oldest waiting connection was closed")
        victim.close_connection()
        return True

    def _oldest_waiting(self, newcomer: HttpProtocol) -> HttpProtocol | None:
        """The oldest connection waiting for its client (idle, or sending a request). A real
        delivery takes milliseconds on a connection just opened: it is the last in line."""
        for connection in self.connections:
            if connection is not newcomer and connection.phase() != BUSY:
                return connection
        return None

    def leave(self, protocol: HttpProtocol) -> None:
        self.connections.pop(protocol, None)

    def sweep(self) -> None:
        self._sweeping = None
        now, limits = self.loop.time(), self.limits
        for protocol in list(self.connections):
            phase = protocol.observe(now)
            waited = now - protocol.waiting_since()
            if phase == IDLE and waited > limits.keep_alive_s:
                CLOSED["idle"] += 1  # the normal end of a kept-alive connection: not logged
                protocol.close_connection()
            elif phase == HEAD and waited > limits.head_timeout_s:
                _closed("head_timeout", HEAD_LATE)
                protocol.refuse(408, "request_timeout", HEAD_LATE)
            elif phase == BODY and waited > limits.body_timeout_s:
                _closed("body_timeout", BODY_LATE)
                protocol.refuse(408, "request_timeout", BODY_LATE, during_body=True)
            elif phase == BUSY and waited > limits.body_timeout_s:
                # An answer the client does not read (its window closed), or a stuck request.
                _closed("busy_timeout", "answer not taken by the client in time")
                protocol.close_connection()
            elif phase == CLOSING and waited > LINGER_S:
                protocol.close_connection()
        if self.connections:
            self._sweeping = self.loop.call_later(SWEEP_INTERVAL_S, self.sweep)


# uvicorn's data_received, called directly: super() costs a lookup per call on the hot path.
_feed = HttpToolsProtocol.data_received


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`CoalescingTransport`, guarded.

    The request head is held here until it is complete (``END_OF_HEAD``) and fed to
    httptools in one piece: httptools joins a header's pieces by concatenation, so a
    head fed in small pieces cost time quadratic in its size. Almost every delivery's
    head arrives in one read and goes straight through. ``limits`` is the process's,
    set once by the app factory (``receiver.app``) before the server accepts.
    """

    limits = ConnectionLimits()

    def __init__(self, config: Any, server_state: ServerState, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, server_state, *args, **kwargs)
        self.guard = _guard_of(server_state, self.loop, self.limits)
        self.head = bytearray()  # a request head not complete yet
        self.lingering = False  # refused: what the client still sends is dropped
        self.dropped = 0  # bytes dropped while lingering or behind an answer in progress
        # What the last sweep saw (phase and request), and since when.
        self.phase_seen = IDLE
        self.request_seen: object = None
        self.phase_since = 0.0
        self.request_since = 0.0  # when the request being read sent its first byte

    def phase(self) -> int:
        if self.lingering:
            return CLOSING
        if self.head:
            return HEAD
        cycle = self.cycle
        if cycle is None:
            return IDLE
        if cycle.more_body and cycle.scope is self.scope:
            return BODY  # also after an early answer (413): the client may still send it
        return IDLE if cycle.response_complete else BUSY

    def waiting_since(self) -> float:
        """Since when this connection has been waiting for its client: the first byte of the
        request being read (heads and bodies), else the phase's start as the sweep saw it."""
        return self.request_since if self.phase() in (HEAD, BODY) else self.phase_since

    def observe(self, now: float) -> int:
        """The phase now, noting ``now`` as its start when it differs from the last sweep's."""
        phase, request = self.phase(), self.scope
        if phase != self.phase_seen or request is not self.request_seen:
            self.phase_seen, self.request_seen, self.phase_since = phase, request, now
        return phase

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.coalescing = CoalescingTransport(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(self.coalescing)
        self.phase_since = self.loop.time()
        if not self.guard.admit(self):
            self.close_connection()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._drop(data)
            return
        cycle = self.cycle
        if cycle is not None and cycle.more_body and cycle.scope is self.scope:
            _feed(self, data)  # a body: the application limits its size
            return
        if cycle is not None and not cycle.response_complete:
            # A request sent before the last one was answered (pipelining): HTTP/1.1 lets
            # the server close after its answer instead, and the client sends it again.
            cycle.keep_alive = False
            self._drop(data)
            return
        head = self.head
        if not head:
            self.request_since = self.loop.time()  # a new request's first bytes
            end = data.find(END_OF_HEAD)
            if 0 <= end <= self.limits.max_head_bytes - len(END_OF_HEAD):
                _feed(self, data)  # the whole head in one read: straight through
                return
        searched_from = max(0, len(head) - len(END_OF_HEAD) + 1)
        head += data
        end = head.find(END_OF_HEAD, searched_from)
        if end < 0 and len(head) <= self.limits.max_head_bytes:
            return  # more to come
        if end < 0 or end + len(END_OF_HEAD) > self.limits.max_head_bytes:
            self.head = bytearray()
            _closed("header_too_large", HEAD_TOO_LARGE)
            self.refuse(431, "header_too_large", HEAD_TOO_LARGE)
            return
        self.head = bytearray()
        _feed(self, bytes(head))

    def _drop(self, data: bytes) -> None:
        self.dropped += len(data)
        if self.dropped > LINGER_BYTES:
            self.close_connection()

    def on_response_complete(self) -> None:
        """uvicorn's, less its keep-alive timer: the guard's sweep closes idle connections,
        and a timer armed and cancelled per request cost more than the check it replaces."""
        # uvicorn calls this right after writing the last part of a response: send it now.
        self.coalescing.flush()
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)

    def _should_upgrade_to_ws(self) -> bool:
        # The receiver has no WebSocket route; an upgrade handed over to uvicorn's WebSocket
        # protocol would leave this protocol's guard entry behind for good.
        return False

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn logs a warning per request: a flood of them would fill the disk.
        REJECTIONS.note("upgrade_refused", "an Upgrade request was answered as plain HTTP")

    def connection_lost(self, exc: Exception | None) -> None:
        # The peer reset the connection mid-response: uvicorn does not close the transport
        # then, and a flush scheduled for the next step would write to a closed handle.
        self.coalescing.discard()
        self.guard.leave(self)
        super().connection_lost(exc)

    def close_connection(self) -> None:
        """Close now: abort, not close, which would wait for a client that does not read."""
        self.transport.abort()

    def refuse(self, status: int, error: str, reason: str, during_body: bool = False) -> None:
        """Answer ``status`` and close. During a body the request has its cycle: if the
        application has answered already (an early 413), only close; else its answer, if
        any comes, is dropped."""
        if self.transport.is_closing() or self.lingering:
            return
        cycle = self.cycle
        if during_body and cycle is not None:
            if cycle.response_started:
                self.close_connection()
                return
            cycle.disconnected = True
        body = b'{"error":"%s","reason":"%s"}' % (error.encode(), reason.encode())
        self.transport.write(
            b"".join(
                (
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                )
            )
        )
        if not self.transport.can_write_eof():  # TLS: no half-close, so no lingering either
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()  # reading may be paused: the client must finish sending
        self.lingering, self.dropped = True, 0
        self.phase_seen, self.phase_since = CLOSING, self.loop.time()


def _guard_of(
    server_state: ServerState, loop: asyncio.AbstractEventLoop, limits: ConnectionLimits
) -> ConnectionGuard:
    guard: ConnectionGuard | None = getattr(server_state, "hrflow_guard", None)
    if guard is None:
        guard = ConnectionGuard(loop, limits)
        server_state.hrflow_guard = guard  # type: ignore[attr-defined]
    return guard
