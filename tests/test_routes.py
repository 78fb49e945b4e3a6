"""Routes and plain HTTP on the WebSocket port, with a real HTTP client (http.client).

One server serves ``{"/chat": ChatHandler, "/rooms/{name}": RoomHandler(),
"/echo": echo, "/plain": PlainHandler}`` plus the HTTP routes ``/health`` and
``/items/{id}``. Then a server on a Unix domain socket, spoken to by hand.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from _helpers import (
    HOST,
    OP_CLOSE,
    OP_TEXT,
    FrameReader,
    build_frame,
    close_payload,
    read_response,
    read_to_eof,
    upgrade_request,
    wait_until,
)
from wsnursery import (
    Accept,
    ConnectionRejected,
    HTTPRequest,
    HTTPResponse,
    Reject,
    WebSocketConnection,
    WebSocketHandler,
    WebSocketRequest,
    WebSocketServer,
    open_websocket,
    open_websocket_url,
    serve_websocket,
)

TIMEOUT = 5  # seconds: the hard cap of every test

CHAT_PAGE = "<!doctype html><title>chat</title><p>Chat ☃</p>"
ROOM_CSS = "body { color: #123456; }\n"


class ChatHandler(WebSocketHandler):
    default_page = CHAT_PAGE

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        await conn.send_message(f"chat:{text}")


class RoomHandler(WebSocketHandler):
    """Its default page is a file; the room's name comes from the path."""

    def __init__(self, page: Path | None = None) -> None:
        self.default_page = page
        self.params: list[dict[str, str]] = []

    async def validate(self, request: WebSocketRequest) -> Accept | Reject | None:
        self.params.append(dict(request.path_params))
        return Accept(headers=[("X-Room", request.path_params["name"])])

    async def on_connect(self, conn: WebSocketConnection) -> None:
        await conn.send_message(f"room:{conn.path}")


class PlainHandler(WebSocketHandler):
    """No default page: a plain GET gets 426."""


