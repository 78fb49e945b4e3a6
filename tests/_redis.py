"""A real redis-server for the tests, and a tiny RESP client to look inside it.

Imported as ``from _redis import ...``. The server is Debian's ``redis-server``
(``scripts/test`` installs it): a missing binary is an error, never a skip.
Each server runs on a free port of 127.0.0.1, with no persistence, in its own
temporary directory, and is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _helpers import HOST, closed_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found is None:
        raise RuntimeError(
            "redis-server is not installed: the Redis backplane tests need a real Redis "
            "(apt-get install redis-server; scripts/test does it)"
        )
    return found


class RedisProcess:
    """One redis-server: start, stop (by PID) and start again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = closed_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.log),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"redis-server exited with {code}: {self._log_tail()}")
            try:
                if command(self.port, "PING") == "PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server not answering after {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, wait; SIGKILL if it does not go."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return "(no log)"


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisProcess]:
    """A started redis-server (on another port if the first one was taken)."""
    last: Exception | None = None
    for _ in range(3):
        server = RedisProcess(directory)
        try:
            server.start()
        except RuntimeError as exc:
            last = exc
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    raise RuntimeError(f"could not start redis-server: {last}")


# -- a minimal RESP2 client (blocking; for looking inside Redis from a test) ----------------


def command(port: int, *args: str | bytes, timeout: float = 5.0) -> Any:
    """Send one command, return the decoded reply (errors raise RuntimeError)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        parts.append(f"${len(raw)}\r\n".encode() + raw + b"\r\n")
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        reader = sock.makefile("rb")
        return _read_reply(reader)


def _read_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise OSError("connection closed by redis")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = reader.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(reader) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")


def subscribers(port: int, *channels: str) -> dict[str, int]:
    """PUBSUB NUMSUB: how many connections subscribe to each channel."""
    reply = command(port, "PUBSUB", "NUMSUB", *channels)
    return {reply[i].decode(): reply[i + 1] for i in range(0, len(reply), 2)}
