"""``python -m wsnursery echo``: an echo server, with a handler object or a function."""

from __future__ import annotations

import argparse

import trio

from .._connection import WebSocketConnection
from .._handler import WebSocketHandler
from .._server import WebSocketRequest
from . import add_server_options, serve_until_signal, url_host

__all__ = ["EchoHandler", "add_command", "echo_handler"]


async def echo_handler(request: WebSocketRequest) -> None:
    """Accept, then send every message back as it came (text as text)."""
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


class EchoHandler(WebSocketHandler):
    """The same echo as a handler object: its hooks run in the connection's task."""

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        await conn.send_message(text)

    async def on_binary(self, conn: WebSocketConnection, data: bytes) -> None:
        await conn.send_message(data)


async def _run_echo(args: argparse.Namespace) -> int:
    return await serve_until_signal(
        "echo",
        EchoHandler() if args.api == "handler" else echo_handler,
        args,
        lambda server: (
            f"wsnursery echo server on ws://{url_host(args.host)}:{server.port}/ (Ctrl-C to stop)"
        ),
        max_message_size=args.max_message_size,
        compression=not args.no_compression,
    )


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``echo`` to the command line's subcommands."""
    echo = commands.add_parser(
        "echo",
        help="run an echo server",
        description="An echo server: every message comes back as it came (text as text). "
        "Ctrl-C stops it gracefully (1001 to every client); a second Ctrl-C at once.",
    )
    add_server_options(echo, max_message_size=16 * 2**20)
    echo.add_argument(
        "--no-compression", action="store_true", help="do not accept permessage-deflate"
    )
    echo.add_argument(
        "--api",
        choices=("handler", "function"),
        default="handler",
        help="serve with a WebSocketHandler (default) or an async handler function",
    )
    echo.set_defaults(run=lambda args: trio.run(_run_echo, args))
