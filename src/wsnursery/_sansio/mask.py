"""Fast unmasking for wsproto, when a C XOR is available.

wsproto unmasks with ``XorMaskerSimple`` (``bytes.translate`` on four strided
slices, about 1 GB/s), which is about half the server's CPU on large messages.
wsproto looks the class up as a module global of ``wsproto.frame_protocol``
each time it parses a frame header, so a class with the same contract can take
its place. Ours XORs with ``websockets.speedups.apply_mask`` (C, a word at a
time, tens of GB/s) when the optional ``websockets`` package is installed
(``pip install wsnursery[speedups]``), and leaves wsproto's own class in place
otherwise. Set ``WSNURSERY_NO_SPEEDUPS=1`` to keep the pure-Python masker.

The contract: ``process(data)`` returns the XOR of ``data`` with the 4-byte
key repeated, and rotates the key by ``len(data) % 4`` so that the next call
continues where this one stopped (a frame's payload arrives in pieces).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import wsproto.frame_protocol as _frame_protocol

__all__ = ["FastXorMasker", "active_masker", "install", "mask", "uninstall"]

_ORIGINAL = _frame_protocol.XorMaskerSimple
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


def mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated, with the active masker."""
    if not data:
        return b""
    if apply_mask is not None and active_masker() == "c":
        return apply_mask(data, key)
    return bytes(_frame_protocol.XorMaskerSimple(key).process(bytearray(data)))


def install() -> bool:
    """Use :class:`FastXorMasker` in wsproto if a C XOR is available; True if so."""
    if apply_mask is None or os.environ.get("WSNURSERY_NO_SPEEDUPS"):
        return False
    _frame_protocol.XorMaskerSimple = FastXorMasker  # type: ignore[misc,assignment]
    return True


def uninstall() -> None:
    """Put wsproto's own masker back."""
    _frame_protocol.XorMaskerSimple = _ORIGINAL  # type: ignore[misc]


def active_masker() -> str:
    """``"c"`` when the fast masker is in use, ``"python"`` otherwise."""
    current: object = _frame_protocol.XorMaskerSimple
    return "c" if current is FastXorMasker else "python"
