"""The reconnecting client over real TCP on 127.0.0.1.

Servers come and go on a fixed port; the waits between attempts are checked on
trio's clock: tests taking the ``clock`` fixture run on a MockClock that jumps
ahead whenever every task is blocked (after 20 ms of real idleness, so that
loopback I/O always lands first), and times read with ``trio.current_time()``
are exact.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import logging
import random
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from websockets.asyncio.server import serve as ws_asyncio_serve

import wsnursery
from _helpers import (
    HOST,
    assert_no_leftover_tasks,
    closed_port,
    count_tasks,
    read_head,
    wait_until,
)
from wsnursery import (
    NONE,
    Backoff,
    ClientEvent,
    CloseEvent,
    ConnectionClosed,
    ConnectionClosedOK,
    ConnectionRejected,
    ErrorEvent,
    MessageEvent,
    OpenEvent,
    ReadyState,
    ReconnectingWebSocket,
    TransportError,
    WebSocketRequest,
    open_reconnecting_websocket,
)

TIMEOUT = 10  # seconds (virtual ones under the mock clock): the cap of every test
NO_JITTER = Backoff(jitter=0)
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.02)


# -- helpers ---------------------------------------------------------------------------


class Log:
    """An ``on_event`` callback that keeps (trio time, event) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[float, ClientEvent]] = []
        self._changed = trio.Event()

    def __call__(self, event: ClientEvent) -> None:
        self.items.append((trio.current_time(), event))
        self._changed.set()
        self._changed = trio.Event()

    def of(self, kind: type[Any]) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.items if isinstance(e, kind)]

    def events(self) -> list[ClientEvent]:
        return [e for _t, e in self.items]

    async def wait_for(self, kind: type[Any], count: int = 1) -> list[tuple[float, Any]]:
        while len(self.of(kind)) < count:
            await self._changed.wait()
        return self.of(kind)


@asynccontextmanager
async def ws_server(
    handler: Callable[[WebSocketRequest], Awaitable[None]], port: int = 0, **kwargs: Any
) -> AsyncIterator[wsnursery.WebSocketServer]:
    """wsnursery's server in a nursery; leaving the block stops it (1001 to every client)."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                wsnursery.serve_websocket,
                handler,
                HOST,
                port,
                ping_interval=None,
                close_timeout=1,
                **kwargs,
            )
        )
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def served_client(
    handler: Callable[[WebSocketRequest], Awaitable[None]], **kwargs: Any
) -> AsyncIterator[ReconnectingWebSocket]:
    """A reconnecting client (``kwargs`` its options) of ``ws_server(handler)``."""
    async with (
        ws_server(handler) as server,
        open_reconnecting_websocket(url_of(server.port), **kwargs) as client,
    ):
        yield client


async def serve_until_cancelled(
    handler: Callable[[WebSocketRequest], Awaitable[None]], port: int, task_status: Any
) -> None:
    """``ws_server`` for ``nursery.start``, which returns (its cancel scope, its port)."""
    with trio.CancelScope() as scope:
        async with ws_server(handler, port) as server:
            task_status.started((scope, server.port))
            await trio.sleep_forever()


@asynccontextmanager
async def raw_server(handler: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    """A TCP server whose handler does everything by hand; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def answer_upgrade(stream: trio.abc.Stream) -> bytes:
    """Read an upgrade request and answer 101 (no extension, no subprotocol)."""
    head, rest = await read_head(stream)
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    return rest


