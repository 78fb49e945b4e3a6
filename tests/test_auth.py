"""Authentication, the origin allowlist and TLS client certificates, over real TCP.

BasicAuth and TokenAuth as server-level and handler-level authenticators, the
401 challenges, ``request.user`` and ``conn.user``; ``allowed_origins`` (403);
a ``websockets`` client sending credentials and an Origin; and
``server_ssl_context`` with client certificates from a throwaway CA (trustme).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_sync_connect
from websockets.trio.client import connect as ws_trio_connect

import _helpers
from _helpers import HOST, wait_until
from wsnursery import (
    Accept,
    BasicAuth,
    ConnectionRejected,
    HandshakeError,
    Reject,
    TokenAuth,
    TransportError,
    WebSocketConnection,
    WebSocketHandler,
    WebSocketRequest,
    WebSocketServer,
    open_websocket_url,
    server_ssl_context,
)

TIMEOUT = 5  # seconds: the hard cap of every test


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class WhoAmI(WebSocketHandler):
    """Says who the authenticator let in; records what validate saw."""

    seen: list[Any]

    def __init__(self) -> None:
        self.seen = []

    async def validate(self, request: WebSocketRequest) -> Accept | Reject | None:
        self.seen.append(request.user)
        return None

    async def on_connect(self, conn: WebSocketConnection) -> None:
        await conn.send_message(json.dumps({"user": conn.user, "path": conn.path}))


def guarded(authenticator: Any) -> WhoAmI:
    """A WhoAmI whose class has ``authenticator`` set (the handler-level way)."""
    cls = type("Guarded", (WhoAmI,), {"authenticator": authenticator})
    return cls()


async def whoami_function(request: WebSocketRequest) -> None:
    user = request.user
    conn = await request.accept()
    assert conn.user is user
    await conn.send_message(json.dumps({"user": user, "path": conn.path}))


def serving(handler: Any, **kwargs: Any) -> AbstractAsyncContextManager[WebSocketServer]:
    return _helpers.serving(
        handler, **{"ping_interval": None, "close_timeout": 1, "open_timeout": 3, **kwargs}
    )


async def who(url: str, headers: list[tuple[str, str]] | None = None) -> Any:
    """Connect with ``headers``; the user the server reports."""
    async with open_websocket_url(url, extra_headers=headers or []) as ws:
        return json.loads(await ws.get_message())["user"]


async def rejected(url: str, headers: list[tuple[str, str]] | None = None) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=headers or []):
            pytest.fail("should have been refused")
    return info.value


# -- BasicAuth ------------------------------------------------------------------------


def sync_check(user: str, password: str) -> Any:
    return {"name": user, "via": "sync"} if password == f"{user}-pw" else None


async def async_check(user: str, password: str) -> Any:
    await trio.lowlevel.checkpoint()
    return {"name": user, "via": "async"} if password == f"{user}-pw" else None


BASIC_ROUTES = {
    "/map": BasicAuth({"alice": "s3cret", "bob": "pa:ss wörd"}, realm="map realm"),
    "/sync": BasicAuth(sync_check, realm="sync realm"),
    "/async": BasicAuth(async_check, realm="async realm"),
}


@asynccontextmanager
async def basic_server() -> AsyncIterator[tuple[str, dict[str, WhoAmI]]]:
    handlers = {path: guarded(auth) for path, auth in BASIC_ROUTES.items()}
    async with serving(dict(handlers)) as server:
        yield f"ws://{HOST}:{server.port}", handlers


async def test_basic_auth_right_credentials_set_the_user() -> None:
    with trio.fail_after(TIMEOUT):
        async with basic_server() as (base, handlers):
            assert await who(f"{base}/map", [("Authorization", basic("alice", "s3cret"))]) == (
                "alice"
            )
            # A password with a colon and non-ASCII characters (UTF-8, RFC 7617).
            assert await who(f"{base}/map", [("Authorization", basic("bob", "pa:ss wörd"))]) == (
                "bob"
            )
            sync_user = await who(f"{base}/sync", [("Authorization", basic("carol", "carol-pw"))])
            async_user = await who(f"{base}/async", [("Authorization", basic("dan", "dan-pw"))])
    assert sync_user == {"name": "carol", "via": "sync"}
    assert async_user == {"name": "dan", "via": "async"}
    assert handlers["/map"].seen == ["alice", "bob"]
    assert handlers["/sync"].seen == [{"name": "carol", "via": "sync"}]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@pytest.mark.parametrize(
    "header",
    [
        None,
        basic("alice", "wrong"),
        basic("mallory", "s3cret"),
        basic("alice", ""),
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + _b64(b"no-colon-here"),
        "Basic " + _b64(b"alice:\xff\xfe"),  # not UTF-8
        "Bearer s3cret",
        "basic",
    ],
    ids=[
        "missing",
        "wrong-password",
        "unknown-user",
        "empty-password",
        "scheme-only",
        "not-base64",
        "no-colon",
        "not-utf8",
        "other-scheme",
        "lowercase-scheme-only",
    ],
)
async def test_basic_auth_refusals_are_401_with_a_challenge(header: str | None) -> None:
    headers = [] if header is None else [("Authorization", header)]
    with trio.fail_after(TIMEOUT):
        async with basic_server() as (base, handlers):
            for path in BASIC_ROUTES:
                info = await rejected(f"{base}{path}", headers)
                assert info.status_code == 401
                realm = path.strip("/") + " realm"
                challenge = info.headers["www-authenticate"]
                assert challenge.startswith(f'Basic realm="{realm}"'), challenge
    assert all(handler.seen == [] for handler in handlers.values())  # validate never ran


async def test_basic_auth_scheme_is_case_insensitive() -> None:
    header = basic("alice", "s3cret").replace("Basic", "bAsIc")
    with trio.fail_after(TIMEOUT):
        async with basic_server() as (base, _):
            assert await who(f"{base}/map", [("Authorization", header)]) == "alice"


# -- TokenAuth -----------------------------------------------------------------------


async def test_token_from_header_query_and_cookie() -> None:
    auth = TokenAuth({"t0k3n": "svc", "other": {"id": 7}})
    with trio.fail_after(TIMEOUT):
        async with serving({"/t": guarded(auth)}) as server:
            base = f"ws://{HOST}:{server.port}/t"
            assert await who(base, [("Authorization", "Bearer t0k3n")]) == "svc"
            assert await who(base, [("Authorization", "bearer   other")]) == {"id": 7}
            assert await who(f"{base}?token=t0k3n") == "svc"
            assert await who(base, [("Cookie", "theme=dark; token=other")]) == {"id": 7}
            # The header comes first when there are several.
            assert await who(f"{base}?token=other", [("Authorization", "Bearer t0k3n")]) == "svc"
            refusals = [
                await rejected(base),
                await rejected(base, [("Authorization", "Bearer nope")]),
                await rejected(base, [("Authorization", "Bearer")]),
                await rejected(base, [("Authorization", "Basic dDBrM246")]),
                await rejected(f"{base}?token=nope"),
                await rejected(f"{base}?token="),
                await rejected(base, [("Cookie", "token=nope")]),
                await rejected(base, [("Cookie", "session=t0k3n")]),
            ]
    for info in refusals:
        assert info.status_code == 401
        assert info.headers["www-authenticate"].startswith("Bearer")


async def test_token_auth_with_a_custom_header_and_an_async_check() -> None:
    async def check(token: str) -> Any:
        await trio.lowlevel.checkpoint()
        return {"token": token} if token.startswith("ok-") else None

    auth = TokenAuth(check, header="X-Api-Key", query=None, cookie=None)
    with trio.fail_after(TIMEOUT):
        async with serving({"/k": guarded(auth)}) as server:
            base = f"ws://{HOST}:{server.port}/k"
            assert await who(base, [("X-Api-Key", "ok-123")]) == {"token": "ok-123"}
            assert (await rejected(base, [("X-Api-Key", "bad")])).status_code == 401
            # The query and the cookie are switched off.
            assert (await rejected(f"{base}?token=ok-1")).status_code == 401
            assert (await rejected(base, [("Cookie", "token=ok-1")])).status_code == 401


# -- where authenticators apply ---------------------------------------------------------


class Counted(WhoAmI):
    instances = 0

    def __init__(self) -> None:
        super().__init__()
        Counted.instances += 1


async def test_server_level_authenticator_covers_functions_and_handler_objects() -> None:
    obj = WhoAmI()
    both = guarded(BasicAuth({"alice": "s3cret"}))
    routes: dict[str, Any] = {"/fn": whoami_function, "/obj": obj, "/cls": Counted, "/both": both}
    with trio.fail_after(TIMEOUT):
        async with serving(routes, authenticator=TokenAuth({"t0k3n": "svc"})) as server:
            base = f"ws://{HOST}:{server.port}"
            for path in ["/fn", "/obj", "/cls"]:
                info = await rejected(f"{base}{path}")
                assert info.status_code == 401
                assert info.headers["www-authenticate"].startswith("Bearer")
                assert await who(f"{base}{path}?token=t0k3n") == "svc"
            assert Counted.instances >= 1  # one per request that reached the route
            # The server's authenticator runs first, then the handler's.
            info = await rejected(f"{base}/both", [("Authorization", basic("alice", "s3cret"))])
            assert info.headers["www-authenticate"].startswith("Bearer")
            info = await rejected(f"{base}/both?token=t0k3n")
            assert info.headers["www-authenticate"].startswith("Basic")
            user = await who(
                f"{base}/both?token=t0k3n", [("Authorization", basic("alice", "s3cret"))]
            )
            assert user == "alice"  # the last authenticator's user
            # No route, no authentication: 404 comes first.
            assert (await rejected(f"{base}/nowhere")).status_code == 404
    assert obj.seen == ["svc"]
    assert both.seen == ["alice"]


async def test_handler_level_authenticator_only_guards_its_route() -> None:
    guard = guarded(TokenAuth({"t0k3n": "svc"}))
    routes: dict[str, Any] = {"/open": WhoAmI(), "/guarded": guard, "/fn": whoami_function}
    with trio.fail_after(TIMEOUT):
        async with serving(routes) as server:
            base = f"ws://{HOST}:{server.port}"
            assert await who(f"{base}/open") is None
            assert await who(f"{base}/fn") is None
            assert (await rejected(f"{base}/guarded")).status_code == 401
            assert await who(f"{base}/guarded?token=t0k3n") == "svc"


# -- origins ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://good.example", 101),
        (None, 101),
        ("HTTP://Good.Example/", 101),
        ("http://evil.example", 403),
        ("http://good.example.evil.example", 403),
        ("https://good.example", 403),
        ("null", 403),
    ],
)
async def test_origin_allowlist(origin: str | None, status: int) -> None:
    headers = [] if origin is None else [("Origin", origin)]
    with trio.fail_after(TIMEOUT):
        async with serving(
            {"/o": WhoAmI()}, allowed_origins=["http://good.example", "https://other.example"]
        ) as server:
            address = f"ws://{HOST}:{server.port}/o"
            if status == 101:
                assert await who(address, headers) is None
            else:
                assert (await rejected(address, headers)).status_code == status


async def test_origin_is_checked_before_authentication() -> None:
    with trio.fail_after(TIMEOUT):
        async with serving(
            {"/o": WhoAmI()},
            allowed_origins=["http://good.example"],
            authenticator=BasicAuth({"alice": "s3cret"}),
        ) as server:
            address = f"ws://{HOST}:{server.port}/o"
            credentials = ("Authorization", basic("alice", "s3cret"))
            evil = await rejected(address, [credentials, ("Origin", "http://evil.example")])
            good_no_credentials = await rejected(address, [("Origin", "http://good.example")])
            user = await who(address, [credentials, ("Origin", "http://good.example")])
    assert evil.status_code == 403
    assert good_no_credentials.status_code == 401
    assert user == "alice"


# -- an independent client: websockets ---------------------------------------------------


async def test_websockets_client_sends_authorization_and_origin() -> None:
    common = {"proxy": None, "open_timeout": 3, "compression": None}
    with trio.fail_after(TIMEOUT):
        async with serving(
            {"/o": WhoAmI()},
            allowed_origins=["http://good.example"],
            authenticator=BasicAuth({"alice": "s3cret"}),
        ) as server:
            address = f"ws://{HOST}:{server.port}/o"
            async with ws_trio_connect(
                address,
                additional_headers={"Authorization": basic("alice", "s3cret")},
                origin="http://good.example",  # type: ignore[arg-type]
                **common,
            ) as ws:
                assert json.loads(await ws.recv())["user"] == "alice"
            with pytest.raises(InvalidStatus) as evil:
                async with ws_trio_connect(
                    address,
                    additional_headers={"Authorization": basic("alice", "s3cret")},
                    origin="http://evil.example",  # type: ignore[arg-type]
                    **common,
                ):
                    pytest.fail("refused")
            with pytest.raises(InvalidStatus) as anonymous:
                async with ws_trio_connect(address, **common):
                    pytest.fail("refused")

            def sync_client() -> str:
                with ws_sync_connect(
                    address,
                    legacy=True,
                    additional_headers=[("Authorization", basic("alice", "s3cret"))],
                    **common,
                ) as ws:
                    return str(ws.recv(timeout=3))

            answer = await trio.to_thread.run_sync(sync_client, abandon_on_cancel=True)
    assert evil.value.response.status_code == 403
    assert anonymous.value.response.status_code == 401
    assert anonymous.value.response.headers["WWW-Authenticate"].startswith('Basic realm="')
    assert json.loads(answer)["user"] == "alice"


# -- TLS client certificates -------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    """Files for the server (certificate, key, client CA) and client contexts."""
    server_cert = ca.issue_cert(HOST)
    certfile, keyfile, cafile = (
        tmp_path / "server.pem",
        tmp_path / "server.key",
        tmp_path / "ca.pem",
    )
    certfile.write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    server_cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))

    def client_context(cert_from: trustme.CA | None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        if cert_from is not None:
            cert_from.issue_cert("client.example").configure_cert(context)
        return context

    return {"certfile": certfile, "keyfile": keyfile, "cafile": cafile, "client": client_context}


@asynccontextmanager
async def tls_server(context: ssl.SSLContext, seen: list[Any]) -> AsyncIterator[WebSocketServer]:
    async def handler(request: WebSocketRequest) -> None:
        seen.append(request.peer_certificate)
        conn = await request.accept()
        await conn.send_message("hello over TLS")

    async with serving(handler, ssl_context=context) as server:
        yield server


def _san(cert: dict[str, Any]) -> list[tuple[str, str]]:
    return list(cert.get("subjectAltName", ()))


async def test_client_certificate_is_required_and_reaches_the_request(
    ca: trustme.CA, pki: dict[str, Any]
) -> None:
    context = server_ssl_context(pki["certfile"], pki["keyfile"], client_ca=pki["cafile"])
    seen: list[Any] = []
    with trio.fail_after(TIMEOUT):
        async with tls_server(context, seen) as server:
            address = f"wss://{HOST}:{server.port}/"
            async with open_websocket_url(address, ssl_context=pki["client"](ca)) as ws:
                assert await ws.get_message() == "hello over TLS"
    assert len(seen) == 1
    assert ("DNS", "client.example") in _san(seen[0])


def handshake_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The server's records about connections that failed before their request head."""
    return [
        r
        for r in caplog.records
        if r.name == "wsnursery.server"
        and ("during the handshake" in r.getMessage() or "unexpected error" in r.getMessage())
    ]


