"""The Broadcaster: send to one, to all, to groups, without waiting for anyone.

Clients here are independent of wsnursery's client: hand-made sockets with a
frame parser (``_helpers.raw_connect``), the ``websockets`` package and
trio-websocket. Every server runs on real TCP on 127.0.0.1.
"""

from __future__ import annotations

import functools
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio_websocket
from websockets.trio.client import connect as ws_trio_connect

import wsnursery
from _helpers import (
    HOST,
    OP_CLOSE,
    OP_TEXT,
    FrameReader,
    assert_no_leftover_tasks,
    build_frame,
    count_tasks,
    raw_connect,
    wait_until,
)
from wsnursery import (
    Broadcaster,
    BroadcastReport,
    MemoryBackplane,
    WebSocketConnection,
    WebSocketHandler,
    WebSocketServer,
    serve_websocket,
)


class Announce(WebSocketHandler):
    """Tells each client its connection ID, then obeys "join:G" / "leave:G"."""

    async def on_connect(self, conn: WebSocketConnection) -> None:
        await conn.send_message(f"id:{conn.id}")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        verb, _, group = text.partition(":")
        if verb == "join":
            conn.server.broadcaster.join(conn, group)
            await conn.send_message(f"joined:{group}")
        elif verb == "leave":
            conn.server.broadcaster.leave(conn, group)
            await conn.send_message(f"left:{group}")


@asynccontextmanager
async def running(handler: Any = Announce, **kwargs: Any) -> AsyncIterator[WebSocketServer]:
    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(
            functools.partial(serve_websocket, handler, HOST, 0, **kwargs)
        )
        try:
            yield server
        finally:
            await server.aclose()
            nursery.cancel_scope.cancel()


class RawClient:
    """A hand-made client: reads its ID first, then frames on demand."""

    def __init__(self, stream: trio.SocketStream, reader: FrameReader) -> None:
        self.stream = stream
        self.reader = reader
        self.id = ""

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> RawClient:
        stream, reader, _ = await raw_connect(port)
        if rcvbuf is not None:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client = cls(stream, reader)
        client.id = (await client.text()).removeprefix("id:")
        return client

    async def text(self) -> str:
        frame = await self.reader.read_frame()
        assert frame is not None, "EOF"
        assert frame.opcode == OP_TEXT, frame
        return frame.payload.decode()

    async def send(self, text: str) -> None:
        await self.stream.send_all(build_frame(OP_TEXT, text.encode()))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# -- basics -------------------------------------------------------------------------


async def test_send_all_reaches_every_kind_of_client_and_reports_it() -> None:
    async with running() as server:
        raw = await RawClient.connect(server.port)
        async with trio_websocket.open_websocket(HOST, server.port, "/", use_ssl=False) as tw:
            tw_id = (await tw.get_message()).removeprefix("id:")
            # The websockets client offers permessage-deflate: a compressed connection.
            async with ws_trio_connect(f"ws://{HOST}:{server.port}/") as ws:
                ws_id = str(await ws.recv()).removeprefix("id:")
                await wait_until(lambda: len(server.connections) == 3)
                assert server.connections[ws_id].extensions, "expected permessage-deflate"
                report = await server.broadcaster.send_all("hello")
                assert report == BroadcastReport(recipients=3, delivered=3)
                report = await server.broadcaster.send_all(b"\x00bin", exclude=[tw_id])
                assert report.recipients == 2
                assert await raw.text() == "hello"
                frame = await raw.reader.read_frame()
                assert frame is not None
                assert frame.payload == b"\x00bin"
                assert await tw.get_message() == "hello"
                assert await ws.recv() == "hello"
                assert await ws.recv() == b"\x00bin"
                with trio.move_on_after(0.2):
                    extra = await tw.get_message()
                    pytest.fail(f"excluded client got {extra!r}")
        await raw.aclose()


async def test_send_one_by_connection_and_by_id() -> None:
    async with running() as server:
        a = await RawClient.connect(server.port)
        b = await RawClient.connect(server.port)
        b_conn = server.connections[b.id]
        assert (await server.broadcaster.send_one(a.id, "to a")).delivered == 1
        assert (await server.broadcaster.send_one(b_conn, "to b")).delivered == 1
        assert await a.text() == "to a"
        assert await b.text() == "to b"
        report = await server.broadcaster.send_one("no-such-id", "x")
        assert report == BroadcastReport()
        await a.aclose()
        await b.aclose()


