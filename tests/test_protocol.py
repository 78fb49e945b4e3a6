"""The sans-I/O protocol layer, driven from both sides with no I/O at all."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, XorMaskerSimple

from wsnursery._sansio import mask as _mask
from wsnursery._sansio.deflate import BoundedPerMessageDeflate
from wsnursery._sansio.protocol import Protocol, ProtocolState


@pytest.fixture(params=["c", "python"], autouse=True)
def masker(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run every test with the C masker and with wsproto's pure-Python one."""
    before = _mask.fast
    if request.param == "c":
        assert _mask.use_fast_masker(), "websockets.speedups should be installed for the tests"
    else:
        _mask.use_fast_masker(False)
    assert _mask.active_masker() == request.param
    yield request.param
    _mask.use_fast_masker(before)


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """A raw frame, built by hand so that it can break every rule."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def pair(**kwargs: object) -> tuple[Protocol, Protocol]:
    return Protocol(client=True, **kwargs), Protocol(client=False, **kwargs)  # type: ignore[arg-type]


def deflate_pair(max_message_size: int | None = 2**20) -> tuple[Protocol, Protocol]:
    client_ext = BoundedPerMessageDeflate(max_message_size=max_message_size)
    server_ext = BoundedPerMessageDeflate(max_message_size=max_message_size)
    client_ext.finalize("permessage-deflate")
    server_ext.accept("permessage-deflate")
    return (
        Protocol(client=True, extensions=[client_ext], max_message_size=max_message_size),
        Protocol(client=False, extensions=[server_ext], max_message_size=max_message_size),
    )


def assert_failed(proto: Protocol, code: int) -> None:
    """The protocol failed the connection with ``code`` and queued that close frame."""
    assert proto.state is ProtocolState.CLOSED
    assert proto.closed is not None
    assert proto.closed.code == code
    assert proto.closed.initiated_by_peer is False
    assert proto.transport_should_close
    out = proto.data_to_send()
    assert out[0] == 0x88  # FIN + close
    if not proto.client:  # the client's frame is masked
        assert struct.unpack("!H", out[2:4])[0] == code


# -- messages ------------------------------------------------------------------


@pytest.mark.parametrize("sender_is_client", [True, False])
@pytest.mark.parametrize(
    "message", ["", "hello", "héllo ✓ 🐍", b"", b"\x00\xff" * 100, "x" * 70000]
)
def test_message_round_trip(sender_is_client: bool, message: str | bytes) -> None:
    client, server = pair()
    sender, receiver = (client, server) if sender_is_client else (server, client)
    receiver.receive_data(sender.send_message(message))
    assert list(receiver.messages) == [message]
    assert type(receiver.messages[0]) is type(message)


@pytest.mark.parametrize("sender_is_client", [True, False])
def test_compressed_round_trip(sender_is_client: bool) -> None:
    client, server = deflate_pair()
    sender, receiver = (client, server) if sender_is_client else (server, client)
    for message in ["a" * 10000, b"b" * 5000, "", "é" * 300]:
        data = sender.send_message(message)
        if len(message) > 1000:
            assert len(data) < len(message) / 10  # it really is compressed
        receiver.receive_data(data)
    assert list(receiver.messages) == ["a" * 10000, b"b" * 5000, "", "é" * 300]


def test_fragments_are_reassembled_and_interleaved_pings_answered() -> None:
    server = Protocol(client=False)
    server.receive_data(frame(0x1, "hé".encode(), fin=False))
    server.receive_data(frame(0x9, b"ping!"))
    assert not server.messages
    assert server.pings_received == 1
    pong = server.data_to_send()
    assert pong == b"\x8a\x05ping!"
    server.receive_data(frame(0x0, b"llo", fin=False) + frame(0x0, b"", fin=True))
    assert list(server.messages) == ["héllo"]


def test_a_frame_split_anywhere_gives_the_same_message() -> None:
    data = frame(0x2, bytes(range(256)) * 10)
    for cut in range(1, len(data), 97):
        server = Protocol(client=False)
        server.receive_data(data[:cut])
        server.receive_data(data[cut:])
        assert list(server.messages) == [bytes(range(256)) * 10]


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=300)), max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
    compress=st.booleans(),
)
def test_any_chunking_of_any_messages(
    messages: list[str | bytes], cuts: list[int], compress: bool
) -> None:
    client, server = deflate_pair() if compress else pair()
    stream = b"".join(client.send_message(m) for m in messages)
    pos = 0
    for size in cuts:
        server.receive_data(stream[pos : pos + size])
        pos += size
    server.receive_data(stream[pos:])
    assert list(server.messages) == messages


# -- limits --------------------------------------------------------------------


def test_message_at_the_limit_is_accepted() -> None:
    client, server = pair(max_message_size=1000)
    server.receive_data(client.send_message(b"x" * 1000))
    assert len(server.messages[0]) == 1000


def test_too_big_in_one_frame_fails_with_1009() -> None:
    client, server = pair(max_message_size=1000)
    server.receive_data(client.send_message(b"x" * 1001))
    assert_failed(server, 1009)


def test_too_big_across_fragments_fails_with_1009() -> None:
    server = Protocol(client=False, max_message_size=1000)
    for _ in range(3):
        server.receive_data(frame(0x2 if _ == 0 else 0x0, b"y" * 400, fin=False))
    assert_failed(server, 1009)


def test_text_counts_utf8_bytes_not_characters() -> None:
    client, server = pair(max_message_size=1000)
    server.receive_data(client.send_message("é" * 500))  # 1000 bytes
    assert server.messages
    client, server = pair(max_message_size=1000)
    server.receive_data(client.send_message("é" * 501))  # 1002 bytes
    assert_failed(server, 1009)


def test_deflate_bomb_fails_with_1009_before_inflating_it_all() -> None:
    client, server = deflate_pair(max_message_size=2**20)
    client.max_message_size = None
    data = client.send_message(b"\x00" * (64 * 2**20))  # 64 MiB of zeros
    assert len(data) < 100_000
    server.receive_data(data)
    assert_failed(server, 1009)


def test_bad_deflate_data_fails_with_1007() -> None:
    _, server = deflate_pair()
    server.receive_data(frame(0x2, b"\xff\xff\xff\xff not deflate", rsv=4))
    assert_failed(server, 1007)


def test_no_limit() -> None:
    client, server = pair(max_message_size=None)
    server.receive_data(client.send_message(b"z" * 3_000_000))
    assert len(server.messages[0]) == 3_000_000


def test_compressed_deflate_extension_without_limit() -> None:
    client, server = deflate_pair(max_message_size=None)
    server.receive_data(client.send_message("q" * 100_000))
    assert server.messages[0] == "q" * 100_000


# -- control frames and closing ------------------------------------------------


def test_ping_is_answered_and_pong_recorded() -> None:
    client, server = pair()
    server.receive_data(client.send_ping(b"abc"))
    client.receive_data(server.data_to_send())
    assert list(client.pongs) == [b"abc"]


def test_unsolicited_pong_is_recorded_not_answered() -> None:
    client, server = pair()
    server.receive_data(client.send_pong(b"hb"))
    assert list(server.pongs) == [b"hb"]
    assert server.data_to_send() == b""


@pytest.mark.parametrize("method", ["send_ping", "send_pong"])
def test_control_payload_limit_on_send(method: str) -> None:
    client, _ = pair()
    with pytest.raises(ValueError, match="125"):
        getattr(client, method)(b"x" * 126)


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (1001, "bye"), (4000, "app ✓")])
def test_peer_close_is_echoed_with_its_code(code: int, reason: str) -> None:
    client, server = pair()
    server.receive_data(client.send_close(code, reason))
    assert server.state is ProtocolState.CLOSED
    assert server.closed is not None
    assert (server.closed.code, server.closed.reason) == (code, reason)
    assert server.closed.initiated_by_peer
    assert server.transport_should_close  # the server closes TCP first
    client.receive_data(server.data_to_send())
    assert client.state is ProtocolState.CLOSED
    assert client.closed is not None
    assert (client.closed.code, client.closed.reason, client.closed.initiated_by_peer) == (
        code,
        reason,
        False,
    )
    assert not client.transport_should_close  # the client waits for the server's EOF
    client.receive_data(b"")
    assert client.transport_should_close
    assert client.closed.code == code  # EOF after the handshake changes nothing


def test_close_without_status_is_1005_and_echoed_empty() -> None:
    server = Protocol(client=False)
    server.receive_data(frame(0x8, b""))
    assert server.closed is not None
    assert server.closed.code == 1005
    assert server.closed.ok
    assert server.data_to_send() == b"\x88\x00"


def test_server_initiated_close() -> None:
    client, server = pair()
    client.receive_data(server.send_close(1001, "going away"))
    assert client.closed is not None
    assert client.closed.code == 1001
    server.receive_data(client.data_to_send())
    assert server.closed is not None
    assert server.closed.initiated_by_peer is False
    assert server.transport_should_close


def test_messages_after_our_close_are_dropped() -> None:
    client, server = pair()
    server.send_close()
    server.receive_data(client.send_message("late"))
    assert not server.messages
    assert server.state is ProtocolState.CLOSING


def test_close_in_the_middle_of_a_fragmented_message_is_echoed() -> None:
    server = Protocol(client=False)
    server.receive_data(frame(0x1, b"part", fin=False))
    server.receive_data(frame(0x8, struct.pack("!H", 1000)))
    assert server.closed is not None
    assert server.closed.code == 1000
    assert server.data_to_send() == b"\x88\x02\x03\xe8"


def test_eof_without_close_is_1006() -> None:
    server = Protocol(client=False)
    server.receive_data(b"")
    assert server.closed is not None
    assert server.closed.code == 1006
    assert not server.closed.ok
    assert server.transport_should_close


def test_eof_while_closing_is_1006() -> None:
    server = Protocol(client=False)
    server.send_close()
    server.receive_data(b"")
    assert server.closed is not None
    assert server.closed.code == 1006
    assert "closing handshake" in server.closed.reason


def test_data_after_close_is_ignored() -> None:
    client, server = pair()
    server.receive_data(client.send_close())
    server.data_to_send()
    server.receive_data(frame(0x1, b"after"))
    assert not server.messages
    assert server.data_to_send() == b""


def test_send_in_wrong_state_raises() -> None:
    client, _ = pair()
    client.send_close()
    for method, arg in [("send_message", "x"), ("send_ping", b""), ("send_pong", b"")]:
        with pytest.raises(RuntimeError, match="CLOSING"):
            getattr(client, method)(arg)
    assert client.send_close() == b""  # a second close does nothing


def test_send_failed_breaks_the_protocol_for_good() -> None:
    client, server = pair()
    server.receive_data(client.send_ping(b"p"))  # a pong is queued
    server.send_failed()
    assert server.state is ProtocolState.BROKEN
    assert server.closed is not None
    assert server.closed.code == 1006
    assert server.data_to_send() == b""
    with pytest.raises(RuntimeError, match="BROKEN"):
        server.send_message("x")
    server.receive_data(frame(0x1, b"x"))
    assert not server.messages


# -- peer violations ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(0x3, b"x"), 1002),  # reserved non-control opcode
        (frame(0xB, b""), 1002),  # reserved control opcode
        (frame(0x1, b"x", rsv=4), 1002),  # RSV1 without an extension
        (frame(0x1, b"x", rsv=2), 1002),  # RSV2
        (frame(0x1, b"x", rsv=1), 1002),  # RSV3
        (frame(0x1, b"x", mask=False), 1002),  # unmasked client frame
        (frame(0x9, b"", fin=False), 1002),  # fragmented control frame
        (frame(0x9, b"x" * 126), 1002),  # control payload over 125
        (frame(0x0, b"x"), 1002),  # continuation with nothing to continue
        (frame(0x1, b"a", fin=False) + frame(0x2, b"b"), 1002),  # new message mid-message
        (frame(0x8, b"\x03"), 1002),  # close payload of 1 byte
        (frame(0x8, struct.pack("!H", 999)), 1002),  # close code below 1000
        (frame(0x8, struct.pack("!H", 1005)), 1002),  # local-only close code
        (frame(0x8, struct.pack("!H", 1006)), 1002),
        (frame(0x8, struct.pack("!H", 1004)), 1002),  # reserved
        (frame(0x8, struct.pack("!H", 5000)), 1002),  # out of range
        (frame(0x8, struct.pack("!H", 1000) + b"\xff\xfe"), 1007),  # bad UTF-8 reason
        (frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xed\xa0\x80"), 1007),  # surrogate
        (frame(0x1, b"\xc0\xaf"), 1007),  # overlong encoding
        (frame(0x1, b"\xce", fin=False) + frame(0x0, b"\xff"), 1007),  # bad, split
        (frame(0x1, b"ok\xce", fin=True), 1007),  # truncated sequence at the end
    ],
)
def test_violations_fail_with_the_right_code(data: bytes, code: int) -> None:
    server = Protocol(client=False)
    server.receive_data(data)
    assert_failed(server, code)


def test_minimal_length_rule_for_two_byte_length() -> None:
    server = Protocol(client=False)
    server.receive_data(b"\x82\xfe\x00\x05" + b"\x00" * 4 + b"hello")
    assert_failed(server, 1002)


def test_masked_frame_to_a_client_fails_with_1002() -> None:
    client = Protocol(client=True)
    client.receive_data(frame(0x1, b"x", mask=True))
    assert client.state is ProtocolState.CLOSED
    assert client.closed is not None
    assert client.closed.code == 1002
    assert client.transport_should_close  # a client fails the connection too: close TCP
    out = client.data_to_send()
    assert out[0] == 0x88
    assert out[1] & 0x80  # a masked close frame


def test_bad_utf8_split_across_fragments_is_caught() -> None:
    server = Protocol(client=False)
    good_then_bad = "✓".encode()[:2]
    server.receive_data(frame(0x1, good_then_bad, fin=False))
    assert server.state is ProtocolState.OPEN  # could still be valid
    server.receive_data(frame(0x0, b"\x41", fin=True))
    assert_failed(server, 1007)


def test_a_violation_after_valid_messages_keeps_them() -> None:
    server = Protocol(client=False)
    server.receive_data(frame(0x1, b"first") + frame(0x3, b""))
    assert server.state is ProtocolState.CLOSED
    # The message before the bad frame was delivered before the failure.
    assert server.closed is not None
    assert server.closed.code == 1002


def test_bounded_deflate_resets_between_messages() -> None:
    client, server = deflate_pair(max_message_size=1000)
    for _ in range(5):
        server.receive_data(client.send_message(b"a" * 900))
    assert len(server.messages) == 5
    assert server.state is ProtocolState.OPEN


def test_fast_masker_matches_wsproto_on_random_chunkings() -> None:
    if _mask.apply_mask is None:  # pragma: no cover
        pytest.fail("websockets.speedups is a test dependency")
    import random

    rng = random.Random(1234)
    for _ in range(300):
        key = os.urandom(4)
        data = os.urandom(rng.randrange(0, 3000))
        ours, theirs = _mask.FastXorMasker(key), XorMaskerSimple(key)
        pos = 0
        while pos < len(data):
            step = rng.randrange(1, 200)
            chunk = bytearray(data[pos : pos + step])
            assert bytes(ours.process(chunk)) == bytes(theirs.process(chunk))
            pos += step


@pytest.mark.parametrize("size", [0, 1, 125, 126, 4096, 4097, 65535, 65536, 70000])
@pytest.mark.parametrize("text", [True, False])
def test_our_frames_match_wsproto_byte_for_byte(size: int, text: bool) -> None:
    """Frames without an extension are built here; they must be wsproto's to the byte."""
    message: str | bytes = "t" * size if text else os.urandom(size)
    ours = Protocol(client=False).frame_message(message)
    joined = b"".join(ours) if isinstance(ours, list) else ours
    assert joined == bytes(FrameProtocol(False, []).send_data(message, True))
    assert isinstance(ours, list) == (size > 4096)  # large frames skip the join
    # Client frames are masked with a random key: compare what a server reads.
    server = Protocol(client=False, max_message_size=None)
    client_frame = Protocol(client=True).frame_message(message)
    server.receive_data(b"".join(client_frame) if isinstance(client_frame, list) else client_frame)
    assert list(server.messages) == [message]


