"""Fan-out servers under test, one per process (see bench_fanout.py).

Run as ``python benchmarks/_fanout_servers.py KIND --port P --clients N --messages M
--size S [--cpu 0] [--policy drop|close]``.  The process pins itself to ``--cpu``, raises
RLIMIT_NOFILE, listens on 127.0.0.1 and prints ``READY <port>``.  Then:

1. it waits for a line ``GO`` on stdin (the benchmark sends it once the load generator has
   all N connections open), then until N WebSocket connections are registered on its side
   (the end of stdin, at any time, stops it: it never outlives the benchmark);
2. it sends M binary messages of S bytes to all of them, one library call (one ``await``)
   per message, message ``i`` carrying ``i`` in its first 8 bytes (big-endian);
3. it prints ``DONE <json>`` (elapsed time, CPU, per-kind figures such as the summed
   ``BroadcastReport`` of wsnursery) and waits for SIGTERM.

On SIGTERM (SIGINT) before the sends are finished (a peer that blocks on a stalled client)
it prints ``CANCELLED <json>`` with how many of the M calls had returned.

Kinds:

websockets-trio
    ``websockets.trio.server.serve``; ``await broadcast(connections, m)`` per message:
    websockets' own Trio ``broadcast()``, which starts a task per connection and waits for
    all of them.
trio-websocket
    ``trio_websocket.serve_websocket``; ``for ws in conns: await ws.send_message(m)``.
raw-trio
    The ceiling reference for a loop that awaits each write: plain Trio ``SocketStream``, a
    hand-written opening handshake, then one frame built per message and
    ``for s in streams: await s.send_all(frame)``.
raw-nowait
    The ceiling for writing without awaiting: the same, but a plain non-blocking
    ``socket.send(frame)`` per connection (``await send_all`` of the rest only when a
    socket is full) and one ``trio.lowlevel.checkpoint()`` per message.
wsnursery
    A ``WebSocketHandler`` server; ``await server.broadcaster.send_all(m)``.
wsnursery-group
    The same, every client joined to one group in ``on_connect``;
    ``await server.broadcaster.send_group("all", m)``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fanout_load import fanout_payload, server_frame

HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KINDS = (
    "websockets-trio",
    "trio-websocket",
    "raw-trio",
    "raw-nowait",
    "wsnursery",
    "wsnursery-group",
)

Sender = Callable[[Any], Awaitable[None]]


class Run:
    """What a kind's setup hands back: the registered connections and a per-message sender."""

    def __init__(self, clients: int) -> None:
        import trio

        self.clients = clients
        self.conns: list[Any] = []
        self.enough = trio.Event()
        self.extra: dict[str, Any] = {}  # per-kind figures for DONE

    def register(self, conn: Any) -> None:
        self.conns.append(conn)
        if len(self.conns) >= self.clients:
            self.enough.set()


# --------------------------------------------------------------------------- websockets


async def setup_websockets(run: Run, a: argparse.Namespace, nursery: Any) -> tuple[int, Any]:
    from websockets.trio.server import broadcast, serve

    async def handler(ws: Any) -> None:
        run.register(ws)
        await ws.wait_closed()

    await nursery.start(functools.partial(serve, handler, a.port, host=HOST, compression=None))

    async def send(message: bytes) -> None:
        await broadcast(run.conns, message)

    return a.port, send


# --------------------------------------------------------------------------- trio-websocket


async def setup_trio_websocket(run: Run, a: argparse.Namespace, nursery: Any) -> tuple[int, Any]:
    from trio_websocket import ConnectionClosed, serve_websocket

    async def handler(request: Any) -> None:
        ws = await request.accept()
        run.register(ws)
        try:
            while True:  # the clients send nothing; this returns when they go
                await ws.get_message()
        except ConnectionClosed:
            pass

    await nursery.start(functools.partial(serve_websocket, handler, HOST, a.port, None))

    async def send(message: bytes) -> None:
        for ws in run.conns:
            await ws.send_message(message)

    return a.port, send


# --------------------------------------------------------------------------- raw trio


