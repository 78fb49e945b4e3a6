"""A client that stays connected: ready states, events, automatic reconnection.

Theory of operation
-------------------
``open_reconnecting_websocket`` opens the same shielded region as
``open_websocket`` (a cancel watcher outside, a nursery inside) and starts one
*supervisor task* in it. The supervisor loops: connect, run the ``on_open``
hook, send what was queued, publish the connection (state OPEN), wait for it
to end, decide whether to retry, sleep the backoff delay, and again. Each
connection's reader and keep-alive tasks live in a nursery the supervisor opens
for that connection alone and cancels once it is over, so nothing of an old
connection outlives it.

Receiving pulls from the published connections in order (``_read_gen`` is the
connection being read): a connection's unread messages stay readable after it
closed, until they are read or until the connection after it closes too. The
lifecycle events wait in a bounded deque, each tagged with the connection
number it follows, so that :meth:`ReconnectingWebSocket.events` yields an
``OpenEvent`` before that connection's messages and a ``CloseEvent`` after
them.

The :class:`Backoff` policy and the ``_Retries`` counters are pure (no I/O, no
clock; they live in ``_sansio/backoff.py``): the supervisor hands them the facts
(an attempt failed, a connection was up for so many seconds) and sleeps what
they answer.
"""

from __future__ import annotations

import enum
import functools
import logging
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Literal

import trio
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint, checkpoint_if_cancelled

from ._client import BlockExit, _parse_url, connect_websocket, resolve_ssl_context
from ._connection import WebSocketConnection
from ._sansio.backoff import Backoff, _Retries, retry_after
from ._sansio.exceptions import (
    CloseCode,
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    HandshakeTimeout,
    InvalidHandshake,
    TransportError,
)
from ._sansio.headers import HeaderPairs, check_client_request
from ._sansio.protocol import ProtocolState
from ._tls import SYSTEM, StrPath, TrustStore
from ._util import BlockScope, collapse_exception_groups, graceful_scope

if sys.version_info < (3, 11):  # pragma: no cover
    pass  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "Backoff",
    "ClientEvent",
    "CloseEvent",
    "ErrorEvent",
    "MessageEvent",
    "OpenEvent",
    "ReadyState",
    "ReconnectingWebSocket",
    "default_retry_on",
    "open_reconnecting_websocket",
]

logger = logging.getLogger("wsnursery.reconnect")

Message = str | bytes
SendPolicy = Literal["wait", "queue", "raise"]

_NOT_CONNECTED = CloseReason(CloseCode.ABNORMAL_CLOSURE, "not connected", initiated_by_peer=False)


def default_retry_on(error: Exception) -> bool:
    """The default answer to "is this failure worth another attempt?".

    Called with the exception of a failed attempt, or with a
    :exc:`ConnectionClosed` for a connection that ended. True means retry:

    * a connection that ended, whatever its close code;
    * :exc:`TransportError` (refused, reset, unreachable, DNS, a broken TLS
      handshake), except a certificate that failed verification: a wrong or
      untrusted certificate does not fix itself;
    * :exc:`HandshakeTimeout`;
    * :exc:`ConnectionRejected` with a 5xx status, 429 (Too Many Requests) or
      408 (Request Timeout);
    * :exc:`InvalidHandshake` caused by an :exc:`EOFError`: the server closed
      the connection before answering (a server restarting, a proxy).

    Everything else gives up: other 4xx (401, 403, 404...), 3xx (redirects are
    not followed), a server that broke the protocol, and any other exception.

    Write your own classifier on top of this one::

        def retry_on(error):
            if isinstance(error, wsnursery.ConnectionRejected) and error.status_code == 401:
                return True  # our token may have been refreshed meanwhile
            return wsnursery.default_retry_on(error)
    """
    if isinstance(error, ConnectionClosed):
        return True
    if isinstance(error, ConnectionRejected):
        status = error.status_code
        return 500 <= status <= 599 or status in (408, 429)
    if isinstance(error, HandshakeTimeout):
        return True
    if isinstance(error, InvalidHandshake):
        return isinstance(error.__cause__, EOFError)
    if isinstance(error, TransportError):
        return not isinstance(error.__cause__, ssl.SSLCertVerificationError)
    return isinstance(error, OSError)  # TimeoutError included