async def test_groups_join_leave_and_membership_ends_with_the_connection() -> None:
    async with running() as server:
        b = server.broadcaster
        c1 = await RawClient.connect(server.port)
        c2 = await RawClient.connect(server.port)
        c3 = await RawClient.connect(server.port)
        for client, group in [(c1, "red"), (c2, "red"), (c2, "blue"), (c3, "blue")]:
            await client.send(f"join:{group}")
            assert await client.text() == f"joined:{group}"
        assert b.groups == {"red": 2, "blue": 2}
        assert [c.id for c in b.members("red")] == [c1.id, c2.id]
        assert b.groups_of(server.connections[c2.id]) == {"red", "blue"}

        report = await b.send_group("red", "to red", exclude=[c1.id])
        assert (report.recipients, report.delivered) == (1, 1)
        assert await c2.text() == "to red"

        await c2.send("leave:red")
        assert await c2.text() == "left:red"
        assert b.groups == {"red": 1, "blue": 2}

        await c3.aclose()  # gone without a close frame: membership must end anyway
        await wait_until(lambda: b.groups.get("blue") == 1, what="c3 left blue")
        await c1.aclose()
        await wait_until(lambda: "red" not in b.groups, what="empty group removed")
        report = await b.send_group("blue", "to blue")
        assert report.delivered == 1
        assert await c2.text() == "to blue"
        assert (await b.send_group("nobody", "x")).recipients == 0
        await c2.aclose()


async def test_membership_under_connect_disconnect_churn() -> None:
    """Clients join, leave and vanish at random while broadcasts run: no dead member stays."""
    rng = random.Random(1234)
    sent_errors: list[BaseException] = []
    async with running() as server:
        b = server.broadcaster
        stop = trio.Event()

        async def broadcaster_loop() -> None:
            n = 0
            while not stop.is_set():
                try:
                    await b.send_group(f"g{n % 3}", f"m{n}")
                    await b.send_all(f"all{n}")
                except BaseException as exc:  # pragma: no cover - the test fails below
                    sent_errors.append(exc)
                    raise
                n += 1
                await trio.sleep(0.001)

        async def churner(seed: int) -> None:
            local = random.Random(seed)
            for _ in range(8):
                client = await RawClient.connect(server.port)
                for _ in range(local.randint(1, 3)):
                    await client.send(f"join:g{local.randint(0, 2)}")
                if local.random() < 0.5:
                    await client.send(f"leave:g{local.randint(0, 2)}")
                await trio.sleep(local.random() * 0.02)
                await client.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(broadcaster_loop)
            async with trio.open_nursery() as churners:
                for _ in range(20):
                    churners.start_soon(churner, rng.randrange(1 << 30))
            stop.set()
        assert not sent_errors
        await wait_until(lambda: len(server.connections) == 0, 5, "every churner gone")
        assert b.groups == {}
        stats = b.stats()
        assert stats.connections == 0
        assert stats.queued_messages == 0
        assert stats.queued_bytes == 0


# -- order, many clients ------------------------------------------------------------


async def test_one_thousand_clients_get_every_message_in_order() -> None:
    n_clients, n_messages = 1000, 100
    async with running(max_connections=2000) as server:
        clients: list[RawClient] = []
        async with trio.open_nursery() as nursery:
            for _ in range(n_clients):

                async def connect() -> None:
                    clients.append(await RawClient.connect(server.port))

                nursery.start_soon(connect)
        await wait_until(lambda: len(server.connections) == n_clients, 10)
        received: dict[str, list[int]] = {c.id: [] for c in clients}

        async def reader(client: RawClient) -> None:
            got = received[client.id]
            while len(got) < n_messages:
                frame = await client.reader.read_frame()
                assert frame is not None
                got.append(struct.unpack("!I", frame.payload[:4])[0])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(reader, client)
                for i in range(n_messages):
                    report = await server.broadcaster.send_all(struct.pack("!I", i) + bytes(60))
                    assert report.delivered == n_clients, report
        expected = list(range(n_messages))
        assert all(got == expected for got in received.values())
        stats = server.broadcaster.stats()
        assert stats.delivered == n_clients * n_messages
        assert stats.dropped == stats.closed == 0
        for client in clients:
            await client.aclose()


