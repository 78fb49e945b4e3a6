"""Tokens, an origin allowlist, an admin route and the connection registry.

    python examples/handler_auth.py         # ws://127.0.0.1:8765/?token=...

Every WebSocket request needs a token (``?token=``, ``Authorization: Bearer``
or a ``token`` cookie), or it gets 401. Requests from a browser page must come
from an allowed origin, or they get 403. ``/`` greets the user and echoes with
their name; ``/admin`` is for admins only (403 for the others): it lists the
open connections and closes one on ``kick <id>``.

Try it with the two tokens below, e.g. ``ws://127.0.0.1:8765/?token=alice-token``.
The tokens are in the source for the example's sake; keep real ones out of it.
Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import functools
import signal
import sys

import trio

from wsnursery import (
    Reject,
    TokenAuth,
    WebSocketConnection,
    WebSocketHandler,
    WebSocketRequest,
    serve_websocket,
)

TOKENS = {"alice-token": "alice", "bob-token": "bob"}  # token -> user
ADMINS = {"alice"}
# The origins of the web pages allowed to connect. Clients that are not
# browsers send no Origin header and are let through (they still need a token).
ALLOWED_ORIGINS = ["https://app.example.com", "http://localhost:8000"]


class Greeter(WebSocketHandler):
    """Authentication already happened: ``conn.user`` is the token's user."""

    async def on_connect(self, conn: WebSocketConnection) -> None:
        await conn.send_message(f"hello, {conn.user}")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        await conn.send_message(f"{conn.user}: {text}")


class Admin(WebSocketHandler):
    """Authorization on top of authentication: only ADMINS get in."""

    async def validate(self, request: WebSocketRequest) -> Reject | None:
        if request.user not in ADMINS:
            return Reject(403, body="admins only\n")
        return None

    async def on_connect(self, conn: WebSocketConnection) -> None:
        registry = conn.server.connections  # every connection open on this server
        # A copy: connections come and go while this loop awaits.
        for other in list(registry.values()):
            if other is not conn:
                await conn.send_message(f"{other.id} {other.user} {other.url_path}")
        await conn.send_message(f"{len(registry)} open")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        command, _, target = text.partition(" ")
        if command != "kick" or target == conn.id:
            await conn.send_message("usage: kick <id of another connection>")
            return
        if await conn.server.connections.close(target, 4000, f"kicked by {conn.user}"):
            await conn.send_message(f"closed {target}")
        else:
            await conn.send_message(f"no connection {target}")


async def main(port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(
                serve_websocket,
                {"/": Greeter(), "/admin": Admin()},
                "127.0.0.1",
                port,
                authenticator=TokenAuth(TOKENS),  # runs before every route's handler
                allowed_origins=ALLOWED_ORIGINS,
            )
            server = await nursery.start(serve)
            print(f"listening on ws://127.0.0.1:{server.port}/", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", flush=True)
                break
            nursery.cancel_scope.cancel()
    print("stopped", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
