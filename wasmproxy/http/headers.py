"""HeaderMap: Envoy's ordered, case-insensitive header map, pseudo-headers first.

Keys are stored lower-case. Keys and values are `str` holding raw header bytes
decoded as latin-1, so any byte sequence round-trips unchanged between the wire,
Python code and the Wasm ABI (encode with latin-1 to get the bytes back).

Like Envoy's HeaderMapImpl, pseudo-headers (":method", ":path", ...) always sit
before regular headers; adding a pseudo-header inserts it after the last one.

Lookups are the hot path (dozens per request): besides the ordered list of pairs the map
keeps an index of each key's first value, so `get` and `in` cost one dict lookup.
"""

from __future__ import annotations

from typing import Iterable, Iterator, KeysView

# Keys longer than this are lowered every time instead of being remembered (see _LowerKeys).
_LOWER_KEYS_MAX_LEN = 64
_LOWER_KEYS_MAX_COUNT = 4096


class _LowerKeys(dict[str, str]):
    """key -> key.lower(), remembered: callers pass the same few (mostly literal) keys, so
    `_lower_key[key]` is one dict lookup. Bounded, since Wasm plugins and peers choose keys too."""

    __slots__ = ()

    def __missing__(self, key: str) -> str:
        lowered = key.lower()
        if len(key) <= _LOWER_KEYS_MAX_LEN and len(self) < _LOWER_KEYS_MAX_COUNT:
            self[key] = lowered
        return lowered


_lower_key = _LowerKeys()


class HeaderMap:
    """An ordered multimap of (lower-case key, value) pairs. Not thread-safe: one stream owns it."""

    # _entries: every (key, value) pair in order. first_values: each lower-case key's first
    # value, public for reading only: hot paths that already hold a lower-case key read it
    # directly (`headers.first_values.get(":path")`) instead of calling get().
    __slots__ = ("_entries", "first_values")

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        entries: list[tuple[str, str]] = []
        index: dict[str, str] = {}
        self._entries = entries
        self.first_values = index
        lower_key = _lower_key
        for key, value in pairs:
            key = lower_key[key]
            if key[:1] == ":" and entries and entries[-1][0][:1] != ":":
                self._insert_pseudo(key, value)
                continue
            entries.append((key, value))
            if key not in index:
                index[key] = value

    @classmethod
    def from_lower_pairs(cls, pairs: list[tuple[str, str]]) -> "HeaderMap":
        """A map over `pairs` as they are: keys already lower-case, pseudo-headers first (as a
        codec produces them). The map takes `pairs` over instead of copying it."""
        new = cls.__new__(cls)
        new._entries = pairs
        new.first_values = dict(reversed(pairs))  # the first value of a key is written last
        return new

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        """The first value for `key`, or None."""
        key = _lower_key[key]
        index = self.first_values
        return index[key] if key in index else None

    def get_all(self, key: str) -> list[str]:
        key = _lower_key[key]
        if key not in self.first_values:
            return []
        return [e[1] for e in self._entries if e[0] == key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and _lower_key[key] in self.first_values

    def items(self) -> list[tuple[str, str]]:
        """A snapshot of all pairs in order (pseudo-headers first)."""
        return self._entries[:]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._entries[:])

    def names(self) -> KeysView[str]:
        """The distinct keys, lower-case, as a live read-only view: `headers.names() & keys`
        tells which of `keys` are present in one set operation (the router's control headers).
        Not `keys()`: that would make dict(headers) treat the map as a Mapping."""
        return self.first_values.keys()

    def __len__(self) -> int:
        return len(self._entries)

    def byte_size(self) -> int:
        """Sum of key and value lengths, as Envoy's HeaderMap::byteSize()."""
        return sum(len(e[0]) + len(e[1]) for e in self._entries)

    # -- writing ---------------------------------------------------------------------------

    def add(self, key: str, value: str) -> None:
        """Append a pair (pseudo-headers go after the last pseudo-header)."""
        key = _lower_key[key]
        if key[:1] == ":":
            self._insert_pseudo(key, value)
            return
        self._entries.append((key, value))
        index = self.first_values
        if key not in index:
            index[key] = value

    def _insert_pseudo(self, key: str, value: str) -> None:
        entries = self._entries
        i = 0
        while i < len(entries) and entries[i][0][:1] == ":":
            i += 1
        entries.insert(i, (key, value))
        # Inserted after every pseudo-header, so after any other entry of this key.
        index = self.first_values
        if key not in index:
            index[key] = value

    def set(self, key: str, value: str) -> None:
        """Replace every value of `key` with one: the first entry keeps its position."""
        key = _lower_key[key]
        index = self.first_values
        if key not in index:  # added, as add() does
            if key[:1] == ":":
                self._insert_pseudo(key, value)
            else:
                self._entries.append((key, value))
                index[key] = value
            return
        entries = self._entries
        # The key's first entry is the first (key, first value) pair: list.index finds it
        # without a Python loop (the value is the index's own object, so it compares at once).
        i = entries.index((key, index[key]))
        entries[i] = (key, value)
        index[key] = value
        if len(index) != len(entries):  # some key repeats: drop later values of this one
            entries[i + 1 :] = [e for e in entries[i + 1 :] if e[0] != key]

    def set_default(self, key: str, value: str) -> None:
        """Set `key` only when absent."""
        if _lower_key[key] not in self.first_values:
            self.add(key, value)

    def remove(self, key: str) -> int:
        """Remove all values of `key`; returns how many were removed."""
        key = _lower_key[key]
        index = self.first_values
        if key not in index:
            return 0
        entries = self._entries
        if len(index) == len(entries):  # no key repeats: one entry to delete, in place
            # (its first entry, found as set() finds it)
            del entries[entries.index((key, index.pop(key)))]
            return 1
        del index[key]
        before = len(entries)
        self._entries = [e for e in entries if e[0] != key]
        return before - len(self._entries)

    def remove_prefix(self, prefix: str) -> None:
        prefix = prefix.lower()
        self._entries = [e for e in self._entries if not e[0].startswith(prefix)]
        self.first_values = dict(reversed(self._entries))

    def clear(self) -> None:
        self._entries = []
        self.first_values = {}

    def replace_all(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Replace the whole map (proxy_set_header_map_pairs)."""
        self.clear()
        for key, value in pairs:
            self.add(key, value)

    def copy(self) -> "HeaderMap":
        new = HeaderMap.__new__(HeaderMap)
        new._entries = self._entries.copy()
        new.first_values = self.first_values.copy()
        return new

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderMap) and self._entries == other._entries

    def __repr__(self) -> str:
        return f"HeaderMap({self.items()!r})"
