"""uvicorn's httptools protocol, writing each response in one ``send()`` instead of two.

uvicorn writes a response's status line and headers as soon as the app starts
the response, then the body in a second write. Every write to a TCP socket is
a system call, a segment on the wire and, on the client's side, a wake-up: for
a webhook's small JSON answer, the second write costs as much as the first. Under
load the two writes took a fifth of the receiver's CPU (py-spy, docs/benchmarks.md).

:class:`HttpProtocol` holds the writes of a response and sends them together
when the response is complete. A write that is not followed by the end of its
response in the same event-loop step (a streamed body, ``100 Continue``) goes
out on the next step, so nothing waits on the application.

Serve the receiver with it: ``uvicorn receiver.app:app --http receiver.protocol:HttpProtocol``
(the Procfile, the Dockerfile and ``make run`` do).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.coalescing = CoalescingTransport(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(self.coalescing)

    def on_response_complete(self) -> None:
        # uvicorn calls this right after writing the last part of a response: send it now.
        self.coalescing.flush()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        # The peer reset the connection mid-response: uvicorn does not close the transport
        # then, and a flush scheduled for the next step would write to a closed handle.
        self.coalescing.discard()
        super().connection_lost(exc)
