"""Interoperability over real TCP on 127.0.0.1 with independent implementations.

Seven pairings: wsnursery's client against a ``websockets`` asyncio server (in a
thread with its own event loop), a ``websockets.trio`` server and a trio-websocket
server; and a ``websockets`` sync client (in a thread), a ``websockets`` asyncio
client (in a thread), a ``websockets.trio`` client and a trio-websocket client
against wsnursery's server.

Every server runs the same small command protocol (``command_loop``): it echoes
messages, answers ``cmd:info`` with what it negotiated, pings the client on
``cmd:ping``, closes with a code and reason on ``cmd:close:CODE:REASON``, and
records the close code and reason it saw when the client closed. Every client
and server is wrapped in the same small adapter interface (send, recv, ping,
close, info), so that each scenario is written once and run for every pairing.
trio-websocket does not implement permessage-deflate: with it, compression is
expected to stay off.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio
import trio_websocket
from websockets.asyncio.client import connect as ws_asyncio_connect
from websockets.asyncio.server import serve as ws_asyncio_serve
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.sync.client import connect as ws_sync_connect
from websockets.trio.client import connect as ws_trio_connect
from websockets.trio.server import serve as ws_trio_serve

import wsnursery
from _helpers import HOST, Recorder

TIMEOUT = 10  # seconds: the hard cap of every test
BIG = 16 * 2**20  # the 16 MiB message; every limit is raised to exactly this
SERVER_SUBPROTOCOLS = ("chat.v1", "chat.v0")
MESSAGES = [
    "hello",
    b"\x00\x01\x02binary\xff",
    "",
    b"",
    "héllo wörld ☃ 日本語 🎉 \u0000 \U0010ffff",
]
CLIENT_REASON = "client bye ☃"
SERVER_REASON = "server bye 🎉"

Message = str | bytes


class PeerClosed(Exception):
    """Raised by an adapter's recv() once the connection is closed."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def choose_subprotocol(offered: Sequence[str]) -> str | None:
    return next((p for p in SERVER_SUBPROTOCOLS if p in offered), None)


def cleanup_scope() -> trio.CancelScope:
    """Shielded, but bounded: cleanup runs even after a fail_after fired."""
    return trio.CancelScope(shield=True, deadline=trio.current_time() + 5)


# -- adapters: one interface over every implementation -----------------------------


class OurConn:
    """wsnursery's WebSocketConnection (either side)."""

    def __init__(self, conn: wsnursery.WebSocketConnection) -> None:
        self.raw = conn

    async def send(self, message: Message) -> None:
        await self.raw.send_message(message)

    async def recv(self) -> Message:
        try:
            return await self.raw.get_message()
        except wsnursery.ConnectionClosed as exc:
            reason = exc.reason
            # The exception class follows the code: OK for 1000/1001/1005.
            ok = isinstance(exc, wsnursery.ConnectionClosedOK)
        assert ok is (reason.code in (1000, 1001, 1005)), reason
        raise PeerClosed(reason.code, reason.reason)

    async def ping(self, payload: bytes) -> None:
        await self.raw.ping(payload)

    async def close(self, code: int, reason: str) -> None:
        await self.raw.aclose(code, reason)
        assert self.raw.closed == wsnursery.CloseReason(code, reason, initiated_by_peer=False)

    async def info(self) -> dict[str, Any]:
        return {
            "subprotocol": self.raw.subprotocol,
            "compression": bool(self.raw.extensions),
            "extensions_header": self.raw.response_headers.get("Sec-WebSocket-Extensions"),
        }


class WsConn:
    """A ``websockets`` asyncio or trio connection (either side), used in its own loop."""

    def __init__(self, ws: Any, flavour: str) -> None:
        self.raw = ws
        self.flavour = flavour

    async def send(self, message: Message) -> None:
        await self.raw.send(message)

    async def recv(self) -> Message:
        try:
            return await self.raw.recv()
        except WsConnectionClosed as exc:
            raise PeerClosed(*_ws_received_close(exc)) from None

    async def ping(self, payload: bytes) -> None:
        waiter = await self.raw.ping(payload)
        if self.flavour == "trio":
            await waiter.wait()
        else:
            await waiter

    async def close(self, code: int, reason: str) -> None:
        if self.flavour == "trio":
            await self.raw.aclose(code, reason)
        else:
            await self.raw.close(code, reason)

    async def info(self) -> dict[str, Any]:
        return _ws_info(self.raw)


