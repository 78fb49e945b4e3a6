"""The connection keeps its promises (issue 10, items B, C and D).

* B: every wait on a peer is bounded (a failed ``conn.start_soon`` task, a hook
  blocked writing to a peer that stopped reading).
* C: state stays true (a send cancelled before any byte went out, set_handler
  from another task).
* D: the wire (close codes RFC 6455 section 7.4 and the IANA registry allow;
  a frame header that declares a too-big message is refused at once).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import zlib
from functools import partial
from typing import Any

import pytest
import trio

from _helpers import (
    HOST,
    MASK_KEY,
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    FrameReader,
    build_frame,
    close_payload,
    raw_connect,
    read_head,
    read_response,
    serving,
    upgrade_request,
    wait_until,
)
from wsnursery import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketHandler,
    open_websocket_url,
)
from wsnursery._sansio.deflate import BoundedPerMessageDeflate, compressed_size_bound
from wsnursery._sansio.protocol import Protocol, ProtocolState

TIMEOUT = 5

# -- D: close codes ---------------------------------------------------------------

ACCEPTED_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
ACCEPTED_CODES += [3000, 3999, 4000, 4999]
REFUSED_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


def echoed_close_code(proto: Protocol) -> int | None:
    out = proto.data_to_send()
    assert out[0] == 0x88, out  # FIN + close, unmasked (server side)
    return struct.unpack("!H", out[2:4])[0] if out[1] >= 2 else None


@pytest.mark.parametrize("code", ACCEPTED_CODES)
def test_received_close_code_accepted(code: int) -> None:
    proto = Protocol(client=False)
    proto.receive_data(build_frame(OP_CLOSE, close_payload(code, "bye")))
    assert proto.close_received is not None
    assert proto.close_received.code == code
    assert proto.closed is not None
    assert proto.closed.code == code
    assert echoed_close_code(proto) == code


@pytest.mark.parametrize("code", REFUSED_CODES)
def test_received_close_code_refused_with_1002(code: int) -> None:
    proto = Protocol(client=False)
    proto.receive_data(build_frame(OP_CLOSE, close_payload(code)))
    assert proto.close_received is None
    assert proto.closed is not None
    assert proto.closed.code == 1002
    assert echoed_close_code(proto) == 1002


# -- D: a header that declares a too-big message ----------------------------------

HUGE = 2**62


def header(opcode: int, length: int, *, fin: bool = True, masked: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    return head + MASK_KEY if masked else head


def refused_at_header(proto: Protocol) -> bool:
    return proto.closed is not None and proto.closed.code == 1009


@pytest.mark.parametrize("client", [False, True])
def test_header_declaring_too_much_is_refused_at_once(client: bool) -> None:
    proto = Protocol(client=client, max_message_size=1024)
    proto.receive_data(header(OP_BINARY, HUGE, masked=not client))
    assert refused_at_header(proto)
    proto = Protocol(client=client, max_message_size=1024)
    proto.receive_data(header(OP_TEXT, 1025, masked=not client))
    assert refused_at_header(proto)


@pytest.mark.parametrize("client", [False, True])
def test_header_at_the_limit_is_accepted(client: bool) -> None:
    proto = Protocol(client=client, max_message_size=1024)
    proto.receive_data(header(OP_BINARY, 1024, masked=not client))
    assert proto.closed is None
    assert proto.data_to_send() == b""


def test_continuation_header_past_the_limit_is_refused_at_once() -> None:
    proto = Protocol(client=False, max_message_size=1024)
    proto.receive_data(build_frame(OP_BINARY, b"x" * 600, fin=False))
    assert proto.closed is None
    proto.receive_data(header(0x0, 424, fin=True))  # 600 + 424 = 1024: allowed
    assert proto.closed is None
    proto = Protocol(client=False, max_message_size=1024)
    proto.receive_data(build_frame(OP_BINARY, b"x" * 600, fin=False))
    proto.receive_data(header(0x0, 425, fin=True))  # 1025: too big
    assert refused_at_header(proto)


def deflate_pair(limit: int) -> tuple[Protocol, Protocol]:
    client_ext = BoundedPerMessageDeflate(max_message_size=limit)
    server_ext = BoundedPerMessageDeflate(max_message_size=limit)
    client_ext.finalize("permessage-deflate")
    server_ext.accept("permessage-deflate")
    return (
        Protocol(client=True, extensions=[client_ext], max_message_size=limit),
        Protocol(client=False, extensions=[server_ext], max_message_size=limit),
    )


def test_incompressible_message_at_the_limit_is_accepted_compressed() -> None:
    """Compressed, the payload of a message within the limit can be larger than it."""
    limit = 65536
    client, server = deflate_pair(limit)
    message = os.urandom(limit)
    data = client.send_message(message)
    assert len(data) > limit + 10  # deflate made it larger
    server.receive_data(data[:14])  # the header (and a little) first: checked alone
    assert server.closed is None
    for i in range(14, len(data), 1000):
        server.receive_data(data[i : i + 1000])
        while server.budget <= 0:
            server.resume()
    assert server.closed is None
    assert list(server.messages) == [message]


def test_compressed_header_declaring_too_much_is_refused_at_once() -> None:
    _, server = deflate_pair(1024)
    server.receive_data(bytes([0xC2]) + header(OP_BINARY, HUGE)[1:])  # FIN + RSV1 + binary
    assert refused_at_header(server)
    _, server = deflate_pair(1024)
    server.receive_data(bytes([0xC2]) + header(OP_BINARY, compressed_size_bound(1024) + 1)[1:])
    assert refused_at_header(server)


async def test_server_refuses_huge_header_at_once() -> None:
    async def handler(request: Any) -> None:
        conn = await request.accept()
        async for _message in conn:
            pass

    with trio.fail_after(TIMEOUT):
        async with serving(handler, max_message_size=1024) as server:
            stream, reader, _ = await raw_connect(server.port)
            await stream.send_all(header(OP_BINARY, HUGE))
            with trio.fail_after(0.5):
                frame = await reader.read_frame()
            assert frame is not None
            assert frame.opcode == OP_CLOSE
            assert frame.close_code == 1009
            await stream.aclose()


async def test_client_refuses_huge_header_at_once() -> None:
    received: list[int | None] = []

    async def raw_server(stream: trio.SocketStream) -> None:
        head, _ = await read_head(stream)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(key + guid).digest())
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        await stream.send_all(header(OP_BINARY, HUGE, masked=False))
        frame = await FrameReader(stream).read_frame()
        received.append(frame.close_code if frame is not None else None)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, raw_server, 0, host=HOST))
            port = listeners[0].socket.getsockname()[1]
            async with open_websocket_url(
                f"ws://{HOST}:{port}/", max_message_size=1024, close_timeout=1
            ) as conn:
                with trio.fail_after(0.5), pytest.raises(ConnectionClosed) as info:
                    await conn.get_message()
                assert info.value.reason.code == 1009
            nursery.cancel_scope.cancel()
    assert received == [1009]


# -- B: every wait on a peer is bounded -------------------------------------------


class Recording(WebSocketHandler):
    """Records (hook, detail, time) in a list shared by the test."""

    log: list[tuple[str, Any, float]]

    def record(self, what: str, detail: Any = None) -> None:
        self.log.append((what, detail, trio.current_time()))

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        self.record("disconnect", reason.code)


def disconnect_time(log: list[tuple[str, Any, float]]) -> float | None:
    return next((t for what, _, t in log if what == "disconnect"), None)


async def test_failed_start_soon_task_is_bounded_by_close_timeout() -> None:
    """A conn.start_soon task fails; the peer never answers our close frame."""
    log: list[tuple[str, Any, float]] = []

    class Crashing(Recording):
        async def on_connect(self, conn: WebSocketConnection) -> None:
            conn.start_soon(self.crash)

        async def crash(self) -> None:
            await trio.sleep(0.05)
            raise ValueError("boom")

    Crashing.log = log
    with trio.fail_after(TIMEOUT):
        async with serving(Crashing, close_timeout=0.5) as server:
            stream, reader, _ = await raw_connect(server.port)
            frame = await reader.read_frame()
            assert frame is not None
            assert frame.close_code == 1011
            start = trio.current_time()
            # We never answer the close frame, and keep TCP open.
            await wait_until(lambda: disconnect_time(log) is not None, 2.0, "on_disconnect ran")
            assert disconnect_time(log) - start < 1.0  # type: ignore[operator]
            await wait_until(lambda: not server.connections, 1.0, "registry emptied")
            await stream.aclose()


BIG = b"x" * 65536


async def raw_client_that_stops_reading(port: int, messages: int = 1) -> trio.SocketStream:
    stream, _, _ = await raw_connect(port)
    for _ in range(messages):
        await stream.send_all(build_frame(OP_TEXT, b"go"))
    return stream  # and never read from it again


async def test_hook_blocked_writing_to_a_peer_that_stopped_reading_ends() -> None:
    log: list[tuple[str, Any, float]] = []

    class Streaming(Recording):
        async def on_text(self, conn: WebSocketConnection, text: str) -> None:
            while True:
                await conn.send_message(BIG)

    Streaming.log = log
    with trio.fail_after(TIMEOUT + 5):
        options = {"ping_interval": 0.2, "ping_timeout": 0.3}
        async with serving(Streaming, **options) as server:
            stream = await raw_client_that_stops_reading(server.port)
            await wait_until(lambda: disconnect_time(log) is not None, 4.0, "on_disconnect ran")
            assert [detail for what, detail, _ in log if what == "disconnect"] == [1011]
            await stream.aclose()


async def small_buffer_connect(port: int, extra: Any = ()) -> tuple[trio.SocketStream, Any]:
    """A raw client whose socket buffers little: the server's writes soon wait."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((HOST, port))
    stream = trio.SocketStream(sock)
    await stream.send_all(upgrade_request(extra=extra))
    head = await read_response(stream)
    assert head.status == 101
    return stream, head


