"""The chat demo: ``python -m wsnursery chat --host 127.0.0.1 --port 8765``.

One :class:`ChatHandler` serves both the page (``static/chat.html``, its
``default_page``) and the WebSocket that page opens on the same path. Rooms are
groups of the server's :class:`~wsnursery.Broadcaster` (``conn.server.broadcaster``),
so a message to a room is one ``send_group`` that never waits for a slow client.

The protocol: JSON objects in text frames, each with a ``"type"``.

Client to server:

``{"type": "join", "room": ROOM, "nick": NICK}``
    Enter ROOM (leaving the current room, if any) as NICK. A nick already used
    in that room gets a number appended (``alice`` → ``alice2``). Answered with
    ``welcome``.
``{"type": "say", "text": TEXT}``
    Send TEXT to the current room; every member, the sender included, gets a
    ``message``.
``{"type": "nick", "nick": NICK}``
    Change nick; the room gets ``nick`` (with the nick actually given).
``{"type": "leave"}``
    Leave the current room; answered with the sender's own ``left``.

Server to client:

``{"type": "welcome", "id", "room", "nick", "history": [MESSAGE...], "users": [USER...]}``
    After a join: your connection ID, the room, your nick (maybe unique-ified),
    the room's last messages (oldest first) and who is there.
``{"type": "message", "room", "id", "from", "text", "time"}``
    One chat message: the sender's connection ID and nick, the text, and the
    server's time in milliseconds since the epoch.
``{"type": "joined" | "left", "room", "id", "nick"}``
    Someone entered or left the room.
``{"type": "nick", "room", "id", "old", "nick"}``
    Someone changed nick (``room`` is null when the sender is in no room).
``{"type": "users", "room", "count", "users": [USER...]}``
    The room's members changed; USER is ``{"id", "nick"}``.
``{"type": "online", "total", "rooms"}``
    To every chat connection whenever the number of connections or of rooms
    with members changes.
``{"type": "error", "code", "message"}``
    The last request was refused: ``bad-json``, ``bad-request``, ``bad-room``,
    ``bad-nick``, ``bad-text``, ``not-joined``, ``rate-limited``. The connection
    stays open.

Limits (keywords of :class:`ChatHandler`): nicks 1-24 characters (letters,
digits, space, ``_ . ' -``, starting with a letter or digit), rooms 1-32
characters of ``A-Z a-z 0-9 _ . -`` starting with a letter or digit, messages
1-1000 characters, 50 messages of history per room, 5 requests a second per
connection with bursts of 10 (a token bucket). A room with no members left is
retired with its history: joining it again shows that history, and the 100
most recently emptied rooms are remembered (the oldest is forgotten first).
History lives in memory: it does not survive a restart of the process.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._handler import WebSocketHandler
from . import add_server_options, int_at_least, serve_until_signal, url_host

if TYPE_CHECKING:
    from .._broadcast import Broadcaster
    from .._connection import WebSocketConnection
    from .._sansio.exceptions import CloseReason

__all__ = ["ChatHandler", "add_command"]

PAGE = Path(__file__).parent.parent / "static" / "chat.html"

_ROOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NICK = re.compile(r"[^\W_][\w .'-]*")
_SPACES = re.compile(" {2,}")


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


class _TokenBucket:
    """``burst`` tokens, refilled at ``rate`` a second; each request takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(eq=False)
class _Room:
    name: str
    history: deque[dict[str, Any]]
    members: dict[str, str] = field(default_factory=dict)  # connection ID -> nick

    def users(self) -> list[dict[str, str]]:
        return [{"id": cid, "nick": nick} for cid, nick in self.members.items()]

    def unique_nick(self, nick: str, max_len: int, *, me: str | None = None) -> str:
        taken = {n.casefold() for cid, n in self.members.items() if cid != me}
        candidate, n = nick, 1
        while candidate.casefold() in taken:
            n += 1
            suffix = str(n)
            candidate = nick[: max_len - len(suffix)].rstrip() + suffix
        return candidate


@dataclass(eq=False)
class _Member:
    conn: WebSocketConnection
    bucket: _TokenBucket
    nick: str | None = None
    room: _Room | None = None
    throttled: bool = False


