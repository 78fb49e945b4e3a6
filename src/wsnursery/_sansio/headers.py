"""HTTP headers as a case-insensitive, order-keeping mapping."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "HeaderPairs",
    "Headers",
    "TargetParts",
    "check_client_request",
    "parse_cookies",
    "parse_query",
    "raw_pairs",
    "split_target",
]

HeaderPairs = Iterable[tuple[str | bytes, str | bytes]]


def _raw(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


def split_target(target: str) -> tuple[str, str]:
    """A request target's path and raw query string, without any fragment.

    ``"/chat?room=1"`` gives ``("/chat", "room=1")``; ``"/chat"`` gives
    ``("/chat", "")``. An absolute-form target (``http://host/chat?room=1``)
    gives its path and query too.
    """
    if target.startswith("/"):  # origin-form, nearly always
        path, _, query = target.partition("?")
        path = path.partition("#")[0]
        query = query.partition("#")[0]
    else:
        split = urlsplit(target)
        path, query = split.path, split.query
    return path or "/", query


class TargetParts:
    """``url_path`` and ``query_string``, the parts of a ``path`` that is a full request target.

    For the classes whose ``path`` keeps the query, as trio-websocket's does.
    """

    __slots__ = ()
    path: str

    @property
    def url_path(self) -> str:
        """The path part of :attr:`path`, without the query (``/chat``)."""
        return split_target(self.path)[0]

    @property
    def query_string(self) -> str:
        """The raw query of :attr:`path`, after the ``?`` (``room=1``; ``""`` if none)."""
        return split_target(self.path)[1]


def parse_query(query_string: str) -> dict[str, str]:
    """A query string as a mapping of each name to its first value (blank values kept)."""
    query: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        query.setdefault(name, value)
    return query


def raw_pairs(pairs: HeaderPairs) -> list[tuple[bytes, bytes]]:
    """``(name, value)`` pairs as bytes, ``str`` encoded as Latin-1."""
    return [(_raw(name), _raw(value)) for name, value in pairs]


# RFC 9110 section 5.6.2: a header name (and a subprotocol, RFC 6455 section
# 4.1) is a token; a field value has no control character but horizontal tab.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The request headers a client writes itself: a second copy would make a
# request the server refuses or misreads.
_CLIENT_SETS = frozenset(
    {
        b"host",
        b"upgrade",
        b"connection",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    }
)


def check_client_request(extra_headers: HeaderPairs, subprotocols: Sequence[str]) -> None:
    """ValueError for request headers or subprotocols that no server could take.

    A header name must be an HTTP token and a value must be Latin-1 with no
    control character (CR and LF would split the request); the headers the
    client sets itself (``Host``, ``Sec-WebSocket-*``...) cannot be given
    again; a subprotocol must be a token.
    """
    for name, value in extra_headers:
        try:
            raw_name = _raw(name)
        except UnicodeEncodeError:
            raw_name = b""  # not a token either
        if not _TOKEN.fullmatch(raw_name):
            raise ValueError(f"{name!r} is not a valid header name")
        try:
            raw_value = _raw(value)
        except UnicodeEncodeError:
            raise ValueError(f"the value of {name!r} is not Latin-1") from None
        if _CONTROL.search(raw_value):
            raise ValueError(f"the value of {name!r} has a control character")
        if raw_name.lower() in _CLIENT_SETS:
            raise ValueError(
                f"the client sets {raw_name.decode()} itself "
                "(from the URL, subprotocols= and compression=)"
            )
    for subprotocol in subprotocols:
        if not _TOKEN.fullmatch(subprotocol.encode("latin-1", "replace")) or not subprotocol:
            raise ValueError(f"{subprotocol!r} is not a valid subprotocol name")


class Headers(Mapping[str, str]):
    """HTTP headers: ordered ``(name, value)`` pairs looked up without regard to case.

    ``headers["Origin"]`` gives the first value; :meth:`get_all` every value of a
    repeated header. Names and values are ``str`` (decoded as Latin-1).

    The pairs are kept as the bytes that came off the wire and decoded when
    looked up: the request headers live as long as their connection, and
    bytes shared with the parser cost less than a second, decoded copy.
    """

    __slots__ = ("_items",)

    def __init__(self, items: HeaderPairs = ()) -> None:
        self._items = raw_pairs(items)

    def __getitem__(self, name: str) -> str:
        wanted = name.lower().encode("latin-1")
        for key, value in self._items:
            if key.lower() == wanted:
                return value.decode("latin-1")
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        seen: set[bytes] = set()
        for key, _ in self._items:
            lowered = key.lower()
            if lowered not in seen:
                seen.add(lowered)
                yield key.decode("latin-1")

    def __len__(self) -> int:
        return len({key.lower() for key, _ in self._items})

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        wanted = name.lower().encode("latin-1")
        return any(key.lower() == wanted for key, _ in self._items)

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order (empty list when absent)."""
        wanted = name.lower().encode("latin-1")
        return [value.decode("latin-1") for key, value in self._items if key.lower() == wanted]

    def items_list(self) -> list[tuple[str, str]]:
        """All pairs, repeated names included, in the order received."""
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._items]

    def raw_items(self) -> list[tuple[bytes, bytes]]:
        """All pairs as the bytes received."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self.items_list()!r})"


def parse_cookies(values: Sequence[str]) -> dict[str, str]:
    """The cookies of every ``Cookie`` header; malformed ones are skipped."""
    cookies: dict[str, str] = {}
    for value in values:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(value)
        except CookieError:
            continue
        cookies.update({name: morsel.value for name, morsel in jar.items()})
    return cookies
