"""The command line keeps its promises (issue 10), checked on the real command.

Every test runs ``python -m wsnursery ...`` as a subprocess, with standard
output and standard error kept apart, and talks to it over 127.0.0.1 only:

* a user's mistake (a port in use, an unknown host, a bad URL, a missing TLS
  file, a bad option value, a missing app) gives one ``wsnursery CMD: error:``
  line on standard error and a non-zero status, never a traceback;
* a second SIGINT during a graceful stop ends the server at once;
* ``--max-connections`` reaches the server;
* ``--help`` of every command is readable.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from _helpers import (
    HOST,
    FrameReader,
    build_frame,
    checkout_env,
    close_payload,
    raw_connect,
    read_response,
    serving,
    upgrade_request,
)

TIME_LIMIT = 20.0  # seconds for any one command
OP_CLOSE = 8
ECHO_APP = "wsnursery._cli.echo:echo_handler"  # an importable app for ``serve``
SERVERS = {
    "echo": ["echo"],
    "chat": ["chat"],
    "serve": ["serve", ECHO_APP],
}


@dataclass
class Result:
    status: int
    out: str
    err: str

    def assert_no_traceback(self) -> None:
        for text in (self.out, self.err):
            assert "Traceback" not in text, text
            assert "ExceptionGroup" not in text, text

    def assert_one_error(self, command: str, pattern: str, status: int) -> None:
        """One ``wsnursery COMMAND: error: ...`` line on standard error, and ``status``."""
        self.assert_no_traceback()
        assert self.status == status, self
        lines = self.err.splitlines()
        assert len(lines) == 1, self
        assert re.search(rf"^wsnursery {command}: error: {pattern}", lines[0]), self


async def run_cli(*args: str, cwd: Path | None = None, timeout: float = TIME_LIMIT) -> Result:
    """Run ``python -m wsnursery ARGS`` to its end; standard input stays open (no EOF)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wsnursery", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=checkout_env(),
        cwd=cwd,
    )
    try:
        with trio.fail_after(timeout):
            return await _finish(proc)
    finally:
        await _kill(proc)


async def _finish(proc: trio.Process, out: bytes = b"") -> Result:
    """Read both outputs to their end, then the status."""
    chunks: dict[str, bytes] = {"out": out, "err": b""}

    async def drain(name: str, stream: Any) -> None:
        while data := await stream.receive_some(65536):
            chunks[name] += data

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, "out", proc.stdout)
        nursery.start_soon(drain, "err", proc.stderr)
    status = await proc.wait()
    return Result(status, chunks["out"].decode(errors="replace"), chunks["err"].decode())


