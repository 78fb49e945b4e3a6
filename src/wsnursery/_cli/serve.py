"""``python -m wsnursery serve MODULE:ATTR``: serve an application, in one or N processes.

With ``--workers N`` (N > 1) this process is a supervisor: it starts N worker
processes (``python -m wsnursery serve ... --worker-index I``), each with its
own Trio run and its own listening socket bound to the same port with
``SO_REUSEPORT`` (the kernel spreads new connections over them), and the same
Redis backplane. The supervisor::

    supervisor (trio.run)
    ├─ one task per worker: waits for it to exit
    ├─ readiness pipe reader: one line per worker once it accepts
    └─ main task: SIGINT/SIGTERM -> SIGTERM to every worker (a graceful stop:
       each closes its connections with 1001), then waits for them

Each worker holds the read end of a *lifeline* pipe whose write end only the
supervisor has: if the supervisor dies without stopping them, the pipe reaches
EOF and the workers stop by themselves. A worker that exits on its own makes
the supervisor stop the others and exit with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import trio

from .._handler import build_router
from .._sansio.exceptions import BackplaneError
from .._server import HandlerSpec, WebSocketServer
from . import (
    EXIT_FAILURE,
    EXIT_USAGE,
    add_server_options,
    os_error_text,
    positive_int,
    positive_seconds,
    say,
    stop_gracefully,
    url_host,
)

__all__ = ["add_command", "load_app"]

_PREFIX = "wsnursery serve"


def load_app(spec: str) -> HandlerSpec:
    """Import ``MODULE:ATTR`` (``ATTR`` may be dotted) and return the object.

    The current directory is importable, as with ``python -m``.

    Raises:
        ValueError: ``spec`` is not of the form ``MODULE:ATTR``.
        ImportError, AttributeError: the module or the attribute is missing.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR (e.g. myapp.ws:Chat), not {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the command line's subcommands."""
    serve = commands.add_parser(
        "serve",
        help="serve an application's handler, in one or several worker processes",
        description=(
            "Serve MODULE:ATTR (a handler function, a WebSocketHandler class or instance, "
            "or a mapping of paths to those) on HOST:PORT. With --workers N, N processes "
            "share the port (SO_REUSEPORT) and broadcast to each other through Redis. "
            "Ctrl-C stops gracefully (1001 to every client); a second Ctrl-C at once."
        ),
    )
    serve.add_argument("app", metavar="MODULE:ATTR", help="what to serve, e.g. myapp.ws:Chat")
    add_server_options(serve, max_message_size=None)
    serve.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="worker processes (default 1)",
    )
    serve.add_argument(
        "--redis",
        metavar="URL",
        help="Redis backplane (redis://host:6379/0): broadcasts reach every worker and machine",
    )
    serve.add_argument(
        "--redis-namespace",
        default="wsnursery",
        metavar="PREFIX",
        help="prefix of the Redis channels, to share one Redis between apps (default wsnursery)",
    )
    serve.add_argument(
        "--redis-connect-timeout",
        type=positive_seconds,
        metavar="SECONDS",
        default=5.0,
        help="seconds to reach Redis at start before giving up (default 5)",
    )
    serve.add_argument(
        "--local-broadcast",
        action="store_true",
        help="allow --workers > 1 without --redis: each broadcast then reaches only the "
        "clients of the worker that sends it",
    )
    serve.add_argument(
        "--backlog", type=positive_int, default=1024, metavar="N", help="listen backlog"
    )
    serve.add_argument(
        "--start-timeout",
        type=positive_seconds,
        metavar="SECONDS",
        default=60.0,
        help="seconds for every worker to be ready (default 60)",
    )
    serve.add_argument(
        "--stop-timeout",
        type=positive_seconds,
        metavar="SECONDS",
        default=30.0,
        help="seconds the workers get to stop gracefully before they are killed (default 30)",
    )
    # Internal: how the supervisor starts a worker.
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(run=_run)


def _fail(message: str, status: int = 1) -> NoReturn:
    say(f"{_PREFIX}: error: {message}", sys.stderr)
    sys.exit(status)


