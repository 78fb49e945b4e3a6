"""The opening handshake on both sides, with no I/O and no trio.

The server reads the HTTP request head itself (so that it can answer 414 and 431
with limits of its own), parses it with h11, and checks the RFC 6455 section
4.2.1 requirements one by one so that each failure gets its own status and a
message that says what was wrong. Responses are serialised by h11, which
refuses header names and values that would split the response.
The client builds the upgrade request with h11 and checks the 101 response
(section 4.1): accept token, Upgrade and Connection headers, subprotocol,
extensions.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11
from wsproto.extensions import Extension
from wsproto.handshake import client_extensions_handshake, server_extensions_handshake
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from .exceptions import ConnectionRejected, InvalidHandshake
from .headers import HeaderPairs, Headers, parse_query, raw_pairs, split_target

__all__ = [
    "ClientHandshake",
    "HTTPError",
    "Headers",
    "RequestHead",
    "ServerHandshake",
]


def _tokens(headers: Headers, name: str) -> list[str]:
    """The comma-separated tokens of every ``name`` header, stripped."""
    out: list[str] = []
    for value in headers.get_all(name):
        out.extend(token.strip() for token in value.split(",") if token.strip())
    return out


def _has_token(headers: Headers, name: str, token: str) -> bool:
    """True when one of the ``name`` headers lists ``token`` (case-insensitive)."""
    return any(t.lower() == token for t in _tokens(headers, name))


class HTTPError(Exception):
    """A request the server answers with an HTTP error instead of an upgrade."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.headers = list(headers)


@dataclass
class RequestHead:
    """A parsed HTTP request head, as the server received it."""

    method: str
    target: str
    http_version: str
    headers: Headers
    #: The path part of the target, without the query (what routes match).
    url_path: str = field(init=False)
    #: The raw query string, after the ``?`` ("" if none).
    query_string: str = field(init=False)
    #: The query string, decoded into a mapping of first values.
    query: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.url_path, query = split_target(self.target)
        self.query_string = query
        self.query = parse_query(query) if query else {}

    @property
    def path(self) -> str:
        """The full request target, query included (as trio-websocket's ``path``)."""
        return self.target

    @property
    def is_upgrade(self) -> bool:
        """True when the request asks for a WebSocket (``Upgrade: websocket``)."""
        return _has_token(self.headers, "upgrade", "websocket")

    @property
    def subprotocols(self) -> list[str]:
        """The subprotocols the client proposed, in its order of preference."""
        return _tokens(self.headers, "sec-websocket-protocol")

    @property
    def extension_offers(self) -> list[str]:
        """The raw ``Sec-WebSocket-Extensions`` offers."""
        return _tokens(self.headers, "sec-websocket-extensions")


