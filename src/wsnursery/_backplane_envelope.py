"""The envelope on the wire: the compact binary form a send takes between backplanes.

Pure: bytes in, :class:`Envelope` out, and back; no I/O, no clock. The Redis
backplane (``_redis.py``) encodes each send once with :func:`encode_envelope`,
publishes the bytes, and each receiving node skips its own (:func:`origin_of`,
cheap) before it decodes the others' with :func:`decode_envelope`. Never pickle:
a message from Redis is data, not code.

The layout (version 1)::

    0      version (1)
    1      flags: bits 0-1 kind (0 all, 1 group, 2 one), bit 2 binary payload
    2      origin length (u8), then the origin node ID (ASCII)
    .      target length (u32), then the target (UTF-8; empty for "all")
    .      exclude count (u32), then each ID as u16 length + UTF-8
    .      the payload: the rest (UTF-8 text, or the bytes as they are)
"""

from __future__ import annotations

import struct
from typing import Literal

from ._broadcast import Envelope

__all__ = ["decode_envelope", "encode_envelope", "origin_of"]

_VERSION = 1
_KINDS: tuple[Literal["all", "group", "one"], ...] = ("all", "group", "one")
_KIND_CODES = {"all": 0, "group": 1, "one": 2}
_BINARY = 4
_HEAD = struct.Struct("!BBB")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")


def encode_envelope(envelope: Envelope) -> bytes:
    """The compact binary form of ``envelope`` that travels through Redis.

    Raises:
        ValueError: an origin longer than 255 bytes, or an excluded ID longer
            than 65535 bytes.
    """
    message = envelope.message
    if isinstance(message, str):
        flags = _KIND_CODES[envelope.kind]
        payload = message.encode("utf-8")
    else:
        flags = _KIND_CODES[envelope.kind] | _BINARY
        payload = message
    origin = envelope.origin.encode("ascii")
    if len(origin) > 255:
        raise ValueError("an origin node ID is at most 255 bytes")
    target = (envelope.target or "").encode("utf-8")
    parts = [_HEAD.pack(_VERSION, flags, len(origin)), origin, _U32.pack(len(target)), target]
    parts.append(_U32.pack(len(envelope.exclude)))
    for conn_id in envelope.exclude:
        raw = conn_id.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise ValueError("an excluded connection ID is at most 65535 bytes")
        parts.append(_U16.pack(len(raw)))
        parts.append(raw)
    parts.append(payload)
    return b"".join(parts)


def origin_of(data: bytes) -> bytes:
    """The origin node ID of an encoded envelope (checked cheaply, before decoding)."""
    if len(data) < 3:
        raise ValueError("truncated envelope")
    end = 3 + data[2]
    if len(data) < end:
        raise ValueError("truncated envelope")
    return data[3:end]


def decode_envelope(data: bytes) -> Envelope:
    """Read an envelope made by :func:`encode_envelope`.

    Raises:
        ValueError: ``data`` is not a well-formed envelope of a known version.
    """
    try:
        version, flags, origin_len = _HEAD.unpack_from(data, 0)
        if version != _VERSION:
            raise ValueError(f"unknown envelope version {version}")
        kind_code = flags & 3
        if kind_code > 2 or flags & ~7:
            raise ValueError(f"bad envelope flags {flags:#x}")
        pos = 3
        origin = data[pos : pos + origin_len].decode("ascii")
        pos += origin_len
        (target_len,) = _U32.unpack_from(data, pos)
        pos += 4
        target_raw = data[pos : pos + target_len]
        if len(target_raw) != target_len:
            raise ValueError("truncated envelope")
        pos += target_len
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        if count > len(data) - pos:  # each ID takes at least 2 bytes: a cheap bound
            raise ValueError("truncated envelope")
        exclude = []
        for _ in range(count):
            (n,) = _U16.unpack_from(data, pos)
            pos += 2
            raw = data[pos : pos + n]
            if len(raw) != n:
                raise ValueError("truncated envelope")
            exclude.append(raw.decode("utf-8"))
            pos += n
        body = data[pos:]
        message: str | bytes = body if flags & _BINARY else body.decode("utf-8")
        kind = _KINDS[kind_code]
        target = target_raw.decode("utf-8") if kind != "all" else None
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed envelope: {exc}") from None
    return Envelope(kind, message, target, frozenset(exclude), origin)
