"""``python -m wsnursery connect URL``: an interactive client that reconnects.

Each line typed (or piped) on standard input is sent as a text message. What
happens is printed on standard output, one line each, with a sign in front:

* ``<`` something received: a message (``< (binary, N bytes) hex`` for binary),
  a ping, a pong, a close frame;
* ``>`` something sent (typed lines are repeated only when standard input is
  not a terminal, which already shows them);
* ``=`` the connection opened or closed;
* ``!`` an attempt failed: why, and the wait before the next one.

End of input (Ctrl-D) closes the connection with 1000 and exits; Ctrl-C closes
it with 1001. The exit status is 1 when the client gave up (with one
``wsnursery connect: error: gave up: ...`` line on standard error), 2 for a
mistake in the command line (a URL that is not ``ws://`` or ``wss://``, a
TLS file that cannot be read, a malformed ``--header``), 0 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import ssl
import sys
from typing import Any

import trio

from .._client import _parse_url, control_observer
from .._reconnect import (
    Backoff,
    ClientEvent,
    CloseEvent,
    ErrorEvent,
    OpenEvent,
    ReadyState,
    ReconnectingWebSocket,
    open_reconnecting_websocket,
)
from .._sansio.exceptions import CloseReason, ConnectionClosed, HandshakeError, TransportError
from .._sansio.headers import check_client_request
from .._tls import NONE, SYSTEM, StrPath, TrustStore
from . import EXIT_FAILURE, EXIT_USAGE, error, limit, os_error_text, positive_int, seconds

__all__ = ["add_command"]

# Control characters would move the cursor or worse: show them escaped.
_ESCAPES = str.maketrans(
    {i: repr(chr(i))[1:-1] for i in itertools.chain(range(32), range(127, 160))}
)
_MAX_HEX = 64  # bytes of a binary message shown


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``connect`` to the command line's subcommands."""
    connect = commands.add_parser(
        "connect",
        help="an interactive client: send typed lines, print what comes",
        description=(
            "Connect to a WebSocket server, send each line of standard input as a text "
            "message and print what comes back (messages, pings, pongs, close frames). "
            "Reconnects with exponential backoff unless --no-reconnect."
        ),
    )
    connect.add_argument("url", help="ws:// or wss:// URL")
    connect.add_argument(
        "--subprotocol",
        action="append",
        default=[],
        metavar="NAME",
        help="propose a subprotocol (repeat for several, in order of preference)",
    )
    connect.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="add a request header (repeatable)",
    )
    tls = connect.add_mutually_exclusive_group()
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate (testing only!)",
    )
    tls.add_argument("--cafile", metavar="PEM", help="verify the server against these CAs")
    connect.add_argument("--cert", metavar="PEM", help="client certificate (with its key)")
    connect.add_argument("--key", metavar="PEM", help="client key, if not in --cert")
    connect.add_argument(
        "--no-reconnect", action="store_true", help="exit when the connection ends or fails"
    )
    connect.add_argument(
        "--max-attempts",
        type=positive_int,
        default=None,
        metavar="N",
        help="give up after N failed attempts in a row (default: never)",
    )
    connect.add_argument(
        "--ping-interval",
        type=seconds,
        default=20.0,
        metavar="SECONDS",
        help="keep-alive ping interval (default 20; 0 disables)",
    )
    connect.add_argument(
        "--max-message-size",
        type=limit,
        default=16 * 2**20,
        metavar="BYTES",
        help="largest message accepted (default 16 MiB; 0 for no limit)",
    )
    connect.add_argument(
        "--no-compression", action="store_true", help="do not offer permessage-deflate"
    )
    connect.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        _check(args)
    except _UsageError as exc:
        error("connect", str(exc))
        return EXIT_USAGE
    return trio.run(_main, args)


class _UsageError(Exception):
    """A mistake in the command line, found before connecting."""


def _check(args: argparse.Namespace) -> None:
    """Find the command line's mistakes now rather than at each attempt.

    Sets ``args.headers`` to the parsed ``--header`` values.
    """
    try:
        _parse_url(args.url)
    except ValueError as exc:
        message = str(exc)
        message = message[:1].lower() + message[1:]
        if args.url not in message:
            message += f" in {args.url!r}"
        scheme, sep, rest = args.url.partition("://")
        better = {"http": "ws", "https": "wss"}.get(scheme.lower())
        if sep and better:
            message += f" (did you mean {better}://{rest}?)"
        raise _UsageError(message) from None
    try:
        args.headers = _headers(args.header)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    for name in args.subprotocol:
        try:
            check_client_request((), [name])
        except ValueError as exc:
            raise _UsageError(f"--subprotocol: {exc}") from None
    if args.key and not args.cert:
        raise _UsageError("--key needs --cert")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    for option, path in (("--cafile", args.cafile), ("--cert", args.cert)):
        if not path:
            continue
        try:
            if option == "--cafile":
                context.load_verify_locations(path)
            else:
                context.load_cert_chain(path, args.key)
        except ssl.SSLError as exc:
            raise _UsageError(f"cannot use {option} {path}: {exc.reason or exc}") from None
        except OSError as exc:
            raise _UsageError(f"cannot use {option} {path}: {os_error_text(exc)}") from None