def _ws_received_close(exc: WsConnectionClosed) -> tuple[int, str]:
    return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (1006, "")


def _ws_info(ws: Any) -> dict[str, Any]:
    response = getattr(ws, "response", None)
    return {
        "subprotocol": ws.subprotocol,
        "compression": any(isinstance(e, PerMessageDeflate) for e in ws.protocol.extensions),
        "extensions_header": response.headers.get("Sec-WebSocket-Extensions") if response else None,
    }


class WsSyncConn:
    """A ``websockets.sync`` client connection, driven from trio through worker threads."""

    def __init__(self, ws: Any) -> None:
        self.raw = ws

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)

    async def send(self, message: Message) -> None:
        await self._run(self.raw.send, message)

    async def recv(self) -> Message:
        try:
            return await self._run(partial(self.raw.recv, timeout=TIMEOUT))
        except WsConnectionClosed as exc:
            raise PeerClosed(*_ws_received_close(exc)) from None

    async def ping(self, payload: bytes) -> None:
        pong = await self._run(self.raw.ping, payload)
        assert await self._run(pong.wait, TIMEOUT), "no pong"

    async def close(self, code: int, reason: str) -> None:
        await self._run(self.raw.close, code, reason)

    async def info(self) -> dict[str, Any]:
        return _ws_info(self.raw)


class TrioWsConn:
    """A trio-websocket connection (either side)."""

    def __init__(self, conn: trio_websocket.WebSocketConnection) -> None:
        self.raw = conn

    async def send(self, message: Message) -> None:
        await self.raw.send_message(message)

    async def recv(self) -> Message:
        try:
            return await self.raw.get_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            assert reason is not None
            raise PeerClosed(reason.code, reason.reason or "") from None

    async def ping(self, payload: bytes) -> None:
        await self.raw.ping(payload)

    async def close(self, code: int, reason: str) -> None:
        await self.raw.aclose(code, reason)

    async def info(self) -> dict[str, Any]:
        header = None
        for name, value in self.raw.handshake_headers:
            if name.lower() == b"sec-websocket-extensions":
                header = value.decode("latin-1")
        return {
            "subprotocol": self.raw.subprotocol,
            "compression": False,
            "extensions_header": header,
        }


class AsyncioThread:
    """An asyncio event loop in a thread of its own; trio awaits coroutines run there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="asyncio peer", daemon=True
        )
        self.thread.start()

    async def call(self, coro: Coroutine[Any, Any, Any], timeout: float = TIMEOUT) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return await trio.to_thread.run_sync(future.result, timeout, abandon_on_cancel=True)
        except trio.Cancelled:
            future.cancel()
            raise

    async def aclose(self) -> None:
        async def cancel_everything() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            await self.call(cancel_everything(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            await trio.to_thread.run_sync(self.thread.join, 5)
            assert not self.thread.is_alive()
            self.loop.close()


class InLoop:
    """Runs an adapter that lives in an :class:`AsyncioThread`'s loop, from trio."""

    def __init__(self, thread: AsyncioThread, inner: WsConn) -> None:
        self.thread = thread
        self.inner = inner

    async def send(self, message: Message) -> None:
        await self.thread.call(self.inner.send(message))

    async def recv(self) -> Message:
        return await self.thread.call(self.inner.recv())

    async def ping(self, payload: bytes) -> None:
        await self.thread.call(self.inner.ping(payload))

    async def close(self, code: int, reason: str) -> None:
        await self.thread.call(self.inner.close(code, reason))

    async def info(self) -> dict[str, Any]:
        return await self.thread.call(self.inner.info())


# -- servers -------------------------------------------------------------------------


async def command_loop(conn: Any, closes: Recorder) -> None:
    """What every server does with a connection. Library-neutral: runs on trio and asyncio."""
    while True:
        try:
            message = await conn.recv()
        except PeerClosed as exc:
            closes.put((exc.code, exc.reason))
            return
        if message == "cmd:info":
            info = await conn.info()
            await conn.send(json.dumps({k: info[k] for k in ("subprotocol", "compression")}))
        elif message == "cmd:ping":
            await conn.ping(b"server ping")
            await conn.send("cmd:pinged")
        elif isinstance(message, str) and message.startswith("cmd:close:"):
            _, _, code, reason = message.split(":", 3)
            await conn.close(int(code), reason)
            return
        else:
            await conn.send(message)


