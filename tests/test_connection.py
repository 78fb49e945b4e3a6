"""WebSocketConnection over in-memory streams: backpressure, keep-alive, cancellation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from wsnursery import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    Headers,
    ProtocolState,
    WebSocketConnection,
)
from wsnursery._sansio.protocol import Protocol
from wsnursery.testing import open_websocket_pair


def make_conn(stream: trio.abc.Stream, *, client: bool, **kwargs: object) -> WebSocketConnection:
    return WebSocketConnection(
        stream,
        Protocol(client=client),
        path="/",
        request_headers=Headers(),
        response_headers=Headers(),
        subprotocol=None,
        **kwargs,  # type: ignore[arg-type]
    )


@asynccontextmanager
async def raw_pair(
    stream_pair: str = "memory", **kwargs: object
) -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection]]:
    """Two connections with no handshake, over memory or lockstep streams."""
    if stream_pair == "memory":
        a, b = trio.testing.memory_stream_pair()
    else:
        a, b = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        client = make_conn(a, client=True, **kwargs)
        server = make_conn(b, client=False, **kwargs)
        client._start(nursery)
        server._start(nursery)
        yield client, server
        with trio.CancelScope(shield=True):
            await client.aclose()
            await server.aclose()
        nursery.cancel_scope.cancel()


async def test_messages_both_ways_and_iteration_ends_on_normal_close() -> None:
    async with open_websocket_pair() as (client, server):
        for message in ["a", b"b", "", b""]:
            await client.send_message(message)
        await client.aclose()
        received = [m async for m in server]
        assert received == ["a", b"b", "", b""]
        assert server.closed is not None
        assert server.closed.code == 1000
        with pytest.raises(ConnectionClosedOK):
            await server.get_message()
        with pytest.raises(ConnectionClosedOK):
            await server.send_message("late")


async def test_iteration_raises_on_abnormal_close() -> None:
    async with open_websocket_pair() as (client, server):
        await client.aclose(4001, "custom")  # not 1000/1001/1005: an error for the peer
        with pytest.raises(ConnectionClosedError) as info:
            async for _ in server:
                pass
        assert info.value.reason.code == 4001
        assert info.value.reason.reason == "custom"
        assert info.value.reason.initiated_by_peer


async def test_send_message_type_error() -> None:
    async with open_websocket_pair() as (client, _):
        with pytest.raises(TypeError, match="int"):
            await client.send_message(42)  # type: ignore[arg-type]


async def test_cancelled_get_message_loses_nothing() -> None:
    async with open_websocket_pair() as (client, server):
        with trio.move_on_after(0.01):
            await server.get_message()
        await client.send_message("kept")
        assert await server.get_message() == "kept"


async def test_get_message_waiters_wake_on_close() -> None:
    async with open_websocket_pair() as (client, server), trio.open_nursery() as nursery:

        async def waiter() -> None:
            with pytest.raises(ConnectionClosedOK):
                await server.get_message()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose(1001)


async def test_backpressure_stops_reading_when_the_queue_is_full() -> None:
    async with raw_pair(max_queue=3, ping_interval=None) as (client, server):
        for i in range(20):
            await client.send_message(f"m{i}")
        await trio.testing.wait_all_tasks_blocked()
        assert server._reader_paused
        assert len(server._proto.messages) == 3  # the rest waits in the stream
        got = [await server.get_message() for _ in range(20)]
        assert got == [f"m{i}" for i in range(20)]


async def test_ping_is_answered_while_the_queue_is_full_if_in_the_same_read() -> None:
    async with raw_pair(max_queue=1, ping_interval=None) as (client, server):
        # Two messages then a ping arrive together: all three are parsed in one read.
        data = client._proto.send_message("a") + client._proto.send_message("b")
        payload = b"in-read"
        data += client._proto.send_ping(payload)
        event = client._pings[payload] = trio.Event()
        await client._transport.send(data)
        with trio.fail_after(1):
            await event.wait()
        assert list(server._proto.messages) == ["a", "b"]
        assert [await server.get_message(), await server.get_message()] == ["a", "b"]


async def test_ping_waits_for_its_pong(autojump_clock: trio.testing.MockClock) -> None:
    async with open_websocket_pair() as (client, server):
        with trio.fail_after(1):
            await client.ping(b"x")
            await server.ping()


async def test_a_second_ping_with_the_same_payload_is_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        conn = make_conn(a, client=True, ping_interval=None, close_timeout=0.1)
        conn._start(nursery)

        async def first_ping() -> None:
            with pytest.raises(ConnectionClosedError):
                await conn.ping(b"dup")  # b never answers; the close ends the wait

        nursery.start_soon(first_ping)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ValueError, match="already waiting"):
            await conn.ping(b"dup")
        await conn.aclose()
        del b


async def test_ping_on_a_closed_connection_raises() -> None:
    async with open_websocket_pair() as (client, _):
        await client.aclose()
        with pytest.raises(ConnectionClosedOK):
            await client.ping()
        with pytest.raises(ConnectionClosedOK):
            await client.pong()


async def test_keepalive_closes_a_silent_peer_with_1011(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        conn = make_conn(a, client=True, ping_interval=5.0, ping_timeout=3.0, close_timeout=2.0)
        conn._start(nursery)
        start = trio.current_time()
        # b is never read: no pong will ever come, but the stream stays up.
        reason = await conn.wait_closed()
        elapsed = trio.current_time() - start
        assert reason.code == 1011
        assert "keepalive" in reason.reason
        assert 8.0 <= elapsed <= 8.5  # ping_interval + ping_timeout
        del b


async def test_keepalive_keeps_a_live_peer(autojump_clock: trio.testing.MockClock) -> None:
    async with open_websocket_pair(ping_interval=1.0, ping_timeout=1.0) as (client, server):
        await trio.sleep(30)
        assert client.state is ProtocolState.OPEN
        assert server.state is ProtocolState.OPEN
        assert server._proto.pings_received >= 25


async def test_keepalive_spares_a_peer_that_fills_our_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with raw_pair(max_queue=2, ping_interval=1.0, ping_timeout=1.0) as (client, server):
        for _ in range(10):
            await client.send_message("flood")
        await trio.sleep(30)  # the server reads nothing: its pongs go unread
        assert server.state is ProtocolState.OPEN
        assert server._reader_paused


async def test_aclose_reads_past_a_full_queue_to_find_the_close_frame() -> None:
    async with raw_pair(max_queue=1, ping_interval=None) as (client, server):
        for _ in range(5):
            await server.send_message("unread")
        await trio.testing.wait_all_tasks_blocked()
        assert client._reader_paused
        with trio.fail_after(2):
            await client.aclose()  # must not wait close_timeout for a frame it never reads
        assert client.closed is not None
        assert client.closed.code == 1000


async def test_aclose_is_idempotent_and_concurrent() -> None:
    async with open_websocket_pair() as (client, _):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(client.aclose)
        await client.aclose()
        assert client.closed is not None
        assert client.closed.code == 1000


async def test_aclose_gives_up_after_close_timeout(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        conn = make_conn(a, client=True, ping_interval=None, close_timeout=4.0)
        conn._start(nursery)
        start = trio.current_time()
        await conn.aclose()  # nobody answers the close frame
        assert trio.current_time() - start == pytest.approx(4.0, abs=0.01)
        assert conn.closed is not None
        assert conn.closed.code == 1006
        assert "in time" in conn.closed.reason
        del b


async def test_cancelled_aclose_still_closes() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        conn = make_conn(a, client=True, ping_interval=None)
        conn._start(nursery)
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.aclose()
        assert conn.closed is not None
        del b


async def test_aclose_refuses_codes_an_endpoint_may_not_send() -> None:
    async with open_websocket_pair() as (client, _):
        for code in (999, 1005, 1006, 1015, 2000, 5000):
            with pytest.raises(ValueError, match=str(code)):
                await client.aclose(code)


async def test_send_cancelled_midway_breaks_and_closes_the_connection() -> None:
    async with raw_pair("lockstep", ping_interval=None) as (client, server):
        # lockstep streams: send_all waits until the peer reads, and the server's
        # reader is paused on a full queue, so this send blocks mid-frame.
        server._max_queue = 1
        await client.send_message("fill")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.05) as scope:
            await client.send_message(b"x" * 100_000)
        assert scope.cancelled_caught
        assert client.state is ProtocolState.BROKEN
        assert client.closed is not None
        assert client.closed.code == 1006
        with pytest.raises(ConnectionClosedError):
            await client.send_message("after")


async def test_send_cancelled_while_queued_loses_nothing() -> None:
    async with raw_pair("lockstep", ping_interval=None) as (client, server):
        server._max_queue = 1
        await client.send_message("fill")
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_message, "blocked-in-socket")
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.05):
                await client.send_message("queued")  # waits for the send lock
            assert client.state is ProtocolState.OPEN  # nothing was framed
            assert await server.get_message() == "fill"
            assert await server.get_message() == "blocked-in-socket"


async def test_concurrent_senders_never_interleave_frames() -> None:
    async with raw_pair("lockstep", ping_interval=None, max_queue=100) as (client, server):
        messages = [bytes([i]) * 50_000 for i in range(10)]
        async with trio.open_nursery() as nursery:
            for m in messages:
                nursery.start_soon(client.send_message, m)
            got = [await server.get_message() for _ in messages]
        assert sorted(got) == sorted(messages)


async def test_wait_closed_returns_the_reason() -> None:
    async with open_websocket_pair() as (client, server):
        await server.aclose(1001, "bye")
        reason = await client.wait_closed()
        assert (reason.code, reason.reason, reason.ok) == (1001, "bye", True)
        assert str(reason) == "1001 (GOING_AWAY) bye"


async def test_peer_vanishing_gives_1006() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        conn = make_conn(a, client=False, ping_interval=None)
        conn._start(nursery)
        await b.aclose()
        with pytest.raises(ConnectionClosedError) as info:
            await conn.get_message()
        assert info.value.reason.code == 1006


async def test_exceptions_hierarchy() -> None:
    async with open_websocket_pair() as (client, _):
        await client.aclose()
        with pytest.raises(ConnectionClosed):
            await client.get_message()
    assert repr(client).startswith("<WebSocketConnection client")


async def test_trailing_data_after_handshake_is_delivered() -> None:
    a, b = trio.testing.memory_stream_pair()
    sender = Protocol(client=True)
    async with trio.open_nursery() as nursery:
        conn = WebSocketConnection(
            b,
            Protocol(client=False),
            path="/",
            request_headers=Headers(),
            response_headers=Headers(),
            subprotocol=None,
            trailing_data=sender.send_message("early"),
            ping_interval=None,
        )
        conn._start(nursery)
        assert await conn.get_message() == "early"
        await trio.aclose_forcefully(a)
        await conn.aclose()


async def test_max_queue_must_be_positive() -> None:
    a, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="max_queue"):
        make_conn(a, client=True, max_queue=0)


async def test_aclose_is_bounded_when_the_peer_stops_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with raw_pair("lockstep", ping_interval=None, close_timeout=3.0) as (client, server):
        # lockstep: a write waits until the peer reads, and the server's reader
        # is paused on a full queue, so the close frame can never be written.
        server._max_queue = 1
        await client.send_message("fill")
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:

            async def stuck_sender() -> None:
                # Holds the send lock, mid-frame; the forced close ends it.
                with pytest.raises(ConnectionClosedError):
                    await client.send_message(b"x" * 100_000)

            nursery.start_soon(stuck_sender)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await client.aclose()
            assert trio.current_time() - start <= 3.0 + 0.01
            assert client.closed is not None
