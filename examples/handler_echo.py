"""An echo server written as a WebSocketHandler: hooks instead of a loop.

Run it, then connect with ``echo_client.py`` (or any WebSocket client)::

    python examples/handler_echo.py          # ws://127.0.0.1:8765/
    python examples/handler_echo.py 9000     # ws://127.0.0.1:9000/
    python examples/handler_echo.py 0        # any free port; the URL is printed

It prints a line when a connection opens and when it closes. Ctrl-C or SIGTERM
stops it: open connections are closed with 1001 (going away) first.
"""

from __future__ import annotations

import signal
import sys

import trio

from wsnursery import CloseReason, WebSocketConnection, WebSocketHandler, serve_websocket


class Echo(WebSocketHandler):
    """Send every message back as it came, text as text and binary as binary.

    The hooks run in the connection's own task, one at a time: the replies
    go out in the order the messages came in.
    """

    async def on_connect(self, conn: WebSocketConnection) -> None:
        host, port = conn.remote
        print(f"connection {conn.id} opened from {host}:{port}", flush=True)

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        await conn.send_message(text)

    async def on_binary(self, conn: WebSocketConnection, data: bytes) -> None:
        await conn.send_message(data)

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        # Called exactly once per connection, however it ended.
        print(f"connection {conn.id} closed: {reason}", flush=True)


async def main(port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            # Echo keeps no state of its own, so one instance serves every
            # connection. Any path is served: no routes were given.
            server = await nursery.start(serve_websocket, Echo(), "127.0.0.1", port)
            print(f"listening on ws://127.0.0.1:{server.port}/", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", flush=True)
                break
            nursery.cancel_scope.cancel()  # a graceful stop, as in echo_server.py
    print("stopped", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
