"""The server over real TCP on 127.0.0.1: lifecycle, shutdown, structure, errors."""

from __future__ import annotations

import functools
import logging
import resource
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

import wsnursery
from wsnursery import (
    ConnectionClosedOK,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    open_websocket_url,
    serve_websocket,
)


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        children = (c for n in task.child_nurseries for c in n.child_tasks)
        return 1 + sum(walk(child) for child in children)

    return walk(trio.lowlevel.current_root_task())


async def echo(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


async def start(
    nursery: trio.Nursery, handler: Callable[[WebSocketRequest], Awaitable[None]], **kw: object
) -> WebSocketServer:
    server: WebSocketServer = await nursery.start(
        functools.partial(serve_websocket, handler, "127.0.0.1", 0, **kw)  # type: ignore[arg-type]
    )
    return server


async def test_serve_and_echo() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, echo)
            assert server.port > 0
            assert len(server.listeners) == 1
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/e?q=1") as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                assert len(server.connections) == 1
                (conn,) = server.connections.values()
                assert conn.path == "/e"
                assert conn.query == {"q": "1"}
                assert conn.remote[0] == "127.0.0.1"
                assert ws.local == conn.remote
            nursery.cancel_scope.cancel()


async def test_cancelling_the_server_closes_every_connection_with_1001() -> None:
    before = count_tasks()
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()

            async def run_server(task_status: trio.TaskStatus[WebSocketServer]) -> None:
                with server_scope:
                    await serve_websocket(echo, "127.0.0.1", 0, task_status=task_status)

            server = await outer.start(run_server)
            codes: list[int] = []

            async def client() -> None:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                    await ws.send_message("x")
                    await ws.get_message()
                    with pytest.raises(ConnectionClosedOK) as info:
                        await ws.get_message()
                    codes.append(info.value.reason.code)

            async with trio.open_nursery() as clients:
                for _ in range(20):
                    clients.start_soon(client)
                while len(server.connections) < 20:
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked(0.01)
                server_scope.cancel()
            assert codes == [1001] * 20
            assert len(server.connections) == 0
    assert count_tasks() == before


async def test_shutdown_cancels_handlers_that_ignore_the_close_after_close_timeout() -> None:
    cancelled = trio.Event()

    async def stubborn(request: WebSocketRequest) -> None:
        await request.accept()
        try:
            await trio.sleep_forever()  # never reads, never sees the close
        except trio.Cancelled:
            cancelled.set()
            raise

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, stubborn, close_timeout=0.3)
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                await trio.testing.wait_all_tasks_blocked(0.01)
                start_time = trio.current_time()
                await server.aclose()
                assert trio.current_time() - start_time < 2
                assert cancelled.is_set()
                with pytest.raises(ConnectionClosedOK):
                    await ws.get_message()
            nursery.cancel_scope.cancel()


async def test_no_task_outlives_the_server_with_1000_connections_open() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    before = count_tasks()
    n = 1000
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()

            async def run_server(task_status: trio.TaskStatus[WebSocketServer]) -> None:
                with server_scope:
                    await serve_websocket(echo, "127.0.0.1", 0, task_status=task_status)

            server = await outer.start(run_server)
            closed = 0

            async def client(opened: trio.Semaphore) -> None:
                nonlocal closed
                async with open_websocket_url(
                    f"ws://127.0.0.1:{server.port}/", ping_interval=None
                ) as ws:
                    opened.release()
                    async for _ in ws:
                        pass
                    assert ws.closed is not None
                    assert ws.closed.code == 1001
                    closed += 1

            async with trio.open_nursery() as clients:
                opened = trio.Semaphore(0, max_value=n)
                for _ in range(n):
                    clients.start_soon(client, opened)
                for _ in range(n):
                    await opened.acquire()
                while len(server.connections) < n:
                    await trio.sleep(0.01)
                assert count_tasks() > before + 3 * n  # reader + keep-alive + handler each
                server_scope.cancel()
            assert closed == n
    assert count_tasks() == before


async def test_aclose_from_another_task_stops_run() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, echo)
            await server.aclose()
            await server.aclose()  # again: returns at once
            with pytest.raises(wsnursery.TransportError):
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pass


async def test_handshake_during_shutdown_gets_503() -> None:
    release = trio.Event()

    async def slow_to_accept(request: WebSocketRequest) -> None:
        await release.wait()
        await request.accept()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, slow_to_accept, close_timeout=2)

            async def client() -> None:
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                        pass
                assert info.value.status_code == 503

            async with trio.open_nursery() as clients:
                clients.start_soon(client)
                await trio.testing.wait_all_tasks_blocked(0.05)
                clients.start_soon(server.aclose)
                await trio.testing.wait_all_tasks_blocked(0.05)
                release.set()
            nursery.cancel_scope.cancel()


async def test_handler_that_neither_accepts_nor_rejects_gets_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def silent(request: WebSocketRequest) -> None:
        return

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, silent)
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pass
            assert info.value.status_code == 500
            assert "without accepting or rejecting" in caplog.text
            nursery.cancel_scope.cancel()


async def test_handler_too_slow_to_decide_gets_503() -> None:
    async def dithering(request: WebSocketRequest) -> None:
        await trio.sleep(10)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, dithering, open_timeout=0.2)
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pass
            assert info.value.status_code == 503
            nursery.cancel_scope.cancel()


