"""Stay connected to an echo server through its restarts.

Start an echo server first (``python examples/echo_server.py`` or ``python -m
wsnursery echo``), then::

    python examples/reconnecting_client.py                        # ws://127.0.0.1:8765/
    python examples/reconnecting_client.py ws://127.0.0.1:9000/ 20

It sends a numbered tick every half second and prints the echoes. Stop and
restart the server meanwhile: the client prints the close and each failed
attempt with its wait, reconnects, says hello again (``on_open``) and goes on.
It exits with status 0 once COUNT ticks came back (10 by default), and 1 if
the server refuses it for good (an HTTP 4xx answer).
"""

from __future__ import annotations

import itertools
import sys

import trio

import wsnursery


def report(event: wsnursery.ClientEvent) -> None:
    """``on_event``: called as connections open, close and fail."""
    if isinstance(event, wsnursery.OpenEvent):
        print(f"connected (connection {event.number}, attempt {event.attempt})", flush=True)
    elif isinstance(event, wsnursery.CloseEvent):
        then = f"reconnecting in {event.delay:.2f} s" if event.will_retry else "done"
        print(f"connection {event.number} closed with {event.code}; {then}", flush=True)
    elif isinstance(event, wsnursery.ErrorEvent):
        then = f"retrying in {event.delay:.2f} s" if event.will_retry else "giving up"
        print(f"attempt {event.attempt} failed: {event.reason}; {then}", flush=True)


async def hello(conn: wsnursery.WebSocketConnection) -> None:
    """``on_open``: runs on every new connection before anything else is sent.

    A real client would log in or subscribe here. An echo server answers the
    hello with itself: read it here, so that the main loop sees only ticks.
    """
    await conn.send_message("hello")
    await conn.get_message()


async def send_ticks(client: wsnursery.ReconnectingWebSocket) -> None:
    for n in itertools.count(1):
        # While the client reconnects, this waits (send_policy="wait").
        await client.send_message(f"tick {n}")
        await trio.sleep(0.5)


async def main(url: str, count: int) -> int:
    try:
        async with (
            wsnursery.open_reconnecting_websocket(
                url,
                on_open=hello,
                on_event=report,
                backoff=wsnursery.Backoff(initial=0.1, max_delay=5.0),
            ) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(send_ticks, client)
            received = 0
            async for message in client:  # across reconnections
                print(f"echo: {message}", flush=True)
                received += 1
                if received == count:
                    break
            nursery.cancel_scope.cancel()
        # Leaving the block closed the connection with 1000.
    except (wsnursery.HandshakeError, wsnursery.TransportError) as exc:
        print(f"could not stay connected to {url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    arguments = sys.argv[1:]
    url = arguments[0] if arguments else "ws://127.0.0.1:8765/"
    count = int(arguments[1]) if len(arguments) > 1 else 10
    sys.exit(trio.run(main, url, count))