def _run(args: argparse.Namespace) -> None:
    if (
        args.worker_index is None
        and args.workers > 1
        and not args.redis
        and not args.local_broadcast
    ):
        _fail(
            f"--workers {args.workers} needs --redis URL: without a Redis backplane a "
            "broadcast from one worker never reaches the clients of the others. Give "
            "--redis redis://HOST:6379/0, or --local-broadcast if the application does "
            "not broadcast (or broadcasts per worker on purpose), or use --workers 1.",
            EXIT_USAGE,
        )
    try:
        handler = load_app(args.app)
    except (ValueError, ImportError, AttributeError) as exc:
        _fail(f"cannot load {args.app}: {exc}", EXIT_USAGE)
    try:
        build_router(handler, {})  # a handler, a WebSocketHandler, or a mapping of those
    except (TypeError, ValueError) as exc:
        _fail(f"cannot serve {args.app}: {exc}", EXIT_USAGE)
    if args.redis:
        from .._redis import RedisBackplane

        try:
            RedisBackplane(args.redis, namespace=args.redis_namespace)  # check the URL now
        except (ImportError, ValueError) as exc:
            _fail(str(exc), EXIT_USAGE)
    if args.worker_index is not None or args.workers == 1:
        status = trio.run(_serve, handler, args)
    else:
        status = trio.run(_supervise, args)
    sys.exit(status)


# -- listening sockets ------------------------------------------------------------------


def _addresses(host: str | None, port: int) -> list[tuple[Any, ...]]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[Any] = set()
    unique = []
    for family, type_, proto, _, sockaddr in infos:
        if (family, sockaddr) not in seen:
            seen.add((family, sockaddr))
            unique.append((family, type_, proto, sockaddr))
    return unique


