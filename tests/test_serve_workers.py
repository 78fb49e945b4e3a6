"""``python -m wsnursery serve MODULE:ATTR --workers N``: real processes on one port.

The application is ``redis_node:app`` (this directory's ``redis_node.py``): each
member connection is told the worker's PID, so a test can see which worker took
it. Clients are trio-websocket.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from _helpers import HOST, closed_port
from _redis import RedisProcess, running_redis

HERE = Path(__file__).resolve().parent
BANNER = re.compile(rb"serving ws://[^:]+:(\d+)/ \((?:pids|pid) ([\d, ]+)")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    with running_redis(tmp_path) as server:
        yield server


EXAMPLES = HERE.parent / "examples"


def serve_command(*args: str, app: str = "redis_node:app") -> list[str]:
    return [sys.executable, "-m", "wsnursery", "serve", app, "--port", "0", *args]


@dataclass
class Served:
    proc: trio.Process
    port: int
    pids: list[int]


@asynccontextmanager
async def serving(
    *args: str, app: str = "redis_node:app", cwd: Path = HERE
) -> AsyncIterator[Served]:
    """The CLI running until the block ends (then SIGTERM; killed if it lingers)."""
    proc = await trio.lowlevel.open_process(
        serve_command(*args, app=app), cwd=cwd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(30):
            while not (match := BANNER.search(buffer)):
                data = await proc.stdout.receive_some(4096)
                assert data, f"the server exited before serving: {buffer!r}"
                buffer += data
        pids = [int(p) for p in match.group(2).split(b",")]
        yield Served(proc, int(match.group(1)), pids)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def hello(port: int, stack: AsyncExitStack) -> tuple[Any, dict[str, Any]]:
    ws = await stack.enter_async_context(trio_websocket.open_websocket_url(f"ws://{HOST}:{port}/"))
    return ws, json.loads(await ws.get_message())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_two_workers_share_the_port_and_broadcast_through_redis(
    redis: RedisProcess,
) -> None:
    with trio.fail_after(90):
        async with serving("--workers", "2", "--redis", redis.url) as served:
            assert len(served.pids) == 2
            async with AsyncExitStack() as stack:
                # The kernel spreads connections over both workers' sockets.
                by_worker: dict[int, Any] = {}
                for _ in range(200):
                    ws, info = await hello(served.port, stack)
                    assert info["pid"] in served.pids
                    by_worker.setdefault(info["pid"], ws)
                    if len(by_worker) == 2:
                        break
                assert sorted(by_worker) == sorted(served.pids), "a worker got no connection"

                # A group spans the workers: Redis carries it across.
                for ws in by_worker.values():
                    await ws.send_message("join:room")
                    assert await ws.get_message() == "joined:room"
                control = await stack.enter_async_context(
                    trio_websocket.open_websocket_url(f"ws://{HOST}:{served.port}/control")
                )
                await control.send_message(
                    json.dumps({"op": "send_group", "group": "room", "text": "to both workers"})
                )
                answer = json.loads(await control.get_message())
                assert answer["report"]["recipients"] == 1
                for ws in by_worker.values():
                    assert await ws.get_message() == "to both workers"

                # SIGTERM to the supervisor: every worker closes its clients with 1001.
                served.proc.send_signal(signal.SIGTERM)
                for ws in by_worker.values():
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == 1001
            assert await served.proc.wait() == 0
            assert all(gone(pid) for pid in served.pids)


async def test_sigint_stops_the_workers_together() -> None:
    with trio.fail_after(60):
        async with serving("--workers", "2", "--local-broadcast") as served:
            async with AsyncExitStack() as stack:
                ws, _ = await hello(served.port, stack)
                served.proc.send_signal(signal.SIGINT)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001
            assert await served.proc.wait() == 0
            assert all(gone(pid) for pid in served.pids)


async def test_a_worker_dying_on_its_own_stops_the_others() -> None:
    with trio.fail_after(60):
        async with serving("--workers", "2", "--local-broadcast") as served:
            first, second = served.pids
            os.kill(first, signal.SIGKILL)
            assert await served.proc.wait() == 1
            assert gone(first)
            assert gone(second)


async def test_one_worker_needs_no_redis() -> None:
    with trio.fail_after(60):
        async with serving() as served:
            assert served.pids == [served.proc.pid]  # served in the process itself
            async with AsyncExitStack() as stack:
                ws, info = await hello(served.port, stack)
                assert info["pid"] == served.proc.pid
                served.proc.send_signal(signal.SIGTERM)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001
            assert await served.proc.wait() == 0


async def run_cli(*args: str, app: str = "redis_node:app") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            serve_command(*args, app=app),
            cwd=HERE,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_more_than_one_worker_without_redis_is_refused() -> None:
    result = await run_cli("--workers", "3")
    assert result.returncode == 2
    assert b"--workers 3 needs --redis URL" in result.stderr
    assert b"never reaches the clients of the others" in result.stderr


async def test_a_redis_that_is_not_there_fails_the_start() -> None:
    url = f"redis://{HOST}:{closed_port()}/0"
    result = await run_cli("--workers", "2", "--redis", url, "--redis-connect-timeout", "0.5")
    assert result.returncode == 1
    assert f"could not connect to Redis at {url}".encode() in result.stderr
    assert b"before it was ready" in result.stderr


async def test_an_app_that_cannot_be_loaded() -> None:
    result = await run_cli(app="no_such_module:app")
    assert result.returncode == 2
    assert b"cannot load no_such_module:app" in result.stderr


# -- the example --------------------------------------------------------------------------------


async def test_example_rooms_span_two_workers(redis: RedisProcess) -> None:
    with trio.fail_after(90):
        async with (
            serving(
                "--workers", "2", "--redis", redis.url, app="scaled_rooms:Rooms", cwd=EXAMPLES
            ) as served,
            AsyncExitStack() as stack,
        ):
            by_node: dict[str, Any] = {}
            for _ in range(200):
                ws = await stack.enter_async_context(
                    trio_websocket.open_websocket_url(f"ws://{HOST}:{served.port}/")
                )
                welcome = await ws.get_message()
                conn_id = welcome.split()[1].rstrip(":")
                by_node.setdefault(conn_id.rpartition("-")[0], (ws, conn_id))
                if len(by_node) == 2:
                    break
            assert len(by_node) == 2, "a worker got no connection"
            (a, a_id), (b, _) = by_node.values()
            for ws in (a, b):
                await ws.send_message("/join kitchen")
                assert await ws.get_message() == "you are in kitchen"
            await a.send_message("hello from the other worker")
            assert await b.get_message() == f"{a_id}: hello from the other worker"


async def test_example_asks_clients_to_resync_after_a_redis_outage(redis: RedisProcess) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLES / "scaled_rooms.py"), "--port", "0", "--redis", redis.url],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        with trio.fail_after(60):
            assert proc.stdout is not None
            buffer = b""
            while not (match := re.search(rb"listening on ws://[^:]+:(\d+)/", buffer)):
                data = await proc.stdout.receive_some(4096)
                assert data, buffer
                buffer += data
            url = f"ws://{HOST}:{int(match.group(1))}/"
            async with trio_websocket.open_websocket_url(url) as ws:
                assert (await ws.get_message()).startswith("welcome ")
                redis.stop()
                redis.start()
                assert await ws.get_message() == "*resync*"
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
