"""Small helpers shared by the trio layers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["collapse_exception_groups", "stream_addresses"]


@contextmanager
def collapse_exception_groups() -> Iterator[None]:
    """Re-raise a group holding a single exception as that exception.

    wsnursery's background tasks never raise, so a nursery around a user's
    ``async with`` body can only fail with the body's own exception; trio wraps
    it in an ExceptionGroup all the same. This turns the group back into the one
    exception the user expects (nested single groups too). A group of several
    real exceptions is left as it is: hiding one would lose information.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        # Keep the inner traceback; hide the group as the context.
        raise exc from exc.__cause__ if exc.__cause__ is not None else None


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
