"""A server and a client in one ``trio.run``: start, talk, stop, exit.

    python examples/demo.py

The server listens on a free port of 127.0.0.1, the client connects to it,
sends three messages and reads the replies, and closes. The handler reports
how the connection ended, and the server is stopped by cancelling the nursery
that runs it.
"""

from __future__ import annotations

import trio

from wsnursery import CloseReason, WebSocketRequest, open_websocket_url, serve_websocket


async def main() -> None:
    # Each handler reports how its connection ended on this channel.
    report_send, report_receive = trio.open_memory_channel[CloseReason](1)

    async def shout(request: WebSocketRequest) -> None:
        if request.url_path != "/shout":
            await request.reject(404, body="try /shout\n")
            return
        conn = await request.accept()
        async for message in conn:
            if isinstance(message, str):
                await conn.send_message(message.upper())
            else:
                await conn.send_message(message[::-1])
        # The loop ended because the client closed normally.
        assert conn.closed is not None
        await report_send.send(conn.closed)

    with trio.fail_after(10):  # a demo must not hang
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, shout, "127.0.0.1", 0)
            url = f"ws://127.0.0.1:{server.port}/shout"
            print(f"server: listening on {url}")

            async with open_websocket_url(url) as conn:
                messages: list[str | bytes] = ["hello", "structured concurrency", b"\x01\x02\x03"]
                for message in messages:
                    await conn.send_message(message)
                    print(f"client: sent {message!r}, got {await conn.get_message()!r}")
            print(f"client: closed with {conn.closed}")

            reason = await report_receive.receive()
            who = "client" if reason.initiated_by_peer else "server"
            print(f"server: connection closed with {reason}, started by the {who}")

            # Stop the server: cancelling serve_websocket closes what is left.
            nursery.cancel_scope.cancel()
    print("done")


if __name__ == "__main__":
    trio.run(main)
