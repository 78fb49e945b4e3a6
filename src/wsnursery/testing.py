"""Helpers for testing code that uses wsnursery, with no network at all.

Both helpers run the real protocol, handshake and connection code over
:func:`trio.testing.memory_stream_pair`, so a test exercises what production
runs, minus the sockets::

    from wsnursery.testing import open_handler_client

    async def test_echo():
        async with open_handler_client(echo_handler, "/echo") as client:
            await client.send_message("hi")
            assert await client.get_message() == "hi"
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from ._client import BlockExit, client_connection, client_handshake, upgrade
from ._connection import WebSocketConnection
from ._request import WebSocketRequest
from ._sansio.headers import HeaderPairs
from ._server import Handler, WebSocketServer
from ._util import collapse_exception_groups, graceful_scope

__all__ = ["open_handler_client", "open_websocket_pair"]


@asynccontextmanager
async def open_handler_client(
    handler: Handler,
    resource: str = "/",
    *,
    subprotocols: Sequence[str] = (),
    extra_headers: HeaderPairs = (),
    compression: bool = False,
    max_message_size: int | None = 2**20,
    max_queue: int = 16,
    ping_interval: float | None = None,
    ping_timeout: float | None = None,
    close_timeout: float | None = 10.0,
    server_options: dict[str, Any] | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """Run ``handler`` as a server would, and yield a client connected to it.

    The server side is the real :class:`~wsnursery.WebSocketServer` code
    serving one in-memory stream, made with ``server_options`` (the keyword
    arguments of :class:`~wsnursery.WebSocketServer`, such as its own
    ``max_message_size``); the other keyword arguments are the client's, as
    for :func:`~wsnursery.connect_websocket`. A rejected handshake raises
    :exc:`~wsnursery.ConnectionRejected` from the ``async with``, as a real
    client would. Keep-alive is off by default so tests with
    ``autojump_clock`` stay deterministic.

    As with :func:`~wsnursery.open_websocket`: leaving the block closes the
    client with 1000 (1011 if the block raised, 1001 if it was cancelled or
    ran past the caller's deadline, which is visible inside the block),
    waiting at most ``close_timeout`` for the server's answer; then the
    handler is cancelled if it is still running, so leaving never waits for
    a handler that outlives the client. The block's exception comes out as
    itself, never inside an ExceptionGroup.

    Cancellation:
        Both sides are closed before the block's cancellation goes on.
    """
    # Keep-alive off on both sides unless asked for (autojump_clock friendly).
    server = WebSocketServer(handler, [], **{"ping_interval": None, **(server_options or {})})
    client_stream, server_stream = trio.testing.memory_stream_pair()
    handshake = client_handshake(
        "testserver",
        resource,
        subprotocols=subprotocols,
        extra_headers=extra_headers,
        compression=compression,
        max_message_size=max_message_size,
    )
    with collapse_exception_groups():
        async with graceful_scope() as body, trio.open_nursery() as nursery:
            conn: WebSocketConnection | None = None
            left = BlockExit(body)
            try:
                with body, left:
                    nursery.start_soon(server.serve_stream, server_stream)
                    await upgrade(client_stream, handshake)
                    conn = client_connection(
                        client_stream,
                        handshake,
                        max_message_size=max_message_size,
                        max_queue=max_queue,
                        ping_interval=ping_interval,
                        ping_timeout=ping_timeout,
                        close_timeout=close_timeout,
                    )
                    conn._start(nursery)
                    yield conn
            finally:
                # Shielded by graceful_scope; bounded by close_timeout. Then
                # nothing waits for the handler (it may outlive the client) or
                # the next keep-alive tick.
                if conn is not None:
                    await conn.aclose(left.code)
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_websocket_pair(
    *,
    resource: str = "/",
    subprotocol: str | None = None,
    compression: bool = False,
    max_message_size: int | None = 2**20,
    max_queue: int = 16,
    ping_interval: float | None = None,
    ping_timeout: float | None = None,
    close_timeout: float | None = 10.0,
) -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection]]:
    """Yield ``(client, server)``: two connected :class:`~wsnursery.WebSocketConnection`.

    Both use the same options. Whatever one sends, the other receives. Both are
    closed when the block ends, as for :func:`open_handler_client` (promptly:
    at most ``close_timeout``; the block's exception comes out as itself).

    Cancellation:
        Both sides are closed before the block's cancellation goes on.
    """
    accepted: trio.MemorySendChannel[WebSocketConnection]
    accepted, receive_accepted = trio.open_memory_channel[WebSocketConnection](1)
    finished = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept(subprotocol=subprotocol)
        await accepted.send(conn)
        await finished.wait()
        await conn.wait_closed()

    subprotocols = [subprotocol] if subprotocol else []
    options: dict[str, Any] = {
        "compression": compression,
        "max_message_size": max_message_size,
        "max_queue": max_queue,
        "ping_interval": ping_interval,
        "ping_timeout": ping_timeout,
        "close_timeout": close_timeout,
    }
    # open_handler_client unwraps exception groups and bounds the exit already.
    async with open_handler_client(
        handler,
        resource,
        subprotocols=subprotocols,
        compression=compression,
        max_message_size=max_message_size,
        max_queue=max_queue,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        server_options=options,
    ) as client:
        server_conn = await receive_accepted.receive()
        try:
            yield client, server_conn
        finally:
            finished.set()
