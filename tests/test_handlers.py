"""WebSocketHandler objects over real TCP on 127.0.0.1.

The hooks (validate, on_connect, on_text, on_binary, on_close_message,
on_disconnect) are recorded, per connection, in the order they run, under every
way a connection can end; then per-connection state, ``conn.start_soon``,
``set_handler``, ``validate``'s answers, the request's attributes, structured
concurrency with 1,000 connections, and independent clients.

Every connection is named by its ``name`` query parameter (``/?name=a``); the
recording handler files each hook call under that name.
"""

from __future__ import annotations

import logging
import resource
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.sync.client import connect as ws_sync_connect
from websockets.trio.client import connect as ws_trio_connect

import _helpers
from _helpers import (
    HOST,
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    build_frame,
    close_payload,
    count_tasks,
    raw_connect,
    wait_until,
)
from wsnursery import (
    Accept,
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    Reject,
    WebSocketConnection,
    WebSocketHandler,
    WebSocketRequest,
    WebSocketServer,
    open_websocket_url,
    serve_websocket,
)

TIMEOUT = 5  # seconds: the hard cap of most tests

Event = tuple[Any, ...]


class HookError(Exception):
    """What a deliberately broken hook raises."""


# -- the recording handler --------------------------------------------------------


@dataclass
class Book:
    """Where recording handlers write: hook calls by connection name, and the connections."""

    events: defaultdict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    conns: dict[str, WebSocketConnection] = field(default_factory=dict)

    def hooks(self, name: str) -> list[str]:
        return [event[0] for event in self.events[name]]

    def count(self, name: str, hook: str) -> int:
        return self.hooks(name).count(hook)

    def disconnected(self, name: str) -> bool:
        return "disconnect" in self.hooks(name)

    async def wait_disconnect(self, name: str, timeout: float = 3.0) -> None:
        await wait_until(lambda: self.disconnected(name), timeout, f"on_disconnect of {name}")


def _name(obj: WebSocketRequest | WebSocketConnection) -> str:
    return obj.query.get("name", "?")


class Recording(WebSocketHandler):
    """Records each hook in the connection's list and echoes every message.

    ``fail`` names a hook that raises :class:`HookError` for the connection
    named ``victim``.
    """

    book: Book  # for subclasses passed as a class (one instance per connection)

    def __init__(self, book: Book | None = None, *, fail: str | None = None) -> None:
        if book is not None:
            self.book = book
        self.fail = fail

    def record(self, name: str, *event: Any) -> None:
        self.book.events[name].append(event)
        if event[0] == self.fail and name == "victim":
            raise HookError(event[0])

    async def validate(self, request: WebSocketRequest) -> Accept | Reject | None:
        self.record(_name(request), "validate")
        return None

    async def on_connect(self, conn: WebSocketConnection) -> None:
        self.book.conns[_name(conn)] = conn
        self.record(_name(conn), "connect")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        self.record(_name(conn), "text", text)
        await conn.send_message(text)

    async def on_binary(self, conn: WebSocketConnection, data: bytes) -> None:
        self.record(_name(conn), "binary", data)
        await conn.send_message(data)

    async def on_close_message(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        self.record(_name(conn), "close_message", reason.code, reason.reason)

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        self.record(_name(conn), "disconnect", reason.code)


def factory(base: type[Recording], book: Book) -> type[Recording]:
    """A subclass of ``base`` writing to ``book``, to be passed as a class."""
    return type(f"{base.__name__}For", (base,), {"book": book})


# -- running servers and clients ------------------------------------------------


def serving(handler: Any, **kwargs: Any) -> AbstractAsyncContextManager[WebSocketServer]:
    """A server for the ``async with`` block; every hook has returned when it exits."""
    return _helpers.serving(
        handler, **{"ping_interval": None, "close_timeout": 2, "open_timeout": 2, **kwargs}
    )


class StoppableServer:
    """A server in a cancel scope of its own, for tests that cancel it."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def run(
        self, handler: Any, kwargs: dict[str, Any], task_status: trio.TaskStatus[WebSocketServer]
    ) -> None:
        try:
            with self.scope:
                await serve_websocket(handler, HOST, 0, task_status=task_status, **kwargs)
        finally:
            self.done.set()


def url(server: WebSocketServer, name: str, path: str = "/") -> str:
    return f"ws://{HOST}:{server.port}{path}?name={name}"


@asynccontextmanager
async def bystander(server: WebSocketServer) -> AsyncIterator[WebSocketConnection]:
    """A connection open around the test's scenario, which must keep working."""
    async with open_websocket_url(url(server, "bystander"), ping_interval=None) as ws:
        await ws.send_message("before")
        assert await ws.get_message() == "before"
        yield ws
        await ws.send_message("after")
        assert await ws.get_message() == "after"
        await ws.send_message(b"after")
        assert await ws.get_message() == b"after"


def assert_bystander_ok(book: Book) -> None:
    assert book.events["bystander"] == [
        ("validate",),
        ("connect",),
        ("text", "before"),
        ("text", "after"),
        ("binary", b"after"),
        ("close_message", 1000, ""),
        ("disconnect", 1000),
    ]


# -- hook order under each way a connection can end -------------------------------


async def test_client_closes_normally() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book)) as server, bystander(server):
            async with open_websocket_url(url(server, "a")) as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                await ws.send_message(b"\x00\x01")
                assert await ws.get_message() == b"\x00\x01"
            assert ws.closed == CloseReason(1000, "", initiated_by_peer=False)
            await book.wait_disconnect("a")
    assert book.events["a"] == [
        ("validate",),
        ("connect",),
        ("text", "hi"),
        ("binary", b"\x00\x01"),
        ("close_message", 1000, ""),
        ("disconnect", 1000),
    ]
    assert_bystander_ok(book)


