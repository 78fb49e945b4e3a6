"""greeter.py over wss://, with certificates made on the fly by trustme.

    python -m pytest examples/test_greeter_tls.py

Needs pytest, pytest-trio and trustme.
"""

from __future__ import annotations

import functools
import ssl

import pytest
import trio
import trustme
from greeter import greeter

from wsnursery import TransportError, WebSocketServer, open_websocket_url, serve_websocket

pytestmark = pytest.mark.trio

TIME_LIMIT = 5.0


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A certificate authority that exists only for this test session."""
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def tls_server(nursery: trio.Nursery, server_context: ssl.SSLContext) -> WebSocketServer:
    server: WebSocketServer = await nursery.start(
        functools.partial(serve_websocket, greeter, "127.0.0.1", 0, ssl_context=server_context)
    )
    return server


async def test_greets_over_tls(tls_server: WebSocketServer, client_context: ssl.SSLContext) -> None:
    url = f"wss://127.0.0.1:{tls_server.port}/greet"
    with trio.fail_after(TIME_LIMIT):
        async with open_websocket_url(url, ssl_context=client_context) as conn:
            await conn.send_message("Alan")
            assert await conn.get_message() == "hello, Alan"


async def test_untrusted_certificate_is_refused(tls_server: WebSocketServer) -> None:
    # The default context trusts the system's CAs, not our test CA.
    url = f"wss://127.0.0.1:{tls_server.port}/greet"
    with trio.fail_after(TIME_LIMIT), pytest.raises(TransportError) as info:
        async with open_websocket_url(url):
            pytest.fail("the TLS handshake should fail")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
