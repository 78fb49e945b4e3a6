"""Moving bytes for a connection: any trio stream, and a fast path for plain TCP sockets.

The connection (``_connection.py``) reads and writes only through a
:class:`Transport`. :class:`SocketTransport`, used for a plain
:class:`trio.SocketStream`, makes non-blocking system calls on the socket's file
descriptor and reads into one buffer shared by every connection in the process;
any other stream (TLS, memory streams) goes through trio's own API.
"""

from __future__ import annotations

import os

import trio
from trio.lowlevel import wait_readable, wait_writable

from ._sansio.protocol import Frame

__all__ = ["READ_SIZE", "SocketTransport", "Transport", "make_transport"]

# Large enough that a 64 KiB message and its header arrive in one read.
READ_SIZE = 262144
# One receive buffer shared by every connection in the process: each read into
# it is followed by Protocol.receive_data (which copies) with no await between.
_SHARED_BUFFER = bytearray(READ_SIZE)
_SHARED_VIEW = memoryview(_SHARED_BUFFER)
_SHARED_BUFFERS = [_SHARED_BUFFER]


class Transport:
    """Moves bytes for a connection over any :class:`trio.abc.Stream`."""

    __slots__ = ("progress", "stream")

    #: True when :attr:`progress` counts every write that moved bytes, so that
    #: an unchanged count proves nothing of a frame went out.
    exact_progress = False

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        #: Counts the waiting writes that made progress (see ``send``): the
        #: keep-alive tells a stuck peer from a slow one by it.
        self.progress = 0

    async def receive(self) -> bytes | bytearray | memoryview:
        return await self.stream.receive_some(READ_SIZE)

    async def send(self, data: Frame | memoryview) -> None:
        await self.stream.send_all(b"".join(data) if isinstance(data, list) else data)
        self.progress += 1

    def try_send(self, data: Frame) -> int:
        """Write what fits without blocking; the generic path writes nothing."""
        return 0

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


class SocketTransport(Transport):
    """The fast path for :class:`trio.SocketStream`: non-blocking syscalls.

    Reads and writes are plain ``readv``/``write``/``writev`` calls on the
    socket's file descriptor, which trio keeps owning (and closing). Waiting
    uses ``wait_readable``/``wait_writable``, which closing the socket
    interrupts with ``ClosedResourceError``. A frame given as header and
    payload goes out with one ``writev``, so a large payload is never copied
    to be joined to its header.
    """

    __slots__ = ("fd",)

    exact_progress = True

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self.fd = stream.socket.fileno()

    async def receive(self) -> bytes | bytearray | memoryview:
        data = self.receive_nowait()
        while data is None:
            await wait_readable(self.fd)
            data = self.receive_nowait()
        return data

    def receive_nowait(self) -> memoryview | None:
        """What the socket holds (in the shared buffer: use it before any await), or None."""
        fd = self.fd
        if fd < 0:
            raise trio.ClosedResourceError("connection closed")
        try:
            n = os.readv(fd, _SHARED_BUFFERS)
        except BlockingIOError:
            return None
        return _SHARED_VIEW[:n]

    def try_send(self, data: Frame) -> int:
        fd = self.fd
        if fd < 0:
            raise trio.ClosedResourceError("connection closed")
        try:
            if isinstance(data, list):
                return os.writev(fd, data)
            return os.write(fd, data)
        except BlockingIOError:
            return 0

    async def send(self, data: Frame | memoryview) -> None:
        view = memoryview(b"".join(data) if isinstance(data, list) else data)
        while view:
            if self.fd < 0:
                raise trio.ClosedResourceError("connection closed")
            await wait_writable(self.fd)
            n = self.try_send(view)  # type: ignore[arg-type]
            if n:
                self.progress += 1
                view = view[n:]

    async def close(self) -> None:
        # SocketStream.aclose is socket.close() plus a checkpoint: skip the checkpoint.
        self.fd = -1
        self.stream.socket.close()  # type: ignore[attr-defined]


def make_transport(stream: trio.abc.Stream) -> Transport:
    if type(stream) is trio.SocketStream and isinstance(stream.socket, trio.socket.SocketType):
        return SocketTransport(stream)
    return Transport(stream)
