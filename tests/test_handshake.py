"""The handshake layer on both sides, with no I/O."""

from __future__ import annotations

import base64

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.utilities import generate_accept_token

from wsnursery import ConnectionRejected, Headers, InvalidHandshake
from wsnursery._sansio.deflate import BoundedPerMessageDeflate
from wsnursery._sansio.handshake import ClientHandshake, HTTPError, ServerHandshake

KEY = base64.b64encode(b"0123456789abcdef").decode()


def request(*lines: str, method: str = "GET", target: str = "/chat", version: str = "1.1") -> bytes:
    head = [f"{method} {target} HTTP/{version}", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


GOOD = (
    "Host: example",
    "Upgrade: websocket",
    "Connection: keep-alive, Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
)


def parse(data: bytes) -> ServerHandshake:
    hs = ServerHandshake()
    assert hs.receive_data(data) is not None
    return hs


def status_of(response: bytes) -> int:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(response)
    event = conn.next_event()
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    return event.status_code


def test_good_request_parses_and_accepts() -> None:
    hs = parse(request(*GOOD, "Sec-WebSocket-Protocol: a, b", target="/chat?room=1&x="))
    hs.check_upgrade()
    assert hs.head is not None
    assert hs.head.path == "/chat?room=1&x="
    assert hs.head.url_path == "/chat"
    assert hs.head.query_string == "room=1&x="
    assert hs.head.query == {"room": "1", "x": ""}
    assert hs.head.subprotocols == ["a", "b"]
    assert hs.head.headers["HOST"] == "example"
    response, enabled = hs.accept(subprotocol="b", extra_headers=[("X-Thing", "1")])
    assert response.startswith(b"HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {generate_accept_token(KEY.encode()).decode()}".encode() in (
        response
    )
    assert b"Sec-WebSocket-Protocol: b\r\n" in response
    assert b"X-Thing: 1\r\n" in response
    assert enabled == []


def test_head_arriving_byte_by_byte_and_trailing_data_kept() -> None:
    hs = ServerHandshake()
    data = request(*GOOD) + b"\x81\x80abcd"
    head = None
    for i in range(len(data)):
        head = hs.receive_data(data[i : i + 1])
        if head is not None:
            break
    assert head is not None
    rest = data[i + 1 :]
    assert hs.trailing_data + rest == b"\x81\x80abcd"


def test_compression_is_negotiated_only_when_offered() -> None:
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
    hs = parse(request(*GOOD, offer))
    ext = BoundedPerMessageDeflate()
    response, enabled = hs.accept(extensions=[ext])
    assert b"Sec-WebSocket-Extensions: permessage-deflate" in response
    assert enabled == [ext]
    hs = parse(request(*GOOD))
    response, enabled = hs.accept(extensions=[BoundedPerMessageDeflate()])
    assert b"Sec-WebSocket-Extensions" not in response
    assert enabled == []


def test_unproposed_subprotocol_is_refused_locally() -> None:
    hs = parse(request(*GOOD, "Sec-WebSocket-Protocol: a"))
    with pytest.raises(ValueError, match="did not propose"):
        hs.accept(subprotocol="z")


def test_header_injection_is_refused_by_h11() -> None:
    hs = parse(request(*GOOD))
    with pytest.raises(h11.LocalProtocolError):
        hs.accept(extra_headers=[("X-Evil", "a\r\nSet-Cookie: x=1")])


@pytest.mark.parametrize(
    ("data", "status", "extra"),
    [
        (request(*GOOD, method="POST"), 405, ("Allow", "GET")),
        (request(*GOOD, version="1.0"), 400, None),
        (request(*[h for h in GOOD if not h.startswith("Upgrade")]), 426, ("Upgrade", "websocket")),
        (request(*[h for h in GOOD if not h.startswith("Connection")]), 400, None),
        (request(*[h for h in GOOD if not h.startswith("Sec-WebSocket-Key")]), 400, None),
        (request(*GOOD[:3], "Sec-WebSocket-Key: c2hvcnQ=", GOOD[4]), 400, None),
        (request(*GOOD[:3], "Sec-WebSocket-Key: !!!notbase64!!!", GOOD[4]), 400, None),
        (request(*GOOD, f"Sec-WebSocket-Key: {KEY}"), 400, None),  # two keys
        (request(*GOOD[:4], "Sec-WebSocket-Version: 12"), 426, ("Sec-WebSocket-Version", "13")),
        (request(*GOOD[:4]), 400, ("Sec-WebSocket-Version", "13")),
        (request(*GOOD, "Content-Length: 6"), 400, None),  # a body: request smuggling
        (request(*GOOD, "Content-Length: 06"), 400, None),
        (request(*GOOD, "Transfer-Encoding: chunked"), 400, None),
    ],
)
def test_bad_upgrade_requests_get_their_status(
    data: bytes, status: int, extra: tuple[str, str] | None
) -> None:
    hs = parse(data)
    with pytest.raises(HTTPError) as info:
        hs.check_upgrade()
    assert info.value.status == status
    if extra:
        assert extra in info.value.headers
    response = hs.reject(info.value.status, headers=info.value.headers, body=info.value.message)
    assert status_of(response) == status
    assert info.value.message.encode() in response


@pytest.mark.parametrize("length", ["0", "00"])
def test_upgrade_with_content_length_zero_is_fine(length: str) -> None:
    parse(request(*GOOD, f"Content-Length: {length}")).check_upgrade()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),  # still incomplete
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000, 431),
        (request(*GOOD, *[f"X-{i}: v" for i in range(200)]), 431),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"", 400),
    ],
)
def test_malformed_or_oversized_heads(data: bytes, status: int) -> None:
    hs = ServerHandshake()
    with pytest.raises(HTTPError) as info:
        hs.receive_data(data)
    assert info.value.status == status
    assert status_of(hs.reject(status, body="x")) == status