async def test_reject_with_status_headers_body() -> None:
    async def deny(request: WebSocketRequest) -> None:
        await request.reject(403, headers=[("X-Reason", "nope")], body="forbidden")
        with pytest.raises(RuntimeError, match="already answered"):
            await request.accept()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, deny)
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pass
            assert info.value.status_code == 403
            assert info.value.headers["x-reason"] == "nope"
            assert info.value.body == b"forbidden"
            nursery.cancel_scope.cancel()


async def test_max_connections_gives_503() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, echo, max_connections=2)
            url = f"ws://127.0.0.1:{server.port}/"
            async with open_websocket_url(url), open_websocket_url(url):
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(url):
                        pass
                assert info.value.status_code == 503
                assert info.value.headers["retry-after"] == "1"
            nursery.cancel_scope.cancel()


async def test_subprotocol_and_extra_headers() -> None:
    async def pick(request: WebSocketRequest) -> None:
        assert request.subprotocols == ["v1", "v2"]
        conn = await request.accept(subprotocol="v2", extra_headers=[("X-Server", "yes")])
        await conn.send_message(conn.subprotocol or "")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, pick)
            async with open_websocket_url(
                f"ws://127.0.0.1:{server.port}/", subprotocols=["v1", "v2"]
            ) as ws:
                assert ws.subprotocol == "v2"
                assert ws.response_headers["x-server"] == "yes"
                assert await ws.get_message() == "v2"
            nursery.cancel_scope.cancel()


# -- no exception groups reach the user ----------------------------------------


async def test_body_exception_comes_out_plain_and_closes_with_1011() -> None:
    seen: list[int] = []

    async def watch(request: WebSocketRequest) -> None:
        conn = await request.accept()
        seen.append((await conn.wait_closed()).code)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, watch)
            with pytest.raises(KeyError, match="boom"):
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    raise KeyError("boom")
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert seen == [1011]
            nursery.cancel_scope.cancel()


async def test_cancelling_a_client_block_closes_with_1001_and_raises_no_group() -> None:
    seen: list[int] = []

    async def watch(request: WebSocketRequest) -> None:
        conn = await request.accept()
        seen.append((await conn.wait_closed()).code)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, watch)
            before = count_tasks()
            with trio.move_on_after(0.2) as scope:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                    await ws.get_message()
            assert scope.cancelled_caught
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert count_tasks() == before
            assert seen == [1001]
            nursery.cancel_scope.cancel()


async def test_cancelled_while_connecting_leaves_nothing_behind() -> None:
    async def never(request: WebSocketRequest) -> None:
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, never, open_timeout=0.2, close_timeout=0.2)
            before = count_tasks()
            with trio.move_on_after(0.1) as scope:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pytest.fail("never opened")
            assert scope.cancelled_caught
            await trio.sleep(0.3)  # the server gives up on the silent handler
            assert count_tasks() == before
            nursery.cancel_scope.cancel()


async def test_handler_error_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: WebSocketRequest) -> None:
        conn = await request.accept()
        await conn.get_message()
        raise ZeroDivisionError("handler bug")

    caplog.set_level(logging.ERROR, logger="wsnursery.server")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, broken)
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                await ws.send_message("go")
                reason = await ws.wait_closed()
            assert reason.code == 1011
            assert "ZeroDivisionError: handler bug" in caplog.text
            nursery.cancel_scope.cancel()


def test_public_names_report_the_public_module() -> None:
    assert WebSocketConnection.__module__ == "wsnursery"
    assert serve_websocket.__module__ == "wsnursery"


async def test_server_keepalive_closes_a_silent_client_and_keeps_live_ones() -> None:
    closed: list[tuple[int, str]] = []

    async def watch(request: WebSocketRequest) -> None:
        conn = await request.accept()
        reason = await conn.wait_closed()
        closed.append((reason.code, reason.reason))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, watch, ping_interval=0.2, ping_timeout=0.3)
            url = f"ws://127.0.0.1:{server.port}/"
            # A live client: its reader answers the server's pings.
            async with open_websocket_url(url, ping_interval=None) as live:
                # A silent one: handshake by hand, then never read again.
                silent = await trio.open_tcp_stream("127.0.0.1", server.port)
                await silent.send_all(
                    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                )
                start_time = trio.current_time()
                while not closed:
                    await trio.sleep(0.05)
                elapsed = trio.current_time() - start_time
                assert closed == [(1011, "keepalive ping timeout")]
                assert 0.3 <= elapsed < 1.5  # within ping_interval + ping_timeout (+ slack)
                await trio.sleep(1.0)  # five more ping rounds
                assert live.closed is None
                assert len(server.connections) == 1
                await silent.aclose()
            nursery.cancel_scope.cancel()


async def test_a_half_read_request_head_gets_503_at_once_on_shutdown() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, echo, close_timeout=30, open_timeout=30)
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            await raw.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            await trio.testing.wait_all_tasks_blocked(0.05)
            start_time = trio.current_time()
            nursery.start_soon(server.aclose)
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = await raw.receive_some()
                assert chunk, response
                response += chunk
            assert response.startswith(b"HTTP/1.1 503 ")
            assert trio.current_time() - start_time < 2  # not close_timeout (30 s)
            await raw.aclose()
