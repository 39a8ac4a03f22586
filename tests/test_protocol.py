"""receiver.protocol: uvicorn's httptools protocol, one write per response.

The write count is read off a transport that records what uvicorn hands it
(the socket's side of the protocol); behaviour over real sockets is checked
against a real uvicorn server on loopback.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest
import uvicorn
import uvloop
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from receiver.protocol import MAX_HELD_BYTES, CoalescingTransport, HttpProtocol
from tests.polling import eventually

REQUEST = b"POST /webhook HTTP/1.1\r\nhost: test\r\ncontent-length: 2\r\n\r\n{}"


class RecordingTransport(asyncio.Transport):
    """The socket end of a connection: records each write the protocol makes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0  # the kernel took everything

    def resume_reading(self) -> None:
        pass


async def json_202(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await receive()
    body = b'{"queued":1}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def writes_for_one_request(protocol_class: type[HttpToolsProtocol]) -> list[bytes]:
    config = uvicorn.Config(json_202, http=protocol_class, log_level="warning", lifespan="off")
    config.load()
    protocol = protocol_class(config, ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(REQUEST)
    for _ in range(10):  # the app runs as a task: let it answer
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return transport.writes


async def test_a_response_goes_out_in_one_write_where_uvicorn_makes_two() -> None:
    stock = await writes_for_one_request(HttpToolsProtocol)
    ours = await writes_for_one_request(HttpProtocol)
    assert len(stock) == 2  # status line and headers, then the body
    assert ours == [b"".join(stock)]
    assert ours[0].startswith(b"HTTP/1.1 202 ")
    assert ours[0].endswith(b'{"queued":1}')


async def test_the_answer_is_written_when_uvicorn_reports_the_response_complete() -> None:
    """The hooks the protocol relies on still fire: uvicorn calls ``on_response_complete``
    right after the body's last write (the request count proves it), and the protocol sends
    the held answer there, in the same loop step, not one step later."""
    transport = RecordingTransport()
    written_when_sent: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await json_202(scope, receive, send)
        written_when_sent.extend(transport.writes)  # no loop step since the last send

    config = uvicorn.Config(app, http=HttpProtocol, log_level="warning", lifespan="off")
    config.load()
    state = ServerState()
    protocol = HttpProtocol(config, state, app_state={})
    protocol.connection_made(transport)
    protocol.data_received(REQUEST)
    for _ in range(10):  # the app runs as a task: let it answer
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    assert state.total_requests == 1
    assert len(written_when_sent) == 1
    assert written_when_sent[0].startswith(b"HTTP/1.1 202 ")
    assert written_when_sent[0].endswith(b'{"queued":1}')


async def test_writes_not_ended_by_a_response_go_out_on_the_next_loop_step() -> None:
    recording = RecordingTransport()
    transport = CoalescingTransport(recording, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    transport.write(bytearray(b"more"))
    assert recording.writes == []
    await asyncio.sleep(0)
    assert recording.writes == [b"HTTP/1.1 100 Continue\r\n\r\nmore"]
    transport.flush()  # nothing left: no empty write
    assert len(recording.writes) == 1


async def test_a_large_body_goes_out_as_it_is_written_so_flow_control_sees_it() -> None:
    # uvicorn pauses a streaming app only once the real transport's buffer is full: held
    # bytes must not pile up past MAX_HELD_BYTES between loop steps.
    recording = RecordingTransport()
    transport = CoalescingTransport(recording, asyncio.get_running_loop())
    chunk = b"x" * 16_384
    for _ in range(MAX_HELD_BYTES // len(chunk) * 3):
        transport.write(chunk)
        assert transport.get_write_buffer_size() < MAX_HELD_BYTES
    assert len(recording.writes) == 3
    assert all(len(write) == MAX_HELD_BYTES for write in recording.writes)


async def test_close_sends_what_was_written_first_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    recording = RecordingTransport()
    transport = CoalescingTransport(recording, loop)
    transport.write(b"last words")
    transport.close()
    assert recording.writes == [b"last words"]
    assert recording.closed

    class Aborted(RecordingTransport):
        def abort(self) -> None:
            self.closed = True

    aborted = Aborted()
    transport = CoalescingTransport(aborted, loop)
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)
    assert aborted.writes == []
    assert aborted.closed


async def streamed(scope: Scope, receive: Receive, send: Send) -> None:
    """Sends a first chunk, then waits for the client's go before the last one."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"first", "more_body": True})
    await STREAM_GO.wait()
    await send({"type": "http.response.body", "body": b"last"})


STREAM_GO = asyncio.Event()


async def started(server: uvicorn.Server) -> bool:
    return server.started


@pytest.fixture
async def server_port() -> Any:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(streamed, http=HttpProtocol, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: started(server), "uvicorn to start")
    yield sock.getsockname()[1]
    STREAM_GO.set()  # a failed test must not leave the app waiting, nor the shutdown
    server.should_exit = True
    await task
    sock.close()


async def test_a_streamed_chunk_is_not_held_until_the_response_ends(server_port: int) -> None:
    STREAM_GO.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
    received = b""
    while b"first" not in received:  # arrives while the app still waits
        received += await asyncio.wait_for(reader.read(4096), timeout=5)
    assert b"last" not in received
    STREAM_GO.set()
    while not received.endswith(b"0\r\n\r\n"):  # chunked encoding's last chunk
        received += await asyncio.wait_for(reader.read(4096), timeout=5)
    assert b"last" in received
    writer.close()
    await writer.wait_closed()


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(server_port: int) -> None:
    STREAM_GO.set()
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    writer.write(b"GET /a HTTP/1.1\r\nhost: test\r\n\r\nGET /b HTTP/1.1\r\nhost: test\r\n\r\n")
    received = b""
    while received.count(b"0\r\n\r\n") < 2:
        received += await asyncio.wait_for(reader.read(4096), timeout=5)
    assert received.count(b"HTTP/1.1 200 OK") == 2
    writer.write(b"GET /c HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), timeout=5)  # the server closes after it
    assert rest.startswith(b"HTTP/1.1 200 OK")
    assert rest.endswith(b"0\r\n\r\n")
    writer.close()


# --- a peer that resets mid-response, on uvloop (the production loop) -------------------------


async def answer_when_told(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await RESET_GO.wait()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"first", "more_body": True})
    await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b""})


RESET_GO = asyncio.Event()


async def reset_mid_response(times: int) -> list[str]:
    """Clients that reset (RST) just as the app writes; returns what the loop logged."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    loop.set_exception_handler(lambda _, context: errors.append(str(context.get("message"))))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(answer_when_told, http=HttpProtocol, log_level="critical")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: started(server), "uvicorn to start")
    wake, tell = socket.socketpair()
    wake.setblocking(False)

    def woken() -> None:
        wake.recv(16)
        RESET_GO.set()

    loop.add_reader(wake, woken)
    for _ in range(times):
        RESET_GO.clear()
        client = socket.create_connection(sock.getsockname())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.sendall(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        await asyncio.sleep(0.02)  # the app now waits for RESET_GO
        tell.send(b"x")  # the app's go and the reset reach the loop in the same poll
        client.close()
        await asyncio.sleep(0.03)
    loop.remove_reader(wake)
    wake.close()
    tell.close()
    server.should_exit = True
    await serving
    sock.close()
    return errors


def test_a_reset_mid_response_drops_what_was_held_without_an_error() -> None:
    # Without connection_lost() discarding and flush() checking is_closing(), uvloop logged
    # "Exception in callback CoalescingTransport.flush" (a write to a closed handle) for
    # every one of these.
    assert uvloop.run(reset_mid_response(20)) == []