def _reuseport_socket(
    family: int, type_: int, proto: int, *, reuseport: bool = True
) -> socket.socket:
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _listeners(
    host: str | None, port: int, backlog: int, *, reuseport: bool = True
) -> list[trio.SocketListener]:
    """One listener per address of ``host``, all on ``port``.

    With ``reuseport`` (a worker) they are SO_REUSEPORT sockets, to share the
    port with the other workers; a single process binds the port alone, so that
    a second ``serve`` on the same port fails instead of sharing it.
    """
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, sockaddr in _addresses(host, port):
            sock = _reuseport_socket(family, type_, proto, reuseport=reuseport)
            try:
                sock.bind(sockaddr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def _check_port_free(host: str | None, port: int) -> None:
    """Raise OSError (EADDRINUSE) if anyone listens on ``host:port``.

    The workers' SO_REUSEPORT would otherwise join another server's port (another
    ``serve --workers`` of this user) and split its clients with it.
    """
    for family, type_, proto, sockaddr in _addresses(host, port):
        with _reuseport_socket(family, type_, proto, reuseport=False) as sock:
            sock.bind(sockaddr)


def _reserve_port(host: str | None) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket: its port is free for the workers.

    Kept open until they all listen, so that nobody else takes the port meanwhile;
    it never accepts (only listening sockets share the connections).
    """
    family, type_, proto, sockaddr = _addresses(host, 0)[0]
    sock = _reuseport_socket(family, type_, proto)
    sock.bind(sockaddr)
    return sock


def _url(host: str | None, port: int) -> str:
    return f"ws://{url_host(host)}:{port}/"


# -- one worker (or the only process) ---------------------------------------------------------


async def _serve(handler: HandlerSpec, args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (or the supervisor's death); 0, or 1 if it cannot start."""
    index = args.worker_index
    name = f"{_PREFIX}: worker {index}" if index is not None else _PREFIX
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            listeners = _listeners(args.host, args.port, args.backlog, reuseport=index is not None)
        except OSError as exc:
            say(
                f"{name}: error: cannot listen on {args.host}:{args.port}: {os_error_text(exc)}",
                sys.stderr,
            )
            return EXIT_FAILURE
        backplane: Any = None
        if args.redis:
            from .._redis import RedisBackplane

            backplane = RedisBackplane(
                args.redis,
                namespace=args.redis_namespace,
                connect_timeout=args.redis_connect_timeout,
            )
        server = WebSocketServer(
            handler, listeners, backplane=backplane, max_connections=args.max_connections
        )
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(server.run)
            except BackplaneError as exc:
                say(f"{name}: error: {exc}", sys.stderr)
                for listener in listeners:
                    listener.socket.close()
                return EXIT_FAILURE
            stop = trio.Event()
            watching = await nursery.start(_watch_signals, signals, stop)
            if args.lifeline_fd is not None:
                nursery.start_soon(_watch_lifeline, args.lifeline_fd, stop)
            if args.ready_fd is not None:
                os.write(args.ready_fd, f"ready {index} {os.getpid()}\n".encode())
                os.close(args.ready_fd)
            else:
                say(
                    f"{_PREFIX}: serving {_url(args.host, server.port)} (pid {os.getpid()}; "
                    "Ctrl-C to stop)",
                )
            await stop.wait()
            watching.cancel()
            # Every connection gets 1001; a (further) signal meanwhile: at once.
            status = await stop_gracefully(server, signals, name)
            nursery.cancel_scope.cancel()
    return status


async def _watch_signals(
    signals: Any, stop: trio.Event, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """Set ``stop`` on the first signal; the next ones are for the graceful stop."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        async for signum in signals:
            say(
                f"{_PREFIX}: pid {os.getpid()} got {signal.Signals(signum).name}; "
                "closing connections (again to stop at once)",
                sys.stderr,
            )
            stop.set()
            return


async def _watch_lifeline(fd: int, stop: trio.Event) -> None:
    """Stop when the supervisor is gone (the pipe it holds reads EOF)."""
    await trio.lowlevel.wait_readable(fd)
    say(f"{_PREFIX}: pid {os.getpid()}: the supervisor is gone; stopping", sys.stderr)
    stop.set()


# -- the supervisor ---------------------------------------------------------------------------


def _worker_command(
    args: argparse.Namespace, index: int, port: int, ready: int, life: int
) -> list[str]:
    verbose = ["-v"] * getattr(args, "verbose", 0)
    command = [sys.executable, "-m", "wsnursery", *verbose, "serve", args.app]
    command += ["--host", args.host, "--port", str(port), "--backlog", str(args.backlog)]
    command += ["--max-connections", str(args.max_connections or 0)]
    if args.redis:
        command += ["--redis", args.redis, "--redis-namespace", args.redis_namespace]
        command += ["--redis-connect-timeout", str(args.redis_connect_timeout)]
    command += ["--worker-index", str(index), "--ready-fd", str(ready), "--lifeline-fd", str(life)]
    return command


async def _supervise(args: argparse.Namespace) -> int:
    n: int = args.workers
    try:
        if args.port == 0:
            reserved = _reserve_port(args.host)
        else:
            _check_port_free(args.host, args.port)
            reserved = None
    except OSError as exc:
        say(
            f"{_PREFIX}: error: cannot listen on {args.host}:{args.port}: {os_error_text(exc)}",
            sys.stderr,
        )
        return EXIT_FAILURE
    port = reserved.getsockname()[1] if reserved is not None else args.port
    ready_r, ready_w = os.pipe()
    life_r, life_w = os.pipe()
    os.set_inheritable(ready_w, True)
    os.set_inheritable(life_r, True)
    procs: list[trio.Process] = []
    failed = False
    events_send, events_recv = trio.open_memory_channel[tuple[str, int, int]](math.inf)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for index in range(n):
                    proc = await trio.lowlevel.open_process(
                        _worker_command(args, index, port, ready_w, life_r),
                        pass_fds=(ready_w, life_r),
                        start_new_session=True,  # a terminal's Ctrl-C reaches us; we forward it
                    )
                    procs.append(proc)
                    nursery.start_soon(_wait_worker, proc, index, events_send)
                os.close(ready_w)
                os.close(life_r)
                ready_w = life_r = -1
                nursery.start_soon(_read_ready, ready_r, events_send)

                ready = 0
                stopping_signal = None
                with trio.move_on_after(args.start_timeout) as starting:
                    while ready < n:
                        kind, index, code = await _next(events_recv, signals)
                        if kind == "ready":
                            ready += 1
                        elif kind == "exit":
                            say(
                                f"{_PREFIX}: error: worker {index} (pid {procs[index].pid}) "
                                f"exited with status {code} before it was ready; stopping",
                                sys.stderr,
                            )
                            failed = True
                            break
                        else:
                            stopping_signal = code
                            break
                if starting.cancelled_caught:
                    say(
                        f"{_PREFIX}: error: {n - ready} of {n} workers not ready within "
                        f"{args.start_timeout:g} s; stopping",
                        sys.stderr,
                    )
                    failed = True
                if reserved is not None:
                    reserved.close()
                    reserved = None
                if not failed and stopping_signal is None:
                    pids = ", ".join(str(p.pid) for p in procs)
                    say(
                        f"{_PREFIX}: {n} workers serving {_url(args.host, port)} "
                        f"(pids {pids}; Ctrl-C to stop)",
                    )
                    while True:
                        kind, index, code = await _next(events_recv, signals)
                        if kind == "exit":
                            say(
                                f"{_PREFIX}: error: worker {index} (pid {procs[index].pid}) "
                                f"exited on its own with status {code}; stopping the others",
                                sys.stderr,
                            )
                            failed = True
                            break
                        if kind == "signal":
                            stopping_signal = code
                            break
                if stopping_signal is not None:
                    say(
                        f"{_PREFIX}: got {signal.Signals(stopping_signal).name}; stopping "
                        f"{n} workers",
                        sys.stderr,
                    )
                statuses = await _stop_all(procs, args.stop_timeout, signals)
                nursery.cancel_scope.cancel()
    finally:
        for fd in (ready_r, ready_w, life_r, life_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if reserved is not None:
            reserved.close()
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
    if failed or any(status != 0 for status in statuses):
        return 1
    return 0


async def _next(
    events: trio.MemoryReceiveChannel[tuple[str, int, int]], signals: Any
) -> tuple[str, int, int]:
    """The next worker event, or ("signal", -1, signum) if a signal comes first."""
    result: list[tuple[str, int, int]] = []
    async with trio.open_nursery() as nursery:

        async def on_event() -> None:
            result.append(await events.receive())
            nursery.cancel_scope.cancel()

        async def on_signal() -> None:
            async for signum in signals:
                result.append(("signal", -1, signum))
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(on_event)
        nursery.start_soon(on_signal)
    return result[0]


async def _wait_worker(
    proc: trio.Process, index: int, events: trio.MemorySendChannel[tuple[str, int, int]]
) -> None:
    code = await proc.wait()
    events.send_nowait(("exit", index, code))


async def _read_ready(fd: int, events: trio.MemorySendChannel[tuple[str, int, int]]) -> None:
    """One ``ready INDEX PID`` line per worker, on a pipe they all inherited."""
    stream = trio.lowlevel.FdStream(os.dup(fd))
    buffer = b""
    async with stream:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                fields = line.split()
                if len(fields) == 3 and fields[0] == b"ready":
                    events.send_nowait(("ready", int(fields[1]), 0))


async def _stop_all(procs: Sequence[trio.Process], grace: float, signals: Any) -> list[int]:
    """SIGTERM every live worker, wait ``grace`` s (a second signal: at once), then SIGKILL."""
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)

    async def wait_all() -> None:
        for proc in procs:
            await proc.wait()

    async def second_signal(cancel: trio.CancelScope) -> None:
        async for _ in signals:
            say(f"{_PREFIX}: second signal; killing the workers", sys.stderr)
            cancel.cancel()
            return

    with trio.move_on_after(grace) as waiting:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second_signal, nursery.cancel_scope)
            await wait_all()
            nursery.cancel_scope.cancel()
    if waiting.cancelled_caught:
        say(
            f"{_PREFIX}: workers still running after {grace:g} s; killing them",
            sys.stderr,
        )
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
    for proc in procs:
        await proc.wait()
    return [proc.returncode if proc.returncode is not None else -9 for proc in procs]
