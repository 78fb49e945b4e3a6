"""The Redis backplane: broadcasts across processes through a real redis-server.

Every test starts its own ``redis-server`` (Debian's; see ``_redis.py``) on a
free port of 127.0.0.1. The multi-node tests run each node as a separate
process (``redis_node.py``) and talk to it with trio-websocket, an independent
client; the faster in-process tests run two servers in this trio run, each
with its own ``RedisBackplane`` (so its own Redis connections).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

import wsnursery
from _helpers import HOST, assert_no_leftover_tasks, closed_port, count_tasks, wait_until
from _redis import RedisProcess, running_redis, subscribers
from wsnursery import (
    Backoff,
    BackplaneError,
    BackplaneEvent,
    Broadcaster,
    Envelope,
    RedisBackplane,
    WebSocketConnection,
    WebSocketHandler,
    WebSocketServer,
    serve_websocket,
)
from wsnursery._backplane_envelope import decode_envelope, encode_envelope
from wsnursery._redis import as_backplane

HERE = Path(__file__).resolve().parent


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    with running_redis(tmp_path) as server:
        yield server


# -- the envelope on the wire ---------------------------------------------------------------


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope("all", "hello", None, frozenset(), "abc123"),
        Envelope("all", b"\x00\xff" * 100, None, frozenset({"n-1", "n-2"}), "abc123"),
        Envelope("group", "héllo ☃", "room:☃", frozenset({"x-9"}), "node"),
        Envelope("group", b"", "", frozenset(), "node"),
        Envelope("one", "to you", "abcdef-42", frozenset(), "f00"),
        Envelope("one", "x" * 100_000, "plain-id", frozenset(), ""),
    ],
)
def test_envelope_round_trip(envelope: Envelope) -> None:
    data = encode_envelope(envelope)
    assert decode_envelope(data) == envelope
    assert type(decode_envelope(data).message) is type(envelope.message)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        b"\x02\x00\x00" + b"\x00" * 8,  # unknown version
        b"\x01\x03\x00" + b"\x00" * 8,  # kind 3
        b"\x01\x08\x00" + b"\x00" * 8,  # unknown flag
        b"\x01\x00\x05ab",  # origin cut short
        b"\x01\x01\x00\x00\x00\x00\x09room",  # target cut short
        b"\x01\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff",  # absurd exclude count
        b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x05ab",  # exclude cut short
        b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xfe",  # text not UTF-8
        b"\x80\x03\x00\x00\x00",  # a pickle's first bytes: never unpickled
    ],
)
def test_malformed_envelopes_are_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_envelope(data)


def test_arguments_and_urls() -> None:
    backplane = as_backplane("redis://127.0.0.1:6379/0")
    assert isinstance(backplane, RedisBackplane)
    assert as_backplane(None) is None
    assert as_backplane(backplane) is backplane
    with pytest.raises(ValueError, match="redis://"):
        as_backplane("http://127.0.0.1:6379")
    with pytest.raises(TypeError):
        as_backplane(6379)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="connect_timeout"):
        RedisBackplane(connect_timeout=0)
    with pytest.raises(ValueError, match="namespace"):
        RedisBackplane(namespace="")
    with pytest.raises(ValueError):
        RedisBackplane(max_pending_messages=0)
    # The password never shows.
    assert "s3cret" not in repr(RedisBackplane("redis://:s3cret@127.0.0.1:1/0"))
    server = WebSocketServer(lambda request: None, [], backplane="redis://127.0.0.1:1/0")  # type: ignore[arg-type,return-value]
    assert isinstance(server.broadcaster.backplane, RedisBackplane)


def test_missing_coredis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "coredis", None)
    with pytest.raises(ImportError, match=r"pip install wsnursery\[redis\]"):
        RedisBackplane()
    with pytest.raises(ImportError, match=r"pip install wsnursery\[redis\]"):
        WebSocketServer(lambda request: None, [], backplane="redis://127.0.0.1:6379/0")  # type: ignore[arg-type,return-value]


# -- starting: a clear error, not a hang ------------------------------------------------------


async def _echo(request: wsnursery.WebSocketRequest) -> None:
    await request.accept()


async def test_redis_that_never_comes_up_is_a_clear_error_at_start() -> None:
    port = closed_port()
    backplane = RedisBackplane(f"redis://{HOST}:{port}/0", connect_timeout=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with pytest.raises(BackplaneError) as info:
                await nursery.start(
                    functools.partial(serve_websocket, _echo, HOST, 0, backplane=backplane)
                )
    assert f"redis://{HOST}:{port}/0" in str(info.value)
    assert "within 0.5 s" in str(info.value)
    assert type(info.value) is BackplaneError  # one plain exception, not a group


async def test_a_silent_redis_times_out_at_start() -> None:
    """Something listens but never answers: the connect timeout bounds the start."""
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, hold, listeners)
            backplane = RedisBackplane(f"redis://{HOST}:{port}/0", connect_timeout=0.5)
            with pytest.raises(BackplaneError, match=r"within 0\.5 s"):
                await nursery.start(
                    functools.partial(serve_websocket, _echo, HOST, 0, backplane=backplane)
                )
            assert held, "it did connect, and got no answer"
            nursery.cancel_scope.cancel()


async def test_every_reconnection_waits_as_a_backoff_with_jitter_says(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At start and after each loss, the waits between attempts come from a Backoff.

    No Redis here: each attempt (a session) is scripted to fail, or to come up
    and then fail; the virtual clock records when each attempt was made.
    """
    backplane = RedisBackplane(
        "redis://127.0.0.1:1/0", reconnect_delay=0.1, max_reconnect_delay=0.3
    )
    backplane._rng = random.Random(7).random
    script = ["fail", "fail", "fail", "up", "fail", "fail", "fail", "up", "fail"]
    attempts: list[float] = []

    async def session(
        link: Any, deadline: float, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        attempts.append(trio.current_time())
        if len(attempts) > len(script):
            await trio.sleep_forever()
        if script[len(attempts) - 1] == "up":
            backplane._came_up(link)
            task_status.started()
        raise ConnectionError("scripted")

    backplane._session = session  # type: ignore[method-assign]
    events: list[str] = []
    backplane.on_event = lambda event: events.append(event.kind)
    async with Broadcaster() as broadcaster, trio.open_nursery() as nursery:
        await nursery.start(functools.partial(backplane.serve, broadcaster))
        await wait_until(lambda: len(attempts) > len(script), 60)
        nursery.cancel_scope.cancel()

    waits = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # What a Backoff gives for the same rng: retries 1, 2, 3 at start; 1 to 4 after
    # the first loss; 1, 2 after the second (a connection that came up starts again).
    backoff = Backoff(initial=0.1, max_delay=0.3)
    rng = random.Random(7).random
    expected = [backoff.delay(retry, rng) for retry in (1, 2, 3, 1, 2, 3, 4, 1, 2)]
    assert waits == pytest.approx(expected)
    bases = [0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.3, 0.1, 0.2]  # doubling up to the maximum
    assert all(0.9 * base <= wait < base for wait, base in zip(waits, bases, strict=True))
    assert len(set(waits)) == len(waits)  # jittered: no two alike
    assert events == ["disconnected", "reconnected", "disconnected"]


# -- in process: two servers, each with its own Redis connections --------------------------------


class Rooms(WebSocketHandler):
    """Says its ID; ``join:G`` / ``leave:G``, answered once subscribed."""

    async def on_connect(self, conn: WebSocketConnection) -> None:
        await conn.send_message(f"id:{conn.id}")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        broadcaster = conn.server.broadcaster
        verb, _, group = text.partition(":")
        if verb == "join":
            broadcaster.join(conn, group)
        else:
            broadcaster.leave(conn, group)
        backplane = broadcaster.backplane
        assert isinstance(backplane, RedisBackplane)
        await backplane.wait_synced(broadcaster)
        await conn.send_message(f"{verb}:{group}:ok")


@asynccontextmanager
async def two_servers(url: str, **kwargs: Any) -> AsyncIterator[tuple[WebSocketServer, ...]]:
    async with trio.open_nursery() as nursery:
        servers = []
        for _ in range(2):
            backplane = RedisBackplane(url, reconnect_delay=0.05, max_reconnect_delay=0.5, **kwargs)
            servers.append(
                await nursery.start(
                    functools.partial(serve_websocket, Rooms, HOST, 0, backplane=backplane)
                )
            )
        try:
            yield tuple(servers)
        finally:
            for server in servers:
                await server.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(port: int, *groups: str) -> AsyncIterator[tuple[Any, str]]:
    """A trio-websocket client that joined ``groups``; yields it and its connection ID."""
    async with trio_websocket.open_websocket_url(f"ws://{HOST}:{port}/") as ws:
        conn_id = (await ws.get_message()).removeprefix("id:")
        for group in groups:
            await ws.send_message(f"join:{group}")
            assert await ws.get_message() == f"join:{group}:ok"
        yield ws, conn_id


async def nothing_more(ws: Any, wait: float = 0.3) -> None:
    with trio.move_on_after(wait):
        pytest.fail(f"unexpected message {await ws.get_message()!r}")


async def test_in_process_groups_send_one_and_exclude(redis: RedisProcess) -> None:
    with trio.fail_after(30):
        async with two_servers(redis.url) as (s1, s2), AsyncExitStack() as stack:
            a, _ = await stack.enter_async_context(client(s1.port, "room"))
            b, b_id = await stack.enter_async_context(client(s2.port, "room"))
            c, c_id = await stack.enter_async_context(client(s2.port))
            assert Broadcaster.node_of(b_id) == s2.broadcaster.node_id

            report = await s1.broadcaster.send_group("room", "to the room")
            assert (report.recipients, report.published) == (1, True)
            assert await a.get_message() == "to the room"
            assert await b.get_message() == "to the room"

            await s1.broadcaster.send_group("room", b"\x00binary\xff")
            assert await b.get_message() == b"\x00binary\xff"
            assert await a.get_message() == b"\x00binary\xff"

            report = await s1.broadcaster.send_one(c_id, "just you")
            assert (report.recipients, report.published) == (0, True)
            assert await c.get_message() == "just you"

            await s2.broadcaster.send_all("all but b", exclude=[b_id])
            assert await a.get_message() == "all but b"
            assert await c.get_message() == "all but b"
            await nothing_more(b)
            await nothing_more(c, 0)  # the group messages never reached c

            # Each node received from the other what it could not deliver itself.
            assert s2.broadcaster.backplane.stats().received == 3  # type: ignore[union-attr]
            assert s1.broadcaster.backplane.stats().received == 1  # type: ignore[union-attr]


async def test_a_node_subscribes_only_to_groups_it_has_members_in(redis: RedisProcess) -> None:
    with trio.fail_after(30):
        async with two_servers(redis.url, namespace="app1") as (s1, s2), AsyncExitStack() as st:
            a, _ = await st.enter_async_context(client(s1.port, "red", "blue"))
            b, _ = await st.enter_async_context(client(s2.port, "blue"))
            channels = ("app1:group:red", "app1:group:blue", "app1:all")
            assert subscribers(redis.port, *channels) == {
                "app1:group:red": 1,
                "app1:group:blue": 2,
                "app1:all": 2,
            }
            await a.send_message("leave:blue")
            assert await a.get_message() == "leave:blue:ok"
            assert subscribers(redis.port, "app1:group:blue")["app1:group:blue"] == 1
            # Another namespace shares the Redis without hearing anything.
            assert subscribers(redis.port, "wsnursery:all")["wsnursery:all"] == 0
            await b.aclose()
            await wait_until(lambda: not s2.broadcaster.groups, what="b left every group")
            await wait_until(
                lambda: subscribers(redis.port, "app1:group:blue")["app1:group:blue"] == 0,
                what="the node unsubscribed when its last member left",
            )


async def test_a_group_left_or_joined_again_while_its_subscription_is_in_flight(
    redis: RedisProcess,
) -> None:
    """The node's subscriptions end up matching its groups, however they race with Redis."""
    with trio.fail_after(30):
        async with two_servers(redis.url) as (s1, s2), AsyncExitStack() as stack:
            ws, conn_id = await stack.enter_async_context(client(s1.port))
            conn = s1.connections[conn_id]
            b = s1.broadcaster
            backplane = b.backplane
            assert isinstance(backplane, RedisBackplane)
            link = backplane._links[b.node_id]

            async def in_flight() -> None:
                # The subscription loop took the change and waits for Redis's answer.
                while link.changes:
                    await trio.lowlevel.checkpoint()
                assert not link.synced.is_set()

            b.join(conn, "g")
            await in_flight()
            b.leave(conn, "g")  # before Redis confirmed the SUBSCRIBE
            await backplane.wait_synced(b)
            assert subscribers(redis.port, "wsnursery:group:g") == {"wsnursery:group:g": 0}

            b.join(conn, "h")
            await backplane.wait_synced(b)
            b.leave(conn, "h")
            await in_flight()
            b.join(conn, "h")  # before Redis confirmed the UNSUBSCRIBE
            await backplane.wait_synced(b)
            assert subscribers(redis.port, "wsnursery:group:h") == {"wsnursery:group:h": 1}
            await s2.broadcaster.send_group("h", "from the other node")
            assert await ws.get_message() == "from the other node"


async def test_events_report_an_outage_and_delivery_resumes(redis: RedisProcess) -> None:
    seen: list[BackplaneEvent] = []
    with trio.fail_after(30):
        async with two_servers(redis.url) as (s1, s2), AsyncExitStack() as stack:
            bp1, bp2 = s1.broadcaster.backplane, s2.broadcaster.backplane
            assert isinstance(bp1, RedisBackplane)
            assert isinstance(bp2, RedisBackplane)
            bp1.on_event = seen.append
            events = stack.enter_context(bp2.events())
            a, _ = await stack.enter_async_context(client(s1.port, "g"))
            b, _ = await stack.enter_async_context(client(s2.port, "g"))
            assert bp1.connected
            assert bp2.connected

            redis.stop()
            event = await events.receive()
            assert event.kind == "disconnected"
            assert event.node_id == s2.broadcaster.node_id
            assert event.url == redis.url
            await wait_until(lambda: not bp1.connected, what="s1 noticed")
            assert [e.kind for e in seen] == ["disconnected"]

            # Local delivery goes on; what should have crossed is dropped, and counted.
            for text in ("local only 1", "local only 2"):
                report = await s1.broadcaster.send_group("g", text)
                assert report.delivered == 1
                assert await a.get_message() == text
            assert bp1.stats().dropped == 2

            redis.start()
            event = await events.receive()
            assert event.kind == "reconnected"
            assert event.outage > 0
            await wait_until(lambda: len(seen) == 2, what="s1 reconnected")
            assert seen[1].kind == "reconnected"
            assert seen[1].dropped == 2
            assert seen[1].outage > 0
            await bp1.wait_synced()
            await bp2.wait_synced()

            await s1.broadcaster.send_group("g", "after")
            assert await b.get_message() == "after"  # nothing from the outage came late
            assert await a.get_message() == "after"
            await s2.broadcaster.send_all("back the other way")
            assert await a.get_message() == "back the other way"
            stats = bp1.stats()
            assert (stats.connected, stats.outages, stats.dropped) == (True, 1, 2)


async def test_a_full_publish_queue_drops_instead_of_waiting(redis: RedisProcess) -> None:
    """Redis slower than the senders: sends return at once, the excess is dropped and counted."""
    with trio.fail_after(30):
        async with two_servers(redis.url) as (_, s2), AsyncExitStack() as stack:
            b, _ = await stack.enter_async_context(client(s2.port, "g"))
            slow = RedisBackplane(redis.url, max_pending_messages=2, publish_linger=1.0)
            sender = await stack.enter_async_context(Broadcaster(backplane=slow))
            for k in range(10):  # all within the publisher's linger: it takes none yet
                report = await sender.send_group("g", f"m{k}")
                assert report.published
            assert (slow.stats().pending, slow.stats().dropped) == (2, 8)
            assert await b.get_message() == "m0"
            assert await b.get_message() == "m1"
            await nothing_more(b)
            assert (slow.stats().published, slow.stats().pending) == (2, 0)


async def test_standalone_broadcaster_with_redis_and_no_task_left(redis: RedisProcess) -> None:
    baseline = count_tasks()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve_websocket, Rooms, HOST, 0, backplane=redis.url)
            )
            async with (
                Broadcaster(backplane=RedisBackplane(redis.url)) as other,
                client(server.port, "news") as (ws, _),
            ):
                await other.send_group("news", "from a standalone broadcaster")
                assert await ws.get_message() == "from a standalone broadcaster"
            await server.aclose()
            nursery.cancel_scope.cancel()
    await assert_no_leftover_tasks(baseline)


