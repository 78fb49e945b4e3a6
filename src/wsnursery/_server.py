"""The server: listeners, the handshake, one nursery per connection, graceful shutdown.

The nursery tree (see ``docs/topics/design.rst``)::

    WebSocketServer.run()
    ├─ cancel watcher              turns the caller's cancellation into a graceful stop
    └─ server nursery (shielded)   shielded so that a stop can still send 1001 frames
       ├─ accept loop per listener
       ├─ handshake expirer         cancels openings at open_timeout, 16 per batch
       └─ _handle_stream per client
          └─ connection nursery
             ├─ reader task, keep-alive task
             └─ the handler (this task), then aclose()
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import math
import mimetypes
import ssl
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeAlias, TypedDict, TypeVar, overload

import trio

from ._broadcast import Backplane, Broadcaster, OverflowPolicy
from ._connection import WebSocketConnection, _timeout
from ._handler import (
    Accept,
    Authenticator,
    HTTPRequest,
    HTTPResponse,
    Reject,
    Route,
    WebSocketHandler,
    _maybe_await,
    build_router,
)
from ._redis import as_backplane
from ._request import WebSocketRequest
from ._sansio.deflate import BoundedPerMessageDeflate
from ._sansio.exceptions import CloseCode, CloseReason, ConnectionClosed
from ._sansio.handshake import HTTPError, ServerHandshake
from ._sansio.headers import HeaderPairs, Headers
from ._sansio.protocol import Protocol
from ._transport import Transport, make_transport
from ._util import collapse_exception_groups, graceful_scope

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover
    from typing_extensions import Unpack

__all__ = ["ConnectionRegistry", "WebSocketRequest", "WebSocketServer", "serve_websocket"]

logger = logging.getLogger("wsnursery.server")

#: Handshakes cancelled (open_timeout, shutdown) per batch of trio's scheduler.
_EXPIRE_BATCH = 16

Handler: TypeAlias = Callable[["WebSocketRequest"], Awaitable[None]]
HTTPEndpoint: TypeAlias = Callable[[HTTPRequest], Awaitable[HTTPResponse]]
#: What serve_websocket serves: a handler function, a WebSocketHandler (instance
#: or class), or a mapping of paths to either.
HandlerSpec: TypeAlias = (
    Handler
    | WebSocketHandler
    | type[WebSocketHandler]
    | Mapping[str, Handler | WebSocketHandler | type[WebSocketHandler]]
)


def _lost() -> CloseReason:
    return CloseReason(CloseCode.ABNORMAL_CLOSURE, "client went away during the handshake")


@dataclasses.dataclass(frozen=True, slots=True)
class _HTTPAnswer:
    """The opening phase's result when HTTP answers: this response, sent after the nursery."""

    response: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class _Upgrade:
    """The opening phase's result for a WebSocket upgrade: the request, for its route's handler."""

    route: Route
    request: WebSocketRequest


#: What the opening phase (``WebSocketServer._open``) returns.
_Opened: TypeAlias = "_HTTPAnswer | _Upgrade"
#: A handler object's connection was served: nothing is left to answer.
_NOTHING_LEFT = _HTTPAnswer(b"")


def _bad_request(handshake: ServerHandshake, error: HTTPError) -> bytes:
    """The HTTP response for ``error`` (logged: a bad request, a timeout, a refusal)."""
    logger.info("bad request: %s", error)
    return handshake.reject(error.status, headers=error.headers, body=error.message + "\n")


class ConnectionRegistry(Mapping[str, WebSocketConnection]):
    """The server's open connections, by :attr:`WebSocketConnection.id`.

    A read-only mapping (``registry[id]``, ``len(registry)``, ``id in
    registry``, ``registry.values()``) plus :meth:`close`.
    """

    def __init__(self, connections: dict[str, WebSocketConnection]) -> None:
        self._connections = connections

    def __getitem__(self, connection_id: str) -> WebSocketConnection:
        return self._connections[connection_id]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._connections))

    def __len__(self) -> int:
        return len(self._connections)

    def values(self) -> list[WebSocketConnection]:  # type: ignore[override]
        """A snapshot of the open connections: safe to await while iterating it."""
        return list(self._connections.values())

    def items(self) -> list[tuple[str, WebSocketConnection]]:  # type: ignore[override]
        """A snapshot of ``(id, connection)`` pairs: safe to await while iterating it."""
        return list(self._connections.items())

    async def close(self, connection_id: str, code: int = 1000, reason: str = "") -> bool:
        """Close the connection with this ID; False if there is none.

        Cancellation:
            As for :meth:`WebSocketConnection.aclose`: the connection is closed.
        """
        conn = self._connections.get(connection_id)
        if conn is None:
            await trio.lowlevel.checkpoint()
            return False
        await conn.aclose(code, reason)
        return True