# -- states and events ------------------------------------------------------------------


class ReadyState(enum.IntEnum):
    """Where a :class:`ReconnectingWebSocket` is (the values are the browser's ``readyState``).

    ``CONNECTING → OPEN → CLOSING → CLOSED``, and back to ``CONNECTING`` when
    the client reconnects. ``CLOSED`` lasts only an instant between a
    connection and the next attempt; it stays for good once the client will
    not connect again (it gave up, reconnection is off, or it was closed).
    """

    #: An attempt is under way, or the client waits out the backoff before the next.
    CONNECTING = 0
    #: A connection is open: sends go straight out.
    OPEN = 1
    #: The current connection is closing (its closing handshake), or the client is.
    CLOSING = 2
    #: No connection.
    CLOSED = 3


@dataclass(frozen=True)
class OpenEvent:
    """A connection opened (after ``on_open`` returned and queued messages went out).

    Attributes:
        number: Which connection of this client: 1 for the first, 2 after the
            first reconnection...
        attempt: Which attempt in a row made it (1: the first try worked).
        subprotocol: The subprotocol the server chose, or None.
    """

    number: int
    attempt: int
    subprotocol: str | None


@dataclass(frozen=True)
class MessageEvent:
    """A message (only from :meth:`~ReconnectingWebSocket.events`).

    Attributes:
        message: ``str`` for text, ``bytes`` for binary.
    """

    message: str | bytes

    @property
    def is_text(self) -> bool:
        """True for a text message."""
        return isinstance(self.message, str)


@dataclass(frozen=True)
class CloseEvent:
    """A connection that was open has closed.

    Attributes:
        number: Which connection (as :attr:`OpenEvent.number`).
        code: The close code (1006 when the transport just went away, 1011
            after a keep-alive ping went unanswered).
        reason: The close reason's text.
        initiated_by_peer: True when the server closed (or dropped) it.
        delay: Seconds until the next attempt, or None when the client will
            not reconnect.
    """

    number: int
    code: int
    reason: str
    initiated_by_peer: bool
    delay: float | None

    @property
    def will_retry(self) -> bool:
        """True when the client will reconnect."""
        return self.delay is not None


@dataclass(frozen=True)
class ErrorEvent:
    """An attempt to connect failed.

    Attributes:
        error: What failed: a :exc:`TransportError`, a :exc:`HandshakeError`
            (:exc:`ConnectionRejected` carries the HTTP status), or the
            :exc:`ConnectionClosed` of a connection lost during ``on_open``.
        attempt: Its number in the current run of failed attempts (1 for the
            first); the number of retries so far is ``attempt - 1``.
        delay: Seconds until the next attempt, or None when the client gives
            up (and raises ``error``).
    """

    error: Exception
    attempt: int
    delay: float | None

    @property
    def will_retry(self) -> bool:
        """True when the client will try again."""
        return self.delay is not None

    @property
    def reason(self) -> str:
        """The error, as text."""
        return str(self.error) or type(self.error).__name__

    @property
    def status_code(self) -> int | None:
        """The HTTP status when the server refused the handshake, else None."""
        return self.error.status_code if isinstance(self.error, ConnectionRejected) else None


#: Any event of a :class:`ReconnectingWebSocket`.
ClientEvent = OpenEvent | MessageEvent | CloseEvent | ErrorEvent


@dataclass(frozen=True)
class _Closed:
    number: int
    reason: CloseReason
    uptime: float


@dataclass(frozen=True)
class _Fatal:
    error: Exception


# -- the client ---------------------------------------------------------------------------


