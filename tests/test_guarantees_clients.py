"""Issue 10: every client-side context manager, through every way a block can end.

Subjects: open_websocket, open_websocket_url, open_reconnecting_websocket (real
TCP on 127.0.0.1), open_handler_client, open_websocket_pair (in memory), a
standalone Broadcaster, with and without a MemoryBackplane. Endings: normal
exit, the body raises, the body raises while an outer scope cancels it, an
outer cancel, an outer deadline, the peer vanishing (an RST), the peer never
answering the close. For each: the exact exception (never a group), its
context kept, no task left behind, and the exit within its documented time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import socket
import struct
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

import wsnursery
from _helpers import HOST, assert_no_leftover_tasks, count_tasks, read_head, serving
from wsnursery import (
    Broadcaster,
    MemoryBackplane,
    WebSocketRequest,
    open_reconnecting_websocket,
    open_websocket,
    open_websocket_url,
)
from wsnursery.testing import open_handler_client, open_websocket_pair

CLOSE_TIMEOUT = 0.5
MARGIN = 1.0  # a shared, busy machine: generous, still far below any hang

# -- peers ---------------------------------------------------------------------------------


async def echo(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


async def _upgrade(stream: trio.SocketStream) -> None:
    """Answer a WebSocket upgrade by hand: 101, no extensions."""
    head, _ = await read_head(stream)
    found = re.search(rb"(?i)^sec-websocket-key:\s*(\S+)", head, re.MULTILINE)
    assert found is not None, head
    accept = base64.b64encode(
        hashlib.sha1(found.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


async def vanishing_peer(stream: trio.SocketStream) -> None:
    """Completes the upgrade, then resets the connection (SO_LINGER 0)."""
    await _upgrade(stream)
    await trio.sleep(0.05)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def deaf_peer(stream: trio.SocketStream) -> None:
    """Completes the upgrade, then never reads or answers anything."""
    await _upgrade(stream)
    await trio.sleep_forever()


class StuckHooks(wsnursery.WebSocketHandler):
    """In memory, the same deaf peer: busy in a hook, so nothing reads the close."""

    async def on_text(self, conn: Any, text: str) -> None:
        await trio.sleep_forever()


@asynccontextmanager
async def raw_server(handler: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=HOST))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async with serving(echo, close_timeout=CLOSE_TIMEOUT) as server:
        yield server.port


# -- subjects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One public context manager: how to open it and how to use what it yields."""

    name: str
    open: Callable[..., AbstractAsyncContextManager[Any]]  # (port, **options)
    network: bool = False
    use: Callable[[Any], Awaitable[None]] = field(default=lambda thing: _nothing())

    def __str__(self) -> str:
        return self.name


async def _nothing() -> None:
    await trio.lowlevel.checkpoint()


async def _round_trip(ws: Any) -> None:
    await ws.send_message("hi")
    assert await ws.get_message() == "hi"


@asynccontextmanager
async def _pair(port: int, **options: Any) -> AsyncIterator[Any]:
    async with open_websocket_pair(close_timeout=CLOSE_TIMEOUT, **options) as pair:
        yield pair


async def _pair_round_trip(pair: Any) -> None:
    client, server = pair
    await client.send_message("hi")
    assert await server.get_message() == "hi"


@asynccontextmanager
async def _broadcaster(port: int, **options: Any) -> AsyncIterator[Any]:
    async with Broadcaster(**options) as broadcaster:
        yield broadcaster


@asynccontextmanager
async def _memory_broadcaster(port: int, **options: Any) -> AsyncIterator[Any]:
    async with Broadcaster(backplane=MemoryBackplane(), **options) as broadcaster:
        yield broadcaster


SUBJECTS = [
    Subject(
        "open_websocket",
        lambda port, **o: open_websocket(HOST, port, close_timeout=CLOSE_TIMEOUT, **o),
        network=True,
        use=_round_trip,
    ),
    Subject(
        "open_websocket_url",
        lambda port, **o: open_websocket_url(
            f"ws://{HOST}:{port}/", close_timeout=CLOSE_TIMEOUT, **o
        ),
        network=True,
        use=_round_trip,
    ),
    Subject(
        "open_reconnecting_websocket",
        lambda port, **o: open_reconnecting_websocket(
            f"ws://{HOST}:{port}/", close_timeout=CLOSE_TIMEOUT, **{"reconnect": False, **o}
        ),
        network=True,
        use=_round_trip,
    ),
    Subject(
        "open_handler_client",
        lambda port, **o: open_handler_client(
            o.pop("handler", echo), close_timeout=CLOSE_TIMEOUT, **o
        ),
        use=_round_trip,
    ),
    Subject("open_websocket_pair", _pair, use=_pair_round_trip),
    Subject("Broadcaster", _broadcaster),
    Subject("Broadcaster(MemoryBackplane)", _memory_broadcaster),
]