async def setup_raw(run: Run, a: argparse.Namespace, nursery: Any) -> tuple[int, Any]:
    import trio

    nowait = a.kind == "raw-nowait"

    async def handle(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        key = b""
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        if nowait:
            # A second descriptor for the same socket, for plain non-blocking send().
            sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
            run.register((stream, sock))
        else:
            run.register(stream)
        try:
            while await stream.receive_some(4096):
                pass  # the clients send nothing but maybe a close frame
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(a.port, host=HOST, backlog=4096)
    await nursery.start(trio.serve_listeners, handle, listeners)

    async def send(message: bytes) -> None:
        frame = server_frame(message)  # framing is part of the per-message work
        for stream in run.conns:
            await stream.send_all(frame)

    async def send_nowait(message: bytes) -> None:
        frame = server_frame(message)
        size = len(frame)
        for stream, sock in run.conns:
            try:
                sent = sock.send(frame)
            except BlockingIOError:
                sent = 0
            if sent < size:
                await stream.send_all(frame[sent:])
        await trio.lowlevel.checkpoint()

    return a.port, send_nowait if nowait else send


# --------------------------------------------------------------------------- wsnursery


async def setup_wsnursery(run: Run, a: argparse.Namespace, nursery: Any) -> tuple[int, Any]:
    import wsnursery

    group = a.kind == "wsnursery-group"

    class Fanout(wsnursery.WebSocketHandler):
        async def on_connect(self, conn: Any) -> None:
            if group:
                conn.server.broadcaster.join(conn, "all")
            run.register(conn)

    opts: dict[str, Any] = {"on_overflow": a.policy}
    if a.max_outbox_messages is not None:
        opts["max_outbox_messages"] = a.max_outbox_messages
    if a.max_outbox_bytes is not None:
        opts["max_outbox_bytes"] = a.max_outbox_bytes
    server = await nursery.start(
        functools.partial(
            wsnursery.serve_websocket, Fanout(), HOST, a.port, compression=False, **opts
        )
    )
    broadcaster = server.broadcaster
    totals = {"recipients": 0, "delivered": 0, "dropped": 0, "closed": 0}
    run.extra["reports"] = totals

    def add(report: Any) -> None:
        totals["recipients"] += report.recipients
        totals["delivered"] += report.delivered
        totals["dropped"] += report.dropped
        totals["closed"] += report.closed

    if group:

        async def send(message: bytes) -> None:
            add(await broadcaster.send_group("all", message))

    else:

        async def send(message: bytes) -> None:
            add(await broadcaster.send_all(message))

    def stats() -> dict[str, Any]:
        s = broadcaster.stats()
        return {
            name: getattr(s, name)
            for name in (
                "connections",
                "groups",
                "queued_messages",
                "queued_bytes",
                "delivered",
                "dropped",
                "closed",
            )
        }

    run.extra["stats"] = stats
    return server.port, send


SETUP = {
    "websockets-trio": setup_websockets,
    "trio-websocket": setup_trio_websocket,
    "raw-trio": setup_raw,
    "raw-nowait": setup_raw,
    "wsnursery": setup_wsnursery,
    "wsnursery-group": setup_wsnursery,
}


def available(kind: str) -> str | None:
    """None if the kind can run here, else the reason."""
    try:
        if kind == "websockets-trio":
            from websockets.trio.server import broadcast, serve  # noqa: F401
        elif kind == "trio-websocket":
            import trio_websocket  # noqa: F401
        elif kind.startswith("wsnursery"):
            import wsnursery

            if not hasattr(wsnursery, "Broadcaster"):
                return "wsnursery has no Broadcaster yet"
        else:
            import trio  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def emit(tag: str, doc: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {json.dumps(doc)}\n")
    sys.stdout.flush()


async def serve(a: argparse.Namespace) -> None:
    import trio

    run = Run(a.clients)
    messages = [fanout_payload(i, a.size) for i in range(a.messages)]
    progress = {"calls": 0, "done": False}

    async def fan_out(send: Any) -> None:
        with trio.move_on_after(30):
            await run.enough.wait()
        if not run.enough.is_set():
            emit("ERROR", {"error": f"only {len(run.conns)}/{a.clients} connections registered"})
            return
        t0 = time.perf_counter()
        c0 = cpu_seconds()
        for message in messages:
            await send(message)
            progress["calls"] += 1
        t1 = time.perf_counter()
        c1 = cpu_seconds()
        progress["done"] = True
        doc: dict[str, Any] = {
            "calls": progress["calls"],
            "send_seconds": t1 - t0,
            "send_cpu": c1 - c0,
            "connections": len(run.conns),
        }
        if "reports" in run.extra:
            doc["reports"] = run.extra["reports"]
        if "stats" in run.extra:
            # Give a stalled client's outbox a moment to settle before the final counts.
            await trio.sleep(0.2)
            doc["stats"] = run.extra["stats"]()
        emit("DONE", doc)

    async def read_stdin(nursery: Any, send: Any) -> None:
        """The first line (GO) starts the fan-out; the end of stdin means the benchmark
        went away (even killed): stop, rather than outlive it."""
        async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
            started = False
            while data := await stdin.receive_some(64):
                if not started and b"\n" in data:
                    started = True
                    nursery.start_soon(fan_out, send)
        nursery.cancel_scope.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            port, send = await SETUP[a.kind](run, a, nursery)
            print(f"READY {port}", flush=True)
            nursery.start_soon(read_stdin, nursery, send)
            async for _ in signals:
                if not progress["done"]:
                    doc = {"calls": progress["calls"], "connections": len(run.conns)}
                    if "reports" in run.extra:
                        doc["reports"] = run.extra["reports"]
                    emit("CANCELLED", doc)
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--policy", choices=("drop", "close"), default="drop")
    p.add_argument("--max-outbox-messages", type=int, default=None)
    p.add_argument("--max-outbox-bytes", type=int, default=None)
    p.add_argument("--cpu", type=int, default=None)
    a = p.parse_args()
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, a.clients * 2 + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    import trio

    trio.run(serve, a)


if __name__ == "__main__":
    main()