async def test_own_sends_and_broadcasts_stay_in_order_behind_a_queue() -> None:
    """A connection's own send_message waits behind queued broadcast frames, in order."""
    async with running(max_outbox_messages=100_000, max_outbox_bytes=1 << 30) as server:
        client = await RawClient.connect(server.port)
        conn = server.connections[client.id]
        payload = bytes(32_768)
        n = 0
        # Fill the socket until frames have to queue in the outbox.
        while server.broadcaster.stats().queued_messages < 5:
            await server.broadcaster.send_one(conn, struct.pack("!I", n) + payload)
            n += 1
            assert n < 10_000, "the socket never filled"
        own = n
        async with trio.open_nursery() as nursery:
            # Blocks until the outbox drained: the client must read meanwhile.
            nursery.start_soon(conn.send_message, struct.pack("!I", own) + b"own")
            seen = []
            while len(seen) <= own:
                frame = await client.reader.read_frame()
                assert frame is not None
                seen.append(struct.unpack("!I", frame.payload[:4])[0])
        assert seen == list(range(own + 1))
        assert frame.payload.endswith(b"own")
        await client.aclose()


# -- slow clients ----------------------------------------------------------------------


async def test_drop_policy_keeps_others_going_and_memory_bounded() -> None:
    limit_messages, limit_bytes = 64, 256 * 1024
    async with running(
        max_outbox_messages=limit_messages, max_outbox_bytes=limit_bytes, on_overflow="drop"
    ) as server:
        stalled = await RawClient.connect(server.port)
        fast = await RawClient.connect(server.port)
        stalled_conn = server.connections[stalled.id]
        payload = bytes(16 * 1024)
        total = 2000  # 32 MB: far more than the socket buffers and the outbox hold
        dropped = 0
        got = 0

        async def read_fast() -> None:
            nonlocal got
            while got < total:
                frame = await fast.reader.read_frame()
                assert frame is not None
                assert struct.unpack("!I", frame.payload[:4])[0] == got
                got += 1

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_fast)
                for i in range(total):
                    report = await server.broadcaster.send_all(struct.pack("!I", i) + payload)
                    dropped += report.dropped
                    assert report.closed == 0
                    stats = server.broadcaster.stats()
                    assert stats.queued_messages <= 2 * limit_messages
                    assert stats.queued_bytes <= 2 * limit_bytes + len(payload) + 16
                    if i % 64 == 0:
                        await trio.lowlevel.checkpoint()  # let the fast client's writer run
        assert got == total
        assert dropped > 0
        assert server.broadcaster.stats().dropped == dropped
        outbox = stalled_conn._outbox
        assert outbox is not None
        assert outbox.count <= limit_messages
        assert outbox.nbytes <= limit_bytes + len(payload) + 16
        assert stalled.id in server.connections, "drop policy must not close the client"
        # The stalled client reads now: every frame not dropped, in order, whole.
        seen: list[int] = []
        with trio.fail_after(20):
            while len(seen) < total - dropped:
                frame = await stalled.reader.read_frame()
                assert frame is not None
                seen.append(struct.unpack("!I", frame.payload[:4])[0])
        assert seen == sorted(set(seen))
        assert seen[0] == 0
        with trio.move_on_after(0.3):
            pytest.fail(f"more than expected: {await stalled.reader.read_frame()}")
        await stalled.aclose()
        await fast.aclose()