async def swallow(stream: trio.abc.Stream) -> None:
    """Read and discard until EOF: a peer that answers nothing (no pong, no close)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


async def echo(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


def url_of(port: int, path: str = "/") -> str:
    return f"ws://{HOST}:{port}{path}"


def close_recorder() -> tuple[Callable[[WebSocketRequest], Awaitable[None]], list[int]]:
    """A handler that accepts and waits, and the close code of each connection it served."""
    closes: list[int] = []

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        closes.append((await conn.wait_closed()).code)

    return handler, closes


async def wait_for_unread(client: ReconnectingWebSocket, count: int) -> None:
    """Until the current connection holds ``count`` messages not read yet."""
    await wait_until(
        lambda: client.connection is not None and len(client.connection._proto.messages) == count
    )


# -- reconnecting --------------------------------------------------------------------


async def test_messages_flow_across_a_reconnection() -> None:
    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        async for message in conn:
            if message == "restart":
                await conn.aclose(1012, "restarting")
                return
            await conn.send_message(message)

    states: list[tuple[str, ReadyState]] = []
    log = Log()

    def on_event(event: ClientEvent) -> None:
        states.append((type(event).__name__, client.state))
        log(event)

    with trio.fail_after(TIMEOUT):
        async with served_client(
            handler, on_event=on_event, backoff=Backoff(initial=0.01)
        ) as client:
            assert client.state is ReadyState.CONNECTING
            await client.wait_open()
            assert client.state is ReadyState.OPEN
            await client.send_message("one")
            assert await client.get_message() == "one"
            await client.send_message("restart")
            await log.wait_for(CloseEvent)
            await client.send_message("two")  # waits for the second connection
            assert await client.get_message() == "two"
            await client.send_message(b"\x00three")
            assert await client.get_message() == b"\x00three"
            assert client.state is ReadyState.OPEN
        assert client.state is ReadyState.CLOSED
    kinds = [type(e).__name__ for e in log.events()]
    assert kinds == ["OpenEvent", "CloseEvent", "OpenEvent", "CloseEvent"]
    first_close = log.of(CloseEvent)[0][1]
    assert (first_close.code, first_close.reason) == (1012, "restarting")
    assert first_close.initiated_by_peer
    assert first_close.will_retry
    last_close = log.of(CloseEvent)[1][1]
    assert (last_close.code, last_close.initiated_by_peer, last_close.will_retry) == (
        1000,
        False,
        False,
    )
    # The state as each event was reported: OPEN, then CLOSED between connections.
    assert states == [
        ("OpenEvent", ReadyState.OPEN),
        ("CloseEvent", ReadyState.CLOSED),
        ("OpenEvent", ReadyState.OPEN),
        ("CloseEvent", ReadyState.CLOSED),
    ]
    assert [e.number for _t, e in log.of(OpenEvent)] == [1, 2]


async def test_server_goes_away_and_comes_back(clock: trio.testing.MockClock) -> None:
    """The waits between attempts are exactly the configured ones, on the trio clock."""
    log = Log()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as outer:
            first, port = await outer.start(serve_until_cancelled, echo, 0)
            async with open_reconnecting_websocket(
                url_of(port), backoff=NO_JITTER, on_event=log
            ) as client:
                await client.wait_open()
                first.cancel()  # the server goes away: 1001 to its clients
                errors = await log.wait_for(ErrorEvent, 3)
                # ... and comes back on the same port
                second, _ = await outer.start(serve_until_cancelled, echo, port)
                await client.send_message("back")
                assert await client.get_message() == "back"
                second.cancel()
            outer.cancel_scope.cancel()

    (closed_at, close), *_ = log.of(CloseEvent)
    assert (close.code, close.delay) == (1001, 0.1)
    assert [e.delay for _t, e in errors] == [0.2, 0.4, 0.8]
    assert [e.attempt for _t, e in errors] == [1, 2, 3]
    assert all(isinstance(e.error, TransportError) for _t, e in errors)
    assert [t - closed_at for t, _e in errors] == pytest.approx([0.1, 0.3, 0.7])
    opened_at, opened = log.of(OpenEvent)[1]
    assert opened_at - closed_at == pytest.approx(1.5)
    assert (opened.number, opened.attempt) == (2, 4)


async def test_backoff_resets_after_a_connection_stayed_up(clock: trio.testing.MockClock) -> None:
    count = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal count
        count += 1
        conn = await request.accept()
        if count == 4:
            await trio.sleep(10)  # healthy for reset_after seconds
        elif count >= 5:
            await conn.wait_closed()
        # otherwise: return at once (the server closes with 1000): flapping

    log = Log()
    with trio.fail_after(TIMEOUT * 3):
        async with served_client(handler, backoff=Backoff(jitter=0, reset_after=10), on_event=log):
            await log.wait_for(OpenEvent, 5)
    closes = log.of(CloseEvent)[:4]
    opens = log.of(OpenEvent)
    assert [e.delay for _t, e in closes] == [0.1, 0.2, 0.4, 0.1]
    for (closed_at, close), (opened_at, _open) in zip(closes, opens[1:], strict=True):
        assert opened_at - closed_at == pytest.approx(close.delay)
    assert opens[4][0] - opens[3][0] == pytest.approx(10.1)
    assert [e.attempt for _t, e in opens] == [1, 1, 1, 1, 1]


async def test_jittered_waits_are_the_seeded_ones(clock: trio.testing.MockClock) -> None:
    backoff = Backoff(jitter=0.5, max_attempts=4)
    expected_rng = random.Random(1234)
    expected = [backoff.delay(n, expected_rng.random) for n in (1, 2, 3)]
    log = Log()
    with trio.fail_after(TIMEOUT), pytest.raises(TransportError):
        async with open_reconnecting_websocket(
            url_of(closed_port()), backoff=backoff, rng=random.Random(1234).random, on_event=log
        ) as client:
            await client.wait_open()
    errors = log.of(ErrorEvent)
    assert [e.delay for _t, e in errors] == [*expected, None]
    times = [t for t, _e in errors]
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx(expected)
    assert all(
        0.5 * 0.1 * 2 ** (n - 1) <= d <= 0.1 * 2 ** (n - 1) for n, d in enumerate(expected, 1)
    )


# -- which failures retry ------------------------------------------------------------


def counting_rejecter(
    statuses: list[int], headers: list[tuple[str, str]] | None = None
) -> tuple[Callable[[WebSocketRequest], Awaitable[None]], list[int]]:
    """A handler answering the given statuses in turn, then accepting (echo)."""
    seen: list[int] = []

    async def handler(request: WebSocketRequest) -> None:
        seen.append(len(seen) + 1)
        if len(seen) <= len(statuses):
            await request.reject(statuses[len(seen) - 1], headers=headers or [])
            return
        await echo(request)

    return handler, seen


async def test_503_then_101(clock: trio.testing.MockClock) -> None:
    handler, seen = counting_rejecter([503])
    log = Log()
    with trio.fail_after(TIMEOUT):
        async with served_client(handler, backoff=NO_JITTER, on_event=log) as client:
            await client.wait_open()
            await client.send_message("hi")
            assert await client.get_message() == "hi"
    ((failed_at, error),) = log.of(ErrorEvent)
    assert (error.status_code, error.attempt, error.delay) == (503, 1, 0.1)
    assert isinstance(error.error, ConnectionRejected)
    assert "503" in error.reason
    opened_at, opened = log.of(OpenEvent)[0]
    assert opened.attempt == 2
    assert opened_at - failed_at == pytest.approx(0.1)
    assert seen == [1, 2]


async def test_429_waits_what_retry_after_says(clock: trio.testing.MockClock) -> None:
    handler, _seen = counting_rejecter([429], headers=[("Retry-After", "3")])
    log = Log()
    with trio.fail_after(TIMEOUT):
        async with served_client(handler, backoff=NO_JITTER, on_event=log) as client:
            await client.wait_open()
    ((failed_at, error),) = log.of(ErrorEvent)
    assert (error.status_code, error.delay) == (429, 3.0)
    assert log.of(OpenEvent)[0][0] - failed_at == pytest.approx(3.0)


async def test_403_gives_up_at_once_from_wait_open() -> None:
    handler, seen = counting_rejecter([403, 403])
    log = Log()
    with trio.fail_after(TIMEOUT):
        async with ws_server(handler) as server:
            baseline = count_tasks()
            with pytest.raises(ConnectionRejected) as info:
                async with open_reconnecting_websocket(url_of(server.port), on_event=log) as client:
                    await client.wait_open()
            await assert_no_leftover_tasks(baseline)
    assert type(info.value) is ConnectionRejected  # one plain exception, no group
    assert info.value.status_code == 403
    assert seen == [1]
    assert client.state is ReadyState.CLOSED
    ((_t, error),) = log.of(ErrorEvent)
    assert (error.status_code, error.will_retry) == (403, False)
    with pytest.raises(ConnectionRejected):
        await client.get_message()
    with pytest.raises(ConnectionRejected):
        await client.send_message("too late")


async def test_403_ends_a_block_that_was_not_waiting_on_the_client() -> None:
    handler, seen = counting_rejecter([403])
    with trio.fail_after(TIMEOUT):
        async with ws_server(handler) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_reconnecting_websocket(url_of(server.port)):
                    await trio.sleep_forever()  # cancelled when the client gives up
    assert type(info.value) is ConnectionRejected
    assert seen == [1]


async def test_giving_up_reaches_several_waiting_tasks_as_one_exception() -> None:
    handler, _seen = counting_rejecter([404])

    async def session(port: int) -> None:
        async with (
            open_reconnecting_websocket(url_of(port)) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(client.get_message)
            nursery.start_soon(client.send_message, "x")
            await client.wait_open()

    with trio.fail_after(TIMEOUT):
        async with ws_server(handler) as server:
            with pytest.raises(ConnectionRejected) as info:
                await session(server.port)
    assert type(info.value) is ConnectionRejected
    assert info.value.status_code == 404


async def test_the_classifier_decides(clock: trio.testing.MockClock) -> None:
    handler, seen = counting_rejecter([401])

    def retry_on(error: Exception) -> bool:
        if isinstance(error, ConnectionRejected) and error.status_code == 401:
            return True
        return wsnursery.default_retry_on(error)

    with trio.fail_after(TIMEOUT):
        async with served_client(handler, retry_on=retry_on) as client:
            await client.wait_open()
    assert seen == [1, 2]


async def test_a_server_that_closes_before_answering_is_retried(
    clock: trio.testing.MockClock,
) -> None:
    count = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        if count == 1:
            await read_head(stream)
            await stream.aclose()  # no answer at all
            return
        await answer_upgrade(stream)
        await swallow(stream)

    log = Log()
    with trio.fail_after(TIMEOUT):
        async with (
            raw_server(handler) as port,
            open_reconnecting_websocket(
                url_of(port), on_event=log, ping_interval=None, close_timeout=1
            ) as client,
        ):
            await client.wait_open()
    ((_t, error),) = log.of(ErrorEvent)
    assert isinstance(error.error, wsnursery.InvalidHandshake)
    assert isinstance(error.error.__cause__, EOFError)
    assert error.will_retry


async def test_max_attempts_then_the_block_raises_the_last_error(
    clock: trio.testing.MockClock,
) -> None:
    log = Log()
    with trio.fail_after(TIMEOUT):
        baseline = count_tasks()
        with pytest.raises(TransportError) as info:
            async with open_reconnecting_websocket(
                url_of(closed_port()), backoff=Backoff(max_attempts=3, jitter=0), on_event=log
            ):
                await trio.sleep_forever()
        await assert_no_leftover_tasks(baseline)
    errors = [e for _t, e in log.of(ErrorEvent)]
    assert [(e.attempt, e.delay) for e in errors] == [(1, 0.1), (2, 0.2), (3, None)]
    assert info.value is errors[-1].error
    assert isinstance(info.value.__cause__, OSError)


# -- reconnection on and off ---------------------------------------------------------


async def test_without_reconnect_a_failed_connect_raises_at_once() -> None:
    handler, seen = counting_rejecter([503])
    with trio.fail_after(TIMEOUT):
        async with ws_server(handler) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_reconnecting_websocket(url_of(server.port), reconnect=False) as c:
                    await c.wait_open()
    assert info.value.status_code == 503
    assert seen == [1]


async def test_without_reconnect_the_end_of_the_connection_ends_the_client() -> None:
    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        await conn.send_message("bye")
        await conn.aclose(1000, "done")

    log = Log()
    with trio.fail_after(TIMEOUT):
        async with (
            ws_server(handler) as server,
            open_reconnecting_websocket(
                url_of(server.port), reconnect=False, on_event=log
            ) as client,
        ):
            assert [m async for m in client] == ["bye"]  # ends quietly on 1000
            assert client.state is ReadyState.CLOSED
            with pytest.raises(ConnectionClosedOK) as info:
                await client.get_message()
            assert info.value.reason.reason == "done"
            with pytest.raises(ConnectionClosed):
                await client.send_message("no")
            with pytest.raises(ConnectionClosed):
                await client.wait_open()
            with pytest.raises(ConnectionClosed):
                await client.ping()
    ((_t, close),) = log.of(CloseEvent)
    assert (close.code, close.will_retry) == (1000, False)
    assert len(server.connections) == 0


async def test_reconnect_can_be_turned_off_at_run_time() -> None:
    count = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal count
        count += 1
        conn = await request.accept()
        await conn.get_message()  # then close
        await conn.aclose(1001)

    log = Log()
    with trio.fail_after(TIMEOUT):
        async with served_client(handler, on_event=log, backoff=Backoff(initial=0.01)) as client:
            assert client.reconnect
            await client.send_message("close, please")
            await log.wait_for(OpenEvent, 2)  # it reconnected
            client.reconnect = False
            await client.send_message("close again")
            await log.wait_for(CloseEvent, 2)
            assert client.state is ReadyState.CLOSED
            client.reconnect = True  # too late: the client has stopped
            await trio.sleep(0.05)
            assert client.state is ReadyState.CLOSED
    assert count == 2
    assert [e.will_retry for _t, e in log.of(CloseEvent)] == [True, False]


# -- keep-alive ----------------------------------------------------------------------


async def test_a_server_that_stops_answering_pings_is_dropped_and_reconnected(
    clock: trio.testing.MockClock,
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await answer_upgrade(stream)
        await swallow(stream)  # never a pong

    log = Log()
    with trio.fail_after(TIMEOUT * 3):
        async with (
            raw_server(handler) as port,
            open_reconnecting_websocket(
                url_of(port), ping_interval=5, ping_timeout=3, backoff=NO_JITTER, on_event=log
            ),
        ):
            await log.wait_for(OpenEvent, 2)
    (opened_at, _), (reopened_at, _) = log.of(OpenEvent)[:2]
    closed_at, close = log.of(CloseEvent)[0]
    assert close.code == 1011
    assert "ping" in close.reason
    assert not close.initiated_by_peer
    assert closed_at - opened_at == pytest.approx(5 + 3)  # ping_interval + ping_timeout
    assert reopened_at - closed_at == pytest.approx(0.1)


# -- on_open, sends while not open ---------------------------------------------------


def recording_server() -> tuple[Callable[[WebSocketRequest], Awaitable[None]], list[list[Any]]]:
    """Each connection's messages; "close" makes the server close it."""
    connections: list[list[Any]] = []

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        received: list[Any] = []
        connections.append(received)
        async for message in conn:
            received.append(message)
            if message == "close":
                await conn.aclose(1012)
                return
            await conn.send_message(f"ack {message}")

    return handler, connections


