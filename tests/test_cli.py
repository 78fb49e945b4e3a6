"""The command line, run as a real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import trio

from wsnursery import open_websocket_url


async def test_echo_server_process_echoes_and_stops_on_sigint() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wsnursery",
            "echo",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-message-size",
            "2000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        match = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        with trio.fail_after(10):
            async with open_websocket_url(
                f"ws://127.0.0.1:{match.group(1)}/", max_message_size=None
            ) as ws:
                await ws.send_message("text")
                assert await ws.get_message() == "text"
                await ws.send_message(b"\x00binary")
                assert await ws.get_message() == b"\x00binary"
                await ws.send_message(b"x" * 1_999_999)
                assert len(await ws.get_message()) == 1_999_999
                await ws.send_message(b"x" * 2_000_001)  # over --max-message-size
                reason = await ws.wait_closed()
                assert reason.code == 1009
            async with open_websocket_url(f"ws://127.0.0.1:{match.group(1)}/") as ws:
                proc.send_signal(signal.SIGINT)
                reason = await ws.wait_closed()
                assert reason.code == 1001
        code = await trio.to_thread.run_sync(proc.wait, 10)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