async def test_client_closes_with_application_code_and_reason() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book)) as server, bystander(server):
            async with open_websocket_url(url(server, "a")) as ws:
                await ws.aclose(4000, "done here")
            await book.wait_disconnect("a")
    assert book.events["a"] == [
        ("validate",),
        ("connect",),
        ("close_message", 4000, "done here"),
        ("disconnect", 4000),
    ]
    assert_bystander_ok(book)


async def test_client_vanishes_without_a_close_frame() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book)) as server, bystander(server):
            stream, reader, _ = await raw_connect(server.port, "/?name=a")
            await stream.send_all(build_frame(OP_TEXT, b"one"))
            frame = await reader.read_frame()
            assert frame is not None
            assert (frame.opcode, frame.payload) == (OP_TEXT, b"one")
            await stream.aclose()  # TCP goes away; no close frame
            await book.wait_disconnect("a")
    assert book.events["a"] == [("validate",), ("connect",), ("text", "one"), ("disconnect", 1006)]
    assert_bystander_ok(book)


async def test_protocol_error_from_the_client_is_1002() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book), compression=False) as server, bystander(server):
            stream, reader, _ = await raw_connect(server.port, "/?name=a")
            await stream.send_all(build_frame(OP_TEXT, b"fine"))
            frame = await reader.read_frame()
            assert frame is not None
            assert (frame.opcode, frame.payload) == (OP_TEXT, b"fine")
            await stream.send_all(build_frame(OP_TEXT, b"bad", rsv=4))  # RSV1 not negotiated
            frames = await reader.read_all()
            await stream.aclose()
            assert [f.opcode for f in frames] == [OP_CLOSE]
            assert frames[0].close_code == 1002
            await book.wait_disconnect("a")
    assert book.events["a"] == [
        ("validate",),
        ("connect",),
        ("text", "fine"),
        ("disconnect", 1002),
    ]
    assert_bystander_ok(book)


async def test_message_too_big_is_1009() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book), max_message_size=1024) as server, bystander(server):
            async with open_websocket_url(url(server, "a")) as ws:
                await ws.send_message("x" * 1024)  # exactly the limit: fine
                assert await ws.get_message() == "x" * 1024
                await ws.send_message(b"y" * 2000)
                reason = await ws.wait_closed()
            assert reason.code == 1009
            await book.wait_disconnect("a")
    assert book.events["a"] == [
        ("validate",),
        ("connect",),
        ("text", "x" * 1024),
        ("disconnect", 1009),
    ]
    assert_bystander_ok(book)


async def test_keepalive_timeout_is_1011() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with (
            serving(Recording(book), ping_interval=0.2, ping_timeout=0.3) as server,
            bystander(server),
        ):
            # A raw client that completes the handshake and then never reads.
            stream, _, _ = await raw_connect(server.port, "/?name=a")
            start = trio.current_time()
            await book.wait_disconnect("a")
            assert trio.current_time() - start < 2.0
            await stream.aclose()
            await trio.sleep(0.6)  # more ping rounds: the bystander answers them
    assert book.events["a"] == [("validate",), ("connect",), ("disconnect", 1011)]
    assert_bystander_ok(book)


class Stuck(Recording):
    """on_text("block") awaits forever: the server must cancel it to stop."""

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        if text != "block":
            await super().on_text(conn, text)
            return
        self.record(_name(conn), "text", text)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.record(_name(conn), "text cancelled")
            raise


