"""HTTP headers as a case-insensitive, order-keeping mapping."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

__all__ = ["HeaderPairs", "Headers"]

HeaderPairs = Iterable[tuple[str | bytes, str | bytes]]


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class Headers(Mapping[str, str]):
    """HTTP headers: ordered ``(name, value)`` pairs looked up without regard to case.

    ``headers["Origin"]`` gives the first value; :meth:`get_all` every value of a
    repeated header. Names and values are ``str`` (decoded as Latin-1).
    """

    __slots__ = ("_items",)

    def __init__(self, items: HeaderPairs = ()) -> None:
        self._items: list[tuple[str, str]] = [(_text(k), _text(v)) for k, v in items]

    def __getitem__(self, name: str) -> str:
        wanted = name.lower()
        for key, value in self._items:
            if key.lower() == wanted:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for key, _ in self._items:
            if key.lower() not in seen:
                seen.add(key.lower())
                yield key

    def __len__(self) -> int:
        return len({key.lower() for key, _ in self._items})

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order (empty list when absent)."""
        wanted = name.lower()
        return [value for key, value in self._items if key.lower() == wanted]

    def items_list(self) -> list[tuple[str, str]]:
        """All pairs, repeated names included, in the order received."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"
