"""The handler examples (examples/handler_*.py) run as docs/howto/handlers.rst shows them.

Each example runs as a subprocess of the interpreter running the tests, on a
free port of 127.0.0.1 (port 0; the test reads the port it prints), under a
hard time limit. The test talks to it with wsnursery's client and, for plain
HTTP, urllib; then stops it with SIGINT sent to its PID and checks that it
exited with status 0, printed no traceback, and said it stopped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from _helpers import checkout_env
from wsnursery import (
    CloseCode,
    ConnectionClosed,
    ConnectionClosedOK,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIME_LIMIT = 20.0  # seconds for any one step; a hang fails the test instead
LISTENING = re.compile(r"listening on (?:ws|http)://127\.0\.0\.1:(\d+)/")


@dataclass
class Example:
    """A running example: its process, its port, and every line it printed so far."""

    process: trio.Process
    port: int = 0
    lines: list[str] = field(default_factory=list)
    _buffer: bytes = b""

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_for(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        """Read output until a line matches ``pattern`` (lines already read count too)."""
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        assert self.process.stdout is not None
        with trio.fail_after(TIME_LIMIT):
            while True:
                data = await self.process.stdout.receive_some(4096)
                if not data:
                    raise AssertionError(f"output ended before {regex.pattern!r}: {self.lines}")
                self._buffer += data
                *complete, self._buffer = self._buffer.split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    self.lines.append(line)
                    if match := regex.search(line):
                        return match

    async def stop(self) -> list[str]:
        """SIGINT to the PID; wait for the exit; return the whole output."""
        os.kill(self.process.pid, signal.SIGINT)
        assert self.process.stdout is not None
        with trio.fail_after(TIME_LIMIT):
            while data := await self.process.stdout.receive_some(4096):
                self._buffer += data
            await self.process.wait()
        if self._buffer:
            self.lines.extend(self._buffer.decode("utf-8", "replace").splitlines())
            self._buffer = b""
        return self.lines


@asynccontextmanager
async def running(script: str) -> AsyncIterator[Example]:
    """``examples/<script> 0`` until the block ends; killed if it is still running."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLES / script), "0"],
        env=checkout_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    example = Example(process)
    try:
        example.port = int((await example.wait_for(LISTENING)).group(1))
        yield example
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


def _assert_stopped_cleanly(example: Example, output: list[str]) -> None:
    assert example.process.returncode == 0, output
    assert "SIGINT: stopping" in output, output
    assert output[-1] == "stopped", output
    assert not any("Traceback" in line or "ERROR" in line for line in output), output


async def _receive(conn: WebSocketConnection) -> str | bytes:
    with trio.fail_after(TIME_LIMIT):
        return await conn.get_message()