# -- separate processes ------------------------------------------------------------------------


class Node:
    """A node process (``redis_node.py``) and a control connection to it."""

    def __init__(self, proc: trio.Process, ready: dict[str, Any]) -> None:
        self.proc = proc
        self.port: int = ready["port"]
        self.node_id: str = ready["node"]
        self.control: Any = None

    async def command(self, **command: Any) -> dict[str, Any]:
        await self.control.send_message(json.dumps(command))
        answer: dict[str, Any] = json.loads(await self.control.get_message())
        return answer

    async def stats(self) -> dict[str, Any]:
        return await self.command(op="stats")

    async def stop(self) -> int:
        """SIGTERM by PID: the node stops gracefully (1001 to its clients)."""
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        with trio.fail_after(15):
            return await self.proc.wait()


async def _read_ready(proc: trio.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    buffer = b""
    while b"\n" not in buffer:
        data = await proc.stdout.receive_some(4096)
        if not data:
            raise AssertionError(f"node exited before it was ready: {buffer!r}")
        buffer += data
    line = buffer.split(b"\n", 1)[0].decode()
    assert line.startswith("READY "), line
    ready: dict[str, Any] = json.loads(line.removeprefix("READY "))
    return ready


@asynccontextmanager
async def cluster(url: str, count: int) -> AsyncIterator[list[Node]]:
    """``count`` node processes sharing the Redis at ``url``; stopped at the end."""
    procs: list[trio.Process] = []
    try:
        async with AsyncExitStack() as stack:
            nodes = []
            for _ in range(count):
                proc = await trio.lowlevel.open_process(
                    [sys.executable, str(HERE / "redis_node.py"), "--redis", url],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                procs.append(proc)
                with trio.fail_after(20):
                    node = Node(proc, await _read_ready(proc))
                node.control = await stack.enter_async_context(
                    trio_websocket.open_websocket_url(f"ws://{HOST}:{node.port}/control")
                )
                nodes.append(node)
            yield nodes
    finally:
        with trio.move_on_after(15) as waiting:
            for proc in procs:
                if proc.stdin is not None:
                    await proc.stdin.aclose()  # EOF on stdin: the node stops
            for proc in procs:
                await proc.wait()
        if waiting.cancelled_caught:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


@asynccontextmanager
async def member(node: Node, *groups: str) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    async with trio_websocket.open_websocket_url(f"ws://{HOST}:{node.port}/") as ws:
        hello = json.loads(await ws.get_message())
        assert hello["node"] == node.node_id
        for group in groups:
            await ws.send_message(f"join:{group}")
            assert await ws.get_message() == f"joined:{group}"
        yield ws, hello


async def test_group_message_reaches_members_on_every_node(redis: RedisProcess) -> None:
    with trio.fail_after(60):
        async with cluster(redis.url, 3) as nodes, AsyncExitStack() as stack:
            members = [await stack.enter_async_context(member(n, "room")) for n in nodes]
            outsider, _ = await stack.enter_async_context(member(nodes[1]))
            assert len({hello["pid"] for _, hello in members}) == 3
            assert len({hello["id"] for _, hello in members}) == 3  # IDs unique across nodes
            for i, node in enumerate(nodes):
                answer = await node.command(op="send_group", group="room", text=f"from {i}")
                assert answer["report"]["recipients"] == 1  # the local member
                assert answer["report"]["published"] is True
                for ws, _ in members:
                    assert await ws.get_message() == f"from {i}"
            await node.command(op="send_group", group="room", text="bytes", binary=True)
            for ws, _ in members:
                assert await ws.get_message() == b"bytes"
            # In order: many sends from one node arrive in the order sent, on every node.
            for k in range(50):
                await nodes[0].command(op="send_group", group="room", text=f"seq {k}")
            for ws, _ in members:
                for k in range(50):
                    assert await ws.get_message() == f"seq {k}"
            await nothing_more(outsider)


async def test_send_one_is_routed_to_the_node_that_holds_the_connection(
    redis: RedisProcess,
) -> None:
    with trio.fail_after(60):
        async with cluster(redis.url, 3) as (a, b, c), AsyncExitStack() as stack:
            on_b, hello = await stack.enter_async_context(member(b))
            on_c, _ = await stack.enter_async_context(member(c))
            target = hello["id"]
            assert target.startswith(b.node_id + "-")
            received_c = (await c.stats())["stats"]["received"]

            answer = await a.command(op="send_one", target=target, text="for b's client")
            assert answer["report"]["recipients"] == 0
            assert answer["report"]["published"] is True
            assert await on_b.get_message() == "for b's client"

            # Only b's node channel carried it: c never saw it.
            await wait_until_async(
                lambda: b.stats(), lambda s: s["stats"]["received"] == 1, "b received it"
            )
            assert (await c.stats())["stats"]["received"] == received_c
            await nothing_more(on_c)

            # An ID on a node that does not exist goes nowhere, quietly.
            answer = await a.command(op="send_one", target="0badc0ffee00-1", text="lost")
            assert answer["report"]["recipients"] == 0
            await nothing_more(on_b, 0.2)


async def wait_until_async(
    get: Any, check: Any, what: str, timeout: float = 10.0
) -> dict[str, Any]:
    with trio.move_on_after(timeout):
        while True:
            value: dict[str, Any] = await get()
            if check(value):
                return value
            await trio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


async def test_a_node_leaving(redis: RedisProcess) -> None:
    with trio.fail_after(60):
        async with cluster(redis.url, 3) as (a, b, c), AsyncExitStack() as stack:
            on_a, _ = await stack.enter_async_context(member(a, "room"))
            on_b, _ = await stack.enter_async_context(member(b, "room"))
            on_c, hello_c = await stack.enter_async_context(member(c, "room"))
            assert subscribers(redis.port, "wsnursery:group:room")["wsnursery:group:room"] == 3

            assert await c.stop() == 0
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await on_c.get_message()
            assert closed.value.reason.code == 1001  # a graceful stop
            await wait_until(
                lambda: (
                    subscribers(redis.port, "wsnursery:group:room")["wsnursery:group:room"] == 2
                ),
                what="c's subscriptions went with it",
            )

            answer = await a.command(op="send_group", group="room", text="without c")
            assert answer["report"]["recipients"] == 1
            assert await on_a.get_message() == "without c"
            assert await on_b.get_message() == "without c"
            answer = await b.command(op="send_one", target=hello_c["id"], text="gone")
            assert answer["report"] == {
                "recipients": 0,
                "delivered": 0,
                "dropped": 0,
                "closed": 0,
                "published": True,
            }
            await nothing_more(on_a, 0.2)
            await nothing_more(on_b, 0)


async def test_redis_stopped_and_restarted_mid_stream(redis: RedisProcess) -> None:
    with trio.fail_after(60):
        async with cluster(redis.url, 2) as (a, b), AsyncExitStack() as stack:
            on_a, _ = await stack.enter_async_context(member(a, "g"))
            on_b, _ = await stack.enter_async_context(member(b, "g"))
            for k in range(5):
                await a.command(op="send_group", group="g", text=f"before {k}")
            for ws in (on_a, on_b):
                for k in range(5):
                    assert await ws.get_message() == f"before {k}"

            redis.stop()
            for node in (a, b):
                await wait_until_async(
                    node.stats,
                    lambda s: [e["kind"] for e in s["events"]] == ["disconnected"],
                    "the node noticed",
                )
            # Local delivery continues on both nodes.
            for k in range(3):
                await a.command(op="send_group", group="g", text=f"during {k}")
                assert await on_a.get_message() == f"during {k}"
            await b.command(op="send_group", group="g", text="b alone")
            assert await on_b.get_message() == "b alone"

            redis.start()
            stats: dict[str, dict[str, Any]] = {}
            for name, node in (("a", a), ("b", b)):
                stats[name] = await wait_until_async(
                    node.stats,
                    lambda s: [e["kind"] for e in s["events"]] == ["disconnected", "reconnected"],
                    "the node reconnected",
                )
            # The gap is reported: how long, and how many sends did not cross.
            gap_a = stats["a"]["events"][1]
            gap_b = stats["b"]["events"][1]
            assert (gap_a["dropped"], gap_b["dropped"]) == (3, 1)
            assert min(gap_a["outage"], gap_b["outage"]) > 0
            assert stats["a"]["stats"]["outages"] == 1

            # Remote delivery resumes, both ways; nothing from the gap arrives late.
            await a.command(op="send_group", group="g", text="after")
            assert await on_a.get_message() == "after"
            assert await on_b.get_message() == "after"
            await b.command(op="send_group", group="g", text="after from b")
            assert await on_b.get_message() == "after from b"
            assert await on_a.get_message() == "after from b"