async def test_on_open_runs_first_on_every_connection() -> None:
    handler, connections = recording_server()
    opened: list[wsnursery.WebSocketConnection] = []

    async def on_open(conn: wsnursery.WebSocketConnection) -> None:
        opened.append(conn)
        await conn.send_message("subscribe")
        assert await conn.get_message() == "ack subscribe"  # reads its own answer

    log = Log()
    with trio.fail_after(TIMEOUT):
        async with served_client(
            handler,
            on_open=on_open,
            on_event=log,
            backoff=Backoff(initial=0.01),
            send_policy="queue",
        ) as client:
            await client.send_message("one")  # queued: the client is connecting
            assert await client.get_message() == "ack one"
            await client.send_message("close")
            await log.wait_for(CloseEvent)
            await client.send_message("two")
            assert await client.get_message() == "ack two"
    assert connections == [["subscribe", "one", "close"], ["subscribe", "two"]]
    assert len(opened) == 2


async def test_an_on_open_error_ends_the_client_with_that_error() -> None:
    handler, closes = close_recorder()

    async def on_open(conn: wsnursery.WebSocketConnection) -> None:
        raise KeyError("bad subscription")

    with trio.fail_after(TIMEOUT):
        async with ws_server(handler) as server:
            with pytest.raises(KeyError):
                async with open_reconnecting_websocket(
                    url_of(server.port), on_open=on_open
                ) as client:
                    await client.wait_open()
            await wait_until(lambda: bool(closes))
    assert closes == [1011]