@dataclass
class ServerCtl:
    url: str
    #: (code, reason) of each close frame the server's handler saw.
    closes: Recorder
    #: Stop the server: open connections get 1001.
    shutdown: Callable[[], Awaitable[None]]


@asynccontextmanager
async def serve_ours(compression: bool) -> AsyncIterator[ServerCtl]:
    closes = Recorder()

    async def handler(request: wsnursery.WebSocketRequest) -> None:
        conn = await request.accept(subprotocol=choose_subprotocol(request.subprotocols))
        await command_loop(OurConn(conn), closes)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                wsnursery.serve_websocket,
                handler,
                HOST,
                0,
                max_message_size=BIG,
                compression=compression,
                ping_interval=None,
                close_timeout=2,
            )
        )
        yield ServerCtl(f"ws://{HOST}:{server.port}/", closes, server.aclose)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def serve_ws_asyncio(compression: bool) -> AsyncIterator[ServerCtl]:
    closes = Recorder()
    thread = AsyncioThread()

    async def handler(ws: Any) -> None:
        await command_loop(WsConn(ws, "asyncio"), closes)

    async def start() -> Any:
        return await ws_asyncio_serve(
            handler,
            HOST,
            0,
            select_subprotocol=lambda _conn, offered: choose_subprotocol(offered),
            compression="deflate" if compression else None,
            max_size=BIG,
            ping_interval=None,
            close_timeout=2,
        )

    async def stop(server: Any) -> None:
        server.close()
        await server.wait_closed()

    try:
        server = await thread.call(start())
        port = server.sockets[0].getsockname()[1]
        try:
            yield ServerCtl(f"ws://{HOST}:{port}/", closes, lambda: thread.call(stop(server)))
        finally:
            with cleanup_scope():
                await thread.call(stop(server))
    finally:
        with cleanup_scope():
            await thread.aclose()


@asynccontextmanager
async def serve_ws_trio(compression: bool) -> AsyncIterator[ServerCtl]:
    closes = Recorder()

    async def handler(ws: Any) -> None:
        await command_loop(WsConn(ws, "trio"), closes)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                ws_trio_serve,
                handler,
                0,
                host=HOST,
                select_subprotocol=lambda _conn, offered: choose_subprotocol(offered),
                compression="deflate" if compression else None,
                max_size=BIG,
                ping_interval=None,
                close_timeout=2,
            )
        )
        port = server.listeners[0].socket.getsockname()[1]
        yield ServerCtl(f"ws://{HOST}:{port}/", closes, server.aclose)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def serve_trio_websocket(compression: bool) -> AsyncIterator[ServerCtl]:
    # trio-websocket has no permessage-deflate: `compression` cannot apply.
    closes = Recorder()
    conns: set[trio_websocket.WebSocketConnection] = set()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        conn = await request.accept(subprotocol=choose_subprotocol(request.proposed_subprotocols))
        conns.add(conn)
        await command_loop(TrioWsConn(conn), closes)

    async def shutdown() -> None:
        # trio-websocket has no graceful server shutdown: close each connection with 1001.
        async with trio.open_nursery() as closers:
            for conn in list(conns):
                closers.start_soon(conn.aclose, 1001, "server shutting down")

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                handler,
                HOST,
                0,
                ssl_context=None,
                max_message_size=BIG,
                disconnect_timeout=2,
            )
        )
        yield ServerCtl(f"ws://{HOST}:{server.port}/", closes, shutdown)
        nursery.cancel_scope.cancel()


# -- clients -------------------------------------------------------------------------


@asynccontextmanager
async def connect_ours(
    url: str, compression: bool, subprotocols: Sequence[str]
) -> AsyncIterator[Any]:
    async with wsnursery.open_websocket_url(
        url,
        subprotocols=subprotocols,
        compression=compression,
        max_message_size=BIG,
        ping_interval=None,
        close_timeout=2,
    ) as conn:
        yield OurConn(conn)