async def _rejected(url: str, headers: list[tuple[str, str]] | None = None) -> ConnectionRejected:
    """Open ``url``, expecting a refusal; return it."""
    with trio.fail_after(TIME_LIMIT), pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=headers or []):
            pass
    return info.value


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def _http_blocking(url: str, method: str) -> Response:
    # No proxy from the environment: the server is on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, method=method)
    try:
        with opener.open(request, timeout=TIME_LIMIT) as response:
            return Response(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Response(error.code, dict(error.headers), error.read())


async def _http(url: str, method: str = "GET") -> Response:
    with trio.fail_after(TIME_LIMIT):
        return await trio.to_thread.run_sync(_http_blocking, url, method, abandon_on_cancel=True)


# -- handler_echo.py ------------------------------------------------------------


async def test_handler_echo() -> None:
    async with running("handler_echo.py") as example:
        async with open_websocket_url(example.ws + "/any/path") as conn:
            await conn.send_message("hello")
            assert await _receive(conn) == "hello"
            await conn.send_message(b"\x00\x01binary\xff")
            assert await _receive(conn) == b"\x00\x01binary\xff"
            opened = await example.wait_for(r"connection (\w+) opened from 127\.0\.0\.1:\d+")
        await example.wait_for(rf"connection {opened.group(1)} closed: 1000 \(NORMAL_CLOSURE\)")

        # A plain GET on a handler with no default_page: 426 Upgrade Required.
        response = await _http(example.http + "/")
        assert response.status == 426
        assert response.headers["Upgrade"] == "websocket"

        output = await example.stop()
    _assert_stopped_cleanly(example, output)


async def test_handler_echo_stop_closes_open_connections_with_1001() -> None:
    async with running("handler_echo.py") as example, open_websocket_url(example.ws) as conn:
        await conn.send_message("still here?")
        assert await _receive(conn) == "still here?"

        output = await example.stop()
        _assert_stopped_cleanly(example, output)
        # on_disconnect ran during the graceful stop, before the process ended.
        assert output[-3] == "SIGINT: stopping", output
        assert re.fullmatch(r"connection \w+ closed: 1001 \(GOING_AWAY\) .*", output[-2])

        with trio.fail_after(TIME_LIMIT), pytest.raises(ConnectionClosedOK) as info:
            await conn.get_message()
        assert info.value.reason.code == CloseCode.GOING_AWAY


# -- handler_state.py -----------------------------------------------------------


async def test_handler_state_counter_is_per_connection() -> None:
    async with running("handler_state.py") as example:
        async with open_websocket_url(example.ws + "/count") as first:
            for expected in ["1: a", "2: b"]:
                await first.send_message(expected[-1])
                assert await _receive(first) == expected
            async with open_websocket_url(example.ws + "/count") as second:
                await second.send_message("c")
                assert await _receive(second) == "1: c"
            await first.send_message("d")
            assert await _receive(first) == "3: d"
        output = await example.stop()
    _assert_stopped_cleanly(example, output)


async def test_handler_state_chat_room_is_shared() -> None:
    async with running("handler_state.py") as example:
        rejected = await _rejected(example.ws + "/chat")
        assert rejected.status_code == 400
        assert b"/chat?name=" in rejected.body
        assert (await _rejected(example.ws + "/elsewhere")).status_code == 404

        async with open_websocket_url(example.ws + "/chat?name=alice") as alice:
            assert await _receive(alice) == "alice joined (1 here)"
            async with open_websocket_url(example.ws + "/chat?name=bob") as bob:
                assert await _receive(alice) == "bob joined (2 here)"
                assert await _receive(bob) == "bob joined (2 here)"
                await bob.send_message("hi")
                assert await _receive(alice) == "bob: hi"
                assert await _receive(bob) == "bob: hi"
            assert await _receive(alice) == "bob left"
            await alice.send_message("alone now")
            assert await _receive(alice) == "alice: alone now"
        output = await example.stop()
    _assert_stopped_cleanly(example, output)


async def test_handler_state_stops_with_members_in_the_room() -> None:
    # Every member's on_disconnect broadcasts "left" to members that are
    # closing too: the example must still stop cleanly.
    async with (
        running("handler_state.py") as example,
        open_websocket_url(example.ws + "/chat?name=carol") as carol,
    ):
        assert await _receive(carol) == "carol joined (1 here)"
        async with open_websocket_url(example.ws + "/chat?name=dave") as dave:
            assert await _receive(carol) == "dave joined (2 here)"
            assert await _receive(dave) == "dave joined (2 here)"
            output = await example.stop()
            _assert_stopped_cleanly(example, output)
            for conn in (carol, dave):
                with trio.fail_after(TIME_LIMIT):
                    reason = await conn.wait_closed()
                assert reason.code == CloseCode.GOING_AWAY


# -- handler_auth.py ------------------------------------------------------------


async def test_handler_auth_tokens() -> None:
    async with running("handler_auth.py") as example:
        rejected = await _rejected(example.ws + "/")
        assert rejected.status_code == 401
        assert rejected.headers.get("www-authenticate", "").startswith("Bearer")
        assert (await _rejected(example.ws + "/?token=wrong")).status_code == 401

        # The same token, three ways: query parameter, Authorization header, cookie.
        ways = [
            ("/?token=alice-token", []),
            ("/", [("Authorization", "Bearer alice-token")]),
            ("/", [("Cookie", "token=alice-token")]),
        ]
        for target, headers in ways:
            async with open_websocket_url(example.ws + target, extra_headers=headers) as conn:
                assert await _receive(conn) == "hello, alice"
                await conn.send_message("hi")
                assert await _receive(conn) == "alice: hi"
        output = await example.stop()
    _assert_stopped_cleanly(example, output)


async def test_handler_auth_origins() -> None:
    async with running("handler_auth.py") as example:
        url = example.ws + "/?token=bob-token"
        # The origin check comes before authentication: no token needed for a 403.
        for target in (url, example.ws + "/"):
            rejected = await _rejected(target, [("Origin", "https://evil.example")])
            assert rejected.status_code == 403
        headers = [("Origin", "https://app.example.com")]
        async with open_websocket_url(url, extra_headers=headers) as conn:
            assert await _receive(conn) == "hello, bob"
        output = await example.stop()
    _assert_stopped_cleanly(example, output)


async def test_handler_auth_admin_lists_and_kicks() -> None:
    async with running("handler_auth.py") as example:
        rejected = await _rejected(example.ws + "/admin?token=bob-token")
        assert (rejected.status_code, rejected.body) == (403, b"admins only\n")

        async with open_websocket_url(example.ws + "/?token=bob-token") as bob:
            assert await _receive(bob) == "hello, bob"
            async with open_websocket_url(example.ws + "/admin?token=alice-token") as admin:
                listed = await _receive(admin)
                assert isinstance(listed, str)
                bob_id, user, path = listed.split(" ")
                assert (user, path) == ("bob", "/")
                assert await _receive(admin) == "2 open"

                await admin.send_message("kick nosuchid")
                assert await _receive(admin) == "no connection nosuchid"
                await admin.send_message(f"kick {bob_id}")
                assert await _receive(admin) == f"closed {bob_id}"

            with trio.fail_after(TIME_LIMIT), pytest.raises(ConnectionClosed) as info:
                await bob.get_message()
            assert info.value.reason.code == 4000
            assert info.value.reason.reason == "kicked by alice"
        output = await example.stop()
    _assert_stopped_cleanly(example, output)


# -- handler_page.py ------------------------------------------------------------


async def test_handler_page() -> None:
    async with running("handler_page.py") as example:
        assert example.lines[-1] == f"listening on {example.http}/"

        page = await _http(example.http + "/")
        assert page.status == 200
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.body == (EXAMPLES / "handler_page.html").read_bytes()
        assert b"new WebSocket(url)" in page.body

        health = await _http(example.http + "/health")
        assert (health.status, health.body) == (200, b"ok\n")
        health_post = await _http(example.http + "/health", "POST")
        assert (health_post.status, health_post.headers["Allow"]) == (405, "GET")

        post = await _http(example.http + "/", "POST")
        assert post.status == 405
        assert (await _http(example.http + "/nothing-here")).status == 404

        # What the page's script does: a WebSocket to the page's own URL, as
        # a browser would open it (with the page's Origin).
        origin = [("Origin", example.http)]
        async with open_websocket_url(example.ws + "/", extra_headers=origin) as conn:
            await conn.send_message("from the page")
            assert await _receive(conn) == "from the page"
        output = await example.stop()
    _assert_stopped_cleanly(example, output)