class ServerOptions(TypedDict, total=False):
    """The keywords :func:`serve_websocket` passes on to :class:`WebSocketServer`.

    For type checkers: the defaults live in ``WebSocketServer.__init__`` only.
    mypy checks that these types fit it; tests/test_server.py checks that no
    keyword of it is missing here.
    """

    http_routes: Mapping[str, HTTPEndpoint] | None
    authenticator: Authenticator | None
    allowed_origins: Sequence[str] | None
    max_message_size: int | None
    max_queue: int
    max_connections: int | None
    max_request_line: int
    max_header_line: int
    max_headers: int
    open_timeout: float | None
    close_timeout: float | None
    ping_interval: float | None
    ping_timeout: float | None
    compression: bool
    backplane: Backplane | str | None
    max_outbox_messages: int
    max_outbox_bytes: int
    on_overflow: OverflowPolicy
    overflow_close_code: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Options:
    """A server's settings, from the keywords of :class:`WebSocketServer`, built once.

    Frozen: a request, its connection and the server's tasks all read the
    same values; the public attributes of the same names read (and, when set,
    replace) this object.
    """

    authenticator: Authenticator | None
    allowed_origins: set[str] | None  # lower case, no trailing slash
    # Limits
    max_message_size: int | None
    max_queue: int
    max_connections: int | None
    max_request_line: int
    max_header_line: int
    max_headers: int
    # Timeouts
    open_timeout: float | None
    close_timeout: float | None
    ping_interval: float | None
    ping_timeout: float | None
    # Features
    compression: bool


_T = TypeVar("_T")


