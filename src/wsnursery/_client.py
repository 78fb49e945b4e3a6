"""The client: connect, handshake, and a connection owned by a nursery."""

from __future__ import annotations

import functools
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import trio

from ._connection import WebSocketConnection, _timeout
from ._sansio.deflate import BoundedPerMessageDeflate
from ._sansio.exceptions import CloseCode, HandshakeTimeout, InvalidHandshake, TransportError
from ._sansio.handshake import ClientHandshake
from ._sansio.headers import HeaderPairs, check_client_request, parse_query, split_target
from ._sansio.protocol import Protocol
from ._tls import SYSTEM, StrPath, TrustStore, client_ssl_context
from ._util import BlockScope, collapse_exception_groups, graceful_scope, stream_addresses

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["connect_websocket", "connect_websocket_url", "open_websocket", "open_websocket_url"]

logger = logging.getLogger("wsnursery.client")

#: Who wants to see what client connections receive, as it arrives (the
#: ``connect`` command prints it). Called as ``observer(kind, value)`` with
#: ``("message", str | bytes)``, ``("ping", None)``, ``("pong", payload)`` or
#: ``("close", CloseReason)``, from the reader task, synchronously. A context
#: variable rather than a keyword, so that no public signature carries it;
#: connections made in a context where it is None (the default) use the plain
#: :class:`Protocol`.
control_observer: ContextVar[Callable[[str, Any], None] | None] = ContextVar(
    "wsnursery_control_observer", default=None
)


