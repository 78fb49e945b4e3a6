"""The chat demo (``wsnursery._cli.chat``) at the protocol level, over real TCP.

The clients are trio-websocket's (an independent implementation); each test
runs its own server with a fresh :class:`ChatHandler` on 127.0.0.1 and a free
port. The last test runs ``python -m wsnursery chat`` as a process.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio_websocket

from _helpers import HOST, read_response, read_to_eof, start_cli
from wsnursery import WebSocketServer, serve_websocket
from wsnursery._cli.chat import PAGE, ChatHandler, _Refused

TIMEOUT = 5  # seconds: how long any one expected message may take


@asynccontextmanager
async def chat_server(
    handler: ChatHandler | None = None, **options: Any
) -> AsyncIterator[tuple[WebSocketServer, ChatHandler]]:
    handler = handler if handler is not None else ChatHandler(**options)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, {"/": handler}, HOST, 0))
        yield server, handler
        nursery.cancel_scope.cancel()


class Client:
    """A trio-websocket connection speaking the chat's JSON."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, **message: Any) -> None:
        await self.ws.send_message(json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(TIMEOUT):
            message = await self.ws.get_message()
        assert isinstance(message, str), message
        decoded = json.loads(message)
        assert isinstance(decoded, dict)
        return decoded

    async def expect(self, kind: str, skip: tuple[str, ...] = ("online",)) -> dict[str, Any]:
        """The next message that is not of a type in ``skip``; it must be ``kind``."""
        while True:
            message = await self.recv()
            if message["type"] in skip and message["type"] != kind:
                continue
            assert message["type"] == kind, message
            return message

    async def join(self, room: str, nick: str) -> dict[str, Any]:
        await self.send(type="join", room=room, nick=nick)
        # Whatever the previous room still sends comes first; an error does not.
        return await self.expect("welcome", skip=("online", "users", "joined", "left", "message"))


@asynccontextmanager
async def client(server: WebSocketServer) -> AsyncIterator[Client]:
    async with trio_websocket.open_websocket_url(f"ws://{HOST}:{server.port}/") as ws:
        yield Client(ws)


async def close_code(ws: trio_websocket.WebSocketConnection) -> int:
    """Read (and drop) messages until the connection closes; its close code."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                reason = exc.reason
                break
    assert reason is not None
    return int(reason.code)


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages]


async def test_two_clients_in_a_room_hear_each_other() -> None:
    async with chat_server() as (server, _), client(server) as alice, client(server) as bob:
        welcome = await alice.join("lobby", "alice")
        assert welcome["room"] == "lobby"
        assert welcome["nick"] == "alice"
        assert welcome["history"] == []
        assert welcome["users"] == [{"id": welcome["id"], "nick": "alice"}]
        alice_id = welcome["id"]

        welcome = await bob.join("lobby", "bob")
        bob_id = welcome["id"]
        assert bob_id != alice_id
        assert [u["nick"] for u in welcome["users"]] == ["alice", "bob"]

        await alice.expect("users")  # her own join
        joined = await alice.expect("joined")
        assert joined == {"type": "joined", "room": "lobby", "id": bob_id, "nick": "bob"}
        users = await alice.expect("users")
        assert users["count"] == 2
        assert [u["id"] for u in users["users"]] == [alice_id, bob_id]

        await bob.expect("users")
        await bob.send(type="say", text="hello <b>alice</b> ☃")
        for peer in (alice, bob):  # the sender gets its own message too
            message = await peer.expect("message")
            assert message["from"] == "bob"
            assert message["id"] == bob_id
            assert message["room"] == "lobby"
            assert message["text"] == "hello <b>alice</b> ☃"
            assert isinstance(message["time"], int)


async def test_history_is_the_last_n_messages() -> None:
    async with chat_server(history=3) as (server, _), client(server) as alice:
        await alice.join("lobby", "alice")
        for i in range(5):
            await alice.send(type="say", text=f"m{i}")
        for i in range(5):
            assert (await alice.expect("message", skip=("online", "users")))["text"] == f"m{i}"
        async with client(server) as bob:
            welcome = await bob.join("lobby", "bob")
            assert texts(welcome["history"]) == ["m2", "m3", "m4"]
            assert {m["from"] for m in welcome["history"]} == {"alice"}


async def test_an_emptied_room_keeps_its_history_within_max_idle_rooms() -> None:
    async with chat_server(max_idle_rooms=1) as (server, handler):
        for room in ("a", "b"):
            async with client(server) as alice:
                await alice.join(room, "alice")
                await alice.send(type="say", text=f"in {room}")
                await alice.expect("message", skip=("online", "users"))
            with trio.fail_after(TIMEOUT):
                while handler.rooms():  # wait for on_disconnect
                    await trio.sleep(0.01)
        async with client(server) as bob:
            assert texts((await bob.join("b", "bob"))["history"]) == ["in b"]
            # "a" was emptied first and forgotten when "b" was emptied.
            assert (await bob.join("a", "bob"))["history"] == []


async def test_join_and_leave_notices_and_counts() -> None:
    async with chat_server() as (server, handler), client(server) as alice:
        online = await alice.expect("online", skip=())
        assert online == {"type": "online", "total": 1, "rooms": 0}
        alice_id = (await alice.join("lobby", "alice"))["id"]
        assert (await alice.expect("users", skip=()))["count"] == 1
        assert (await alice.expect("online", skip=()))["rooms"] == 1

        async with client(server) as bob:
            assert (await alice.expect("online", skip=()))["total"] == 2
            bob_id = (await bob.join("lobby", "bob"))["id"]
            assert (await alice.expect("joined"))["nick"] == "bob"
            assert (await alice.expect("users"))["count"] == 2
            assert handler.rooms() == {"lobby": 2}
            assert handler.online == 2

            await bob.expect("users")
            await bob.send(type="leave")
            left = await bob.expect("left", skip=("online", "users"))
            assert left == {"type": "left", "room": "lobby", "id": bob_id, "nick": "bob"}
            assert (await alice.expect("left"))["id"] == bob_id
            assert (await alice.expect("users"))["users"] == [{"id": alice_id, "nick": "alice"}]
            # Leaving when not in a room is refused.
            await bob.send(type="leave")
            assert (await bob.expect("error"))["code"] == "not-joined"

            async with client(server) as carol:
                carol_id = (await carol.join("lobby", "carol"))["id"]
                assert (await alice.expect("joined", skip=("online", "users")))["id"] == carol_id
            # Carol's connection ended without a leave: the room is told all the same.
            left = await alice.expect("left", skip=("online", "users"))
            assert left["id"] == carol_id
            assert left["nick"] == "carol"
        online = await alice.expect("online", skip=("users",))
        while online["total"] != 1:  # several may come; the last says 1
            online = await alice.expect("online", skip=("users",))
        assert handler.rooms() == {"lobby": 1}


async def test_duplicate_nicks_get_a_number() -> None:
    async with chat_server() as (server, _), client(server) as a, client(server) as b:
        assert (await a.join("lobby", "alice"))["nick"] == "alice"
        assert (await b.join("lobby", "alice"))["nick"] == "alice2"
        async with client(server) as c, client(server) as d, client(server) as e:
            assert (await c.join("lobby", "ALICE"))["nick"] == "ALICE3"  # case-insensitive
            # The same nick in another room is fine.
            assert (await d.join("other", "alice"))["nick"] == "alice"
            # A number is appended within the length limit.
            assert (await d.join("lobby", "x" * 24))["nick"] == "x" * 24
            assert (await e.join("lobby", "x" * 24))["nick"] == "x" * 23 + "2"


async def test_nick_change_is_announced_and_unique() -> None:
    async with chat_server() as (server, _), client(server) as alice, client(server) as bob:
        await alice.join("lobby", "alice")
        bob_id = (await bob.join("lobby", "bob"))["id"]
        await bob.send(type="nick", nick="Alice")
        for peer in (alice, bob):
            notice = await peer.expect("nick", skip=("online", "users", "joined"))
            assert notice == {
                "type": "nick",
                "room": "lobby",
                "id": bob_id,
                "old": "bob",
                "nick": "Alice2",
            }
        users = await alice.expect("users")
        assert [u["nick"] for u in users["users"]] == ["alice", "Alice2"]
        # Keeping one's own nick does not add a number.
        await bob.send(type="nick", nick="Alice2")
        assert (await bob.expect("nick", skip=("online", "users")))["nick"] == "Alice2"


@pytest.mark.parametrize(
    "nick",
    ["", "   ", "x" * 25, "<script>", "_under", "-dash", "a\nb", "tab\there", 42, None, ["a"]],
)
async def test_bad_nicks_are_refused(nick: Any) -> None:
    async with chat_server() as (server, handler), client(server) as alice:
        await alice.send(type="join", room="lobby", nick=nick)
        error = await alice.expect("error")
        assert error["code"] == "bad-nick"
        assert handler.rooms() == {}
        # The connection is still fine.
        assert (await alice.join("lobby", "  Zoë  O'Neil-2 "))["nick"] == "Zoë O'Neil-2"


@pytest.mark.parametrize("room", ["", "x" * 33, "a b", "a/b", ".hidden", "über", 7])
async def test_bad_rooms_are_refused(room: Any) -> None:
    async with chat_server() as (server, _), client(server) as alice:
        await alice.send(type="join", room=room, nick="alice")
        assert (await alice.expect("error"))["code"] == "bad-room"
        assert (await alice.join("x" * 32, "alice"))["room"] == "x" * 32


async def test_bad_requests_get_errors_and_the_connection_stays() -> None:
    async with chat_server(max_text=10, burst=100) as (server, _), client(server) as alice:
        for raw in ("{not json", "[" * 50_000 + "]" * 50_000):
            await alice.ws.send_message(raw)
            assert (await alice.expect("error"))["code"] == "bad-json"
        for raw in ("[1, 2]", '"join"', "{}", '{"type": 3}', '{"type": "dance"}'):
            await alice.ws.send_message(raw)
            assert (await alice.expect("error"))["code"] == "bad-request", raw
        await alice.ws.send_message(b'{"type": "join"}')
        error = await alice.expect("error")
        assert error["code"] == "bad-request"
        assert "text" in error["message"]
        await alice.send(type="say", text="hello")
        assert (await alice.expect("error"))["code"] == "not-joined"
        await alice.join("lobby", "alice")
        for text in ("", "   ", "x" * 11, None, 5):
            await alice.send(type="say", text=text)
            assert (await alice.expect("error", skip=("online", "users")))["code"] == "bad-text"
        await alice.send(type="say", text="x" * 10)
        assert (await alice.expect("message", skip=("online", "users")))["text"] == "x" * 10


async def test_rooms_are_isolated() -> None:
    async with chat_server() as (server, _), client(server) as alice, client(server) as bob:
        await alice.join("one", "alice")
        await bob.join("two", "bob")
        async with client(server) as carol:
            await carol.join("two", "carol")
            await alice.send(type="say", text="only for one")
            # Alice got her own message back: the server has sent it to "one".
            assert (await alice.expect("message", skip=("online", "users")))["text"] == (
                "only for one"
            )
            await carol.send(type="say", text="for two")
            # Bob's next chat message is Carol's: Alice's never reached him.
            skip = ("online", "users", "joined")
            assert (await bob.expect("message", skip=skip))["text"] == "for two"
            # Switching rooms: bob leaves "two" (carol is told) and gets "one"'s history.
            welcome = await bob.join("one", "bob")
            assert texts(welcome["history"]) == ["only for one"]
            left = await carol.expect("left", skip=(*skip, "message"))
            assert left["nick"] == "bob"


async def test_rate_limit_refuses_past_the_burst_with_one_error() -> None:
    async with chat_server(rate=0.001, burst=3) as (server, _), client(server) as alice:
        await alice.join("lobby", "alice")  # one token
        for i in range(4):
            await alice.send(type="say", text=f"m{i}")
        skip = ("online", "users")
        assert (await alice.expect("message", skip=skip))["text"] == "m0"
        assert (await alice.expect("message", skip=skip))["text"] == "m1"
        assert (await alice.expect("error", skip=skip))["code"] == "rate-limited"
        # m3 was refused silently (one error per burst); the next message is
        # the answer to a binary frame, which costs no token.
        await alice.ws.send_message(b"x")
        assert (await alice.expect("error", skip=skip))["code"] == "bad-request"


class Fragile(ChatHandler):
    """A chat whose ``say`` fails on one text: the hook raises, as a bug would."""

    async def handle_say(self, member: Any, request: dict[str, Any]) -> None:
        if request.get("text") == "boom":
            raise RuntimeError("boom")
        if request.get("text") == "refuse":
            raise _Refused("custom", "refused by a subclass")
        await super().handle_say(member, request)


async def test_a_failing_hook_closes_only_its_connection() -> None:
    async with chat_server(Fragile()) as (server, handler), client(server) as alice:
        await alice.join("lobby", "alice")
        async with client(server) as bob:
            bob_id = (await bob.join("lobby", "bob"))["id"]
            await bob.send(type="say", text="refuse")
            assert (await bob.expect("error", skip=("online", "users")))["code"] == "custom"
            await bob.send(type="say", text="boom")
            assert await close_code(bob.ws) == 1011
        skip = ("online", "users", "joined")
        left = await alice.expect("left", skip=skip)
        assert left["id"] == bob_id
        # Alice and the server carry on.
        await alice.send(type="say", text="still here")
        assert (await alice.expect("message", skip=skip))["text"] == "still here"
        assert handler.rooms() == {"lobby": 1}


@pytest.mark.parametrize(
    "bad",
    [
        {"history": -1},
        {"max_nick": 1},
        {"max_room": 0},
        {"max_text": 0},
        {"rate": 0},
        {"burst": 0},
        {"max_idle_rooms": -1},
    ],
)
def test_handler_arguments_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ChatHandler(**bad)


async def test_chat_command_serves_the_page_and_stops_on_sigint() -> None:
    proc, output = await start_cli("chat", "--host", HOST, "--port", "0")
    try:
        match = re.search(rb"wsnursery chat on http://127\.0\.0\.1:(\d+)/", output)
        assert match, output
        port = int(match.group(1))

        # The page, over plain HTTP.
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(HOST, port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = await read_response(stream)
            body = head.rest + await read_to_eof(stream)
        assert head.status == 200
        assert (head.header("content-type") or "").startswith("text/html")
        assert body == PAGE.read_bytes()
        assert b"<title>wsnursery chat</title>" in body

        with trio.fail_after(10):
            async with trio_websocket.open_websocket_url(f"ws://{HOST}:{port}/") as ws:
                alice = Client(ws)
                await alice.join("lobby", "alice")
                await alice.send(type="say", text="over the command line")
                message = await alice.expect("message", skip=("online", "users"))
                assert message["text"] == "over the command line"
                proc.send_signal(signal.SIGINT)
                assert await close_code(ws) == 1001
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