async def test_hook_writing_to_a_slow_but_reading_peer_is_left_alone() -> None:
    """The keep-alive fails a peer that takes no byte, not one that reads slowly."""
    log: list[tuple[str, Any, float]] = []
    count = 16

    class Streaming(Recording):
        async def on_text(self, conn: WebSocketConnection, text: str) -> None:
            conn._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            for _ in range(count):
                await conn.send_message(BIG)
            self.record("sent all")

    Streaming.log = log
    with trio.fail_after(TIMEOUT + 5):
        options = {"ping_interval": 0.2, "ping_timeout": 0.3}
        async with serving(Streaming, **options) as server:
            stream, head = await small_buffer_connect(server.port)
            await stream.send_all(build_frame(OP_TEXT, b"go"))
            received = len(head.rest)
            total = count * (len(BIG) + 10)
            while received < total:
                await trio.sleep(0.05)  # about 1 MB/s: slower than the hook writes
                burst = 0
                while burst < min(65536, total - received):
                    chunk = await stream.receive_some(65536)
                    assert chunk
                    burst += len(chunk)
                received += burst
            await wait_until(lambda: bool(log), 2.0, "the hook returned")
            assert [what for what, _, _ in log] == ["sent all"]
            await stream.aclose()


@pytest.mark.parametrize("paused", [False, True])
async def test_function_blocked_writing_to_a_peer_that_stopped_reading_ends(paused: bool) -> None:
    """Also while the reader is paused by a full queue (the peer sent more first)."""
    reasons: list[int] = []

    async def handler(request: Any) -> None:
        conn = await request.accept()
        await conn.get_message()
        try:
            while True:
                await conn.send_message(BIG)
        except ConnectionClosed:
            reasons.append((await conn.wait_closed()).code)

    with trio.fail_after(TIMEOUT + 5):
        options = {"ping_interval": 0.2, "ping_timeout": 0.3, "max_queue": 1}
        async with serving(handler, **options) as server:
            stream = await raw_client_that_stops_reading(server.port, 5 if paused else 1)
            await wait_until(lambda: bool(reasons), 4.0, "the handler's send ended")
            assert reasons == [1011]
            await stream.aclose()