async def test_send_policy_wait_sends_once_connected() -> None:
    handler, connections = recording_server()
    with trio.fail_after(TIMEOUT):
        async with served_client(handler) as client:
            assert client.state is ReadyState.CONNECTING
            await client.send_message("early")  # waits for the connection
            assert client.state is ReadyState.OPEN
            assert await client.get_message() == "ack early"
    assert connections == [["early"]]


async def test_send_policy_queue_keeps_order_and_bounds_the_queue() -> None:
    handler, connections = recording_server()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as outer:
            port = closed_port()  # nothing there yet
            async with open_reconnecting_websocket(
                url_of(port),
                send_policy="queue",
                send_queue_size=2,
                backoff=Backoff(initial=0.01, max_delay=0.05),
            ) as client:
                await client.send_message("a")
                await client.send_message(bytearray(b"b"))  # copied when queued
                assert client.unsent == 2
                sent_third = trio.Event()

                async def third() -> None:
                    await client.send_message("c")  # the queue is full: waits
                    sent_third.set()

                outer.start_soon(third)
                await trio.sleep(0.1)
                assert not sent_third.is_set()
                with trio.move_on_after(0.01):
                    await client.send_message("cancelled")  # nothing queued
                assert client.unsent == 2
                scope, _ = await outer.start(serve_until_cancelled, handler, port)
                await sent_third.wait()
                replies = [await client.get_message() for _ in range(3)]
                scope.cancel()
    assert connections[0][:3] == ["a", b"b", "c"]
    assert replies == ["ack a", "ack b'b'", "ack c"]


