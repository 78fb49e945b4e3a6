"""Shared helpers for the tests that speak raw bytes or count tasks.

Imported as ``from _helpers import ...``: pytest puts ``tests/`` on ``sys.path``
(the directory has no ``__init__.py``).
"""

from __future__ import annotations

import base64
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


# -- subprocesses ---------------------------------------------------------------------


def checkout_env() -> dict[str, str]:
    """The environment for a child Python: this checkout's package first, unbuffered."""
    env = dict(os.environ)
    paths = [str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def start_cli(*args: str) -> tuple[trio.Process, bytes]:
    """Start ``python -m wsnursery ARGS``; return it and its first line of output.

    The caller stops the process. Fails if no line comes within 10 seconds.
    """
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wsnursery", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=checkout_env(),
    )
    assert proc.stdout is not None
    output = b""
    try:
        with trio.fail_after(10):
            while b"\n" not in output:
                chunk = await proc.stdout.receive_some()
                if not chunk:
                    break
                output += chunk
    except BaseException:
        proc.kill()
        raise
    return proc, output


# -- tasks ----------------------------------------------------------------------


def count_tasks() -> int:
    """Every task alive in this trio run, found from the root task down."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return walk(trio.lowlevel.current_root_task())


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "") -> None:
    """Poll ``predicate`` every 10 ms until it holds; fail after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"condition not met within {timeout} s: {what or predicate}")


async def assert_no_leftover_tasks(baseline: int, timeout: float = 3.0) -> None:
    """Wait (bounded) until the task count is back to ``baseline``."""
    await wait_until(
        lambda: count_tasks() <= baseline,
        timeout,
        f"task count back to {baseline} (now {count_tasks()})",
    )
    assert count_tasks() == baseline


# -- a server for a block ----------------------------------------------------------


@asynccontextmanager
async def serving(handler: Any, **kwargs: Any) -> AsyncIterator[Any]:
    """``serve_websocket(handler, HOST, 0, **kwargs)`` for the ``async with`` block.

    Yields the :class:`~wsnursery.WebSocketServer`; leaving cancels it (a
    graceful stop: every connection gets 1001, every hook has returned).
    """
    from wsnursery import serve_websocket

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, HOST, 0, **kwargs))
        yield server
        nursery.cancel_scope.cancel()


# -- a thread-safe recorder, read from trio -----------------------------------------


