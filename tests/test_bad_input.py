"""Hostile and broken peers, with hand-made bytes over real TCP on 127.0.0.1.

Server side: a raw socket speaks to ``serve_websocket``; each case checks the
exact close code (or HTTP status), what the handler saw, that the server still
serves another client afterwards, and that no task is left behind.
Client side: a raw server speaks to ``open_websocket``; each case checks the
exception, and for frame errors that the client sends the right close frame and
closes TCP itself (without waiting for the server, which never closes).
"""

from __future__ import annotations

import logging
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from wsproto.utilities import generate_accept_token

from _helpers import (
    HOST,
    MASK_KEY,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    Recorder,
    apply_mask,
    assert_no_leftover_tasks,
    build_frame,
    close_payload,
    closed_port,
    count_tasks,
    raw_connect,
    read_head,
    read_response,
    read_to_eof,
    upgrade_request,
    wait_until,
)
from wsnursery import (
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionRejected,
    HandshakeTimeout,
    InvalidHandshake,
    TransportError,
    open_websocket,
    serve_websocket,
)

TIMEOUT = 5  # seconds: the hard cap of every test
LIMIT = 1024  # the server's and client's max_message_size in these tests
OPEN_TIMEOUT = 0.5


# -- our server, and what a raw client checks after each case ------------------------


@asynccontextmanager
async def our_server(**options: Any) -> AsyncIterator[tuple[Any, Recorder]]:
    """serve_websocket with an echo handler that records how each connection ended.

    ``/raise-before-accept`` and ``/raise-after-accept`` (after one message) make
    the handler fail.
    """
    outcomes = Recorder()

    async def handler(request: Any) -> None:
        if request.path == "/raise-before-accept":
            raise RuntimeError("boom before accept")
        conn = await request.accept()
        if request.path == "/raise-after-accept":
            await conn.get_message()
            raise RuntimeError("boom after accept")
        try:
            while True:
                await conn.send_message(await conn.get_message())
        except ConnectionClosed as exc:
            outcomes.put(exc)

    kwargs: dict[str, Any] = {
        "max_message_size": LIMIT,
        "open_timeout": OPEN_TIMEOUT,
        "close_timeout": 1,
        "ping_interval": None,
    }
    kwargs.update(options)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, HOST, 0, **kwargs))
        yield server, outcomes
        nursery.cancel_scope.cancel()


async def echo_once(port: int, message: str | bytes = "still serving") -> None:
    async with open_websocket(HOST, port, "/", ping_interval=None, close_timeout=1) as conn:
        await conn.send_message(message)
        assert await conn.get_message() == message


async def assert_still_serving_and_clean(server: Any, outcomes: Recorder, baseline: int) -> None:
    """Another client is served; then no connection and no task is left."""
    await echo_once(server.port)
    assert (await outcomes.get()).reason.code == 1000  # the echo client's normal close
    await wait_until(lambda: not server.connections, what="server.connections empty")
    await assert_no_leftover_tasks(baseline)
    assert outcomes.empty()


# -- frame-level violations by a client ----------------------------------------------


def raw_frame_head(b0: int, length_code: int, extended: bytes) -> bytes:
    """A masked frame's head with a hand-picked length encoding (then MASK_KEY)."""
    return bytes([b0, 0x80 | length_code]) + extended + MASK_KEY


