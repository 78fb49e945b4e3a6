"""The exception hierarchy and the close reason.

Every exception wsnursery raises on purpose derives from :class:`WebSocketError`.
Transport failures (``trio.BrokenResourceError``, ``OSError``, ``ssl.SSLError``)
are never raised bare from a public call: they are mapped to one of these, with
the original exception kept as ``__cause__``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .headers import HeaderPairs, Headers

__all__ = [
    "BackplaneError",
    "CloseCode",
    "CloseReason",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "ConnectionRejected",
    "HandshakeError",
    "HandshakeTimeout",
    "InvalidHandshake",
    "TransportError",
    "WebSocketError",
]


class CloseCode(enum.IntEnum):
    """The close codes RFC 6455 section 7.4.1 defines, and two IANA-registered ones."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005
    ABNORMAL_CLOSURE = 1006
    INVALID_FRAME_PAYLOAD_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015


#: Codes after which a closed connection counts as a normal end:
#: :exc:`ConnectionClosedOK` rather than :exc:`ConnectionClosedError`.
#: 1005 is in the set because a peer that closes without a status code
#: (``ws.close()`` in a browser) ended the connection on purpose.
OK_CLOSE_CODES = frozenset({1000, 1001, 1005})


@dataclass(frozen=True)
class CloseReason:
    """Why a connection closed.

    Attributes:
        code: The close code: the peer's when it sent a close frame, ours when we
            failed the connection (1002, 1007, 1009, 1011), 1006 when the
            transport ended with no close frame at all.
        reason: The close frame's text (may be empty).
        initiated_by_peer: True when the peer sent the first close frame (or
            dropped the connection), False when this side started the close.
    """

    code: int
    reason: str = ""
    initiated_by_peer: bool = True

    def __post_init__(self) -> None:
        # Codes compare and print as plain ints, whether given as CloseCode or int.
        object.__setattr__(self, "code", int(self.code))

    @property
    def name(self) -> str:
        """The code's name (``"NORMAL_CLOSURE"``), or the range it falls in."""
        try:
            return CloseCode(self.code).name
        except ValueError:
            if 3000 <= self.code <= 3999:
                return "LIBRARY_USE"
            if 4000 <= self.code <= 4999:
                return "PRIVATE_USE"
            return "UNKNOWN"

    @property
    def ok(self) -> bool:
        """True for a normal end (1000, 1001 or 1005)."""
        return self.code in OK_CLOSE_CODES

    def __str__(self) -> str:
        text = f"{self.code} ({self.name})"
        return f"{text} {self.reason}" if self.reason else text


class WebSocketError(Exception):
    """The root of every exception wsnursery raises."""


class TransportError(WebSocketError):
    """The TCP or TLS transport failed before the WebSocket handshake finished.

    The original error (``OSError``, ``ssl.SSLError``, ``trio.BrokenResourceError``)
    is kept as ``__cause__``.
    """


class HandshakeError(WebSocketError):
    """The opening handshake did not produce a connection."""


class ConnectionRejected(HandshakeError):
    """The server answered the upgrade request with an HTTP status other than 101.

    Attributes:
        status_code: The HTTP status, e.g. 403.
        headers: The response headers (:class:`Headers`, case-insensitive).
        body: The response body (at most 64 KiB of it).
    """

    def __init__(
        self,
        status_code: int,
        headers: HeaderPairs = (),
        body: bytes = b"",
    ) -> None:
        super().__init__(f"server rejected WebSocket connection: HTTP {status_code}")
        self.status_code = status_code
        self.headers = Headers(headers)
        self.body = body


class HandshakeTimeout(HandshakeError):
    """The opening handshake (TCP, TLS and HTTP together) took longer than ``open_timeout``."""


class InvalidHandshake(HandshakeError):
    """The peer's handshake broke RFC 6455 (bad accept token, missing header, ...)."""


class ConnectionClosed(WebSocketError):
    """The connection is closed: raised by sends and receives once it is.

    Attributes:
        reason: The :class:`CloseReason`.
    """

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(str(reason))
        self.reason = reason

    @staticmethod
    def for_reason(reason: CloseReason) -> ConnectionClosed:
        """The subclass that fits the reason: OK for 1000/1001/1005, Error otherwise."""
        if reason.ok:
            return ConnectionClosedOK(reason)
        return ConnectionClosedError(reason)


class ConnectionClosedOK(ConnectionClosed):
    """The connection ended normally (1000, 1001 or 1005)."""


class ConnectionClosedError(ConnectionClosed):
    """The connection ended abnormally: a protocol error, a timeout, a dropped transport."""


class BackplaneError(WebSocketError):
    """A broadcast backplane could not start: Redis unreachable within ``connect_timeout``.

    Raised by :func:`serve_websocket` (and :meth:`WebSocketServer.run`) before
    the server accepts anyone. Once started, a lost backplane is not an error:
    see :class:`RedisBackplane`. The original error is kept as ``__cause__``.
    """