async def test_send_policy_raise() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_reconnecting_websocket(
            url_of(closed_port()), send_policy="raise", backoff=Backoff(initial=5)
        ) as client:
            with pytest.raises(wsnursery.ConnectionClosedError) as info:
                await client.send_message("now")
            assert info.value.reason.code == 1006
            with pytest.raises(TypeError):
                await client.send_message(42)  # type: ignore[arg-type]


async def test_queued_messages_are_dropped_when_the_client_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_reconnecting_websocket(
            url_of(closed_port()), send_policy="queue", backoff=Backoff(initial=5)
        ) as client:
            await client.send_message("never")
    assert client.unsent == 0
    assert "1 queued messages were never sent" in caplog.text


# -- events ----------------------------------------------------------------------------


async def test_events_keep_each_connections_messages_between_its_open_and_close() -> None:
    count = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal count
        count += 1
        conn = await request.accept()
        if count == 1:
            for message in ["a", b"b", "c"]:
                await conn.send_message(message)
            await conn.aclose(1012)
        else:
            for message in ["d", "e"]:
                await conn.send_message(message)
            await conn.wait_closed()

    log = Log()
    with trio.fail_after(TIMEOUT):
        async with served_client(handler, on_event=log, backoff=Backoff(initial=0.01)) as client:
            await log.wait_for(OpenEvent, 2)
            await wait_for_unread(client, 2)
            seen: list[Any] = []
            async for event in client.events():
                seen.append(event)
                if len(seen) == 8:
                    break
    described = [
        e.message if isinstance(e, MessageEvent) else (type(e).__name__, getattr(e, "number", None))
        for e in seen
    ]
    assert described == [
        ("OpenEvent", 1),
        "a",
        b"b",
        "c",
        ("CloseEvent", 1),
        ("OpenEvent", 2),
        "d",
        "e",
    ]
    assert seen[1].is_text
    assert not seen[2].is_text