def _ws_client_options(compression: bool, subprotocols: Sequence[str]) -> dict[str, Any]:
    return {
        "subprotocols": list(subprotocols) or None,
        "compression": "deflate" if compression else None,
        "max_size": BIG,
        "proxy": None,
        "ping_interval": None,
        "close_timeout": 2,
        "open_timeout": 5,
    }


@asynccontextmanager
async def connect_ws_trio(
    url: str, compression: bool, subprotocols: Sequence[str]
) -> AsyncIterator[Any]:
    async with ws_trio_connect(url, **_ws_client_options(compression, subprotocols)) as ws:
        yield WsConn(ws, "trio")


@asynccontextmanager
async def connect_ws_asyncio(
    url: str, compression: bool, subprotocols: Sequence[str]
) -> AsyncIterator[Any]:
    thread = AsyncioThread()

    async def open_() -> Any:
        return await ws_asyncio_connect(url, **_ws_client_options(compression, subprotocols))

    try:
        ws = await thread.call(open_())
        try:
            yield InLoop(thread, WsConn(ws, "asyncio"))
        finally:
            with cleanup_scope():
                await thread.call(ws.close())
    finally:
        with cleanup_scope():
            await thread.aclose()


@asynccontextmanager
async def connect_ws_sync(
    url: str, compression: bool, subprotocols: Sequence[str]
) -> AsyncIterator[Any]:
    ws = await trio.to_thread.run_sync(
        partial(ws_sync_connect, url, legacy=True, **_ws_client_options(compression, subprotocols)),
        abandon_on_cancel=True,
    )
    try:
        yield WsSyncConn(ws)
    finally:
        with cleanup_scope():
            await trio.to_thread.run_sync(ws.close, abandon_on_cancel=True)


@asynccontextmanager
async def connect_trio_websocket(
    url: str, compression: bool, subprotocols: Sequence[str]
) -> AsyncIterator[Any]:
    async with trio_websocket.open_websocket_url(
        url, subprotocols=subprotocols, max_message_size=BIG, disconnect_timeout=2
    ) as conn:
        yield TrioWsConn(conn)


SERVERS = {
    "wsnursery": serve_ours,
    "websockets_asyncio": serve_ws_asyncio,
    "websockets_trio": serve_ws_trio,
    "trio_websocket": serve_trio_websocket,
}
CLIENTS = {
    "wsnursery": connect_ours,
    "websockets_sync": connect_ws_sync,
    "websockets_asyncio": connect_ws_asyncio,
    "websockets_trio": connect_ws_trio,
    "trio_websocket": connect_trio_websocket,
}
PAIRS = [
    ("wsnursery", "websockets_asyncio"),
    ("wsnursery", "websockets_trio"),
    ("wsnursery", "trio_websocket"),
    ("websockets_sync", "wsnursery"),
    ("websockets_asyncio", "wsnursery"),
    ("websockets_trio", "wsnursery"),
    ("trio_websocket", "wsnursery"),
]
pairs = pytest.mark.parametrize(
    "pair", PAIRS, ids=[f"{client}-client-vs-{server}-server" for client, server in PAIRS]
)
compression_on_off = pytest.mark.parametrize("compression", [True, False], ids=["deflate", "plain"])


@asynccontextmanager
async def open_pair(
    pair: tuple[str, str], *, compression: bool = True, subprotocols: Sequence[str] = ()
) -> AsyncIterator[tuple[Any, ServerCtl]]:
    client_kind, server_kind = pair
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(SERVERS[server_kind](compression))
        client = await stack.enter_async_context(
            CLIENTS[client_kind](server.url, compression, subprotocols)
        )
        yield client, server


async def roundtrip(client: Any, message: Message) -> Message:
    await client.send(message)
    return await client.recv()


async def closed_by_server(client: Any) -> tuple[int, str]:
    """Read until the server's close arrives; return its code and reason."""
    while True:
        try:
            await client.recv()
        except PeerClosed as exc:
            return exc.code, exc.reason


def expect_compression(pair: tuple[str, str], compression: bool) -> bool:
    return compression and "trio_websocket" not in pair


# -- scenarios -----------------------------------------------------------------------


