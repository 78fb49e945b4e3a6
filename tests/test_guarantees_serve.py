"""The promises, held for ``serve_websocket`` through every way a server's life can end.

Both handler styles (a handler function and a :class:`WebSocketHandler`) are driven
through each ending: a normal stop (``aclose``), the caller cancelling, the caller's
deadline, a handler raising (in the middle of a connection, and while the server is
being cancelled), a peer that vanishes (RST), a peer that never answers the close
and a peer that floods pings while the server stops. For each: the exact outcome the
user expects (never an ExceptionGroup), every other client closed with 1001, the
registry empty, no task left behind, and the call back within ``close_timeout``.

The peers are hand-made over real TCP on 127.0.0.1 (``_helpers``), so what they see
on the wire is checked byte for byte.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio

from _helpers import (
    HOST,
    OP_CLOSE,
    OP_TEXT,
    build_frame,
    close_payload,
    count_tasks,
    raw_connect,
    start_flood_process,
    upgrade_request,
    wait_until,
)
from wsnursery import (
    WebSocketConnection,
    WebSocketHandler,
    WebSocketRequest,
    WebSocketServer,
    serve_websocket,
)
from wsnursery._sansio.exceptions import CloseReason

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

CLOSE_TIMEOUT = 1.0
# Scheduling slack on a loaded 2-core machine: generous, but far below what a
# hang (a missing bound) would take.
SLACK = 1.5


class Boom(Exception):
    """What a handler raises on purpose."""


def function_handler(disconnects: list[int]) -> Callable[[WebSocketRequest], Any]:
    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()

        async def record() -> None:
            disconnects.append((await conn.wait_closed()).code)

        conn.start_soon(record)
        async for message in conn:
            if message == "boom":
                raise Boom("handler failed on purpose")
            await conn.send_message(message)

    return handler


class RecordingHandler(WebSocketHandler):
    def __init__(self, disconnects: list[int]) -> None:
        self.disconnects = disconnects

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        if text == "boom":
            raise Boom("hook failed on purpose")
        await conn.send_message(text)

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        self.disconnects.append(reason.code)


def make_handler(api: str, disconnects: list[int]) -> Any:
    return function_handler(disconnects) if api == "function" else RecordingHandler(disconnects)


async def polite_client(
    port: int, codes: list[int], *, ready: trio.Event | None = None, say: bytes = b"hi"
) -> None:
    """A hand-made client that echoes, answers the close frame and records its code."""
    stream, reader, _ = await raw_connect(port)
    async with stream:
        await stream.send_all(build_frame(OP_TEXT, say))
        frame = await reader.read_frame()
        assert frame is not None
        if frame.opcode == OP_TEXT:
            assert frame.payload == say
            if ready is not None:
                ready.set()
            frame = await reader.read_frame()
        assert frame is not None
        assert frame.opcode == OP_CLOSE, frame
        assert frame.close_code is not None
        codes.append(frame.close_code)
        await stream.send_all(build_frame(OP_CLOSE, close_payload(frame.close_code)))
        assert await reader.read_frame() is None  # then the server closes TCP


@dataclass
class Scene:
    """A server under test, with ``polite`` well-behaved clients connected."""

    server: WebSocketServer
    scope: trio.CancelScope  # cancelling it cancels serve_websocket alone
    nursery: trio.Nursery
    codes: list[int]  # close codes the polite clients got, in order
    disconnects: list[int]  # close codes the handler saw
    outcome: list[Any]  # how serve_websocket ended: see assert_clean_return

    def returned(self, *, cancelled: bool) -> float:
        """Assert serve_websocket returned without raising; how long it ran."""
        assert self.outcome[0] == ("returned", cancelled), self.outcome
        assert not any(isinstance(item[1], BaseExceptionGroup) for item in self.outcome)
        return float(self.outcome[-1][1])


@asynccontextmanager
async def scene(
    api: str, *, handler: Any = None, polite: int = 1, deadline: float | None = None
) -> AsyncIterator[Scene]:
    """Serve ``make_handler(api)`` (or ``handler``) and connect ``polite`` clients.

    Leaving waits for every client task; the test ends the server itself.
    """
    disconnects: list[int] = []
    handler = handler or make_handler(api, disconnects)
    codes: list[int] = []
    outcome: list[Any] = []
    scope = trio.CancelScope()
    if deadline is not None:
        scope.deadline = trio.current_time() + deadline

    async def run(task_status: trio.TaskStatus[WebSocketServer]) -> None:
        start = trio.current_time()
        try:
            with scope:
                await serve_websocket(
                    handler, HOST, 0, close_timeout=CLOSE_TIMEOUT, task_status=task_status
                )
            outcome.append(("returned", scope.cancelled_caught))
        except BaseException as exc:  # recorded, then checked by the test
            outcome.append(("raised", exc))
            raise
        finally:
            outcome.append(("took", trio.current_time() - start))

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            server: WebSocketServer = await nursery.start(run)
            readies = [trio.Event() for _ in range(polite)]
            for ready in readies:
                nursery.start_soon(partial(polite_client, server.port, codes, ready=ready))
            for ready in readies:
                await ready.wait()
            yield Scene(server, scope, nursery, codes, disconnects, outcome)


def rst_close(stream: trio.SocketStream) -> None:
    """Close the socket so that the kernel sends RST (SO_LINGER 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


APIS = ["function", "handler"]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("ending", ["aclose", "cancel", "deadline"])
async def test_stopping_closes_every_client_with_1001_and_leaves_nothing(
    api: str, ending: str
) -> None:
    """aclose, the caller's cancel and the caller's deadline: one graceful stop."""
    before = count_tasks()
    async with scene(api, polite=3, deadline=0.5 if ending == "deadline" else None) as sc:
        assert len(sc.server.connections) == 3
        if ending == "aclose":
            await sc.server.aclose()
        elif ending == "cancel":
            sc.scope.cancel()
    took = sc.returned(cancelled=ending != "aclose")
    assert sc.codes == [1001, 1001, 1001]
    assert sc.disconnects == [1001, 1001, 1001]
    assert len(sc.server.connections) == 0
    assert sc.server.broadcaster.stats().connections == 0
    assert took < (0.5 if ending == "deadline" else 0) + SLACK
    assert count_tasks() == before


@pytest.mark.parametrize("api", APIS)
async def test_a_handler_that_raises_ends_its_connection_only(
    api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """1011 to that client, logged with its traceback; the others and the server go on."""
    before = count_tasks()
    async with scene(api) as sc:
        await polite_client(sc.server.port, sc.codes, say=b"boom")
        assert sc.codes == [1011]
        await wait_until(lambda: len(sc.server.connections) == 1, what="the failed one gone")
        sc.scope.cancel()
    sc.returned(cancelled=True)
    assert sc.codes == [1011, 1001]
    assert sorted(sc.disconnects) == [1001, 1011]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any(isinstance(r.exc_info[1], Boom) for r in errors if r.exc_info)
    assert len(sc.server.connections) == 0
    assert count_tasks() == before


@pytest.mark.parametrize("api", APIS)
async def test_a_handler_that_raises_while_the_server_is_cancelled_raises_nothing_out(
    api: str,
) -> None:
    """The handler's error is the server's to log: the caller sees only its own cancel."""
    before = count_tasks()

    async def raising_function(request: WebSocketRequest) -> None:
        conn = await request.accept()
        try:
            async for message in conn:
                await conn.send_message(message)
        finally:
            raise Boom("cleanup failed")

    class RaisingHandler(RecordingHandler):
        async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
            raise Boom("cleanup failed")

    handler = raising_function if api == "function" else RaisingHandler([])
    async with scene(api, handler=handler) as sc:
        sc.scope.cancel()
    sc.returned(cancelled=True)
    assert sc.codes == [1001]
    assert len(sc.server.connections) == 0
    assert count_tasks() == before


@pytest.mark.parametrize("api", APIS)
async def test_a_peer_that_vanishes_is_1006_and_disturbs_nobody(api: str) -> None:
    before = count_tasks()
    async with scene(api) as sc:
        stream, reader, _ = await raw_connect(sc.server.port)
        await stream.send_all(build_frame(OP_TEXT, b"x"))
        assert (await reader.read_frame()) is not None
        await wait_until(lambda: len(sc.server.connections) == 2)
        rst_close(stream)
        await wait_until(lambda: sc.disconnects == [1006], what="the vanished peer ended")
        assert len(sc.server.connections) == 1
        sc.scope.cancel()
    sc.returned(cancelled=True)
    assert sc.codes == [1001]
    assert sc.disconnects == [1006, 1001]
    assert count_tasks() == before


@pytest.mark.parametrize("api", APIS)
async def test_a_peer_that_never_answers_the_close_holds_the_stop_close_timeout_at_most(
    api: str,
) -> None:
    before = count_tasks()
    async with scene(api) as sc:
        # A peer that completes the upgrade, then never reads or answers again.
        silent = await trio.open_tcp_stream(HOST, sc.server.port)
        await silent.send_all(upgrade_request())
        await wait_until(lambda: len(sc.server.connections) == 2)
        sc.scope.cancel()
    took = sc.returned(cancelled=True)
    assert sc.codes == [1001]
    assert CLOSE_TIMEOUT * 0.9 <= took < CLOSE_TIMEOUT + SLACK
    assert sorted(sc.disconnects) == [1001, 1006]
    assert len(sc.server.connections) == 0
    await silent.aclose()
    assert count_tasks() == before


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
async def test_a_flooding_peer_does_not_delay_the_stop(api: str) -> None:
    """Cancelling a server while a peer floods pings: back within close_timeout.

    A read loop that never reaches a schedule point could not even be cancelled
    while the flood lasts (4 s here). A guard more than a regression test: on
    the old code it failed most runs, not all (the flooder is another process,
    and the socket sometimes ran dry long enough for a checkpoint).
    """
    async with scene(api) as sc:
        flooder = await start_flood_process(sc.server.port, "ping", 4.0)
        # Cancel by a deadline set now, before anything else awaits: a loop
        # frozen by the flood cannot even deliver it until the flood ends.
        cancel_at = trio.current_time() + 0.3
        sc.scope.deadline = cancel_at
        await wait_until(lambda: bool(sc.outcome), timeout=12, what="serve returned")
        stopped_after = trio.current_time() - cancel_at
        flooder.kill()
        await flooder.wait()
    sc.returned(cancelled=True)
    assert sc.codes == [1001]
    # The flooder never answers the close: close_timeout, plus far less than
    # one stall of a loop that does not yield (seconds, before the fix).
    assert stopped_after < CLOSE_TIMEOUT + 0.5
    assert len(sc.server.connections) == 0