async def test_events_end_after_the_last_close_and_raise_when_giving_up() -> None:
    async def handler(request: WebSocketRequest) -> None:
        await (await request.accept()).aclose()

    with trio.fail_after(TIMEOUT):
        async with served_client(handler, reconnect=False) as client:
            kinds = [type(e).__name__ async for e in client.events()]
    assert kinds == ["OpenEvent", "CloseEvent"]

    handler403, _seen = counting_rejecter([403])
    got: list[ClientEvent] = []

    async def session(port: int) -> None:
        async with open_reconnecting_websocket(url_of(port)) as client:
            async for event in client.events():
                got.append(event)

    with trio.fail_after(TIMEOUT):
        async with ws_server(handler403) as server:
            with pytest.raises(ConnectionRejected):
                await session(server.port)
    assert [type(e) for e in got] == [ErrorEvent]


async def test_unread_messages_of_an_older_connection_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    count = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal count
        count += 1
        conn = await request.accept()
        await conn.send_message(f"{count}a")
        await conn.send_message(f"{count}b")
        if count < 3:
            await conn.aclose(1012)
        else:
            await conn.wait_closed()

    log = Log()
    caplog.set_level(logging.WARNING, "wsnursery.reconnect")
    with trio.fail_after(TIMEOUT):
        async with served_client(handler, on_event=log, backoff=Backoff(initial=0.01)) as client:
            await log.wait_for(OpenEvent, 3)
            await wait_for_unread(client, 2)
            messages = [await client.get_message() for _ in range(4)]
    assert messages == ["2a", "2b", "3a", "3b"]
    assert "dropped 2 unread messages of connection 1" in caplog.text


# -- cancellation in each state --------------------------------------------------------


async def answer_then_ignore(stream: trio.SocketStream) -> None:
    await answer_upgrade(stream)
    await swallow(stream)  # never answers our close frame