class _ObservedProtocol(Protocol):
    """A :class:`Protocol` that tells an observer what it received, in order."""

    def __init__(self, observer: Callable[[str, Any], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._observer = observer

    def _parse(self) -> None:
        # Each parsing step (receive_data, or resume when the budget ran out).
        messages, pings = len(self.messages), self.pings_received
        pongs, close = len(self.pongs), self.close_received
        super()._parse()
        try:
            # Within one step, messages and control frames are told apart,
            # not interleaved: each kind in its own order.
            for index in range(messages, len(self.messages)):
                self._observer("message", self.messages[index])
            for _ in range(self.pings_received - pings):
                self._observer("ping", None)
            for payload in self.pongs[pongs:]:
                self._observer("pong", payload)
            if close is None and self.close_received is not None:
                self._observer("close", self.close_received)
        except Exception:
            logger.exception("control frame observer failed")


def resolve_ssl_context(
    ssl_context: ssl.SSLContext | None,
    cafile: StrPath | TrustStore,
    certfile: StrPath | None,
    keyfile: StrPath | None,
    *,
    use_ssl: bool | None = None,
    url: str | None = None,
) -> ssl.SSLContext | None:
    """``ssl_context``, or one made from the TLS file options; None if neither was given.

    ``use_ssl=False`` (a ``ws://`` URL, named by ``url`` in the error) says
    the connection is plain TCP: TLS options then are a mistake, reported at
    once rather than by a TLS handshake with a plain server that times out.

    Raises:
        ValueError: both a context and file options were given, or TLS
            options with ``use_ssl=False``.
    """
    plain = cafile is SYSTEM and certfile is None and keyfile is None
    if use_ssl is False and not (plain and ssl_context is None):
        where = f"a ws:// URL: {url!r}" if url is not None else "use_ssl=False"
        raise ValueError(f"TLS options (ssl_context, cafile, certfile, keyfile) with {where}")
    if plain:
        return ssl_context
    if ssl_context is not None:
        raise ValueError("pass either ssl_context or cafile/certfile/keyfile, not both")
    return client_ssl_context(cafile, certfile=certfile, keyfile=keyfile)


class BlockExit:
    """How a user's ``async with`` block was left, as the close code to send.

    Enter it just inside ``body``, the cancel scope from :func:`graceful_scope`
    (``with body, block_exit:``), then read :attr:`code`: 1000 when the block
    ended normally, 1001 when it was cancelled, 1011 when it raised anything else.
    """

    __slots__ = ("_body", "_error")

    def __init__(self, body: BlockScope) -> None:
        self._body = body
        self._error: BaseException | None = None

    def __enter__(self) -> None:
        pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._error = exc

    @property
    def code(self) -> CloseCode:
        if self._body.cancelled_caught or isinstance(self._error, trio.Cancelled):
            return CloseCode.GOING_AWAY
        if self._error is not None:
            return CloseCode.INTERNAL_ERROR
        return CloseCode.NORMAL_CLOSURE


def client_handshake(
    host_header: str,
    resource: str,
    *,
    subprotocols: Sequence[str],
    extra_headers: HeaderPairs,
    compression: bool,
    max_message_size: int | None,
) -> ClientHandshake:
    """The client's half of the opening handshake; ``compression`` offers permessage-deflate.

    Raises:
        ValueError: a header or subprotocol that no server could take.
    """
    check_client_request(extra_headers, subprotocols)
    extensions = (
        [BoundedPerMessageDeflate(max_message_size=max_message_size)] if compression else []
    )
    return ClientHandshake(
        host_header,
        resource,
        subprotocols=subprotocols,
        extensions=extensions,
        extra_headers=extra_headers,
    )


def _host_header(host: str, port: int, tls: bool) -> str:
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return name if port == (443 if tls else 80) else f"{name}:{port}"


def _describe(exc: BaseException) -> str:
    """A transport error in a few words: trio's "all attempts failed" names the reasons."""
    inner = exc.__cause__
    if isinstance(inner, BaseExceptionGroup) and all(
        isinstance(e, OSError) for e in inner.exceptions
    ):
        reasons = dict.fromkeys(
            e.strerror or str(e)
            for e in inner.exceptions
            if isinstance(e, OSError)  # for mypy
        )
        return "; ".join(reasons)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return repr(exc)


def _check_tls_options(url: str, tls: bool, kwargs: dict[str, object]) -> None:
    """ValueError now for TLS options given with a ``ws://`` URL."""
    if not tls:
        resolve_ssl_context(
            kwargs.get("ssl_context"),  # type: ignore[arg-type]
            kwargs.get("cafile", SYSTEM),  # type: ignore[arg-type]
            kwargs.get("certfile"),  # type: ignore[arg-type]
            kwargs.get("keyfile"),  # type: ignore[arg-type]
            use_ssl=False,
            url=url,
        )


def _parse_url(url: str) -> tuple[str, int, str, bool]:
    split = urlsplit(url)
    if split.scheme not in ("ws", "wss"):
        raise ValueError(f"a WebSocket URL starts with ws:// or wss://, not {url!r}")
    if not split.hostname:
        raise ValueError(f"no host in {url!r}")
    tls = split.scheme == "wss"
    port = split.port or (443 if tls else 80)
    resource = split.path or "/"
    if split.query:
        resource += "?" + split.query
    return split.hostname, port, resource, tls


async def connect_websocket(
    nursery: trio.Nursery,
    host: str,
    port: int,
    resource: str = "/",
    *,
    use_ssl: bool | None = None,
    ssl_context: ssl.SSLContext | None = None,
    cafile: StrPath | TrustStore = SYSTEM,
    certfile: StrPath | None = None,
    keyfile: StrPath | None = None,
    unix_socket: str | None = None,
    subprotocols: Sequence[str] = (),
    extra_headers: HeaderPairs = (),
    # Limits
    max_message_size: int | None = 2**20,
    max_queue: int = 16,
    # Timeouts
    open_timeout: float | None = 10.0,
    close_timeout: float | None = 10.0,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    # Features
    compression: bool = True,
) -> WebSocketConnection:
    """Open a WebSocket connection whose background tasks run in ``nursery``.

    The caller must close the connection (``await conn.aclose()``) before the
    nursery can finish. Prefer :func:`open_websocket`, which does that.

    Args:
        nursery: Where the reader and keep-alive tasks run.
        host: The server's host name or address.
        port: The server's port.
        resource: The path and query to request (``/chat?room=1``).
        use_ssl: True: connect with TLS (``wss``), verifying with the
            default trust store unless ``ssl_context`` is given. False: plain
            TCP (``ws``); TLS options are then a :exc:`ValueError`. None (the
            default): TLS if and only if a TLS option is given.
        ssl_context: The client-side TLS context; implies TLS unless
            ``use_ssl=False``.
        cafile: Instead of ``ssl_context``: a PEM file of CAs to verify the
            server against, :data:`SYSTEM` (the default trust store, the
            default) or :data:`NONE` (no verification: for testing only, see
            :func:`client_ssl_context`). Anything but ``SYSTEM`` implies TLS
            unless ``use_ssl=False``.
        certfile: A client certificate (PEM) to present; implies TLS unless
            ``use_ssl=False``.
        keyfile: Its private key (PEM), if not in ``certfile``.
        unix_socket: Connect to this Unix domain socket path instead of
            ``host:port`` (which still make the ``Host`` header).
        subprotocols: Subprotocols to propose, in order of preference.
        extra_headers: More request headers (``Origin``, ``Authorization``...).
        max_message_size: Largest incoming message in bytes (1009 past it).
        max_queue: Messages received and not yet read before reading pauses.
        open_timeout: Seconds for TCP, TLS and the handshake together.
        close_timeout: Seconds to wait for the closing handshake.
        ping_interval: Seconds between keep-alive pings; None disables them.
        ping_timeout: Seconds to wait for a pong before closing with 1011.
        compression: Offer permessage-deflate.

    Raises:
        TransportError: TCP or TLS failed (cause kept).
        ConnectionRejected: the server answered with an HTTP error.
        InvalidHandshake: the server's answer broke RFC 6455, or the server
            closed the connection without answering (then its ``__cause__``
            is an :exc:`EOFError`).
        HandshakeTimeout: ``open_timeout`` ran out.
        ValueError: ``ssl_context`` together with ``cafile``, ``certfile`` or
            ``keyfile``; or any of them with ``use_ssl=False``; or a header in
            ``extra_headers`` (or a subprotocol) that HTTP would refuse or that
            the client sets itself (raised before any connection is made).

    Cancellation:
        Nothing is left open: a half-made connection is closed.
    """
    ssl_context = resolve_ssl_context(ssl_context, cafile, certfile, keyfile, use_ssl=use_ssl)
    tls = use_ssl or ssl_context is not None
    handshake = client_handshake(
        _host_header(host, port, tls),
        resource,
        subprotocols=subprotocols,
        extra_headers=extra_headers,
        compression=compression,
        max_message_size=max_message_size,
    )
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(_timeout(open_timeout)):
            try:
                if unix_socket is not None:
                    stream = await trio.open_unix_socket(unix_socket)
                else:
                    stream = await trio.open_tcp_stream(host, port)
                if tls:
                    context = ssl_context or ssl.create_default_context()
                    stream = trio.SSLStream(
                        stream, context, server_hostname=host, https_compatible=True
                    )
                    await stream.do_handshake()
                try:
                    await upgrade(stream, handshake)
                except InvalidHandshake as exc:
                    if tls and handshake.closed_before_answer:
                        # With TLS 1.3 a server that refuses our certificate
                        # may just close after its side of the TLS handshake.
                        raise TransportError(
                            f"{host}:{port} closed the TLS connection before answering "
                            "the upgrade (did it refuse our client certificate?)"
                        ) from exc
                    if handshake.closed_before_answer and exc.__cause__ is None:
                        # Mark it the way reconnecting clients recognise (a
                        # server restarting, a proxy dropping us): EOF.
                        exc.__cause__ = EOFError("the server closed the connection")
                    raise
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # trio reports a failed TLS handshake as BrokenResourceError
                # caused by the ssl error: keep the ssl error as the cause.
                cause: BaseException = exc
                if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
                    cause = exc.__cause__
                if isinstance(cause, ssl.SSLError | ssl.CertificateError):
                    raise TransportError(
                        f"TLS handshake with {host}:{port} failed: {cause}"
                    ) from cause
                raise TransportError(
                    f"cannot connect to {host}:{port}: {_describe(cause)}"
                ) from cause
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise HandshakeTimeout(
                f"opening handshake with {host}:{port} took over {open_timeout} s"
            ) from exc
        raise
    conn = client_connection(
        stream,
        handshake,
        max_message_size=max_message_size,
        max_queue=max_queue,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
    )
    conn._start(nursery)
    return conn


async def upgrade(stream: trio.abc.Stream, handshake: ClientHandshake) -> None:
    """Send the upgrade request on ``stream`` and read until the answer is complete."""
    await stream.send_all(handshake.request())
    while not handshake.receive_data(await stream.receive_some(65536)):
        pass


def client_connection(
    stream: trio.abc.Stream,
    handshake: ClientHandshake,
    *,
    max_message_size: int | None,
    max_queue: int,
    ping_interval: float | None,
    ping_timeout: float | None,
    close_timeout: float | None,
) -> WebSocketConnection:
    """The client's connection once ``handshake`` succeeded on ``stream``."""
    local, remote = stream_addresses(stream)
    observer = control_observer.get()
    make_protocol: Callable[..., Protocol] = (
        Protocol if observer is None else functools.partial(_ObservedProtocol, observer)
    )
    return WebSocketConnection(
        stream,
        make_protocol(
            client=True,
            extensions=handshake.accepted_extensions,
            max_message_size=max_message_size,
        ),
        path=handshake.target,
        query=parse_query(split_target(handshake.target)[1]),
        request_headers=handshake.request_headers(),
        response_headers=handshake.response_headers,
        subprotocol=handshake.subprotocol,
        trailing_data=handshake.trailing_data,
        max_queue=max_queue,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        local=local,
        remote=remote,
    )


async def connect_websocket_url(
    nursery: trio.Nursery, url: str, **kwargs: object
) -> WebSocketConnection:
    """:func:`connect_websocket` with a ``ws://`` or ``wss://`` URL.

    Takes the same keyword arguments. TLS options (``ssl_context``,
    ``cafile``, ``certfile``, ``keyfile``) are for ``wss://`` URLs only.

    Raises:
        ValueError: a bad URL, or TLS options with a ``ws://`` URL (at once,
            before connecting).

    Cancellation:
        As for :func:`connect_websocket`.
    """
    host, port, resource, tls = _parse_url(url)
    _check_tls_options(url, tls, kwargs)
    return await connect_websocket(
        nursery,
        host,
        port,
        resource,
        use_ssl=tls,
        **kwargs,  # type: ignore[arg-type]
    )


@asynccontextmanager
async def open_websocket(
    host: str,
    port: int,
    resource: str = "/",
    **kwargs: object,
) -> AsyncIterator[WebSocketConnection]:
    """Open a WebSocket connection for the ``async with`` block, then close it.

    Takes the keyword arguments of :func:`connect_websocket`. Leaving the block
    normally closes with 1000; leaving it by an exception closes with 1011, by
    cancellation with 1001, waiting at most ``close_timeout`` for the peer.
    The block's exception comes out as itself, never inside an ExceptionGroup.

    The block runs with the caller's deadline (``trio.current_effective_deadline``
    inside it is the caller's); when the deadline passes, the block is
    cancelled and the connection closed with 1001, as for a cancellation.

    Raises:
        HandshakeError, TransportError: as :func:`connect_websocket`.
        ValueError: bad options, such as TLS options with ``use_ssl=False``.

    Cancellation:
        The connection is closed (1001) before the cancellation goes on. If
        the block raises while it is being cancelled (a failing cleanup), its
        exception comes out, not the Cancelled (the cancelled scope's next
        checkpoint raises that again).
    """
    with collapse_exception_groups():
        async with graceful_scope() as body, trio.open_nursery() as nursery:
            conn: WebSocketConnection | None = None
            left = BlockExit(body)
            try:
                with body, left:
                    conn = await connect_websocket(nursery, host, port, resource, **kwargs)  # type: ignore[arg-type]
                    yield conn
            finally:
                if conn is not None:
                    # Shielded by graceful_scope; bounded by close_timeout.
                    await conn.aclose(left.code)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_websocket_url(url: str, **kwargs: object) -> AsyncIterator[WebSocketConnection]:
    """:func:`open_websocket` with a ``ws://`` or ``wss://`` URL.

    ``ssl_context`` (and ``cafile``, ``certfile``, ``keyfile``) apply to
    ``wss://`` URLs only; without them the default trust store verifies the
    server.

    Raises:
        ValueError: a bad URL, or TLS options with a ``ws://`` URL (at once,
            before connecting).

    Cancellation:
        As for :func:`open_websocket`.
    """
    host, port, resource, tls = _parse_url(url)
    _check_tls_options(url, tls, kwargs)
    async with open_websocket(host, port, resource, use_ssl=tls, **kwargs) as conn:
        yield conn
