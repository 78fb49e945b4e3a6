"""The server over real TCP on 127.0.0.1: lifecycle, shutdown, structure, errors."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import resource
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

import wsnursery
from _helpers import HOST, count_tasks, serving
from wsnursery import (
    ConnectionClosedOK,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    open_websocket_url,
    serve_websocket,
)
from wsnursery._server import ServerOptions, _Options

Handler = Callable[[WebSocketRequest], Awaitable[None]]


async def echo(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


def recording_close_codes(seen: list[int]) -> Handler:
    """A handler that accepts, then appends the connection's close code to ``seen``."""

    async def watch(request: WebSocketRequest) -> None:
        conn = await request.accept()
        seen.append((await conn.wait_closed()).code)

    return watch


async def serve_in(
    scope: trio.CancelScope, handler: Handler, *, task_status: trio.TaskStatus[WebSocketServer]
) -> None:
    """``serve_websocket`` in ``scope``: the test cancels the server alone."""
    with scope:
        await serve_websocket(handler, HOST, 0, task_status=task_status)


async def test_serve_and_echo() -> None:
    with trio.fail_after(5):
        async with serving(echo) as server:
            assert server.port > 0
            assert len(server.listeners) == 1
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/e?q=1") as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                assert len(server.connections) == 1
                (conn,) = server.connections.values()
                assert conn.path == "/e?q=1"
                assert conn.url_path == "/e"
                assert conn.query == {"q": "1"}
                assert conn.remote[0] == "127.0.0.1"
                assert ws.local == conn.remote


async def test_cancelling_the_server_closes_every_connection_with_1001() -> None:
    before = count_tasks()
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()
            server = await outer.start(serve_in, server_scope, echo)
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
        async with (
            serving(stubborn, close_timeout=0.3) as server,
            open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws,
        ):
            await trio.testing.wait_all_tasks_blocked(0.01)
            start_time = trio.current_time()
            await server.aclose()
            assert trio.current_time() - start_time < 2
            assert cancelled.is_set()
            with pytest.raises(ConnectionClosedOK):
                await ws.get_message()


async def test_no_task_outlives_the_server_with_1000_connections_open() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    before = count_tasks()
    n = 1000
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()
            server = await outer.start(serve_in, server_scope, echo)
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
        async with serving(echo) as server:
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
        async with serving(slow_to_accept, close_timeout=2) as server:

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


async def test_handler_that_neither_accepts_nor_rejects_gets_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def silent(request: WebSocketRequest) -> None:
        return

    with trio.fail_after(5):
        async with serving(silent) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pass
            assert info.value.status_code == 500
            assert "without accepting or rejecting" in caplog.text


async def test_handler_too_slow_to_decide_gets_503() -> None:
    async def dithering(request: WebSocketRequest) -> None:
        await trio.sleep(10)

    with trio.fail_after(5):
        async with serving(dithering, open_timeout=0.2) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pass
            assert info.value.status_code == 503


async def test_reject_with_status_headers_body() -> None:
    async def deny(request: WebSocketRequest) -> None:
        await request.reject(403, headers=[("X-Reason", "nope")], body="forbidden")
        with pytest.raises(RuntimeError, match="already answered"):
            await request.accept()

    with trio.fail_after(5):
        async with serving(deny) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pass
            assert info.value.status_code == 403
            assert info.value.headers["x-reason"] == "nope"
            assert info.value.body == b"forbidden"


async def test_max_connections_gives_503() -> None:
    with trio.fail_after(5):
        async with serving(echo, max_connections=2) as server:
            url = f"ws://127.0.0.1:{server.port}/"
            async with open_websocket_url(url), open_websocket_url(url):
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(url):
                        pass
                assert info.value.status_code == 503
                assert info.value.headers["retry-after"] == "1"


async def test_subprotocol_and_extra_headers() -> None:
    async def pick(request: WebSocketRequest) -> None:
        assert request.subprotocols == ["v1", "v2"]
        conn = await request.accept(subprotocol="v2", extra_headers=[("X-Server", "yes")])
        await conn.send_message(conn.subprotocol or "")

    with trio.fail_after(5):
        async with (
            serving(pick) as server,
            open_websocket_url(f"ws://127.0.0.1:{server.port}/", subprotocols=["v1", "v2"]) as ws,
        ):
            assert ws.subprotocol == "v2"
            assert ws.response_headers["x-server"] == "yes"
            assert await ws.get_message() == "v2"


