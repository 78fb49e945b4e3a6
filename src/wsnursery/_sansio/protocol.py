"""The WebSocket protocol after the handshake, with no I/O and no trio.

Theory of operation
-------------------
wsproto's frame layer (:class:`wsproto.frame_protocol.FrameProtocol`) parses and
serialises frames. It deliberately leaves several duties to its caller; this
module owns all of them, in one place:

* reassembling fragments into whole messages, with a size limit (1009);
* answering pings with pongs, and echoing the peer's close frame;
* turning every peer violation into the right close code: wsproto reports a bad
  frame as ``ParseFailed`` with 1002 (protocol error) or 1007 (bad UTF-8), and we
  add 1009 (message too big), including inside a compressed message;
* end of file (``receive_data(b"")``): 1006 when no close frame came first;
* a BROKEN state after a write that failed midway, so that no further frame is
  ever produced on a stream that may hold half of one.

The states, and what moves between them::

    OPEN ──send_close()──────────────► CLOSING ──peer's close──► CLOSED
      │                                   │
      ├──peer's close (echoed)──────────► CLOSED
      ├──bad frame / too big (close sent)► CLOSED   (fail the connection)
      └──EOF────────────────────────────► CLOSED   (1006)
    any state ──send_failed()──────────► BROKEN

``transport_should_close`` says when the caller must close the TCP connection
itself: at once after failing the connection, and on the server once the closing
handshake is complete (RFC 6455 section 7.1.1: the server closes TCP first). A
client waits for the server to close TCP, for at most the close timeout.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterator, Sequence
from typing import cast

from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import Opcode, ParseFailed

from .deflate import BoundedPerMessageDeflate, FrameLayer, compressed_size_bound
from .exceptions import CloseCode, CloseReason
from .mask import mask

__all__ = ["Frame", "Protocol", "ProtocolState", "encode_frame"]

Message = str | bytes
#: A frame to write: one buffer, or buffers to write in order.
Frame = bytes | bytearray | list[bytes | bytearray]
# Frames up to this size are joined into one buffer: a copy is cheaper than writev.
_JOIN_BELOW = 4096
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack

_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_PING = Opcode.PING
_PONG = Opcode.PONG
_CLOSE = Opcode.CLOSE
#: Frames parsed (each 16 KiB received counts as one more) before the caller
#: should reach a schedule point: see Protocol.receive_data and resume.
WORK_BUDGET = 64


def encode_frame(message: Message | bytearray | memoryview, key: bytes | None = None) -> Frame:
    """Frame a whole message with no extension: unmasked, or masked with ``key``.

    A server sends unmasked frames; a client masks each with a fresh 4-byte
    ``key``. Text (``str``) becomes a text frame, anything bytes-like a binary
    one. The header (RFC 6455 section 5.2) is built here; a payload over 4 KiB
    comes back as ``[header, payload]`` so that it is written without being
    copied (again, when masked).
    """
    if isinstance(message, str):
        payload = message.encode("utf-8")
        first = 0x81  # FIN + text
    else:
        payload = message if type(message) is bytes else bytes(message)
        first = 0x82  # FIN + binary
    n = len(payload)
    mask_bit = 0 if key is None else 0x80
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = _pack_short(first, mask_bit | 126, n)
    else:
        header = _pack_long(first, mask_bit | 127, n)
    if key is not None:
        header += key
        payload = mask(payload, key)
    if n <= _JOIN_BELOW:
        return header + payload
    return [header, payload]


class MessageQueue:
    """A FIFO of received messages: a list and a read position.

    An empty ``collections.deque`` costs about 700 bytes, most of an idle
    connection's protocol state; this costs about 100. ``popleft`` is O(1)
    amortised: the list is cleared whenever it is drained and compacted when
    the read position passes half its length.
    """

    __slots__ = ("_head", "_items")

    def __init__(self) -> None:
        self._items: list[Message | None] = []
        self._head = 0

    def append(self, message: Message) -> None:
        self._items.append(message)

    def popleft(self) -> Message:
        items = self._items
        head = self._head
        if head >= len(items):
            raise IndexError("pop from an empty queue")
        message = items[head]
        assert message is not None
        head += 1
        if head == len(items):
            items.clear()
            head = 0
        else:
            items[head - 1] = None  # do not keep a taken message alive
            if head >= 64 and 2 * head >= len(items):
                del items[:head]
                head = 0
        self._head = head
        return message

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __bool__(self) -> bool:
        return len(self._items) > self._head

    def __iter__(self) -> Iterator[Message]:
        return iter(cast("list[Message]", self._items[self._head :]))

    def __getitem__(self, index: int) -> Message:
        return cast("list[Message]", self._items[self._head :])[index]


def _join(parts: list[Message]) -> Message:
    if isinstance(parts[0], str):
        return "".join(cast("list[str]", parts))
    return b"".join(cast("list[bytes]", parts))


class ProtocolState(enum.Enum):
    """Where a connection is in its life (see :attr:`WebSocketConnection.state`)."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    BROKEN = "broken"


