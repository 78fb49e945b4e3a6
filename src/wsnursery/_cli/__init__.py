"""The command line: ``python -m wsnursery echo ...``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

from .._server import HandlerSpec, WebSocketServer

__all__ = ["main"]


# -- shared by every command ------------------------------------------------------------

EXIT_FAILURE = 1  # the command could not do its job (a port in use, a server that refused)
EXIT_USAGE = 2  # the command line is wrong (as for argparse's own errors)
EXIT_INTERRUPTED = 130  # Ctrl-C before the command could handle it (128 + SIGINT)


def say(text: str, file: TextIO | None = None) -> None:
    """Print a line (on standard output by default) and flush it.

    If nobody reads that stream any more (``wsnursery echo | tee log`` after a
    Ctrl-C that ended ``tee`` too), the line is dropped and so is everything
    after it, rather than the command failing on its way out.
    """
    stream = sys.stdout if file is None else file
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # Python's last flush at exit fails no more
        os.close(devnull)


def error(command: str, message: str) -> None:
    """Print ``wsnursery COMMAND: error: MESSAGE`` on standard error: one line."""
    say(f"wsnursery {command}: error: {message}", sys.stderr)


def os_error_text(exc: OSError) -> str:
    """The reason of an OSError in a few words: "address already in use"."""
    if isinstance(exc, socket.gaierror):
        text = exc.strerror or str(exc)
    elif exc.errno:
        text = os.strerror(exc.errno)
    else:
        text = str(exc)
    return text[:1].lower() + text[1:]


def url_host(host: str | None) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets; every interface as 0.0.0.0."""
    shown = host or "0.0.0.0"
    return f"[{shown}]" if ":" in shown else shown


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def port_number(text: str) -> int:
    """argparse type of ``--port``: 0 to 65535."""
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, not {value}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer, at least ``minimum``."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


positive_int = int_at_least(1)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (math.inf, -math.inf):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def seconds(text: str) -> float:
    """argparse type of a duration that may be 0 (off): 0 or more seconds."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or more seconds, not {text}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type of a duration: more than 0 seconds."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def limit(text: str) -> int | None:
    """argparse type of a limit: a positive integer, or 0 for none (None)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, not {value}")
    return value or None


def add_server_options(parser: argparse.ArgumentParser, *, max_message_size: int | None) -> None:
    """``--host``, ``--port`` and ``--max-connections``, the same for every server command."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=port_number, default=8765, help="port (default 8765; 0 for any free one)"
    )
    parser.add_argument(
        "--max-connections",
        type=limit,
        default=4096,
        metavar="N",
        help="open connections before new clients get HTTP 503 (default 4096; 0 for no limit)",
    )
    if max_message_size is not None:
        parser.add_argument(
            "--max-message-size",
            type=limit,
            default=max_message_size,
            metavar="BYTES",
            help=f"largest message accepted (default {max_message_size // 2**20} MiB; "
            "0 for no limit)",
        )


async def abort_connections(server: WebSocketServer) -> None:
    """Close every connection of ``server`` at once, without waiting for its peer.

    A cancelled :meth:`WebSocketConnection.aclose` closes the transport at once:
    the graceful stop in progress then finds nothing left to wait for.

    Args:
        server: The server whose open connections to close.

    Cancellation:
        Every connection is closed anyway: each ``aclose`` runs already cancelled.
    """
    for conn in server.connections.values():
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.aclose(1001, "server shutting down")


async def stop_gracefully(server: WebSocketServer, signals: Any, name: str) -> int:
    """``server.aclose()`` (1001 to every client); a signal meanwhile stops it at once.

    At a second signal every connection is closed without waiting for its peer
    (:func:`abort_connections`); if the server's handlers still have not
    returned ``_FORCED_STOP_GRACE`` seconds later, the process exits (status 1).

    Args:
        server: The running server to stop.
        signals: The open signal receiver whose first signal started the stop.
        name: ``wsnursery COMMAND`` (or a worker's name), for the message.

    Returns:
        0 after a graceful stop, 1 after a forced one.

    Cancellation:
        Only stops waiting, as for :meth:`WebSocketServer.aclose`.
    """
    forced = False

    async def on_second_signal() -> None:
        nonlocal forced
        async for _signum in signals:
            forced = True
            say(f"{name}: second signal; stopping now", sys.stderr)
            await abort_connections(server)
            # A handler that ignores its closed connection would still hold the
            # stop: this process ends anyway, a moment later.
            await trio.sleep(_FORCED_STOP_GRACE)
            say(f"{name}: handlers still running; exiting", sys.stderr)
            os._exit(EXIT_FAILURE)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_second_signal)
        await server.aclose()
        nursery.cancel_scope.cancel()
    return EXIT_FAILURE if forced else 0


_FORCED_STOP_GRACE = 0.5  # seconds handlers get to return after a second signal


async def serve_until_signal(
    command: str,
    handler: HandlerSpec,
    args: argparse.Namespace,
    banner: Callable[[WebSocketServer], str],
    **options: Any,
) -> int:
    """Serve ``handler`` on ``args.host:args.port`` until SIGINT or SIGTERM.

    Prints ``banner(server)`` once it listens. The first signal stops gracefully
    (1001 to every client, waiting up to ``close_timeout`` for their answers); a
    second one stops at once (:func:`stop_gracefully`).

    Args:
        command: The command's name, for its messages.
        handler: What :class:`WebSocketServer` serves.
        args: The parsed command line (``host``, ``port``, ``max_connections``).
        banner: The line printed once the server listens.
        **options: More :class:`WebSocketServer` keywords.

    Returns:
        The exit status: 0; 1 if it could not listen (one line on standard
        error) or was stopped by a second signal.

    Cancellation:
        Stops the server gracefully, as a signal does.
    """
    name = f"wsnursery {command}"
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            listeners = await trio.open_tcp_listeners(args.port, host=args.host)
        except OSError as exc:
            error(command, f"cannot listen on {args.host}:{args.port}: {os_error_text(exc)}")
            return EXIT_FAILURE
        server = WebSocketServer(
            handler, listeners, max_connections=args.max_connections, **options
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            say(banner(server))
            async for signum in signals:
                name_ = signal.Signals(signum).name
                say(f"got {name_}; closing connections (again to stop at once)")
                break
            status = await stop_gracefully(server, signals, name)
            nursery.cancel_scope.cancel()
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsnursery", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    commands = parser.add_subparsers(dest="command", required=True)
    # Each command lives in its own module, imported only when the parser is
    # built (they import this package's helpers); each adds its parser and sets
    # ``run`` (a plain function taking the parsed arguments).
    from . import chat, connect, echo, serve

    for command in (echo, chat, connect, serve):
        command.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``wsnursery`` and ``python -m wsnursery``.

    Each command's ``run`` returns its exit status (None for 0). A user's
    mistake is one ``wsnursery COMMAND: error:`` line on standard error, never
    a traceback; so is a Ctrl-C that comes before the command listens for it.
    """
    name = "wsnursery"
    try:
        args = _parser().parse_args(argv)
        name = f"wsnursery {args.command}"
        level = logging.WARNING - 10 * args.verbose
        logging.basicConfig(
            level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(message)s"
        )
        status = args.run(args)
    except KeyboardInterrupt:
        _interrupted(name)
    except BaseExceptionGroup as group:
        # Ctrl-C inside a nursery, where no signal receiver was open.
        if group.split(KeyboardInterrupt)[1] is not None:
            raise
        _interrupted(name)
    sys.exit(status or 0)


def _interrupted(name: str) -> NoReturn:
    say(f"{name}: interrupted", sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
