"""Sending one message to many connections without waiting for any of them.

Theory of operation
-------------------
See ``docs/topics/broadcast.rst`` for the picture. In short:

* A send walks its recipients synchronously in the sender's task and offers
  each the message: ``conn._offer(prepared, limits)`` returns a
  :class:`~wsnursery._connection.Delivery`. The connection owns every byte it
  writes: it writes the frame at once with one non-blocking ``write`` when its
  outbox is empty and nobody holds its send lock, or queues what the socket
  does not take in its outbox, which its *outbox writer* (a task in the
  connection's nursery, started on first need) writes when the socket drains.
  Frames go out in the order they were framed; see ``_connection.py``.
* An outbox is bounded by the broadcaster's :class:`OutboxLimits`, in messages
  and in bytes. When a frame does not fit, the connection takes nothing
  (``DROPPED``) and the broadcaster's policy decides: ``"drop"`` skips this
  message for this client, ``"close"`` has the connection discard its queue
  and close (1008 by default). The sender never waits.
* The broadcaster keeps its own membership (connections, groups) and learns
  that a connection closed from the ``on_closed`` callback of its limits,
  which the connection calls once. It reads no connection's private state.
* A server frame is unmasked: one encoding (a :class:`PreparedMessage`) serves
  every connection without a compression context. A compressed connection
  gets its own frame, framed when it is queued, which is the order it is
  written in.
* Every send also hands an :class:`Envelope` to the :class:`Backplane`, which
  carries it to broadcasters elsewhere (another server in this process with
  :class:`MemoryBackplane`; other processes with a Redis backplane).
"""

from __future__ import annotations

import abc
import logging
import secrets
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import trio
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled

from ._connection import (
    Delivery,
    OutboxLimits,
    PreparedMessage,
    WebSocketConnection,
)
from ._sansio.exceptions import CloseCode
from ._sansio.protocol import Message
from ._util import collapse_exception_groups

__all__ = [
    "Backplane",
    "BroadcastReport",
    "BroadcastStats",
    "Broadcaster",
    "Envelope",
    "MemoryBackplane",
    "OverflowPolicy",
]

logger = logging.getLogger("wsnursery.broadcast")

OverflowPolicy = Literal["drop", "close"]
_DELIVERED = Delivery.DELIVERED
_QUEUED = Delivery.QUEUED
_DROPPED = Delivery.DROPPED


@dataclass(frozen=True, slots=True)
class BroadcastReport:
    """What one send did, counted over the local recipients.

    Attributes:
        recipients: Connections the message was addressed to in this process.
        delivered: Of those, how many took it: written to the socket, or
            queued in the connection's outbox to be written in order.
        dropped: Not sent to a client whose outbox was full (policy ``"drop"``).
        closed: Not sent because the connection was closing or closed, or
            because its full outbox made the policy close it (``"close"``).
        published: True when the message was also handed to a backplane that
            reaches other processes (it may deliver to more connections there).
    """

    recipients: int = 0
    delivered: int = 0
    dropped: int = 0
    closed: int = 0
    published: bool = False


@dataclass(frozen=True, slots=True)
class BroadcastStats:
    """A snapshot of a :class:`Broadcaster`'s state and its counters since it was made.

    Attributes:
        connections: Connections it can send to.
        groups: Groups with at least one member.
        queued_messages: Frames waiting in outboxes, over all connections.
        queued_bytes: Their size in bytes.
        delivered: Messages written or queued, over all sends.
        dropped: Messages skipped for a client whose outbox was full.
        closed: Messages not sent because the connection was closing or closed
            (or was closed by the ``"close"`` policy).
        overflow_closes: Connections the ``"close"`` policy closed.
    """

    connections: int
    groups: int
    queued_messages: int
    queued_bytes: int
    delivered: int
    dropped: int
    closed: int
    overflow_closes: int