# (bytes sent after the handshake, close code expected from the server)
FRAME_CASES = {
    "bad-opcode-3": (build_frame(0x3, b"x"), 1002),
    "bad-control-opcode-b": (build_frame(0xB, b"x"), 1002),
    "rsv1-without-extension": (build_frame(OP_TEXT, b"x", rsv=4), 1002),
    "rsv2-and-rsv3": (build_frame(OP_BINARY, b"x", rsv=3), 1002),
    "unmasked-client-frame": (build_frame(OP_TEXT, b"hello", mask=None), 1002),
    "fragmented-ping": (build_frame(OP_PING, b"x", fin=False), 1002),
    "fragmented-close": (build_frame(OP_CLOSE, close_payload(1000), fin=False), 1002),
    "ping-payload-126": (build_frame(OP_PING, b"p" * 126), 1002),
    "bad-utf8-text": (build_frame(OP_TEXT, b"abc\xff\xfedef"), 1007),
    # "€" is e2 82 ac: a valid start in the first fragment, a bad byte in the second.
    "bad-utf8-split-across-fragments": (
        build_frame(OP_TEXT, b"ok \xe2\x82", fin=False) + build_frame(OP_CONT, b"(", fin=True),
        1007,
    ),
    "bad-utf8-close-reason": (build_frame(OP_CLOSE, close_payload(1000, b"bye \xff")), 1007),
    "close-code-999": (build_frame(OP_CLOSE, close_payload(999)), 1002),
    "close-code-1004": (build_frame(OP_CLOSE, close_payload(1004)), 1002),
    "close-code-2999": (build_frame(OP_CLOSE, close_payload(2999)), 1002),
    "close-code-1005": (build_frame(OP_CLOSE, close_payload(1005)), 1002),
    "close-code-1006": (build_frame(OP_CLOSE, close_payload(1006)), 1002),
    "close-code-5000": (build_frame(OP_CLOSE, close_payload(5000)), 1002),
    "close-payload-1-byte": (build_frame(OP_CLOSE, b"\x03"), 1002),
    "continuation-without-start": (build_frame(OP_CONT, b"x"), 1002),
    "new-message-inside-fragmented-one": (
        build_frame(OP_TEXT, b"a", fin=False) + build_frame(OP_TEXT, b"b"),
        1002,
    ),
    "64-bit-length-with-msb-set": (
        raw_frame_head(0x82, 127, struct.pack("!Q", 1 << 63 | 5)) + apply_mask(b"hello", MASK_KEY),
        1002,
    ),
    "non-minimal-length": (
        raw_frame_head(0x82, 126, struct.pack("!H", 5)) + apply_mask(b"hello", MASK_KEY),
        1002,
    ),
    # Announces 2**62 bytes; the server counts what arrives and stops past LIMIT.
    "huge-declared-length": (
        raw_frame_head(0x82, 127, struct.pack("!Q", 1 << 62))
        + apply_mask(b"x" * (LIMIT + 100), MASK_KEY),
        1009,
    ),
    "oversized-message": (build_frame(OP_BINARY, b"x" * (LIMIT + 1)), 1009),
    "oversized-fragmented-message": (
        build_frame(OP_TEXT, b"x" * 600, fin=False) + build_frame(OP_CONT, b"y" * 600),
        1009,
    ),
    # 400 characters of 3 bytes each: 1200 bytes of UTF-8 > LIMIT.
    "oversized-non-ascii-text": (build_frame(OP_TEXT, "☃".encode() * 400), 1009),
}


async def expect_close_from_server(reader: FrameReader, code: int) -> None:
    """The server sends exactly one close frame with ``code``, then closes TCP."""
    frames = await reader.read_all()
    assert [f.opcode for f in frames] == [OP_CLOSE], frames
    close = frames[0]
    assert not close.masked
    assert close.close_code == code, close


