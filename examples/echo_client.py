"""Send a few messages to an echo server and print what comes back.

Start ``echo_server.py`` first, then::

    python examples/echo_client.py                        # ws://127.0.0.1:8765/
    python examples/echo_client.py ws://127.0.0.1:9000/

It exits with status 1 when it cannot connect.
"""

from __future__ import annotations

import sys

import trio

from wsnursery import HandshakeError, TransportError, open_websocket_url

MESSAGES: list[str | bytes] = ["hello", "wsnursery", b"\x00\x01binary\xff"]


async def main(url: str) -> int:
    try:
        async with open_websocket_url(url) as conn:
            for message in MESSAGES:
                await conn.send_message(message)
                echo = await conn.get_message()
                print(f"sent {message!r}, got {echo!r}", flush=True)
        # Leaving the block closed the connection with 1000 (normal closure).
        print(f"closed: {conn.closed}", flush=True)
    except (TransportError, HandshakeError) as exc:
        print(f"could not connect to {url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8765/"))
