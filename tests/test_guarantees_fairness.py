"""Fairness: one peer must not freeze the event loop (issue 10, item A).

A peer that keeps the server's socket full must not keep a connection's read
loop from reaching a schedule point. Each test floods one connection from a
plain blocking socket in an OS thread (pre-built masked frames, ``sendall`` in
a loop; a second thread reads and discards whatever the server answers, so the
server's writes never block), while a 10 ms ticker task runs in the server's
trio loop. The worst gap between two ticks must stay under 50 ms. Both APIs
(handler function, WebSocketHandler whose ``on_text`` does not await), both
floods (empty pings, small text messages).
"""

from __future__ import annotations

import socket
import time
from functools import partial
from typing import Any

import pytest
import trio

from _helpers import (
    FLOOD_BLOBS,
    HOST,
    OP_TEXT,
    Flood,
    build_frame,
    serving,
    upgrade_request,
)
from wsnursery import WebSocketConnection, WebSocketHandler, WebSocketRequest

FLOOD_SECONDS = 1.5
TICK = 0.01
MAX_GAP = 0.05


async def echo_function(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for _message in conn:
        pass


class Counting(WebSocketHandler):
    """Hooks that never await."""

    texts = 0

    async def on_text(self, conn: WebSocketConnection, message: str) -> None:
        Counting.texts += 1


async def measure_worst_gap(port: int, blob: bytes) -> tuple[float, Flood]:
    flood = Flood(port, blob, FLOOD_SECONDS)
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = trio.current_time()
        while not done:
            await trio.sleep(TICK)
            now = trio.current_time()
            worst = max(worst, now - last)
            last = now

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.to_thread.run_sync(flood.run)
            done = True
    if flood.error is not None:
        raise flood.error
    return worst, flood


@pytest.mark.parametrize("kind", ["ping", "text"])
@pytest.mark.parametrize("api", ["function", "handler-object"])
async def test_flood_does_not_freeze_the_event_loop(api: str, kind: str) -> None:
    handler: Any = echo_function if api == "function" else Counting
    Counting.texts = 0
    async with serving(handler, ping_interval=None) as server:
        worst, flood = await measure_worst_gap(server.port, FLOOD_BLOBS[kind])
    print(f"{api} {kind}: worst gap {worst * 1000:.1f} ms, {flood.sent >> 20} MiB sent")
    # The flood really reached the server (several MB) and was answered.
    assert flood.sent > 4 * len(FLOOD_BLOBS[kind]), flood.sent
    if kind == "ping":
        assert flood.received > 0
    elif api == "handler-object":
        assert Counting.texts > 0
    assert worst < MAX_GAP, f"worst ticker gap {worst * 1000:.0f} ms during a {kind} flood"


def flood_until_blocked(port: int, blob: bytes, result: dict[str, Any]) -> None:
    """Send pings and never read: return once a sendall has waited 1 s (or after 15 s)."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(upgrade_request())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        sock.settimeout(1.0)
        deadline = time.monotonic() + 15
        result["blocked"] = False
        while time.monotonic() < deadline:
            try:
                sock.sendall(blob)
            except TimeoutError:
                result["blocked"] = True
                break
        result["done"] = True
        time.sleep(0.2)  # let the test look at the server side first
        sock.shutdown(socket.SHUT_RDWR)


async def test_ping_flood_from_a_peer_that_reads_no_pong_is_bounded() -> None:
    """The server stops reading when its pongs cannot be written: TCP holds the flood."""
    from wsnursery._sansio.protocol import WORK_BUDGET

    result: dict[str, Any] = {}
    async with serving(echo_function, ping_interval=None) as server:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(trio.to_thread.run_sync, flood_until_blocked),
                    server.port,
                    FLOOD_BLOBS["ping"],
                    result,
                )
                while "done" not in result:
                    await trio.sleep(0.05)
                (conn,) = server.connections.values()
                # Pongs waiting in the protocol: at most one parsing step's.
                assert len(conn._proto._out) <= WORK_BUDGET * 127
    assert result["blocked"]


def test_protocol_parses_a_bounded_slice_per_call() -> None:
    """One receive_data() call parses at most WORK_BUDGET frames; resume() goes on."""
    from wsnursery._sansio.protocol import WORK_BUDGET, Protocol

    proto = Protocol(client=False)
    n = 10 * WORK_BUDGET + 3
    proto.receive_data(build_frame(OP_TEXT, b"hi") * n)
    assert len(proto.messages) == WORK_BUDGET
    assert proto.budget <= 0
    assert proto.parse_pending
    slices = 1
    while proto.budget <= 0:
        proto.resume()
        slices += 1
    assert len(proto.messages) == n
    assert slices == 11


def test_observed_client_protocol_sees_every_slice() -> None:
    """The reconnecting client's observer hears of frames parsed by resume() too."""
    from wsnursery._client import _ObservedProtocol
    from wsnursery._sansio.protocol import WORK_BUDGET

    seen: list[tuple[str, Any]] = []
    proto = _ObservedProtocol(lambda kind, value: seen.append((kind, value)), client=True)
    n = 3 * WORK_BUDGET
    proto.receive_data(build_frame(OP_TEXT, b"hi", mask=None) * n)
    while proto.budget <= 0:
        proto.resume()
    assert seen == [("message", "hi")] * n