# -- C: state stays true ----------------------------------------------------------


def inflate(frame: Any) -> bytes:
    """The payload of a frame, inflated when compressed (each message afresh)."""
    if not frame.rsv & 4:
        return bytes(frame.payload)
    return zlib.decompressobj(-15).decompress(frame.payload + b"\x00\x00\xff\xff")


@pytest.mark.parametrize(
    ("offer", "expected"),
    [
        ("", ProtocolState.OPEN),
        ("permessage-deflate; server_no_context_takeover", ProtocolState.OPEN),
        # The frame advanced the compression context the next ones depend on.
        ("permessage-deflate", ProtocolState.BROKEN),
    ],
)
async def test_send_cancelled_before_any_byte_leaves_the_connection_usable(
    offer: str, expected: ProtocolState
) -> None:
    outcome: dict[str, Any] = {}
    filled = trio.Event()
    drained = trio.Event()

    async def handler(request: Any) -> None:
        conn = await request.accept()
        conn._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        while True:  # small frames until the socket is full: a send must wait
            with trio.move_on_after(0.1) as scope:
                await conn.send_message(b"x")
            if scope.cancelled_caught:
                break
            sent += 1
        outcome["sent"] = sent
        outcome["state"] = conn.state
        filled.set()
        if conn.state is ProtocolState.OPEN:
            await drained.wait()
            await conn.send_message("after")
        await conn.wait_closed()

    with trio.fail_after(TIMEOUT + 5):
        async with serving(handler) as server:
            extra = [("Sec-WebSocket-Extensions", offer)] if offer else []
            stream, head = await small_buffer_connect(server.port, extra)
            assert bool(head.header("Sec-WebSocket-Extensions")) == bool(offer)
            await filled.wait()
            assert outcome["state"] is expected
            if expected is ProtocolState.BROKEN:
                await stream.aclose()
                return
            drained.set()
            reader = FrameReader(stream, head.rest)
            for _ in range(outcome["sent"]):
                frame = await reader.read_frame()
                assert frame is not None
                assert (frame.opcode, inflate(frame)) == (OP_BINARY, b"x")
            frame = await reader.read_frame()
            assert frame is not None
            assert (frame.opcode, inflate(frame)) == (OP_TEXT, b"after")
            await stream.send_all(build_frame(OP_CLOSE, close_payload(1000)))
            frame = await reader.read_frame()
            assert frame is not None
            assert frame.close_code == 1000
            await stream.aclose()


async def test_set_handler_from_another_task_waits_for_the_running_hook() -> None:
    log: list[tuple[str, Any, float]] = []

    class New(Recording):
        async def on_connect(self, conn: WebSocketConnection) -> None:
            self.record("new.on_connect")

    class Old(Recording):
        async def on_text(self, conn: WebSocketConnection, text: str) -> None:
            self.record("old.on_text start")
            conn.start_soon(conn.set_handler, New())
            await trio.sleep(0.2)
            self.record("old.on_text end")

    Old.log = New.log = log
    with trio.fail_after(TIMEOUT):
        async with serving(Old) as server:
            stream, _, _ = await raw_connect(server.port)
            await stream.send_all(build_frame(OP_TEXT, b"go"))
            await wait_until(lambda: len(log) >= 3, 2.0, "three hooks ran")
            assert [what for what, _, _ in log][:3] == [
                "old.on_text start",
                "old.on_text end",
                "new.on_connect",
            ]
            await stream.aclose()