@pytest.mark.parametrize("code", [1008, 1013])
async def test_close_policy_closes_the_stalled_client_with_its_code(code: int) -> None:
    async with running(
        max_outbox_messages=8,
        max_outbox_bytes=1 << 20,
        on_overflow="close",
        overflow_close_code=code,
        close_timeout=5,
    ) as server:
        stalled = await RawClient.connect(server.port)
        fast = await RawClient.connect(server.port)
        payload = bytes(50_000)  # frames larger than a read: partial writes happen
        closed = 0
        got = 0
        total = 600

        async def read_fast() -> None:
            nonlocal got
            while got < total:
                frame = await fast.reader.read_frame()
                assert frame is not None
                got += 1

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_fast)
                for i in range(total):
                    report = await server.broadcaster.send_all(struct.pack("!I", i) + payload)
                    closed += report.closed
                    if i % 16 == 0:
                        await trio.lowlevel.checkpoint()
        assert got == total
        assert closed > 0
        assert server.broadcaster.stats().overflow_closes == 1
        # The stalled client reads now: whole frames in order (the stream stayed in
        # sync through a partly written frame), then a close frame with the code.
        with trio.fail_after(10):
            last = -1
            while True:
                frame = await stalled.reader.read_frame()
                assert frame is not None, "EOF before the close frame"
                if frame.opcode == OP_CLOSE:
                    break
                seq = struct.unpack("!I", frame.payload[:4])[0]
                assert seq == last + 1
                last = seq
        assert frame.close_code == code
        assert frame.close_reason == "too slow"
        await stalled.aclose()
        await wait_until(lambda: stalled.id not in server.connections)
        await fast.aclose()


async def test_broadcast_during_shutdown_counts_closing_connections() -> None:
    reports: list[BroadcastReport] = []
    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(
            functools.partial(serve_websocket, Announce, HOST, 0, close_timeout=2)
        )
        clients = [await RawClient.connect(server.port) for _ in range(5)]

        async def keep_broadcasting() -> None:
            while True:
                reports.append(await server.broadcaster.send_all("tick"))
                await trio.sleep(0.001)

        nursery.start_soon(keep_broadcasting)
        await wait_until(lambda: len(reports) > 3)
        async with trio.open_nursery() as readers:
            for client in clients:

                async def read_until_close(c: RawClient = client) -> None:
                    while (frame := await c.reader.read_frame()) is not None:
                        if frame.opcode == OP_CLOSE:
                            assert frame.close_code == 1001
                            await c.aclose()
                            return
                    raise AssertionError("no close frame")

                readers.start_soon(read_until_close)
            await server.aclose()
        await wait_until(lambda: reports[-1].recipients == 0 or reports[-1].closed > 0)
        nursery.cancel_scope.cancel()
    assert any(r.closed for r in reports) or reports[-1].recipients == 0
    assert all(r.dropped == 0 for r in reports)


async def test_no_task_outlives_the_server_after_queued_broadcasts() -> None:
    baseline = count_tasks()
    async with running(close_timeout=1) as server:
        stalled = await RawClient.connect(server.port)
        for _ in range(200):
            await server.broadcaster.send_all(bytes(30_000))
        assert server.broadcaster.stats().queued_messages > 0
    await stalled.aclose()
    await assert_no_leftover_tasks(baseline)


# -- standalone, backplane -----------------------------------------------------------


async def test_standalone_broadcaster_over_client_connections() -> None:
    """Client-side connections are masked per connection: each gets its own frame."""
    received: list[str] = []

    async def collect(request: wsnursery.WebSocketRequest) -> None:
        conn = await request.accept()
        async for message in conn:
            received.append(str(message))

    async with running(collect) as server, Broadcaster() as b:
        async with (
            wsnursery.open_websocket(HOST, server.port) as c1,
            wsnursery.open_websocket(HOST, server.port) as c2,
        ):
            b.add(c1)
            b.add(c2)
            assert len(b.connections) == 2
            report = await b.send_all("from the clients")
            assert report.delivered == 2
            await wait_until(lambda: len(received) == 2)
        await wait_until(lambda: len(b.connections) == 0, what="closed clients leave")
    assert received == ["from the clients"] * 2