class ServerHandshake:
    """Reads one HTTP request head and answers it with 101 or an error.

    Args:
        max_request_line: The longest request line, in bytes (414 past it).
        max_header_line: The longest header line (431 past it).
        max_headers: The most header lines (431 past it).
    """

    def __init__(
        self,
        *,
        max_request_line: int = 8192,
        max_header_line: int = 8192,
        max_headers: int = 128,
    ) -> None:
        self.max_request_line = max_request_line
        self.max_header_line = max_header_line
        self.max_headers = max_headers
        self._buffer = bytearray()
        # Complete lines already checked, and where the next line starts in
        # _buffer: a head arriving in many small pieces is checked once, not
        # once per piece.
        self._lines = 0
        self._line_start = 0
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head_size + 4)
        self.head: RequestHead | None = None
        #: Bytes received after the request head (frames sent early, a body).
        self.trailing_data = b""

    @property
    def max_head_size(self) -> int:
        return self.max_request_line + (self.max_headers + 1) * (self.max_header_line + 2)

    def receive_data(self, data: bytes | bytearray | memoryview) -> RequestHead | None:
        """Feed bytes; return the request head once it is complete.

        Raises:
            HTTPError: with 400, 414 or 431 for a malformed or oversized head,
                or 400 when the connection ends before the head does.
        """
        if self.head is not None:
            raise RuntimeError("the request head was already received")
        if not data:
            raise HTTPError(400, "connection closed before the request head was complete")
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n", start)
        if end < 0:
            self._check_partial(start)
            return None
        head, self.trailing_data = bytes(self._buffer[: end + 4]), bytes(self._buffer[end + 4 :])
        self._buffer = bytearray()
        self._check_lines(head[:-4].split(b"\r\n"))
        self._h11.receive_data(head)
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise HTTPError(400, f"malformed request: {exc}") from None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 has the whole head
            raise HTTPError(400, "malformed request")
        self.head = RequestHead(
            method=event.method.decode("ascii"),
            target=event.target.decode("ascii", "replace"),
            http_version=event.http_version.decode("ascii"),
            headers=Headers(event.headers.raw_items()),
        )
        return self.head

    def _check_partial(self, start: int) -> None:
        """Check the lines completed since the last call, and the one still growing.

        ``start`` is where :meth:`receive_data` began looking for the end of
        the head: a line that ended before it was checked by an earlier call.
        """
        buffer = self._buffer
        end = buffer.rfind(b"\r\n", max(start, self._line_start))
        if end >= 0:
            lines = bytes(buffer[self._line_start : end]).split(b"\r\n")
            self._check_lines(lines, self._lines)
            self._lines += len(lines)
            self._line_start = end + 2
        # The last line may still grow, and may end with the CR of a CRLF
        # whose LF has not arrived yet.
        last = len(buffer) - self._line_start
        if buffer.endswith(b"\r"):
            last -= 1
        limit = self.max_request_line if self._lines == 0 else self.max_header_line
        if last > limit:
            self._check_lines([bytes(buffer[self._line_start :])], self._lines)
        if len(buffer) > self.max_head_size:
            raise HTTPError(431, "request head too large")

    def _check_lines(self, lines: list[bytes], first: int = 0) -> None:
        """Check ``lines``, numbered from ``first`` in the head (0: the request line)."""
        if first == 0 and lines and len(lines[0]) > self.max_request_line:
            raise HTTPError(414, f"request line longer than {self.max_request_line} bytes")
        if first + len(lines) - 1 > self.max_headers:
            raise HTTPError(431, f"more than {self.max_headers} header lines")
        for line in lines[1:] if first == 0 else lines:
            if len(line) > self.max_header_line:
                raise HTTPError(431, f"header line longer than {self.max_header_line} bytes")

    def check_upgrade(self) -> None:
        """Check the RFC 6455 section 4.2.1 requirements of an upgrade request.

        Raises:
            HTTPError: 405 for a method other than GET, 400 for a missing or
                wrong header or a body (``Content-Length`` other than 0, any
                ``Transfer-Encoding``), 426 for a version other than 13.
        """
        head = self.head
        assert head is not None
        if head.method != "GET":
            raise HTTPError(405, "a WebSocket upgrade must use GET", [("Allow", "GET")])
        if head.http_version != "1.1":
            raise HTTPError(400, "a WebSocket upgrade needs HTTP/1.1")
        headers = head.headers
        if not head.is_upgrade:
            raise HTTPError(
                426,
                "this resource speaks WebSocket only",
                [("Upgrade", "websocket"), ("Connection", "Upgrade")],
            )
        if not _has_token(headers, "connection", "upgrade"):
            raise HTTPError(400, "missing 'Connection: Upgrade'")
        # An upgrade has no body. Behind a proxy that forwards one, the bytes
        # after the head would otherwise be read as frames: request smuggling.
        lengths = _tokens(headers, "content-length")  # digits: h11 checked them
        if "transfer-encoding" in headers or any(n.strip("0") for n in lengths):
            raise HTTPError(400, "a WebSocket upgrade request cannot have a body")
        version = headers.get("sec-websocket-version")
        if version != "13":
            raise HTTPError(
                426 if version else 400,
                f"unsupported Sec-WebSocket-Version {version!r}"
                if version
                else "missing Sec-WebSocket-Version",
                [("Sec-WebSocket-Version", "13")],
            )
        keys = headers.get_all("sec-websocket-key")
        if len(keys) != 1:
            raise HTTPError(400, "need exactly one Sec-WebSocket-Key")
        try:
            raw = base64.b64decode(keys[0].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raw = b""
        if len(raw) != 16:
            raise HTTPError(400, "Sec-WebSocket-Key is not 16 bytes in base64")

    def accept(
        self,
        *,
        subprotocol: str | None = None,
        extensions: Sequence[Extension] = (),
        extra_headers: HeaderPairs = (),
    ) -> tuple[bytes, list[Extension]]:
        """Return the 101 response and the extensions it enabled."""
        head = self.head
        assert head is not None
        key = head.headers["sec-websocket-key"].encode("ascii")
        headers: list[tuple[bytes, bytes]] = [
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", generate_accept_token(key)),
        ]
        if subprotocol is not None:
            if subprotocol not in head.subprotocols:
                raise ValueError(f"the client did not propose subprotocol {subprotocol!r}")
            headers.append((b"Sec-WebSocket-Protocol", subprotocol.encode("ascii")))
        enabled: list[Extension] = []
        offers = head.extension_offers if extensions else []
        if offers:
            accepts = server_extensions_handshake(offers, list(extensions))
            if accepts:
                headers.append((b"Sec-WebSocket-Extensions", accepts))
                enabled = [ext for ext in extensions if ext.enabled()]
        extra = raw_pairs(extra_headers)
        if extra:
            # The handler's headers: h11 validates them (no response splitting).
            headers.extend(extra)
            response = h11.InformationalResponse(
                status_code=101, headers=headers, reason=b"Switching Protocols"
            )
            data = self._h11.send(response) or b""
        else:
            # Only our own headers, whose values cannot hold CR or LF: the
            # subprotocol and the extension offer came through h11's parser,
            # the accept token is base64.
            data = b"".join(
                [b"HTTP/1.1 101 Switching Protocols\r\n"]
                + [b"%s: %s\r\n" % pair for pair in headers]
                + [b"\r\n"]
            )
        # The h11 state machine is done with: free it (it is most of the
        # handshake's memory, and the request object may live as long as the
        # connection does).
        del self._h11
        return data, enabled

    def reject(
        self,
        status: int,
        *,
        headers: HeaderPairs = (),
        body: bytes | str = b"",
        content_type: str = "text/plain; charset=utf-8",
    ) -> bytes:
        """Return a complete HTTP response with ``status`` (never 101) and ``body``."""
        if not 200 <= status <= 599:
            raise ValueError(f"cannot reject with HTTP status {status}")
        payload = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        pairs = raw_pairs(headers)
        names = {name.lower() for name, _ in pairs}
        if payload and b"content-type" not in names:
            pairs.append((b"Content-Type", content_type.encode("latin-1")))
        pairs.append((b"Content-Length", str(len(payload)).encode("ascii")))
        pairs.append((b"Connection", b"close"))
        conn = self._h11
        if conn.our_state is not h11.SEND_RESPONSE:
            # The head never parsed (400/408/414/431): answer from a fresh h11
            # state. Cached: hundreds of stale handshakes expiring at once all
            # get the same 408, and a fresh h11 state costs ~40 us each.
            return _headless_response(status, tuple(pairs), payload)
        out = conn.send(h11.Response(status_code=status, headers=pairs)) or b""
        if payload and (self.head is None or self.head.method != "HEAD"):
            out += conn.send(h11.Data(data=payload)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        return out


@functools.lru_cache(maxsize=32)
def _headless_response(status: int, pairs: tuple[tuple[bytes, bytes], ...], body: bytes) -> bytes:
    """A response to a request whose head never parsed, from a fresh h11 state."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    out = conn.send(h11.Response(status_code=status, headers=list(pairs))) or b""
    if body:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out


class ClientHandshake:
    """Builds the upgrade request and checks the server's answer.

    Args:
        host: The ``Host`` header (with the port when it is not the default).
        target: The resource, path and query (``/chat?room=1``).
        subprotocols: Subprotocols to propose, in order of preference.
        extensions: wsproto extensions to offer (permessage-deflate).
        extra_headers: More request headers (``Origin``, ``Authorization``...).
        max_response_size: The most bytes read of a response head and body.
    """

    def __init__(
        self,
        host: str,
        target: str,
        *,
        subprotocols: Sequence[str] = (),
        extensions: Sequence[Extension] = (),
        extra_headers: HeaderPairs = (),
        max_response_size: int = 65536,
    ) -> None:
        self.host = host
        self.target = target
        self.subprotocols = list(subprotocols)
        self.extensions = list(extensions)
        self.extra_headers = raw_pairs(extra_headers)
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_response_size)
        self._key = base64.b64encode(os.urandom(16))
        self._max_response_size = max_response_size
        self._rejection: h11.Response | None = None
        self._body = bytearray()
        #: The negotiated subprotocol, once the handshake succeeded.
        self.subprotocol: str | None = None
        #: The response headers, once the handshake succeeded.
        self.response_headers = Headers()
        #: The extensions the server accepted.
        self.accepted_extensions: list[Extension] = []
        #: Bytes after the 101 response (the server's first frames).
        self.trailing_data = b""
        #: True when the server closed the connection without any answer.
        self.closed_before_answer = False

    def request(self) -> bytes:
        """The bytes of the upgrade request."""
        headers = self._request_pairs()
        request = h11.Request(method=b"GET", target=self.target.encode("ascii"), headers=headers)
        return self._h11.send(request) or b""

    def request_headers(self) -> Headers:
        """The headers of the upgrade request."""
        return Headers(self._request_pairs())

    def _request_pairs(self) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = [
            (b"Host", self.host.encode("idna")),
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", self._key),
            (b"Sec-WebSocket-Version", b"13"),
        ]
        if self.subprotocols:
            headers.append((b"Sec-WebSocket-Protocol", ", ".join(self.subprotocols).encode()))
        offers = []
        for ext in self.extensions:
            offer = ext.offer()
            if offer is True:
                offers.append(ext.name.encode("ascii"))
            elif isinstance(offer, str):
                offers.append(f"{ext.name}; {offer}".encode("ascii"))
        if offers:
            headers.append((b"Sec-WebSocket-Extensions", b", ".join(offers)))
        headers.extend(self.extra_headers)
        return headers

    def receive_data(self, data: bytes | bytearray) -> bool:
        """Feed the server's bytes; return True once the connection is open.

        Raises:
            ConnectionRejected: the server answered with another status.
            InvalidHandshake: the answer broke RFC 6455, or the server closed
                the connection before answering.
        """
        self._h11.receive_data(bytes(data))
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if not data:
                    self._end_of_data()  # closed mid-answer: say so, not "malformed"
                raise InvalidHandshake(f"malformed HTTP response: {exc}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if not data:
                    self._end_of_data()
                return False
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._accepted(event)
                    return True
                continue  # 1xx before the real answer: skip it (RFC 9110 15.2)
            if isinstance(event, h11.Response):
                self._rejection = event
            elif isinstance(event, h11.Data):
                room = self._max_response_size - len(self._body)
                self._body += event.data[: max(room, 0)]
                if len(self._body) >= self._max_response_size:
                    self._end_of_data()  # enough of the body: do not read forever
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self._end_of_data()

    def _end_of_data(self) -> None:
        if self._rejection is not None:
            raise ConnectionRejected(
                self._rejection.status_code,
                list(self._rejection.headers.raw_items()),
                bytes(self._body),
            )
        self.closed_before_answer = True
        raise InvalidHandshake("connection closed before the server answered the upgrade")

    def _accepted(self, event: h11.InformationalResponse) -> None:
        headers = Headers(event.headers.raw_items())
        if not _has_token(headers, "upgrade", "websocket"):
            raise InvalidHandshake("101 response without 'Upgrade: websocket'")
        if not _has_token(headers, "connection", "upgrade"):
            raise InvalidHandshake("101 response without 'Connection: Upgrade'")
        expected = generate_accept_token(self._key).decode("ascii")
        if headers.get("sec-websocket-accept") != expected:
            raise InvalidHandshake("wrong or missing Sec-WebSocket-Accept")
        subprotocol = headers.get("sec-websocket-protocol")
        if subprotocol is not None and subprotocol not in self.subprotocols:
            raise InvalidHandshake(f"server chose a subprotocol we did not offer: {subprotocol!r}")
        try:
            self.accepted_extensions = client_extensions_handshake(
                _tokens(headers, "sec-websocket-extensions"), self.extensions
            )
        except RemoteProtocolError as exc:
            raise InvalidHandshake(str(exc)) from None
        self.subprotocol = subprotocol
        self.response_headers = headers
        self.trailing_data = self._h11.trailing_data[0]
