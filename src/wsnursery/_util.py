"""Small helpers shared by the trio layers."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["LazyAddresses", "collapse_exception_groups", "graceful_scope", "stream_addresses"]


@contextmanager
def collapse_exception_groups() -> Iterator[None]:
    """Re-raise a group holding a single exception as that exception.

    wsnursery's background tasks never raise, so a nursery around a user's
    ``async with`` body can only fail with the body's own exception; trio wraps
    it in an ExceptionGroup all the same. This turns the group back into the one
    exception the user expects (nested single groups too). A group of several
    real exceptions is left as it is: hiding one would lose information. A
    group whose leaves are all one exception object (the same error raised to
    several waiting tasks) is that exception too.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, BaseExceptionGroup):
            leaves = exception_leaves(exc)
            if leaves and all(leaf is leaves[0] for leaf in leaves):
                exc = leaves[0]
        if exc is group:
            raise
        # Keep the inner traceback; hide the group as the context.
        raise exc from exc.__cause__


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


async def _forward_cancel(scope: trio.CancelScope) -> None:
    try:
        await trio.sleep_forever()
    finally:
        scope.cancel()


@asynccontextmanager
async def graceful_scope() -> AsyncIterator[trio.CancelScope]:
    """A shielded region whose body still hears the caller's cancellation.

    Yields a cancel scope, ``body``. Everything inside the ``async with`` is
    shielded from the caller's cancel scopes, so background tasks started in a
    nursery opened there keep running; when the caller is cancelled, ``body``
    is cancelled instead. Code placed in ``body`` (the user's block) stops as
    usual, while code after it (a closing handshake with its own time limit)
    still runs, and the caller's ``Cancelled`` comes out at the end.
    """
    async with trio.open_nursery() as watcher:
        body = trio.CancelScope()
        watcher.start_soon(_forward_cancel, body)
        try:
            with trio.CancelScope(shield=True):
                yield body
        finally:
            watcher.cancel_scope.cancel()