async def echo(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


async def health(request: HTTPRequest) -> HTTPResponse:
    body = json.dumps({"ok": True, "method": request.method, "query": request.query})
    return HTTPResponse(200, body, headers=[("X-Health", "yes")], content_type="application/json")


async def item(request: HTTPRequest) -> HTTPResponse:
    return HTTPResponse(201, f"item {request.path_params['id']} at {request.path}")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    pairs: list[tuple[str, str]]

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every ``name`` header, lower-cased."""
        values = [v for k, v in self.pairs if k.lower() == name]
        return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def _http(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
    conn = http.client.HTTPConnection(HOST, port, timeout=3)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return Reply(
            response.status,
            {name.lower(): value for name, value in response.getheaders()},
            response.read(),
            response.getheaders(),
        )
    finally:
        conn.close()


async def fetch(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Reply:
    """One HTTP request with http.client, in a worker thread."""
    return await trio.to_thread.run_sync(
        partial(_http, port, method, path, headers or {}, body), abandon_on_cancel=True
    )


@asynccontextmanager
async def app(tmp_path: Path, **kwargs: Any) -> AsyncIterator[tuple[WebSocketServer, RoomHandler]]:
    page = tmp_path / "room.css"
    page.write_text(ROOM_CSS, encoding="utf-8")
    room = RoomHandler(page)
    routes: dict[str, Any] = {
        "/chat": ChatHandler,
        "/rooms/{name}": room,
        "/echo": echo,
        "/plain": PlainHandler,
    }
    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(
            partial(
                serve_websocket,
                routes,
                HOST,
                0,
                http_routes={"/health": health, "/items/{id}": item},
                ping_interval=None,
                close_timeout=1,
                open_timeout=3,
                **kwargs,
            )
        )
        yield server, room
        nursery.cancel_scope.cancel()


async def raw_http(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return the status, the headers and the body (up to EOF)."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(data)
        head = await read_response(stream)
        rest = head.rest + await read_to_eof(stream)
    return head.status, {k.lower(): v for k, v in head.headers}, rest


# -- HTTP routes and default pages ---------------------------------------------------


async def test_http_route_answers(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            reply = await fetch(server.port, "/health?verbose=1")
            item_reply = await fetch(server.port, "/items/42", method="POST", body=b"{}")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-health"] == "yes"
    assert json.loads(reply.body) == {"ok": True, "method": "GET", "query": {"verbose": "1"}}
    assert reply.headers["content-length"] == str(len(reply.body))
    assert item_reply.status == 201
    assert item_reply.body == b"item 42 at /items/42"
    assert item_reply.headers["content-type"] == "text/plain; charset=utf-8"


async def test_default_page_as_text_is_html(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            reply = await fetch(server.port, "/chat")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert reply.body.decode("utf-8") == CHAT_PAGE


async def test_default_page_as_a_file_gets_its_type_from_its_name(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, room):
            reply = await fetch(server.port, "/rooms/lobby")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/css; charset=utf-8"
    assert reply.body.decode("utf-8") == ROOM_CSS
    assert room.params == []  # a plain GET never reaches validate


async def test_default_page_file_types(tmp_path: Path) -> None:
    png = tmp_path / "logo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    blob = tmp_path / "data.no-such-type"
    blob.write_bytes(b"\x00\x01")

    class Png(WebSocketHandler):
        default_page = png

    class Blob(WebSocketHandler):
        default_page = blob

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_websocket, {"/png": Png, "/blob": Blob()}, HOST, 0)
            )
            png_reply = await fetch(server.port, "/png")
            blob_reply = await fetch(server.port, "/blob")
            nursery.cancel_scope.cancel()
    assert (png_reply.status, png_reply.headers["content-type"]) == (200, "image/png")
    assert png_reply.body == png.read_bytes()
    assert blob_reply.headers["content-type"] == "application/octet-stream"
    assert blob_reply.body == b"\x00\x01"


async def test_head_on_a_default_page_has_headers_and_no_body(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            reply = await fetch(server.port, "/chat", method="HEAD")
            # By hand too: nothing at all after the head.
            status, headers, rest = await raw_http(
                server.port, b"HEAD /rooms/x HTTP/1.1\r\nHost: h\r\n\r\n"
            )
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert reply.headers["content-length"] == str(len(CHAT_PAGE.encode("utf-8")))
    assert reply.body == b""
    assert status == 200
    assert headers["content-length"] == str(len(ROOM_CSS))
    assert rest == b""


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/echo", "/plain"])
async def test_plain_get_without_default_page_is_426(tmp_path: Path, path: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            reply = await fetch(server.port, path)
    assert reply.status == 426
    assert reply.headers["upgrade"].lower() == "websocket"
    assert "upgrade" in reply.tokens("connection")


async def test_unknown_path_is_404_for_http_and_websocket(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            reply = await fetch(server.port, "/nowhere")
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://{HOST}:{server.port}/nowhere"):
                    pytest.fail("nothing is served there")
            # A template matches one path segment only.
            deeper = await fetch(server.port, "/rooms/a/b")
            bare = await fetch(server.port, "/rooms/")
    assert reply.status == 404
    assert info.value.status_code == 404
    assert deeper.status == bare.status == 404


@pytest.mark.parametrize(("method", "path"), [("POST", "/chat"), ("PUT", "/echo")])
async def test_other_methods_on_a_websocket_route_are_405(
    tmp_path: Path, method: str, path: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            reply = await fetch(server.port, path, method=method, body=b"payload")
            # Even with the upgrade headers.
            status, headers, _ = await raw_http(server.port, upgrade_request(path, method=method))
    assert reply.status == 405
    assert reply.headers["allow"] == "GET"
    assert status == 405
    assert headers["allow"] == "GET"


@pytest.mark.parametrize(
    "data",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nHost: h\r\nno colon here\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
    ],
    ids=["garbage", "header-without-colon", "two-hosts"],
)
async def test_malformed_request_is_400(tmp_path: Path, data: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            status, headers, _ = await raw_http(server.port, data)
    assert status == 400
    assert headers["connection"] == "close"


async def test_request_line_over_8_kib_is_414(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            reply = await fetch(server.port, "/chat?q=" + "a" * 8200)
            near = await fetch(server.port, "/health?q=" + "a" * 8000)
    assert reply.status == 414
    assert near.status == 200  # under the limit: served


async def test_header_line_over_8_kib_and_too_many_headers_are_431(tmp_path: Path) -> None:
    many = {f"X-H{i}": "v" for i in range(130)}
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            long_line = await fetch(server.port, "/health", headers={"X-Big": "b" * 8300})
            too_many = await fetch(server.port, "/health", headers=many)
            fine = await fetch(server.port, "/health", headers={"X-Big": "b" * 8000})
    assert long_line.status == 431
    assert too_many.status == 431
    assert fine.status == 200


async def test_a_client_that_resets_mid_request_is_not_a_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reset (ECONNRESET) before the request head is complete: logged at DEBUG only."""
    caplog.set_level(logging.DEBUG, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            sock = trio.socket.socket()
            await sock.connect((HOST, server.port))
            await sock.send(b"GET /chat HTTP/1.1\r\nHost: x\r\n")  # the head is unfinished
            await trio.sleep(0.05)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
            await wait_until(
                lambda: "during the handshake" in caplog.text or "unexpected error" in caplog.text
            )
            assert (await fetch(server.port, "/health")).status == 200  # still serving
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


# -- WebSocket on the routes -------------------------------------------------------------


async def test_path_params_reach_the_request(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, room):
            for name in ["lobby", "caf%C3%A9", "a.b-c_d"]:
                async with open_websocket_url(f"ws://{HOST}:{server.port}/rooms/{name}") as ws:
                    assert ws.response_headers["x-room"] == name
                    assert await ws.get_message() == f"room:/rooms/{name}"
    assert room.params == [{"name": "lobby"}, {"name": "caf%C3%A9"}, {"name": "a.b-c_d"}]


async def test_function_handler_on_a_mapping_route(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            app(tmp_path) as (server, _),
            open_websocket_url(f"ws://{HOST}:{server.port}/echo?x=1") as ws,
        ):
            for message in ["text", b"\x00bytes", "☃" * 1000]:
                await ws.send_message(message)
                assert await ws.get_message() == message


async def test_websocket_and_http_on_the_same_port_at_once(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with app(tmp_path) as (server, _):
            base = f"ws://{HOST}:{server.port}"
            async with (
                open_websocket_url(f"{base}/chat") as chat,
                open_websocket_url(f"{base}/echo") as echo_ws,
            ):
                await chat.send_message("one")
                replies = [await fetch(server.port, p) for p in ("/health", "/chat", "/echo")]
                assert await chat.get_message() == "chat:one"
                await echo_ws.send_message(b"two")
                page = await fetch(server.port, "/rooms/z")
                assert await echo_ws.get_message() == b"two"
                assert len(server.connections) == 2  # plain requests are not connections
    assert [r.status for r in replies] == [200, 200, 426]
    assert page.status == 200


# -- Unix domain sockets ------------------------------------------------------------------


async def test_unix_socket_handshake_and_echo(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    seen: list[Any] = []

    async def handler(request: WebSocketRequest) -> None:
        seen.append((request.url_path, request.query, request.remote))
        conn = await request.accept()
        async for message in conn:
            await conn.send_message(message)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server: WebSocketServer = await nursery.start(
                partial(serve_websocket, handler, unix_socket=path, ping_interval=None)
            )
            with pytest.raises(RuntimeError):
                _ = server.port  # no TCP listener
            # wsnursery's client has no Unix socket option: the handshake by hand.
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(upgrade_request("/unix?via=sock"))
                head = await read_response(stream)
                assert head.status == 101
                assert head.header("upgrade") == "websocket"
                reader = FrameReader(stream, head.rest)
                await stream.send_all(build_frame(OP_TEXT, "über unix".encode()))
                frame = await reader.read_frame()
                assert frame is not None
                assert (frame.opcode, frame.payload, frame.masked) == (
                    OP_TEXT,
                    "über unix".encode(),
                    False,
                )
                await stream.send_all(build_frame(OP_CLOSE, close_payload(1000)))
                frames = await reader.read_all()
                assert [(f.opcode, f.close_code) for f in frames] == [(OP_CLOSE, 1000)]
            # A plain HTTP request on the same socket.
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(b"GET /unix HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await read_response(stream)
                assert head.status == 426
            nursery.cancel_scope.cancel()
    assert seen[0][:2] == ("/unix", {"via": "sock"})


async def test_our_client_over_a_unix_socket(tmp_path: Path) -> None:
    class Echo(WebSocketHandler):
        async def on_text(self, conn: WebSocketConnection, text: str) -> None:
            await conn.send_message(text.upper())

    path = str(tmp_path / "client.sock")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_websocket, Echo(), unix_socket=path))
            async with open_websocket("localhost", 80, "/", unix_socket=path) as ws:
                await ws.send_message("over unix")
                assert await ws.get_message() == "OVER UNIX"
            nursery.cancel_scope.cancel()