class _Refused(Exception):
    """A request the client gets an ``error`` for."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ChatHandler(WebSocketHandler):
    """Rooms, nicks, history and user counts over the server's broadcaster.

    Pass one instance to :func:`~wsnursery.serve_websocket`: it keeps the rooms
    of every connection it serves. One instance serves one server at a time
    (rooms are groups of that server's broadcaster); it can serve a new server
    after the old one stopped, and then keeps the history of the old rooms.

    Args:
        history: Messages kept per room and sent to whoever joins (0: none).
        max_nick: Longest nick, in characters.
        max_room: Longest room name, in characters.
        max_text: Longest message, in characters.
        rate: Requests a second each connection may make, on average.
        burst: Requests a connection may make at once before ``rate`` applies.
        max_idle_rooms: Rooms without members whose history is remembered.
        group_prefix: Prefix of the broadcaster's group names (``PREFIX:ROOM``
            per room, ``PREFIX`` for every chat connection), so that two chat
            handlers on one server keep apart.
    """

    default_page = PAGE

    def __init__(
        self,
        *,
        history: int = 50,
        max_nick: int = 24,
        max_room: int = 32,
        max_text: int = 1000,
        rate: float = 5.0,
        burst: int = 10,
        max_idle_rooms: int = 100,
        group_prefix: str = "chat",
    ) -> None:
        if history < 0 or max_idle_rooms < 0:
            raise ValueError("history and max_idle_rooms must be at least 0")
        if max_nick < 2 or max_room < 1 or max_text < 1:
            raise ValueError("max_nick must be at least 2, max_room and max_text at least 1")
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.history = history
        self.max_nick = max_nick
        self.max_room = max_room
        self.max_text = max_text
        self.rate = rate
        self.burst = burst
        self.max_idle_rooms = max_idle_rooms
        self.group_prefix = group_prefix
        self._members: dict[str, _Member] = {}  # connection ID -> member
        self._rooms: dict[str, _Room] = {}  # rooms with members
        self._idle: OrderedDict[str, _Room] = OrderedDict()  # emptied rooms, oldest first
        self._announced: tuple[int, int] = (-1, -1)

    # -- what the page and tests can ask -----------------------------------------

    @property
    def online(self) -> int:
        """Connections this handler serves."""
        return len(self._members)

    def rooms(self) -> dict[str, int]:
        """Rooms with members: name -> number of members."""
        return {name: len(room.members) for name, room in self._rooms.items()}

    # -- hooks -----------------------------------------------------------------

    async def on_connect(self, conn: WebSocketConnection) -> None:
        """Register the connection and tell everyone the new total.

        Cancellation:
            Only when the server stops or the connection ends.
        """
        self._members[conn.id] = _Member(
            conn, _TokenBucket(self.rate, self.burst, trio.current_time())
        )
        self._broadcaster(conn).join(conn, self.group_prefix)
        await self._announce(conn)

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        """Parse one request, check the rate limit, and run it.

        Cancellation:
            Only when the server stops or the connection ends.
        """
        member = self._members.get(conn.id)
        if member is None:  # pragma: no cover - on_connect always ran first
            return
        try:
            if not member.bucket.take(trio.current_time()):
                if member.throttled:
                    return  # one error per burst of refused requests, not one each
                member.throttled = True
                raise _Refused("rate-limited", "too many requests; slow down")
            member.throttled = False
            try:
                request = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: nested too deep
                raise _Refused("bad-json", "not valid JSON") from None
            if not isinstance(request, dict) or not isinstance(request.get("type"), str):
                raise _Refused("bad-request", 'expected a JSON object with a "type"')
            kind = request["type"]
            if kind == "join":
                await self.handle_join(member, request)
            elif kind == "say":
                await self.handle_say(member, request)
            elif kind == "nick":
                await self.handle_nick(member, request)
            elif kind == "leave":
                await self.handle_leave(member)
            else:
                raise _Refused("bad-request", f"unknown type {kind[:40]!r}")
        except _Refused as refused:
            await self._send_one(
                conn, {"type": "error", "code": refused.code, "message": refused.message}
            )

    async def on_binary(self, conn: WebSocketConnection, data: bytes) -> None:
        """Binary frames are not part of the protocol: answered with an error.

        Cancellation:
            Only when the server stops or the connection ends.
        """
        await self._send_one(
            conn, {"type": "error", "code": "bad-request", "message": "text frames only"}
        )

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        """Leave the room (the others are told) and update the total.

        Cancellation:
            Runs shielded, for at most ``close_timeout`` seconds.
        """
        member = self._members.pop(conn.id, None)
        if member is None:  # pragma: no cover
            return
        if member.room is not None:
            await self._leave_room(member, tell_self=False)
        await self._announce(conn)

    # -- requests (a subclass may extend them; each may raise _Refused) ------------------

    async def handle_join(self, member: _Member, request: dict[str, Any]) -> None:
        """``{"type": "join", "room", "nick"}``.

        Cancellation:
            As for :meth:`on_text`; a send never waits for a client.
        """
        name = self._check_room(request.get("room"))
        nick = self._check_nick(request.get("nick"))
        conn = member.conn
        if member.room is not None:
            await self._leave_room(member, tell_self=False)
        room = self._rooms.get(name) or self._idle.pop(name, None)
        if room is None:
            room = _Room(name, deque(maxlen=self.history))
        self._rooms[name] = room
        nick = room.unique_nick(nick, self.max_nick)
        room.members[conn.id] = nick
        member.room, member.nick = room, nick
        broadcaster = self._broadcaster(conn)
        group = self._group(room)
        broadcaster.join(conn, group)
        # Joining and the welcome happen with no checkpoint between them, so the
        # history and the users in the welcome are exactly what came before the
        # first message this connection gets from the group.
        await self._send_one(
            conn,
            {
                "type": "welcome",
                "id": conn.id,
                "room": name,
                "nick": nick,
                "history": list(room.history),
                "users": room.users(),
            },
        )
        await broadcaster.send_group(
            group,
            _dumps({"type": "joined", "room": name, "id": conn.id, "nick": nick}),
            exclude=[conn],
        )
        await self._send_users(conn, room)
        await self._announce(conn)

    async def handle_say(self, member: _Member, request: dict[str, Any]) -> None:
        """``{"type": "say", "text"}``.

        Cancellation:
            As for :meth:`on_text`; a send never waits for a client.
        """
        text = request.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _Refused("bad-text", "text must be a non-empty string")
        if len(text) > self.max_text:
            raise _Refused("bad-text", f"text is longer than {self.max_text} characters")
        room = member.room
        if room is None or member.nick is None:
            raise _Refused("not-joined", "join a room first")
        entry = {
            "type": "message",
            "room": room.name,
            "id": member.conn.id,
            "from": member.nick,
            "text": text,
            "time": int(time.time() * 1000),
        }
        room.history.append(entry)
        await self._broadcaster(member.conn).send_group(self._group(room), _dumps(entry))

    async def handle_nick(self, member: _Member, request: dict[str, Any]) -> None:
        """``{"type": "nick", "nick"}``.

        Cancellation:
            As for :meth:`on_text`; a send never waits for a client.
        """
        nick = self._check_nick(request.get("nick"))
        conn, room, old = member.conn, member.room, member.nick
        if room is None:
            member.nick = nick
            await self._send_one(
                conn, {"type": "nick", "room": None, "id": conn.id, "old": old, "nick": nick}
            )
            return
        nick = room.unique_nick(nick, self.max_nick, me=conn.id)
        room.members[conn.id] = member.nick = nick
        notice = {"type": "nick", "room": room.name, "id": conn.id, "old": old, "nick": nick}
        await self._broadcaster(conn).send_group(self._group(room), _dumps(notice))
        await self._send_users(conn, room)

    async def handle_leave(self, member: _Member) -> None:
        """``{"type": "leave"}``.

        Cancellation:
            As for :meth:`on_text`; a send never waits for a client.
        """
        if member.room is None:
            raise _Refused("not-joined", "not in a room")
        await self._leave_room(member, tell_self=True)
        await self._announce(member.conn)

    # -- helpers -------------------------------------------------------------------

    def _check_room(self, value: Any) -> str:
        if (
            not isinstance(value, str)
            or not 1 <= len(value) <= self.max_room
            or not _ROOM.fullmatch(value)
        ):
            raise _Refused(
                "bad-room",
                f"a room is 1-{self.max_room} characters of A-Z, a-z, 0-9, '_', '.', '-'"
                " and starts with a letter or digit",
            )
        return value

    def _check_nick(self, value: Any) -> str:
        if isinstance(value, str):
            value = _SPACES.sub(" ", value.strip(" "))  # trim, one space between words
        if (
            not isinstance(value, str)
            or not 1 <= len(value) <= self.max_nick
            or not _NICK.fullmatch(value)
        ):
            raise _Refused(
                "bad-nick",
                f"a nick is 1-{self.max_nick} letters, digits, spaces or _ . ' -"
                " and starts with a letter or digit",
            )
        return value

    def _group(self, room: _Room) -> str:
        return f"{self.group_prefix}:{room.name}"

    @staticmethod
    def _broadcaster(conn: WebSocketConnection) -> Broadcaster:
        broadcaster: Broadcaster = conn.server.broadcaster
        return broadcaster

    async def _send_one(self, conn: WebSocketConnection, message: dict[str, Any]) -> None:
        await self._broadcaster(conn).send_one(conn, _dumps(message))

    async def _send_users(self, conn: WebSocketConnection, room: _Room) -> None:
        users = {
            "type": "users",
            "room": room.name,
            "count": len(room.members),
            "users": room.users(),
        }
        await self._broadcaster(conn).send_group(self._group(room), _dumps(users))

    async def _leave_room(self, member: _Member, *, tell_self: bool) -> None:
        room, conn = member.room, member.conn
        assert room is not None
        nick = room.members.pop(conn.id, member.nick)
        member.room = None
        broadcaster = self._broadcaster(conn)
        group = self._group(room)
        broadcaster.leave(conn, group)  # a no-op once the connection has ended
        if not room.members:
            del self._rooms[room.name]
            if self.history and self.max_idle_rooms:
                self._idle[room.name] = room
                while len(self._idle) > self.max_idle_rooms:
                    self._idle.popitem(last=False)
        left = {"type": "left", "room": room.name, "id": conn.id, "nick": nick}
        if tell_self:
            await broadcaster.send_one(conn, _dumps(left))
        if room.members:
            await broadcaster.send_group(group, _dumps(left))
            await self._send_users(conn, room)

    async def _announce(self, conn: WebSocketConnection) -> None:
        """Send ``online`` to every chat connection if the totals changed."""
        now = (len(self._members), len(self._rooms))
        if now == self._announced:
            return
        self._announced = now
        await self._broadcaster(conn).send_group(
            self.group_prefix, _dumps({"type": "online", "total": now[0], "rooms": now[1]})
        )


# -- the command -------------------------------------------------------------------


async def _run_chat(args: argparse.Namespace) -> int:
    handler = ChatHandler(history=args.history)
    return await serve_until_signal(
        "chat",
        {"/": handler},
        args,
        lambda server: (
            f"wsnursery chat on http://{url_host(args.host)}:{server.port}/ (Ctrl-C to stop)"
        ),
        max_message_size=64 * 1024,
        compression=not args.no_compression,
    )


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``chat`` to the command line's subcommands."""
    chat = commands.add_parser(
        "chat",
        help="run the chat demo (open http://HOST:PORT/ in a browser)",
        description="A chat server whose page is served on the same path as its WebSocket. "
        "Ctrl-C stops it gracefully (1001 to every client); a second Ctrl-C at once.",
    )
    add_server_options(chat, max_message_size=None)
    chat.add_argument(
        "--history",
        type=int_at_least(0),
        default=50,
        metavar="N",
        help="messages kept per room (default 50)",
    )
    chat.add_argument(
        "--no-compression", action="store_true", help="do not accept permessage-deflate"
    )
    chat.set_defaults(run=lambda args: trio.run(_run_chat, args))