# -- endings -------------------------------------------------------------------------------
# Each runs one block of ``subject`` against the server on ``port`` and checks
# what came out; the caller bounds the time and counts the tasks.


def failing_cleanup() -> None:
    try:
        raise KeyError("the real context")
    except KeyError:
        raise ValueError("the block failed")  # noqa: B904 - the implicit context is the point


def check_user_error(error: BaseException) -> None:
    assert type(error) is ValueError, repr(error)  # not a group
    assert isinstance(error.__context__, KeyError)
    assert not error.__suppress_context__
    assert traceback.extract_tb(error.__traceback__)[-1].name == "failing_cleanup"


async def end_normally(subject: Subject, port: int) -> None:
    async with subject.open(port) as thing:
        await subject.use(thing)


async def end_body_raises(subject: Subject, port: int) -> None:
    try:
        async with subject.open(port) as thing:
            await subject.use(thing)
            failing_cleanup()
    except BaseException as exc:
        check_user_error(exc)
    else:
        raise AssertionError("nothing raised")


async def end_body_raises_while_cancelled(subject: Subject, port: int) -> None:
    try:
        with trio.CancelScope() as outer:
            async with subject.open(port) as thing:
                await subject.use(thing)
                try:
                    outer.cancel()
                    await trio.sleep(5)
                finally:
                    failing_cleanup()
    except BaseException as exc:
        check_user_error(exc)
    else:
        raise AssertionError("nothing raised")


async def end_outer_cancel(subject: Subject, port: int) -> None:
    with trio.CancelScope() as outer:
        async with subject.open(port) as thing:
            await subject.use(thing)
            outer.cancel()
            await trio.sleep(5)
    assert outer.cancelled_caught


async def end_outer_deadline(subject: Subject, port: int) -> None:
    with trio.move_on_after(0.5) as outer:
        async with subject.open(port) as thing:
            assert trio.current_effective_deadline() == outer.deadline
            await subject.use(thing)
            await trio.sleep(5)
    assert outer.cancelled_caught
    assert trio.current_time() - outer.deadline < CLOSE_TIMEOUT + MARGIN


async def end_peer_vanishes(subject: Subject, port: int) -> None:
    with pytest.raises(wsnursery.ConnectionClosed) as info:
        async with subject.open(port, ping_interval=None) as ws:
            await ws.get_message()
    assert type(info.value) is wsnursery.ConnectionClosedError
    assert info.value.reason.code == 1006


async def end_peer_never_answers_close(subject: Subject, port: int) -> None:
    options: dict[str, Any] = {"ping_interval": 20}
    if not subject.network:
        options["handler"] = StuckHooks()
    start = trio.current_time()
    async with subject.open(port, **options) as ws:
        if not subject.network:
            await ws.send_message("busy")  # keeps the handler's hook from reading
        await trio.sleep(0.05)
    assert trio.current_time() - start < CLOSE_TIMEOUT + MARGIN


@dataclass(frozen=True)
class Ending:
    run: Callable[[Subject, int], Awaitable[None]]
    server: Callable[[], AbstractAsyncContextManager[int]] = echo_server
    applies: Callable[[Subject], bool] = lambda subject: True

    def __str__(self) -> str:
        return self.run.__name__.removeprefix("end_")


ENDINGS = [
    Ending(end_normally),
    Ending(end_body_raises),
    Ending(end_body_raises_while_cancelled),
    Ending(end_outer_cancel),
    Ending(end_outer_deadline),
    Ending(
        end_peer_vanishes,
        functools.partial(raw_server, vanishing_peer),
        lambda subject: subject.network,
    ),
    Ending(
        end_peer_never_answers_close,
        functools.partial(raw_server, deaf_peer),
        lambda subject: subject.network or subject.name == "open_handler_client",
    ),
]


@pytest.mark.parametrize(
    ("subject", "ending"),
    [
        pytest.param(subject, ending, id=f"{subject}-{ending}")
        for subject in SUBJECTS
        for ending in ENDINGS
        if ending.applies(subject)
    ],
)
async def test_ending(subject: Subject, ending: Ending) -> None:
    baseline = count_tasks()
    with trio.fail_after(10):
        async with ending.server() as port:
            with trio.fail_after(5 * CLOSE_TIMEOUT + MARGIN):
                await ending.run(subject, port)
    await assert_no_leftover_tasks(baseline)
