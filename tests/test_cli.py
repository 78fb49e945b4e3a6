"""The command line, run as a real process."""

from __future__ import annotations

import re
import signal

import trio

from _helpers import start_cli
from wsnursery import open_websocket_url


async def test_echo_server_process_echoes_and_stops_on_sigint() -> None:
    proc, output = await start_cli(
        "echo", "--host", "127.0.0.1", "--port", "0", "--max-message-size", "2000000"
    )
    try:
        match = re.search(rb"ws://127\.0\.0\.1:(\d+)/", output)
        assert match, output
        url = f"ws://127.0.0.1:{int(match.group(1))}/"
        with trio.fail_after(10):
            async with open_websocket_url(url, max_message_size=None) as ws:
                await ws.send_message("text")
                assert await ws.get_message() == "text"
                await ws.send_message(b"\x00binary")
                assert await ws.get_message() == b"\x00binary"
                await ws.send_message(b"x" * 1_999_999)
                assert len(await ws.get_message()) == 1_999_999
                await ws.send_message(b"x" * 2_000_001)  # over --max-message-size
                reason = await ws.wait_closed()
                assert reason.code == 1009
            async with open_websocket_url(url) as ws:
                proc.send_signal(signal.SIGINT)
                reason = await ws.wait_closed()
                assert reason.code == 1001
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
