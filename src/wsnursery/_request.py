"""The WebSocket upgrade request a handler answers, with accept() or reject().

The request knows nothing of the server's insides: accepting calls the *admit*
callback the server bound to this request (``WebSocketServer._admit``: it
writes the 101, makes the connection with its ID, registers and starts it);
refusing writes through the ``send_http`` it was given.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import trio

from ._connection import WebSocketConnection
from ._sansio.exceptions import CloseCode, CloseReason, ConnectionClosed
from ._sansio.handshake import RequestHead, ServerHandshake
from ._sansio.headers import HeaderPairs, Headers, parse_cookies
from ._util import LazyAddresses

__all__ = ["Admit", "WebSocketRequest"]

# The server's logger: a request's answers are the server's story.
logger = logging.getLogger("wsnursery.server")


class WebSocketRequest(LazyAddresses):
    """A WebSocket upgrade request waiting for the handler's decision.

    The handler calls :meth:`accept` (and gets a :class:`WebSocketConnection`)
    or :meth:`reject`, once.

    Attributes:
        method: Always ``"GET"`` for a request that reaches a handler.
        target: The raw request target (``/chat?room=1``).
        path: The full request target, query included (``/chat?room=1``),
            as trio-websocket's ``path``; :attr:`url_path` is its path part.
        query: The target's query parameters (first value of each name).
        headers: The request headers (:class:`Headers`, case-insensitive).
        subprotocols: The subprotocols the client proposed, in order.
        path_params: The values of the route's ``{name}`` parts.
        user: What the authenticator returned, or None.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        handshake: ServerHandshake,
        path_params: dict[str, str],
        admit: Admit,
        send_http: Callable[[trio.abc.Stream, bytes], Awaitable[None]],
    ) -> None:
        head = handshake.head
        assert head is not None
        self._stream = stream
        self._handshake = handshake
        # The server's side of the answers: admit makes, registers and starts
        # the connection (see WebSocketServer._admit); send_http writes a refusal.
        self._admit = admit
        self._send_http = send_http
        self._head: RequestHead = head
        self.method = head.method
        self.target = head.target
        self.path = head.target
        self.query = head.query
        self.headers: Headers = head.headers
        self.subprotocols = head.subprotocols
        self._addresses: tuple[Any, Any] | None = None
        self.connection: WebSocketConnection | None = None
        self._answered = False
        self.path_params = path_params
        self.user: Any = None

    @property
    def url_path(self) -> str:
        """The path part of :attr:`path`, without the query (``/chat``): what routes match."""
        return self._head.url_path

    @property
    def query_string(self) -> str:
        """The raw query of :attr:`path`, after the ``?`` (``room=1``; ``""`` if none)."""
        return self._head.query_string

    @property
    def cookies(self) -> dict[str, str]:
        """The request's cookies (from every ``Cookie`` header)."""
        return parse_cookies(self.headers.get_all("cookie"))

    @property
    def peer_certificate(self) -> Any:
        """The client's TLS certificate (``ssl.SSLSocket.getpeercert()``), or None."""
        stream: Any = self._stream
        if isinstance(stream, trio.SSLStream):
            return stream.getpeercert()
        return None

    @property
    def extensions(self) -> list[str]:
        """The raw ``Sec-WebSocket-Extensions`` offers of the client."""
        return self._head.extension_offers

    def __repr__(self) -> str:
        # The path part only: a query may carry a token, and this is logged.
        return f"<WebSocketRequest {self.url_path!r} from {self.remote}>"

    async def accept(
        self,
        *,
        subprotocol: str | None = None,
        extra_headers: HeaderPairs = (),
    ) -> WebSocketConnection:
        """Complete the handshake with 101 Switching Protocols.

        Args:
            subprotocol: One of :attr:`subprotocols`, or None for none.
            extra_headers: More response headers (``Set-Cookie``...).

        Returns:
            The open connection. It lives in the connection's nursery and is
            closed (1000) when the handler returns.

        Raises:
            ConnectionClosed: the server is shutting down (the client got 503)
                or the client went away during the handshake.
            RuntimeError: the request was already accepted or rejected.
            ValueError: ``subprotocol`` was not proposed by the client.

        Cancellation:
            If cancelled while the 101 response is being written, the client
            may hold half a response: the connection is closed.
        """
        if self._answered:
            raise RuntimeError("this request was already answered")
        self._answered = True
        conn = await self._admit(self, subprotocol, extra_headers, self._addresses)
        if conn is None:  # the server is stopping: nothing was written yet
            await self._refuse(503, (), "server shutting down")
            raise ConnectionClosed.for_reason(_going_away())
        self.connection = conn
        return conn

    async def reject(
        self,
        status: int,
        *,
        headers: HeaderPairs = (),
        body: bytes | str = b"",
    ) -> None:
        """Refuse the upgrade with an HTTP response and close the connection.

        Args:
            status: An HTTP status from 400 to 599 (or 2xx/3xx, e.g. a redirect).
            headers: Response headers.
            body: The response body (str is sent as UTF-8 text/plain).

        Cancellation:
            The connection is closed either way.
        """
        if self._answered:
            raise RuntimeError("this request was already answered")
        self._answered = True
        await self._refuse(status, headers, body)

    async def _refuse(self, status: int, headers: HeaderPairs, body: bytes | str) -> None:
        logger.info("rejected %s from %s with %d", self.url_path, self.remote, status)
        await self._send_http(
            self._stream, self._handshake.reject(status, headers=headers, body=body)
        )


#: What a request calls to be accepted: ``admit(request, subprotocol,
#: extra_headers, addresses)`` returns the open connection, or None when the
#: server is stopping (the request then answers 503 itself). Made by the server
#: for each request, bound to that request's handshake, nursery and mode.
Admit: TypeAlias = Callable[
    ["WebSocketRequest", "str | None", HeaderPairs, "tuple[Any, Any] | None"],
    Awaitable["WebSocketConnection | None"],
]


def _going_away() -> CloseReason:
    return CloseReason(CloseCode.GOING_AWAY, "server shutting down", initiated_by_peer=False)
