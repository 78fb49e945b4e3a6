"""``python -m wsnursery connect``, and examples/reconnecting_client.py, as real processes.

Each test runs the command as a subprocess with a pipe for standard input,
against a server in this process on 127.0.0.1, and reads its output line by
line under a time limit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import wsnursery
from _helpers import HOST, closed_port, wait_until
from wsnursery import WebSocketRequest

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT = 15.0  # seconds for any one step


class Process:
    """A subprocess whose output is read line by line."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._buffer = b""

    async def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(text.encode() + b"\n")

    async def end_input(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()

    async def expect(self, pattern: str) -> re.Match[str]:
        """The next line matching ``pattern`` (lines before it are kept in ``seen``)."""
        regex = re.compile(pattern)
        assert self.proc.stdout is not None
        with trio.fail_after(TIME_LIMIT):
            while True:
                while b"\n" in self._buffer:
                    raw, self._buffer = self._buffer.split(b"\n", 1)
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    self.seen.append(line)
                    match = regex.search(line)
                    if match:
                        return match
                data = await self.proc.stdout.receive_some(4096)
                if not data:
                    raise AssertionError(f"output ended before {pattern!r}: {self.seen}")
                self._buffer += data

    async def wait(self) -> int:
        """The exit status, once the rest of the output was read."""
        assert self.proc.stdout is not None
        with trio.fail_after(TIME_LIMIT):
            while data := await self.proc.stdout.receive_some(4096):
                self._buffer += data
            self.seen.extend(
                line.rstrip("\r") for line in self._buffer.decode("utf-8", "replace").splitlines()
            )
            self._buffer = b""
            return await self.proc.wait()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT / "src"), env.get("PYTHONPATH")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@asynccontextmanager
