"""A small handler to test: the "application" of the testing and TLS how-tos.

``/greet`` answers every text message ``NAME`` with ``hello, NAME``; other paths
get 404. A binary message closes the connection with 1003 (unsupported data), a
client that stays silent for ``IDLE_TIMEOUT`` seconds is closed with 4000, and
an empty name is a bug in this handler: it raises, so the client sees 1011.
``test_greeter.py`` and ``test_greeter_tls.py`` test it.

    python examples/greeter.py      # ws://127.0.0.1:8765/greet
"""

from __future__ import annotations

import trio

from wsnursery import CloseCode, WebSocketRequest, serve_websocket

IDLE_TIMEOUT = 60.0
IDLE_CLOSE_CODE = 4000  # 4000-4999: codes for applications to define


async def greeter(request: WebSocketRequest) -> None:
    if request.url_path != "/greet":
        await request.reject(404, body="no such endpoint\n")
        return
    conn = await request.accept()
    while True:
        with trio.move_on_after(IDLE_TIMEOUT) as idle:
            # Raises ConnectionClosed once the client has gone; the server
            # expects that and ends the connection quietly.
            name = await conn.get_message()
        if idle.cancelled_caught:
            await conn.aclose(IDLE_CLOSE_CODE, "idle for too long")
            return
        if isinstance(name, bytes):
            await conn.aclose(CloseCode.UNSUPPORTED_DATA, "send your name as text")
            return
        if not name:
            raise ValueError("empty name")
        await conn.send_message(f"hello, {name}")


if __name__ == "__main__":
    trio.run(serve_websocket, greeter, "127.0.0.1", 8765)
