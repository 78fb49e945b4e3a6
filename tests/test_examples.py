"""The scripts in examples/ run, as the docs show them, so they cannot rot.

Each script runs as a subprocess of the interpreter running the tests, bound to
127.0.0.1, under a hard time limit; a server is stopped by a signal sent to its
PID and must exit cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from _helpers import checkout_env
from wsnursery import CloseCode, ConnectionClosedOK, open_websocket_url

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIME_LIMIT = 20.0  # seconds for any one step; a hang fails the test instead
LISTENING = re.compile(r"listening on (ws://127\.0\.0\.1:(\d+)/)")

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="stops the server with a signal")


def _command(script: str, *args: str) -> list[str]:
    if script == "pytest":
        return [sys.executable, "-m", "pytest", *args]
    return [sys.executable, str(EXAMPLES / script), *args]


async def _run(
    script: str, *args: str, time_limit: float = TIME_LIMIT
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(time_limit):
        return await trio.run_process(
            _command(script, *args),
            env=checkout_env(),
            cwd=ROOT,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )


class _Lines:
    """Reads a process's output line by line, keeping everything it read."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.seen: list[str] = []

    async def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode("utf-8", "replace").rstrip("\r")
                self.seen.append(text)
                match = pattern.search(text)
                if match:
                    return match
            data = await self._stream.receive_some(4096)
            if not data:
                raise AssertionError(f"output ended before {pattern.pattern!r}: {self.seen}")
            self._buffer += data

    async def read_rest(self) -> list[str]:
        while data := await self._stream.receive_some(4096):
            self._buffer += data
        if self._buffer:
            self.seen.extend(self._buffer.decode("utf-8", "replace").splitlines())
            self._buffer = b""
        return self.seen


class _EchoServer:
    """examples/echo_server.py on a free port, stopped by a signal to its PID."""

    def __init__(self, process: trio.Process, lines: _Lines, url: str) -> None:
        self.process = process
        self.lines = lines
        self.url = url

    async def stop(self, signum: int) -> list[str]:
        """Send ``signum`` to the server's PID; return its whole output once it exited."""
        os.kill(self.process.pid, signum)
        with trio.fail_after(TIME_LIMIT):
            output = await self.lines.read_rest()
            await self.process.wait()
        return output


class _Running:
    """``async with _Running() as server``: echo_server.py, gone after the block."""

    _process: trio.Process | None = None

    async def __aenter__(self) -> _EchoServer:
        self._process = process = await trio.lowlevel.open_process(
            _command("echo_server.py", "0"),
            env=checkout_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdout is not None
        lines = _Lines(process.stdout)
        try:
            with trio.fail_after(TIME_LIMIT):
                match = await lines.wait_for(LISTENING)
        except BaseException:
            await self.__aexit__()
            raise
        return _EchoServer(process, lines, match.group(1))

    async def __aexit__(self, *exc_info: object) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


@posix_only
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_echo_client_against_echo_server(signum: int) -> None:
    async with _Running() as server:
        result = await _run("echo_client.py", server.url)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().splitlines() == [
            "sent 'hello', got 'hello'",
            "sent 'wsnursery', got 'wsnursery'",
            "sent b'\\x00\\x01binary\\xff', got b'\\x00\\x01binary\\xff'",
            "closed: 1000 (NORMAL_CLOSURE)",
        ]

        output = await server.stop(signum)
        assert server.process.returncode == 0, output
        assert output[-2:] == [f"{signal.Signals(signum).name}: stopping", "stopped"]
        assert not any("Traceback" in line for line in output), output


@posix_only
async def test_echo_server_stop_closes_open_connections_with_1001() -> None:
    async with _Running() as server, open_websocket_url(server.url) as conn:
        await conn.send_message("still here?")
        with trio.fail_after(TIME_LIMIT):
            assert await conn.get_message() == "still here?"

        output = await server.stop(signal.SIGTERM)
        assert server.process.returncode == 0, output

        with trio.fail_after(TIME_LIMIT), pytest.raises(ConnectionClosedOK) as info:
            await conn.get_message()
        assert info.value.reason.code == CloseCode.GOING_AWAY
        assert info.value.reason.initiated_by_peer


async def test_echo_client_reports_a_refused_connection() -> None:
    # Bind a port and do not listen on it: the connection is refused at once.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = await _run("echo_client.py", f"ws://127.0.0.1:{port}/")
    assert result.returncode == 1
    assert result.stdout == b""
    assert "could not connect" in result.stderr.decode()


async def test_demo() -> None:
    result = await _run("demo.py")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert re.fullmatch(r"server: listening on ws://127\.0\.0\.1:\d+/shout", lines[0])
    assert lines[1:] == [
        "client: sent 'hello', got 'HELLO'",
        "client: sent 'structured concurrency', got 'STRUCTURED CONCURRENCY'",
        "client: sent b'\\x01\\x02\\x03', got b'\\x03\\x02\\x01'",
        "client: closed with 1000 (NORMAL_CLOSURE)",
        "server: connection closed with 1000 (NORMAL_CLOSURE), started by the client",
        "done",
    ]
    assert result.stderr == b""


async def test_the_example_tests_pass() -> None:
    # The testing and TLS how-tos include these files; they must keep passing.
    files = ["examples/test_greeter.py", "examples/test_greeter_tls.py"]
    result = await _run("pytest", "-q", "-p", "no:cacheprovider", *files, time_limit=60.0)
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    assert re.search(r"\b\d+ passed\b", output), output
    assert "skipped" not in output, output