async def test_memory_backplane_links_two_servers() -> None:
    hub = MemoryBackplane()
    async with running(backplane=hub) as s1, running(backplane=hub) as s2:
        a = await RawClient.connect(s1.port)
        b = await RawClient.connect(s2.port)
        for client in (a, b):
            await client.send("join:room")
            assert await client.text() == "joined:room"
        assert Broadcaster.node_of(a.id) == s1.broadcaster.node_id
        assert Broadcaster.node_of(b.id) == s2.broadcaster.node_id
        report = await s1.broadcaster.send_group("room", "to the room")
        assert report.recipients == 1  # the local member; the other is on s2
        assert await a.text() == "to the room"
        assert await b.text() == "to the room"
        await s2.broadcaster.send_one(a.id, "across servers")
        assert await a.text() == "across servers"
        await s1.broadcaster.send_all("everyone", exclude=[b.id])
        assert await a.text() == "everyone"
        with trio.move_on_after(0.2):
            pytest.fail(f"excluded client got {await b.text()!r}")
        await a.aclose()
        await b.aclose()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="on_overflow"):
        Broadcaster(on_overflow="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_outbox_messages"):
        Broadcaster(max_outbox_messages=0)
    with pytest.raises(ValueError, match="max_outbox_bytes"):
        Broadcaster(max_outbox_bytes=0)


async def test_bad_message_type() -> None:
    async with running() as server:
        with pytest.raises(TypeError):
            await server.broadcaster.send_all(123)  # type: ignore[arg-type]


async def test_compressed_client_gets_its_own_frames_in_order_through_the_outbox() -> None:
    """A permessage-deflate connection's frames are compressed in the order they are written."""
    import zlib

    async with running(max_outbox_messages=100_000, max_outbox_bytes=1 << 30) as server:
        stream, reader, head = await raw_connect(
            server.port, extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]
        )
        assert "permessage-deflate" in (head.header("Sec-WebSocket-Extensions") or "")
        client = RawClient(stream, reader)
        first = await reader.read_frame()
        assert first is not None
        plain = await RawClient.connect(server.port)
        (compressed,) = [c for c in server.connections.values() if c.extensions]
        rng = random.Random(7)
        total = 0
        # Incompressible payloads fill the socket until frames queue in the outbox.
        while compressed._outbox is None or compressed._outbox.count < 20:
            await server.broadcaster.send_all(struct.pack("!I", total) + rng.randbytes(20_000))
            total += 1
            assert total < 5000, "the socket never filled"
            if total % 8 == 0:
                # Keep the plain client drained: only the compressed one stalls.
                while (await plain.reader.read_frame()) is not None:
                    if plain.reader.buffer == b"":
                        break
        inflater = zlib.decompressobj(-15)
        with trio.fail_after(20):
            for expected in range(total):
                frame = await reader.read_frame()
                assert frame is not None
                assert frame.rsv == 4, "compressed (RSV1)"
                data = inflater.decompress(frame.payload + b"\x00\x00\xff\xff")
                assert struct.unpack("!I", data[:4])[0] == expected
        await client.aclose()
        await plain.aclose()


async def test_broadcast_over_tls_goes_through_the_writer_in_order() -> None:
    """A TLS stream cannot be written without awaiting: every frame takes the outbox path."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with (
        running(ssl_context=server_context) as server,
        trio_websocket.open_websocket(HOST, server.port, "/", use_ssl=client_context) as tw,
    ):
        await tw.get_message()  # its ID
        for i in range(200):
            report = await server.broadcaster.send_all(f"m{i}")
            assert report.delivered == 1
        for i in range(200):
            assert await tw.get_message() == f"m{i}"


async def test_standalone_broadcaster_whose_backplane_fails_raises_one_plain_error() -> None:
    class Failing(MemoryBackplane):
        async def serve(
            self,
            broadcaster: Broadcaster,
            *,
            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            raise OSError("backplane unreachable")

    with pytest.raises(OSError, match="unreachable"):
        async with Broadcaster(backplane=Failing()):
            pytest.fail("the block must not run")


def test_the_connection_owns_its_writes_and_the_broadcaster_only_offers() -> None:
    """The seam: _connection never imports _broadcast, and the broadcaster calls
    three connection methods (offer, attach, shed) and reads no connection state."""
    import ast
    import re
    from pathlib import Path

    import wsnursery._broadcast
    import wsnursery._connection

    tree = ast.parse(Path(wsnursery._connection.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not any(name.endswith("_broadcast") for name in imported), imported
    source = Path(wsnursery._broadcast.__file__).read_text()
    reaches = set(re.findall(r"\bconn\._(\w+)", source))
    assert reaches <= {"offer", "attach", "shed"}, reaches
