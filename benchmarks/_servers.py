"""Echo servers under test, one per process.

Run as ``python benchmarks/_servers.py KIND --port P [--cpu 0]``.  The process pins itself
to ``--cpu``, raises RLIMIT_NOFILE to the hard limit, starts the server on 127.0.0.1 and
prints ``READY <port>`` on stdout once it is listening.  It runs until SIGINT (clean Trio shutdown) or SIGKILL.

Kinds:

raw
    The ceiling: plain Trio TCP on the fastest I/O pattern from the performance guide
    (``wait_readable`` + ``recv_into`` a buffer shared by all connections + plain
    ``send``).  Messages are length-prefixed (4-byte big-endian length + payload); the
    server assembles each whole message before echoing it, as a WebSocket server must.
websockets
    ``websockets.trio.server.serve`` (websockets >= 15 Trio API).
trio-websocket
    ``trio_websocket.serve_websocket``.
wsnursery
    ``wsnursery.serve_websocket``.

All WebSocket servers: 16 MiB max message size, compression off, other settings default.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import signal
import socket
import sys

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
HOST = "127.0.0.1"

KINDS = ("raw", "websockets", "trio-websocket", "wsnursery", "wsn-handler")


# --------------------------------------------------------------------------- raw


async def _raw_send_all(trio, sock: socket.socket, data) -> None:  # type: ignore[no-untyped-def]
    """Fast path: one plain send(); on a partial write copy the rest and wait."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    rest = bytes(memoryview(data)[sent:])  # the shared buffer may be reused once we await
    view = memoryview(rest)
    while view:
        await trio.lowlevel.wait_writable(sock)
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        view = view[sent:]


async def _raw_connection(trio, sock: socket.socket, shared: bytearray) -> None:  # type: ignore[no-untyped-def]
    view = memoryview(shared)
    size = len(shared)
    acc = bytearray()  # bytes of an incomplete message carried between reads
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    n = sock.recv_into(shared)
                except BlockingIOError:
                    break
                except OSError:
                    return
                if n == 0:
                    return
                if not acc:
                    # Fast path: parse straight out of the shared buffer.
                    off = 0
                    out = []
                    while n - off >= 4:
                        length = int.from_bytes(view[off : off + 4], "big")
                        end = off + 4 + length
                        if end > n:
                            break
                        out.append(view[off:end])
                        off = end
                    if off < n:
                        acc += view[off:n]
                    if out:
                        await _raw_send_all(trio, sock, out[0] if len(out) == 1 else b"".join(out))
                else:
                    acc += view[:n]
                    off = 0
                    total = len(acc)
                    while total - off >= 4:
                        length = int.from_bytes(acc[off : off + 4], "big")
                        end = off + 4 + length
                        if end > total:
                            break
                        off = end
                    if off:
                        reply = memoryview(acc)[:off]
                        try:
                            await _raw_send_all(trio, sock, reply)
                        finally:
                            reply.release()
                        del acc[:off]
                if n < size:
                    break
    except OSError:
        pass
    finally:
        sock.close()


async def serve_raw(port: int, task_status) -> None:  # type: ignore[no-untyped-def]
    import trio

    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    shared = bytearray(1 << 20)
    async with trio.open_nursery() as nursery:
        task_status.started(lsock.getsockname()[1])
        while True:
            await trio.lowlevel.wait_readable(lsock)
            while True:
                try:
                    sock, _ = lsock.accept()
                except OSError:  # BlockingIOError included: nothing more to accept now
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(_raw_connection, trio, sock, shared)


# --------------------------------------------------------------------------- websockets


async def serve_websockets(port: int, task_status) -> None:  # type: ignore[no-untyped-def]
    import trio
    from websockets.exceptions import ConnectionClosed
    from websockets.trio.server import serve

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve, handler, port, host=HOST, compression=None, max_size=MAX_MESSAGE_SIZE
            )
        )
        task_status.started(port)


# --------------------------------------------------------------------------- trio-websocket


async def serve_trio_websocket(port: int, task_status) -> None:  # type: ignore[no-untyped-def]
    import trio
    from trio_websocket import ConnectionClosed, serve_websocket

    async def handler(request) -> None:  # type: ignore[no-untyped-def]
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(message)
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_websocket, handler, HOST, port, None, max_message_size=MAX_MESSAGE_SIZE
            )
        )
        task_status.started(port)


# --------------------------------------------------------------------------- wsnursery


async def serve_wsnursery(port: int, task_status) -> None:  # type: ignore[no-untyped-def]
    import trio

    import wsnursery

    async def handler(request) -> None:  # type: ignore[no-untyped-def]
        conn = await request.accept()
        async for message in conn:
            await conn.send_message(message)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                wsnursery.serve_websocket,
                handler,
                HOST,
                port,
                max_message_size=MAX_MESSAGE_SIZE,
                compression=False,
            )
        )
        task_status.started(port)


async def serve_wsnursery_handler(port: int, task_status) -> None:  # type: ignore[no-untyped-def]
    """The same echo as a WebSocketHandler: hooks run in the connection's own task."""
    import trio

    import wsnursery

    class Echo(wsnursery.WebSocketHandler):
        async def on_text(self, conn, text) -> None:  # type: ignore[no-untyped-def]
            await conn.send_message(text)

        async def on_binary(self, conn, data) -> None:  # type: ignore[no-untyped-def]
            await conn.send_message(data)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                wsnursery.serve_websocket,
                Echo(),
                HOST,
                port,
                max_message_size=MAX_MESSAGE_SIZE,
                compression=False,
            )
        )
        task_status.started(port)


SERVERS = {
    "raw": serve_raw,
    "websockets": serve_websockets,
    "trio-websocket": serve_trio_websocket,
    "wsnursery": serve_wsnursery,
    "wsn-handler": serve_wsnursery_handler,
}


def available(kind: str) -> str | None:
    """Return None if the server can run here, else a reason."""
    try:
        if kind == "websockets":
            import websockets.trio.server  # noqa: F401
        elif kind == "trio-websocket":
            import trio_websocket  # noqa: F401
        elif kind in ("wsnursery", "wsn-handler"):
            import wsnursery

            if not hasattr(wsnursery, "serve_websocket"):
                return "wsnursery has no serve_websocket yet"
            if kind == "wsn-handler" and not hasattr(wsnursery, "WebSocketHandler"):
                return "wsnursery has no WebSocketHandler yet"
        else:
            import trio  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args()

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    raise_nofile()

    import trio

    serve = SERVERS[args.kind]

    async def run() -> None:
        # SIGINT or SIGTERM cancels everything: a clean Trio shutdown (SIGINT may arrive
        # ignored when started in the background, so don't rely on KeyboardInterrupt).
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, args.port)
                print(f"READY {port}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