async def test_server_cancelled_while_a_hook_awaits() -> None:
    book = Book()
    close_timeout = 0.5
    reasons: dict[str, CloseReason] = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as outer:
            stoppable = StoppableServer()
            server = await outer.start(
                stoppable.run, Stuck(book), {"close_timeout": close_timeout, "ping_interval": None}
            )

            async def client(name: str, first: str) -> None:
                async with open_websocket_url(url(server, name), ping_interval=None) as ws:
                    await ws.send_message(first)
                    reasons[name] = await ws.wait_closed()

            async with trio.open_nursery() as clients:
                clients.start_soon(client, "a", "block")  # a hook inside an await
                clients.start_soon(client, "b", "hello")  # an idle connection
                await wait_until(lambda: ("text", "block") in book.events["a"])
                await wait_until(lambda: ("text", "hello") in book.events["b"])
                start = trio.current_time()
                stoppable.scope.cancel()
                await stoppable.done.wait()
                assert trio.current_time() - start < close_timeout + 1.0
    assert reasons["a"].code == 1001
    assert reasons["b"].code == 1001
    events = book.events["a"]
    assert events[:4] == [("validate",), ("connect",), ("text", "block"), ("text cancelled",)]
    assert book.count("a", "disconnect") == 1
    assert events[-1][0] == "disconnect"
    assert book.events["b"] == [
        ("validate",),
        ("connect",),
        ("text", "hello"),
        ("close_message", 1001, ""),
        ("disconnect", 1001),
    ]


async def test_server_aclose_closes_with_1001() -> None:
    book = Book()
    reasons: list[CloseReason] = []
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book)) as server, trio.open_nursery() as clients:

            async def client(name: str) -> None:
                async with open_websocket_url(url(server, name), ping_interval=None) as ws:
                    await ws.send_message(name)
                    assert await ws.get_message() == name
                    reasons.append(await ws.wait_closed())

            for name in "abc":
                clients.start_soon(client, name)
            await wait_until(lambda: len(server.connections) == 3)
            await trio.testing.wait_all_tasks_blocked(0.01)
            await server.aclose()
            assert len(server.connections) == 0
    assert [r.code for r in reasons] == [1001] * 3
    for name in "abc":
        assert book.events[name] == [
            ("validate",),
            ("connect",),
            ("text", name),
            ("close_message", 1001, ""),
            ("disconnect", 1001),
        ]


async def test_close_by_id_through_the_registry() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book)) as server, bystander(server):
            async with open_websocket_url(url(server, "a")) as ws:
                await ws.send_message("x")
                assert await ws.get_message() == "x"
                conn_id = book.conns["a"].id
                assert server.connections[conn_id] is book.conns["a"]
                assert len(server.connections) == 2
                assert await server.connections.close(conn_id, 4001, "bye") is True
                reason = await ws.wait_closed()
                assert (reason.code, reason.reason) == (4001, "bye")
            await book.wait_disconnect("a")
            assert conn_id not in server.connections
            assert await server.connections.close(conn_id) is False
            assert await server.connections.close("no such id") is False
    assert book.events["a"] == [
        ("validate",),
        ("connect",),
        ("text", "x"),
        ("close_message", 4001, ""),
        ("disconnect", 4001),
    ]
    assert_bystander_ok(book)


class ClosesFromHook(Recording):
    async def on_connect(self, conn: WebSocketConnection) -> None:
        await super().on_connect(conn)
        if _name(conn) == "early":
            await conn.aclose(4002, "from on_connect")
            self.record(_name(conn), "aclose returned")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        if text != "quit":
            await super().on_text(conn, text)
            return
        self.record(_name(conn), "text", text)
        await conn.aclose(4003, "from on_text")
        self.record(_name(conn), "aclose returned")
        with pytest.raises(ConnectionClosed):
            await conn.send_message("too late")


@pytest.mark.parametrize("where", ["on_connect", "on_text"])
async def test_aclose_from_inside_a_hook_does_not_deadlock(where: str) -> None:
    book = Book()
    name = "early" if where == "on_connect" else "late"
    # A large close_timeout: waiting on it anywhere would show in the elapsed time.
    async with serving(ClosesFromHook(book), close_timeout=30) as server, bystander(server):
        with trio.fail_after(1.5):
            async with open_websocket_url(url(server, name), close_timeout=30) as ws:
                if where == "on_text":
                    await ws.send_message("quit")
                reason = await ws.wait_closed()
            await book.wait_disconnect(name, timeout=1.0)
    code, text = (4002, "from on_connect") if where == "on_connect" else (4003, "from on_text")
    assert (reason.code, reason.reason) == (code, text)
    expected: list[Event] = [("validate",), ("connect",)]
    if where == "on_text":
        expected.append(("text", "quit"))
    expected += [("aclose returned",), ("close_message", code, ""), ("disconnect", code)]
    assert book.events[name] == expected
    assert_bystander_ok(book)