async def _kill(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
    if proc.stdin is not None:
        with trio.CancelScope(shield=True):
            await proc.stdin.aclose()


@asynccontextmanager
async def server_process(*args: str) -> AsyncIterator[tuple[trio.Process, int, bytes]]:
    """Start a server command on port 0; yield it, its port and its banner."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wsnursery", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=checkout_env(),
    )
    try:
        assert proc.stdout is not None
        banner = b""
        with trio.fail_after(TIME_LIMIT):
            while b"\n" not in banner:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"no banner: {banner!r}"
                banner += chunk
        match = re.search(rb"://127\.0\.0\.1:(\d+)/", banner)
        assert match, banner
        yield proc, int(match.group(1)), banner
    finally:
        await _kill(proc)


@contextmanager
def port_in_use() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def serve_plain_http(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A web server that is not a WebSocket server: 200 and a page for everything."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await read_response_head(stream)
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n"
                    b"Connection: close\r\n\r\nhello"
                )
            except (trio.BrokenResourceError, EOFError):
                pass

    listeners = await trio.open_tcp_listeners(0, host=HOST)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


async def read_response_head(stream: trio.abc.Stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError
        data += chunk
    return data


# -- 1. connect to something that is not a WebSocket server -------------------------


async def test_connect_to_a_plain_http_server_says_why_without_a_traceback() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_plain_http)
        result = await run_cli("connect", f"ws://{HOST}:{port}/")
        nursery.cancel_scope.cancel()
    result.assert_one_error("connect", r"gave up: .*HTTP 200", 1)
    assert re.search(r"^! attempt 1 failed: .*HTTP 200; not reconnecting$", result.out, re.M)


async def test_connect_with_an_http_url_is_a_user_error_with_a_hint() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_plain_http)
        result = await run_cli("connect", f"http://{HOST}:{port}/")
        nursery.cancel_scope.cancel()
    result.assert_one_error(
        "connect", rf"a WebSocket URL starts with ws:// or wss://.*ws://{HOST}:{port}/", 2
    )


# -- 2. user errors: one line, a status, no traceback -------------------------------


@pytest.mark.parametrize("command", ["echo", "chat", "serve"])
async def test_a_port_in_use_is_one_line_and_status_1(command: str) -> None:
    with port_in_use() as port:
        result = await run_cli(*SERVERS[command], "--port", str(port))
    result.assert_one_error(command, rf"cannot listen on {HOST}:{port}: address already in use$", 1)


@pytest.mark.parametrize("workers", [[], ["--workers", "2", "--local-broadcast"]])
async def test_serve_twice_on_one_port_is_refused_not_shared(workers: list[str]) -> None:
    """SO_REUSEPORT (for the workers) must not let a second ``serve`` share the port."""
    async with server_process("serve", ECHO_APP, *workers) as (_proc, port, _banner):
        result = await run_cli("serve", ECHO_APP, *workers, "--port", str(port), timeout=10)
    result.assert_one_error("serve", rf"cannot listen on {HOST}:{port}: address already in use$", 1)


@pytest.mark.parametrize("command", ["echo", "chat", "serve"])
async def test_an_unknown_host_is_one_line_and_status_1(command: str) -> None:
    result = await run_cli(*SERVERS[command], "--host", "no-such-host.invalid", "--port", "0")
    result.assert_one_error(command, r"cannot listen on no-such-host\.invalid:0: ", 1)


def _not_pem(tmp: Path) -> str:
    path = tmp / "not.pem"
    path.write_text("this is not a certificate\n")
    return str(path)


# (arguments, command, pattern of the error, exit status); "{tmp}" is a temporary folder.
USER_ERRORS = [
    (["connect", "ftp://127.0.0.1:9/"], "connect", r"a WebSocket URL starts with ws://", 2),
    (["connect", "ws://127.0.0.1:99999/"], "connect", r"port out of range 0-65535 in '", 2),
    (["connect", "ws:///"], "connect", r"no host in 'ws:///'", 2),
    (
        ["connect", "wss://127.0.0.1:9/", "--cafile", "{tmp}/missing.pem"],
        "connect",
        r"cannot use --cafile .*missing\.pem",
        2,
    ),
    (
        ["connect", "wss://127.0.0.1:9/", "--cafile", "{not_pem}"],
        "connect",
        r"cannot use --cafile .*not\.pem",
        2,
    ),
    (
        ["connect", "wss://127.0.0.1:9/", "--cert", "{tmp}/missing.pem"],
        "connect",
        r"cannot use --cert .*missing\.pem",
        2,
    ),
    (
        ["connect", "wss://127.0.0.1:9/", "--key", "{tmp}/missing.pem"],
        "connect",
        r"--key needs --cert",
        2,
    ),
    (
        ["connect", "ws://127.0.0.1:9/", "--header", "no colon"],
        "connect",
        r"--header wants 'Name: value'",
        2,
    ),
    (
        ["connect", "ws://127.0.0.1:9/", "--max-attempts", "0"],
        "connect",
        r"argument --max-attempts: must be at least 1",
        2,
    ),
    (
        ["connect", "ws://127.0.0.1:9/", "--ping-interval", "-1"],
        "connect",
        r"argument --ping-interval: ",
        2,
    ),
    (
        ["connect", "ws://127.0.0.1:9/", "--max-message-size", "-1"],
        "connect",
        r"argument --max-message-size: ",
        2,
    ),
    (["echo", "--port", "70000"], "echo", r"argument --port: must be from 0 to 65535", 2),
    (["echo", "--port", "http"], "echo", r"argument --port: ", 2),
    (["echo", "--max-message-size", "-1"], "echo", r"argument --max-message-size: ", 2),
    (["echo", "--max-connections", "-1"], "echo", r"argument --max-connections: ", 2),
    (["chat", "--port", "-1"], "chat", r"argument --port: must be from 0 to 65535", 2),
    (["chat", "--max-connections", "x"], "chat", r"argument --max-connections: ", 2),
    (
        ["serve", ECHO_APP, "--port", "70000"],
        "serve",
        r"argument --port: must be from 0 to 65535",
        2,
    ),
    (["serve", "no_such_module_here:app"], "serve", r"cannot load no_such_module_here:app", 2),
    (["serve", "wsnursery:no_such_thing"], "serve", r"cannot load wsnursery:no_such_thing", 2),
    (["serve", "os:sep"], "serve", r"cannot serve os:sep: ", 2),
    (["serve", "nocolon"], "serve", r"cannot load nocolon: expected MODULE:ATTR", 2),
]


@pytest.mark.parametrize(
    ("args", "command", "pattern", "status"),
    USER_ERRORS,
    ids=[" ".join(case[0]) for case in USER_ERRORS],
)
async def test_a_user_error_is_one_line_and_no_traceback(
    tmp_path: Path, args: list[str], command: str, pattern: str, status: int
) -> None:
    args = [a.format(tmp=tmp_path, not_pem=_not_pem(tmp_path)) for a in args]
    result = await run_cli(*args)
    result.assert_no_traceback()
    assert result.status == status, result
    assert result.err, result
    # argparse's own errors come after its usage lines; ours come alone.
    last = result.err.splitlines()[-1]
    assert re.search(rf"^wsnursery {command}: error: {pattern}", last), result
    if not pattern.startswith("argument "):
        assert len(result.err.splitlines()) == 1, result


async def test_ctrl_c_while_the_app_loads_is_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "slow_app.py").write_text(
        "import sys, time\nprint('loading', flush=True)\ntime.sleep(30)\napp = None\n"
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wsnursery", "serve", "slow_app:app", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=checkout_env(),
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(TIME_LIMIT):
            first = await proc.stdout.receive_some()
            assert first.startswith(b"loading"), first
            proc.send_signal(signal.SIGINT)
            result = await _finish(proc)
    finally:
        await _kill(proc)
    result.assert_no_traceback()
    assert result.status == 130, result
    assert result.err.splitlines() == ["wsnursery serve: interrupted"], result


# -- 3. a second SIGINT ends a graceful stop at once --------------------------------


async def _close_frame(reader: FrameReader) -> int | None:
    """Read frames up to the close frame; its code."""
    while True:
        frame = await reader.read_frame()
        assert frame is not None, "end of stream before a close frame"
        if frame.opcode == OP_CLOSE:
            return frame.close_code


@pytest.mark.parametrize("command", ["echo", "chat", "serve"])
async def test_a_second_sigint_stops_at_once(command: str) -> None:
    async with server_process(*SERVERS[command]) as (proc, port, _banner):
        with trio.fail_after(TIME_LIMIT):
            stream, reader, _head = await raw_connect(port)
            proc.send_signal(signal.SIGINT)
            # The graceful stop began: 1001 came; we never answer it, so the
            # server would wait its close_timeout (10 s) for us.
            assert await _close_frame(reader) == 1001
            await trio.sleep(0.2)
            assert proc.returncode is None, "stopped without waiting for the close"
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(1.5):
                result = await _finish(proc)
        await stream.aclose()
    result.assert_no_traceback()
    assert result.status == 1, result
    assert re.search(r"second signal; stopping now$", result.err, re.M), result


STUBBORN_APP = """
import trio

async def app(request):
    conn = await request.accept()
    with trio.CancelScope(shield=True):  # ignores its connection's end and any cancel
        await trio.sleep(60)
"""


async def test_a_second_sigint_stops_even_a_handler_that_never_returns(tmp_path: Path) -> None:
    (tmp_path / "stubborn_app.py").write_text(STUBBORN_APP)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wsnursery", "serve", "stubborn_app:app", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=checkout_env(),
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(TIME_LIMIT):
            banner = await proc.stdout.receive_some()
            match = re.search(rb"://127\.0\.0\.1:(\d+)/", banner)
            assert match, banner
            stream, reader, _head = await raw_connect(int(match.group(1)))
            proc.send_signal(signal.SIGINT)
            assert await _close_frame(reader) == 1001
            await stream.send_all(build_frame(OP_CLOSE, close_payload(1001)))
            await trio.sleep(0.3)
            assert proc.returncode is None, "stopped although its handler still runs"
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(1.5):
                result = await _finish(proc, banner)
            await stream.aclose()
    finally:
        await _kill(proc)
    result.assert_no_traceback()
    assert result.status == 1, result
    assert "second signal; stopping now" in result.err, result


@pytest.mark.parametrize("command", ["echo", "chat", "serve"])
async def test_one_sigint_stops_gracefully_with_1001_and_status_0(command: str) -> None:
    async with server_process(*SERVERS[command]) as (proc, port, _banner):
        with trio.fail_after(TIME_LIMIT):
            stream, reader, _head = await raw_connect(port)
            proc.send_signal(signal.SIGINT)
            assert await _close_frame(reader) == 1001
            await stream.send_all(build_frame(OP_CLOSE, close_payload(1001)))
            result = await _finish(proc)
            await stream.aclose()
    result.assert_no_traceback()
    assert result.status == 0, result


# -- 4. --max-connections ---------------------------------------------------------


@pytest.mark.parametrize("command", ["echo", "chat", "serve"])
async def test_max_connections_reaches_the_server(command: str) -> None:
    async with server_process(*SERVERS[command], "--max-connections", "1") as (_proc, port, _):
        with trio.fail_after(TIME_LIMIT):
            first, _reader, _head = await raw_connect(port)
            second = await trio.open_tcp_stream(HOST, port)
            await second.send_all(upgrade_request())
            assert (await read_response(second)).status == 503
            await second.aclose()
            await first.aclose()


@pytest.mark.parametrize("command", ["echo", "chat"])
async def test_max_connections_0_means_no_limit(command: str) -> None:
    async with server_process(*SERVERS[command], "--max-connections", "0") as (_proc, port, _):
        with trio.fail_after(TIME_LIMIT):
            streams = [(await raw_connect(port))[0] for _ in range(3)]
            for stream in streams:
                await stream.aclose()


# -- 5. --help ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["echo", "chat", "connect", "serve"])
async def test_help_is_readable(command: str) -> None:
    result = await run_cli(command, "--help")
    result.assert_no_traceback()
    assert result.status == 0, result
    assert result.err == ""
    text = result.out
    assert text.startswith(f"usage: wsnursery {command} "), text
    # A description between the usage and the options.
    _usage, _, rest = text.partition("\n\n")
    description, _, options = rest.partition("\n\n")
    assert description, text
    assert not description.startswith(("options:", "positional")), text
    # Every option says what it is for, with a short metavar (not a long dest name).
    for line in options.splitlines():
        match = re.match(r"^  (-\S+)(?: (\S+))?(.*)$", line)
        if match:
            _option, metavar, help_text = match.groups()
            assert metavar is None or len(metavar) <= 10 or metavar.startswith("{"), line
            if not help_text.strip():  # the help text is on the next line
                following = options.splitlines()[options.splitlines().index(line) + 1]
                assert following.startswith(" " * 10), line
    if command in ("echo", "chat", "serve"):
        assert "--max-connections" in text, text


# -- connect when nobody reads its output any more ----------------------------------


async def test_connect_piped_into_a_reader_that_leaves_ends_quietly() -> None:
    async def chatty(request: Any) -> None:
        conn = await request.accept()
        while True:
            await conn.send_message("news")
            await trio.sleep(0.01)

    async with serving(chatty) as server:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "wsnursery", "connect", f"ws://{HOST}:{server.port}/"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=checkout_env(),
        )
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            with trio.fail_after(TIME_LIMIT):
                seen = b""
                while b"< news" not in seen:
                    seen += await proc.stdout.receive_some()
                await proc.stdout.aclose()  # as ``| head`` does once it has enough
                err = b""
                while chunk := await proc.stderr.receive_some():
                    err += chunk
                status = await proc.wait()
        finally:
            await _kill(proc)
    assert b"Traceback" not in err, err
    assert err == b"", err
    assert status == 1


def test_banners_put_an_ipv6_address_in_brackets() -> None:
    from wsnursery._cli import url_host

    assert url_host("::1") == "[::1]"
    assert url_host("127.0.0.1") == "127.0.0.1"
    assert url_host("") == "0.0.0.0"


def test_a_keyboard_interrupt_inside_a_nursery_is_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C where no signal receiver is open comes out of trio.run in a group."""
    from wsnursery import _cli
    from wsnursery._cli import echo

    async def interrupted(args: Any) -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise KeyboardInterrupt
        return 0  # pragma: no cover

    monkeypatch.setattr(echo, "_run_echo", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["echo", "--port", "0"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "wsnursery echo: interrupted\n"


@pytest.mark.parametrize(
    ("option", "pattern"),
    [
        (["--header", "Bad Name: v"], r"--header: 'Bad Name' is not a valid header name"),
        (["--header", "X-A: a\rb"], r"--header: the value of 'X-A' has a control character"),
        (["--header", "X-A: \u65e5\u672c"], r"--header: the value of 'X-A' is not Latin-1"),
        (["--header", "Host: other"], r"--header: the client sets Host itself"),
        (["--header", "sec-websocket-key: x"], r"--header: the client sets sec-websocket-key"),
        (["--subprotocol", "a b"], r"--subprotocol: 'a b' is not a valid subprotocol name"),
        (["--subprotocol", ""], r"--subprotocol: '' is not a valid subprotocol name"),
    ],
)
async def test_connect_checks_headers_and_subprotocols_before_sending_them(
    option: list[str], pattern: str
) -> None:
    async def echo(request: Any) -> None:
        conn = await request.accept()
        async for message in conn:
            await conn.send_message(message)

    async with serving(echo) as server:
        result = await run_cli("connect", "--no-reconnect", f"ws://{HOST}:{server.port}/", *option)
    result.assert_one_error("connect", pattern, 2)


@pytest.mark.parametrize("command", ["echo", "chat", "serve"])
async def test_a_server_whose_output_reader_left_still_stops_gracefully(command: str) -> None:
    """``wsnursery echo | tee log``, then Ctrl-C: tee is gone before the server's last line."""
    async with server_process(*SERVERS[command]) as (proc, port, _banner):
        assert proc.stdout is not None
        with trio.fail_after(TIME_LIMIT):
            stream, reader, _head = await raw_connect(port)
            await proc.stdout.aclose()
            proc.send_signal(signal.SIGINT)
            assert await _close_frame(reader) == 1001
            await stream.send_all(build_frame(OP_CLOSE, close_payload(1001)))
            assert proc.stderr is not None
            err = b""
            while chunk := await proc.stderr.receive_some():
                err += chunk
            status = await proc.wait()
            await stream.aclose()
    assert b"Traceback" not in err, err
    assert status == 0, err
