"""The command line: ``python -m wsnursery echo ...``."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from ._connection import WebSocketConnection
from ._handler import WebSocketHandler
from ._server import WebSocketRequest, WebSocketServer, serve_websocket

__all__ = ["main"]


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


async def serve_until_signal(
    serve: Callable[..., Awaitable[None]], banner: Callable[[WebSocketServer], str]
) -> None:
    """Start ``serve`` (a :func:`serve_websocket` partial), print ``banner(server)``.

    Then wait for SIGINT or SIGTERM and stop gracefully (1001 to every client).
    """
    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(serve)
        print(banner(server), flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"got {signal.Signals(signum).name}; closing connections", flush=True)
                break
        await server.aclose()
        nursery.cancel_scope.cancel()


async def _run_echo(args: argparse.Namespace) -> None:
    await serve_until_signal(
        functools.partial(
            serve_websocket,
            EchoHandler() if args.api == "handler" else echo_handler,
            args.host,
            args.port,
            max_message_size=args.max_message_size,
            compression=not args.no_compression,
        ),
        lambda server: f"wsnursery echo server on ws://{args.host}:{server.port}/ (Ctrl-C to stop)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsnursery", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    commands = parser.add_subparsers(dest="command", required=True)
    echo = commands.add_parser("echo", help="run an echo server")
    echo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    echo.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 for any)")
    echo.add_argument(
        "--max-message-size",
        type=int,
        default=16 * 2**20,
        help="largest message accepted, in bytes (default 16 MiB)",
    )
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
    # Other commands live in their own modules; each adds its parser and sets
    # ``run`` (a plain function taking the parsed arguments).
    from ._chat import add_command as add_chat

    add_chat(commands)
    from ._connect_cli import add_command as add_connect

    add_connect(commands)
    from ._serve_cli import add_command as add_serve

    add_serve(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``wsnursery`` and ``python -m wsnursery``."""
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(message)s")
    args.run(args)
    sys.exit(0)
