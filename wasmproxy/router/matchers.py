"""String, header and query-parameter matchers, as Envoy's route table evaluates them.

Built once from the envoy.type.matcher.v3 / envoy.config.route.v3 protos; `match` is
called per request. RE2 patterns are compiled with Python `re` and matched in full
(Envoy's safe_regex is always a full match).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from ..http.headers import HeaderMap


class MatcherConfigError(ValueError):
    """A matcher the proto allows but that cannot be built (bad regex, unsupported kind)."""


def compile_regex(regex_matcher: Any) -> re.Pattern[str]:
    """Compile an envoy.type.matcher.v3.RegexMatcher (google_re2 is the only engine)."""
    try:
        return re.compile(regex_matcher.regex)
    except re.error as e:
        raise MatcherConfigError(f"Invalid regex '{regex_matcher.regex}': {e}") from None


class StringMatcher:
    """envoy.type.matcher.v3.StringMatcher: exact / prefix / suffix / contains / safe_regex."""

    __slots__ = ("_kind", "_value", "_ignore_case", "_regex")

    def __init__(self, proto: Any) -> None:
        kind = proto.WhichOneof("match_pattern")
        if kind is None or kind == "custom":
            raise MatcherConfigError(f"unsupported string matcher: {kind}")
        self._kind: str = kind
        self._ignore_case: bool = proto.ignore_case
        self._regex: re.Pattern[str] | None = None
        self._value = ""
        if kind == "safe_regex":
            self._regex = compile_regex(proto.safe_regex)
        else:
            value = getattr(proto, kind)
            self._value = value.lower() if self._ignore_case else value

    @classmethod
    def exact(cls, value: str, ignore_case: bool = False) -> "StringMatcher":
        m = cls.__new__(cls)
        m._kind, m._ignore_case, m._regex = "exact", ignore_case, None
        m._value = value.lower() if ignore_case else value
        return m

    def match(self, value: str) -> bool:
        if self._regex is not None:
            return self._regex.fullmatch(value) is not None
        if self._ignore_case:
            value = value.lower()
        kind = self._kind
        if kind == "exact":
            return value == self._value
        if kind == "prefix":
            return value.startswith(self._value)
        if kind == "suffix":
            return value.endswith(self._value)
        return self._value in value  # contains


class HeaderMatcher:
    """envoy.config.route.v3.HeaderMatcher, with Envoy's rules for absent and repeated headers.

    A header present several times is matched against its values joined with ","
    (HeaderUtility::getAllOfHeaderAsString). An absent header matches only
    `present_match: false` (or, inverted, `present_match: true`), unless
    `treat_missing_header_as_empty` makes it an empty value.
    """

    __slots__ = ("name", "_kind", "_present", "_invert", "_missing_as_empty", "_string", "_regex", "_range")

    def __init__(self, proto: Any) -> None:
        self.name: str = proto.name.lower()
        self._invert: bool = proto.invert_match
        self._missing_as_empty: bool = proto.treat_missing_header_as_empty
        kind = proto.WhichOneof("header_match_specifier")
        self._string: StringMatcher | None = None
        self._regex: re.Pattern[str] | None = None
        self._range: tuple[int, int] | None = None
        self._present = True
        if kind is None:
            kind = "present_match"  # no specifier: the header must be present
        elif kind == "exact_match":
            # An empty exact_match is Envoy's legacy spelling of "present".
            kind = "string_match" if proto.exact_match else "present_match"
            if proto.exact_match:
                self._string = StringMatcher.exact(proto.exact_match)
        elif kind == "present_match":
            self._present = proto.present_match
        elif kind == "safe_regex_match":
            self._regex = compile_regex(proto.safe_regex_match)
        elif kind == "range_match":
            self._range = (proto.range_match.start, proto.range_match.end)
        elif kind == "string_match":
            self._string = StringMatcher(proto.string_match)
        else:  # prefix_match / suffix_match / contains_match
            self._string = StringMatcher.__new__(StringMatcher)
            self._string._kind = kind.removesuffix("_match")
            self._string._value = getattr(proto, kind)
            self._string._ignore_case = False
            self._string._regex = None
        self._kind: str = kind

    def match(self, headers: HeaderMap) -> bool:
        values = headers.get_all(self.name)
        if not values and not self._missing_as_empty:
            if self._invert:
                return self._kind == "present_match" and self._present
            return self._kind == "present_match" and not self._present
        value = ",".join(values)
        kind = self._kind
        if kind == "present_match":
            matched = self._present
        elif self._regex is not None:
            matched = self._regex.fullmatch(value) is not None
        elif self._range is not None:
            try:
                n = int(value)
            except ValueError:
                matched = False
            else:
                matched = self._range[0] <= n < self._range[1]
        else:
            assert self._string is not None
            matched = self._string.match(value)
        return matched != self._invert


def parse_query(path: str) -> dict[str, str]:
    """First value of each query parameter, percent-decoded (Envoy keeps '+' as is)."""
    q = path.find("?")
    if q < 0:
        return {}
    end = path.find("#", q)
    query = path[q + 1 :] if end < 0 else path[q + 1 : end]
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        params.setdefault(unquote(name), unquote(value))
    return params


class QueryParameterMatcher:
    """envoy.config.route.v3.QueryParameterMatcher: string_match, or present when unset."""

    __slots__ = ("name", "_string")

    def __init__(self, proto: Any) -> None:
        self.name: str = proto.name
        self._string = StringMatcher(proto.string_match) if proto.HasField("string_match") else None

    def match(self, params: dict[str, str]) -> bool:
        value = params.get(self.name)
        if value is None:
            return False
        return self._string is None or self._string.match(value)