# -- hooks that raise ------------------------------------------------------------


async def test_validate_raising_gives_500_and_no_other_hook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = Book()
    caplog.set_level(logging.ERROR, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book, fail="validate")) as server, bystander(server):
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(url(server, "victim")):
                    pytest.fail("validate raised: no connection")
            assert info.value.status_code == 500
    assert book.events["victim"] == [("validate",)]
    assert "HookError: validate" in caplog.text
    assert_bystander_ok(book)


@pytest.mark.parametrize("hook", ["connect", "text", "binary"])
async def test_hook_raising_closes_with_1011(caplog: pytest.LogCaptureFixture, hook: str) -> None:
    book = Book()
    caplog.set_level(logging.ERROR, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book, fail=hook)) as server, bystander(server):
            async with open_websocket_url(url(server, "victim")) as ws:
                with suppress(ConnectionClosed):
                    await ws.send_message("t")
                    await ws.send_message(b"b")
                    await ws.send_message("never delivered after the failure")
                reason = await ws.wait_closed()
            await book.wait_disconnect("victim")
    assert reason.code == 1011
    events = book.events["victim"]
    failed_at = events.index(next(e for e in events if e[0] == hook))
    # Nothing more is delivered after the failing hook; the peer's answer to
    # our 1011 close frame may still be reported; on_disconnect comes last, once.
    after = [e[0] for e in events[failed_at + 1 :]]
    assert after in (["disconnect"], ["close_message", "disconnect"]), events
    assert events[-1] == ("disconnect", 1011)
    assert f"HookError: {hook}" in caplog.text
    assert "Traceback" in caplog.text
    assert_bystander_ok(book)


async def test_on_close_message_raising_is_logged_and_on_disconnect_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = Book()
    caplog.set_level(logging.ERROR, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book, fail="close_message")) as server, bystander(server):
            async with open_websocket_url(url(server, "victim")) as ws:
                await ws.send_message("t")
                assert await ws.get_message() == "t"
            # The client's close handshake completes (the peer started it with 1000).
            assert ws.closed is not None
            assert ws.closed.code == 1000
            await book.wait_disconnect("victim")
    assert book.hooks("victim") == ["validate", "connect", "text", "close_message", "disconnect"]
    assert "HookError: close_message" in caplog.text
    assert_bystander_ok(book)


async def test_on_disconnect_raising_is_logged_and_nothing_else_breaks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = Book()
    caplog.set_level(logging.ERROR, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book, fail="disconnect")) as server, bystander(server):
            async with open_websocket_url(url(server, "victim")) as ws:
                await ws.send_message("t")
                assert await ws.get_message() == "t"
            await book.wait_disconnect("victim")
            await wait_until(lambda: "on_disconnect failed" in caplog.text)
            # The server still serves new connections.
            async with open_websocket_url(url(server, "after")) as ws:
                await ws.send_message("still here")
                assert await ws.get_message() == "still here"
            await book.wait_disconnect("after")
    assert book.count("victim", "disconnect") == 1
    assert "HookError: disconnect" in caplog.text
    assert book.events["after"][-1] == ("disconnect", 1000)
    assert_bystander_ok(book)


async def test_on_disconnect_exactly_once_never_after_a_rejection() -> None:
    book = Book()

    class Picky(Recording):
        async def validate(self, request: WebSocketRequest) -> Accept | Reject | None:
            await super().validate(request)
            if _name(request).startswith("no"):
                return Reject(403, headers=[("X-Why", "picky")], body="not you")
            return None

    with trio.fail_after(TIMEOUT):
        async with serving(Picky(book)) as server:
            for i in range(5):
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(url(server, f"no{i}")):
                        pytest.fail("rejected")
                assert info.value.status_code == 403
                assert info.value.headers["x-why"] == "picky"
                assert info.value.body == b"not you"
                async with open_websocket_url(url(server, f"yes{i}")):
                    pass
    for i in range(5):
        assert book.events[f"no{i}"] == [("validate",)]
        assert book.count(f"yes{i}", "connect") == 1
        assert book.count(f"yes{i}", "disconnect") == 1