async def run(*args: str) -> AsyncIterator[Process]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=ROOT,
    )
    try:
        yield Process(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


def connect(*args: str) -> Any:
    return run("-m", "wsnursery", "connect", *args)


@asynccontextmanager
async def server(
    handler: Callable[[WebSocketRequest], Awaitable[None]], port: int = 0, **kwargs: Any
) -> AsyncIterator[wsnursery.WebSocketServer]:
    async with trio.open_nursery() as nursery:
        srv = await nursery.start(
            partial(wsnursery.serve_websocket, handler, HOST, port, close_timeout=2, **kwargs)
        )
        yield srv
        nursery.cancel_scope.cancel()


def url_of(port: int, scheme: str = "ws") -> str:
    return f"{scheme}://{HOST}:{port}/"


async def test_sends_lines_and_prints_messages_pings_and_the_close() -> None:
    closes: list[int] = []

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        async for message in conn:
            await conn.send_message(message)
            if message == "more":
                await conn.send_message(b"\x00\x01\x02")
                await conn.ping(b"hey")
                await conn.send_message("tab\there")
        closes.append(conn.closed.code if conn.closed else -1)

    async with server(handler) as srv, connect(url_of(srv.port)) as proc:
        await proc.expect(r"^connecting to ws://")
        await proc.expect(
            rf"^= connected to {re.escape(url_of(srv.port))} \(connection 1, attempt 1\)$"
        )
        await proc.send_line("hello ☃")
        await proc.expect(r"^> hello ☃$")
        await proc.expect(r"^< hello ☃$")
        await proc.send_line("more")
        await proc.expect(r"^< more$")
        await proc.expect(r"^< \(binary, 3 bytes\) 000102$")
        await proc.expect(r"^< ping$")
        await proc.expect(r"^< tab\\there$")  # control characters escaped
        await proc.end_input()
        await proc.expect(r"^> close 1000 \(end of input\)$")
        await proc.expect(r"^< close 1000 \(NORMAL_CLOSURE\)$")
        await proc.expect(r"^= connection 1 closed: 1000 \(NORMAL_CLOSURE\); not reconnecting$")
        assert await proc.wait() == 0
    assert closes == [1000]


async def test_reconnects_and_prints_each_retry_and_its_wait() -> None:
    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        async for message in conn:
            if message == "restart":
                await conn.aclose(1012, "restarting")
                return
            await conn.send_message(message)

    async with trio.open_nursery() as nursery:
        first = await nursery.start(serve_until_cancelled, handler, 0)
        port = first.port
        async with connect(url_of(port)) as proc:
            await proc.expect(r"^= connected .*\(connection 1, attempt 1\)$")
            await proc.send_line("restart")
            await proc.expect(r"^< close 1012 \(SERVICE_RESTART\) restarting$")
            await proc.expect(
                r"^= connection 1 closed: 1012 \(SERVICE_RESTART\) restarting; "
                r"next attempt in 0\.\d\d s$"
            )
            await proc.expect(r"^= connected .*\(connection 2, attempt 1\)$")
            await proc.send_line("still here")
            await proc.expect(r"^< still here$")
            first.scope.cancel()  # the server goes away...
            await proc.expect(r"^< close 1001 \(GOING_AWAY\)")
            await proc.expect(r"^= connection 2 closed: 1001 .*; next attempt in 0\.\d\d s$")
            await proc.expect(
                r"^! attempt 1 failed: cannot connect to .*Connection refused; "
                r"next attempt in 0\.\d\d s$"
            )
            second = await nursery.start(serve_until_cancelled, handler, port)  # ...and back
            await proc.expect(r"^= connected .*\(connection 3, attempt \d+\)$")
            await proc.send_line("back")
            await proc.expect(r"^< back$")
            await proc.end_input()
            assert await proc.wait() == 0
        second.scope.cancel()


class Running:
    def __init__(self, port: int, scope: trio.CancelScope) -> None:
        self.port = port
        self.scope = scope


async def serve_until_cancelled(
    handler: Callable[[WebSocketRequest], Awaitable[None]], port: int, task_status: Any
) -> None:
    with trio.CancelScope() as scope:
        async with server(handler, port) as srv:
            task_status.started(Running(srv.port, scope))
            await trio.sleep_forever()


async def test_gives_up_on_403_with_status_1() -> None:
    async def handler(request: WebSocketRequest) -> None:
        await request.reject(403, body="go away")

    async with server(handler) as srv, connect(url_of(srv.port)) as proc:
        await proc.expect(r"^! attempt 1 failed: .*HTTP 403; not reconnecting$")
        assert await proc.wait() == 1


async def test_max_attempts_against_a_closed_port() -> None:
    async with connect(url_of(closed_port()), "--max-attempts", "3") as proc:
        for attempt in (1, 2):
            await proc.expect(rf"^! attempt {attempt} failed: .*; next attempt in 0\.\d\d s$")
        await proc.expect(r"^! attempt 3 failed: .*; not reconnecting$")
        assert await proc.wait() == 1


async def test_no_reconnect_exits_when_the_server_closes() -> None:
    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        await conn.get_message()
        await conn.aclose(1000, "bye")

    async with server(handler) as srv, connect(url_of(srv.port), "--no-reconnect") as proc:
        await proc.expect(r"^= connected")
        await proc.send_line("hi")
        await proc.expect(r"^< close 1000 \(NORMAL_CLOSURE\) bye$")
        await proc.expect(r"^= connection 1 closed: .*; not reconnecting$")
        assert await proc.wait() == 0


async def test_subprotocols_and_headers_reach_the_server() -> None:
    seen: list[Any] = []

    async def handler(request: WebSocketRequest) -> None:
        seen.append(
            (request.subprotocols, request.headers.get("X-Token"), request.headers.get("Origin"))
        )
        conn = await request.accept(subprotocol="chat.v2")
        await conn.wait_closed()

    async with (
        server(handler) as srv,
        connect(
            url_of(srv.port),
            "--subprotocol",
            "chat.v2",
            "--subprotocol",
            "chat.v1",
            "--header",
            "X-Token: s3cret",
            "--header",
            "Origin: https://example.com",
        ) as proc,
    ):
        await proc.expect(r"^= connected .*, subprotocol chat\.v2\)$")
        await proc.end_input()
        assert await proc.wait() == 0
    assert seen == [(["chat.v2", "chat.v1"], "s3cret", "https://example.com")]


async def test_a_bad_header_is_refused() -> None:
    async with connect(url_of(closed_port()), "--header", "no colon") as proc:
        await proc.expect(r"^wsnursery connect: error: --header wants 'Name: value'")
        assert await proc.wait() == 2


async def test_ctrl_c_closes_with_1001() -> None:
    closes: list[int] = []

    async def handler(request: WebSocketRequest) -> None:
        conn = await request.accept()
        closes.append((await conn.wait_closed()).code)

    async with server(handler) as srv, connect(url_of(srv.port)) as proc:
        await proc.expect(r"^= connected")
        proc.proc.send_signal(signal.SIGINT)
        await proc.expect(r"^= SIGINT: closing$")
        assert await proc.wait() == 0
        await wait_until(lambda: bool(closes), TIME_LIMIT)
    assert closes == [1001]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    root = tmp_path_factory.mktemp("cli-pki")
    paths = {"ca": root / "ca.pem", "server": root / "server.pem", "client": root / "client.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    ca.issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(str(paths["server"]))
    ca.issue_cert("cli@example.com").private_key_and_cert_chain_pem.write_to_path(
        str(paths["client"])
    )
    return paths


async def echo(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


async def test_tls_with_cafile_and_a_client_certificate(pki: dict[str, Path]) -> None:
    context = wsnursery.server_ssl_context(pki["server"], client_ca=pki["ca"])
    async with (
        server(echo, ssl_context=context) as srv,
        connect(
            url_of(srv.port, "wss"), "--cafile", str(pki["ca"]), "--cert", str(pki["client"])
        ) as proc,
    ):
        await proc.expect(r"^= connected to wss://")
        await proc.send_line("over tls")
        await proc.expect(r"^< over tls$")
        await proc.end_input()
        assert await proc.wait() == 0


async def test_insecure_connects_to_an_unknown_certificate_and_says_so(
    pki: dict[str, Path],
) -> None:
    context = wsnursery.server_ssl_context(pki["server"])
    async with server(echo, ssl_context=context) as srv:
        async with connect(url_of(srv.port, "wss"), "--insecure") as proc:
            await proc.expect(r"^! --insecure: the server's certificate is NOT verified$")
            await proc.expect(r"^= connected to wss://")
            await proc.send_line("unverified")
            await proc.expect(r"^< unverified$")
            await proc.end_input()
            assert await proc.wait() == 0
        # Without --insecure the unknown CA is refused, and not retried.
        async with connect(url_of(srv.port, "wss")) as proc:
            await proc.expect(r"^! attempt 1 failed: TLS handshake .*; not reconnecting$")
            assert await proc.wait() == 1


async def test_reconnecting_client_example_survives_a_server_restart() -> None:
    async with trio.open_nursery() as nursery:
        first = await nursery.start(serve_until_cancelled, echo, 0)
        port = first.port
        async with run(
            str(ROOT / "examples" / "reconnecting_client.py"), url_of(port), "5"
        ) as proc:
            await proc.expect(r"^connected \(connection 1, attempt 1\)$")
            await proc.expect(r"^echo: tick 2$")
            first.scope.cancel()
            await proc.expect(r"^connection 1 closed with 1001; reconnecting in 0\.\d\d s$")
            second = await nursery.start(serve_until_cancelled, echo, port)
            await proc.expect(r"^connected \(connection 2, attempt \d+\)$")
            assert await proc.wait() == 0
            echoes = [line for line in proc.seen if line.startswith("echo: ")]
            assert len(echoes) == 5
            assert "echo: hello" not in echoes  # on_open took its answer
            assert any(line.startswith("connection 2 closed with 1000; done") for line in proc.seen)
        second.scope.cancel()