@pairs
@compression_on_off
async def test_messages_and_compression_negotiation(
    pair: tuple[str, str], compression: bool
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_pair(pair, compression=compression) as (client, server):
            expected = expect_compression(pair, compression)
            info = await client.info()
            server_info = json.loads(await roundtrip(client, "cmd:info"))
            assert info["compression"] is expected
            assert server_info["compression"] is expected
            header = info["extensions_header"]
            if expected:
                assert header is not None
                assert header.startswith("permessage-deflate"), header
            else:
                assert header is None
            assert info["subprotocol"] is None
            assert server_info["subprotocol"] is None

            for message in MESSAGES:
                echoed = await roundtrip(client, message)
                assert type(echoed) is type(message)
                assert echoed == message
            # Several messages in flight at once, and a compressible one.
            for message in MESSAGES:
                await client.send(message)
            for message in MESSAGES:
                assert await client.recv() == message
            text = "wsnursery interop ☃ " * 5000
            assert await roundtrip(client, text) == text

            await client.close(1000, "")
            assert await server.closes.get() == (1000, "")


@pairs
@compression_on_off
async def test_16_mib_message_both_ways(pair: tuple[str, str], compression: bool) -> None:
    if compression:
        # Text (non-ASCII) that deflate shrinks: exactly 16 MiB of UTF-8.
        unit = "wsnursery ☃ ünïcödé 🎉 日本語 "
        text = unit * (BIG // len(unit.encode()))
        message: Message = text + "x" * (BIG - len(text.encode()))
        assert len(message.encode()) == BIG
    else:
        message = os.urandom(BIG)
    with trio.fail_after(TIMEOUT):
        async with open_pair(pair, compression=compression) as (client, server):
            echoed = await roundtrip(client, message)
            assert type(echoed) is type(message)
            assert len(echoed) == len(message)
            assert echoed == message
            # Still usable afterwards.
            assert await roundtrip(client, "after") == "after"
            await client.close(1000, "")
            assert await server.closes.get() == (1000, "")


@pairs
async def test_ping_pong_both_ways(pair: tuple[str, str]) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_pair(pair) as (client, server):
            # The client pings; the server's pong (same payload) wakes it.
            await client.ping(b"client ping \x00\xff")
            # The server pings; the client's pong wakes the server, which says so.
            assert await roundtrip(client, "cmd:ping") == "cmd:pinged"
            await client.ping(b"")
            await client.ping(b"x" * 125)
            assert await roundtrip(client, "still open") == "still open"
            await client.close(1000, "")
            assert await server.closes.get() == (1000, "")


@pairs
@pytest.mark.parametrize(
    "how", ["client-1000", "client-4000-reason", "server-4000-reason", "server-shutdown-1001"]
)
async def test_close_codes_and_reasons(pair: tuple[str, str], how: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_pair(pair) as (client, server):
            assert await roundtrip(client, "hello") == "hello"
            if how == "client-1000":
                await client.close(1000, "")
                assert await server.closes.get() == (1000, "")
            elif how == "client-4000-reason":
                await client.close(4000, CLIENT_REASON)
                assert await server.closes.get() == (4000, CLIENT_REASON)
            elif how == "server-4000-reason":
                await client.send(f"cmd:close:4000:{SERVER_REASON}")
                assert await closed_by_server(client) == (4000, SERVER_REASON)
                if isinstance(client, OurConn):
                    assert client.raw.closed == wsnursery.CloseReason(
                        4000, SERVER_REASON, initiated_by_peer=True
                    )
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.shutdown)
                    code, _reason = await closed_by_server(client)
                assert code == 1001
                if isinstance(client, OurConn):
                    assert client.raw.closed is not None
                    assert client.raw.closed.code == 1001
                    assert client.raw.closed.initiated_by_peer


@pairs
@pytest.mark.parametrize(
    ("offered", "expected"),
    [(("chat.v2", "chat.v1"), "chat.v1"), (("chat.v9",), None)],
    ids=["common", "none-in-common"],
)
async def test_subprotocol_negotiation(
    pair: tuple[str, str], offered: tuple[str, ...], expected: str | None
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_pair(pair, subprotocols=offered) as (client, server):
            info = await client.info()
            server_info = json.loads(await roundtrip(client, "cmd:info"))
            assert info["subprotocol"] == expected
            assert server_info["subprotocol"] == expected
            await client.close(1000, "")
            assert await server.closes.get() == (1000, "")
