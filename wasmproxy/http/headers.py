"""HeaderMap: Envoy's ordered, case-insensitive header map, pseudo-headers first.

Keys are stored lower-case. Keys and values are `str` holding raw header bytes
decoded as latin-1, so any byte sequence round-trips unchanged between the wire,
Python code and the Wasm ABI (encode with latin-1 to get the bytes back).

Like Envoy's HeaderMapImpl, pseudo-headers (":method", ":path", ...) always sit
before regular headers; adding a pseudo-header inserts it after the last one.
"""

from __future__ import annotations

from typing import Iterable, Iterator


class HeaderMap:
    """An ordered multimap of (lower-case key, value) pairs. Not thread-safe: one stream owns it."""

    __slots__ = ("_entries",)

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._entries: list[list[str]] = []
        for key, value in pairs:
            self.add(key, value)

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        """The first value for `key`, or None."""
        key = key.lower()
        for entry in self._entries:
            if entry[0] == key:
                return entry[1]
        return None

    def get_all(self, key: str) -> list[str]:
        key = key.lower()
        return [e[1] for e in self._entries if e[0] == key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def items(self) -> list[tuple[str, str]]:
        """A snapshot of all pairs in order (pseudo-headers first)."""
        return [(e[0], e[1]) for e in self._entries]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items())

    def __len__(self) -> int:
        return len(self._entries)

    def byte_size(self) -> int:
        """Sum of key and value lengths, as Envoy's HeaderMap::byteSize()."""
        return sum(len(e[0]) + len(e[1]) for e in self._entries)

    # -- writing ---------------------------------------------------------------------------

    def add(self, key: str, value: str) -> None:
        """Append a pair (pseudo-headers go after the last pseudo-header)."""
        key = key.lower()
        if key.startswith(":"):
            i = 0
            while i < len(self._entries) and self._entries[i][0].startswith(":"):
                i += 1
            self._entries.insert(i, [key, value])
        else:
            self._entries.append([key, value])

    def set(self, key: str, value: str) -> None:
        """Replace every value of `key` with one: the first entry keeps its position."""
        key = key.lower()
        found = False
        kept: list[list[str]] = []
        for entry in self._entries:
            if entry[0] == key:
                if found:
                    continue
                entry[1] = value
                found = True
            kept.append(entry)
        self._entries = kept
        if not found:
            self.add(key, value)

    def set_default(self, key: str, value: str) -> None:
        """Set `key` only when absent."""
        if self.get(key) is None:
            self.add(key, value)

    def remove(self, key: str) -> int:
        """Remove all values of `key`; returns how many were removed."""
        key = key.lower()
        before = len(self._entries)
        self._entries = [e for e in self._entries if e[0] != key]
        return before - len(self._entries)

    def remove_prefix(self, prefix: str) -> None:
        prefix = prefix.lower()
        self._entries = [e for e in self._entries if not e[0].startswith(prefix)]

    def clear(self) -> None:
        self._entries = []

    def replace_all(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Replace the whole map (proxy_set_header_map_pairs)."""
        self._entries = []
        for key, value in pairs:
            self.add(key, value)

    def copy(self) -> "HeaderMap":
        new = HeaderMap()
        new._entries = [[e[0], e[1]] for e in self._entries]
        return new

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderMap) and self.items() == other.items()

    def __repr__(self) -> str:
        return f"HeaderMap({self.items()!r})"
