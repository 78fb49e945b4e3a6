"""wss:// over real TCP on 127.0.0.1, with certificates from a throwaway CA (trustme)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trustme
from websockets.sync.client import connect as ws_sync_connect
from websockets.trio.client import connect as ws_trio_connect

import wsnursery
from _helpers import HOST, assert_no_leftover_tasks, count_tasks, wait_until
from wsnursery import HandshakeError, TransportError, open_websocket, open_websocket_url

TIMEOUT = 5  # seconds: the hard cap of every test


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)  # a certificate for the IP address
    return context


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def wss_server(context: ssl.SSLContext) -> AsyncIterator[tuple[Any, list[Any]]]:
    """An echo server over TLS; yields it and the requests' Host headers."""
    hosts: list[Any] = []

    async def handler(request: wsnursery.WebSocketRequest) -> None:
        hosts.append(request.headers.get("Host"))
        conn = await request.accept()
        async for message in conn:
            await conn.send_message(message)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                wsnursery.serve_websocket,
                handler,
                HOST,
                0,
                ssl_context=context,
                ping_interval=None,
                close_timeout=1,
                open_timeout=2,
            )
        )
        yield server, hosts
        nursery.cancel_scope.cancel()


async def assert_echo(conn: wsnursery.WebSocketConnection) -> None:
    for message in ["over TLS ☃", b"\x00binary\xff", "", b"x" * 300_000]:
        await conn.send_message(message)
        assert await conn.get_message() == message


@pytest.mark.parametrize("compression", [True, False], ids=["deflate", "plain"])
async def test_wss_echo(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, compression: bool
) -> None:
    with trio.fail_after(TIMEOUT):
        async with wss_server(server_context) as (server, hosts):
            url = f"wss://{HOST}:{server.port}/echo"
            async with open_websocket_url(
                url, ssl_context=client_context, compression=compression, ping_interval=None
            ) as conn:
                await assert_echo(conn)
                assert bool(conn.extensions) is compression
                assert conn.remote is not None
                assert conn.remote[1] == server.port
            assert conn.closed is not None
            assert conn.closed.code == 1000
            assert hosts == [f"{HOST}:{server.port}"]
            await wait_until(lambda: not server.connections)


async def test_wss_open_websocket_with_host_and_port(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            wss_server(server_context) as (server, _hosts),
            open_websocket(
                HOST, server.port, "/", ssl_context=client_context, ping_interval=None
            ) as conn,
        ):
            await assert_echo(conn)


async def default_trust_store_failure(server_context: ssl.SSLContext) -> TransportError:
    """Connect with the default trust store, which does not know our CA."""
    async with wss_server(server_context) as (server, _hosts):
        baseline = count_tasks()
        with pytest.raises(TransportError) as info:
            async with open_websocket_url(f"wss://{HOST}:{server.port}/", ping_interval=None):
                pytest.fail("the certificate should not have been trusted")
        await assert_no_leftover_tasks(baseline)
        await wait_until(lambda: not server.connections)
        return info.value


async def test_default_trust_store_fails_with_transport_error(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    with trio.fail_after(TIMEOUT):
        exc = await default_trust_store_failure(server_context)
    chain = []
    cause: BaseException | None = exc
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain), chain


async def test_tls_failure_cause_is_the_ssl_error(server_context: ssl.SSLContext) -> None:
    """TransportError keeps the *original* error as __cause__ (its docstring's promise).

    trio.SSLStream wraps ssl errors in trio.BrokenResourceError, so the cause must be
    unwrapped for the TLS branch of connect_websocket to apply.
    """
    with trio.fail_after(TIMEOUT):
        exc = await default_trust_store_failure(server_context)
    assert isinstance(exc.__cause__, ssl.SSLCertVerificationError), repr(exc.__cause__)
    assert "TLS handshake" in str(exc), str(exc)


async def test_wrong_host_name_fails_with_transport_error(
    ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("not-this-host.example").configure_cert(context)
    with trio.fail_after(TIMEOUT):
        async with wss_server(context) as (server, _hosts):
            with pytest.raises(TransportError):
                async with open_websocket_url(
                    f"wss://{HOST}:{server.port}/", ssl_context=client_context
                ):
                    pytest.fail("the host name should not have matched")


async def test_plain_client_against_tls_server_fails_and_server_survives(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    with trio.fail_after(TIMEOUT):
        async with wss_server(server_context) as (server, _hosts):
            baseline = count_tasks()
            with pytest.raises((HandshakeError, TransportError)):
                async with open_websocket(HOST, server.port, "/", open_timeout=2):
                    pytest.fail("plain HTTP should not reach a TLS server")
            async with open_websocket(
                HOST, server.port, "/", ssl_context=client_context, ping_interval=None
            ) as conn:
                await assert_echo(conn)
            await wait_until(lambda: not server.connections)
            await assert_no_leftover_tasks(baseline)


async def test_websockets_trio_client_over_tls(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    with trio.fail_after(TIMEOUT):
        async with wss_server(server_context) as (server, _hosts):
            async with ws_trio_connect(
                f"wss://{HOST}:{server.port}/", ssl=client_context, proxy=None, open_timeout=3
            ) as ws:
                for message in ["over TLS ☃", b"\x00binary\xff", b"x" * 300_000]:
                    await ws.send(message)
                    assert await ws.recv() == message
                pong = await ws.ping(b"tls ping")
                await pong.wait()
            assert ws.close_code == 1000


async def test_websockets_sync_client_over_tls(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    def client(port: int) -> int | None:
        with ws_sync_connect(
            f"wss://{HOST}:{port}/", ssl=client_context, proxy=None, open_timeout=3
        ) as ws:
            for message in ["over TLS ☃", b"\x00binary\xff", b"x" * 300_000]:
                ws.send(message)
                assert ws.recv(timeout=3) == message
        return ws.close_code

    with trio.fail_after(TIMEOUT):
        async with wss_server(server_context) as (server, _hosts):
            code = await trio.to_thread.run_sync(client, server.port, abandon_on_cancel=True)
            assert code == 1000
