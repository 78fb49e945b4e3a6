"""Small helpers shared by the trio layers."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any, NoReturn

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "BlockScope",
    "LazyAddresses",
    "collapse_exception_groups",
    "collapsed",
    "exception_leaves",
    "graceful_scope",
    "reraise",
    "stream_addresses",
]


@contextmanager
def collapse_exception_groups(*, cancelled_first: bool = False) -> Iterator[None]:
    """Re-raise an exception group as the one exception it stands for.

    wsnursery's background tasks never raise, so a nursery around a user's
    ``async with`` body can only fail with the body's own exception (and the
    :exc:`trio.Cancelled` of a cancellation under way); trio wraps them in
    groups all the same. The rules, applied to the group's leaves (nested
    groups are walked):

    1. A group of one leaf (at any depth) is that leaf.
    2. Leaves that are all one exception object (one error raised to several
       waiting tasks) are that exception.
    3. Real errors and :exc:`trio.Cancelled`: the Cancelled leaves are dropped
       and rules 1-2 apply to the rest, so the user's exception comes out as
       itself. Dropping them loses nothing: the scope being cancelled is still
       cancelled, and the caller's next checkpoint raises Cancelled again.
    4. Only Cancelled leaves: the first of them, so the cancelled scope catches
       it as usual.
    5. Several distinct real errors: the group is left as it is (hiding one
       would lose information).

    With ``cancelled_first`` (for background connections being torn down,
    such as the Redis client's), any Cancelled leaf wins over the errors, and
    otherwise the first leaf comes out.

    The exception raised is the leaf object itself, untouched: its
    ``__context__``, ``__cause__``, ``__suppress_context__`` and the frames of
    its traceback are those it had inside the group (re-raising appends only
    the frames it passes on the way out).
    """
    try:
        yield
    except BaseExceptionGroup as group:
        exc = collapsed(group, cancelled_first=cancelled_first)
        if exc is group:
            raise
        reraise(exc)


def collapsed(group: BaseException, *, cancelled_first: bool = False) -> BaseException:
    """The exception :func:`collapse_exception_groups` raises for ``group`` (maybe ``group``)."""
    if not isinstance(group, BaseExceptionGroup):
        return group
    leaves = exception_leaves(group)
    cancelled = [leaf for leaf in leaves if isinstance(leaf, trio.Cancelled)]
    errors = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if cancelled_first:
        return (cancelled or leaves or [group])[0]
    if not errors:
        return cancelled[0] if cancelled else group
    if all(leaf is errors[0] for leaf in errors):
        return errors[0]
    return group


def reraise(exc: BaseException) -> NoReturn:
    """``raise exc`` from inside an ``except`` block, keeping its context and cause.

    Python sets ``__context__`` at ``raise`` time to the exception being
    handled (the group), which would add a misleading "During handling of the
    above exception" and lose the real context: put the originals back.
    """
    context, cause, suppress = exc.__context__, exc.__cause__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__context__, exc.__cause__ = context, cause
        exc.__suppress_context__ = suppress
        del exc, context, cause


def exception_leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` and its nested groups, in order (``[exc]`` if not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in exception_leaves(inner)]
    return [exc]


class LazyAddresses:
    """``local`` and ``remote`` socket addresses, looked up on first use.

    For classes with a ``_stream`` and an ``_addresses`` slot: most handlers
    never ask, and the lookup is two system calls per connection.
    """

    __slots__ = ()
    _stream: trio.abc.Stream
    _addresses: tuple[Any, Any] | None

    @property
    def local(self) -> Any:
        """This side's socket address (``(host, port)`` for TCP), or None."""
        if self._addresses is None:
            self._addresses = stream_addresses(self._stream)  # type: ignore[misc]
        return self._addresses[0]

    @property
    def remote(self) -> Any:
        """The peer's socket address, or None for a stream without one."""
        if self._addresses is None:
            self._addresses = stream_addresses(self._stream)  # type: ignore[misc]
        return self._addresses[1]


def stream_addresses(stream: trio.abc.Stream) -> tuple[Any, Any]:
    """``(local, remote)`` socket addresses under any TLS layers; Nones if none."""
    inner: Any = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    if sock is None:
        return None, None
    try:
        return sock.getsockname(), sock.getpeername()
    except OSError:
        return None, None


class BlockScope:
    """The cancel scope of a user's block inside :func:`graceful_scope`.

    A :class:`trio.CancelScope` (entered with ``with``, cancelled with
    :meth:`cancel`, read with :attr:`cancelled_caught`) that also knows
    whether it has been entered yet, which trio has no public way to ask.
    """

    __slots__ = ("_scope", "entered")

    def __init__(self, deadline: float) -> None:
        self._scope = trio.CancelScope(deadline=deadline)
        self.entered = False

    def __enter__(self) -> trio.CancelScope:
        self.entered = True
        return self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self._scope.__exit__(exc_type, exc, tb)

    def cancel(self) -> None:
        self._scope.cancel()

    @property
    def cancelled_caught(self) -> bool:
        return self._scope.cancelled_caught


async def _forward_cancel(body: BlockScope, region: trio.CancelScope) -> None:
    try:
        await trio.sleep_forever()
    finally:
        body.cancel()
        if not body.entered:
            # Still setting up (a server connecting its backplane): nothing to
            # close gracefully yet, so let the caller's cancellation in at once.
            region.shield = False


@asynccontextmanager
async def graceful_scope() -> AsyncIterator[BlockScope]:
    """A shielded region whose body still hears the caller's cancellation.

    Yields a cancel scope, ``body`` (a :class:`BlockScope`). Everything inside the ``async with`` is
    shielded from the caller's cancel scopes, so background tasks started in a
    nursery opened there keep running; when the caller is cancelled, ``body``
    is cancelled instead. Code placed in ``body`` (the user's block) stops as
    usual, while code after it (a closing handshake with its own time limit)
    still runs, and the caller's ``Cancelled`` comes out at the end.

    ``body`` has the caller's effective deadline at entry, so
    :func:`trio.current_effective_deadline` inside it is the caller's, and
    the body is cancelled when that deadline passes, like the caller.

    A cancellation that comes before ``body`` was entered (while the region
    is still setting up, e.g. connecting a backplane) lifts the shield: the
    setup is cancelled at once and the caller's ``Cancelled`` propagates as
    usual.
    """
    async with trio.open_nursery() as watcher:
        body = BlockScope(trio.current_effective_deadline())
        region = trio.CancelScope(shield=True)
        watcher.start_soon(_forward_cancel, body, region)
        try:
            with region:
                yield body
        finally:
            watcher.cancel_scope.cancel()
