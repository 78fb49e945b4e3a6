"""A handler that serves its own web page, and a plain HTTP health check.

    python examples/handler_page.py         # open http://127.0.0.1:8765/

A browser's GET on ``/`` gets ``handler_page.html``, the handler's
``default_page``; the page's JavaScript opens a WebSocket to the same URL, and
the handler echoes what it sends. ``/health`` is a plain HTTP route that
answers ``ok``. Any other path is 404, and a method other than GET on ``/`` is
405.

Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path

import trio

from wsnursery import (
    HTTPRequest,
    HTTPResponse,
    WebSocketConnection,
    WebSocketHandler,
    serve_websocket,
)


class EchoPage(WebSocketHandler):
    """A WebSocket echo whose path also serves the page that uses it."""

    # A Path is read on each request (edit the page, reload the browser); its
    # Content-Type comes from the file name. A str would be sent as HTML.
    default_page = Path(__file__).with_name("handler_page.html")

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        await conn.send_message(text)


async def health(request: HTTPRequest) -> HTTPResponse:
    """An HTTP route gets every method: it checks the method itself."""
    if request.method != "GET":
        return HTTPResponse(405, "GET only\n", headers=[("Allow", "GET")])
    return HTTPResponse(200, "ok\n")


async def main(port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(
                serve_websocket,
                {"/": EchoPage()},
                "127.0.0.1",
                port,
                http_routes={"/health": health},
            )
            server = await nursery.start(serve)
            print(f"listening on http://127.0.0.1:{server.port}/", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", flush=True)
                break
            nursery.cancel_scope.cancel()
    print("stopped", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