@dataclass(frozen=True, slots=True)
class Envelope:
    """One send, as a backplane carries it to other broadcasters.

    Attributes:
        kind: ``"all"``, ``"group"`` or ``"one"``.
        message: The message: ``str`` (text) or ``bytes`` (binary).
        target: The group name (``"group"``), the connection ID (``"one"``),
            or None (``"all"``).
        exclude: IDs of connections that must not receive it.
        origin: The :attr:`Broadcaster.node_id` that sent it.
    """

    kind: Literal["all", "group", "one"]
    message: str | bytes
    target: str | None = None
    exclude: frozenset[str] = frozenset()
    origin: str = ""


class Backplane(abc.ABC):
    """Carries sends between broadcasters: the seam for scaling out.

    A broadcaster delivers every send to its own connections itself, then calls
    :meth:`publish` so the backplane can deliver it to other broadcasters, which
    receive it through :meth:`Broadcaster.deliver`. :class:`MemoryBackplane`
    connects broadcasters in one process; a Redis backplane connects processes.
    """

    #: True when publishing may reach another process (reported in
    #: :attr:`BroadcastReport.published`).
    remote: bool = False

    @abc.abstractmethod
    async def serve(
        self,
        broadcaster: Broadcaster,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect ``broadcaster``, call ``task_status.started()``, then run until cancelled.

        Envelopes from other broadcasters are given to
        ``broadcaster.deliver(envelope)``. Leaving (cancelled) disconnects it.
        """

    @abc.abstractmethod
    async def publish(self, broadcaster: Broadcaster, envelope: Envelope) -> None:
        """Carry ``envelope`` from ``broadcaster`` to the others."""

    def group_joined(self, broadcaster: Broadcaster, group: str) -> None:  # noqa: B027
        """Called when ``group`` gets its first local member on ``broadcaster``."""

    def group_left(self, broadcaster: Broadcaster, group: str) -> None:  # noqa: B027
        """Called when the last local member of ``group`` on ``broadcaster`` leaves."""


class MemoryBackplane(Backplane):
    """Connects the broadcasters of one process (several servers, say).

    Give the same instance to each server (``serve_websocket(...,
    backplane=hub)``): a send on one reaches the connections of all of them,
    and ``send_one`` finds a connection whichever server holds it. Delivery is
    synchronous, so it is as reliable as a local send.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, Broadcaster] = {}

    async def serve(
        self,
        broadcaster: Broadcaster,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._nodes[broadcaster.node_id] = broadcaster
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._nodes.pop(broadcaster.node_id, None)

    async def publish(self, broadcaster: Broadcaster, envelope: Envelope) -> None:
        """Deliver ``envelope`` to the other broadcasters now, then yield.

        Cancellation:
            Delivery is synchronous; a cancellation is raised after it.
        """
        # send_one to an ID that names its node goes to that node only.
        only = None
        if envelope.kind == "one" and envelope.target is not None:
            only = Broadcaster.node_of(envelope.target)
        for node_id, node in list(self._nodes.items()):
            if node_id != envelope.origin and only in (node_id, None):
                node.deliver(envelope)
        await cancel_shielded_checkpoint()


class Broadcaster:
    """Sends messages to connections by ID, to all, and to groups, without waiting.

    Every :class:`WebSocketServer` owns one, :attr:`WebSocketServer.broadcaster`
    (from a connection: ``conn.server.broadcaster``), which sends to the
    server's connections. On its own, ``async with Broadcaster() as b`` then
    :meth:`add` connections to it.

    No send ever waits for a client. A frame the socket cannot take at once is
    queued in that connection's outbox and written by a task in the
    connection's nursery; when the outbox is full, ``on_overflow`` decides
    (see ``docs/topics/broadcast.rst``).

    Args:
        backplane: Carries sends to other broadcasters (other servers or
            processes). None: this broadcaster only.
        max_outbox_messages: Frames a connection's outbox holds at most.
        max_outbox_bytes: Bytes a connection's outbox holds at most. An empty
            outbox always takes one frame, however large.
        on_overflow: ``"drop"`` (skip the message for that client, counted) or
            ``"close"`` (discard the client's queue and close it).
        overflow_close_code: The close code ``"close"`` uses: 1008 (policy
            violation) by default, or 1013 (try again later).
        overflow_close_reason: The close reason it sends.

    Attributes:
        node_id (str): Names this broadcaster among those sharing a backplane.
        backplane (Backplane | None): The backplane it publishes to.
    """

    def __init__(
        self,
        *,
        backplane: Backplane | None = None,
        max_outbox_messages: int = 1024,
        max_outbox_bytes: int = 2**20,
        on_overflow: OverflowPolicy = "drop",
        overflow_close_code: int = CloseCode.POLICY_VIOLATION,
        overflow_close_reason: str = "too slow",
    ) -> None:
        if max_outbox_messages < 1:
            raise ValueError("max_outbox_messages must be at least 1")
        if max_outbox_bytes < 1:
            raise ValueError("max_outbox_bytes must be at least 1")
        if on_overflow not in ("drop", "close"):
            raise ValueError(f"on_overflow must be 'drop' or 'close', not {on_overflow!r}")
        self.backplane = backplane
        # The outbox bounds and the queued totals, shared with every connection
        # that queues for this broadcaster (see WebSocketConnection._offer).
        self._limits = OutboxLimits(
            max_outbox_messages, max_outbox_bytes, self._connection_closed, self
        )
        self.on_overflow: OverflowPolicy = on_overflow
        self.overflow_close_code = int(overflow_close_code)
        self.overflow_close_reason = overflow_close_reason
        self.node_id = secrets.token_hex(6)
        self._connections: dict[str, WebSocketConnection] = {}
        self._groups: dict[str, dict[str, WebSocketConnection]] = {}
        # The groups each connection is in (only connections in some group).
        self._memberships: dict[WebSocketConnection, set[str]] = {}
        self._cm: AbstractAsyncContextManager[Broadcaster] | None = None
        self._delivered = 0
        self._dropped = 0
        self._closed = 0
        self._overflow_closes = 0
        self._standalone = True

    def __repr__(self) -> str:
        return (
            f"<Broadcaster {self.node_id} connections={len(self._connections)} "
            f"groups={len(self._groups)}>"
        )

    @property
    def max_outbox_messages(self) -> int:
        """Frames a connection's outbox holds at most."""
        return self._limits.max_messages

    @max_outbox_messages.setter
    def max_outbox_messages(self, value: int) -> None:
        self._limits.max_messages = value

    @property
    def max_outbox_bytes(self) -> int:
        """Bytes a connection's outbox holds at most."""
        return self._limits.max_bytes

    @max_outbox_bytes.setter
    def max_outbox_bytes(self, value: int) -> None:
        self._limits.max_bytes = value

    @staticmethod
    def node_of(connection_id: str) -> str | None:
        """The :attr:`node_id` that holds a connection, read from its ID.

        With a backplane, a server's connection IDs are ``"<node_id>-<n>"``;
        without one they name no node (None).
        """
        node, sep, _ = connection_id.rpartition("-")
        return node if sep else None

    # -- lifetime -------------------------------------------------------------

    def _bind(self, connections: dict[str, WebSocketConnection]) -> None:
        """Send to a server's registry (the server adds and removes connections)."""
        self._connections = connections
        self._standalone = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the backplane connection, if any, until cancelled (the server does this).

        Works with ``nursery.start``: started once the backplane is connected.

        Raises:
            BackplaneError: the backplane could not start (see its ``serve``).

        Cancellation:
            Cancelled at any time, including while the backplane is still
            connecting: the attempt is abandoned, nothing is left running and
            only the :exc:`trio.Cancelled` comes out.
        """
        if self.backplane is None:
            task_status.started()
            await trio.sleep_forever()
        else:
            await self.backplane.serve(self, task_status=task_status)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[Broadcaster]:
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                await nursery.start(self.serve)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()

    async def __aenter__(self) -> Broadcaster:
        """Start the backplane connection (if any) for a broadcaster used on its own.

        Cancellation:
            Cancelled while connecting to the backplane: nothing is left running.
        """
        self._cm = self._running()
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._cm is not None
        cm, self._cm = self._cm, None
        return await cm.__aexit__(exc_type, exc, tb)

    # -- membership -------------------------------------------------------------

    def add(self, conn: WebSocketConnection) -> None:
        """Make ``conn`` a recipient of :meth:`send_all` (a standalone broadcaster).

        A server's broadcaster already has every connection of the server. A
        connection leaves by itself when it ends.
        """
        conn._attach(self._limits)
        self._connections[conn.id] = conn

    def discard(self, conn: WebSocketConnection) -> None:
        """Remove ``conn`` from this broadcaster and all its groups (no error if absent)."""
        self._connection_closed(conn)

    def join(self, conn: WebSocketConnection, group: str) -> None:
        """Add ``conn`` to ``group`` (made on first member). Joining twice is harmless.

        Raises:
            ConnectionClosed: ``conn`` is closing or closed.
        """
        conn._attach(self._limits)
        members = self._groups.get(group)
        if members is None:
            members = self._groups[group] = {}
            if self.backplane is not None:
                self.backplane.group_joined(self, group)
        members[conn.id] = conn
        joined = self._memberships.get(conn)
        if joined is None:
            joined = self._memberships[conn] = set()
        joined.add(group)

    def leave(self, conn: WebSocketConnection, group: str) -> None:
        """Remove ``conn`` from ``group`` (no error if it was not a member)."""
        joined = self._memberships.get(conn)
        if joined is not None:
            joined.discard(group)
            if not joined:
                del self._memberships[conn]
        self._remove_member(conn.id, group)

    def members(self, group: str) -> list[WebSocketConnection]:
        """The connections in ``group`` here, in the order they joined (a snapshot)."""
        return list(self._groups.get(group, {}).values())

    def groups_of(self, conn: WebSocketConnection) -> frozenset[str]:
        """The groups ``conn`` is in."""
        return frozenset(self._memberships.get(conn, ()))

    @property
    def groups(self) -> Mapping[str, int]:
        """Each group with members here, and its member count (a snapshot)."""
        return {name: len(members) for name, members in self._groups.items()}

    @property
    def connections(self) -> Collection[WebSocketConnection]:
        """The connections :meth:`send_all` reaches here (a snapshot)."""
        return list(self._connections.values())

    def _remove_member(self, conn_id: str, group: str) -> None:
        members = self._groups.get(group)
        if members is not None and members.pop(conn_id, None) is not None and not members:
            del self._groups[group]
            if self.backplane is not None:
                self.backplane.group_left(self, group)

    def _connection_closed(self, conn: WebSocketConnection) -> None:
        """Forget ``conn`` everywhere: it closed (the connection calls this), or was discarded."""
        for group in self._memberships.pop(conn, ()):
            self._remove_member(conn.id, group)
        if self._standalone and self._connections.get(conn.id) is conn:
            del self._connections[conn.id]

    # -- sending ----------------------------------------------------------------

    async def send_all(
        self,
        message: Message | bytearray | memoryview,
        *,
        exclude: Iterable[WebSocketConnection | str] = (),
    ) -> BroadcastReport:
        """Send ``message`` to every connection (text for ``str``, binary otherwise).

        Never waits for a client (see the class). Returns what it did.

        Cancellation:
            Checked before anything is sent: cancelled then, nothing is sent.
            Local delivery never blocks, so once it starts every local
            recipient gets the frame; a cancellation is then raised at the
            final schedule point, or while publishing to the backplane (other
            processes may then not receive it).
        """
        return await self._send(
            Envelope("all", _message(message), None, _ids(exclude), self.node_id)
        )

    async def send_group(
        self,
        group: str,
        message: Message | bytearray | memoryview,
        *,
        exclude: Iterable[WebSocketConnection | str] = (),
    ) -> BroadcastReport:
        """Send ``message`` to every member of ``group``. Never waits for a client.

        Cancellation:
            As for :meth:`send_all`.
        """
        return await self._send(
            Envelope("group", _message(message), group, _ids(exclude), self.node_id)
        )

    async def send_one(
        self,
        connection: WebSocketConnection | str,
        message: Message | bytearray | memoryview,
    ) -> BroadcastReport:
        """Send ``message`` to one connection, given as itself or by its ID.

        Queues behind the broadcasts already waiting for that client and obeys
        the same limits and policy. An ID not held here is handed to the
        backplane (its report then says ``recipients=0, published=True``).

        Cancellation:
            As for :meth:`send_all`.
        """
        conn_id = connection if isinstance(connection, str) else connection.id
        return await self._send(Envelope("one", _message(message), conn_id, origin=self.node_id))

    async def _send(self, envelope: Envelope) -> BroadcastReport:
        await checkpoint_if_cancelled()
        report = self.deliver(envelope)
        backplane = self.backplane
        if backplane is None or (envelope.kind == "one" and report.recipients):
            await cancel_shielded_checkpoint()
            return report
        await backplane.publish(self, envelope)
        return _published(report) if backplane.remote else report

    def deliver(self, envelope: Envelope) -> BroadcastReport:
        """Deliver ``envelope`` to this broadcaster's own connections, now.

        What a backplane calls for envelopes from elsewhere. Synchronous: it
        writes what sockets take and queues the rest.
        """
        if envelope.kind == "all":
            targets: Iterable[WebSocketConnection] = list(self._connections.values())
        elif envelope.kind == "group":
            assert envelope.target is not None
            targets = list(self._groups.get(envelope.target, {}).values())
        else:
            assert envelope.target is not None
            one = self._connections.get(envelope.target)
            targets = () if one is None else (one,)
        exclude = envelope.exclude
        prepared = PreparedMessage(envelope.message)
        limits = self._limits
        recipients = delivered = dropped = closed = 0
        for conn in targets:
            if exclude and conn.id in exclude:
                continue
            recipients += 1
            outcome = conn._offer(prepared, limits)
            if outcome is _DELIVERED or outcome is _QUEUED:
                delivered += 1
            elif outcome is _DROPPED and self.on_overflow == "drop":
                dropped += 1
            else:
                if outcome is _DROPPED:
                    self._overflow(conn)
                closed += 1
        self._delivered += delivered
        self._dropped += dropped
        self._closed += closed
        return BroadcastReport(recipients, delivered, dropped, closed)

    def _overflow(self, conn: WebSocketConnection) -> None:
        # "close": what is queued will never be read in time.
        self._overflow_closes += 1
        frames, nbytes = conn._shed(self.overflow_close_code, self.overflow_close_reason)
        logger.info("closing %s: its outbox is full (%d frames, %d bytes)", conn, frames, nbytes)

    # -- statistics ---------------------------------------------------------------

    def stats(self) -> BroadcastStats:
        """Counts now, and since this broadcaster was made."""
        return BroadcastStats(
            connections=len(self._connections),
            groups=len(self._groups),
            queued_messages=self._limits.queued_messages,
            queued_bytes=self._limits.queued_bytes,
            delivered=self._delivered,
            dropped=self._dropped,
            closed=self._closed,
            overflow_closes=self._overflow_closes,
        )


def _message(message: Message | bytearray | memoryview) -> Message:
    if isinstance(message, str | bytes):
        return message
    if isinstance(message, bytearray | memoryview):
        return bytes(message)
    raise TypeError(f"message must be str or bytes-like, not {type(message).__name__}")


def _ids(exclude: Iterable[WebSocketConnection | str]) -> frozenset[str]:
    return frozenset(c if isinstance(c, str) else c.id for c in exclude)


def _published(report: BroadcastReport) -> BroadcastReport:
    return BroadcastReport(report.recipients, report.delivered, report.dropped, report.closed, True)