class _Printer:
    """Writes one line per thing that happened."""

    def __init__(self, url: str, echo: bool) -> None:
        self.url = url
        self.echo = echo  # repeat sent lines (input is not a terminal)
        self.last_error = ""  # why the last attempt failed
        self.session = trio.CancelScope()  # cancelled: the client closes with 1001
        self.output_closed = False

    def line(self, text: str) -> None:
        if self.output_closed:
            return
        try:
            print(text, flush=True)
        except BrokenPipeError:
            # Nobody reads us any more (``... | head``): stop, quietly. Standard
            # output goes to /dev/null so that Python's last flush fails no more.
            self.output_closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            self.session.cancel()

    def received(self, kind: str, value: Any) -> None:
        """Called from the connection's reader as things arrive (``control_observer``)."""
        if kind == "message":
            if isinstance(value, str):
                self.line(f"< {value.translate(_ESCAPES)}")
            else:
                more = "..." if len(value) > _MAX_HEX else ""
                self.line(f"< (binary, {len(value)} bytes) {value[:_MAX_HEX].hex()}{more}")
        elif kind == "close":
            assert isinstance(value, CloseReason)
            self.line(f"< close {_close_text(value.code, value.reason)}")
        elif kind == "pong" and value:
            self.line(f"< pong {value.hex()}")
        else:
            self.line(f"< {kind}")

    def event(self, event: ClientEvent) -> None:
        """Called by the client as connections open, close and fail (``on_event``)."""
        if isinstance(event, OpenEvent):
            details = f"connection {event.number}, attempt {event.attempt}"
            if event.subprotocol is not None:
                details += f", subprotocol {event.subprotocol}"
            self.line(f"= connected to {self.url} ({details})")
        elif isinstance(event, CloseEvent):
            self.line(
                f"= connection {event.number} closed: {_close_text(event.code, event.reason)}"
                f"; {_next(event.delay)}"
            )
        elif isinstance(event, ErrorEvent):
            reason = event.reason
            if event.status_code is not None and str(event.status_code) not in reason:
                reason += f" (HTTP {event.status_code})"
            self.last_error = reason
            self.line(f"! attempt {event.attempt} failed: {reason}; {_next(event.delay)}")


def _close_text(code: int, reason: str) -> str:
    return str(CloseReason(code, reason.translate(_ESCAPES)))


def _next(delay: float | None) -> str:
    return "not reconnecting" if delay is None else f"next attempt in {delay:.2f} s"


def _headers(values: list[str]) -> list[tuple[str, str]]:
    """``'Name: value'`` strings as pairs; ValueError for one HTTP would refuse."""
    headers = []
    for value in values:
        name, sep, rest = value.partition(":")
        name, rest = name.strip(), rest.strip()
        if not sep or not name:
            raise ValueError(f"--header wants 'Name: value', not {value!r}")
        try:
            check_client_request([(name, rest)], ())
        except ValueError as exc:
            raise ValueError(f"--header: {exc}") from None
        headers.append((name, rest))
    return headers


async def _send_lines(client: ReconnectingWebSocket, out: _Printer) -> None:
    """Send each line of standard input; close the client at its end."""
    while True:
        # A thread, abandoned on cancellation: a blocked read cannot be interrupted.
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            break
        text = line.rstrip("\r\n")
        if client.state is not ReadyState.OPEN:
            out.line("(not connected: the line goes out once connected)")
        try:
            await client.send_message(text)
        except ConnectionClosed:
            return  # the client stopped; the event loop reports why
        if out.echo:
            out.line(f"> {text.translate(_ESCAPES)}")
    out.line("> close 1000 (end of input)")
    await client.aclose()


async def _session(args: argparse.Namespace, out: _Printer) -> int:
    cafile: StrPath | TrustStore = SYSTEM
    if args.insecure:
        cafile = NONE
    elif args.cafile:
        cafile = args.cafile
    try:
        async with (
            open_reconnecting_websocket(
                args.url,
                reconnect=not args.no_reconnect,
                on_event=out.event,
                backoff=Backoff(max_attempts=args.max_attempts),
                subprotocols=args.subprotocol,
                extra_headers=args.headers,
                cafile=cafile,
                certfile=args.cert,
                keyfile=args.key,
                ping_interval=args.ping_interval or None,
                max_message_size=args.max_message_size,
                compression=not args.no_compression,
            ) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_send_lines, client, out)
            # Messages were printed as they arrived; take them off the queue.
            async for _message in client:
                pass
            nursery.cancel_scope.cancel()
    except ConnectionClosed:
        pass  # an abnormal end with --no-reconnect: already printed
    except (HandshakeError, TransportError) as exc:
        # The last ErrorEvent said why on standard output, and that we give up.
        error("connect", f"gave up: {out.last_error or exc}")
        return EXIT_FAILURE
    except (ValueError, OSError, ssl.SSLError) as exc:
        error("connect", str(exc))  # not found by _check: say it, without a traceback
        return EXIT_FAILURE
    return 0


async def _main(args: argparse.Namespace) -> int:
    out = _Printer(args.url, echo=not sys.stdin.isatty())
    control_observer.set(out.received)
    out.line(f"connecting to {args.url} (end of input or Ctrl-C to quit)")
    if args.insecure:
        out.line("! --insecure: the server's certificate is NOT verified")
    status = 0
    # The receiver outlives the nursery: ``watch`` may first run after the session
    # ended (a quick failure), and must then find the receiver still open.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    out.line(f"= {signal.Signals(signum).name}: closing")
                    out.session.cancel()  # the client closes with 1001
                    return

            nursery.start_soon(watch)
            with out.session:
                status = await _session(args, out)
            nursery.cancel_scope.cancel()
    return EXIT_FAILURE if out.output_closed else status
