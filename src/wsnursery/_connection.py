"""A WebSocket connection over a trio stream.

Theory of operation
-------------------
One *reader task* per connection reads the transport, feeds the sans-I/O
:class:`~wsnursery._sansio.protocol.Protocol`, writes what it must answer at once
(pongs, the close echo) and wakes whoever waits: ``get_message`` callers, ``ping``
callers waiting for their pong, ``aclose`` waiting for the closing handshake.
A *keep-alive task* pings every ``ping_interval``. Both live in a nursery the
caller provides (the server's per-connection nursery, or the one
``open_websocket`` opens), and neither ever raises: a failure is recorded as the
close reason and ends the connection.

Both read loops, the reader of the function API (``_reader``) and the hook
loop of a handler object (``_dispatch``), are made of one *read step*,
``_read_once``: read, feed the protocol, flush its answers, wake the waiters.
A read only waits when the socket is empty, so a peer that keeps it full would
keep a read loop from ever yielding: the protocol parses at most WORK_BUDGET
frames (or 1 MiB) per step, and the step reaches a schedule point when that
budget is spent.

Receiving is bounded: when ``max_queue`` messages wait unread, the reader stops
reading the socket, so TCP flow control slows the peer down. Frames that came in
the same read as the message that filled the queue (pings, the close frame) are
still answered.

The connection owns every byte it writes, through one path: ``_write_nowait``
frames and writes at once, without blocking, when nobody holds the send lock and
no frame waits in the outbox. On a plain TCP socket that is one non-blocking
``write``/``writev``. What the socket does not take, a waiting sender
(``send_message``, ping, pong, the close frame) writes in its own task, holding
a FIFO lock so that frames never interleave; a sender that never waits (a
broadcaster, through ``_offer``) queues it in the connection's outbox, which an
outbox writer task writes in order. Whoever writes takes the outbox first. A
send cancelled after part of a frame went out leaves the connection BROKEN and
closed: the stream cannot be resynchronised.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio
from trio.lowlevel import (
    ParkingLot,
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    wait_readable,
)

from ._sansio.exceptions import CloseCode, CloseReason, ConnectionClosed
from ._sansio.headers import TargetParts
from ._sansio.protocol import (
    WORK_BUDGET,
    Frame,
    Message,
    Protocol,
    ProtocolState,
    encode_frame,
)
from ._transport import SocketTransport, Transport, make_transport
from ._util import LazyAddresses

if TYPE_CHECKING:
    from ._handler import WebSocketHandler
    from ._sansio.headers import Headers

__all__ = ["WebSocketConnection"]

logger = logging.getLogger("wsnursery.connection")

_OPEN = ProtocolState.OPEN
# Yield to the scheduler at least once every this many calls that did not
# block, so a tight send or receive loop cannot starve other tasks.
_YIELD_EVERY = 16
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_MESSAGE_TYPES = (str, bytes, bytearray, memoryview)
_ids = itertools.count(1)
# Connections served by a handler object never park a consumer or a paused
# reader: they share this empty lot instead of owning one (memory per connection).
_NO_LOT = ParkingLot()


def _frame_size(frame: Frame) -> int:
    return sum(len(part) for part in frame) if isinstance(frame, list) else len(frame)


class _Busy(enum.Enum):
    BUSY = "busy"


#: ``_write_nowait``'s answer when someone else is writing or frames wait.
_BUSY: Final = _Busy.BUSY
#: What ``_write_nowait`` left: None (all written), _BUSY, or (frame, bytes sent).
_Rest = tuple[Frame, int] | _Busy | None


class Delivery(enum.Enum):
    """What :meth:`WebSocketConnection._offer` did with a frame."""

    DELIVERED = "delivered"  # the socket took all of it
    QUEUED = "queued"  # queued in the outbox; the outbox writer writes it in order
    DROPPED = "dropped"  # not taken: the outbox is full (the caller's policy decides)
    CLOSED = "closed"  # the connection is closing or closed


_DELIVERED = Delivery.DELIVERED
_QUEUED = Delivery.QUEUED
_DROPPED = Delivery.DROPPED
_CLOSED = Delivery.CLOSED


class OutboxLimits:
    """What one sender of non-waiting frames (a broadcaster) gives every connection it offers to.

    The bounds of each connection's outbox, the totals queued over all of them
    (the outboxes keep these counts), and ``on_closed``, called once with the
    connection when a connection whose outbox it made closes. ``owner`` only
    names the sender in an error.
    """

    __slots__ = (
        "max_bytes",
        "max_messages",
        "on_closed",
        "owner",
        "queued_bytes",
        "queued_messages",
    )

    def __init__(
        self,
        max_messages: int,
        max_bytes: int,
        on_closed: Callable[[WebSocketConnection], None],
        owner: object = None,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.on_closed = on_closed
        self.owner = owner
        self.queued_messages = 0
        self.queued_bytes = 0


class PreparedMessage:
    """A message to offer to many connections, framed once for all that share frames.

    A server frame is unmasked and, without compression, the same for every
    connection: it is encoded on first need and reused.
    """

    __slots__ = ("frame", "message", "size")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.frame: Frame | None = None
        self.size = 0

    def shared(self) -> Frame:
        frame = self.frame
        if frame is None:
            frame = self.frame = encode_frame(self.message)
            self.size = _frame_size(frame)
        return frame


class _Outbox:
    """Frames waiting for one connection's socket, written in order by its outbox writer.

    ``partial`` says the first queued buffer is the rest of a frame the socket
    took only part of: it must be written before anything else, whatever the
    overflow policy does. ``closing``: the sender's policy is closing the
    connection; nothing more is queued.
    """

    __slots__ = ("closing", "count", "frames", "limits", "lot", "nbytes", "partial")

    def __init__(self, limits: OutboxLimits) -> None:
        self.limits = limits
        self.frames: list[bytes | bytearray] = []
        self.count = 0
        self.nbytes = 0
        self.partial = False
        self.lot: ParkingLot | None = None  # set once the outbox writer is started
        self.closing = False

    def put(self, frame: Frame) -> None:
        if isinstance(frame, list):
            self.frames.extend(frame)
        else:
            self.frames.append(frame)
        size = _frame_size(frame)
        self.count += 1
        self.nbytes += size
        limits = self.limits
        limits.queued_bytes += size
        limits.queued_messages += 1

    def take(self, last: Frame | None = None) -> list[bytes | bytearray]:
        """Everything queued (then ``last``), leaving the outbox empty."""
        frames = self.frames
        self.frames = []
        limits = self.limits
        limits.queued_bytes -= self.nbytes
        limits.queued_messages -= self.count
        self.nbytes = self.count = 0
        self.partial = False
        if last is not None:
            if isinstance(last, list):
                frames.extend(last)
            else:
                frames.append(last)
        return frames


class WebSocketConnection(TargetParts, LazyAddresses, trio.abc.AsyncResource):
    """An open WebSocket connection (either side).

    Made by the server when a handler accepts a request, and by
    :func:`open_websocket` / :func:`connect_websocket` on the client side; not
    created directly. Use it as an async iterator to receive messages until the
    peer closes normally::

        async for message in conn:
            await conn.send_message(message)

    Attributes:
        path: The full request target, query included (``/chat?room=1``),
            as trio-websocket's ``path``; :attr:`url_path` and
            :attr:`query_string` are its parts.
        query: The request's query parameters (first value of each name).
        request_headers: The upgrade request's headers.
        response_headers: The 101 response's headers.
        subprotocol: The negotiated subprotocol, or None.
        extensions: The negotiated extensions (wsproto objects).
        id (str): The connection's ID, unique in the process (its key in
            :attr:`WebSocketServer.connections`). On a server with a
            backplane it is ``"<node_id>-<n>"``, unique across the nodes and
            naming the one that holds it (:meth:`Broadcaster.node_of`).
        user: What the authenticator returned, or None.
        server: The :class:`WebSocketServer` that accepted the connection
            (None on the client side).
    """

    # Slots: an idle connection's attributes cost a fixed array instead of a
    # dict past CPython's shared-key limit (about 1.2 KiB less per connection).
    # __dict__ stays, made on first use, for attributes an application adds.
    __slots__ = (
        "__dict__",
        "_addresses",
        "_calls_since_yield",
        "_close_deadline",
        "_close_hook_done",
        "_close_timeout",
        "_dispatch_task",
        "_finished",
        "_foreign_hook",
        "_handler",
        "_hook_lot",
        "_hook_running",
        "_keepalive_busy",
        "_max_queue",
        "_message_lot",
        "_nursery",
        "_outbox",
        "_pauses",
        "_ping_interval",
        "_ping_timeout",
        "_pings",
        "_proto",
        "_send_lock",
        "_stream",
        "_trailing",
        "_transport",
        "_transport_closed",
        "extensions",
        "id",
        "path",
        "query",
        "request_headers",
        "response_headers",
        "server",
        "subprotocol",
        "user",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: Protocol,
        *,
        path: str,
        query: dict[str, str] | None = None,
        request_headers: Headers,
        response_headers: Headers,
        subprotocol: str | None,
        trailing_data: bytes = b"",
        max_queue: int = 16,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float | None = 10.0,
        local: Any = None,
        remote: Any = None,
        transport: Transport | None = None,
        user: Any = None,
        server: Any = None,
        conn_id: str | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._stream = stream
        self._transport = transport or make_transport(stream)
        self._proto = protocol
        self.path = path
        self.query = dict(query or {})
        self.request_headers = request_headers
        self.response_headers = response_headers
        self.subprotocol = subprotocol
        self.extensions = list(protocol.extensions)
        # Looked up on first use: most handlers never ask, and it is two syscalls.
        self._addresses: tuple[Any, Any] | None = (
            None if local is None and remote is None else (local, remote)
        )
        self._max_queue = max_queue
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._trailing = trailing_data
        # Consumers park here while the queue is empty; the reader parks here
        # while it is full. The two never wait at once (max_queue >= 1), so
        # one lot serves both.
        self._message_lot: ParkingLot = _NO_LOT
        # Made on first need: most sends never wait for the socket.
        self._send_lock: trio.StrictFIFOLock | None = None
        # Broadcast frames waiting for the socket, made on first need (see
        # _offer): whoever writes next writes these first.
        self._outbox: _Outbox | None = None
        self._pings: dict[bytes, trio.Event] = {}
        self._finished = trio.Event()
        self._transport_closed = False
        # Counts the reader's pauses, each begun and ended (odd: paused now).
        # The keep-alive compares it across a ping: a reader that paused at
        # any time during the ping may have missed the pong through no fault
        # of the peer.
        self._pauses = 0
        self._calls_since_yield = 0
        self._keepalive_busy = False
        self._nursery: trio.Nursery | None = None
        self._handler: WebSocketHandler | None = None
        self._dispatch_task: trio.lowlevel.Task | None = None
        self._close_hook_done = False
        self._close_deadline = math.inf
        # Hooks run one at a time: the dispatch task's, or an on_connect that
        # set_handler runs from another task (waiters park in _hook_lot).
        self._hook_running = False
        self._foreign_hook = False
        self._hook_lot: ParkingLot | None = None
        #: The connection's ID, unique in the process.
        self.id = conn_id if conn_id is not None else f"{next(_ids):x}"
        #: The user the authenticator returned, or None.
        self.user: Any = user
        #: The server that accepted the connection (None on the client side).
        self.server: Any = server

    def __repr__(self) -> str:
        side = "client" if self._proto.client else "server"
        # url_path: a token in the query must not reach the logs.
        return f"<WebSocketConnection {side} {self.url_path!r} state={self._proto.state.name}>"

    # -- state ---------------------------------------------------------------

    @property
    def is_client(self) -> bool:
        """True on the client side of the connection."""
        return self._proto.client

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed, or None while it is open or closing."""
        return self._proto.closed if self._finished.is_set() else None

    @property
    def state(self) -> ProtocolState:
        """OPEN, CLOSING, CLOSED or BROKEN (see :class:`ProtocolState`)."""
        return self._proto.state

    # -- background tasks ----------------------------------------------------

    def _start(self, nursery: trio.Nursery, *, keepalive_task: bool = True) -> None:
        """Start the reader (and, unless someone else schedules pings, the keep-alive).

        A server pings all its connections from one task of its own
        (``keepalive_task=False``); a client connection runs its own.
        """
        self._nursery = nursery
        self._message_lot = ParkingLot()
        nursery.start_soon(self._reader, name="wsnursery reader")
        if self._ping_interval is not None and keepalive_task:
            nursery.start_soon(self._keepalive, name="wsnursery keep-alive")

    async def _reader(self) -> None:
        """The function API's reader: read steps until the end, pausing on a full queue."""
        proto = self._proto
        try:
            if self._trailing:
                trailing, self._trailing = self._trailing, b""
                await self._read_once(trailing)
            while not self._transport_closed:
                if proto.transport_should_close:
                    await self._close_transport()
                    break
                if proto.state is ProtocolState.CLOSED:
                    # The client waits for the server to close TCP (RFC 6455
                    # 7.1.1), but not for longer than close_timeout.
                    await self._wait_for_eof()
                    break
                if len(proto.messages) >= self._max_queue and proto.state is _OPEN:
                    self._pauses += 1
                    await self._message_lot.park()
                    self._pauses += 1
                    continue
                await self._read_once()
        except _TRANSPORT_ERRORS as exc:
            if not self._transport_closed:
                logger.debug("transport failed: %r", exc)
                proto.fail(CloseCode.ABNORMAL_CLOSURE, f"transport failed: {exc!r}")
        finally:
            # Cancelled or done: the connection ends with this task.
            await self._close_transport()

    async def _read_once(self, data: bytes | memoryview | None = None) -> None:
        """One read step: read, feed the protocol, flush its answers, wake the waiters.

        Both read loops (``_reader``, ``_dispatch``) are made of these steps,
        and ``data`` given (bytes that came with the handshake) is fed instead
        of a read. The protocol parses at most WORK_BUDGET frames (or 1 MiB)
        per step: when the budget is spent, the step is a schedule point and
        parsing resumes, so a peer that keeps the socket full (and the read
        from ever waiting) cannot starve other tasks. Pongs and the close echo
        are written before anything else happens on the connection, in the
        order the pings came. Closing the transport once the protocol says so
        is left to the loop: a handler object still gets the messages that
        came before the close frame.
        """
        proto = self._proto
        if data is not None:
            proto.receive_data(data)
        elif proto.budget <= 0:
            await checkpoint()
            proto.resume()
        else:
            transport = self._transport
            if type(transport) is SocketTransport:
                # SocketTransport.receive, with the wait in this frame: every
                # idle connection holds its task's stack, one frame less.
                data = transport.receive_nowait()
                while data is None:
                    await wait_readable(transport.fd)
                    proto.budget = WORK_BUDGET  # we waited: that was a schedule point
                    data = transport.receive_nowait()
                proto.receive_data(data)
            else:
                proto.receive_data(await transport.receive())
        if proto._out:
            try:
                await self._write(proto.data_to_send())
            except ConnectionClosed:
                pass
        if proto.pongs:
            self._ack_pongs()
        lot = self._message_lot
        if proto.messages and lot is not _NO_LOT and lot:
            lot.unpark_all()

    # -- handler objects: one task reads and calls the hooks -----------------

    async def _dispatch(self, handler: WebSocketHandler) -> None:
        """Read in this task and call ``handler``'s hooks, in order, until the end.

        ``on_disconnect`` is called exactly once when the connection is over,
        shielded and bounded by ``close_timeout``. See ``docs/topics/handlers.rst``.
        """
        self._handler = handler
        self._dispatch_task = trio.lowlevel.current_task()
        proto = self._proto
        try:
            if await self._call_hook(handler.on_connect) and self._trailing:
                trailing, self._trailing = self._trailing, b""
                await self._read_once(trailing)
            while not self._transport_closed:
                if proto.messages or (
                    proto.close_received is not None and not self._close_hook_done
                ):
                    await self._deliver()
                    continue
                if proto.transport_should_close:
                    await self._close_transport()
                    break
                if proto.state is ProtocolState.CLOSED:
                    await self._wait_for_eof()
                    break
                if proto.state is ProtocolState.CLOSING:
                    # We sent the close frame (a hook failed, or aclose from a
                    # hook): wait for the answer, but not forever.
                    with trio.move_on_at(self._close_deadline) as scope:
                        await self._read_once()
                    if scope.cancelled_caught:
                        break
                else:
                    await self._read_once()
        except _TRANSPORT_ERRORS as exc:
            if not self._transport_closed:
                proto.fail(CloseCode.ABNORMAL_CLOSURE, f"transport failed: {exc!r}")
        finally:
            with trio.CancelScope(shield=True) as scope:
                await self._close_transport("the peer did not finish the closing handshake in time")
                assert proto.closed is not None
                if self._foreign_hook:  # set_handler's on_connect, from another task
                    with trio.move_on_after(_timeout(self._close_timeout)):
                        while self._foreign_hook:
                            await self._hook_parking_lot().park()
                scope.deadline = trio.current_time() + _timeout(self._close_timeout)
                try:
                    await self._hooks().on_disconnect(self, proto.closed)
                except Exception:
                    logger.exception("on_disconnect failed on %s", self)

    async def _deliver(self) -> None:
        """Hand queued messages, then a close frame, to the hooks."""
        proto = self._proto
        messages = proto.messages
        # While a hook runs nothing is read: the keep-alive must not blame the peer.
        self._pauses += 1
        try:
            while messages:
                message = messages.popleft()
                sent = proto.close_sent
                if sent is not None and not sent.initiated_by_peer:
                    continue  # we are closing (a hook failed or closed): drop the rest
                handler = self._handler
                assert handler is not None
                if type(message) is str:
                    await self._call_hook(handler.on_text, message)
                else:
                    await self._call_hook(handler.on_binary, message)
            if proto.close_received is not None and not self._close_hook_done:
                self._close_hook_done = True
                await self._call_hook(self._hooks().on_close_message, proto.close_received)
        finally:
            self._pauses += 1

    @property
    def _reader_paused(self) -> bool:
        """True while the reader does not read: a full queue, or a hook running."""
        return bool(self._pauses & 1)

    def _hooks(self) -> WebSocketHandler:
        assert self._handler is not None
        return self._handler

    async def _call_hook(self, hook: Callable[..., Awaitable[None]], *args: Any) -> bool:
        """Run a hook; if it raises, log it and start closing with 1011. True if it returned.

        Called by the dispatch task only. Hooks run one at a time: this waits
        while ``set_handler``, called from another task, runs an ``on_connect``.
        """
        if self._foreign_hook:
            lot = self._hook_parking_lot()
            while self._foreign_hook:
                await lot.park()
        running = self._hook_running  # True when a hook calls set_handler
        self._hook_running = True
        try:
            await hook(self, *args)
        except ConnectionClosed:
            return False  # a send met the closing connection: the normal way to end
        except Exception:
            logger.exception("handler hook %s failed on %s; closing with 1011", hook.__name__, self)
            await self._start_close(CloseCode.INTERNAL_ERROR, "internal error")
            return False
        finally:
            self._hook_running = running
            if self._hook_lot is not None:
                self._hook_lot.unpark_all()
        return True

    def _hook_parking_lot(self) -> ParkingLot:
        lot = self._hook_lot
        if lot is None:
            lot = self._hook_lot = ParkingLot()
        return lot

    async def _start_close(self, code: int, reason: str) -> None:
        """Send a close frame without waiting for the answer (the dispatch loop reads it)."""
        out = self._proto.send_close(code, reason)
        if out:
            self._close_deadline = trio.current_time() + _timeout(self._close_timeout)
            with trio.move_on_at(self._close_deadline) as scope:
                try:
                    await self._write(out)
                except ConnectionClosed:
                    pass
            if scope.cancelled_caught:
                # The peer does not read: give up on the handshake.
                await self._close_transport("the peer did not read our close frame in time")
            elif trio.lowlevel.current_task() is not self._dispatch_task:
                # The dispatch task may be waiting in a read with no deadline
                # (it did not see us start closing): bound the handshake here.
                with trio.move_on_at(self._close_deadline):
                    await self._finished.wait()
                if not self._finished.is_set():
                    await _shielded(
                        self._close_transport(
                            "the peer did not finish the closing handshake in time"
                        )
                    )

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a task that lives in this connection's nursery and ends with it.

        If the task raises, the exception is logged and the connection is
        closed with 1011; other connections are not affected.

        Raises:
            RuntimeError: the connection has no nursery (not started yet).
        """
        if self._nursery is None:
            raise RuntimeError("this connection is not running in a nursery")
        self._nursery.start_soon(self._guarded, async_fn, args)

    async def _guarded(
        self, async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        try:
            await async_fn(*args)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("task %r of %s failed; closing with 1011", async_fn, self)
            if self._dispatch_task is not None:
                await self._start_close(CloseCode.INTERNAL_ERROR, "internal error")
            else:
                await self.aclose(CloseCode.INTERNAL_ERROR, "internal error")

    async def set_handler(self, handler: WebSocketHandler) -> None:
        """Hand this connection to another handler object (WebSocket++'s set_handler).

        From the next event on, ``handler`` gets the hooks, starting with its
        ``on_connect`` (called here); ``on_disconnect`` goes to whichever
        handler holds the connection when it ends. Hooks never run at the
        same time: called from another task (one started with
        :meth:`start_soon`), this first waits until the running hook returns,
        and the next hooks wait until ``on_connect`` has returned. Called
        from a hook, ``on_connect`` runs at once, inside it.

        Raises:
            RuntimeError: the connection is not served by a handler object.

        Cancellation:
            While waiting for a running hook, nothing has changed: the old
            handler keeps the connection. Once ``on_connect`` runs, as for
            ``on_connect``.
        """
        if self._dispatch_task is None:
            raise RuntimeError("only a connection served by a WebSocketHandler can be handed over")
        if trio.lowlevel.current_task() is self._dispatch_task:
            self._handler = handler  # from a hook: the next hook is on_connect
            await self._call_hook(handler.on_connect)
            return
        # From another task: hooks run one at a time, so wait for the running
        # one (and any other set_handler) to return first.
        lot = self._hook_parking_lot()
        while self._hook_running or self._foreign_hook:
            await lot.park()
        self._foreign_hook = True
        failed = False
        try:
            self._handler = handler
            await handler.on_connect(self)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("handler hook on_connect failed on %s; closing with 1011", self)
            failed = True
        finally:
            self._foreign_hook = False
            lot.unpark_all()
        if failed:
            # After letting the dispatch task go: it reads the peer's answer.
            await self._start_close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _wait_for_eof(self) -> None:
        with trio.move_on_after(_timeout(self._close_timeout)):
            # A checkpoint per read: a peer that keeps sending must not keep
            # the deadline from firing (the socket read never waits then).
            while await self._transport.receive():
                await checkpoint()

    def _ack_pongs(self) -> None:
        # A pong acknowledges its ping and every ping sent before it.
        pongs = self._proto.pongs
        while pongs:
            payload = pongs.pop(0)
            if payload not in self._pings:
                continue  # unsolicited pong: allowed, ignored
            for key in list(self._pings):
                self._pings.pop(key).set()
                if key == payload:
                    break

    async def _keepalive(self) -> None:
        assert self._ping_interval is not None
        while True:
            await trio.sleep(self._ping_interval)
            if self._proto.state is not _OPEN:
                return
            if self.keepalive_due():
                await self._keepalive_once()

    def keepalive_due(self) -> bool:
        """True when a keep-alive check should run now (for a shared scheduler).

        Due when a write waits for the peer (``_keepalive_once`` then
        watches whether the peer takes any byte), or else when the reader
        reads: while nothing is read (a full queue, or a hook running on a
        handler object) a pong could not be seen.
        """
        if self._ping_interval is None or self._proto.state is not _OPEN or self._keepalive_busy:
            return False
        lock = self._send_lock
        return (lock is not None and lock.locked()) or not self._pauses & 1

    async def _keepalive_once(self) -> None:
        """Ping; if no pong comes within ping_timeout, fail the connection with 1011.

        When a write waits for the peer, a ping could only go out after it:
        the write is watched instead, and a peer that takes no byte of it
        within ping_timeout is failed with 1011 the same way.
        """
        self._keepalive_busy = True
        pauses = self._pauses
        lock = self._send_lock
        if lock is not None and lock.locked():
            try:
                await self._watch_stuck_write()
            finally:
                self._keepalive_busy = False
            return
        try:
            with trio.move_on_after(_timeout(self._ping_timeout)) as scope:
                await self.ping()
        except ConnectionClosed:
            return
        finally:
            self._keepalive_busy = False
        if scope.cancelled_caught and self._pauses == pauses:
            logger.info("keep-alive ping timeout on %s; closing", self.remote)
            await self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

    async def _watch_stuck_write(self) -> None:
        """Fail with 1011 a peer that takes no byte of our writes for ping_timeout."""
        transport = self._transport
        progress = transport.progress
        await trio.sleep(_timeout(self._ping_timeout))
        lock = self._send_lock
        if (
            self._proto.state is _OPEN
            and not self._transport_closed
            and lock is not None
            and lock.locked()
            and transport.progress == progress
        ):
            logger.info("keep-alive: %s took no byte in ping_timeout; closing", self.remote)
            # The close frame would queue behind the stuck write: drop TCP now.
            # The waiting writer gets ConnectionClosed (1011).
            self._proto.fail(CloseCode.INTERNAL_ERROR, "keepalive: the peer stopped reading")
            await self._close_transport()

    async def _fail(self, code: int, reason: str) -> None:
        """Fail the connection: send a close frame (best effort) and drop TCP."""
        self._proto.fail(code, reason)
        out = self._proto.data_to_send()
        if out and not self._transport_closed:
            with trio.move_on_after(_timeout(self._close_timeout)):
                try:
                    await self._write(out)
                except ConnectionClosed:
                    pass
        await self._close_transport()

    async def _close_transport_shielded(self) -> None:
        await _shielded(self._close_transport())

    async def _close_transport(self, why: str = "connection closed") -> None:
        """Close the stream and wake every waiter. Idempotent; never blocks long."""
        if self._transport_closed:
            return
        self._transport_closed = True
        proto = self._proto
        if proto.closed is None:
            proto.abort(why)
        await self._transport.close()
        self._finished.set()
        outbox = self._outbox
        if outbox is not None:
            outbox.take()
            if outbox.lot is not None:
                outbox.lot.unpark_all()
            outbox.limits.on_closed(self)
        self._message_lot.unpark_all()
        for event in self._pings.values():
            event.set()  # ping() sees its payload still registered: closed

    # -- writing -------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        """Write bytes already framed (pongs, close frames) in order with the rest."""
        await self._send_frame(bytes, data)

    def _write_nowait(self, make_frame: Callable[[Any], Frame] | None, arg: Any) -> _Rest:
        """The one "write now": frame and write what the socket takes, without blocking.

        Only when nobody holds the send lock and nothing waits in the outbox;
        otherwise nothing is framed and the answer is ``_BUSY`` (the caller
        waits its turn, or queues). ``make_frame`` None: ``arg`` is the frame.
        None: the socket took the whole frame. Otherwise the frame and how
        many bytes of it the socket took; the caller owns the rest. Raises the
        transport's errors.
        """
        lock = self._send_lock
        outbox = self._outbox
        if (lock is not None and lock.locked()) or (outbox is not None and outbox.frames):
            return _BUSY
        frame = arg if make_frame is None else make_frame(arg)
        sent = self._transport.try_send(frame)
        if sent == (len(frame) if type(frame) is bytes else _frame_size(frame)):
            return None
        return frame, sent

    async def _send_frame(self, make_frame: Callable[[Any], Frame], arg: Any) -> None:
        """Frame with ``make_frame(arg)`` and write it, in order with every other frame.

        Framing happens only once it is this frame's turn to be written: a
        compressed frame must go out in the order it was compressed.

        Raises:
            ConnectionClosed: the transport is closed or failed.
        """
        if self._transport_closed:
            raise self._closed_error()
        try:
            rest = self._write_nowait(make_frame, arg)
        except _TRANSPORT_ERRORS as exc:
            await self._send_broke(exc)
        if rest is not None:
            await self._send_rest(rest, make_frame, arg)

    async def _send_rest(self, rest: _Rest, make_frame: Callable[[Any], Frame], arg: Any) -> None:
        """What a waiting sender does when ``_write_nowait`` did not write it all."""
        if isinstance(rest, tuple):
            await self._finish_send(*rest)
            return
        lock = self._writing_lock()
        await lock.acquire()  # cancelled while queued: nothing framed, nothing lost
        try:
            if self._transport_closed:
                raise self._closed_error()
            data = make_frame(arg)
            outbox = self._outbox
            if outbox is not None and outbox.frames:
                # Queued broadcast frames were framed first: they go first.
                await self._transmit(outbox.take(data))
            else:
                await self._transmit(data, droppable=self._proto.frames_droppable)
        finally:
            lock.release()

    # -- frames offered by a sender that never waits (a broadcaster) ----------

    def _attach(self, limits: OutboxLimits) -> None:
        """Let ``limits``' sender queue here (and hear of the close); only one ever may.

        Raises:
            ConnectionClosed: the connection is closing or closed.
            ValueError: another sender's outbox is already attached.
        """
        if self._proto.state is not _OPEN or self._transport_closed:
            raise self._closed_error()
        self._outbox_for(limits)

    def _outbox_for(self, limits: OutboxLimits) -> _Outbox:
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = _Outbox(limits)
        elif outbox.limits is not limits:
            raise ValueError(f"{self!r} already belongs to {outbox.limits.owner!r}")
        return outbox

    def _offer(self, prepared: PreparedMessage, limits: OutboxLimits) -> Delivery:
        """Write ``prepared`` now, or queue it for the outbox writer; never wait.

        The non-waiting twin of :meth:`_send_frame`: the same order (whoever
        writes takes the outbox first, holding the send lock), the same
        framing rule (a compressed frame is framed when it is queued, the
        order it is written in). A full outbox takes nothing: DROPPED, and the
        sender's policy decides (see :meth:`_shed`).
        """
        proto = self._proto
        if proto.state is not _OPEN or self._transport_closed:
            return _CLOSED
        outbox = self._outbox
        if outbox is not None and outbox.closing:
            return _CLOSED
        try:
            if proto.shares_frames:
                # Encoded once for every connection that shares it.
                frame = prepared.frame
                rest = self._write_nowait(None, prepared.shared() if frame is None else frame)
            else:
                rest = self._write_nowait(proto.frame_message, prepared.message)
        except _TRANSPORT_ERRORS as exc:
            proto.send_failed(f"transport failed while broadcasting: {exc!r}")
            self._spawn(self._close_transport_shielded)
            return _CLOSED
        if rest is None:
            return _DELIVERED
        if isinstance(rest, tuple):
            frame, sent = rest
            outbox = self._outbox_for(limits)
            if sent:
                outbox.put((b"".join(frame) if isinstance(frame, list) else frame)[sent:])
                outbox.partial = True
            else:
                outbox.put(frame)
            return self._wake_writer(outbox)
        outbox = self._outbox_for(limits)
        if proto.shares_frames:
            shared: Frame | None = prepared.shared()
            estimate = prepared.size
        else:
            shared = None
            estimate = len(prepared.message)
        if outbox.frames and (
            outbox.count >= limits.max_messages or outbox.nbytes + estimate > limits.max_bytes
        ):
            return _DROPPED
        # A compression context advances only for a frame that will be sent.
        outbox.put(proto.frame_message(prepared.message) if shared is None else shared)
        return self._wake_writer(outbox)

    def _wake_writer(self, outbox: _Outbox) -> Delivery:
        lot = outbox.lot
        if lot is not None:
            lot.unpark()
            return _QUEUED
        if not self._spawn(self._outbox_writer, outbox, name="wsnursery outbox writer"):
            outbox.take()
            return _CLOSED
        outbox.lot = ParkingLot()  # the writer reads it when it first runs
        return _QUEUED

    async def _outbox_writer(self, outbox: _Outbox) -> None:
        """Write what the outbox holds whenever it holds something, until the connection ends."""
        lot = outbox.lot
        assert lot is not None
        try:
            while not self._transport_closed:
                if not outbox.frames:
                    await lot.park()
                    continue
                async with self._writing_lock():
                    if outbox.frames and not self._transport_closed:
                        await self._transmit(outbox.take())
        except ConnectionClosed:
            pass

    def _shed(self, code: int, reason: str) -> tuple[int, int]:
        """Close for a sender whose frames pile up: drop the queue, start closing.

        Keeps only a frame already partly written (the stream must stay in
        sync for the close frame). Returns the frames and bytes that were
        queued.
        """
        outbox = self._outbox
        assert outbox is not None
        outbox.closing = True
        queued = (outbox.count, outbox.nbytes)
        partial = outbox.partial
        frames = outbox.take()
        if partial:
            outbox.put(frames[0])
            outbox.partial = True
        self._spawn(self.aclose, code, reason)
        return queued

    def _spawn(
        self, async_fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None
    ) -> bool:
        """Start a task in this connection's nursery; False when it has none or it is closing."""
        nursery = self._nursery
        if nursery is None:
            return False
        try:
            nursery.start_soon(async_fn, *args, name=name)
        except RuntimeError:  # the connection's nursery is closing
            return False
        return True

    def _writing_lock(self) -> trio.StrictFIFOLock:
        """The lock held by whoever writes frames, made on first need."""
        lock = self._send_lock
        if lock is None:
            lock = self._send_lock = trio.StrictFIFOLock()
        return lock

    async def _finish_send(self, data: Frame, sent: int) -> None:
        """Write the rest of a frame the socket took only part of, holding the lock."""
        whole = b"".join(data) if isinstance(data, list) else data
        rest = memoryview(whole)[sent:] if sent else whole
        lock = self._writing_lock()
        lock.acquire_nowait()  # free: nothing was awaited since the check
        try:
            await self._transmit(rest, droppable=not sent and self._proto.frames_droppable)
        finally:
            lock.release()

    async def _transmit(self, data: Frame | memoryview, *, droppable: bool = False) -> None:
        """Write ``data`` whole; a cancelled write breaks the stream unless nothing went out.

        ``droppable``: ``data`` is one frame, none of it written yet, that may
        be left unsent (no compression context depends on it). Cancelled
        before the socket took any byte of it, the connection stays usable.
        """
        transport = self._transport
        progress = transport.progress
        try:
            await transport.send(data)
        except trio.Cancelled:
            if not self._transport_closed and not (
                droppable and transport.exact_progress and transport.progress == progress
            ):
                # A frame is framed and maybe partly written: the stream is unusable.
                self._proto.send_failed("send cancelled midway")
                await _shielded(self._close_transport())
            raise
        except _TRANSPORT_ERRORS as exc:
            await self._send_broke(exc)

    async def _send_broke(self, exc: BaseException) -> NoReturn:
        self._proto.send_failed(f"transport failed while sending: {exc!r}")
        await _shielded(self._close_transport())
        raise self._closed_error() from exc

    def _closed_error(self) -> ConnectionClosed:
        reason = (
            self._proto.closed
            or self._proto.close_sent
            or CloseReason(CloseCode.ABNORMAL_CLOSURE, "connection closed", initiated_by_peer=False)
        )
        return ConnectionClosed.for_reason(reason)

    # -- public API ----------------------------------------------------------

    async def send_message(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send a text (``str``) or binary (bytes-like) message.

        Waits only while the transport cannot take more data (backpressure).
        Frames from concurrent senders never interleave; they go out in the
        order the calls reached the send lock.

        Raises:
            ConnectionClosed: the connection is closing or closed.
            TypeError: ``message`` is neither str nor bytes-like.

        Cancellation:
            Cancelled before any byte went out, nothing is sent and the
            connection stays usable. Cancelled with part of the frame written,
            the connection is marked BROKEN and closed (close code 1006): a
            half-sent frame cannot be taken back. Two cases count as partly
            written: a stream other than a plain TCP socket (TLS), where what
            went out is unknown once a write waited, and permessage-deflate
            with context takeover on our side, where the framed message
            already advanced the compression context.
        """
        await checkpoint_if_cancelled()
        kind = type(message)
        if kind is not str and kind is not bytes and not isinstance(message, _MESSAGE_TYPES):
            raise TypeError(f"message must be str or bytes-like, not {kind.__name__}")
        proto = self._proto
        if proto.state is not _OPEN or self._transport_closed:
            raise self._closed_error()
        # _send_frame, inline: the common case costs no coroutine.
        try:
            rest = self._write_nowait(proto.frame_message, message)
        except _TRANSPORT_ERRORS as exc:
            await self._send_broke(exc)
        if rest is not None:
            await self._send_rest(rest, self._frame_message, message)
        self._calls_since_yield += 1
        if self._calls_since_yield >= _YIELD_EVERY:
            self._calls_since_yield = 0
            await cancel_shielded_checkpoint()

    def _frame_message(self, message: Message) -> Frame:
        if self._proto.state is not _OPEN:
            # The connection started closing while this send waited its turn.
            raise self._closed_error()
        return self._proto.frame_message(message)

    async def get_message(self) -> Message:
        """Return the next message: ``str`` for text, ``bytes`` for binary.

        Raises:
            ConnectionClosed: no message is left and the connection closed
                (:exc:`ConnectionClosedOK` after a normal close).

        Cancellation:
            Nothing is lost: a message is only removed from the queue when
            this call returns it.
        """
        if self._dispatch_task is not None:
            raise RuntimeError(
                "this connection delivers its messages to its handler's hooks; "
                "get_message is for handler functions and clients"
            )
        messages = self._proto.messages
        if messages:
            await checkpoint_if_cancelled()  # otherwise parking below is the checkpoint
        while not messages:
            if self._finished.is_set():
                raise self._closed_error()
            if self._proto.state is not _OPEN:
                # Closing: no message will come; wait for the final reason
                # (bounded by close_timeout in the reader).
                await self._finished.wait()
                continue
            await self._message_lot.park()
        message = messages.popleft()
        if self._pauses & 1 and len(messages) < self._max_queue:
            self._message_lot.unpark_all()
        self._calls_since_yield += 1
        if self._calls_since_yield >= _YIELD_EVERY:
            self._calls_since_yield = 0
            await cancel_shielded_checkpoint()
        return message

    def __aiter__(self) -> WebSocketConnection:
        return self

    async def __anext__(self) -> Message:
        """The next message; the iteration ends on a normal close (1000, 1001, 1005).

        Raises:
            ConnectionClosedError: the connection closed abnormally.

        Cancellation:
            As for :meth:`get_message`: nothing is lost.
        """
        try:
            return await self.get_message()
        except ConnectionClosed as exc:
            if exc.reason.ok:
                raise StopAsyncIteration from None
            raise

    async def ping(self, payload: bytes | None = None) -> None:
        """Send a ping and wait for the matching pong.

        Args:
            payload: At most 125 bytes; by default 4 random bytes. A payload
                already in flight raises ValueError.

        Raises:
            ConnectionClosed: the connection closed before the pong came.

        Cancellation:
            The ping stays sent; a later pong for it is ignored.
        """
        await checkpoint_if_cancelled()
        if payload is None:
            payload = os.urandom(4)
            while payload in self._pings:  # pragma: no cover - 1 in 2**32
                payload = os.urandom(4)
        elif payload in self._pings:
            raise ValueError(f"a ping with payload {payload!r} is already waiting")
        proto = self._proto
        if proto.state is not _OPEN or self._transport_closed:
            raise self._closed_error()
        payload = bytes(payload)
        event = self._pings[payload] = trio.Event()
        try:
            await self._send_frame(proto.send_ping, payload)
            await event.wait()
            if payload in self._pings:
                # Woken by the connection closing, not by a pong.
                raise self._closed_error()
        finally:
            self._pings.pop(payload, None)

    async def pong(self, payload: bytes = b"") -> None:
        """Send an unsolicited pong (a one-way heartbeat, RFC 6455 section 5.5.3).

        Raises:
            ConnectionClosed: the connection is closing or closed.

        Cancellation:
            As for :meth:`send_message`.
        """
        await checkpoint_if_cancelled()
        if self._proto.state is not _OPEN or self._transport_closed:
            raise self._closed_error()
        await self._send_frame(self._proto.send_pong, bytes(payload))

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection with ``code`` and ``reason``, and wait until it is.

        Sends a close frame, waits for the peer's (at most ``close_timeout``),
        then closes the transport. Safe to call any number of times and from
        several tasks; later calls wait for the first one to finish.

        Args:
            code: 1000 (normal), 1001 (going away), or an application code in
                3000-4999.
            reason: A short text (truncated to 123 bytes of UTF-8).

        Cancellation:
            The connection is still closed, at once and without waiting for
            the peer (trio's :class:`~trio.abc.AsyncResource` promise).
        """
        _check_close_code(code)
        if self._dispatch_task is not None and trio.lowlevel.current_task() is self._dispatch_task:
            # Called from a hook: this task reads, so it cannot wait here for the
            # answer. Send the close frame; the dispatch loop finishes the
            # handshake once the hook returns.
            await checkpoint()
            await self._start_close(code, reason)
            return
        try:
            if self._finished.is_set():
                await checkpoint()
                return
            out = self._proto.send_close(code, reason)
            # We want no more messages: read on past a full queue to the close frame.
            self._message_lot.unpark_all()
            # close_timeout bounds the whole handshake, writing our close frame
            # included: a peer that stopped reading must not hold us forever.
            with trio.move_on_after(_timeout(self._close_timeout)):
                if out:
                    try:
                        await self._write(out)
                    except ConnectionClosed:
                        pass
                await self._finished.wait()
        finally:
            if not self._finished.is_set():
                await _shielded(
                    self._close_transport("the peer did not finish the closing handshake in time")
                )

    async def wait_closed(self) -> CloseReason:
        """Wait until the connection is closed and return why.

        Cancellation:
            Only stops waiting; the connection is unaffected.
        """
        await self._finished.wait()
        reason = self._proto.closed
        assert reason is not None
        return reason


def _timeout(value: float | None) -> float:
    return math.inf if value is None else value


async def _shielded(awaitable: Any) -> None:
    with trio.CancelScope(shield=True):
        await awaitable


# RFC 6455 section 7.4.1 and the IANA registry: 1005, 1006 and 1015 never go
# in a close frame.
_SENDABLE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


def _check_close_code(code: int) -> None:
    if code in _SENDABLE_CODES or 3000 <= code <= 4999:
        return
    raise ValueError(f"{code} is not a close code an endpoint may send")
