"""An echo server: every message goes back to the client that sent it.

Run it, then connect with ``echo_client.py`` (or any WebSocket client)::

    python examples/echo_server.py          # ws://127.0.0.1:8765/
    python examples/echo_server.py 9000     # ws://127.0.0.1:9000/
    python examples/echo_server.py 0        # any free port; the URL is printed

Ctrl-C or SIGTERM stops it: open connections are closed with 1001 (going
away) before the process exits.
"""

from __future__ import annotations

import signal
import sys

import trio

from wsnursery import WebSocketRequest, serve_websocket


async def echo(request: WebSocketRequest) -> None:
    """Accept every request, then send each message back as it came."""
    conn = await request.accept()
    async for message in conn:  # ends when the client closes normally
        await conn.send_message(message)


async def main(port: int) -> None:
    # Take over SIGINT and SIGTERM before listening, so that a signal that
    # arrives at any point after the "listening" line stops the server cleanly.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, echo, "127.0.0.1", port)
            print(f"listening on ws://127.0.0.1:{server.port}/", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", flush=True)
                break
            # Cancelling serve_websocket is a graceful stop: it closes every
            # connection with 1001 and waits (at most close_timeout) for them.
            nursery.cancel_scope.cancel()
    print("stopped", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
