"""Route hash policies (RouteAction.hash_policy): the request hash that RING_HASH / MAGLEV use.

Policies are evaluated in order; each hash is folded into the previous one as Envoy's
HashPolicyImpl does (rotate left by one, xor), and a `terminal` policy that produced a
hash stops the evaluation. The 64-bit hash function is BLAKE2b, not Envoy's xxHash64:
the same key always picks the same host, but not necessarily the host Envoy would pick.
"""

from __future__ import annotations

import hashlib
import re
from http.cookies import CookieError, SimpleCookie
from typing import Any

from ..http.headers import HeaderMap
from ..http.stream_info import Address
from .matchers import compile_regex, parse_query

_MASK = (1 << 64) - 1


def hash64(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode("latin-1"), digest_size=8).digest(), "big")


class HashPolicy:
    def __init__(self, protos: Any) -> None:
        self._policies: list[tuple[str, str, tuple[re.Pattern[str], str] | None, bool]] = []
        for p in protos:
            kind = p.WhichOneof("policy_specifier")
            rewrite = None
            if kind == "header":
                key = p.header.header_name.lower()
                if p.header.HasField("regex_rewrite"):
                    rewrite = (compile_regex(p.header.regex_rewrite.pattern), p.header.regex_rewrite.substitution)
            elif kind == "cookie":
                key = p.cookie.name
            elif kind == "query_parameter":
                key = p.query_parameter.name
            elif kind == "connection_properties":
                if not p.connection_properties.source_ip:
                    continue
                key = ""
            else:
                continue  # filter_state: nothing in wasmproxy sets the objects it reads
            self._policies.append((kind, key, rewrite, p.terminal))

    def __bool__(self) -> bool:
        return bool(self._policies)

    def generate_hash(self, headers: HeaderMap, remote: Address | None) -> int | None:
        result: int | None = None
        for kind, key, rewrite, terminal in self._policies:
            value = self._value(kind, key, rewrite, headers, remote)
            if value is None:
                continue
            h = hash64(value)
            result = h if result is None else (((result << 1) | (result >> 63)) & _MASK) ^ h
            if terminal:
                break
        return result

    @staticmethod
    def _value(kind: str, key: str, rewrite: tuple[re.Pattern[str], str] | None, headers: HeaderMap,
               remote: Address | None) -> str | None:
        if kind == "header":
            values = headers.get_all(key)
            if not values:
                return None
            value = values[0]
            return rewrite[0].sub(rewrite[1], value) if rewrite is not None else value
        if kind == "cookie":
            for line in headers.get_all("cookie"):
                try:
                    jar = SimpleCookie(line)
                except CookieError:
                    continue
                if key in jar:
                    return jar[key].value
            return None
        if kind == "query_parameter":
            return parse_query(headers.get(":path") or "").get(key)
        return remote.host if remote is not None else None