@pytest.mark.parametrize("client_cert", ["none", "unknown-ca"])
async def test_a_refused_client_certificate_is_a_transport_error(
    ca: trustme.CA, pki: dict[str, Any], client_cert: str
) -> None:
    """Without an acceptable client certificate the client gets TransportError, every time.

    With TLS 1.3 the client's side of the TLS handshake is over before the
    server checks the certificate; the server then drops the connection
    without an alert, and the client sees either a reset or a plain EOF while
    waiting for the HTTP answer. Both are the TLS transport failing: repeated
    so that both orders of events come up.
    """
    context = server_ssl_context(pki["certfile"], pki["keyfile"], client_ca=pki["cafile"])
    seen: list[Any] = []
    outcomes: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with tls_server(context, seen) as server:
            address = f"wss://{HOST}:{server.port}/"
            for _ in range(12):
                client_context = pki["client"](None if client_cert == "none" else trustme.CA())
                try:
                    async with open_websocket_url(address, ssl_context=client_context):
                        outcomes.append("opened")
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
    assert seen == []
    assert outcomes == ["TransportError"] * 12, outcomes


async def test_failed_tls_handshakes_are_not_logged_as_server_errors(
    ca: trustme.CA, pki: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that fails the TLS handshake is the client's problem: no ERROR log."""
    caplog.set_level(logging.DEBUG, logger="wsnursery")
    context = server_ssl_context(pki["certfile"], pki["keyfile"], client_ca=pki["cafile"])
    with trio.fail_after(TIMEOUT):
        async with tls_server(context, []) as server:
            address = f"wss://{HOST}:{server.port}/"
            with pytest.raises((TransportError, HandshakeError)):
                async with open_websocket_url(address, ssl_context=pki["client"](None)):
                    pytest.fail("no client certificate: refused")
            # And a client that speaks plain HTTP to the TLS port.
            stream = await trio.open_tcp_stream(HOST, server.port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                with suppress(trio.BrokenResourceError):
                    while await stream.receive_some(4096):
                        pass
            await wait_until(lambda: len(handshake_failures(caplog)) == 2)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_optional_client_certificate(ca: trustme.CA, pki: dict[str, Any]) -> None:
    context = server_ssl_context(
        pki["certfile"],
        pki["keyfile"],
        client_ca=pki["cafile"],
        require_client_certificate=False,
    )
    seen: list[Any] = []
    with trio.fail_after(TIMEOUT):
        async with tls_server(context, seen) as server:
            address = f"wss://{HOST}:{server.port}/"
            async with open_websocket_url(address, ssl_context=pki["client"](None)) as ws:
                assert await ws.get_message() == "hello over TLS"
            async with open_websocket_url(address, ssl_context=pki["client"](ca)) as ws:
                assert await ws.get_message() == "hello over TLS"
    assert seen[0] is None
    assert ("DNS", "client.example") in _san(seen[1])


async def test_without_client_ca_no_certificate_is_asked_for(
    ca: trustme.CA, pki: dict[str, Any]
) -> None:
    context = server_ssl_context(pki["certfile"], pki["keyfile"])
    seen: list[Any] = []
    with trio.fail_after(TIMEOUT):
        async with tls_server(context, seen) as server:
            address = f"wss://{HOST}:{server.port}/"
            async with open_websocket_url(address, ssl_context=pki["client"](ca)) as ws:
                assert await ws.get_message() == "hello over TLS"
    assert seen == [None]
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