# -- messages ----------------------------------------------------------------------


async def test_200_messages_arrive_in_order_at_the_right_hook() -> None:
    book = Book()
    n = 200

    def message(i: int) -> str | bytes:
        return f"text {i}" if i % 2 == 0 else i.to_bytes(2, "big")

    with trio.fail_after(TIMEOUT):
        async with (
            serving(Recording(book)) as server,
            open_websocket_url(url(server, "a"), max_queue=n) as ws,
        ):
            received: list[str | bytes] = []

            async def read_echoes() -> None:
                for _ in range(n):
                    received.append(await ws.get_message())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_echoes)
                for i in range(n):
                    await ws.send_message(message(i))
    expected = [message(i) for i in range(n)]
    assert received == expected
    delivered = [e for e in book.events["a"] if e[0] in ("text", "binary")]
    assert delivered == [("text" if isinstance(m, str) else "binary", m) for m in expected]


# -- per-connection state -------------------------------------------------------


class Counter(WebSocketHandler):
    def __init__(self) -> None:
        self.count = 0

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        self.count += 1
        await conn.send_message(f"{id(self)}:{self.count}")


async def _counts(server: WebSocketServer) -> list[tuple[str, int]]:
    """Two connections, three messages each, interleaved: (instance, count) answers."""
    answers: list[tuple[str, int]] = []
    async with (
        open_websocket_url(url(server, "a")) as a,
        open_websocket_url(url(server, "b")) as b,
    ):
        for _ in range(3):
            for ws in (a, b):
                await ws.send_message("tick")
                instance, count = str(await ws.get_message()).split(":")
                answers.append((instance, int(count)))
    return answers


async def test_a_class_gives_each_connection_its_own_instance() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(Counter) as server:
            answers = await _counts(server)
    a, b = answers[0::2], answers[1::2]
    assert [count for _, count in a] == [1, 2, 3]
    assert [count for _, count in b] == [1, 2, 3]
    assert len({instance for instance, _ in a}) == 1
    assert len({instance for instance, _ in b}) == 1
    assert a[0][0] != b[0][0]


async def test_an_instance_is_shared_by_every_connection() -> None:
    shared = Counter()
    with trio.fail_after(TIMEOUT):
        async with serving(shared) as server:
            answers = await _counts(server)
    assert [count for _, count in answers] == [1, 2, 3, 4, 5, 6]
    assert {instance for instance, _ in answers} == {str(id(shared))}
    assert shared.count == 6


async def test_factory_class_records_under_each_connection() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with (
            serving(factory(Recording, book)) as server,
            open_websocket_url(url(server, "a")) as a,
            open_websocket_url(url(server, "b")) as b,
        ):
            await a.send_message("1")
            await b.send_message("2")
            assert await a.get_message() == "1"
            assert await b.get_message() == "2"
    assert book.hooks("a") == book.hooks("b")
    assert book.events["a"][-1] == book.events["b"][-1] == ("disconnect", 1000)


# -- tasks started with conn.start_soon --------------------------------------------


class WithTasks(Recording):
    async def on_connect(self, conn: WebSocketConnection) -> None:
        await super().on_connect(conn)
        conn.start_soon(self.companion, conn)

    async def companion(self, conn: WebSocketConnection) -> None:
        name = _name(conn)
        self.book.events[name].append(("task started",))
        await conn.send_message("task alive")
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.book.events[name].append(("task cancelled",))
            raise

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        if text == "crash":
            conn.start_soon(self.crash)
        await super().on_text(conn, text)

    async def crash(self) -> None:
        await trio.sleep(0.01)
        raise ValueError("task bug")


async def test_start_soon_task_lives_until_the_connection_ends() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving(WithTasks(book)) as server:
            before = count_tasks()
            async with open_websocket_url(url(server, "a")) as ws:
                assert await ws.get_message() == "task alive"
                for i in range(3):
                    await ws.send_message(str(i))
                    assert await ws.get_message() == str(i)
                    assert "task cancelled" not in book.hooks("a")
                assert count_tasks() > before
            await wait_until(lambda: "task cancelled" in book.hooks("a"))
            await wait_until(lambda: count_tasks() == before)
    hooks = book.hooks("a")
    assert hooks.count("task started") == hooks.count("task cancelled") == 1
    assert hooks.count("disconnect") == 1
    assert hooks.index("disconnect") < hooks.index("task cancelled")


