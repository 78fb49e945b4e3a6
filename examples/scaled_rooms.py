"""Chat rooms that work the same in one process, N workers, or N machines.

Serve it with several workers sharing one port and a Redis backplane (run from
this directory, or put it on PYTHONPATH)::

    redis-server --port 6379 --save '' --appendonly no &
    python -m wsnursery serve scaled_rooms:Rooms --workers 4 --redis redis://127.0.0.1:6379/0

or on its own, one process, with the backplane's events watched::

    python examples/scaled_rooms.py --redis redis://127.0.0.1:6379/0

The protocol: every text line ``/join ROOM`` moves the client to ROOM; any
other line goes to everyone in the client's room, on whichever worker or
machine they are connected. After a Redis outage each client is told
``*resync*`` (messages from other nodes may have been lost meanwhile) so that
a real application would reload its state.
"""

from __future__ import annotations

import argparse
import functools
import logging

import trio

import wsnursery


class Rooms(wsnursery.WebSocketHandler):
    default_page = "<p>connect with a WebSocket; send /join ROOM, then text</p>"

    async def on_connect(self, conn: wsnursery.WebSocketConnection) -> None:
        conn.server.broadcaster.join(conn, "lobby")
        await conn.send_message(f"welcome {conn.id}: you are in lobby")

    async def on_text(self, conn: wsnursery.WebSocketConnection, text: str) -> None:
        broadcaster = conn.server.broadcaster
        if text.startswith("/join "):
            for room in broadcaster.groups_of(conn):
                broadcaster.leave(conn, room)
            room = text.removeprefix("/join ").strip() or "lobby"
            broadcaster.join(conn, room)
            backplane = broadcaster.backplane
            if isinstance(backplane, wsnursery.RedisBackplane):
                # Subscribed before we say so: nothing sent to the room after
                # this answer can miss this node.
                await backplane.wait_synced(broadcaster)
            await conn.send_message(f"you are in {room}")
            return
        for room in broadcaster.groups_of(conn):
            await broadcaster.send_group(room, f"{conn.id}: {text}", exclude=[conn])


async def resync_after_outages(server: wsnursery.WebSocketServer) -> None:
    """Tell every local client to resync when Redis comes back."""
    backplane = server.broadcaster.backplane
    if not isinstance(backplane, wsnursery.RedisBackplane):
        return
    with backplane.events() as events:
        async for event in events:
            if event.kind == "reconnected":
                logging.warning(
                    "Redis back after %.1f s (%d sends dropped); asking clients to resync",
                    event.outage,
                    event.dropped,
                )
                await server.broadcaster.send_all("*resync*")


async def main(host: str, port: int, redis: str | None) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(wsnursery.serve_websocket, Rooms, host, port, backplane=redis)
        )
        print(f"listening on ws://{host}:{server.port}/", flush=True)
        nursery.start_soon(resync_after_outages, server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--redis", help="redis://HOST:6379/0 (none: this process only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    try:
        trio.run(main, args.host, args.port, args.redis)
    except KeyboardInterrupt:
        pass