def test_limits_are_keywords() -> None:
    hs = ServerHandshake(max_request_line=20)
    with pytest.raises(HTTPError) as info:
        hs.receive_data(b"GET /0123456789012345678 HTTP/1.1\r\n")
    assert info.value.status == 414
    hs = ServerHandshake(max_headers=2)
    with pytest.raises(HTTPError) as info:
        hs.receive_data(request("A: 1", "B: 2", "C: 3"))
    assert info.value.status == 431


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    hs = ServerHandshake()
    status = 0
    try:
        head = hs.receive_data(data)
        if head is not None:
            hs.check_upgrade()
    except HTTPError as exc:
        status = exc.status
    assert status == 0 or 400 <= status < 500


def test_reject_response_has_body_and_length() -> None:
    hs = parse(request(*GOOD))
    out = hs.reject(403, headers=[("X-Why", "no")], body="go away")
    assert out.startswith(b"HTTP/1.1 403 ")
    assert b"Content-Length: 7\r\n" in out
    assert out.endswith(b"go away")
    with pytest.raises(ValueError, match="101"):
        parse(request(*GOOD)).reject(101)


def test_headers_mapping() -> None:
    headers = Headers([(b"Set-Cookie", b"a=1"), ("set-cookie", "b=2"), ("X", "y")])
    assert headers["SET-COOKIE"] == "a=1"
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert len(headers) == 2
    assert "x" in headers
    assert list(headers) == ["Set-Cookie", "X"]
    assert headers.get("missing") is None


# -- client side ------------------------------------------------------------------


def server_answer(client: ClientHandshake, *extra: str, accept: str | None = None) -> bytes:
    sent = client.request()
    server = ServerHandshake()
    assert server.receive_data(sent) is not None
    server.check_upgrade()
    assert server.head is not None
    key = server.head.headers["sec-websocket-key"].encode()
    token = accept if accept is not None else generate_accept_token(key).decode()
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade"]
    lines.append(f"Sec-WebSocket-Accept: {token}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_client_round_trip_with_server() -> None:
    ext = BoundedPerMessageDeflate()
    client = ClientHandshake(
        "example:8080",
        "/x?y=1",
        subprotocols=["p1", "p2"],
        extensions=[ext],
        extra_headers=[("Origin", "http://example")],
    )
    server = ServerHandshake()
    assert server.receive_data(client.request()) is not None
    server.check_upgrade()
    assert server.head is not None
    assert server.head.headers["origin"] == "http://example"
    response, _ = server.accept(subprotocol="p2", extensions=[BoundedPerMessageDeflate()])
    assert client.receive_data(response + b"\x81\x02hi")
    assert client.subprotocol == "p2"
    assert client.accepted_extensions == [ext]
    assert client.trailing_data == b"\x81\x02hi"


def test_client_needs_more_data() -> None:
    client = ClientHandshake("h", "/")
    answer = server_answer(client)
    assert not client.receive_data(answer[:10])
    assert client.receive_data(answer[10:])


@pytest.mark.parametrize(
    ("extra", "accept", "message"),
    [
        ((), "d3Jvbmc=", "Sec-WebSocket-Accept"),
        (("Sec-WebSocket-Protocol: nope",), None, "subprotocol"),
        (("Sec-WebSocket-Extensions: x-unknown",), None, "x-unknown"),
    ],
)
def test_client_refuses_bad_101(extra: tuple[str, ...], accept: str | None, message: str) -> None:
    client = ClientHandshake("h", "/", subprotocols=["p"])
    with pytest.raises(InvalidHandshake, match=message):
        client.receive_data(server_answer(client, *extra, accept=accept))


def test_client_refuses_101_without_upgrade_header() -> None:
    client = ClientHandshake("h", "/")
    answer = server_answer(client).replace(b"Upgrade: websocket\r\n", b"")
    with pytest.raises(InvalidHandshake, match="Upgrade"):
        client.receive_data(answer)


def test_client_rejection_carries_status_headers_body() -> None:
    client = ClientHandshake("h", "/")
    client.request()
    response = b"HTTP/1.1 403 Forbidden\r\nX-Reason: nope\r\nContent-Length: 4\r\n\r\ndeny"
    with pytest.raises(ConnectionRejected) as info:
        client.receive_data(response)
    assert info.value.status_code == 403
    assert info.value.headers["x-reason"] == "nope"
    assert info.value.body == b"deny"


def test_client_rejection_body_until_eof() -> None:
    client = ClientHandshake("h", "/")
    client.request()
    assert not client.receive_data(b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\npart")
    with pytest.raises(ConnectionRejected) as info:
        client.receive_data(b"")
    assert (info.value.status_code, info.value.body) == (503, b"part")


def test_client_eof_before_answer() -> None:
    client = ClientHandshake("h", "/")
    client.request()
    with pytest.raises(InvalidHandshake, match="before the server answered"):
        client.receive_data(b"")


def test_client_malformed_answer() -> None:
    client = ClientHandshake("h", "/")
    client.request()
    with pytest.raises(InvalidHandshake, match="malformed"):
        client.receive_data(b"NOT HTTP AT ALL\r\n\r\n")
