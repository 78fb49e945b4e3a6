"""Every use of wsproto's private names, in one file: the frame layer and permessage-deflate.

wsproto's public sans-I/O API (``wsproto.WSConnection``) yields one event per
frame and leaves no room for a size limit inside a compressed message, so the
protocol layer (:mod:`.protocol`) builds on wsproto's lower frame layer and
extends it here. The private wsproto names this module relies on (checked by
``tests/test_layers.py``, and the reason pyproject.toml pins wsproto's range):

* ``FrameProtocol._process_close`` (overridden: the close codes we accept);
* ``FrameProtocol._frame_decoder`` and its ``header`` and ``payload_consumed``
  (the frame being received, to refuse a too-big message from its header);
* ``PerMessageDeflate._inbound_compressed``, ``_inbound_is_compressible`` and
  ``_decompressor`` (inflating with a bound);
* ``FrameDecoder.parse_header`` (extended) and ``XorMaskerSimple._masking_key``:
  the decoder's masker is replaced by :class:`.mask.FastXorMasker` (the C XOR)
  right after a header is parsed;
* ``FrameProtocol._serialize_frame`` (overridden on the client side with the C
  XOR: the frames wsproto serialises are masked with the fast masker too).

Nothing outside this file touches a private wsproto name.
"""

from __future__ import annotations

import os
import struct
import zlib

from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason as _WsprotoClose
from wsproto.frame_protocol import Frame as _WsprotoFrame
from wsproto.frame_protocol import (
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
    XorMaskerSimple,
)

from . import mask as _mask

__all__ = ["BoundedPerMessageDeflate", "FrameLayer", "compressed_size_bound"]


def compressed_size_bound(max_message_size: int) -> int:
    """The largest compressed payload accepted for a message of ``max_message_size``.

    Deflate can make incompressible data larger: zlib's own worst case, for
    any level, window and memory setting (``deflateBound`` with non-default
    parameters), is n + n/8 + n/64 + 11 bytes, about 14 %. A quarter more plus
    1 KiB (for the sync-flush markers of a message sent in many frames)
    covers every real encoder; only deliberately padded deflate data (empty
    stored blocks) could be larger and still inflate within the limit, and is
    refused with 1009.
    """
    return max_message_size + (max_message_size >> 2) + 1024


class BoundedPerMessageDeflate(PerMessageDeflate):
    """permessage-deflate (RFC 7692) that refuses to inflate past a size limit.

    wsproto inflates each chunk without a bound, so a few kilobytes of crafted
    deflate data could expand into gigabytes. This subclass inflates with
    ``max_length`` and reports 1009 as soon as a message grows past
    ``max_message_size``.
    """

    def __init__(
        self, *args: object, max_message_size: int | None = None, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.max_message_size = max_message_size
        self._inflated = 0
        #: Compressed payload bytes received of the current message.
        self.compressed_received = 0

    @property
    def inbound_compressed(self) -> bool:
        """True while the message being received is compressed (RSV1 was set)."""
        return bool(self._inbound_compressed)

    def frame_inbound_payload_data(self, proto: object, data: bytes) -> bytes | _WsprotoClose:
        if (
            self.max_message_size is None
            or not self._inbound_compressed
            or not self._inbound_is_compressible
        ):
            return super().frame_inbound_payload_data(proto, data)  # type: ignore[arg-type]
        self.compressed_received += len(data)
        decompressor = self._decompressor
        assert decompressor is not None
        # max_length=0 would mean "no limit": the budget is always at least 1.
        budget = self.max_message_size - self._inflated + 1
        try:
            out = decompressor.decompress(data, budget)
        except zlib.error:
            return _WsprotoClose.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if decompressor.unconsumed_tail or self._inflated > self.max_message_size:
            return _WsprotoClose.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(self, proto: object, fin: bool) -> bytes | _WsprotoClose | None:
        result = super().frame_inbound_complete(proto, fin)  # type: ignore[arg-type]
        if fin:
            self._inflated = self.compressed_received = 0
        return result


# RFC 6455 section 7.4 and the IANA registry: the codes a close frame may carry.
# 1004 is reserved, 1005, 1006 and 1015 never go on the wire, 1016-2999 are
# unassigned (or for extensions), 3000-4999 are for libraries and applications.
def _valid_received_code(code: int) -> bool:
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class _FastFrameDecoder(FrameDecoder):
    """wsproto's frame decoder, unmasking with the C XOR."""

    def parse_header(self) -> bool:
        if not super().parse_header():
            return False
        masker = self.masker
        if type(masker) is XorMaskerSimple:
            self.masker = _mask.FastXorMasker(masker._masking_key)  # type: ignore[assignment]
        return True


_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


class FrameLayer(FrameProtocol):
    """wsproto's frame layer, with the close codes RFC 6455 and IANA allow.

    wsproto refuses registered codes it does not know (1014, Bad Gateway).
    When :mod:`.mask` has the C XOR, frames are unmasked (and, on the client
    side, masked) with it; wsproto's own classes are left unchanged.
    """

    def __init__(self, client: bool, extensions: list[Extension]) -> None:
        super().__init__(client, extensions)
        self._fast_mask = _mask.fast
        if self._fast_mask:
            # FrameProtocol.__init__ made a plain decoder with no state yet.
            self._frame_decoder = _FastFrameDecoder(self.client, self.extensions)

    def pending_frame(self) -> tuple[Opcode, int] | None:
        """The frame being received, if its header is parsed and its payload is not done.

        Returns its opcode and the payload bytes still to come (what the
        header declares, less what was already received).
        """
        decoder = self._frame_decoder
        head = decoder.header
        if head is None:
            return None
        return head.opcode, head.payload_len - decoder.payload_consumed

    def _process_close(self, frame: _WsprotoFrame) -> _WsprotoFrame:
        data = frame.payload
        assert isinstance(data, (bytes, bytearray))
        if len(data) < 2:
            return super()._process_close(frame)
        (code,) = struct.unpack("!H", data[:2])
        if not _valid_received_code(code):
            raise ParseFailed(f"CLOSE with invalid code {code}")
        try:
            reason = bytes(data[2:]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseFailed(
                f"Error decoding CLOSE reason: {exc}", _WsprotoClose.INVALID_FRAME_PAYLOAD_DATA
            ) from None
        return _WsprotoFrame(
            frame.opcode, (code, reason), frame.frame_finished, frame.message_finished
        )

    def _serialize_frame(
        self, opcode: Opcode, payload: bytes | bytearray = b"", fin: bool = True
    ) -> bytearray:
        if not (self.client and self._fast_mask):
            return super()._serialize_frame(opcode, payload, fin)
        # wsproto's serialiser, with the masking done by the C XOR.
        rsv = RsvBits(False, False, False)
        for extension in reversed(self.extensions):
            rsv, payload = extension.frame_outbound(self, opcode, rsv, bytes(payload), fin)
        first = (fin << 7) | (rsv.rsv1 << 6) | (rsv.rsv2 << 5) | (rsv.rsv3 << 4) | opcode
        n = len(payload)
        if n < 126:
            header = bytes((first, 0x80 | n))
        elif opcode.iscontrol():
            raise ValueError("payload too long for control frame")
        elif n < 65536:
            header = _pack_short(first, 0x80 | 126, n)
        else:
            header = _pack_long(first, 0x80 | 127, n)
        # RFC 6455 section 5.3: a fresh, unpredictable key for every frame.
        key = os.urandom(4)
        apply_mask = _mask.apply_mask
        assert apply_mask is not None  # self._fast_mask says so
        return bytearray(header + key + apply_mask(bytes(payload), key))
