"""wsnursery: WebSocket servers, handlers and clients for Trio, built on wsproto.

A nursery owns the server, a nursery owns each connection, and nothing outlives
the ``async with`` (or ``serve_*`` call) that started it.
"""

from __future__ import annotations

from ._broadcast import Backplane as Backplane
from ._broadcast import Broadcaster as Broadcaster
from ._broadcast import BroadcastReport as BroadcastReport
from ._broadcast import BroadcastStats as BroadcastStats
from ._broadcast import Envelope as Envelope
from ._broadcast import MemoryBackplane as MemoryBackplane
from ._broadcast import OverflowPolicy as OverflowPolicy
from ._client import connect_websocket as connect_websocket
from ._client import connect_websocket_url as connect_websocket_url
from ._client import open_websocket as open_websocket
from ._client import open_websocket_url as open_websocket_url
from ._connection import WebSocketConnection as WebSocketConnection
from ._handler import Accept as Accept
from ._handler import Authenticator as Authenticator
from ._handler import BasicAuth as BasicAuth
from ._handler import HTTPRequest as HTTPRequest
from ._handler import HTTPResponse as HTTPResponse
from ._handler import Reject as Reject
from ._handler import TokenAuth as TokenAuth
from ._handler import WebSocketHandler as WebSocketHandler
from ._reconnect import ClientEvent as ClientEvent
from ._reconnect import CloseEvent as CloseEvent
from ._reconnect import ErrorEvent as ErrorEvent
from ._reconnect import MessageEvent as MessageEvent
from ._reconnect import OpenEvent as OpenEvent
from ._reconnect import ReadyState as ReadyState
from ._reconnect import ReconnectingWebSocket as ReconnectingWebSocket
from ._reconnect import default_retry_on as default_retry_on
from ._reconnect import open_reconnecting_websocket as open_reconnecting_websocket
from ._redis import BackplaneEvent as BackplaneEvent
from ._redis import RedisBackplane as RedisBackplane
from ._redis import RedisBackplaneStats as RedisBackplaneStats
from ._sansio.backoff import Backoff as Backoff
from ._sansio.exceptions import BackplaneError as BackplaneError
from ._sansio.exceptions import CloseCode as CloseCode
from ._sansio.exceptions import CloseReason as CloseReason
from ._sansio.exceptions import ConnectionClosed as ConnectionClosed
from ._sansio.exceptions import ConnectionClosedError as ConnectionClosedError
from ._sansio.exceptions import ConnectionClosedOK as ConnectionClosedOK
from ._sansio.exceptions import ConnectionRejected as ConnectionRejected
from ._sansio.exceptions import HandshakeError as HandshakeError
from ._sansio.exceptions import HandshakeTimeout as HandshakeTimeout
from ._sansio.exceptions import InvalidHandshake as InvalidHandshake
from ._sansio.exceptions import TransportError as TransportError
from ._sansio.exceptions import WebSocketError as WebSocketError
from ._sansio.headers import Headers as Headers
from ._sansio.protocol import ProtocolState as ProtocolState
from ._server import ConnectionRegistry as ConnectionRegistry
from ._server import WebSocketRequest as WebSocketRequest
from ._server import WebSocketServer as WebSocketServer
from ._server import serve_websocket as serve_websocket
from ._tls import NONE as NONE
from ._tls import SYSTEM as SYSTEM
from ._tls import TrustStore as TrustStore
from ._tls import client_ssl_context as client_ssl_context
from ._tls import server_ssl_context as server_ssl_context

__all__ = [
    "NONE",
    "SYSTEM",
    "Accept",
    "Authenticator",
    "Backoff",
    "Backplane",
    "BackplaneError",
    "BackplaneEvent",
    "BasicAuth",
    "BroadcastReport",
    "BroadcastStats",
    "Broadcaster",
    "ClientEvent",
    "CloseCode",
    "CloseEvent",
    "CloseReason",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "ConnectionRegistry",
    "ConnectionRejected",
    "Envelope",
    "ErrorEvent",
    "HTTPRequest",
    "HTTPResponse",
    "HandshakeError",
    "HandshakeTimeout",
    "Headers",
    "InvalidHandshake",
    "MemoryBackplane",
    "MessageEvent",
    "OpenEvent",
    "OverflowPolicy",
    "ProtocolState",
    "ReadyState",
    "ReconnectingWebSocket",
    "RedisBackplane",
    "RedisBackplaneStats",
    "Reject",
    "TokenAuth",
    "TransportError",
    "TrustStore",
    "WebSocketConnection",
    "WebSocketError",
    "WebSocketHandler",
    "WebSocketRequest",
    "WebSocketServer",
    "client_ssl_context",
    "connect_websocket",
    "connect_websocket_url",
    "default_retry_on",
    "open_reconnecting_websocket",
    "open_websocket",
    "open_websocket_url",
    "serve_websocket",
    "server_ssl_context",
]

__version__ = "0.1.0.dev0"

# Public names report the public module, as trio's do.
for _name, _obj in list(globals().items()):
    if not _name.startswith("_") and getattr(_obj, "__module__", "").startswith("wsnursery._"):
        try:
            _obj.__module__ = "wsnursery"
        except (AttributeError, TypeError):  # pragma: no cover
            pass
del _name, _obj