class ReconnectingWebSocket:
    """A WebSocket client that reconnects: made by :func:`open_reconnecting_websocket`.

    Sends and receives work as on a :class:`WebSocketConnection`, across
    connections: :meth:`send_message`, :meth:`get_message`, ``async for
    message in client``. :meth:`events` gives the same messages together with
    what happened to the connections. Not created directly.
    """

    def __init__(
        self,
        url: str,
        connect: Callable[[trio.Nursery], Awaitable[WebSocketConnection]],
        *,
        backoff: Backoff,
        reconnect: bool,
        retry_on: Callable[[Exception], bool],
        on_open: Callable[[WebSocketConnection], Awaitable[object]] | None,
        on_event: Callable[[ClientEvent], object] | None,
        send_policy: SendPolicy,
        send_queue_size: int,
        max_events: int,
        rng: Callable[[], float] | None,
        body: BlockScope | None = None,
    ) -> None:
        if send_policy not in ("wait", "queue", "raise"):
            raise ValueError(f"send_policy must be 'wait', 'queue' or 'raise', not {send_policy!r}")
        if send_queue_size < 0:
            raise ValueError("send_queue_size must be >= 0")
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        #: The URL this client connects to.
        self.url = url
        self._connect = connect
        self._backoff = backoff
        self._reconnect = reconnect
        self._retry_on = retry_on
        self._on_open = on_open
        self._on_event = on_event
        self._send_policy = send_policy
        self._send_queue_size = send_queue_size
        self._max_events = max_events
        self._rng = rng
        self._body = body
        self._phase = ReadyState.CONNECTING
        # The published connection (OPEN or closing), or None; set exactly
        # while _phase is OPEN.
        self._conn: WebSocketConnection | None = None
        # Connections numbered from 1; those whose messages may be unread.
        self._gen = 0
        self._conns: dict[int, WebSocketConnection] = {}
        self._read_gen = 1
        # (number of the connection the event follows, event)
        self._lifecycle: deque[tuple[int, ClientEvent]] = deque()
        self._queue: deque[Message] = deque()
        self._changed = trio.Event()
        self._done = trio.Event()  # set once the client has stopped for good
        self._waiting = 0
        self._fatal: Exception | None = None
        self._last_reason: CloseReason | None = None
        self._stop: CloseReason | None = None  # what aclose() was called with
        self._scope: trio.CancelScope | None = None
        self._task: trio.lowlevel.Task | None = None

    def __repr__(self) -> str:
        return f"<ReconnectingWebSocket {self.url!r} state={self.state.name}>"

    # -- state -----------------------------------------------------------------------

    @property
    def state(self) -> ReadyState:
        """The :class:`ReadyState`, readable at any time."""
        conn = self._conn
        if conn is not None:
            if conn.state is ProtocolState.OPEN:
                return ReadyState.OPEN
            return ReadyState.CLOSED if conn.closed is not None else ReadyState.CLOSING
        if self._stop is not None and self._phase is ReadyState.CONNECTING:
            return ReadyState.CLOSING  # aclose() is stopping an attempt or a wait
        return self._phase

    @property
    def connection(self) -> WebSocketConnection | None:
        """The current connection while there is one (OPEN or CLOSING), else None.

        For what a connection has and the client does not (its headers,
        :meth:`~WebSocketConnection.ping`). It is replaced on every
        reconnection: do not keep it.
        """
        return self._conn

    @property
    def reconnect(self) -> bool:
        """Whether the client reconnects; set it at any time.

        Read each time an attempt fails or a connection ends. Turning it off
        does not close the current connection, nor cancel an attempt already
        scheduled; the client just stops at the next failure or close. Turning
        it on again after the client stopped has no effect.
        """
        return self._reconnect

    @reconnect.setter
    def reconnect(self, value: bool) -> None:
        self._reconnect = bool(value)

    @property
    def unsent(self) -> int:
        """Messages queued by ``send_policy="queue"`` and not sent yet."""
        return len(self._queue)

    # -- waiting ---------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        changed = self._changed
        self._waiting += 1
        try:
            await changed.wait()
        finally:
            self._waiting -= 1

    def _end_error(self) -> Exception:
        """What calls raise once the client has stopped."""
        if self._fatal is not None:
            return self._fatal
        return ConnectionClosed.for_reason(self._last_reason or self._stop or _NOT_CONNECTED)

    async def wait_open(self) -> None:
        """Wait until the client is OPEN (return at once if it is).

        Raises:
            ConnectionRejected, HandshakeError, TransportError: the client
                gave up: the error of its last attempt.
            ConnectionClosed: the client stopped without giving up
                (reconnection off, or closed).

        Cancellation:
            Only stops waiting; the client is unaffected.
        """
        while True:
            if self.state is ReadyState.OPEN:
                await checkpoint()
                return
            if self._done.is_set():
                await checkpoint()
                raise self._end_error()
            await self._wait_changed()

    # -- sending ---------------------------------------------------------------------

    async def send_message(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send a text (``str``) or binary (bytes-like) message.

        While OPEN, the message goes straight to the connection, as
        :meth:`WebSocketConnection.send_message`. Otherwise what happens
        depends on ``send_policy``:

        * ``"wait"`` (the default): wait until a connection is open, then
          send. If the connection closes before the message could be written,
          it is sent on the next one. A message is never written twice.
        * ``"queue"``: keep the message (up to ``send_queue_size`` of them,
          then wait for room) and return at once; queued messages go out in
          order on the next connection, after ``on_open``.
        * ``"raise"``: raise :exc:`ConnectionClosed` at once.

        A message written to a connection that is later lost may not have
        reached the server: delivery is at most once. Acknowledge at the
        application level if it matters.

        Raises:
            ConnectionClosed: the client has stopped (or, with ``"raise"``,
                is not OPEN).
            ConnectionRejected, HandshakeError, TransportError: the client
                gave up.
            TypeError: ``message`` is neither str nor bytes-like.

        Cancellation:
            Cancelled while waiting or queuing, nothing is sent or queued.
            Cancelled while writing, as :meth:`WebSocketConnection.send_message`
            (the connection is dropped if part of the frame went out, and the
            client reconnects).
        """
        await checkpoint_if_cancelled()
        if not isinstance(message, str | bytes | bytearray | memoryview):
            raise TypeError(f"message must be str or bytes-like, not {type(message).__name__}")
        while True:
            conn = self._conn
            if conn is not None:
                try:
                    await conn.send_message(message)
                    return
                except ConnectionClosed:
                    if self._send_policy == "raise":
                        raise
            if self._done.is_set():
                await checkpoint()
                raise self._end_error()
            if self._stop is not None:
                await checkpoint()
                raise ConnectionClosed.for_reason(self._stop)
            if self._send_policy == "raise":
                await checkpoint()
                raise ConnectionClosed.for_reason(self._last_reason or _NOT_CONNECTED)
            if self._send_policy == "queue" and len(self._queue) < self._send_queue_size:
                self._queue.append(message if isinstance(message, str) else bytes(message))
                await cancel_shielded_checkpoint()
                return
            await self._wait_changed()

    async def _flush(self, conn: WebSocketConnection) -> None:
        """Send the queued messages on ``conn``, oldest first (before it is published)."""
        queue = self._queue
        while queue:
            await conn.send_message(queue[0])  # a failure leaves it queued
            queue.popleft()
            self._notify()  # room for a sender waiting for it

    async def ping(self, payload: bytes | None = None) -> None:
        """Ping the current connection and wait for its pong.

        Raises:
            ConnectionClosed: no connection is open, or it closed before the
                pong came.

        Cancellation:
            As for :meth:`WebSocketConnection.ping`.
        """
        conn = self._conn
        if conn is None:
            await checkpoint()
            if self._fatal is not None:
                raise self._fatal
            raise ConnectionClosed.for_reason(self._last_reason or _NOT_CONNECTED)
        await conn.ping(payload)

    # -- receiving -------------------------------------------------------------------

    def _advance_from(self, gen: int) -> None:
        """Every message of connection ``gen`` has been read."""
        self._conns.pop(gen, None)
        if self._read_gen <= gen:
            self._read_gen = gen + 1

    async def get_message(self) -> Message:
        """Return the next message, from whichever connection it came on.

        Messages come in the order they were received. Those left unread when
        a connection closed are still returned, before the next connection's,
        unless yet another connection closed in the meantime (then they are
        dropped, with a warning in the log: memory stays bounded). While the
        client reconnects, this waits.

        Raises:
            ConnectionClosed: the client stopped (reconnection off, or closed)
                and no message is left.
            ConnectionRejected, HandshakeError, TransportError: the client
                gave up.

        Cancellation:
            Nothing is lost: a message leaves its queue only when returned.
        """
        while True:
            gen = self._read_gen
            conn = self._conns.get(gen)
            if conn is not None:
                try:
                    return await conn.get_message()
                except ConnectionClosed:
                    self._advance_from(gen)
                    continue
            if gen <= self._gen:
                self._advance_from(gen)  # dropped (bounded backlog)
                continue
            if self._done.is_set():
                await checkpoint()
                raise self._end_error()
            await self._wait_changed()

    def __aiter__(self) -> ReconnectingWebSocket:
        return self

    async def __anext__(self) -> Message:
        """The next message; the iteration ends when the client stops normally.

        Raises:
            ConnectionClosedError: the client stopped after an abnormal close.
            ConnectionRejected, HandshakeError, TransportError: the client
                gave up.

        Cancellation:
            As for :meth:`get_message`: nothing is lost.
        """
        try:
            return await self.get_message()
        except ConnectionClosed as exc:
            if exc is not self._fatal and exc.reason.ok:
                raise StopAsyncIteration from None
            raise

    def events(self) -> AsyncIterator[ClientEvent]:
        """Every event, in order: opens, messages, closes and failed attempts.

        ``async for event in client.events():`` yields :class:`OpenEvent`,
        :class:`MessageEvent`, :class:`CloseEvent` and :class:`ErrorEvent`.
        A connection's ``OpenEvent`` comes before its messages and its
        ``CloseEvent`` after them. The iteration ends once the client has
        stopped and every event was yielded; if the client gave up, the last
        ``ErrorEvent`` is followed by its error, raised.

        Messages are the same ones :meth:`get_message` returns: each goes to
        one reader, so use either this or ``get_message``. Events other
        than messages are kept (at most ``max_events``, the oldest dropped
        first) until read, whether or not anything iterates.

        Cancellation:
            Each step is as :meth:`get_message`: nothing is lost.
        """
        return _EventIterator(self)

    async def _next_event(self) -> ClientEvent:
        lifecycle = self._lifecycle
        while True:
            if lifecycle and lifecycle[0][0] < self._read_gen:
                await checkpoint()
                return lifecycle.popleft()[1]
            gen = self._read_gen
            conn = self._conns.get(gen)
            if conn is not None:
                try:
                    return MessageEvent(await conn.get_message())
                except ConnectionClosed:
                    self._advance_from(gen)
                    continue
            if gen <= self._gen:
                self._advance_from(gen)
                continue
            if self._done.is_set():
                await checkpoint()
                if self._fatal is not None:
                    raise self._fatal
                raise StopAsyncIteration
            await self._wait_changed()

    # -- closing ---------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Stop reconnecting and close the connection, if one is open.

        Leaving the ``async with`` block does this (1000, or 1001 on
        cancellation, 1011 on an exception). Afterwards the state is CLOSED
        for good; sends raise :exc:`ConnectionClosed`, and receives return
        the messages still unread, then raise it. Queued messages that were
        never sent are dropped (with a warning in the log).

        Cancellation:
            The client is still stopped, and the connection closed at once
            without waiting for the server.
        """
        if self._stop is None and not self._done.is_set():
            self._stop = CloseReason(code, reason, initiated_by_peer=False)
            if self._scope is not None:
                self._scope.cancel()  # an attempt, on_open, the backoff sleep
            self._notify()
        conn = self._conn
        if conn is not None:
            await conn.aclose(code, reason)
        if trio.lowlevel.current_task() is self._task:
            await checkpoint()  # from on_open: the supervisor stops once this returns
            return
        await self._done.wait()

    # -- the supervisor --------------------------------------------------------------

    @contextmanager
    def _interruptible(self) -> Iterator[trio.CancelScope]:
        """A scope :meth:`aclose` cancels: around connecting, on_open and the backoff."""
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._stop is not None:
                scope.cancel()
            try:
                yield scope
            finally:
                self._scope = None

    def _emit(self, event: ClientEvent, after: int) -> None:
        lifecycle = self._lifecycle
        if len(lifecycle) >= self._max_events:
            dropped = lifecycle.popleft()[1]
            logger.debug("%r: event queue full (max_events); dropped %r", self, dropped)
        lifecycle.append((after, event))
        self._notify()
        if self._on_event is not None:
            self._on_event(event)

    def _set_phase(self, phase: ReadyState) -> None:
        if self._phase is not phase:
            self._phase = phase
            self._notify()

    def _finish(self) -> None:
        if self._done.is_set():
            return
        self._phase = ReadyState.CLOSED
        self._conn = None
        if self._queue:
            logger.warning("%r: %d queued messages were never sent", self, len(self._queue))
            self._queue.clear()
        self._done.set()
        self._notify()

    def _give_up(self, error: Exception) -> None:
        """Stop for good with ``error``, which the block and every waiting call raise."""
        if self._stop is None:
            self._fatal = error
            logger.info("%r: giving up: %s", self, error)
        self._finish()
        if self._fatal is not None and self._waiting == 0 and self._body is not None:
            # Nobody is waiting to be told: stop the block so that it raises.
            self._body.cancel()

    async def _run(self) -> None:
        """The supervisor: connect, publish, wait for the end, back off, again."""
        self._task = trio.lowlevel.current_task()
        retries = _Retries(self._backoff)
        try:
            while self._stop is None:  # the phase is CONNECTING
                outcome = await self._attempt(retries)
                if outcome is None:
                    break  # stopped
                if isinstance(outcome, _Fatal):
                    self._give_up(outcome.error)
                    return
                delay: float | None = None
                if isinstance(outcome, _Closed):
                    retries.closed(outcome.uptime)
                    reason = outcome.reason
                    self._last_reason = reason
                    if (
                        self._stop is None
                        and self._reconnect
                        and self._retry_on(ConnectionClosed.for_reason(reason))
                    ):
                        delay = retries.next_delay(self._rng)
                    logger.info(
                        "%r: connection %d closed: %s%s",
                        self,
                        outcome.number,
                        reason,
                        "" if delay is None else f"; reconnecting in {delay:.3g} s",
                    )
                    self._emit(
                        CloseEvent(
                            outcome.number,
                            reason.code,
                            reason.reason,
                            reason.initiated_by_peer,
                            delay,
                        ),
                        outcome.number,
                    )
                    if delay is None:
                        return
                else:
                    attempt = retries.failed()
                    if (
                        self._stop is None
                        and self._reconnect
                        and not retries.gives_up()
                        and self._retry_on(outcome)
                    ):
                        delay = retries.next_delay(self._rng, retry_after(outcome))
                    logger.info(
                        "%r: attempt %d failed: %s%s",
                        self,
                        attempt,
                        outcome,
                        "" if delay is None else f"; retrying in {delay:.3g} s",
                    )
                    self._emit(ErrorEvent(outcome, attempt, delay), self._gen)
                    if delay is None:
                        self._give_up(outcome)
                        return
                self._set_phase(ReadyState.CONNECTING)
                with self._interruptible():
                    await trio.sleep(delay)
        except Exception as exc:
            # retry_on or on_event raised: a bug to surface, not to retry.
            self._give_up(exc)
        finally:
            self._finish()

    async def _attempt(self, retries: _Retries) -> Exception | _Closed | _Fatal | None:
        """One connection, from connecting to closed; None if stopped meanwhile."""
        conn: WebSocketConnection | None = None
        async with trio.open_nursery() as nursery:
            try:
                with self._interruptible() as scope:
                    try:
                        conn = await self._connect(nursery)
                        if self._on_open is not None:
                            await self._on_open(conn)
                        await self._flush(conn)
                    except (HandshakeError, TransportError, ConnectionClosed) as exc:
                        return exc
                if scope.cancelled_caught or conn is None:
                    return None
                number = self._publish(conn, retries.opened())
                opened = trio.current_time()
                reason = await conn.wait_closed()
                return _Closed(number, reason, trio.current_time() - opened)
            except Exception as exc:
                # on_open or on_event raised: a bug to surface, not to retry.
                # (Returned, not raised: the nursery would wrap it in a group.)
                return _Fatal(exc)
            finally:
                if conn is not None and conn.closed is None:
                    # Stopped during on_open, or on_open raised.
                    if self._stop is not None:
                        await conn.aclose(self._stop.code, self._stop.reason)
                    else:
                        await conn.aclose(CloseCode.INTERNAL_ERROR)
                self._conn = None
                if self._phase is ReadyState.OPEN:
                    self._set_phase(ReadyState.CLOSED)  # until the supervisor decides
                nursery.cancel_scope.cancel()  # the keep-alive task sleeps

    def _publish(self, conn: WebSocketConnection, attempt: int) -> int:
        self._gen += 1
        number = self._gen
        self._conns[number] = conn
        # Keep the unread messages of one closed connection at most.
        while self._read_gen < number - 1:
            old = self._conns.pop(self._read_gen, None)
            if old is not None and old._proto.messages:
                logger.warning(
                    "%r: dropped %d unread messages of connection %d",
                    self,
                    len(old._proto.messages),
                    self._read_gen,
                )
            self._read_gen += 1
        self._conn = conn
        self._phase = ReadyState.OPEN
        logger.info("%r: connection %d open (attempt %d)", self, number, attempt)
        self._emit(OpenEvent(number, attempt, conn.subprotocol), number - 1)
        return number


class _EventIterator:
    __slots__ = ("_client",)

    def __init__(self, client: ReconnectingWebSocket) -> None:
        self._client = client

    def __aiter__(self) -> _EventIterator:
        return self

    async def __anext__(self) -> ClientEvent:
        return await self._client._next_event()


@asynccontextmanager
async def open_reconnecting_websocket(
    url: str,
    *,
    backoff: Backoff | None = None,
    reconnect: bool = True,
    retry_on: Callable[[Exception], bool] = default_retry_on,
    on_open: Callable[[WebSocketConnection], Awaitable[object]] | None = None,
    on_event: Callable[[ClientEvent], object] | None = None,
    send_policy: SendPolicy = "wait",
    send_queue_size: int = 64,
    max_events: int = 256,
    rng: Callable[[], float] | None = None,
    # What open_websocket_url takes
    subprotocols: Sequence[str] = (),
    extra_headers: HeaderPairs = (),
    ssl_context: ssl.SSLContext | None = None,
    cafile: StrPath | TrustStore = SYSTEM,
    certfile: StrPath | None = None,
    keyfile: StrPath | None = None,
    unix_socket: str | None = None,
    max_message_size: int | None = 2**20,
    max_queue: int = 16,
    open_timeout: float | None = 10.0,
    close_timeout: float | None = 10.0,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    compression: bool = True,
) -> AsyncIterator[ReconnectingWebSocket]:
    """Keep a connection to ``url`` for as long as the ``async with`` block runs.

    The first attempt starts at once; the block does not wait for it (use
    :meth:`~ReconnectingWebSocket.wait_open`, or just send: by default
    sends wait for the connection). Whenever an attempt fails or a connection
    ends, the client waits as ``backoff`` says and tries again, unless
    ``retry_on`` says the failure is final or ``reconnect`` is off.

    Args:
        url: A ``ws://`` or ``wss://`` URL.
        backoff: The waits and the limits (:class:`Backoff`; default 0.1 s
            doubling to 10 s, 10 % jitter, no attempt limit).
        reconnect: Reconnect at all; also :attr:`ReconnectingWebSocket.reconnect`.
            Off, the first failure to connect raises, and the end of the
            connection ends the client.
        retry_on: Is this failure worth another attempt? See
            :func:`default_retry_on`.
        on_open: ``async def on_open(conn)``, awaited on every new connection
            before it counts as open, before queued messages go out and before
            anyone waiting for OPEN wakes: log in, subscribe again. If it
            raises :exc:`ConnectionClosed` the attempt failed; any other
            exception ends the client and comes out of the block.
        on_event: A plain function called with each :class:`OpenEvent`,
            :class:`CloseEvent` and :class:`ErrorEvent` as it happens (not with
            messages), from the client's task: it must not block. An exception
            from it ends the client and comes out of the block.
        send_policy: What :meth:`~ReconnectingWebSocket.send_message` does
            while not OPEN: ``"wait"`` (default), ``"queue"`` or ``"raise"``.
        send_queue_size: The most messages ``"queue"`` keeps.
        max_events: The most unread events kept for
            :meth:`~ReconnectingWebSocket.events` (messages not counted).
        rng: Where the backoff's jitter comes from: a function returning a
            float in [0, 1) (``random.Random(seed).random`` makes the waits
            repeatable).
        ssl_context: The TLS context for ``wss://`` (default: the system's
            trust store).
        cafile: Instead of ``ssl_context``: a CA file, :data:`SYSTEM` or
            :data:`NONE` (no verification, for testing only), as for
            :func:`client_ssl_context`. The context is made once, not per
            attempt.
        certfile: A client certificate (PEM) to present.
        keyfile: Its private key, if not in ``certfile``.

    The other keywords (``subprotocols``, ``extra_headers``, ``unix_socket``,
    ``max_message_size``, ``max_queue``, ``open_timeout``, ``close_timeout``,
    ``ping_interval``, ``ping_timeout``, ``compression``) are those of
    :func:`connect_websocket`, applied to every connection. A keep-alive ping
    unanswered within ``ping_timeout`` closes the connection with 1011, and the
    client reconnects.

    Raises:
        ConnectionRejected, HandshakeError, TransportError: the client gave
            up (its last attempt's error), whatever the block was doing; the
            block is cancelled if it was not waiting on the client.
        ValueError: a bad URL or option (a header or subprotocol HTTP would
            refuse, as for :func:`connect_websocket`), or TLS options with
            ``ws://``; raised before any connection is attempted.

    Cancellation:
        Cancelling the block closes the connection with 1001 (waiting at most
        ``close_timeout``), or abandons the attempt or the wait under way;
        nothing is left running, and the cancellation goes on as usual.
    """
    host, port, resource, tls = _parse_url(url)
    check_client_request(extra_headers, subprotocols)
    context = resolve_ssl_context(ssl_context, cafile, certfile, keyfile, use_ssl=tls, url=url)
    if tls and context is None:
        context = ssl.create_default_context()
    connect = functools.partial(
        connect_websocket,
        host=host,
        port=port,
        resource=resource,
        use_ssl=tls,
        ssl_context=context,
        unix_socket=unix_socket,
        subprotocols=subprotocols,
        extra_headers=extra_headers,
        max_message_size=max_message_size,
        max_queue=max_queue,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        compression=compression,
    )
    with collapse_exception_groups():
        async with graceful_scope() as body, trio.open_nursery() as nursery:
            client = ReconnectingWebSocket(
                url,
                connect,
                backoff=backoff or Backoff(),
                reconnect=reconnect,
                retry_on=retry_on,
                on_open=on_open,
                on_event=on_event,
                send_policy=send_policy,
                send_queue_size=send_queue_size,
                max_events=max_events,
                rng=rng,
                body=body,
            )
            nursery.start_soon(client._run, name="wsnursery reconnect")
            left = BlockExit(body)
            try:
                with body, left:
                    yield client
            finally:
                # Shielded by graceful_scope; bounded by close_timeout.
                await client.aclose(left.code)
                nursery.cancel_scope.cancel()
            if body.cancelled_caught and client._fatal is not None:
                raise client._fatal