def _fresh_per_message(extension: Extension, client: bool) -> bool:
    if isinstance(extension, PerMessageDeflate):
        if client:
            return bool(extension.client_no_context_takeover)
        return bool(extension.server_no_context_takeover)
    return False


class Protocol:
    """One side of an open WebSocket connection, as a synchronous state machine.

    Feed it what the network delivered with :meth:`receive_data`, then take
    whole messages from :attr:`messages`, pong payloads from :attr:`pongs` and
    bytes to write from :meth:`data_to_send`. The ``send_*`` methods return the
    bytes of the frame they made.

    Args:
        client: True for the client side (masks what it sends, expects unmasked
            frames), False for the server side.
        extensions: Negotiated wsproto extensions (permessage-deflate).
        max_message_size: The largest message accepted, in bytes after
            decompression (text counts its UTF-8 bytes). A larger one fails the
            connection with 1009. None means no limit.
    """

    def __init__(
        self,
        *,
        client: bool,
        extensions: Sequence[Extension] = (),
        max_message_size: int | None = 2**20,
    ) -> None:
        self.client = client
        self.max_message_size = max_message_size
        self.extensions = list(extensions)
        self._proto = FrameLayer(client, self.extensions)
        #: True when :func:`encode_frame`'s bytes are this side's frame for a
        #: message: a server frame is unmasked, so without an extension the
        #: same bytes serve every such connection (what a broadcast relies on).
        self.shares_frames = not client and not self.extensions
        self.state = ProtocolState.OPEN
        #: Whole messages received and not yet taken, oldest first.
        self.messages = MessageQueue()
        #: Payloads of the pongs received and not yet taken.
        self.pongs: list[bytes] = []
        #: Number of pings received (and answered).
        self.pings_received = 0
        #: The close frame we sent, if any.
        self.close_sent: CloseReason | None = None
        #: The close frame the peer sent, if any.
        self.close_received: CloseReason | None = None
        #: Why the connection closed, once it has (see :class:`CloseReason`).
        self.closed: CloseReason | None = None
        #: True once the caller should close the transport now.
        self.transport_should_close = False
        #: Work left before the caller should reach a schedule point and call
        #: :meth:`resume` (see :meth:`receive_data`).
        self.budget = WORK_BUDGET
        #: True when the budget ran out with frames maybe still unparsed.
        self.parse_pending = False
        self._deflate = next(
            (e for e in self.extensions if isinstance(e, BoundedPerMessageDeflate)), None
        )
        #: True when a frame made by :meth:`frame_message` may be left unsent
        #: without breaking the next ones: no extension, or permessage-deflate
        #: that compresses each message afresh (no context takeover on our
        #: side). With context takeover the next message is compressed
        #: against this one, which the peer would never have seen.
        self.frames_droppable = all(_fresh_per_message(e, client) for e in self.extensions)
        self._out = bytearray()
        self._parts: list[Message] = []
        self._size = 0

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Process bytes from the network; ``b""`` means end of file.

        Never raises for anything the peer sent: violations fail the
        connection (close frame queued, :attr:`closed` set, state CLOSED).
        Data arriving after the connection closed is ignored.

        Parses at most :attr:`budget` frames (each 16 KiB received counts as
        one more): when the budget runs out, the rest stays buffered until
        :meth:`resume`. The caller reaches a schedule point in between, so
        that a peer that keeps the socket full cannot starve other tasks.
        """
        state = self.state
        if state is ProtocolState.CLOSED or state is ProtocolState.BROKEN:
            if not data:
                self.transport_should_close = True  # the server's EOF after the handshake
            return
        if not data:
            self._receive_eof()
            return
        self._proto.receive_bytes(data)  # type: ignore[arg-type]
        self.budget -= len(data) >> 14
        self._parse()

    def resume(self) -> None:
        """Refill :attr:`budget` and parse on from where it ran out."""
        self.budget = WORK_BUDGET
        if self.parse_pending:
            self.parse_pending = False
            state = self.state
            if state is ProtocolState.OPEN or state is ProtocolState.CLOSING:
                self._parse()

    def _parse(self) -> None:
        proto = self._proto
        budget = self.budget
        try:
            for frame in proto.received_frames():
                budget -= 1
                opcode = frame.opcode
                if opcode is _TEXT or opcode is _BINARY:
                    payload = cast(Message, frame.payload)
                    if frame.message_finished and not self._parts:
                        # The common case: a whole message in one frame.
                        if self.max_message_size is not None and self._too_big(payload):
                            return
                        if self.state is ProtocolState.OPEN:
                            self.messages.append(payload)
                    else:
                        self._parts.append(payload)
                        if self.max_message_size is not None and self._too_big(payload):
                            return
                        if frame.message_finished:
                            parts, self._parts, self._size = self._parts, [], 0
                            if self.state is ProtocolState.OPEN:
                                self.messages.append(_join(parts))
                elif opcode is _PING:
                    self.pings_received += 1
                    if self.state is ProtocolState.OPEN:
                        self._out += proto.pong(cast(bytes, frame.payload))
                elif opcode is _PONG:
                    self.pongs.append(bytes(cast(bytes, frame.payload)))
                elif opcode is _CLOSE:
                    code, reason = cast("tuple[int, str]", frame.payload)
                    self._receive_close(int(code), reason)
                    return
                if budget <= 0:
                    # Stop here; resume() goes on after a schedule point.
                    self.parse_pending = True
                    return
            # Everything buffered is parsed. A frame header that already
            # declares a too-big message is refused now, not after its payload.
            if self.max_message_size is not None:
                pending = proto.pending_frame()
                if pending is not None:
                    self._check_declared_size(*pending)
        except ParseFailed as exc:
            self.fail(int(exc.code), str(exc))
        finally:
            self.budget = budget

    def _check_declared_size(self, opcode: Opcode, remaining: int) -> None:
        """Fail with 1009 when the frame being received declares too big a message.

        Uncompressed, the message is at least what was received of it plus
        the frame's declared length: past ``max_message_size`` it is refused
        at once. Compressed, the declared length says little about the
        inflated size, so only a compressed length past
        :func:`compressed_size_bound` of the limit is refused here (no
        deflate encoder in use produces that much for a message within the
        limit); below it, inflating stops at the limit as before.
        """
        assert self.max_message_size is not None
        if opcode.iscontrol():
            return  # at most 125 bytes, and not part of a message
        deflate = self._deflate
        if deflate is not None and deflate.inbound_compressed:
            declared = deflate.compressed_received + remaining
            limit = compressed_size_bound(self.max_message_size)
        else:
            # _size counts this message's payload so far (a few bytes less
            # while a UTF-8 sequence is split across reads: never more).
            declared = self._size + remaining if self._parts else remaining
            limit = self.max_message_size
        if declared > limit:
            self._parts = []
            self.fail(
                CloseCode.MESSAGE_TOO_BIG,
                f"frame declares a message larger than {self.max_message_size} bytes",
            )

    def _too_big(self, payload: Message) -> bool:
        """Count a fragment against max_message_size; fail the connection past it."""
        if isinstance(payload, str) and not payload.isascii():
            self._size += len(payload.encode("utf-8"))
        else:
            self._size += len(payload)
        assert self.max_message_size is not None
        if self._size > self.max_message_size:
            self._parts = []
            self.fail(
                CloseCode.MESSAGE_TOO_BIG, f"message larger than {self.max_message_size} bytes"
            )
            return True
        if not self._parts:
            self._size = 0
        return False

    def _receive_close(self, code: int, reason: str) -> None:
        self.close_received = CloseReason(code, reason, initiated_by_peer=True)
        if self.state is ProtocolState.OPEN:
            # RFC 6455 section 5.5.1: reply with a close frame, echoing the code
            # (an empty close frame answers one that had no code).
            self._out += self._proto.close(None if code == CloseCode.NO_STATUS_RCVD else code)
            self.close_sent = CloseReason(code, "", initiated_by_peer=True)
            self.closed = self.close_received
        else:  # CLOSING: this answers the close we sent.
            assert self.close_sent is not None
            self.closed = self.close_sent
        self.state = ProtocolState.CLOSED
        if not self.client:
            self.transport_should_close = True

    def _receive_eof(self) -> None:
        if self.closed is None:
            # No close frame: "_The WebSocket Connection Close Code_ is 1006".
            if self.state is ProtocolState.CLOSING:
                reason = "connection lost before the closing handshake finished"
            else:
                reason = "connection lost without a close frame"
            self.closed = CloseReason(CloseCode.ABNORMAL_CLOSURE, reason, initiated_by_peer=True)
        self.state = ProtocolState.CLOSED
        self.transport_should_close = True

    # -- sending -------------------------------------------------------------

    def send_message(self, message: Message | bytearray | memoryview) -> bytes:
        """Return the frame for a text (str) or binary (bytes-like) message.

        Raises:
            RuntimeError: if the state is not OPEN.
        """
        frame = self.frame_message(message)
        return b"".join(frame) if isinstance(frame, list) else bytes(frame)

    def frame_message(self, message: Message | bytearray | memoryview) -> Frame:
        """Like :meth:`send_message`, but a large frame comes as ``[header, payload]``.

        Writing the two with one ``writev`` saves copying the payload. Frames
        for a connection with permessage-deflate come from wsproto's
        serialiser; without an extension the header (RFC 6455 section 5.2) is
        built here, with no copy of the payload on the server side.
        """
        if self.state is not ProtocolState.OPEN:
            raise RuntimeError(f"cannot send a message in state {self.state.name}")
        if self._proto.extensions:
            return bytes(self._proto.send_data(message, True))  # type: ignore[arg-type]
        if not self.client:
            return encode_frame(message)
        # RFC 6455 section 5.3: a fresh, unpredictable key for every frame.
        return encode_frame(message, os.urandom(4))

    def send_ping(self, payload: bytes = b"") -> bytes:
        """Return a ping frame (payload at most 125 bytes)."""
        if self.state is not ProtocolState.OPEN:
            raise RuntimeError(f"cannot send a ping in state {self.state.name}")
        if len(payload) > 125:
            raise ValueError("a ping payload is at most 125 bytes")
        return self._proto.ping(payload)  # type: ignore[return-value]

    def send_pong(self, payload: bytes = b"") -> bytes:
        """Return an unsolicited pong frame (payload at most 125 bytes)."""
        if self.state is not ProtocolState.OPEN:
            raise RuntimeError(f"cannot send a pong in state {self.state.name}")
        if len(payload) > 125:
            raise ValueError("a pong payload is at most 125 bytes")
        return self._proto.pong(payload)  # type: ignore[return-value]

    def send_close(self, code: int = 1000, reason: str = "") -> bytes:
        """Start the closing handshake and return the close frame.

        In any state but OPEN this does nothing and returns ``b""``.
        """
        if self.state is not ProtocolState.OPEN:
            return b""
        self.state = ProtocolState.CLOSING
        self.close_sent = CloseReason(code, reason, initiated_by_peer=False)
        return self._proto.close(code, reason or None)  # type: ignore[return-value]

    def fail(self, code: int, reason: str = "") -> None:
        """Fail the connection (RFC 6455 section 7.1.7).

        Queues a close frame with ``code`` if none was sent yet, marks the
        connection CLOSED and asks for the transport to be closed at once.
        """
        if self.state is ProtocolState.CLOSED or self.state is ProtocolState.BROKEN:
            return
        if self.state is ProtocolState.OPEN:
            self._out += self._proto.close(code, reason or None)
            self.close_sent = CloseReason(code, reason, initiated_by_peer=False)
        if self.closed is None:
            self.closed = CloseReason(code, reason, initiated_by_peer=False)
        self.state = ProtocolState.CLOSED
        self.transport_should_close = True

    def abort(self, reason: str) -> None:
        """The transport is being closed without a (complete) closing handshake.

        Sets :attr:`closed` to 1006 with ``reason`` unless the close reason is
        already known, and moves to CLOSED. Nothing more is sent.
        """
        if self.closed is None:
            self.closed = CloseReason(CloseCode.ABNORMAL_CLOSURE, reason, initiated_by_peer=False)
        if self.state is not ProtocolState.BROKEN:
            self.state = ProtocolState.CLOSED
        self.transport_should_close = True
        self._out.clear()

    def send_failed(self, reason: str = "transport failed while sending") -> None:
        """Record that a write broke midway: the stream may hold half a frame.

        The state becomes BROKEN and nothing more is ever sent.
        """
        if self.closed is None:
            self.closed = CloseReason(CloseCode.ABNORMAL_CLOSURE, reason, initiated_by_peer=False)
        self.state = ProtocolState.BROKEN
        self.transport_should_close = True
        self._out.clear()

    def data_to_send(self) -> bytes:
        """Return and forget the bytes the protocol queued (pongs, close frames)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out