async def test_start_soon_task_that_raises_closes_its_connection_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = Book()
    caplog.set_level(logging.ERROR, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with (
            serving(WithTasks(book)) as server,
            open_websocket_url(url(server, "bystander")) as other,
        ):
            assert await other.get_message() == "task alive"
            async with open_websocket_url(url(server, "a")) as ws:
                assert await ws.get_message() == "task alive"
                await ws.send_message("crash")
                assert await ws.get_message() == "crash"
                reason = await ws.wait_closed()
            assert reason.code == 1011
            await book.wait_disconnect("a")
            await other.send_message("unaffected")
            assert await other.get_message() == "unaffected"
            assert not book.disconnected("bystander")
    assert "ValueError: task bug" in caplog.text
    assert book.count("a", "disconnect") == 1
    assert book.events["a"][-1][0] in ("disconnect", "task cancelled")
    assert ("disconnect", 1011) in book.events["a"]
    assert book.events["bystander"][-2:] == [("disconnect", 1000), ("task cancelled",)]


# -- set_handler and get_message --------------------------------------------------


class First(Recording):
    def __init__(self, book: Book, second: Recording) -> None:
        super().__init__(book)
        self.second = second

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        self.record(_name(conn), "first text", text)
        if text == "switch":
            await conn.set_handler(self.second)
        await conn.send_message(f"first:{text}")

    async def on_close_message(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        self.record(_name(conn), "first close_message")

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        self.record(_name(conn), "first disconnect")


class Second(Recording):
    async def on_connect(self, conn: WebSocketConnection) -> None:
        self.record(_name(conn), "second connect")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        self.record(_name(conn), "second text", text)
        await conn.send_message(f"second:{text}")

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        self.record(_name(conn), "second disconnect", reason.code)


async def test_set_handler_hands_the_connection_over() -> None:
    book = Book()
    handler = First(book, Second(book))
    with trio.fail_after(TIMEOUT):
        async with serving(handler) as server:
            async with open_websocket_url(url(server, "a")) as ws:
                for text in ["hello", "switch", "after", "more"]:
                    await ws.send_message(text)
                answers = [await ws.get_message() for _ in range(4)]
            await wait_until(lambda: "second disconnect" in book.hooks("a"))
    assert answers == ["first:hello", "first:switch", "second:after", "second:more"]
    assert book.events["a"] == [
        ("validate",),
        ("connect",),
        ("first text", "hello"),
        ("first text", "switch"),
        ("second connect",),
        ("second text", "after"),
        ("second text", "more"),
        ("close_message", 1000, ""),
        ("second disconnect", 1000),
    ]

    # set_handler is for handler-object connections only.
    async def function_handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        with pytest.raises(RuntimeError):
            await conn.set_handler(Second(book))
        await conn.send_message("checked")

    with trio.fail_after(TIMEOUT):
        async with (
            serving(function_handler) as server,
            open_websocket_url(url(server, "f")) as ws,
        ):
            assert await ws.get_message() == "checked"


async def test_get_message_on_a_handler_object_connection_raises() -> None:
    class Puller(WebSocketHandler):
        async def on_connect(self, conn: WebSocketConnection) -> None:
            try:
                await conn.get_message()
            except RuntimeError as exc:
                await conn.send_message(f"RuntimeError: {exc}")
            else:  # pragma: no cover - the test fails on the client side
                await conn.send_message("no error")

    with trio.fail_after(TIMEOUT):
        async with serving(Puller()) as server, open_websocket_url(url(server, "a")) as ws:
            answer = await ws.get_message()
    assert isinstance(answer, str)
    assert answer.startswith("RuntimeError:")
    assert "get_message" in answer


# -- validate's answers and the request ------------------------------------------


class Inspector(WebSocketHandler):
    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    async def validate(self, request: WebSocketRequest) -> Accept | Reject | None:
        room = request.path_params["room"]
        if room == "closed":
            return Reject(451, headers=[("X-Room", room)], body="room closed")
        if room == "moved":
            return Reject(302, headers=[("Location", "/rooms/lobby")])
        self.seen.update(
            path=request.path,
            url_path=request.url_path,
            query_string=request.query_string,
            target=request.target,
            method=request.method,
            path_params=dict(request.path_params),
            query=dict(request.query),
            custom=request.headers.get("x-custom"),
            cookies=request.cookies,
            subprotocols=list(request.subprotocols),
            extensions=list(request.extensions),
            local=request.local,
            remote=request.remote,
            user=request.user,
        )
        chosen = "chat.v2" if "chat.v2" in request.subprotocols else None
        return Accept(subprotocol=chosen, headers=[("X-Room", room), ("Set-Cookie", "seen=1")])

    async def on_connect(self, conn: WebSocketConnection) -> None:
        self.seen["conn"] = (conn.url_path, conn.subprotocol, conn.remote, conn.user)
        await conn.send_message(f"welcome to {conn.url_path}")


async def test_validate_accept_and_request_attributes() -> None:
    inspector = Inspector()
    with trio.fail_after(TIMEOUT):
        async with (
            serving({"/rooms/{room}": inspector}) as server,
            open_websocket_url(
                f"ws://{HOST}:{server.port}/rooms/lobby?user=ann&x=1",
                subprotocols=["chat.v1", "chat.v2"],
                extra_headers=[("X-Custom", "yes"), ("Cookie", "sid=abc; theme=dark")],
            ) as ws,
        ):
            assert await ws.get_message() == "welcome to /rooms/lobby"
            assert ws.subprotocol == "chat.v2"
            assert ws.response_headers["x-room"] == "lobby"
            assert ws.response_headers["set-cookie"] == "seen=1"
            client_address = ws.local
    seen = inspector.seen
    assert seen["path"] == "/rooms/lobby?user=ann&x=1"  # the full target, as trio-websocket's
    assert seen["url_path"] == "/rooms/lobby"
    assert seen["query_string"] == "user=ann&x=1"
    assert seen["target"] == "/rooms/lobby?user=ann&x=1"
    assert seen["method"] == "GET"
    assert seen["path_params"] == {"room": "lobby"}
    assert seen["query"] == {"user": "ann", "x": "1"}
    assert seen["custom"] == "yes"
    assert seen["cookies"] == {"sid": "abc", "theme": "dark"}
    assert seen["subprotocols"] == ["chat.v1", "chat.v2"]
    assert any(offer.startswith("permessage-deflate") for offer in seen["extensions"])
    assert seen["local"] == (HOST, server.port)
    assert seen["remote"] == client_address
    assert seen["user"] is None
    assert seen["conn"] == ("/rooms/lobby", "chat.v2", client_address, None)


async def test_validate_reject_with_status_headers_body() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving({"/rooms/{room}": Inspector()}) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://{HOST}:{server.port}/rooms/closed"):
                    pytest.fail("rejected")
            assert info.value.status_code == 451
            assert info.value.headers["x-room"] == "closed"
            assert info.value.body == b"room closed"
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://{HOST}:{server.port}/rooms/moved"):
                    pytest.fail("redirected")
            assert info.value.status_code == 302
            assert info.value.headers["location"] == "/rooms/lobby"


# -- structured concurrency --------------------------------------------------------


async def test_1000_handler_connections_end_with_the_server() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    book = Book()
    n = 1000
    before = count_tasks()
    codes: list[int] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            stoppable = StoppableServer()
            server = await outer.start(
                stoppable.run, factory(Recording, book), {"ping_interval": None}
            )

            async def client(name: str, opened: trio.Semaphore) -> None:
                async with open_websocket_url(url(server, name), ping_interval=None) as ws:
                    opened.release()
                    async for _ in ws:
                        pass
                    assert ws.closed is not None
                    codes.append(ws.closed.code)

            async with trio.open_nursery() as clients:
                opened = trio.Semaphore(0, max_value=n)
                for i in range(n):
                    clients.start_soon(client, f"c{i}", opened)
                for _ in range(n):
                    await opened.acquire()
                await wait_until(lambda: len(server.connections) == n, 20)
                # client task + watcher + reader on one side, one task on the other
                assert count_tasks() > before + 3 * n
                stoppable.scope.cancel()
    assert codes == [1001] * n
    for i in range(n):
        assert book.events[f"c{i}"] == [
            ("validate",),
            ("connect",),
            ("close_message", 1001, ""),
            ("disconnect", 1001),
        ]
    assert count_tasks() == before


# -- independent clients --------------------------------------------------------------


class Chat(Recording):
    async def validate(self, request: WebSocketRequest) -> Accept | Reject | None:
        await super().validate(request)
        for wanted in ("chat.v2", "chat.v1"):
            if wanted in request.subprotocols:
                return Accept(subprotocol=wanted)
        return Accept()


async def test_websockets_sync_client_against_a_handler_route() -> None:
    book = Book()

    def talk(address: str) -> tuple[str | None, list[Any]]:
        with ws_sync_connect(
            address, legacy=True, subprotocols=["chat.v1"], proxy=None, open_timeout=3
        ) as ws:
            answers = []
            for message in ["hello", b"\x01\x02", "☃"]:
                ws.send(message)
                answers.append(ws.recv(timeout=3))
            ws.close(4005, "sync bye")
            return ws.subprotocol, answers

    with trio.fail_after(TIMEOUT):
        async with serving({"/chat": Chat(book)}) as server:
            subprotocol, answers = await trio.to_thread.run_sync(
                talk, url(server, "sync", "/chat"), abandon_on_cancel=True
            )
            await book.wait_disconnect("sync")
    assert subprotocol == "chat.v1"
    assert answers == ["hello", b"\x01\x02", "☃"]
    assert book.events["sync"] == [
        ("validate",),
        ("connect",),
        ("text", "hello"),
        ("binary", b"\x01\x02"),
        ("text", "☃"),
        ("close_message", 4005, "sync bye"),
        ("disconnect", 4005),
    ]


async def test_websockets_trio_client_sees_server_close_by_id() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving({"/chat": factory(Chat, book)}) as server:
            async with ws_trio_connect(
                url(server, "wt", "/chat"), subprotocols=["chat.v2"], proxy=None
            ) as ws:
                assert ws.subprotocol == "chat.v2"
                await ws.send("one")
                assert await ws.recv() == "one"
                await server.connections.close(book.conns["wt"].id, 4010, "kicked")
                with pytest.raises(WsConnectionClosed) as info:
                    await ws.recv()
                assert info.value.rcvd is not None
                assert (info.value.rcvd.code, info.value.rcvd.reason) == (4010, "kicked")
            await book.wait_disconnect("wt")
    assert book.events["wt"][-2:] == [("close_message", 4010, "kicked"), ("disconnect", 4010)]


async def test_trio_websocket_client_with_subprotocols() -> None:
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving({"/chat": Chat(book)}) as server:
            async with trio_websocket.open_websocket_url(
                url(server, "tw", "/chat"), subprotocols=["other", "chat.v1"]
            ) as ws:
                assert ws.subprotocol == "chat.v1"
                for message in ["a", b"b", "c"]:
                    await ws.send_message(message)
                    assert await ws.get_message() == message
            await book.wait_disconnect("tw")
    assert book.events["tw"] == [
        ("validate",),
        ("connect",),
        ("text", "a"),
        ("binary", b"b"),
        ("text", "c"),
        ("close_message", 1000, ""),
        ("disconnect", 1000),
    ]


# -- raw frames straight to a handler (no client library in between) ------------------


async def test_messages_that_arrive_with_the_close_frame_are_delivered() -> None:
    """Messages the peer sent before its close frame reach the hooks, however TCP cut them.

    Here the two messages and the close frame come in one write, so the server
    reads them in one ``receive``. A handler function gets both messages from
    ``get_message`` before ``ConnectionClosedOK``; a handler object must get
    them too, before ``on_close_message``.
    """
    book = Book()
    with trio.fail_after(TIMEOUT):
        async with serving(Recording(book), compression=False) as server:
            stream, reader, _ = await raw_connect(server.port, "/?name=raw")
            await stream.send_all(
                build_frame(OP_TEXT, b"last words")
                + build_frame(OP_BINARY, b"\xff")
                + build_frame(OP_CLOSE, close_payload(4004, "ok"))
            )
            frames = await reader.read_all()
            await stream.aclose()
            await book.wait_disconnect("raw")
    assert frames[-1].opcode == OP_CLOSE
    assert frames[-1].close_code == 4004
    assert book.events["raw"] == [
        ("validate",),
        ("connect",),
        ("text", "last words"),
        ("binary", b"\xff"),
        ("close_message", 4004, "ok"),
        ("disconnect", 4004),
    ]


class SlowReply(Recording):
    """on_text takes a while before it answers."""

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        self.record(_name(conn), "text", text)
        await trio.sleep(0.3)
        await conn.send_message(f"late reply to {text}")


async def test_a_hook_whose_send_meets_a_closing_connection_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A graceful stop while a hook is working: its send raises ConnectionClosed.

    That is the connection ending under the handler, as for a handler function
    (the server ignores ConnectionClosed from it) or a ``start_soon`` task (the
    same): no ERROR log with a traceback, no "closing with 1011".
    """
    book = Book()
    caplog.set_level(logging.INFO, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with (
            serving(SlowReply(book), close_timeout=1) as server,
            open_websocket_url(url(server, "a"), ping_interval=None) as ws,
        ):
            await ws.send_message("question")
            await wait_until(lambda: ("text", "question") in book.events["a"])
            await server.aclose()  # the hook is asleep; its send comes after 1001
            reason = await ws.wait_closed()
    assert reason.code == 1001
    assert book.count("a", "disconnect") == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
