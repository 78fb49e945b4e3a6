"""A Redis pub/sub backplane: broadcasts that reach every process and machine.

Theory of operation
-------------------
See ``docs/topics/scaling.rst`` for the pictures. In short:

* Each broadcaster that serves through a :class:`RedisBackplane` is a *node*.
  Its backplane task (in the server's nursery) holds one Redis client
  (``coredis``, on Trio through anyio) with two connections: a pub/sub
  connection subscribed to the node's channels, and one for ``PUBLISH``.
* Channels, under a namespace (``wsnursery`` by default): ``NS:all``,
  ``NS:node:<node_id>`` (``send_one`` to a connection of that node) and
  ``NS:group:<name>`` for each group with a member on this node, and only
  while it has one.
* A send is delivered locally by the broadcaster, then :meth:`publish`
  encodes it once (``encode_envelope`` of ``_backplane_envelope.py``, a
  compact binary form: never pickle) and queues it for the publisher task,
  which sends what has queued up as one command (an ``EVAL`` that publishes
  each message). Publishing
  never waits for Redis: with Redis down, or the queue full, the message is
  dropped for the other nodes and counted.
* The subscriber decodes each message once, skips its own, and calls
  :meth:`Broadcaster.deliver` once: each node frames a message once for its
  clients.
* Delivery to other nodes is at most once. When Redis goes away the node
  keeps serving its own clients, logs it, reconnects with backoff, subscribes
  again, and reports the outage as :class:`BackplaneEvent` objects.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint

from ._backplane_envelope import decode_envelope, encode_envelope, origin_of
from ._broadcast import Backplane, Broadcaster, Envelope
from ._sansio.backoff import Backoff
from ._sansio.exceptions import BackplaneError
from ._util import collapse_exception_groups, exception_leaves

if TYPE_CHECKING:
    import coredis

__all__ = [
    "BackplaneEvent",
    "RedisBackplane",
    "RedisBackplaneStats",
    "as_backplane",
]

logger = logging.getLogger("wsnursery.redis")

_INSTALL_HINT = "the Redis backplane needs coredis: pip install wsnursery[redis]"
_SCHEMES = ("redis", "rediss", "unix")


def _import_coredis() -> Any:
    try:
        import coredis
        import coredis.retry
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return coredis


# -- events and statistics --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackplaneEvent:
    """A change in a node's link to Redis, for an application that must resync.

    Attributes:
        kind: ``"disconnected"`` (Redis was lost; local delivery goes on,
            other nodes' messages are not received and this node's are dropped)
            or ``"reconnected"`` (subscribed again: messages flow both ways).
        node_id: The :attr:`Broadcaster.node_id` of the node.
        url: The Redis URL, without its password.
        error: For ``"disconnected"``: what went wrong.
        outage: For ``"reconnected"``: seconds since the link was lost.
        dropped: For ``"reconnected"``: messages this node could not publish
            during the outage. Messages other nodes sent meanwhile are lost too,
            and no node can count those: resync on this event.
    """

    kind: Literal["disconnected", "reconnected"]
    node_id: str
    url: str
    error: str = ""
    outage: float = 0.0
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class RedisBackplaneStats:
    """Counters of a :class:`RedisBackplane`, over every node it serves.

    Attributes:
        connected: True when every node it serves is connected to Redis.
        published: Messages handed to Redis.
        dropped: Messages not published: Redis was down, the publish queue was
            full, or a publish failed.
        received: Messages from other nodes delivered here.
        malformed: Messages on our channels that were not envelopes (ignored).
        pending: Messages waiting for the publisher now.
        subscriptions: Redis channels subscribed now.
        outages: Times a link to Redis was lost.
    """

    connected: bool
    published: int
    dropped: int
    received: int
    malformed: int
    pending: int
    subscriptions: int
    outages: int


# -- the backplane ----------------------------------------------------------------------


class _Link:
    """One node's state: what to subscribe, what to publish, and whether Redis is there."""

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.broadcaster = broadcaster
        self.node_id = broadcaster.node_id
        self.connected = False
        self.up = trio.Event()  # set while connected
        self.down_since: float | None = None
        self.dropped_since_down = 0
        self.last_error = ""
        # Publishing: channel and encoded envelope, in order.
        self.pending: deque[tuple[bytes, bytes]] = deque()
        self.pending_bytes = 0
        self.publisher_lot = ParkingLot()
        # Subscriptions: groups subscribed now, and desired changes not yet made.
        self.subscribed: set[str] = set()
        self.changes: dict[str, bool] = {}
        self.changed = trio.Event()
        self.synced = trio.Event()
        self.synced.set()
        # Counters.
        self.published = 0
        self.dropped = 0
        self.received = 0
        self.malformed = 0
        self.outages = 0


