"""Fast unmasking for our own protocol objects, when a C XOR is available.

wsproto unmasks with ``XorMaskerSimple`` (``bytes.translate`` on four strided
slices, about 1 GB/s), which is about half the server's CPU on large messages.
Our frame layer (:class:`.deflate.FrameLayer`) swaps in :class:`FastXorMasker`
for the frames it parses and masks: it XORs with
``websockets.speedups.apply_mask`` (C, a word at a time, tens of GB/s) when the
optional ``websockets`` package is installed (``pip install
wsnursery[speedups]``). wsproto itself is left alone: importing wsnursery
changes nothing for any other wsproto user in the process. Set
``WSNURSERY_NO_SPEEDUPS=1`` to keep the pure-Python masker.

The contract (wsproto's): ``process(data)`` returns the XOR of ``data`` with the
4-byte key repeated, and rotates the key by ``len(data) % 4`` so that the next
call continues where this one stopped (a frame's payload arrives in pieces).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from wsproto.frame_protocol import XorMaskerSimple

__all__ = ["FastXorMasker", "active_masker", "fast", "mask", "use_fast_masker"]

apply_mask: Callable[[bytes, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - depends on the environment
    apply_mask = None


class FastXorMasker:
    """A drop-in for ``wsproto.frame_protocol.XorMaskerSimple`` using a C XOR."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytes:
        n = len(data)
        if not n:
            return b""
        assert apply_mask is not None
        key = self._key
        out = apply_mask(bytes(data) if type(data) is not bytes else data, key)
        shift = n & 3
        if shift:
            self._key = key[shift:] + key[:shift]
        return out


#: True when protocol objects made from now on use :class:`FastXorMasker`.
fast = apply_mask is not None and not os.environ.get("WSNURSERY_NO_SPEEDUPS")


def use_fast_masker(enabled: bool = True) -> bool:
    """Choose the masker for the protocol objects made from now on; True if C.

    Asking for the fast one has no effect when no C XOR is available. This
    only concerns wsnursery's own objects; wsproto is never modified.
    """
    global fast
    fast = enabled and apply_mask is not None
    return fast


def active_masker() -> str:
    """``"c"`` when new protocol objects use the fast masker, ``"python"`` otherwise."""
    return "c" if fast else "python"


def mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated, with the active masker."""
    if not data:
        return b""
    if fast and apply_mask is not None:
        return apply_mask(data, key)
    return bytes(XorMaskerSimple(key).process(bytearray(data)))
