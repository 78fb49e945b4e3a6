"""Per-connection state and shared state in WebSocketHandler objects.

Two routes on one server::

    python examples/handler_state.py        # ws://127.0.0.1:8765/count, /chat?name=...

``/count`` numbers each client's messages, starting from 1 on every new
connection: the route is given the *class*, so each connection gets an
instance of its own. ``/chat?name=alice`` is a chat room: the route is given
one *instance*, so every connection shares its ``members``. Members hear who
joins and who leaves, and every message is sent to everyone.

Ctrl-C or SIGTERM stops it: open connections are closed with 1001 first.
"""

from __future__ import annotations

import signal
import sys

import trio

from wsnursery import (
    CloseReason,
    ConnectionClosed,
    Reject,
    WebSocketConnection,
    WebSocketHandler,
    WebSocketRequest,
    serve_websocket,
)


class Counter(WebSocketHandler):
    """One instance per connection: ``self.count`` belongs to one client."""

    def __init__(self) -> None:
        self.count = 0

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        self.count += 1
        await conn.send_message(f"{self.count}: {text}")


class ChatRoom(WebSocketHandler):
    """One instance for every connection: ``self.members`` is the room."""

    def __init__(self) -> None:
        self.members: dict[WebSocketConnection, str] = {}

    async def validate(self, request: WebSocketRequest) -> Reject | None:
        if not request.query.get("name", "").isalnum():
            return Reject(400, body="connect to /chat?name=<letters and digits>\n")
        return None  # accept

    async def on_connect(self, conn: WebSocketConnection) -> None:
        name = conn.query["name"]
        self.members[conn] = name
        await self.broadcast(f"{name} joined ({len(self.members)} here)")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        await self.broadcast(f"{self.members[conn]}: {text}")

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        name = self.members.pop(conn, None)
        if name is not None:
            await self.broadcast(f"{name} left")

    async def broadcast(self, text: str) -> None:
        # Naive on purpose: one member after the other, in the task of the
        # connection whose event this is. A member that does not read (its
        # socket buffer full) holds up that task. See docs/howto/handlers.rst.
        for member in list(self.members):
            try:
                await member.send_message(text)
            except ConnectionClosed:
                pass  # it is leaving; its on_disconnect removes it


async def main(port: int) -> None:
    routes = {"/count": Counter, "/chat": ChatRoom()}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, routes, "127.0.0.1", port)
            url = f"ws://127.0.0.1:{server.port}/"
            print(f"listening on {url} (paths: /count, /chat?name=...)", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", flush=True)
                break
            nursery.cancel_scope.cancel()
    print("stopped", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