def test_importing_wsnursery_leaves_wsproto_alone() -> None:
    """No global side effect: wsproto's masker stays wsproto's for its other users."""
    code = (
        "import wsproto.frame_protocol as f; before = f.XorMaskerSimple; import wsnursery; "
        "import wsnursery.testing; assert f.XorMaskerSimple is before, f.XorMaskerSimple; "
        "assert f.XorMaskerSimple.__module__ == 'wsproto.frame_protocol'"
    )
    env = {k: v for k, v in os.environ.items() if k != "WSNURSERY_NO_SPEEDUPS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    import wsproto.frame_protocol as wfp

    assert wfp.XorMaskerSimple is XorMaskerSimple
    assert XorMaskerSimple.__module__ == "wsproto.frame_protocol"


def test_our_protocol_masks_and_unmasks_with_the_c_xor(
    masker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our protocol objects mask and unmask with the C XOR when it is in use; wsproto's don't."""
    calls = []
    real = _mask.apply_mask
    assert real is not None, "websockets.speedups is a test dependency"

    def counting(data: bytes, key: bytes) -> bytes:
        calls.append(len(data))
        return real(data, key)

    monkeypatch.setattr(_mask, "apply_mask", counting)
    for client, server in [(Protocol(client=True), Protocol(client=False)), deflate_pair()]:
        calls.clear()
        frame = client.send_message(b"x" * 1000)  # masked (deflate: wsproto's serialiser)
        assert bool(calls) == (masker == "c")
        calls.clear()
        server.receive_data(frame)  # unmasked in the frame decoder
        assert list(server.messages) == [b"x" * 1000]
        assert bool(calls) == (masker == "c")
    frame = Protocol(client=True).send_message(b"z" * 100)
    calls.clear()
    theirs = FrameProtocol(False, [])
    theirs.receive_bytes(frame)
    [received] = theirs.received_frames()
    assert received.payload == b"z" * 100
    assert calls == []  # a plain wsproto object keeps wsproto's own masker


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 70000])
def test_client_deflate_frames_match_wsproto_byte_for_byte(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the C XOR, the client's frames are serialised here: they must be wsproto's."""
    from wsnursery._sansio.deflate import FrameLayer

    monkeypatch.setattr(os, "urandom", lambda n: b"\x01\x02\x03\x04"[:n])
    message = os.urandom(1) * size + bytes(range(256)) * (size // 256)

    def layer(cls: type[FrameProtocol]) -> FrameProtocol:
        ext = BoundedPerMessageDeflate()
        ext.finalize("permessage-deflate")
        return cls(True, [ext])

    ours, theirs = layer(FrameLayer), layer(FrameProtocol)
    for fin in (False, True):
        assert ours.send_data(message, fin) == theirs.send_data(message, fin)
    assert ours.ping(b"p") == theirs.ping(b"p")
    assert ours.close(1000, "bye") == theirs.close(1000, "bye")
    plain_ours, plain_theirs = FrameLayer(True, []), FrameProtocol(True, [])
    assert plain_ours.send_data(message, True) == plain_theirs.send_data(message, True)


def test_message_queue_is_fifo_through_growth_and_compaction() -> None:
    from wsnursery._sansio.protocol import MessageQueue

    queue = MessageQueue()
    expected: list[str] = []
    taken: list[str] = []
    n = 0
    for round_ in range(50):
        for _ in range(round_ * 3 % 200):
            queue.append(str(n))
            expected.append(str(n))
            n += 1
        for _ in range(min(len(queue), round_ * 2)):
            taken.append(queue.popleft())  # type: ignore[arg-type]
        assert len(queue) == len(expected) - len(taken)
        assert list(queue) == expected[len(taken) :]
    while queue:
        taken.append(queue.popleft())  # type: ignore[arg-type]
    assert taken == expected
    with pytest.raises(IndexError):
        queue.popleft()