# -- no exception groups reach the user ----------------------------------------


async def test_body_exception_comes_out_plain_and_closes_with_1011() -> None:
    seen: list[int] = []
    with trio.fail_after(5):
        async with serving(recording_close_codes(seen)) as server:
            with pytest.raises(KeyError, match="boom"):
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    raise KeyError("boom")
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert seen == [1011]


async def test_cancelling_a_client_block_closes_with_1001_and_raises_no_group() -> None:
    seen: list[int] = []
    with trio.fail_after(5):
        async with serving(recording_close_codes(seen)) as server:
            before = count_tasks()
            with trio.move_on_after(0.2) as scope:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                    await ws.get_message()
            assert scope.cancelled_caught
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert count_tasks() == before
            assert seen == [1001]


async def test_cancelled_while_connecting_leaves_nothing_behind() -> None:
    async def never(request: WebSocketRequest) -> None:
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with serving(never, open_timeout=0.2, close_timeout=0.2) as server:
            before = count_tasks()
            with trio.move_on_after(0.1) as scope:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/"):
                    pytest.fail("never opened")
            assert scope.cancelled_caught
            await trio.sleep(0.3)  # the server gives up on the silent handler
            assert count_tasks() == before


async def test_handler_error_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: WebSocketRequest) -> None:
        conn = await request.accept()
        await conn.get_message()
        raise ZeroDivisionError("handler bug")

    caplog.set_level(logging.ERROR, logger="wsnursery.server")
    with trio.fail_after(5):
        async with serving(broken) as server:
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                await ws.send_message("go")
                reason = await ws.wait_closed()
            assert reason.code == 1011
            assert "ZeroDivisionError: handler bug" in caplog.text


def test_public_names_report_the_public_module() -> None:
    assert WebSocketConnection.__module__ == "wsnursery"
    assert serve_websocket.__module__ == "wsnursery"


def test_serve_websocket_takes_every_keyword_of_the_server_with_its_default() -> None:
    """``**options: Unpack[ServerOptions]``: the TypedDict lists every keyword of
    WebSocketServer (mypy checks their types), and the signature that help() and
    the docs show spells them out with WebSocketServer's defaults."""
    server = inspect.signature(WebSocketServer).parameters
    keywords = [name for name, p in server.items() if p.kind is p.KEYWORD_ONLY]
    assert list(ServerOptions.__annotations__) == keywords
    shown = inspect.signature(serve_websocket).parameters
    assert [name for name in shown if name in keywords] == keywords
    assert all(shown[name].default == server[name].default for name in keywords)
    assert list(shown)[:3] == ["handler", "host", "port"]
    assert list(shown)[-1] == "task_status"


def test_the_server_keeps_its_settings_in_one_frozen_object_its_attributes_read() -> None:
    """Each field of the frozen options is a keyword of the server, readable as an
    attribute; setting the attribute (as before the options object) takes effect."""
    fields = [f.name for f in dataclasses.fields(_Options)]
    assert set(fields) <= set(ServerOptions.__annotations__)
    server = WebSocketServer(echo, [], max_queue=3, allowed_origins=["HTTPS://Example.com/"])
    assert server.max_queue == 3
    assert server.allowed_origins == {"https://example.com"}
    assert all(getattr(server, name) == getattr(server._options, name) for name in fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        server._options.max_queue = 5  # type: ignore[misc]
    server.max_queue = 5
    assert server.max_queue == 5 == server._options.max_queue


async def test_server_keepalive_closes_a_silent_client_and_keeps_live_ones() -> None:
    closed: list[tuple[int, str]] = []

    async def watch(request: WebSocketRequest) -> None:
        conn = await request.accept()
        reason = await conn.wait_closed()
        closed.append((reason.code, reason.reason))

    with trio.fail_after(10):
        async with serving(watch, ping_interval=0.2, ping_timeout=0.3) as server:
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


async def test_a_half_read_request_head_gets_503_at_once_on_shutdown() -> None:
    with trio.fail_after(5):
        async with (
            serving(echo, close_timeout=30, open_timeout=30) as server,
            trio.open_nursery() as nursery,
        ):
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
