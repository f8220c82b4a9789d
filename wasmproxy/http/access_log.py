"""Access loggers: envoy.access_loggers.stdout / stderr / file with Envoy's substitution formatter.

`create_access_logger(access_log_proto, factory_context)` (the registry's factory for the three
loggers) compiles the format once, on the main thread, into a list of small callables; each
log line is then a join. Envoy's default format is used when none is configured. Lines are
written with one os.write each (atomic on pipes for lines under PIPE_BUF), so workers can share
a stream without a lock.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from typing import Any, Callable

from .headers import HeaderMap
from .stream_info import StreamInfo

__all__ = ["DEFAULT_FORMAT", "AccessLogger", "Formatter", "create_access_logger"]

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

# (request headers, response headers, response trailers, stream info) -> value or None ("-").
_Context = tuple[HeaderMap | None, HeaderMap | None, HeaderMap | None, StreamInfo]
_Field = Callable[[_Context], "str | int | None"]

_COMMAND = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::(\d+))?%")


class FormatError(ValueError):
    """An unsupported or malformed command (Envoy rejects the config the same way)."""


def _ms_between(start: float | None, end: float | None) -> int | None:
    if start is None or end is None:
        return None
    return int((end - start) * 1000)


def _header_field(which: int, arg: str) -> _Field:
    """%REQ(X?Y)%, %RESP(...)%, %TRAILER(...)%: the first header, else the alternative."""
    main, _, alt = arg.partition("?")
    main, alt = main.lower(), alt.lower()

    def field(ctx: _Context) -> str | None:
        headers = ctx[which]
        if headers is None:
            return None
        value = headers.get(main)
        if value is None and alt:
            value = headers.get(alt)
        return value

    return field


def _start_time(arg: str) -> _Field:
    if not arg:
        # (second, its "%Y-%m-%dT%H:%M:%S"), formatted once per second. Workers share the
        # formatter: the pair is replaced whole, never updated in place.
        last = [(-1, "")]

        def default(ctx: _Context) -> str:
            t = ctx[3].start_time
            second = int(t)
            cached = last[0]
            if cached[0] != second:
                cached = last[0] = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)))
            return cached[1] + ".%03dZ" % (int(t * 1000) % 1000)

        return default

    def custom(ctx: _Context) -> str:
        t = ctx[3].start_time
        fmt = arg.replace("%E3S", "%S.{ms:03d}").replace("%E6S", "%S.{us:06d}").replace("%E9S", "%S.{ns:09d}")
        fmt = fmt.replace("%f", "{ns:09d}").replace("%s", str(int(t)))
        text = time.strftime(fmt, time.gmtime(t))
        frac = t - int(t)
        return text.format(ms=int(frac * 1e3), us=int(frac * 1e6), ns=int(frac * 1e9))

    return custom


def _address(which: str, with_port: bool) -> _Field:
    def field(ctx: _Context) -> str | None:
        conn = ctx[3].connection
        # direct_remote_address is the one after x-forwarded-for processing (StreamInfo's
        # contract); remote_address is the peer, Envoy's "direct" remote address.
        if which == "remote":
            addr = conn.direct_remote_address or conn.remote_address
        elif which == "local":
            addr = conn.local_address
        else:
            addr = conn.remote_address
        if addr is None:
            return None
        return str(addr) if with_port else addr.host

    return field


def _upstream_host(ctx: _Context) -> str | None:
    host = ctx[3].upstream_host
    return str(host) if host is not None else None


def _upstream_local(ctx: _Context) -> str | None:
    addr = ctx[3].upstream_local_address
    return str(addr) if addr is not None else None


def _metadata(source: str, arg: str) -> _Field:
    parts = arg.split(":")
    namespace, path = parts[0], parts[1:]

    def field(ctx: _Context) -> Any:
        data: Any = (ctx[3].dynamic_metadata if source == "dynamic" else
                     ctx[3].route_metadata if source == "route" else ctx[3].cluster_metadata).get(namespace)
        for p in path:
            if not isinstance(data, dict) or p not in data:
                return None
            data = data[p]
        if data is None:
            return None
        return data if isinstance(data, (str, int)) else json.dumps(data, separators=(",", ":"))

    return field


def _filter_state(arg: str) -> _Field:
    key = arg.split(":")[0]

    def field(ctx: _Context) -> str | None:
        value = ctx[3].filter_state.get(key)
        if value is None:
            return None
        return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)

    return field


def _duration(ctx: _Context) -> int:
    """Start to the last byte sent downstream (or to now for a stream that never answered)."""
    info = ctx[3]
    end = info.last_downstream_tx if info.last_downstream_tx is not None else time.monotonic()
    return max(0, int((end - info.start_monotonic) * 1000))


_SIMPLE: dict[str, _Field] = {
    "PROTOCOL": lambda c: c[3].protocol,
    "RESPONSE_CODE": lambda c: c[3].response_code if c[3].response_code is not None else 0,
    "RESPONSE_CODE_DETAILS": lambda c: c[3].response_code_details or None,
    # Envoy prints "-" for no flags even where a missing value would be null (JSON).
    "RESPONSE_FLAGS": lambda c: ",".join(c[3].response_flags) or "-",
    "BYTES_RECEIVED": lambda c: c[3].bytes_received,
    "BYTES_SENT": lambda c: c[3].bytes_sent,
    "DURATION": _duration,
    "RESPONSE_DURATION": lambda c: _ms_between(c[3].start_monotonic, c[3].first_upstream_rx),
    "RESPONSE_TX_DURATION": lambda c: _ms_between(c[3].first_upstream_rx, c[3].last_downstream_tx),
    "UPSTREAM_HOST": _upstream_host,
    "UPSTREAM_REMOTE_ADDRESS": _upstream_host,
    "UPSTREAM_CLUSTER": lambda c: c[3].upstream_cluster or None,
    "UPSTREAM_LOCAL_ADDRESS": _upstream_local,
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda c: c[3].upstream_transport_failure_reason or None,
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": lambda c: c[3].upstream_request_attempt_count,
    "DOWNSTREAM_REMOTE_ADDRESS": _address("remote", True),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _address("remote", False),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": _address("direct", True),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": _address("direct", False),
    "DOWNSTREAM_LOCAL_ADDRESS": _address("local", True),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": _address("local", False),
    "REQUESTED_SERVER_NAME": lambda c: c[3].connection.requested_server_name or None,
    "ROUTE_NAME": lambda c: c[3].route_name or None,
    "VIRTUAL_CLUSTER_NAME": lambda c: c[3].virtual_cluster_name or None,
    "CONNECTION_ID": lambda c: c[3].connection.id,
    "CONNECTION_TERMINATION_DETAILS": lambda c: c[3].connection.termination_details or None,
    "HOSTNAME": lambda c: socket.gethostname(),
    "STREAM_ID": lambda c: c[3].request_id or None,
}


def _command(name: str, arg: str | None) -> _Field:
    if name in ("REQ", "RESP", "TRAILER"):
        if not arg:
            raise FormatError(f"Invalid header configuration. Format string contains empty header: %{name}()%")
        return _header_field({"REQ": 0, "RESP": 1, "TRAILER": 2}[name], arg)
    if name == "START_TIME":
        return _start_time(arg or "")
    if name == "DYNAMIC_METADATA":
        return _metadata("dynamic", arg or "")
    if name == "CLUSTER_METADATA":
        return _metadata("cluster", arg or "")
    if name == "FILTER_STATE":
        return _filter_state(arg or "")
    if name == "ENVIRONMENT":
        value = os.environ.get(arg or "")
        return lambda c: value
    field = _SIMPLE.get(name)
    if field is None or arg is not None:
        raise FormatError(f"Not supported field in StreamInfo: {name}")
    return field


class Formatter:
    """A compiled text format string (Envoy's FormatterImpl)."""

    def __init__(self, fmt: str, omit_empty_values: bool = False) -> None:
        parts: list[str | tuple[_Field, int | None]] = []
        self._missing = "" if omit_empty_values else "-"
        pos = 0
        while pos < len(fmt):
            start = fmt.find("%", pos)
            if start < 0:
                parts.append(fmt[pos:])
                break
            if start > pos:
                parts.append(fmt[pos:start])
            if fmt.startswith("%%", start):
                parts.append("%")
                pos = start + 2
                continue
            m = _COMMAND.match(fmt, start)
            if m is None:
                raise FormatError(f"Incorrect configuration: {fmt}. Couldn't find valid command at position {start}")
            name, arg, max_len = m.group(1), m.group(2), m.group(3)
            parts.append((_command(name, arg), int(max_len) if max_len else None))
            pos = m.end()
        # What format() runs: (text before, command or None, max length) for each command.
        self._ops: list[tuple[str, _Field | None, int | None]] = []
        text = ""
        for part in parts:
            if isinstance(part, str):
                text += part
            else:
                self._ops.append((text, part[0], part[1]))
                text = ""
        if text:
            self._ops.append((text, None, None))

    def format(self, ctx: _Context) -> str:
        out: list[str] = []
        append = out.append
        missing = self._missing
        for text, field, max_len in self._ops:
            if text:
                append(text)
            if field is None:
                continue
            value = field(ctx)
            if value is None or value == "":
                append(missing)
                continue
            if value.__class__ is not str:
                value = str(value)
            append(value if max_len is None else value[:max_len])  # type: ignore[index]
        return "".join(out)


class _JsonFormatter:
    """json_format: each value is a format string; lone commands keep their type (numbers stay numbers)."""

    def __init__(self, template: dict[str, Any], omit_empty_values: bool) -> None:
        self._omit_empty = omit_empty_values
        self._template = {k: self._compile(v) for k, v in template.items()}

    def _compile(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._compile(v) for k, v in value.items()}
        if isinstance(value, str):
            m = _COMMAND.fullmatch(value)
            if m is not None:
                return ("field", _command(m.group(1), m.group(2)))
            return ("text", Formatter(value, self._omit_empty))
        return ("const", value)

    def _render(self, compiled: Any, ctx: _Context) -> Any:
        if isinstance(compiled, dict):
            return {k: self._render(v, ctx) for k, v in compiled.items()}
        kind, obj = compiled
        if kind == "field":
            value = obj(ctx)
            return None if value == "" else value
        if kind == "text":
            return obj.format(ctx)
        return obj

    def format(self, ctx: _Context) -> str:
        data = self._render(self._template, ctx)
        if self._omit_empty:
            data = {k: v for k, v in data.items() if v is not None}
        # Envoy prints the keys sorted, missing values as null.
        return json.dumps(data, separators=(",", ":"), sort_keys=True) + "\n"


class AccessLogger:
    """An AccessLogHandler writing formatted lines to a file descriptor."""

    def __init__(self, formatter: Formatter | _JsonFormatter, fd: int,
                 filter: Callable[[StreamInfo, HeaderMap | None], bool] | None = None) -> None:
        self._formatter = formatter
        self._fd = fd
        self._filter = filter

    def log(self, request_headers: HeaderMap | None, response_headers: HeaderMap | None,
            response_trailers: HeaderMap | None, stream_info: StreamInfo) -> None:
        if self._filter is not None and not self._filter(stream_info, request_headers):
            return
        line = self._formatter.format((request_headers, response_headers, response_trailers, stream_info))
        os.write(self._fd, line.encode("utf-8", "surrogateescape"))


def _build_formatter(log_format: Any, has_log_format: bool) -> Formatter | _JsonFormatter:
    """From a SubstitutionFormatString (or Envoy's default format when unset)."""
    from google.protobuf.json_format import MessageToDict

    if not has_log_format:
        return Formatter(DEFAULT_FORMAT)
    which = log_format.WhichOneof("format")
    if which == "text_format":
        return Formatter(log_format.text_format, log_format.omit_empty_values)
    if which == "text_format_source":
        source = log_format.text_format_source
        if source.WhichOneof("specifier") == "filename":
            with open(source.filename, encoding="utf-8") as f:
                return Formatter(f.read(), log_format.omit_empty_values)
        text = source.inline_string or source.inline_bytes.decode("utf-8")
        return Formatter(text, log_format.omit_empty_values)
    if which == "json_format":
        return _JsonFormatter(MessageToDict(log_format.json_format), log_format.omit_empty_values)
    return Formatter(DEFAULT_FORMAT)


def _build_filter(proto: Any) -> Callable[[StreamInfo, HeaderMap | None], bool]:
    """AccessLogFilter: status_code, duration, response_flag, not_health_check, and/or."""
    from ..config.errors import ConfigError

    which = proto.WhichOneof("filter_specifier")
    if which in ("status_code_filter", "duration_filter"):
        comparison = getattr(proto, which).comparison
        op, target = comparison.op, comparison.value.default_value
        compare = {0: lambda v: v == target, 1: lambda v: v >= target, 2: lambda v: v <= target}[op]
        if which == "status_code_filter":
            return lambda info, rq: compare(info.response_code or 0)
        return lambda info, rq: compare(int(info.duration() * 1000))
    if which == "response_flag_filter":
        wanted = set(proto.response_flag_filter.flags)
        return lambda info, rq: bool(info.response_flags) and (not wanted or bool(wanted & set(info.response_flags)))
    if which == "not_health_check_filter":
        return lambda info, rq: True  # no health checking in wasmproxy: nothing is a health check
    if which in ("and_filter", "or_filter"):
        subs = [_build_filter(f) for f in getattr(proto, which).filters]
        if which == "and_filter":
            return lambda info, rq: all(f(info, rq) for f in subs)
        return lambda info, rq: any(f(info, rq) for f in subs)
    raise ConfigError(f"access log filter not supported: {which}", "filter")


def create_access_logger(access_log_proto: Any, factory_context: Any) -> AccessLogger:
    """Registry factory for envoy.access_loggers.{stdout,stderr,file}: the AccessLog message in,
    an AccessLogHandler out. ConfigError for an unsupported format or filter."""
    from ..config import registry
    from ..config.errors import ConfigError

    config = registry.unpack(access_log_proto.typed_config, "typed_config")
    type_name = config.DESCRIPTOR.full_name
    try:
        if type_name == "envoy.extensions.access_loggers.file.v3.FileAccessLog":
            formatter = _file_formatter(config)
            fd = os.open(config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:
            formatter = _build_formatter(config.log_format, config.HasField("log_format"))
            stream = sys.stderr if type_name.endswith("StderrAccessLog") else sys.stdout
            fd = stream.fileno()
    except FormatError as e:
        raise ConfigError(str(e), "typed_config.log_format") from None
    log_filter = _build_filter(access_log_proto.filter) if access_log_proto.HasField("filter") else None
    return AccessLogger(formatter, fd, log_filter)


def _file_formatter(config: Any) -> Formatter | _JsonFormatter:
    from google.protobuf.json_format import MessageToDict

    which = config.WhichOneof("access_log_format")
    if which == "format":
        return Formatter(config.format)
    if which in ("json_format", "typed_json_format"):
        return _JsonFormatter(MessageToDict(getattr(config, which)), False)
    if which == "log_format":
        return _build_formatter(config.log_format, True)
    return Formatter(DEFAULT_FORMAT)
