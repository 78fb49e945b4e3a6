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
* the global name ``XorMaskerSimple`` in ``FrameDecoder.parse_header`` and
  ``FrameProtocol._serialize_frame``: copies of the two functions see our C
  masker under that name (:func:`with_fast_masker`), so that our objects
  unmask, and mask on the client side, with the C XOR while wsproto's module
  stays untouched.

Nothing outside this file touches a private wsproto name.
"""

from __future__ import annotations

import struct
import types
import zlib
from collections.abc import Callable
from typing import TypeVar

from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason as _WsprotoClose
from wsproto.frame_protocol import Frame as _WsprotoFrame
from wsproto.frame_protocol import FrameDecoder, FrameProtocol, Opcode, ParseFailed

from . import mask as _mask

__all__ = ["BoundedPerMessageDeflate", "FrameLayer", "compressed_size_bound", "with_fast_masker"]

_T = TypeVar("_T")


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


def with_fast_masker(function: Callable[..., _T]) -> Callable[..., _T]:
    """A copy of a wsproto function that masks with :class:`.mask.FastXorMasker`.

    The copy runs the same code object, with module globals in which the name
    ``XorMaskerSimple`` means our class: wsproto looks the masker up as a
    global each time it parses a header or serialises a frame. wsproto's own
    module and functions are untouched, and the copy costs nothing per frame.
    """
    code = function.__code__
    if "XorMaskerSimple" not in code.co_names:
        raise RuntimeError(f"wsproto's {function.__qualname__} no longer names XorMaskerSimple")
    namespace = dict(function.__globals__)
    namespace["XorMaskerSimple"] = _mask.FastXorMasker
    copy = types.FunctionType(
        code,
        namespace,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    return copy


class _FastFrameDecoder(FrameDecoder):
    """wsproto's frame decoder, unmasking with the C XOR."""

    parse_header = with_fast_masker(FrameDecoder.parse_header)


_fast_serialize_frame = with_fast_masker(FrameProtocol._serialize_frame)


class FrameLayer(FrameProtocol):
    """wsproto's frame layer, with the close codes RFC 6455 and IANA allow.

    wsproto refuses registered codes it does not know (1014, Bad Gateway).
    When :mod:`.mask` has the C XOR, frames are unmasked (and, on the client
    side, masked) with it; wsproto's own classes are left unchanged.
    """

    def __init__(self, client: bool, extensions: list[Extension]) -> None:
        super().__init__(client, extensions)
        if _mask.fast:
            # FrameProtocol.__init__ made a plain decoder with no state yet.
            self._frame_decoder = _FastFrameDecoder(self.client, self.extensions)
            if client:  # the server's frames are not masked
                self._serialize_frame = types.MethodType(  # type: ignore[method-assign]
                    _fast_serialize_frame, self
                )

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