class _Option(Generic[_T]):
    # No docstring on purpose: autodoc would show it under each attribute.
    __slots__ = ("name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, server: None, owner: type) -> _Option[_T]: ...
    @overload
    def __get__(self, server: WebSocketServer, owner: type) -> _T: ...
    def __get__(self, server: WebSocketServer | None, owner: type) -> _Option[_T] | _T:
        if server is None:
            return self
        value: _T = getattr(server._options, self.name)
        return value

    def __set__(self, server: WebSocketServer, value: _T) -> None:
        changes: dict[str, Any] = {self.name: value}
        server._options = dataclasses.replace(server._options, **changes)


class WebSocketServer:
    """A WebSocket server: listeners, a handler, and every connection it holds.

    Usually made and run by :func:`serve_websocket`. :meth:`run` serves until
    cancelled or until :meth:`aclose` is called; either way every open
    connection is closed with 1001 first.

    Attributes:
        listeners: The trio listeners accepting connections.
        broadcaster (Broadcaster): Sends to this server's connections: by ID,
            to all, to groups (see :doc:`/topics/broadcast`).
    """

    # The keywords below stay readable (and settable) as attributes; they live
    # in one frozen _Options, and setting one replaces it.
    authenticator: _Option[Authenticator | None] = _Option()
    allowed_origins: _Option[set[str] | None] = _Option()
    max_message_size: _Option[int | None] = _Option()
    max_queue: _Option[int] = _Option()
    max_connections: _Option[int | None] = _Option()
    max_request_line: _Option[int] = _Option()
    max_header_line: _Option[int] = _Option()
    max_headers: _Option[int] = _Option()
    open_timeout: _Option[float | None] = _Option()
    close_timeout: _Option[float | None] = _Option()
    ping_interval: _Option[float | None] = _Option()
    ping_timeout: _Option[float | None] = _Option()
    compression: _Option[bool] = _Option()

    def __init__(
        self,
        handler: HandlerSpec,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        http_routes: Mapping[str, HTTPEndpoint] | None = None,
        authenticator: Authenticator | None = None,
        allowed_origins: Sequence[str] | None = None,
        # Limits
        max_message_size: int | None = 2**20,
        max_queue: int = 16,
        max_connections: int | None = 4096,
        max_request_line: int = 8192,
        max_header_line: int = 8192,
        max_headers: int = 128,
        # Timeouts
        open_timeout: float | None = 10.0,
        close_timeout: float | None = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        # Features
        compression: bool = True,
        # Broadcasting
        backplane: Backplane | str | None = None,
        max_outbox_messages: int = 1024,
        max_outbox_bytes: int = 2**20,
        on_overflow: OverflowPolicy = "drop",
        overflow_close_code: int = CloseCode.POLICY_VIOLATION,
    ) -> None:
        self.handler = handler
        self.listeners = list(listeners)
        # Built once, frozen: what the requests and connections are made with.
        self._options = _Options(
            authenticator=authenticator,
            allowed_origins=(
                None
                if allowed_origins is None
                else {o.lower().rstrip("/") for o in allowed_origins}
            ),
            max_message_size=max_message_size,
            max_queue=max_queue,
            max_connections=max_connections,
            max_request_line=max_request_line,
            max_header_line=max_header_line,
            max_headers=max_headers,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            compression=compression,
        )
        self._router = build_router(handler, http_routes or {})
        self._connections: dict[str, WebSocketConnection] = {}
        backplane = as_backplane(backplane)  # a Redis URL becomes a RedisBackplane
        self.broadcaster = Broadcaster(
            backplane=backplane,
            max_outbox_messages=max_outbox_messages,
            max_outbox_bytes=max_outbox_bytes,
            on_overflow=on_overflow,
            overflow_close_code=overflow_close_code,
        )
        self.broadcaster._bind(self._connections)
        self._id_prefix = "" if backplane is None else self.broadcaster.node_id + "-"
        self._prefixed_ids = itertools.count(1)  # the <n> of "<node_id>-<n>"
        # Connection nurseries still in the opening handshake, with their
        # open_timeout deadlines, oldest first: _expire_handshakes cancels them
        # when due (408), a stop cancels them all (503).
        self._opening: OrderedDict[trio.CancelScope, float] = OrderedDict()
        self._opening_added: trio.Event | None = None  # the expirer waits for one
        self._registry = ConnectionRegistry(self._connections)
        self._handling = 0
        self._stopping = False
        self._stop_requested = trio.Event()
        self._stopped = trio.Event()
        self._idle = trio.Event()
        self._nursery: trio.Nursery | None = None  # while run() runs
        # Found now: the port is still known once the listeners are closed.
        self._port = self._find_port()

    @property
    def port(self) -> int:
        """The TCP port of the first listener (handy after binding port 0)."""
        if self._port is None:
            raise RuntimeError("this server has no TCP listener")
        return self._port

    def _find_port(self) -> int | None:
        for listener in self.listeners:
            inner: Any = listener
            while isinstance(inner, trio.SSLListener):
                inner = inner.transport_listener
            sock = getattr(inner, "socket", None)
            if sock is not None:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    return int(name[1])
        return None

    @property
    def connections(self) -> ConnectionRegistry:
        """The connections open right now, by ID (look up, count, close one)."""
        return self._registry

    async def run(
        self, *, task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled or until :meth:`aclose` is called.

        Works with ``nursery.start``: it reports started (with the server) once
        the listeners accept connections.

        Cancellation:
            Cancelling stops the listeners, answers handshakes still in progress
            with 503, closes open connections with 1001 and waits up to
            ``close_timeout`` for them before cancelling their handlers; then it
            returns by raising :class:`trio.Cancelled` as usual.
        """
        try:
            with collapse_exception_groups():
                async with graceful_scope() as body, trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self.broadcaster.backplane is not None:
                        await nursery.start(self.broadcaster.serve)
                    for listener in self.listeners:
                        nursery.start_soon(self._accept_loop, listener, nursery)
                    if self._options.ping_interval is not None:
                        nursery.start_soon(self._keepalive_loop, self._options.ping_interval)
                    nursery.start_soon(self._expire_handshakes)
                    task_status.started(self)
                    with body:
                        await self._stop_requested.wait()
                    await self._shutdown(nursery)
        finally:
            self._nursery = None
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop the server gracefully and wait until :meth:`run` has returned.

        Called from one of the server's own tasks (a handler function, a
        hook), it starts the stop and returns at once: :meth:`run` waits for
        that very task, so waiting here would wait for itself. The shutdown
        then goes on as usual, the caller's own connection included (1001).

        Cancellation:
            Only stops waiting; the shutdown goes on.
        """
        self._stopping = True  # from now on a handler that returns closes with 1001
        self._stop_requested.set()
        if self._is_own_task():
            await trio.lowlevel.checkpoint()
            return
        await self._stopped.wait()

    def _is_own_task(self) -> bool:
        """True when the current task runs inside this server's nursery."""
        nursery = self._nursery
        if nursery is None:
            return False
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        while task is not None:
            parent = task.parent_nursery
            if parent is nursery:
                return True
            task = None if parent is None else parent.parent_task
        return False

    async def _shutdown(self, nursery: trio.Nursery) -> None:
        self._stopping = True
        for listener in self.listeners:
            await trio.aclose_forcefully(listener)
        # Handshakes in progress: answered with 503, a few per scheduler batch.
        for count, scope in enumerate(list(self._opening), 1):
            scope.cancel()
            if count % _EXPIRE_BATCH == 0:
                await trio.lowlevel.checkpoint()
        logger.info("shutting down: closing %d connections", len(self._connections))
        with trio.move_on_after(_timeout(self._options.close_timeout)):
            async with trio.open_nursery() as closers:
                for conn in list(self._connections.values()):
                    closers.start_soon(
                        functools.partial(conn.aclose, CloseCode.GOING_AWAY, "server shutting down")
                    )
            if self._handling:
                await self._idle.wait()
        nursery.cancel_scope.cancel()

    async def _expire_handshakes(self) -> None:
        """Cancel each handshake still opening at its ``open_timeout`` deadline.

        One task for the server instead of a deadline on each connection's
        scope: when hundreds of stale handshakes (slowloris clients) reach
        their deadline at the same instant, trio would cancel them all in one
        step of its run loop, and run all of them, each answering its 408, in
        one batch, stalling every other client meanwhile. Here they are
        cancelled ``_EXPIRE_BATCH`` at a time, with a checkpoint in between,
        so the other clients are served between the small batches.

        ``_opening`` is ordered by deadline (the open_timeout is the same for
        every connection), so only its first entry needs watching.
        """
        opening = self._opening
        count = 0
        while True:
            if not opening:
                self._opening_added = added = trio.Event()
                await added.wait()
                continue
            scope, deadline = next(iter(opening.items()))
            if deadline > trio.current_time():
                await trio.sleep_until(deadline)
                continue
            del opening[scope]
            scope.cancel()  # _handle_stream answers 408 (or 503 from a handler's decision)
            count += 1
            if count % _EXPIRE_BATCH == 0:
                await trio.lowlevel.checkpoint()

    async def _keepalive_loop(self, interval: float) -> None:
        """Ping every open connection every ``interval`` seconds, from one task.

        One task per server rather than one per connection: an idle connection
        costs no task and no timer. Each ping (and its timeout) runs in the
        connection's own nursery.
        """
        while True:
            await trio.sleep(interval)
            for conn in list(self._connections.values()):
                if conn.keepalive_due() and conn._nursery is not None:
                    conn._nursery.start_soon(conn._keepalive_once)

    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return  # closed by _shutdown
            except OSError as exc:
                # EMFILE and the like: wait and try again (as trio.serve_listeners does).
                logger.error("accept failed: %s; retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            self._count_in()
            nursery.start_soon(self._handle_stream, stream)

    def _count_in(self) -> None:
        """Count a client in before its task starts: a stop waits until none is left."""
        self._handling += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connected stream as if a listener had accepted it.

        For a stream that comes from elsewhere: a memory stream in a test (as
        :mod:`wsnursery.testing` does), a socket accepted by other code. The
        client gets exactly what a listener's client gets: the head under
        ``open_timeout``, the routes, the handler, the registry, the 1001 of a
        stop. Runs in the caller's task and returns when the connection is
        over; the stream is closed then.

        Cancellation:
            The handler is cancelled and the transport closed, with no closing
            handshake (a handler object's ``on_disconnect`` still runs, bounded
            by ``close_timeout``).
        """
        self._count_in()
        await self._handle_stream(stream)

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client: the opening phase, then the handler, then any answer left.

        One task and the connection nursery, which ``_expire_handshakes``
        cancels at the ``open_timeout`` unless the handler accepted first. The
        opening phase (``_open``) returns what it found; the handler runs here
        (``_serve_request``, and a handler object's hooks); what nobody
        answered gets its HTTP answer after the nursery. Every idle connection
        holds this frame: it keeps few locals, and drops the request before a
        handler object's hooks run.
        """
        transport = make_transport(stream)
        handshake = ServerHandshake(
            max_request_line=self._options.max_request_line,
            max_header_line=self._options.max_header_line,
            max_headers=self._options.max_headers,
        )
        deadline = trio.current_time() + _timeout(self._options.open_timeout)
        # What the opening phase found; None while it runs (so None after the
        # nursery means it was cancelled: open_timeout or a shutdown).
        opened: _Opened | None = None
        opening_scope: trio.CancelScope | None = None
        try:
            # Errors from inside the nursery come wrapped in a group: unwrap the
            # single one so the transport errors below match.
            with collapse_exception_groups():
                async with trio.open_nursery() as nursery:
                    # The nursery's own scope is the open_timeout (TLS, head, the
                    # handler's decision): _expire_handshakes cancels it when due,
                    # _admit takes it off. No extra cancel scope stays alive for
                    # the connection's lifetime.
                    opening_scope = nursery.cancel_scope
                    self._opening[opening_scope] = deadline
                    if self._nursery is None:
                        # Served without run() (wsnursery.testing): no expirer
                        # runs, so the deadline is the nursery's own.
                        nursery.cancel_scope.deadline = deadline
                    elif self._opening_added is not None:
                        self._opening_added.set()
                        self._opening_added = None
                    opened = await self._open(stream, handshake, transport, nursery)
                    if isinstance(opened, _Upgrade):
                        accepted = await self._serve_request(opened.route, opened.request)
                        if accepted is not None:
                            # A handler object's hooks run here, without the
                            # request: every idle connection holds this frame.
                            conn, handler = accepted
                            accepted = None
                            opened = _NOTHING_LEFT
                            try:
                                await conn._dispatch(handler)
                            finally:
                                self._connections.pop(conn.id, None)
                    nursery.cancel_scope.cancel()
            await self._answer_leftover(stream, handshake, opened, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
            logger.debug("transport failed during the handshake: %r", exc)
        except Exception:  # pragma: no cover - everything expected is handled above
            logger.exception("unexpected error while serving a connection")
        finally:
            if opening_scope is not None:
                self._opening.pop(opening_scope, None)
            await transport.close()
            self._handling -= 1
            if not self._handling:
                self._idle.set()

    async def _open(
        self,
        stream: trio.abc.Stream,
        handshake: ServerHandshake,
        transport: Transport,
        nursery: trio.Nursery,
    ) -> _Opened:
        """The opening phase: read the request head, route it, check it.

        Returns:
            The HTTP response to send (a plain HTTP route, a default page, an
            error), or a WebSocket request for its route's handler.
        """
        try:
            while handshake.receive_data(await transport.receive()) is None:
                pass
            head = handshake.head
            assert head is not None
            found = self._router.match(head.url_path)
            if found is None:
                raise HTTPError(404, f"nothing is served at {head.url_path}")
            route, params = found
            if route.kind == "http" or not head.is_upgrade:
                try:
                    return _HTTPAnswer(await self._plain_http(route, params, handshake))
                except HTTPError:
                    raise
                except Exception:
                    # The application's error (an endpoint, an unreadable
                    # default page), not the client's.
                    logger.exception("HTTP route failed on %s %s", head.method, head.url_path)
                    raise HTTPError(500, "internal server error") from None
            handshake.check_upgrade()
            self._check_origin(head.headers.get("origin"))
            if self._stopping:
                raise HTTPError(503, "server shutting down")
            if (
                self._options.max_connections is not None
                and len(self._connections) >= self._options.max_connections
            ):
                raise HTTPError(503, "too many connections", [("Retry-After", "1")])
        except HTTPError as error:
            return _HTTPAnswer(_bad_request(handshake, error))
        admit = functools.partial(
            self._admit, stream, handshake, transport, nursery, route.kind != "function"
        )
        return _Upgrade(route, WebSocketRequest(stream, handshake, params, admit, self._send_http))

    async def _answer_leftover(
        self,
        stream: trio.abc.Stream,
        handshake: ServerHandshake,
        opened: _Opened | None,
        deadline: float,
    ) -> None:
        """Whatever the opening phase and the handler did not answer gets its answer now."""
        if opened is None:  # cancelled while opening: by open_timeout, or by a shutdown
            error = (
                HTTPError(503, "server shutting down")
                if self._stopping
                else HTTPError(408, "request timeout")
            )
            await self._send_http(stream, _bad_request(handshake, error))
        elif isinstance(opened, _HTTPAnswer):
            if opened.response:
                await self._send_http(stream, opened.response)
        else:
            request = opened.request
            if request.connection is None and not request._answered:
                if self._stopping:
                    await request.reject(503, body="server shutting down\n")
                elif trio.current_time() >= deadline:
                    logger.info("handler did not answer %s within open_timeout", request.url_path)
                    await request.reject(503, body="handshake timeout\n")
                else:
                    logger.error("handler returned without accepting or rejecting %s", request)
                    await request.reject(500, body="internal server error\n")

    async def _serve_request(
        self, route: Route, request: WebSocketRequest
    ) -> tuple[WebSocketConnection, WebSocketHandler] | None:
        """Authenticate, then run a handler function to its end, or accept for a handler object.

        A handler function runs in this frame (every idle connection holds it):
        its failure is logged and answered (500, or 1011), and its connection
        is closed (1000, 1001 in a shutdown) and leaves the registry, on every
        path.

        Returns:
            The connection and the handler object whose hooks must now run, or
            None when there is nothing more to do here.
        """
        accepted = None
        try:
            try:
                if await self._authenticate(route, request):
                    if route.kind == "function":
                        await route.endpoint(request)
                    else:
                        accepted = await self._validate(route, request)
            except ConnectionClosed:
                pass  # the connection ended under the handler: not an error
            except Exception:
                await self._handler_failed(request)
            if accepted is None and request.connection is not None:
                if self._stopping:
                    await request.connection.aclose(CloseCode.GOING_AWAY, "server shutting down")
                else:
                    await request.connection.aclose()
        finally:
            # On every path, cancellation by a shutdown included: a handler
            # function's connection leaves the registry.
            if accepted is None and request.connection is not None:
                self._connections.pop(request.connection.id, None)
        return accepted

    async def _authenticate(self, route: Route, request: WebSocketRequest) -> bool:
        """Run the server's and the route's authenticators; False once one answered 401."""
        # For a handler class, read its authenticator from the class: no
        # instance is made for a request that authentication refuses.
        for authenticator in (
            self._options.authenticator,
            getattr(route.endpoint, "authenticator", None),
        ):
            if authenticator is None:
                continue
            user = await _maybe_await(authenticator(request))
            if user is None:
                await request.reject(
                    401,
                    headers=[("WWW-Authenticate", authenticator.www_authenticate)],
                    body="authentication required\n",
                )
                return False
            request.user = user
        return True

    async def _validate(
        self, route: Route, request: WebSocketRequest
    ) -> tuple[WebSocketConnection, WebSocketHandler] | None:
        """A handler object's decision: accept (for its hooks), or reject (None)."""
        handler: WebSocketHandler = route.endpoint() if route.kind == "factory" else route.endpoint
        decision = await handler.validate(request)
        if isinstance(decision, Reject):
            await request.reject(decision.status, headers=decision.headers, body=decision.body)
            return None
        if decision is None:
            decision = Accept()
        conn = await request.accept(
            subprotocol=decision.subprotocol, extra_headers=decision.headers
        )
        return conn, handler

    async def _admit(
        self,
        stream: trio.abc.Stream,
        handshake: ServerHandshake,
        transport: Transport,
        nursery: trio.Nursery,
        dispatch: bool,
        request: WebSocketRequest,
        subprotocol: str | None,
        extra_headers: HeaderPairs,
        addresses: tuple[Any, Any] | None,
    ) -> WebSocketConnection | None:
        """Accept ``request``: write the 101, make the connection, register and start it.

        The first five arguments are bound per request by ``_handle_stream``
        (``dispatch``: a handler object's hooks will read in the client's own
        task); the request calls the rest (see :data:`Admit`).

        Returns:
            The open connection, or None, at once, when the server is stopping.

        Raises:
            ConnectionClosed: the client went away during the handshake.
            ValueError: ``subprotocol`` was not proposed by the client.
        """
        if self._stopping:
            return None
        options = self._options
        extensions = (
            [BoundedPerMessageDeflate(max_message_size=options.max_message_size)]
            if options.compression
            else []
        )
        response, enabled = handshake.accept(
            subprotocol=subprotocol, extensions=extensions, extra_headers=extra_headers
        )
        try:
            # Nothing else writes yet: straight to the transport, as the
            # connection's own fast path would.
            sent = transport.try_send(response)
            if sent != len(response):
                await transport.send(memoryview(response)[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            with trio.CancelScope(shield=True):
                await transport.close()
            raise ConnectionClosed.for_reason(_lost()) from exc
        conn = WebSocketConnection(
            stream,
            Protocol(client=False, extensions=enabled, max_message_size=options.max_message_size),
            path=request.path,
            query=request.query,
            request_headers=request.headers,
            response_headers=Headers(),
            subprotocol=subprotocol,
            trailing_data=handshake.trailing_data,
            max_queue=options.max_queue,
            ping_interval=options.ping_interval,
            ping_timeout=options.ping_timeout,
            close_timeout=options.close_timeout,
            local=addresses[0] if addresses else None,
            remote=addresses[1] if addresses else None,
            transport=transport,
            user=request.user,
            server=self,
            # Unique across every node sharing the backplane, and names the node.
            conn_id=f"{self._id_prefix}{next(self._prefixed_ids):x}" if self._id_prefix else None,
        )
        scope = nursery.cancel_scope
        self._opening.pop(scope, None)  # open_timeout no longer applies
        if self._nursery is None:
            scope.deadline = math.inf  # served without run(): see _handle_stream
        if dispatch:
            conn._nursery = nursery  # the client's task reads: see _dispatch
        else:
            conn._start(nursery, keepalive_task=False)  # the server pings from one task
        self._connections[conn.id] = conn
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("accepted %s from %s", request.url_path, request.remote)
        return conn

    def _check_origin(self, origin: str | None) -> None:
        """403 for an Origin outside ``allowed_origins`` (cross-site WebSocket hijacking)."""
        if self._options.allowed_origins is None or origin is None:
            return  # not configured, or not a browser (browsers always send Origin)
        if origin.lower().rstrip("/") not in self._options.allowed_origins:
            raise HTTPError(403, f"origin {origin} is not allowed")

    async def _plain_http(
        self, route: Route, params: dict[str, str], handshake: ServerHandshake
    ) -> bytes:
        """The response to a plain HTTP request: an HTTP route, a default page, 426 or 405."""
        head = handshake.head
        assert head is not None
        if route.kind == "http":
            response = await route.endpoint(
                HTTPRequest(head.method, head.target, head.query, head.headers, params)
            )
            return handshake.reject(
                response.status,
                headers=response.headers,
                body=response.body,
                content_type=response.content_type,
            )
        if head.method not in ("GET", "HEAD"):
            raise HTTPError(405, "this resource speaks WebSocket only", [("Allow", "GET")])
        page = getattr(route.endpoint, "default_page", None)
        if page is None:
            handshake.check_upgrade()  # raises 426 with the headers that would work
            raise AssertionError("unreachable")  # pragma: no cover
        if isinstance(page, Path):
            body = await trio.Path(page).read_bytes()
            content_type = mimetypes.guess_type(page.name)[0] or "application/octet-stream"
            if content_type.startswith("text/"):
                content_type += "; charset=utf-8"
        else:
            body, content_type = page.encode("utf-8"), "text/html; charset=utf-8"
        return handshake.reject(200, body=body, content_type=content_type)

    async def _handler_failed(self, request: WebSocketRequest) -> None:
        """Log the handler's exception; answer 500, or close its connection with 1011."""
        conn = request.connection
        if conn is None:
            logger.exception("handler failed before answering %s", request)
            if not request._answered:
                await request.reject(500, body="internal server error\n")
        else:
            logger.exception("handler failed on %s; closing with 1011", request)
            await conn.aclose(CloseCode.INTERNAL_ERROR, "internal error")

    async def _send_http(self, stream: trio.abc.Stream, response: bytes) -> None:
        """Write a complete HTTP response, then close politely: EOF, brief drain."""
        with trio.move_on_after(min(_timeout(self._options.close_timeout), 5.0)):
            try:
                await stream.send_all(response)
                if isinstance(stream, trio.SocketStream):
                    await stream.send_eof()
                    # Read what the client still sends so closing does not RST
                    # away the response before it is read.
                    with trio.move_on_after(1.0):
                        while await stream.receive_some(16384):
                            pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(stream)


async def _open_unix_listener(path: str, backlog: int | None) -> trio.SocketListener:
    """A listener on a Unix domain socket; a stale socket file is replaced."""
    import os
    import stat

    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(backlog or 128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def serve_websocket(
    handler: HandlerSpec,
    host: str | bytes | None = None,
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    unix_socket: str | None = None,
    backlog: int | None = None,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[ServerOptions],
) -> None:
    """Serve WebSocket connections on ``host:port`` until cancelled.

    Each accepted connection is served in a nursery of its own, by a handler
    function (``async def handler(request)``, which answers with
    :meth:`WebSocketRequest.accept` or :meth:`~WebSocketRequest.reject`) or by
    a :class:`WebSocketHandler` (its ``validate`` decides, its hooks get the
    events). Use it with ``nursery.start`` to get the :class:`WebSocketServer`
    (and its :attr:`~WebSocketServer.port`) once it listens::

        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0)

    Args:
        handler: A handler function, a :class:`WebSocketHandler` instance (one
            for every connection), a :class:`WebSocketHandler` subclass (one
            instance per connection), or a mapping of paths to any of these
            (``{"/chat": Chat, "/rooms/{name}": Room(), "/echo": echo}``;
            other paths get 404).
        host: The address to bind (None for every interface).
        port: The port (0 for any free one).
        ssl_context: Serve ``wss://`` with this server-side context (see
            :func:`server_ssl_context` for client certificates).
        unix_socket: Listen on this Unix domain socket path instead of TCP.
        http_routes: Plain HTTP endpoints, ``{"/health": fn}`` with
            ``async def fn(request: HTTPRequest) -> HTTPResponse``.
        authenticator: Runs before every handler (:class:`BasicAuth`,
            :class:`TokenAuth`, or your own); None answers 401.
        allowed_origins: When set, an upgrade whose ``Origin`` is not in the
            list gets 403 (cross-site WebSocket hijacking); requests without
            ``Origin`` (not from a browser) are let through.
        max_message_size: Largest incoming message in bytes (1009 past it);
            None for no limit.
        max_queue: Messages received and not yet read before the reader stops
            reading the socket.
        max_connections: Open connections before new handshakes get 503.
        max_request_line: Longest request line (414 past it).
        max_header_line: Longest header line (431 past it).
        max_headers: Most header lines (431 past it).
        open_timeout: Seconds for TLS, the request head and the handler's
            decision together; None for no limit.
        close_timeout: Seconds to wait for the closing handshake.
        ping_interval: Seconds between keep-alive pings; None disables them.
        ping_timeout: Seconds to wait for a pong before closing with 1011.
        compression: Accept permessage-deflate when the client offers it.
        backlog: The listen backlog (trio's default when None).
        backplane: Carries :attr:`WebSocketServer.broadcaster`'s sends to other
            servers (:class:`MemoryBackplane` in one process); a
            :class:`RedisBackplane` or a Redis URL (``"redis://host:6379/0"``)
            across processes and machines (see :doc:`/topics/scaling`); None:
            this server only. A backplane that cannot start raises
            :exc:`BackplaneError`.
        max_outbox_messages: Broadcast frames queued for one slow client at
            most (see :class:`Broadcaster`).
        max_outbox_bytes: Bytes queued for one slow client at most.
        on_overflow: What a broadcast does to a client whose outbox is full:
            ``"drop"`` the message for it, or ``"close"`` it.
        overflow_close_code: The close code of ``"close"`` (1008, or 1013).

    Cancellation:
        Stops gracefully: see :meth:`WebSocketServer.run`.
    """
    listeners: list[trio.abc.Listener[Any]]
    if unix_socket is not None:
        listeners = [await _open_unix_listener(unix_socket, backlog)]
    else:
        listeners = list(await trio.open_tcp_listeners(port, host=host, backlog=backlog))
    if ssl_context is not None:
        listeners = [
            trio.SSLListener(lst, ssl_context, https_compatible=False) for lst in listeners
        ]
    try:
        server = WebSocketServer(handler, listeners, **options)
    except BaseException:  # a bad route, keyword or backplane: do not keep the port bound
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    await server.run(task_status=task_status)


def _serve_websocket_signature() -> inspect.Signature:
    """serve_websocket's signature as ``help()`` and the docs show it.

    ``**options: Unpack[ServerOptions]`` is what type checkers need, but it hides
    the defaults, which live in WebSocketServer only: spell its keywords out
    instead (``task_status`` stays last).
    """
    own = inspect.signature(serve_websocket, eval_str=True).parameters
    server = inspect.signature(WebSocketServer, eval_str=True).parameters
    head = [p for p in own.values() if p.kind is not p.VAR_KEYWORD and p.name != "task_status"]
    options = [p for p in server.values() if p.kind is p.KEYWORD_ONLY]
    return inspect.Signature([*head, *options, own["task_status"]], return_annotation=None)


serve_websocket.__signature__ = _serve_websocket_signature()  # type: ignore[attr-defined]