class RedisBackplane(Backplane):
    """Carries broadcasts between processes (and machines) through Redis pub/sub.

    Give it to each server, ``serve_websocket(..., backplane=RedisBackplane(url))``
    or simply ``backplane="redis://host:6379/0"``: ``send_all``, ``send_group`` and
    ``send_one`` then reach the connections of every server sharing the Redis
    and the ``namespace``. Connection IDs name their node, so ``send_one`` goes
    to that node's channel only. A node subscribes to a group's channel only
    while one of its own connections is in the group.

    Delivery to other nodes is **at most once**: while Redis is unreachable
    each node keeps serving its own clients, drops (and counts) what it would
    have published, reconnects with backoff (``reconnect_delay`` doubling up to
    ``max_reconnect_delay``, each wait up to 10 % shorter at random, the jitter
    of a :class:`Backoff`, so that the nodes that lost one Redis do not all
    come back at the same instant) and reports the outage as
    :class:`BackplaneEvent` objects, through ``on_event`` and :meth:`events`.
    Redis not reachable at start is an error (:exc:`BackplaneError`) after
    ``connect_timeout``.

    Needs the ``redis`` extra (``pip install wsnursery[redis]``, which
    installs coredis).

    Args:
        url: ``redis://[:password@]host[:port][/db]``, ``rediss://`` for TLS,
            or ``unix:///path/to/socket``.
        namespace: Prefix of every channel name, so that several applications
            can share one Redis.
        connect_timeout: Seconds to connect and subscribe, at start (an error
            after it) and at each reconnection attempt.
        reconnect_delay: Seconds before the first reconnection attempt (less
            its jitter).
        max_reconnect_delay: The most the delay grows to, doubling each time.
        max_pending_messages: Messages queued for the publisher at most;
            beyond it (Redis slower than the senders) messages are dropped.
        max_pending_bytes: Bytes queued for the publisher at most.
        max_batch: Messages sent to Redis in one command at most.
        max_batch_bytes: Bytes of messages in one command at most (a single
            larger message still goes, alone).
        publish_linger: Seconds the publisher waits after the first message
            of a batch, so that a burst of sends shares one round trip to Redis
            (0: send at once).
        health_check_interval: Seconds of silence on the pub/sub connection
            before it is checked with a ``PING``.
        command_timeout: Seconds to wait for Redis to answer a command (a
            ``PING`` or a batch of ``PUBLISH``); past it the link counts as lost.
        on_event: Called (synchronously, in the backplane task) with each
            :class:`BackplaneEvent`. It must not block.

    Raises:
        ImportError: coredis is not installed.
    """

    remote = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "wsnursery",
        connect_timeout: float = 5.0,
        reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 5.0,
        max_pending_messages: int = 10_000,
        max_pending_bytes: int = 16 * 2**20,
        max_batch: int = 512,
        max_batch_bytes: int = 2**20,
        publish_linger: float = 0.001,
        health_check_interval: float = 15.0,
        command_timeout: float = 10.0,
        on_event: Callable[[BackplaneEvent], None] | None = None,
    ) -> None:
        _import_coredis()
        if urlsplit(url).scheme not in _SCHEMES:
            raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, not {url!r}")
        if not namespace:
            raise ValueError("namespace must not be empty")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("reconnect_delay", reconnect_delay),
            ("max_reconnect_delay", max_reconnect_delay),
            ("health_check_interval", health_check_interval),
            ("command_timeout", command_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive")
        if min(max_pending_messages, max_pending_bytes, max_batch, max_batch_bytes) < 1:
            raise ValueError(
                "max_pending_messages, max_pending_bytes, max_batch and max_batch_bytes "
                "must be at least 1"
            )
        if not publish_linger >= 0:
            raise ValueError("publish_linger must be 0 or more")
        self.url = url
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max(max_reconnect_delay, reconnect_delay)
        self.max_pending_messages = max_pending_messages
        self.max_pending_bytes = max_pending_bytes
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.publish_linger = publish_linger
        self.health_check_interval = health_check_interval
        self.command_timeout = command_timeout
        self.on_event = on_event
        # Where the jitter of the reconnection waits comes from (random.random
        # when None); a test fixes it to know the waits.
        self._rng: Callable[[], float] | None = None
        self._prefix = namespace.encode("utf-8") + b":"
        self._all_channel = self._prefix + b"all"
        self._links: dict[str, _Link] = {}
        self._listeners: list[trio.MemorySendChannel[BackplaneEvent]] = []
        self._safe_url = _redact(url)

    def __repr__(self) -> str:
        return f"<RedisBackplane {self._safe_url} namespace={self.namespace!r}>"

    # -- channels ---------------------------------------------------------------------

    def _group_channel(self, group: str) -> bytes:
        return self._prefix + b"group:" + group.encode("utf-8")

    def _node_channel(self, node_id: str) -> bytes:
        return self._prefix + b"node:" + node_id.encode("ascii")

    def channel_for(self, envelope: Envelope) -> bytes:
        """The Redis channel ``envelope`` is published on."""
        if envelope.kind == "group":
            assert envelope.target is not None
            return self._group_channel(envelope.target)
        if envelope.kind == "one":
            assert envelope.target is not None
            node = Broadcaster.node_of(envelope.target)
            if node is not None:
                return self._node_channel(node)
        return self._all_channel  # "all", or an ID that names no node: every node looks

    # -- state and events ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True when every node served is connected to Redis (False before any)."""
        return bool(self._links) and all(link.connected for link in self._links.values())

    def stats(self) -> RedisBackplaneStats:
        """Counters now, summed over the nodes this backplane serves."""
        links = list(self._links.values())
        return RedisBackplaneStats(
            connected=self.connected,
            published=sum(link.published for link in links),
            dropped=sum(link.dropped for link in links),
            received=sum(link.received for link in links),
            malformed=sum(link.malformed for link in links),
            pending=sum(len(link.pending) for link in links),
            subscriptions=sum(len(link.subscribed) + 2 for link in links if link.connected),
            outages=sum(link.outages for link in links),
        )

    @contextmanager
    def events(self, max_buffer: int = 64) -> Iterator[trio.MemoryReceiveChannel[BackplaneEvent]]:
        """Receive :class:`BackplaneEvent` objects, from now until the block ends.

        ::

            with backplane.events() as events:
                async for event in events:
                    if event.kind == "reconnected":
                        await resync(event)

        Args:
            max_buffer: Events kept for a reader that lags; past it, new events
                are dropped for this reader (and logged).
        """
        send, receive = trio.open_memory_channel[BackplaneEvent](max_buffer)
        self._listeners.append(send)
        try:
            with receive:
                yield receive
        finally:
            self._listeners.remove(send)
            send.close()

    def _emit(self, event: BackplaneEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                logger.exception("on_event callback failed on %s", event)
        for send in list(self._listeners):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                logger.warning("an events() reader is not keeping up; dropped %s for it", event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def wait_synced(self, broadcaster: Broadcaster | None = None) -> None:
        """Wait until Redis subscriptions match the groups that have local members.

        Joining a group subscribes to its channel in the background; a message
        another node sends to the group before that is done does not arrive
        here. Await this after :meth:`Broadcaster.join` when it matters (say,
        before telling the client it joined). Returns at once when nothing is
        pending; while Redis is down, waits for the reconnection.

        Args:
            broadcaster: The node to wait for; None for every node served.

        Cancellation:
            Only stops waiting; the subscriptions are made all the same.
        """
        if broadcaster is None:
            links = list(self._links.values())
        else:
            link = self._links.get(broadcaster.node_id)
            links = [] if link is None else [link]
        for link in links:
            while not (link.connected and link.synced.is_set()):
                await (link.synced if link.connected else link.up).wait()
        await trio.lowlevel.checkpoint()

    # -- the Backplane interface ----------------------------------------------------------

    def group_joined(self, broadcaster: Broadcaster, group: str) -> None:
        link = self._links.get(broadcaster.node_id)
        if link is not None:
            self._want(link, group, True)

    def group_left(self, broadcaster: Broadcaster, group: str) -> None:
        link = self._links.get(broadcaster.node_id)
        if link is not None:
            self._want(link, group, False)

    def _want(self, link: _Link, group: str, subscribed: bool) -> None:
        # The latest wish for the group. The subscription loop compares it with
        # link.subscribed when it takes it, not now: a SUBSCRIBE or UNSUBSCRIBE
        # of this group may be in flight, and link.subscribed changes after it.
        link.changes[group] = subscribed
        if link.synced.is_set():
            link.synced = trio.Event()
        link.changed.set()

    async def publish(self, broadcaster: Broadcaster, envelope: Envelope) -> None:
        """Queue ``envelope`` for the other nodes and return without waiting for Redis.

        While Redis is unreachable, or when more than ``max_pending_messages``
        (or ``max_pending_bytes``) wait already, the message is dropped for the
        other nodes (counted in :meth:`stats` and in the next
        ``"reconnected"`` event).

        Cancellation:
            The message is queued (or dropped) first; a cancellation is raised
            after that.
        """
        link = self._links.get(broadcaster.node_id)
        if link is not None:
            self._queue(link, envelope)
        await cancel_shielded_checkpoint()

    def _queue(self, link: _Link, envelope: Envelope) -> None:
        """Queue ``envelope`` for the publisher, or count it dropped."""
        if not link.connected:
            link.dropped += 1
            link.dropped_since_down += 1
            return
        data = encode_envelope(envelope)
        if (
            len(link.pending) >= self.max_pending_messages
            or link.pending_bytes + len(data) > self.max_pending_bytes
        ):
            link.dropped += 1
            if link.dropped % 1000 == 1:
                logger.warning(
                    "node %s: Redis is slower than the senders; dropping publishes "
                    "(%d waiting, %d dropped in all)",
                    link.node_id,
                    len(link.pending),
                    link.dropped,
                )
            return
        link.pending.append((self.channel_for(envelope), data))
        link.pending_bytes += len(data)
        link.publisher_lot.unpark()

    async def serve(
        self,
        broadcaster: Broadcaster,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect ``broadcaster`` to Redis, report started, then keep it connected.

        Raises:
            BackplaneError: Redis could not be reached (connected to and
                subscribed to) within ``connect_timeout`` at start.

        Cancellation:
            Closes the Redis connections and returns.
        """
        node_id = broadcaster.node_id
        if node_id in self._links:
            raise RuntimeError(f"node {node_id} is already served by {self!r}")
        link = self._links[node_id] = _Link(broadcaster)
        try:
            await self._connect_first(link, task_status)
            await self._stay_connected(link)
        finally:
            del self._links[node_id]
            link.connected = False

    async def _connect_first(self, link: _Link, task_status: trio.TaskStatus[None]) -> None:
        """Connect within connect_timeout (retrying with backoff), or raise BackplaneError.

        Returns when the first session ended (the link was lost); reports
        started once it is up.
        """
        deadline = trio.current_time() + self.connect_timeout
        retry = 0
        while True:
            try:
                await _plain(self._session(link, deadline, task_status))
            except Exception as exc:
                if link.connected:  # it came up, then failed
                    self._lost(link, exc)
                    return
                now = trio.current_time()
                if now >= deadline:
                    raise BackplaneError(
                        f"could not connect to Redis at {self._safe_url} within "
                        f"{self.connect_timeout:g} s: {_describe(exc)}"
                    ) from exc
                logger.debug("node %s: Redis not reachable yet: %s", link.node_id, _describe(exc))
                retry += 1
                await trio.sleep(min(self._reconnect_wait(retry), deadline - now))
            else:  # pragma: no cover - a session ends only by raising
                return

    async def _stay_connected(self, link: _Link) -> None:
        """Reconnect after each loss, waiting :meth:`_reconnect_wait` before each attempt."""
        retry = 0
        while True:
            retry += 1
            delay = self._reconnect_wait(retry)
            logger.info("node %s: reconnecting to Redis in %.2g s", link.node_id, delay)
            await trio.sleep(delay)
            try:
                await _plain(self._session(link, trio.current_time() + self.connect_timeout))
            except Exception as exc:
                if link.connected:  # it came up, then failed: the next wait is the first again
                    self._lost(link, exc)
                    retry = 0
                else:
                    logger.debug("node %s: reconnection failed: %s", link.node_id, _describe(exc))

    def _reconnect_wait(self, retry: int) -> float:
        """The wait before attempt number ``retry`` (from 1) since Redis was lost.

        ``reconnect_delay`` doubling up to ``max_reconnect_delay``, less the
        jitter of a :class:`Backoff`. Its other rules do not apply: a backplane
        never gives up once it has started, and the count restarts at every
        connection that came up, however short.
        """
        backoff = Backoff(initial=self.reconnect_delay, max_delay=self.max_reconnect_delay)
        return backoff.delay(retry, self._rng)

    def _lost(self, link: _Link, exc: BaseException) -> None:
        """The link went down: count it, log it, tell the application."""
        link.connected = False
        link.up = trio.Event()
        link.outages += 1
        link.down_since = trio.current_time()
        link.dropped_since_down = 0
        link.last_error = _describe(exc)
        # What was queued will not be sent: at most once.
        if link.pending:
            link.dropped += len(link.pending)
            link.dropped_since_down += len(link.pending)
            link.pending.clear()
            link.pending_bytes = 0
        # Subscriptions are made again, all of them, on reconnection.
        link.changes.clear()
        link.subscribed.clear()
        if link.synced.is_set():
            link.synced = trio.Event()
        logger.warning(
            "node %s lost Redis at %s (%s): local delivery goes on; other nodes' messages "
            "are not received and ours are dropped until it is back",
            link.node_id,
            self._safe_url,
            link.last_error,
        )
        self._emit(BackplaneEvent("disconnected", link.node_id, self._safe_url, link.last_error))

    def _came_up(self, link: _Link) -> None:
        link.connected = True
        link.up.set()
        if link.down_since is None:
            logger.info("node %s connected to Redis at %s", link.node_id, self._safe_url)
            return
        outage = trio.current_time() - link.down_since
        dropped = link.dropped_since_down
        link.down_since = None
        link.dropped_since_down = 0
        logger.warning(
            "node %s reconnected to Redis after %.3f s; %d publishes were dropped meanwhile",
            link.node_id,
            outage,
            dropped,
        )
        self._emit(
            BackplaneEvent(
                "reconnected", link.node_id, self._safe_url, outage=outage, dropped=dropped
            )
        )

    # -- one connected session -----------------------------------------------------------

    async def _session(
        self,
        link: _Link,
        deadline: float,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect and subscribe by ``deadline``, report started, then run until the link fails.

        Ends only by raising. Commands after the start (``SUBSCRIBE``, the
        health check's ``PING``) wait up to ``command_timeout`` for an answer.
        """
        redis = _import_coredis()
        no_retry = redis.retry.NoRetryPolicy()
        client: coredis.Redis[bytes] = redis.Redis.from_url(
            self.url,
            decode_responses=False,
            connect_timeout=self.connect_timeout,
            stream_timeout=self.command_timeout,
            retry_policy=no_retry,
            verify_version=False,
        )
        with trio.CancelScope(deadline=deadline) as connecting:
            async with client:
                pubsub = client.pubsub(
                    ignore_subscribe_messages=True,
                    retry_policy=no_retry,
                    subscription_timeout=self.command_timeout,
                    max_idle_seconds=self.health_check_interval,
                )
                async with pubsub:
                    await client.ping()
                    groups = set(link.broadcaster.groups)
                    await pubsub.subscribe(
                        self._all_channel,
                        self._node_channel(link.node_id),
                        *(self._group_channel(g) for g in groups),
                    )
                    connecting.deadline = math.inf
                    # Groups joined or left since the snapshot are in link.changes:
                    # the subscription loop's work.
                    link.subscribed = groups
                    self._came_up(link)
                    task_status.started()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._receive_loop, link, pubsub)
                        nursery.start_soon(self._subscription_loop, link, pubsub)
                        nursery.start_soon(self._publish_loop, link, client)
        if connecting.cancelled_caught:
            raise TimeoutError("timed out connecting and subscribing")
        raise ConnectionError("the Redis client stopped")  # pragma: no cover

    async def _receive_loop(self, link: _Link, pubsub: Any) -> None:
        node = link.node_id.encode("ascii")
        deliver = link.broadcaster.deliver
        while True:
            message = await pubsub.get_message()
            if message is None or message["type"] != "message":
                continue
            data = message["data"]
            try:
                if origin_of(data) == node:
                    continue  # our own: delivered locally before it was published
                envelope = decode_envelope(data)
            except (ValueError, TypeError) as exc:
                link.malformed += 1
                if link.malformed % 1000 == 1:
                    logger.warning(
                        "node %s: ignoring a malformed message on %r: %s",
                        link.node_id,
                        message["channel"],
                        exc,
                    )
                continue
            link.received += 1
            deliver(envelope)

    async def _subscription_loop(self, link: _Link, pubsub: Any) -> None:
        while True:
            if not link.changes:
                link.synced.set()
                await link.changed.wait()
                link.changed = trio.Event()
                continue
            changes, link.changes = link.changes, {}
            join = [g for g, on in changes.items() if on and g not in link.subscribed]
            leave = [g for g, on in changes.items() if not on and g in link.subscribed]
            if join:
                await pubsub.subscribe(*(self._group_channel(g) for g in join))
                link.subscribed.update(join)
            if leave:
                await pubsub.unsubscribe(*(self._group_channel(g) for g in leave))
                link.subscribed.difference_update(leave)
            logger.debug(
                "node %s: subscribed to %d groups, left %d", link.node_id, len(join), len(leave)
            )

    async def _publish_loop(self, link: _Link, client: Any) -> None:
        """Send what is queued, a batch at a time, in order.

        A batch is one ``EVAL`` of a script that publishes each message: one
        command, so one round trip and one command's overhead in coredis, for
        up to ``max_batch`` messages. Waiting ``publish_linger`` before taking
        a batch lets a burst of sends share it. If Redis refuses the script
        (an ACL, scripting disabled), batches go as pipelined ``PUBLISH``es.
        """
        redis = _import_coredis()
        pending = link.pending
        use_script = True
        while True:
            if not pending:
                await link.publisher_lot.park()
                continue
            if self.publish_linger > 0 and len(pending) < self.max_batch:
                await trio.sleep(self.publish_linger)
            batch: list[bytes] = []
            size = 0
            while pending and len(batch) < 2 * self.max_batch and size < self.max_batch_bytes:
                channel, data = pending.popleft()
                batch += (channel, data)
                size += len(data)
            link.pending_bytes -= size
            n = len(batch) // 2
            try:
                with trio.fail_after(self.command_timeout):
                    if use_script:
                        try:
                            await client.eval(_PUBLISH_SCRIPT, keys=[], args=batch)
                        except redis.exceptions.ResponseError as exc:
                            logger.warning(
                                "node %s: Redis refused the publishing script (%s); "
                                "publishing with one PUBLISH per message instead",
                                link.node_id,
                                exc,
                            )
                            use_script = False
                    if not use_script:
                        async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
                            for i in range(0, len(batch), 2):
                                pipe.publish(batch[i], batch[i + 1])
            except BaseException:
                # Sent or not, we cannot know: at most once, so count them as dropped.
                link.dropped += n
                link.dropped_since_down += n
                raise
            link.published += n


# A batch in one command: ARGV is channel, message, channel, message, ...
_PUBLISH_SCRIPT = (
    b"for i = 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end return #ARGV / 2"
)


async def _plain(awaitable: Any) -> None:
    """Await, turning an exception group into one exception (Cancelled first).

    coredis runs on anyio task groups, which raise groups; a caller here wants
    one exception: the cancellation if there is one, else the first error
    (``collapse_exception_groups(cancelled_first=True)``: a link being torn
    down reports no I/O error).
    """
    with collapse_exception_groups(cancelled_first=True):
        await awaitable


def _describe(exc: BaseException) -> str:
    """One line: the error, and the root cause when it adds something."""
    leaves = exception_leaves(exc)
    exc = leaves[0] if leaves else exc
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text


def _redact(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def as_backplane(backplane: Backplane | str | None) -> Backplane | None:
    """What a server's ``backplane`` argument means: None, a Backplane, or a Redis URL.

    Raises:
        ImportError: a Redis URL, and coredis is not installed.
        ValueError: a string that is not a Redis URL.
        TypeError: anything else.
    """
    if backplane is None or isinstance(backplane, Backplane):
        return backplane
    if isinstance(backplane, str):
        if urlsplit(backplane).scheme in _SCHEMES:
            return RedisBackplane(backplane)
        raise ValueError(
            f"backplane must be a Backplane or a redis://, rediss:// or unix:// URL, "
            f"not {backplane!r}"
        )
    raise TypeError(f"backplane must be a Backplane, a Redis URL or None, not {backplane!r}")