@pytest.mark.parametrize(("data", "code"), FRAME_CASES.values(), ids=FRAME_CASES.keys())
async def test_server_fails_bad_frames(data: bytes, code: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            baseline = count_tasks()
            stream, reader, _ = await raw_connect(server.port)
            await stream.send_all(data)
            await expect_close_from_server(reader, code)
            await stream.aclose()

            seen = await outcomes.get()
            assert isinstance(seen, ConnectionClosedError)
            assert seen.reason.code == code
            assert not seen.reason.initiated_by_peer  # the server failed the connection
            await assert_still_serving_and_clean(server, outcomes, baseline)


# Control cases, right at the edge of the violations above: (sent, frames expected back)
VALID_CASES = {
    "valid-utf8-split-across-fragments": (
        build_frame(OP_TEXT, b"ok \xe2\x82", fin=False) + build_frame(OP_CONT, b"\xac!"),
        [(OP_TEXT, "ok €!".encode())],
    ),
    "message-of-exactly-the-limit": (
        build_frame(OP_BINARY, b"x" * LIMIT),
        [(OP_BINARY, b"x" * LIMIT)],
    ),
    "non-ascii-text-of-exactly-the-limit": (
        build_frame(OP_TEXT, "☃".encode() * (LIMIT // 3) + b"x" * (LIMIT % 3)),
        [(OP_TEXT, "☃".encode() * (LIMIT // 3) + b"x" * (LIMIT % 3))],
    ),
    "ping-between-fragments": (
        build_frame(OP_TEXT, b"ab", fin=False)
        + build_frame(OP_PING, b"p" * 125)
        + build_frame(OP_CONT, b"cd"),
        [(OP_PONG, b"p" * 125), (OP_TEXT, b"abcd")],
    ),
    "unsolicited-pong-is-ignored": (
        build_frame(OP_PONG, b"zz") + build_frame(OP_TEXT, b"after"),
        [(OP_TEXT, b"after")],
    ),
    "empty-fragments": (
        build_frame(OP_BINARY, b"", fin=False)
        + build_frame(OP_CONT, b"", fin=False)
        + build_frame(OP_CONT, b""),
        [(OP_BINARY, b"")],
    ),
}


@pytest.mark.parametrize(("data", "expected"), VALID_CASES.values(), ids=VALID_CASES.keys())
async def test_server_accepts_edge_cases(data: bytes, expected: list[tuple[int, bytes]]) -> None:
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            stream, reader, _ = await raw_connect(server.port)
            await stream.send_all(data)
            frames = [await reader.read_frame() for _ in expected]
            assert [(f.opcode, f.payload) for f in frames if f] == expected
            await stream.send_all(build_frame(OP_CLOSE, close_payload(1000)))
            await expect_close_from_server(reader, 1000)
            await stream.aclose()
            assert (await outcomes.get()).reason.code == 1000


def deflate(data: bytes) -> bytes:
    """permessage-deflate payload: raw deflate, sync-flushed, the 4-byte tail removed."""
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


async def test_compressed_message_within_limit_is_accepted() -> None:
    """The control case for the deflate bomb: the same framing, small, is echoed."""
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            stream, reader, head = await raw_connect(
                server.port, extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]
            )
            assert (head.header("Sec-WebSocket-Extensions") or "").startswith("permessage-deflate")
            text = b"compress me " * 50  # 600 bytes < LIMIT
            await stream.send_all(build_frame(OP_TEXT, deflate(text), rsv=4))
            frame = await reader.read_frame()
            assert frame is not None
            assert frame.opcode == OP_TEXT
            assert frame.rsv == 4  # the echo is compressed too
            inflater = zlib.decompressobj(wbits=-15)
            assert inflater.decompress(frame.payload + b"\x00\x00\xff\xff") == text
            await stream.aclose()
            assert (await outcomes.get()).reason.code == 1006


async def test_deflate_bomb_fails_with_1009() -> None:
    """64 MiB of zeros in about 64 KiB: the server stops inflating at its 1 MiB limit.

    Python memory is traced while the server handles the bomb: inflating it whole
    would take 64 MiB at once.
    """
    bomb = deflate(bytes(64 * 2**20))
    assert len(bomb) < 100 * 1024
    frame = build_frame(OP_BINARY, bomb, rsv=4)
    with trio.fail_after(TIMEOUT):
        async with our_server(max_message_size=2**20) as (server, outcomes):
            baseline = count_tasks()
            stream, reader, head = await raw_connect(
                server.port, extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]
            )
            assert (head.header("Sec-WebSocket-Extensions") or "").startswith("permessage-deflate")
            tracemalloc.start()
            try:
                await stream.send_all(frame)
                await expect_close_from_server(reader, 1009)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 16 * 2**20, f"{peak / 2**20:.1f} MiB allocated at the peak"
            await stream.aclose()
            seen = await outcomes.get()
            assert isinstance(seen, ConnectionClosedError)
            assert seen.reason.code == 1009
            await assert_still_serving_and_clean(server, outcomes, baseline)


async def test_deflate_bomb_split_over_fragments_fails_with_1009() -> None:
    bomb = deflate(bytes(8 * 2**20))
    third = len(bomb) // 3
    data = (
        build_frame(OP_BINARY, bomb[:third], fin=False, rsv=4)
        + build_frame(OP_CONT, bomb[third : 2 * third], fin=False)
        + build_frame(OP_CONT, bomb[2 * third :])
    )
    with trio.fail_after(TIMEOUT):
        async with our_server(max_message_size=2**20) as (server, outcomes):
            baseline = count_tasks()
            stream, reader, _ = await raw_connect(
                server.port, extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]
            )
            await stream.send_all(data)
            await expect_close_from_server(reader, 1009)
            await stream.aclose()
            assert (await outcomes.get()).reason.code == 1009
            await assert_still_serving_and_clean(server, outcomes, baseline)


# -- peers that stop half-way --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        # A header announcing 100 bytes, and 10 of them.
        build_frame(OP_BINARY, b"x" * 100)[: 2 + 4 + 10],
        # Half a header.
        b"\x82",
        # A first fragment, and never the rest of the message.
        build_frame(OP_TEXT, b"first part", fin=False),
    ],
    ids=["truncated-frame", "truncated-header", "mid-fragmented-message"],
)
@pytest.mark.parametrize("how", ["eof", "close"])
async def test_peer_vanishes_mid_message(data: bytes, how: str) -> None:
    """The handler gets ConnectionClosedError with 1006; no close frame is sent."""
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            baseline = count_tasks()
            stream, reader, _ = await raw_connect(server.port)
            await stream.send_all(data)
            if how == "eof":
                await stream.send_eof()  # half-close: we can still read
                assert await reader.read_all() == []
                await stream.aclose()
            else:
                await stream.aclose()  # gone for good
            seen = await outcomes.get()
            assert isinstance(seen, ConnectionClosedError)
            assert seen.reason.code == 1006
            assert seen.reason.initiated_by_peer
            await assert_still_serving_and_clean(server, outcomes, baseline)


async def test_silent_peer_is_closed_after_open_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            baseline = count_tasks()
            stream = await trio.open_tcp_stream(HOST, server.port)
            start = trio.current_time()
            response = await read_response(stream)
            elapsed = trio.current_time() - start
            assert response.status == 408
            await read_to_eof(stream)
            await stream.aclose()
            assert OPEN_TIMEOUT * 0.9 <= elapsed < OPEN_TIMEOUT + 1.0
            await assert_still_serving_and_clean(server, outcomes, baseline)


async def test_half_a_request_head_is_closed_after_open_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            baseline = count_tasks()
            stream = await trio.open_tcp_stream(HOST, server.port)
            start = trio.current_time()
            await stream.send_all(upgrade_request()[:40])
            response = await read_response(stream)
            assert response.status == 408
            await read_to_eof(stream)
            await stream.aclose()
            assert trio.current_time() - start < OPEN_TIMEOUT + 1.0
            await assert_still_serving_and_clean(server, outcomes, baseline)


# -- bad handshakes ------------------------------------------------------------------

LONG = "a" * 9000
HANDSHAKE_CASES: dict[str, tuple[bytes, int]] = {
    "missing-upgrade": (upgrade_request(drop=["upgrade"]), 426),
    "upgrade-not-websocket": (
        upgrade_request(drop=["upgrade"], extra=[("Upgrade", "h2c")]),
        426,
    ),
    "missing-connection-upgrade": (upgrade_request(drop=["connection"]), 400),
    "connection-keep-alive-only": (
        upgrade_request(drop=["connection"], extra=[("Connection", "keep-alive")]),
        400,
    ),
    "missing-key": (upgrade_request(drop=["sec-websocket-key"]), 400),
    "key-not-16-bytes": (
        upgrade_request(drop=["sec-websocket-key"], extra=[("Sec-WebSocket-Key", "c2hvcnQ=")]),
        400,
    ),
    "key-not-base64": (
        upgrade_request(
            drop=["sec-websocket-key"], extra=[("Sec-WebSocket-Key", "!!!!!!!!!!!!!!!!!!!!!!==")]
        ),
        400,
    ),
    "two-keys": (
        upgrade_request(extra=[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]),
        400,
    ),
    "version-12": (
        upgrade_request(drop=["sec-websocket-version"], extra=[("Sec-WebSocket-Version", "12")]),
        426,
    ),
    "missing-version": (upgrade_request(drop=["sec-websocket-version"]), 400),
    "post": (upgrade_request(method="POST"), 405),
    "http-1.0": (upgrade_request(version="HTTP/1.0"), 400),
    "garbage-request-line": (b"HELLO THERE\r\n\r\n", 400),
    "binary-garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "request-line-over-8-kib": (upgrade_request("/" + LONG), 414),
    "header-line-over-8-kib": (upgrade_request(extra=[("X-Big", LONG)]), 431),
    "200-headers": (upgrade_request(extra=[(f"X-H{i}", "v") for i in range(200)]), 431),
}


@pytest.mark.parametrize(
    ("request_bytes", "status"), HANDSHAKE_CASES.values(), ids=HANDSHAKE_CASES.keys()
)
async def test_bad_handshake_gets_http_error(request_bytes: bytes, status: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            baseline = count_tasks()
            stream = await trio.open_tcp_stream(HOST, server.port)
            await stream.send_all(request_bytes)
            response = await read_response(stream)
            body = response.rest + await read_to_eof(stream)  # the server closes after it
            await stream.aclose()
            assert response.status == status, (response, body)
            assert "close" in response.tokens("Connection")
            assert int(response.header("Content-Length") or -1) == len(body)
            if status == 426 and b"Sec-WebSocket-Version: 12" in request_bytes:
                assert response.header("Sec-WebSocket-Version") == "13"
            elif status == 426:
                assert response.tokens("Upgrade") == ["websocket"]
                assert "upgrade" in response.tokens("Connection")
            if status == 405:
                assert response.header("Allow") == "GET"
            assert outcomes.empty()  # the handler never ran
            await assert_still_serving_and_clean(server, outcomes, baseline)


def exact_request_line() -> bytes:
    """A request whose request line is exactly 8192 bytes (the default limit)."""
    path = "/" + "a" * (8192 - len("GET / HTTP/1.1"))
    request = upgrade_request(path)
    assert request.index(b"\r\n") == 8192
    return request


def exact_header_line() -> bytes:
    """A request with a header line of exactly 8192 bytes."""
    request = upgrade_request(extra=[("X-Big", "b" * (8192 - len("X-Big: ")))])
    start = request.index(b"X-Big")
    assert request.index(b"\r\n", start) - start == 8192
    return request


def n_headers(n: int) -> bytes:
    """A request with exactly ``n`` header lines (5 of them the upgrade's own)."""
    request = upgrade_request(extra=[(f"X-H{i}", "v") for i in range(n - 5)])
    assert request.count(b"\r\n") - 2 == n
    return request


ACCEPTED_HANDSHAKES = {
    "connection-keep-alive-upgrade": upgrade_request(
        drop=["connection", "upgrade"],
        extra=[("Connection", "keep-alive, Upgrade"), ("Upgrade", "WebSocket")],
    ),
    "lower-case-names": upgrade_request(
        headers=[
            ("host", HOST),
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ]
    ),
    "request-line-exactly-8-kib": exact_request_line(),
    "header-line-exactly-8-kib": exact_header_line(),
    "128-headers": n_headers(128),
}


@pytest.mark.parametrize(
    "request_bytes", ACCEPTED_HANDSHAKES.values(), ids=ACCEPTED_HANDSHAKES.keys()
)
@pytest.mark.parametrize("split_at", ["whole", "every-cr"])
async def test_acceptable_handshake_variants(request_bytes: bytes, split_at: str) -> None:
    """Valid upgrades, some at the size limits, are accepted however TCP splits them.

    ``every-cr`` sends the request in pieces that end between a CR and its LF.
    """
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            stream = await trio.open_tcp_stream(HOST, server.port)
            if split_at == "whole":
                await stream.send_all(request_bytes)
            else:
                pieces = request_bytes.split(b"\r")
                for piece in pieces[:-1]:
                    await stream.send_all(piece + b"\r")
                    await trio.sleep(0.002)  # let the server read each piece
                await stream.send_all(pieces[-1])
            response = await read_response(stream)
            assert response.status == 101, response
            reader = FrameReader(stream, response.rest)
            await stream.send_all(build_frame(OP_TEXT, b"hello"))
            frame = await reader.read_frame()
            assert frame is not None
            assert frame.payload == b"hello"
            await stream.aclose()
            assert (await outcomes.get()).reason.code == 1006


async def test_129_headers_is_one_too_many() -> None:
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, _outcomes):
            stream = await trio.open_tcp_stream(HOST, server.port)
            await stream.send_all(n_headers(129))
            response = await read_response(stream)
            await read_to_eof(stream)
            await stream.aclose()
            assert response.status == 431


async def test_frames_in_the_same_packet_as_the_request() -> None:
    """Frames sent right behind the upgrade request (no wait for 101) are not lost."""
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            stream = await trio.open_tcp_stream(HOST, server.port)
            await stream.send_all(
                upgrade_request() + build_frame(OP_TEXT, b"early") + build_frame(OP_BINARY, b"bird")
            )
            response = await read_response(stream)
            assert response.status == 101
            reader = FrameReader(stream, response.rest)
            echoes = [await reader.read_frame(), await reader.read_frame()]
            assert [(f.opcode, f.payload) for f in echoes if f] == [
                (OP_TEXT, b"early"),
                (OP_BINARY, b"bird"),
            ]
            await stream.send_all(build_frame(OP_CLOSE, close_payload(1000)))
            await expect_close_from_server(reader, 1000)
            await stream.aclose()
            assert (await outcomes.get()).reason.code == 1000


# -- handlers that fail --------------------------------------------------------------


async def test_handler_raising_after_accept_closes_only_its_connection_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            baseline = count_tasks()
            async with open_websocket(HOST, server.port, "/", ping_interval=None) as other:
                await other.send_message("before")
                assert await other.get_message() == "before"

                stream, reader, _ = await raw_connect(server.port, "/raise-after-accept")
                await stream.send_all(build_frame(OP_TEXT, b"go"))
                frame = await reader.read_frame()
                assert frame is not None
                assert (frame.opcode, frame.close_code) == (OP_CLOSE, 1011)
                # The closing handshake: we answer, the server closes TCP.
                await stream.send_all(build_frame(OP_CLOSE, close_payload(1011)))
                assert await reader.read_all() == []
                await stream.aclose()

                # The other connection never noticed.
                for i in range(3):
                    await other.send_message(f"after {i}")
                    assert await other.get_message() == f"after {i}"
                assert len(server.connections) == 1
            assert (await outcomes.get()).reason.code == 1000
            await assert_still_serving_and_clean(server, outcomes, baseline)

    failures = [r for r in caplog.records if r.exc_info and r.name.startswith("wsnursery")]
    assert len(failures) == 1, caplog.records
    record = failures[0]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert str(record.exc_info[1]) == "boom after accept"


async def test_handler_raising_before_accept_gives_http_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with our_server() as (server, outcomes):
            baseline = count_tasks()
            stream = await trio.open_tcp_stream(HOST, server.port)
            await stream.send_all(upgrade_request("/raise-before-accept"))
            response = await read_response(stream)
            await read_to_eof(stream)
            await stream.aclose()
            assert response.status == 500
            await assert_still_serving_and_clean(server, outcomes, baseline)
    failures = [r for r in caplog.records if r.exc_info and r.name.startswith("wsnursery")]
    assert len(failures) == 1, caplog.records
    assert isinstance(failures[0].exc_info[1], RuntimeError)  # type: ignore[index]


# -- a raw server against our client -------------------------------------------------

Behaviour = Callable[[trio.SocketStream, bytes, Recorder], Awaitable[None]]


@asynccontextmanager
async def raw_server(behaviour: Behaviour) -> AsyncIterator[tuple[int, Recorder]]:
    """A hand-made server: reads the upgrade request, then does ``behaviour``."""
    seen = Recorder()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            head, _ = await read_head(stream)
            key = b""
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            await behaviour(stream, key, seen)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client hung up first: what it did is what the test checks
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        yield port, seen
        nursery.cancel_scope.cancel()


def switching_protocols(key: bytes, *extra: str) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {generate_accept_token(key).decode()}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer_403(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    await stream.send_all(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Why: no entry\r\n"
        b"Content-Length: 14\r\n\r\nnot for you!\r\n"
    )


async def answer_bad_accept(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    await stream.send_all(switching_protocols(b"dGhlIHNhbXBsZSBub25jZQ=="))
    await read_to_eof(stream)


async def answer_unoffered_subprotocol(
    stream: trio.SocketStream, key: bytes, seen: Recorder
) -> None:
    await stream.send_all(switching_protocols(key, "Sec-WebSocket-Protocol: chat.evil"))
    await read_to_eof(stream)


async def answer_unoffered_extension(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    await stream.send_all(switching_protocols(key, "Sec-WebSocket-Extensions: x-unknown"))
    await read_to_eof(stream)


async def answer_missing_upgrade(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    accept = generate_accept_token(key).decode()
    await stream.send_all(
        f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
    )
    await read_to_eof(stream)


async def answer_garbage(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await read_to_eof(stream)


async def close_before_answering(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    pass  # `handle` closes the stream


async def half_an_answer(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    await stream.send_all(switching_protocols(key)[:30])


async def never_answer(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    seen.put(await read_to_eof(stream))  # until the client gives up


async def answer_endless_head(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nX-Junk: ")
    while True:
        await stream.send_all(b"j" * 16384)
        await trio.sleep(0.001)


async def answer_403_endless_body(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
    await stream.send_all(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\nContent-Length: 1000000000\r\n\r\n"
    )
    while True:
        await stream.send_all(b"<p>go away</p>\n" * 4096)
        await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (answer_bad_accept, InvalidHandshake),
        (answer_unoffered_subprotocol, InvalidHandshake),
        (answer_unoffered_extension, InvalidHandshake),
        (answer_missing_upgrade, InvalidHandshake),
        (answer_garbage, InvalidHandshake),
        (close_before_answering, InvalidHandshake),
        (half_an_answer, InvalidHandshake),
        (answer_endless_head, InvalidHandshake),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_client_rejects_bad_handshake_response(behaviour: Behaviour, expected: type) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_server(behaviour) as (port, _seen):
            baseline = count_tasks()
            with pytest.raises(expected) as info:
                async with open_websocket(HOST, port, "/", subprotocols=["chat.v1"]):
                    pytest.fail("the handshake should not have succeeded")
            assert type(info.value) is expected
            await assert_no_leftover_tasks(baseline)


async def test_client_gets_connection_rejected_with_status_headers_body() -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_server(answer_403) as (port, _seen):
            baseline = count_tasks()
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket(HOST, port, "/"):
                    pytest.fail("the handshake should not have succeeded")
            rejected = info.value
            assert rejected.status_code == 403
            assert rejected.headers["X-Why"] == "no entry"
            assert rejected.headers["x-why"] == "no entry"  # case-insensitive
            assert rejected.headers["Content-Type"] == "text/plain"
            assert rejected.body == b"not for you!\r\n"
            await assert_no_leftover_tasks(baseline)


async def test_client_gives_up_reading_an_endless_rejection_body() -> None:
    """A 403 whose body never ends: ConnectionRejected once max_response_size is read.

    The client keeps at most max_response_size (64 KiB) of the body; reading on past
    that until open_timeout would turn a clear rejection into a HandshakeTimeout.
    """
    with trio.fail_after(TIMEOUT):
        async with raw_server(answer_403_endless_body) as (port, _seen):
            baseline = count_tasks()
            start = trio.current_time()
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket(HOST, port, "/", open_timeout=2):
                    pytest.fail("the handshake should not have succeeded")
            assert trio.current_time() - start < 1.5
            assert info.value.status_code == 403
            assert 0 < len(info.value.body) <= 65536
            assert info.value.body.startswith(b"<p>go away</p>")
            await assert_no_leftover_tasks(baseline)


async def test_client_handshake_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_server(never_answer) as (port, seen):
            baseline = count_tasks()
            start = trio.current_time()
            with pytest.raises(HandshakeTimeout):
                async with open_websocket(HOST, port, "/", open_timeout=0.3):
                    pytest.fail("the handshake should not have succeeded")
            assert 0.25 <= trio.current_time() - start < 1.5
            assert await seen.get() == b""  # the client closed its end
            await assert_no_leftover_tasks(baseline)


async def test_client_connection_refused_is_transport_error() -> None:
    port = closed_port()
    with trio.fail_after(TIMEOUT):
        baseline = count_tasks()
        with pytest.raises(TransportError) as info:
            async with open_websocket(HOST, port, "/"):
                pytest.fail("the connection should have been refused")
        assert isinstance(info.value.__cause__, OSError)
        await assert_no_leftover_tasks(baseline)


def frame_then_wait_for_close(frame: bytes, *response_headers: str) -> Behaviour:
    """Accept, send ``frame``, then record every frame until the client closes TCP.

    The server never closes TCP itself: the client must, and at once, since it
    failed the connection (RFC 6455 section 7.1.7).
    """

    async def behaviour(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
        await stream.send_all(switching_protocols(key, *response_headers) + frame)
        start = trio.current_time()
        frames = await FrameReader(stream).read_all()
        seen.put((frames, trio.current_time() - start))

    return behaviour


CLIENT_FRAME_CASES = {
    "masked-server-frame": (build_frame(OP_TEXT, b"hello"), 1002),
    "bad-opcode": (build_frame(0x3, b"x", mask=None), 1002),
    "rsv1-without-extension": (build_frame(OP_TEXT, b"x", rsv=4, mask=None), 1002),
    "ping-payload-126": (build_frame(OP_PING, b"p" * 126, mask=None), 1002),
    "close-code-1005": (build_frame(OP_CLOSE, close_payload(1005), mask=None), 1002),
    "bad-utf8-text": (build_frame(OP_TEXT, b"\xc0\xaf", mask=None), 1007),
    "bad-utf8-split-across-fragments": (
        build_frame(OP_TEXT, b"\xf0\x9f", fin=False, mask=None)
        + build_frame(OP_CONT, b"\x8e", fin=False, mask=None)
        + build_frame(OP_CONT, b"A", mask=None),
        1007,
    ),
    "bad-utf8-close-reason": (build_frame(OP_CLOSE, close_payload(1000, b"\xff"), mask=None), 1007),
    "oversized-message": (build_frame(OP_BINARY, b"x" * (LIMIT + 1), mask=None), 1009),
}


@pytest.mark.parametrize(
    ("frame", "code"), CLIENT_FRAME_CASES.values(), ids=CLIENT_FRAME_CASES.keys()
)
async def test_client_fails_bad_frames_and_closes_tcp(frame: bytes, code: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_server(frame_then_wait_for_close(frame)) as (port, seen):
            baseline = count_tasks()
            async with open_websocket(
                HOST, port, "/", max_message_size=LIMIT, ping_interval=None, close_timeout=3
            ) as conn:
                with pytest.raises(ConnectionClosedError) as info:
                    await conn.get_message()
                assert info.value.reason.code == code
                assert not info.value.reason.initiated_by_peer
                assert conn.closed is not None
                assert conn.closed.code == code
            frames, elapsed = await seen.get()
            # One close frame, masked, with the code; then TCP closed by the client,
            # well before the 3 s close_timeout it would wait for a server.
            assert [(f.opcode, f.masked) for f in frames] == [(OP_CLOSE, True)], frames
            assert frames[0].close_code == code
            assert elapsed < 1.0
            await assert_no_leftover_tasks(baseline)


async def test_client_fails_deflate_bomb_with_1009_and_closes_tcp() -> None:
    bomb = build_frame(OP_BINARY, deflate(bytes(64 * 2**20)), rsv=4, mask=None)
    behaviour = frame_then_wait_for_close(bomb, "Sec-WebSocket-Extensions: permessage-deflate")
    with trio.fail_after(TIMEOUT):
        async with raw_server(behaviour) as (port, seen):
            baseline = count_tasks()
            async with open_websocket(
                HOST, port, "/", max_message_size=2**20, ping_interval=None, close_timeout=3
            ) as conn:
                assert conn.extensions, "permessage-deflate should be on"
                with pytest.raises(ConnectionClosedError) as info:
                    await conn.get_message()
                assert info.value.reason.code == 1009
            frames, elapsed = await seen.get()
            assert [(f.opcode, f.masked, f.close_code) for f in frames] == [(OP_CLOSE, True, 1009)]
            assert elapsed < 1.0
            await assert_no_leftover_tasks(baseline)


async def test_client_sees_1006_when_server_vanishes() -> None:
    async def vanish(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
        await stream.send_all(switching_protocols(key) + build_frame(OP_TEXT, b"hi", mask=None))

    with trio.fail_after(TIMEOUT):
        async with raw_server(vanish) as (port, _seen):
            baseline = count_tasks()
            async with open_websocket(HOST, port, "/", ping_interval=None) as conn:
                assert await conn.get_message() == "hi"
                with pytest.raises(ConnectionClosedError) as info:
                    await conn.get_message()
                assert info.value.reason.code == CloseCode.ABNORMAL_CLOSURE
                assert info.value.reason.initiated_by_peer
            await assert_no_leftover_tasks(baseline)


async def test_client_closing_handshake_with_raw_server() -> None:
    """A server close with code and reason: our client echoes the code, masked."""

    async def close_4000(stream: trio.SocketStream, key: bytes, seen: Recorder) -> None:
        await stream.send_all(
            switching_protocols(key)
            + build_frame(OP_CLOSE, close_payload(4000, "bye ☃"), mask=None)
        )
        reader = FrameReader(stream)
        frame = await reader.read_frame()
        seen.put(frame)
        # RFC 6455 7.1.1: the server closes TCP first; `handle` does.

    with trio.fail_after(TIMEOUT):
        async with raw_server(close_4000) as (port, seen):
            async with open_websocket(HOST, port, "/", ping_interval=None) as conn:
                with pytest.raises(ConnectionClosedError) as info:
                    await conn.get_message()
                assert (info.value.reason.code, info.value.reason.reason) == (4000, "bye ☃")
            frame = await seen.get()
            assert frame.opcode == OP_CLOSE
            assert frame.masked
            assert frame.payload == struct.pack("!H", 4000)  # the code echoed, no reason
