"""Bad request headers or subprotocols given to a client are a ValueError before connecting.

HTTP would refuse them (h11 raises its own ``LocalProtocolError`` while writing the
request, inside the client's nursery), or they would make a handshake the server
cannot read. Every client entry point checks them first, the same way, and no
connection is attempted: the port here has no listener, so a check made too late
would show up as a TransportError instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

from _helpers import closed_port
from wsnursery import (
    connect_websocket,
    connect_websocket_url,
    open_reconnecting_websocket,
    open_websocket,
    open_websocket_url,
)
from wsnursery.testing import open_handler_client

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("space in name", {"extra_headers": [("X Token", "1")]}, "not a valid header name"),
    ("colon in name", {"extra_headers": [("X:Y", "1")]}, "not a valid header name"),
    ("empty name", {"extra_headers": [("", "1")]}, "not a valid header name"),
    ("newline in value", {"extra_headers": [("X-A", "1\r\nX-B: 2")]}, "control character"),
    ("NUL in value", {"extra_headers": [("X-A", "1\x002")]}, "control character"),
    ("not Latin-1", {"extra_headers": [("X-A", "snow ☃")]}, "Latin-1"),
    ("Host again", {"extra_headers": [("Host", "example.com")]}, "sets Host itself"),
    ("a key of our own", {"extra_headers": [("Sec-WebSocket-Key", "x")]}, "itself"),
    ("subprotocol with a space", {"subprotocols": ["chat v2"]}, "subprotocol"),
    ("empty subprotocol", {"subprotocols": [""]}, "subprotocol"),
]


async def _via_open_websocket(port: int, **kw: Any) -> None:
    async with open_websocket("127.0.0.1", port, "/", **kw):
        pass


async def _via_open_websocket_url(port: int, **kw: Any) -> None:
    async with open_websocket_url(f"ws://127.0.0.1:{port}/", **kw):
        pass


async def _in_a_nursery(connect: Callable[..., Any], *args: Any, **kw: Any) -> None:
    """``connect(nursery, *args)``; its error is raised outside the caller's own nursery."""
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        try:
            await connect(nursery, *args, **kw)
        except Exception as exc:
            error = exc
    if error is not None:
        raise error


async def _via_connect_websocket(port: int, **kw: Any) -> None:
    await _in_a_nursery(connect_websocket, "127.0.0.1", port, "/", **kw)


async def _via_connect_websocket_url(port: int, **kw: Any) -> None:
    await _in_a_nursery(connect_websocket_url, f"ws://127.0.0.1:{port}/", **kw)


async def _via_reconnecting(port: int, **kw: Any) -> None:
    async with open_reconnecting_websocket(f"ws://127.0.0.1:{port}/", **kw) as ws:
        await ws.wait_open()


async def _via_handler_client(port: int, **kw: Any) -> None:
    async def handler(request: Any) -> None:
        await request.accept()

    async with open_handler_client(handler, "/", **kw):
        pass


ENTRY_POINTS: list[Callable[..., Any]] = [
    _via_open_websocket,
    _via_open_websocket_url,
    _via_connect_websocket,
    _via_connect_websocket_url,
    _via_reconnecting,
    _via_handler_client,
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__[5:])
@pytest.mark.parametrize(("options", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_headers_or_subprotocols_are_a_value_error_before_connecting(
    entry: Callable[..., Any], options: dict[str, Any], message: str
) -> None:
    with trio.fail_after(5), pytest.raises(ValueError, match=message) as caught:
        await entry(closed_port(), **options)
    assert type(caught.value) is ValueError  # itself, never inside a group


async def test_good_headers_still_reach_the_server() -> None:
    seen: list[tuple[str | None, list[str]]] = []

    async def handler(request: Any) -> None:
        seen.append((request.headers.get("x-token"), request.subprotocols))
        await request.accept(subprotocol="chat.v2")

    extra = [("X-Token", "a b\tc"), (b"X-Raw", b"\xe9")]
    async with open_handler_client(handler, "/", extra_headers=extra, subprotocols=["chat.v2"]):
        pass
    assert seen == [("a b\tc", ["chat.v2"])]
