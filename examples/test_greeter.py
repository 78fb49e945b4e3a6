"""Tests for greeter.py: over real sockets, and in memory.

    python -m pytest examples/test_greeter.py

Needs pytest and pytest-trio.
"""

from __future__ import annotations

import functools

import pytest
import trio
from greeter import IDLE_CLOSE_CODE, greeter

from wsnursery import (
    CloseCode,
    ConnectionClosedError,
    ConnectionRejected,
    WebSocketServer,
    open_websocket_url,
    serve_websocket,
)
from wsnursery.testing import open_handler_client, open_websocket_pair

pytestmark = pytest.mark.trio

TIME_LIMIT = 5.0  # real-socket tests use real time: a hang should fail, not stall


# -- over real sockets ---------------------------------------------------------


@pytest.fixture
async def server(nursery: trio.Nursery) -> WebSocketServer:
    # pytest-trio's nursery fixture is cancelled when the test ends, which
    # stops the server gracefully.
    server: WebSocketServer = await nursery.start(serve_websocket, greeter, "127.0.0.1", 0)
    return server


async def test_greets(server: WebSocketServer) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/greet") as conn:
            await conn.send_message("Ada")
            assert await conn.get_message() == "hello, Ada"


async def test_unknown_path_gets_404(server: WebSocketServer) -> None:
    with trio.fail_after(TIME_LIMIT), pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/nope"):
            pytest.fail("the handshake should not succeed")
    assert info.value.status_code == 404
    assert info.value.body == b"no such endpoint\n"


async def test_binary_message_closes_with_1003(server: WebSocketServer) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/greet") as conn:
            await conn.send_message(b"Ada")
            with pytest.raises(ConnectionClosedError) as info:
                await conn.get_message()
    assert info.value.reason.code == CloseCode.UNSUPPORTED_DATA
    assert info.value.reason.reason == "send your name as text"


async def test_handler_error_closes_with_1011(server: WebSocketServer) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/greet") as conn:
            await conn.send_message("")
            with pytest.raises(ConnectionClosedError) as info:
                await conn.get_message()
    assert info.value.reason.code == CloseCode.INTERNAL_ERROR


async def test_message_size_limit(nursery: trio.Nursery) -> None:
    small = await nursery.start(
        functools.partial(serve_websocket, greeter, "127.0.0.1", 0, max_message_size=1024)
    )
    with trio.fail_after(TIME_LIMIT):
        async with open_websocket_url(f"ws://127.0.0.1:{small.port}/greet") as conn:
            await conn.send_message("x" * 2000)
            with pytest.raises(ConnectionClosedError) as info:
                await conn.get_message()
    assert info.value.reason.code == CloseCode.MESSAGE_TOO_BIG


# -- in memory -----------------------------------------------------------------


async def test_greets_in_memory() -> None:
    async with open_handler_client(greeter, "/greet") as conn:
        await conn.send_message("Grace")
        assert await conn.get_message() == "hello, Grace"


async def test_idle_client_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    # With autojump_clock the 60 s of silence take no real time.
    async with open_handler_client(greeter, "/greet") as conn:
        reason = await conn.wait_closed()
    assert reason.code == IDLE_CLOSE_CODE
    assert reason.initiated_by_peer


async def test_unknown_path_in_memory() -> None:
    with pytest.raises(ConnectionRejected) as info:
        async with open_handler_client(greeter, "/nope"):
            pytest.fail("the handshake should not succeed")
    assert info.value.status_code == 404


async def test_connection_pair() -> None:
    async with open_websocket_pair() as (client, server):
        await client.send_message("ping?")
        assert await server.get_message() == "ping?"
        await server.send_message(b"pong!")
        assert await client.get_message() == b"pong!"