class Recorder:
    """A queue any thread or event loop can ``put`` to; trio ``get``s with a timeout."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    async def get(self, timeout: float = 5.0) -> Any:
        try:
            return await trio.to_thread.run_sync(
                partial(self._queue.get, timeout=timeout), abandon_on_cancel=True
            )
        except queue.Empty:
            raise AssertionError(f"nothing recorded within {timeout} s") from None

    def empty(self) -> bool:
        return self._queue.empty()


# -- frames ---------------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MASK_KEY = b"\x37\xfa\x21\x3d"


def apply_mask(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK_KEY,
) -> bytes:
    """One frame, by hand. ``rsv`` is the 3 RSV bits as a number (4 = RSV1).

    ``mask=None`` makes an unmasked frame (what a server sends).
    """
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if mask is not None:
        return head + mask + apply_mask(payload, mask)
    return head + payload


def close_payload(code: int, reason: str | bytes = b"") -> bytes:
    raw = reason.encode("utf-8") if isinstance(reason, str) else reason
    return struct.pack("!H", code) + raw


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    masked: bool

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        assert self.opcode == OP_CLOSE
        return self.payload[2:].decode("utf-8")


class FrameReader:
    """Reads frames (masked or not) from a trio stream, for a hand-made peer."""

    def __init__(self, stream: trio.abc.Stream, data: bytes = b"") -> None:
        self.stream = stream
        self.buffer = bytearray(data)
        self.eof = False

    async def _fill(self, n: int) -> bool:
        while len(self.buffer) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                self.eof = True
                return False
            self.buffer += chunk
        return True

    async def read_frame(self) -> Frame | None:
        """The next frame, or None at end of file."""
        if not await self._fill(2):
            return None
        b0, b1 = self.buffer[0], self.buffer[1]
        length = b1 & 0x7F
        offset = 2
        if length == 126:
            if not await self._fill(4):
                return None
            length = struct.unpack("!H", self.buffer[2:4])[0]
            offset = 4
        elif length == 127:
            if not await self._fill(10):
                return None
            length = struct.unpack("!Q", self.buffer[2:10])[0]
            offset = 10
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            if not await self._fill(offset + 4):
                return None
            key = bytes(self.buffer[offset : offset + 4])
            offset += 4
        if not await self._fill(offset + length):
            return None
        payload = bytes(self.buffer[offset : offset + length])
        del self.buffer[: offset + length]
        if masked:
            payload = apply_mask(payload, key)
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, payload, masked)

    async def read_all(self) -> list[Frame]:
        """Every frame until end of file."""
        frames = []
        while (frame := await self.read_frame()) is not None:
            frames.append(frame)
        return frames


# -- a flooding peer -------------------------------------------------------------------


class Flood:
    """Floods a WebSocket server from OS threads with blocking sockets.

    :meth:`run` (in a thread: ``trio.to_thread.run_sync(flood.run)``) upgrades,
    sets :attr:`ready`, then writes ``blob`` (pre-built masked frames) in a loop
    for ``seconds`` or until the server closes the connection, while a second
    thread reads and drops whatever the server answers, so that the server's
    writes never block and only its read loop is under test. ``sendall``
    releases the GIL: the server's trio loop runs beside it at full speed.
    """

    def __init__(self, port: int, blob: bytes, seconds: float) -> None:
        self.port = port
        self.blob = blob
        self.seconds = seconds
        self.sent = 0
        self.received = 0
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with socket.create_connection((HOST, self.port), timeout=10) as sock:
                sock.sendall(upgrade_request())
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    assert chunk, "EOF before the 101"
                    head += chunk
                assert head.startswith(b"HTTP/1.1 101"), head
                drain = threading.Thread(target=self._drain, args=(sock,), daemon=True)
                drain.start()
                self.ready.set()
                deadline = time.monotonic() + self.seconds
                try:
                    while time.monotonic() < deadline:
                        sock.sendall(self.blob)
                        self.sent += len(self.blob)
                    sock.shutdown(socket.SHUT_RDWR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server closed the connection
                drain.join(10)
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            self.ready.set()

    def _drain(self, sock: socket.socket) -> None:
        try:
            while chunk := sock.recv(1 << 20):
                self.received += len(chunk)
        except OSError:
            pass


FLOOD_BLOBS = {
    # ~240 KB of 6-byte pings: one server read can hold ~40,000 of them.
    "ping": build_frame(OP_PING) * 40_000,
    "text": build_frame(OP_TEXT, b"hello") * 20_000,
}


async def start_flood_process(port: int, kind: str, seconds: float) -> trio.Process:
    """A :class:`Flood` of ``FLOOD_BLOBS[kind]`` in a process of its own.

    Its own process shares no GIL with the server under test, so the flood is
    as hard as the machine can make it. Returns once the flooder has upgraded;
    it stops by itself after ``seconds`` (the caller may kill it sooner).
    """
    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, "flood", str(port), kind, str(seconds)],
        stdout=subprocess.PIPE,
        env=checkout_env(),
    )
    assert proc.stdout is not None
    try:
        with trio.fail_after(10):
            assert (await proc.stdout.receive_some(16)).startswith(b"ready")
    except BaseException:
        proc.kill()
        raise
    return proc


def _flood_main(port: str, kind: str, seconds: str) -> None:
    flood = Flood(int(port), FLOOD_BLOBS[kind], float(seconds))
    runner = threading.Thread(target=flood.run)
    runner.start()
    flood.ready.wait()
    print("ready", flush=True)
    runner.join()


# -- HTTP -------------------------------------------------------------------------


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def upgrade_request(
    path: str = "/",
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    headers: Iterable[tuple[str, str]] | None = None,
    drop: Iterable[str] = (),
    extra: Iterable[tuple[str, str]] = (),
) -> bytes:
    """An upgrade request; ``drop`` removes default headers (by lower-case name)."""
    if headers is None:
        headers = [
            ("Host", f"{HOST}"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", new_key()),
            ("Sec-WebSocket-Version", "13"),
        ]
    dropped = {name.lower() for name in drop}
    lines = [f"{method} {path} {version}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in dropped]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class HTTPHead:
    status: int
    headers: list[tuple[str, str]]
    rest: bytes

    def header(self, name: str) -> str | None:
        """The first value of ``name``, or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every ``name`` header, lower-cased."""
        return [t.strip().lower() for v in self.header_all(name) for t in v.split(",") if t.strip()]


async def read_head(stream: trio.abc.Stream, limit: int = 1 << 20) -> tuple[bytes, bytes]:
    """Read up to and including a blank line: ``(head, bytes after it)``."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"EOF before the end of the HTTP head: {bytes(buffer)!r}")
        buffer += chunk
        assert len(buffer) < limit
    end = buffer.index(b"\r\n\r\n") + 4
    return bytes(buffer[:end]), bytes(buffer[end:])


async def read_response(stream: trio.abc.Stream) -> HTTPHead:
    head, rest = await read_head(stream)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [tuple(s.strip() for s in line.split(":", 1)) for line in lines[1:] if line]
    return HTTPHead(status, headers, rest)  # type: ignore[arg-type]


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


async def raw_connect(
    port: int,
    path: str = "/",
    *,
    extra: Iterable[tuple[str, str]] = (),
) -> tuple[trio.SocketStream, FrameReader, HTTPHead]:
    """A hand-made WebSocket client: TCP, upgrade request, 101 checked."""
    stream = await trio.open_tcp_stream(HOST, port)
    await stream.send_all(upgrade_request(path, extra=extra))
    head = await read_response(stream)
    assert head.status == 101, head
    return stream, FrameReader(stream, head.rest), head


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        _flood_main(*sys.argv[2:])