async def hang_on_open(conn: wsnursery.WebSocketConnection) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize(
    "where",
    ["handshake", "backoff", "on_open", "open", "closing", "closed"],
)
async def test_cancelling_the_block_in_each_state(where: str) -> None:
    closes: list[int] = []

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        if where == "closed":
            await conn.aclose()
            return
        closes.append((await conn.wait_closed()).code)

    accepted: list[trio.SocketStream] = []

    async def never_answer(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await swallow(stream)

    caught: BaseException | None = None
    log = Log()
    with trio.fail_after(TIMEOUT):
        async with ws_server(handler) as server, raw_server(never_answer) as silent_port:
            async with raw_server(answer_then_ignore) as deaf_port:
                url = {
                    "handshake": url_of(silent_port),
                    "backoff": url_of(closed_port()),
                    "closing": url_of(deaf_port),
                }.get(where, url_of(server.port))
                baseline = count_tasks()
                with trio.CancelScope() as scope:
                    try:
                        async with (
                            open_reconnecting_websocket(
                                url,
                                on_open=hang_on_open if where == "on_open" else None,
                                reconnect=where != "closed",
                                backoff=Backoff(initial=60, max_delay=60),
                                ping_interval=None,
                                on_event=log,
                            ) as client,
                            trio.open_nursery() as nursery,
                        ):
                            if where == "handshake":
                                await wait_until(lambda: bool(accepted))
                                assert client.state is ReadyState.CONNECTING
                            elif where == "backoff":
                                await log.wait_for(ErrorEvent)  # then waits 60 s
                                assert client.state is ReadyState.CONNECTING
                            elif where == "on_open":
                                await wait_until(lambda: len(server.connections) == 1)
                                assert client.state is ReadyState.CONNECTING
                            elif where == "open":
                                await client.wait_open()
                            elif where == "closing":
                                await client.wait_open()
                                conn = client.connection
                                assert conn is not None
                                nursery.start_soon(conn.aclose)
                                await wait_until(lambda: client.state is ReadyState.CLOSING)
                            elif where == "closed":
                                await wait_until(lambda: client.state is ReadyState.CLOSED)
                            scope.cancel()
                            await trio.sleep_forever()
                    except BaseException as exc:
                        caught = exc
                        raise
                assert scope.cancelled_caught
                assert type(caught) is trio.Cancelled  # not an ExceptionGroup
                await assert_no_leftover_tasks(baseline)
                assert client.state is ReadyState.CLOSED
            if where in ("open", "on_open"):
                await wait_until(lambda: bool(closes))
                assert closes == [1001]


async def test_leaving_by_an_exception_closes_with_1011() -> None:
    handler, closes = close_recorder()

    async def session(port: int) -> None:
        async with open_reconnecting_websocket(url_of(port)) as client:
            await client.wait_open()
            raise ZeroDivisionError

    with trio.fail_after(TIMEOUT):
        async with ws_server(handler) as server:
            with pytest.raises(ZeroDivisionError):
                await session(server.port)
            await wait_until(lambda: bool(closes))
    assert closes == [1011]


async def test_aclose_stops_the_client_in_the_block() -> None:
    handler, _connections = recording_server()
    log = Log()
    with trio.fail_after(TIMEOUT):
        async with served_client(handler, on_event=log) as client:
            await client.wait_open()
            await client.aclose(4000, "enough")
            assert client.state is ReadyState.CLOSED
            with pytest.raises(ConnectionClosed) as info:
                await client.send_message("x")
            assert info.value.reason.code == 4000
    ((_t, close),) = log.of(CloseEvent)
    assert (close.code, close.reason, close.will_retry) == (4000, "enough", False)


# -- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as files."""
    ca = trustme.CA()
    root = tmp_path_factory.mktemp("pki")
    paths = {
        "ca": root / "ca.pem",
        "server": root / "server.pem",
        "client": root / "client.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    ca.issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(str(paths["server"]))
    ca.issue_cert("client@example.com").private_key_and_cert_chain_pem.write_to_path(
        str(paths["client"])
    )
    return paths


async def test_tls_with_a_client_certificate_the_server_requires(pki: dict[str, Path]) -> None:
    subjects: list[Any] = []

    async def handler(request: WebSocketRequest) -> None:
        subjects.append(request.peer_certificate)
        await echo(request)

    context = wsnursery.server_ssl_context(pki["server"], client_ca=pki["ca"])
    log = Log()
    with trio.fail_after(TIMEOUT):
        async with ws_server(handler, ssl_context=context) as server:
            url = f"wss://{HOST}:{server.port}/"
            async with open_reconnecting_websocket(
                url, cafile=pki["ca"], certfile=pki["client"], on_event=log
            ) as client:
                await client.send_message("secret")
                assert await client.get_message() == "secret"
                await client.connection.aclose(1012)  # type: ignore[union-attr]
                await log.wait_for(OpenEvent, 2)  # reconnects over TLS too
                await client.send_message("again")
                assert await client.get_message() == "again"
            # The same options on the plain client.
            async with wsnursery.open_websocket_url(
                url, cafile=pki["ca"], certfile=pki["client"]
            ) as conn:
                await conn.send_message("plain")
                assert await conn.get_message() == "plain"
            # Without a certificate the server refuses us.
            with pytest.raises(TransportError):
                async with open_reconnecting_websocket(
                    url, cafile=pki["ca"], backoff=Backoff(max_attempts=1)
                ) as client:
                    await client.wait_open()
    assert len(subjects) == 3
    assert all(subject for subject in subjects)


async def test_tls_trust_store_choices(
    pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    context = wsnursery.server_ssl_context(pki["server"])
    with trio.fail_after(TIMEOUT):
        async with ws_server(echo, ssl_context=context) as server:
            url = f"wss://{HOST}:{server.port}/"
            # The system store does not know our CA: a verification error is final.
            log = Log()
            with pytest.raises(TransportError) as info:
                async with open_reconnecting_websocket(url, on_event=log) as client:
                    await client.wait_open()
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
            assert len(log.of(ErrorEvent)) == 1
            # NONE: no verification, loudly.
            with caplog.at_level(logging.WARNING, "wsnursery.tls"):
                async with open_reconnecting_websocket(url, cafile=NONE) as client:
                    await client.send_message("unverified")
                    assert await client.get_message() == "unverified"
            assert "verification is OFF" in caplog.text
            # A CA file.
            async with open_reconnecting_websocket(url, cafile=str(pki["ca"])) as client:
                await client.wait_open()


async def test_tls_option_mistakes(pki: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="not both"):
        async with open_reconnecting_websocket(
            "wss://example.com/", ssl_context=ssl.create_default_context(), cafile=pki["ca"]
        ):
            pass
    with pytest.raises(ValueError, match="ws://"):
        async with open_reconnecting_websocket("ws://example.com/", cafile=pki["ca"]):
            pass
    with pytest.raises(ValueError, match="certfile"):
        wsnursery.client_ssl_context(keyfile=pki["client"])
    with pytest.raises(ValueError):
        async with open_reconnecting_websocket("ws://example.com/", send_policy="drop"):  # type: ignore[arg-type]
            pass


# -- an independent server ----------------------------------------------------------------


class AsyncioThread:
    """An asyncio event loop in a thread; trio awaits coroutines run there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await trio.to_thread.run_sync(future.result, 5, abandon_on_cancel=True)

    async def aclose(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        await trio.to_thread.run_sync(self.thread.join, 5)
        self.loop.close()


async def test_reconnects_to_a_websockets_server_that_restarts() -> None:
    async def handler(ws: Any) -> None:
        async for message in ws:
            if message == "restart":
                await ws.close(1012, "restart")
                return
            await ws.send(message)

    async def start(port: int) -> Any:
        return await ws_asyncio_serve(handler, HOST, port, ping_interval=None)

    async def stop(server: Any) -> None:
        server.close()
        await server.wait_closed()

    log = Log()
    thread = AsyncioThread()
    try:
        with trio.fail_after(TIMEOUT):
            server = await thread.call(start(0))
            port = server.sockets[0].getsockname()[1]
            async with open_reconnecting_websocket(
                url_of(port), on_event=log, backoff=Backoff(initial=0.02, max_delay=0.1)
            ) as client:
                await client.send_message("hello")
                assert await client.get_message() == "hello"
                await client.send_message("restart")  # the server closes with 1012
                # (A message sent before the client saw the close frame would be
                # lost: the server ignores data after its close. Wait for it.)
                await log.wait_for(CloseEvent)
                await client.send_message("after restart")
                assert await client.get_message() == "after restart"
                await thread.call(stop(server))  # the whole server goes away
                await log.wait_for(ErrorEvent)
                server = await thread.call(start(port))  # and comes back
                await client.send_message("after outage")
                assert await client.get_message() == "after outage"
            await thread.call(stop(server))
    finally:
        await thread.aclose()
    closes = [e for _t, e in log.of(CloseEvent)]
    assert [c.code for c in closes][:2] == [1012, 1001]
    assert [e.number for _t, e in log.of(OpenEvent)] == [1, 2, 3]
