"""The server keeps its promises (issue 10), over real TCP on 127.0.0.1.

Expiring handshakes do not stall the other clients; ``aclose`` from a handler
starts the shutdown at once; a cancelled handler leaves no connection behind;
a failing HTTP route or default page gets 500; an upgrade with a body gets 400;
``path`` is the full request target.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from _helpers import (
    HOST,
    OP_CLOSE,
    OP_TEXT,
    FrameReader,
    build_frame,
    count_tasks,
    raw_connect,
    read_response,
    serving,
    upgrade_request,
    wait_until,
)
from wsnursery import (
    ConnectionRejected,
    HTTPRequest,
    HTTPResponse,
    WebSocketConnection,
    WebSocketHandler,
    WebSocketRequest,
    WebSocketServer,
    open_websocket_url,
    serve_websocket,
)
from wsnursery.testing import open_handler_client

TIMEOUT = 10  # seconds: the hard cap of every test


async def read_close_code(reader: FrameReader) -> int | None:
    """Read frames until a close frame; its code (None at EOF before one)."""
    while (frame := await reader.read_frame()) is not None:
        if frame.opcode == OP_CLOSE:
            return frame.close_code
    return None


# -- item 1: expiring handshakes do not stall the loop ------------------------------


class BatchWatch(trio.abc.Instrument):
    """Measures each batch of trio's scheduler (the steps between two I/O waits).

    A long batch is a stall: no other client is served until it ends.
    """

    def __init__(self) -> None:
        self.active = False
        self.longest = 0.0  # seconds of real time
        self.most_handshakes = 0  # connection tasks stepped in one batch
        self._start = 0.0
        self._handshakes = 0

    def after_io_wait(self, timeout: float) -> None:
        self._start = time.perf_counter()
        self._handshakes = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_handle_stream"):
            self._handshakes += 1

    def before_io_wait(self, timeout: float) -> None:
        if self.active:
            self.longest = max(self.longest, time.perf_counter() - self._start)
            self.most_handshakes = max(self.most_handshakes, self._handshakes)


async def _until(predicate: Callable[[], bool], seconds: float = 20.0) -> None:
    """Checkpoint until ``predicate()`` holds; real time bounds it (the clock is frozen)."""
    give_up = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < give_up, f"not within {seconds} s: {predicate}"
        await trio.lowlevel.checkpoint()


async def test_hundreds_of_handshakes_expiring_at_once_do_not_stall_the_loop(
    mock_clock: trio.testing.MockClock,
) -> None:
    """500 slowloris clients reach open_timeout at the same instant of a frozen clock.

    Each gets its 408, and no batch of the scheduler runs more than a few of
    them: the longest stall stays far under 50 ms (it was one batch of all 500,
    30-60 ms on a quiet machine, more on a busy one).
    """
    n = 500
    watch = BatchWatch()
    trio.lowlevel.add_instrument(watch)
    slow: list[socket.socket] = []
    try:
        async with serving(echo_handler, open_timeout=1.0) as server:
            baseline = count_tasks()
            for _ in range(n):
                sock = socket.create_connection((HOST, server.port))
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and then nothing
                slow.append(sock)
            await _until(lambda: count_tasks() >= baseline + n)
            await trio.testing.wait_all_tasks_blocked()
            # Every handshake started at the same (frozen) instant: all are due now.
            watch.active = True
            mock_clock.jump(1.0)
            await _until(lambda: all(_peek(sock).startswith(b"HTTP/1.1 408 ") for sock in slow))
            await trio.testing.wait_all_tasks_blocked()  # all in their polite drains
            watch.active = False
            mock_clock.jump(1.5)  # which end now
            await _until(lambda: count_tasks() <= baseline)
    finally:
        trio.lowlevel.remove_instrument(watch)
        for sock in slow:
            sock.close()
    # _EXPIRE_BATCH (16) cancelled per batch, each answering over a few steps.
    assert watch.most_handshakes <= 100, watch.most_handshakes
    assert watch.longest < 0.05, f"the loop stalled {watch.longest * 1000:.1f} ms"


def _peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


async def echo_handler(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


# -- item 2: aclose() from inside a handler ------------------------------------------


async def test_aclose_from_a_handler_function_closes_everyone_with_1001_at_once() -> None:
    """The handler that calls server.aclose() does not make the others wait for it.

    Its call returns at once (waiting for run() there would wait for itself).
    """
    returned = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        async for message in conn:
            if message == "stop":
                server = conn.server
                assert isinstance(server, WebSocketServer)
                await server.aclose()
                returned.set()

    with trio.fail_after(TIMEOUT):
        async with serving(handler, close_timeout=8) as server:
            others = [await raw_connect(server.port) for _ in range(3)]
            stopper, stopper_reader, _ = await raw_connect(server.port)
            await wait_until(lambda: len(server.connections) == 4)
            start = trio.current_time()
            await stopper.send_all(build_frame(OP_TEXT, b"stop"))
            with trio.fail_after(1):
                for _, reader, _ in others:
                    assert await read_close_code(reader) == 1001
                assert await read_close_code(stopper_reader) == 1001
                await returned.wait()
            assert trio.current_time() - start < 1
            for stream, _, _ in [*others, (stopper, None, None)]:
                await stream.aclose()


class StopOnText(WebSocketHandler):
    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        if text == "stop":
            server = conn.server
            assert isinstance(server, WebSocketServer)
            await server.aclose()


async def test_aclose_from_a_hook_closes_everyone_with_1001_at_once() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(StopOnText, close_timeout=8) as server:
            others = [await raw_connect(server.port) for _ in range(3)]
            stopper, stopper_reader, _ = await raw_connect(server.port)
            await wait_until(lambda: len(server.connections) == 4)
            await stopper.send_all(build_frame(OP_TEXT, b"stop"))
            clients = [*others, (stopper, stopper_reader, None)]
            with trio.fail_after(1):
                for stream, reader, _ in clients:
                    assert await read_close_code(reader) == 1001
                    await stream.send_all(build_frame(OP_CLOSE, b"\x03\xe9"))
                # The closing handshakes complete: the stopper's too.
                for _, reader, _ in clients:
                    assert await reader.read_frame() is None
            for stream, _, _ in clients:
                await stream.aclose()


async def test_aclose_from_a_handler_lets_run_return_promptly() -> None:
    """serve_websocket returns well within close_timeout once every client answered."""
    done = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        await conn.get_message()
        server = conn.server
        assert isinstance(server, WebSocketServer)
        await server.aclose()

    async def run(task_status: trio.TaskStatus[WebSocketServer]) -> None:
        await serve_websocket(handler, HOST, 0, close_timeout=8, task_status=task_status)
        done.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run)
            stream, reader, _ = await raw_connect(server.port)
            await stream.send_all(build_frame(OP_TEXT, b"stop"))
            start = trio.current_time()
            assert await read_close_code(reader) == 1001
            await stream.send_all(build_frame(OP_CLOSE, b"\x03\xe9"))
            with trio.fail_after(2):
                await done.wait()
            assert trio.current_time() - start < 2
            await stream.aclose()


# -- item 3: a cancelled handler function leaves no connection behind ----------------


async def test_handler_cancelled_by_shutdown_leaves_no_connection_registered() -> None:
    async def handler(request: WebSocketRequest) -> None:
        await request.accept()
        await trio.sleep_forever()  # never looks at the connection again

    scope = trio.CancelScope()
    servers: list[WebSocketServer] = []

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await serve_websocket(
                handler,
                HOST,
                0,
                close_timeout=0.5,
                task_status=_capture(servers, task_status),
            )

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            server = servers[0]
            clients = [await raw_connect(server.port) for _ in range(3)]
            await wait_until(lambda: len(server.connections) == 3)
            scope.cancel()
        # serve_websocket has returned.
        assert len(server.connections) == 0
        assert server.broadcaster.stats().connections == 0
        report = await server.broadcaster.send_all("anyone?")
        assert report.recipients == 0
        for stream, _, _ in clients:
            await stream.aclose()


class _Capture:
    def __init__(self, servers: list[WebSocketServer], inner: trio.TaskStatus[None]) -> None:
        self.servers = servers
        self.inner = inner

    def started(self, value: WebSocketServer | None = None) -> None:
        assert value is not None
        self.servers.append(value)
        self.inner.started()


def _capture(
    servers: list[WebSocketServer], inner: trio.TaskStatus[None]
) -> trio.TaskStatus[WebSocketServer]:
    return _Capture(servers, inner)  # type: ignore[return-value]


# -- item 4: a failing HTTP route or default page answers 500 ------------------------


async def _http_status(port: int, request: bytes) -> int:
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(request)
        head = await read_response(stream)
        return head.status


def _errors_with_traceback(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "wsnursery.server" and r.levelno == logging.ERROR and r.exc_info
    ]


async def test_http_route_that_raises_gets_500_and_an_error_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: HTTPRequest) -> HTTPResponse:
        raise ValueError("the endpoint broke")

    async def handler(request: WebSocketRequest) -> None:
        await request.reject(404)

    caplog.set_level(logging.DEBUG, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with serving(handler, http_routes={"/broken": broken}) as server:
            request = b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n"
            assert await _http_status(server.port, request) == 500
    errors = _errors_with_traceback(caplog)
    assert len(errors) == 1, caplog.records
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], ValueError)


async def test_unreadable_default_page_gets_500_and_an_error_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Page(WebSocketHandler):
        default_page = tmp_path / "missing.html"

    caplog.set_level(logging.DEBUG, logger="wsnursery")
    with trio.fail_after(TIMEOUT):
        async with serving({"/page": Page}) as server:
            request = b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n"
            assert await _http_status(server.port, request) == 500
    errors = _errors_with_traceback(caplog)
    assert len(errors) == 1, caplog.records
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], OSError)


# -- item 5: an upgrade request with a body is refused -------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [("Content-Length", "6")],
        [("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "identity")],
    ],
    ids=["content-length", "chunked", "identity"],
)
async def test_upgrade_with_a_body_is_400_and_no_frame_is_read(
    extra: list[tuple[str, str]],
) -> None:
    seen: list[str] = []

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        async for message in conn:
            seen.append(str(message))

    body = build_frame(OP_TEXT, b"hi")  # 6 bytes: a frame smuggled as the body
    with trio.fail_after(TIMEOUT):
        async with serving(handler) as server:
            status = await _http_status(server.port, upgrade_request(extra=extra) + body)
            assert status == 400
            assert len(server.connections) == 0
    assert seen == []


async def test_upgrade_with_content_length_zero_is_accepted() -> None:
    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        async for message in conn:
            await conn.send_message(message)

    with trio.fail_after(TIMEOUT):
        async with serving(handler) as server:
            stream, reader, _ = await raw_connect(server.port, extra=[("Content-Length", "0")])
            await stream.send_all(build_frame(OP_TEXT, b"hi"))
            frame = await reader.read_frame()
            assert frame is not None
            assert frame.payload == b"hi"
            await stream.aclose()


# -- item 6: path is the full request target ------------------------------------------


async def test_path_keeps_the_query_on_request_connection_and_http_request() -> None:
    seen: dict[str, object] = {}

    async def chat(request: WebSocketRequest) -> None:
        seen["request"] = (
            request.path,
            request.url_path,
            request.query_string,
            request.query,
            request.path_params,
        )
        conn = await request.accept()
        seen["conn"] = (conn.path, conn.url_path, conn.query_string, conn.query)
        await conn.send_message("ok")

    async def item(request: HTTPRequest) -> HTTPResponse:
        seen["http"] = (request.path, request.url_path, request.query_string, request.query)
        return HTTPResponse(200, "item")

    target = "/rooms/blue?room=1&t=x%20y&room=2"
    with trio.fail_after(TIMEOUT):
        async with serving({"/rooms/{name}": chat}, http_routes={"/items/{id}": item}) as server:
            async with open_websocket_url(f"ws://{HOST}:{server.port}{target}") as client:
                assert await client.get_message() == "ok"
                assert (client.path, client.url_path, client.query_string) == (
                    target,
                    "/rooms/blue",
                    "room=1&t=x%20y&room=2",
                )
                # (the client's query keeps the last value of a repeated name: not tested)
            status = await _http_status(
                server.port, b"GET /items/7?full=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            assert status == 200
    query = {"room": "1", "t": "x y"}
    assert seen["request"] == (
        target,
        "/rooms/blue",
        "room=1&t=x%20y&room=2",
        query,
        {"name": "blue"},
    )
    assert seen["conn"] == (target, "/rooms/blue", "room=1&t=x%20y&room=2", query)
    assert seen["http"] == ("/items/7?full=1", "/items/7", "full=1", {"full": "1"})


async def test_path_without_a_query_has_an_empty_query_string() -> None:
    seen: list[tuple[str, str, str]] = []

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        seen.append((conn.path, conn.url_path, conn.query_string))

    with trio.fail_after(TIMEOUT):
        async with (
            serving(handler) as server,
            open_websocket_url(f"ws://{HOST}:{server.port}/plain") as client,
        ):
            assert (client.path, client.url_path, client.query_string) == (
                "/plain",
                "/plain",
                "",
            )
            await client.wait_closed()
    assert seen == [("/plain", "/plain", "")]


async def test_open_timeout_holds_without_run_too() -> None:
    """A connection served by _handle_stream alone (wsnursery.testing) still gets its 503.

    Only run() starts the handshake expirer; without it, the deadline is the
    connection nursery's own, as it was before the expirer existed.
    """

    async def undecided(request: WebSocketRequest) -> None:
        await trio.sleep_forever()

    with trio.fail_after(3), pytest.raises(ConnectionRejected) as caught:
        async with open_handler_client(undecided, server_options={"open_timeout": 0.5}):
            pass
    assert caught.value.status_code == 503
