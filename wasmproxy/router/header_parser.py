"""HeaderParser: headers_to_add / headers_to_remove with Envoy's append actions and %FORMATTERS%.

Mirrors source/common/router/header_parser.cc: removals first, then every
overwrite (remove + append at the end), then every append. A value that formats
to the empty string is not added unless `keep_empty_value` is set.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any, Callable, Iterable

from ..http.headers import HeaderMap
from ..http.stream_info import Address, StreamInfo
from .matchers import MatcherConfigError

APPEND_IF_EXISTS_OR_ADD = 0
ADD_IF_ABSENT = 1
OVERWRITE_IF_EXISTS_OR_ADD = 2
OVERWRITE_IF_EXISTS = 3

_COMMAND = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")

Formatter = Callable[[StreamInfo, HeaderMap | None, HeaderMap | None], str]  # (info, request, response)


def _address(addr: Address | None, part: str) -> str:
    if addr is None:
        return ""
    if part == "port":
        return str(addr.port)
    if part == "host":
        return addr.host
    return str(addr)


def _remote(info: StreamInfo) -> Address:
    c = info.connection
    return c.direct_remote_address or c.remote_address


def _command(name: str, arg: str | None) -> Formatter:
    """One %COMMAND%; commands wasmproxy has no data for (metadata, TLS) format as empty."""
    fixed: dict[str, Formatter] = {
        "DOWNSTREAM_REMOTE_ADDRESS": lambda i, h, r: _address(_remote(i), "all"),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda i, h, r: _address(_remote(i), "host"),
        "DOWNSTREAM_REMOTE_PORT": lambda i, h, r: _address(_remote(i), "port"),
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": lambda i, h, r: _address(i.connection.remote_address, "all"),
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": lambda i, h, r: _address(i.connection.remote_address, "host"),
        "DOWNSTREAM_DIRECT_REMOTE_PORT": lambda i, h, r: _address(i.connection.remote_address, "port"),
        "DOWNSTREAM_LOCAL_ADDRESS": lambda i, h, r: _address(i.connection.local_address, "all"),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda i, h, r: _address(i.connection.local_address, "host"),
        "DOWNSTREAM_LOCAL_PORT": lambda i, h, r: _address(i.connection.local_address, "port"),
        "UPSTREAM_REMOTE_ADDRESS": lambda i, h, r: _address(i.upstream_host, "all"),
        "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda i, h, r: _address(i.upstream_host, "host"),
        "UPSTREAM_REMOTE_PORT": lambda i, h, r: _address(i.upstream_host, "port"),
        "UPSTREAM_CLUSTER": lambda i, h, r: i.upstream_cluster,
        "PROTOCOL": lambda i, h, r: i.protocol,
        "REQUESTED_SERVER_NAME": lambda i, h, r: i.connection.requested_server_name,
        "ROUTE_NAME": lambda i, h, r: i.route_name,
        "STREAM_ID": lambda i, h, r: i.request_id,
        "CONNECTION_ID": lambda i, h, r: str(i.connection.id),
        "HOSTNAME": lambda i, h, r: socket.gethostname(),
    }
    if name in fixed:
        return fixed[name]
    if name == "START_TIME":
        fmt = arg or "%Y-%m-%dT%H:%M:%E3SZ"
        return lambda i, h, r: format_time(i.start_time, fmt)
    if name == "DURATION":
        return lambda i, h, r: str(int(i.duration() * 1000))
    if name in ("REQ", "RESP") and arg:
        key = arg.split("?")[0].lower()
        if name == "RESP":
            return lambda i, h, r: (r.get(key) or "") if r is not None else ""
        return lambda i, h, r: (h.get(key) or "") if h is not None else ""
    return lambda i, h, r: ""


_TIME_SPECIFIER = re.compile(r"%(E(\d)S|(\d)?f|s)")


def format_time(epoch: float, fmt: str) -> str:
    """strftime in UTC plus Envoy's extra specifiers: %s (epoch seconds), %f / %<n>f
    (fractional seconds, 9 or n digits) and %E<n>S (seconds with n fractional digits)."""
    seconds = int(epoch)
    nanos = f"{int(round((epoch - seconds) * 1e9)):09d}"[:9]

    def extra(m: re.Match[str]) -> str:
        if m.group(1) == "s":
            return str(seconds)
        if m.group(2) is not None:  # %E<n>S
            digits = int(m.group(2))
            secs = time.strftime("%S", time.gmtime(seconds))
            return secs + ("." + nanos[:digits] if digits else "")
        return nanos[: int(m.group(3))] if m.group(3) else nanos

    return time.strftime(_TIME_SPECIFIER.sub(lambda m: extra(m).replace("%", "%%"), fmt), time.gmtime(seconds))


def compile_format(value: str) -> list[str | Formatter]:
    """Split a header value into literal parts and formatters; '%%' is a literal '%'."""
    parts: list[str | Formatter] = []
    literal: list[str] = []
    pos = 0
    while pos < len(value):
        ch = value[pos]
        if ch != "%":
            literal.append(ch)
            pos += 1
            continue
        if value.startswith("%%", pos):
            literal.append("%")
            pos += 2
            continue
        m = _COMMAND.match(value, pos)
        if m is None:
            raise MatcherConfigError(
                f"Invalid header configuration. Un-terminated variable expression '{value[pos:]}'"
            )
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_command(m.group(1), m.group(2)))
        pos = m.end()
    if literal:
        parts.append("".join(literal))
    return parts


class HeaderParser:
    """One level's (route, virtual host or route config) header mutations for one direction."""

    __slots__ = ("_add", "_remove")

    def __init__(self, to_add: Iterable[Any], to_remove: Iterable[str]) -> None:
        self._add: list[tuple[str, list[str | Formatter], int, bool]] = []
        for option in to_add:
            if option.HasField("append"):
                action = APPEND_IF_EXISTS_OR_ADD if option.append.value else OVERWRITE_IF_EXISTS_OR_ADD
            else:
                action = option.append_action
            header = option.header
            if header.key.startswith(":") or header.key.lower() == "host":
                raise MatcherConfigError(":-prefixed or host headers may not be modified")
            raw = header.raw_value.decode("latin-1") if header.raw_value else header.value
            self._add.append((header.key.lower(), compile_format(raw), action, option.keep_empty_value))
        self._remove = [h.lower() for h in to_remove]

    def __bool__(self) -> bool:
        return bool(self._add or self._remove)

    def evaluate(self, headers: HeaderMap, info: StreamInfo, request_headers: HeaderMap | None = None) -> None:
        """Apply to `headers`. For request headers leave `request_headers` None; for response
        headers pass the request's, so %REQ(...)% reads them and %RESP(...)% reads `headers`."""
        for key in self._remove:
            headers.remove(key)
        if request_headers is None:
            req, resp = headers, None
        else:
            req, resp = request_headers, headers
        overwrite: list[tuple[str, str]] = []
        append: list[tuple[str, str]] = []
        for key, parts, action, keep_empty in self._add:
            value = "".join(p if isinstance(p, str) else p(info, req, resp) for p in parts)
            if not value and not keep_empty:
                continue
            if action == APPEND_IF_EXISTS_OR_ADD:
                append.append((key, value))
            elif action == ADD_IF_ABSENT:
                if key not in headers:
                    append.append((key, value))
            elif action == OVERWRITE_IF_EXISTS:
                if key in headers:
                    overwrite.append((key, value))
            else:
                overwrite.append((key, value))
        for key, value in overwrite:
            # Envoy's setReferenceKey removes then appends: the header moves to the end.
            headers.remove(key)
            headers.add(key, value)
        for key, value in append:
            headers.add(key, value)
