"""A server node for the Redis backplane tests, run as its own process.

As a script::

    python tests/redis_node.py --redis URL [--namespace NS]

it serves :data:`app` on 127.0.0.1 and a free port with a ``RedisBackplane``,
prints one line ``READY {"port": P, "node": NODE_ID, "pid": PID}`` and serves
until SIGTERM (a graceful stop: clients get 1001) or until its stdin closes
(the test that started it is gone).

As a module, ``redis_node:app`` is what ``python -m wsnursery serve`` serves in
the worker tests (the backplane then comes from ``--redis``).

Paths:

``/``         a member. It is told ``{"id": ..., "node": ..., "pid": ...}`` on
              connecting; ``join:G`` / ``leave:G`` change its groups (answered
              ``joined:G`` / ``left:G`` once the node's Redis subscriptions
              are made); then it only receives broadcasts.
``/control``  JSON commands, one JSON answer each:
              ``{"op": "send_group", "group": G, "text": T, "exclude": [IDs]}``,
              ``{"op": "send_all", "text": T, "exclude": [IDs]}``,
              ``{"op": "send_one", "target": ID, "text": T}`` (``"binary": true``
              sends T's UTF-8 bytes) answer ``{"report": {...}}``;
              ``{"op": "stats"}`` answers the backplane's statistics and every
              BackplaneEvent so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import sys
from typing import Any

import trio

import wsnursery
from wsnursery import RedisBackplane, WebSocketConnection, WebSocketHandler

EVENTS: list[dict[str, Any]] = []


def _backplane(conn: WebSocketConnection) -> RedisBackplane:
    backplane = conn.server.broadcaster.backplane
    assert isinstance(backplane, RedisBackplane)
    return backplane


def record(event: wsnursery.BackplaneEvent) -> None:
    EVENTS.append(dataclasses.asdict(event))


class Member(WebSocketHandler):
    async def on_connect(self, conn: WebSocketConnection) -> None:
        broadcaster = conn.server.broadcaster
        hello = {"id": conn.id, "node": broadcaster.node_id, "pid": os.getpid()}
        await conn.send_message(json.dumps(hello))

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        broadcaster = conn.server.broadcaster
        verb, _, group = text.partition(":")
        if verb == "join":
            broadcaster.join(conn, group)
        elif verb == "leave":
            broadcaster.leave(conn, group)
        else:
            await conn.send_message(f"unknown:{text}")
            return
        await _backplane(conn).wait_synced(broadcaster)
        await conn.send_message(f"{'joined' if verb == 'join' else 'left'}:{group}")


class Control(WebSocketHandler):
    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        command = json.loads(text)
        broadcaster = conn.server.broadcaster
        op = command["op"]
        if op == "stats":
            stats = dataclasses.asdict(_backplane(conn).stats())
            await conn.send_message(json.dumps({"stats": stats, "events": EVENTS}))
            return
        message: str | bytes = command.get("text", "")
        if command.get("binary"):
            message = str(message).encode()
        exclude = command.get("exclude", [])
        if op == "send_group":
            report = await broadcaster.send_group(command["group"], message, exclude=exclude)
        elif op == "send_all":
            report = await broadcaster.send_all(message, exclude=exclude)
        elif op == "send_one":
            report = await broadcaster.send_one(command["target"], message)
        else:
            await conn.send_message(json.dumps({"error": f"unknown op {op}"}))
            return
        await conn.send_message(json.dumps({"report": dataclasses.asdict(report)}))


app = {"/": Member, "/control": Control}


async def _watch_stdin(stop: trio.Event) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with stdin:
        while await stdin.receive_some(1024):
            pass
    stop.set()


async def main(args: argparse.Namespace) -> None:
    backplane = RedisBackplane(
        args.redis,
        namespace=args.namespace,
        connect_timeout=args.connect_timeout,
        reconnect_delay=0.05,
        max_reconnect_delay=0.5,
        on_event=record,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(
                    wsnursery.serve_websocket, app, "127.0.0.1", 0, backplane=backplane
                )
            )
            ready = {"port": server.port, "node": server.broadcaster.node_id, "pid": os.getpid()}
            print("READY " + json.dumps(ready), flush=True)
            stop = trio.Event()
            nursery.start_soon(_watch_stdin, stop)

            async def on_signal() -> None:
                async for _ in signals:
                    stop.set()
                    return

            nursery.start_soon(on_signal)
            await stop.wait()
            await server.aclose()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--namespace", default="wsnursery")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    try:
        trio.run(main, parser.parse_args())
    except wsnursery.BackplaneError as exc:
        print(f"ERROR {exc}", flush=True)
        sys.exit(1)
