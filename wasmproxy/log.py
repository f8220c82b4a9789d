"""Envoy-style logging: ``[time][thread][level][component] message``.

Envoy logs through spdlog with one logger per component ("main", "upstream",
"wasm", ...) and the level names trace/debug/info/warning/error/critical/off.
``-l/--log-level`` sets every component at once and
``--component-log-level wasm:debug,http:trace`` overrides single ones. We sit
on the standard ``logging`` package so third-party handlers still work, but
keep Envoy's names and line format.

Cheap when disabled: ``Logger.isEnabledFor`` is checked (and cached) before a
record is built, and messages use lazy ``%`` arguments, so a disabled
``log.debug("x %s", obj)`` costs one dict lookup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from typing import IO, Any

__all__ = [
    "DEFAULT_LOG_FORMAT",
    "ENVOY_LOGGERS",
    "EnvoyFormatter",
    "LEVELS",
    "Logger",
    "active_loggers",
    "configure",
    "get_logger",
    "parse_level",
    "set_component_log_level",
    "set_log_level",
    "set_logger_level",
]

TRACE = 5
OFF = logging.CRITICAL + 10

# Envoy's level names, lowest first (spdlog::level names as Envoy prints them).
LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}
_LEVEL_NAMES = {v: k for k, v in LEVELS.items()}

# Envoy 1.40's logger registry, in its order (what its admin /logging lists).
ENVOY_LOGGERS: tuple[str, ...] = (
    "a2a", "admin", "ai_protocol_manager", "alternate_protocols_cache", "aws", "assert", "backtrace",
    "basic_auth", "cache_filter", "client", "config", "connection", "conn_handler", "compression",
    "credential_injector", "decompression", "dns", "dubbo", "envoy_bug", "ext_authz", "ext_proc", "rocketmq",
    "file", "filter", "forward_proxy", "geolocation", "grpc", "happy_eyeballs", "hc", "health_checker", "http",
    "http2", "hystrix", "init", "io", "jwt", "json_rpc", "kafka", "key_value_store", "lua", "local_rate_limit",
    "main", "matcher", "mcp", "misc", "mongo", "multi_connection", "notification", "oauth2", "quic",
    "quic_stream", "pool", "rate_limit_quota", "rbac", "rds", "redis", "router", "runtime", "stats", "secret",
    "sse", "tap", "testing", "thrift", "tracing", "upstream", "udp", "wasm", "websocket", "golang", "stats_sinks",
    "dynamic_modules", "ip_tagging",
)

_ROOT_NAME = "wasmproxy"


class Logger(logging.Logger):
    """A component logger; adds Envoy's ``trace`` level."""

    def setLevel(self, level: int | str) -> None:  # noqa: N802 - logging's name
        # logging clears only the caches of loggers in its manager; ours are not there, so a
        # level change must clear them itself or isEnabledFor keeps answering for the old level.
        super().setLevel(level)
        _clear_caches()

    def trace(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(TRACE):
            self._log(TRACE, msg, args, **kwargs)


DEFAULT_LOG_FORMAT = "[%Y-%m-%d %T.%e][%t][%l][%n] %v"


def _flag_value(flag: str, record: logging.LogRecord, tm: time.struct_time) -> str:
    """One spdlog/Envoy pattern flag (the subset Envoy documents for --log-format)."""
    if flag == "v":
        return record.getMessage()
    if flag == "j":  # the message, JSON-escaped (Envoy's extension)
        return json.dumps(record.getMessage())[1:-1]
    if flag in "lL":
        name = _LEVEL_NAMES.get(record.levelno, record.levelname.lower())
        return name if flag == "l" else name[0].upper()
    if flag == "n":
        return record.name.rpartition(".")[2]
    if flag == "t":
        # Envoy prints the OS thread id; handlers run on the logging thread, so ask it now.
        return str(threading.get_native_id())
    if flag == "P":
        return str(os.getpid())
    if flag == "e":
        return f"{int((record.created % 1) * 1000):03d}"
    if flag == "f":
        return f"{int((record.created % 1) * 1_000_000):06d}"
    if flag in "gs":
        return record.pathname if flag == "g" else os.path.basename(record.pathname)
    if flag == "#":
        return str(record.lineno)
    if flag == "%":
        return "%"
    return time.strftime("%" + flag, tm)  # %Y %m %d %H %M %S %T %F %z %Z %a %b ...


class EnvoyFormatter(logging.Formatter):
    """Formats records with an Envoy ``--log-format`` pattern; the default is Envoy's own
    ``[%Y-%m-%d %T.%e][%t][%l][%n] %v`` without the source location."""

    def __init__(self, pattern: str = DEFAULT_LOG_FORMAT) -> None:
        super().__init__()
        # Split once: literals at even indexes, flag letters at odd ones.
        self._parts = re.split(r"%(.)", pattern)

    def format(self, record: logging.LogRecord) -> str:
        tm = time.localtime(record.created)
        parts = self._parts
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(_flag_value(parts[i], record, tm))
            out.append(parts[i + 1])
        line = "".join(out)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (test runners swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr


_root = Logger(_ROOT_NAME, logging.INFO)
_root.propagate = False
_loggers: dict[str, Logger] = {}
_handler: logging.Handler | None = None
_global_level = logging.INFO


def parse_level(name: str) -> int:
    """Map an Envoy level name (``warn`` and ``err`` accepted as Envoy does) to a logging level."""
    key = name.strip().lower()
    key = {"warn": "warning", "err": "error"}.get(key, key)
    if key not in LEVELS:
        raise ValueError(f"error: invalid log level specified '{name}'")
    return LEVELS[key]


def get_logger(component: str) -> Logger:
    """Return the logger for an Envoy component name ("main", "wasm", "upstream", ...)."""
    lg = _loggers.get(component)
    if lg is None:
        lg = Logger(f"{_ROOT_NAME}.{component}", logging.NOTSET)
        lg.parent = _root
        _loggers[component] = lg
    return lg


def _clear_caches() -> None:
    # Our loggers are not in logging's manager dict, so its cache clearing misses them.
    _root._cache.clear()  # type: ignore[attr-defined]
    for lg in _loggers.values():
        lg._cache.clear()  # type: ignore[attr-defined]


def set_log_level(level: str | int) -> None:
    """Set every component's level (``-l/--log-level``): clears per-component overrides."""
    global _global_level
    _global_level = parse_level(level) if isinstance(level, str) else level
    _root.setLevel(_global_level)
    for lg in _loggers.values():
        lg.setLevel(logging.NOTSET)


def _known(component: str) -> bool:
    return component in _loggers or component in ENVOY_LOGGERS


def set_component_log_level(spec: str) -> None:
    """Apply ``--component-log-level`` (``comp:level,comp:level``); Envoy's error messages."""
    changes = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        component, sep, level = item.partition(":")
        if not sep:
            raise ValueError(f"error: component log level not correctly specified '{item}'")
        if not _known(component):
            raise ValueError(f"error: invalid component specified '{component}'")
        changes.append((component, parse_level(level)))
    for component, levelno in changes:
        get_logger(component).setLevel(levelno)


def set_logger_level(component: str, level: str) -> None:
    """Set one component's level (admin ``/logging?<name>=<level>``). KeyError for an unknown name."""
    levelno = parse_level(level)
    if not _known(component):
        raise KeyError(component)
    get_logger(component).setLevel(levelno)


def active_loggers() -> list[tuple[str, str]]:
    """Every logger with its effective level name: Envoy's registry order, then our own components."""
    names = list(ENVOY_LOGGERS) + sorted(n for n in _loggers if n not in ENVOY_LOGGERS)
    out = []
    for name in names:
        lg = _loggers.get(name)
        levelno = lg.getEffectiveLevel() if lg is not None else _root.level
        out.append((name, _LEVEL_NAMES.get(levelno, logging.getLevelName(levelno).lower())))
    return out


def configure(
    level: str | int = "info",
    stream: IO[str] | None = None,
    component_levels: str = "",
    log_format: str = DEFAULT_LOG_FORMAT,
) -> None:
    """Install the Envoy-format handler on ``stream`` (stderr, as Envoy) and set levels
    (``-l``, ``--component-log-level``, ``--log-format``)."""
    global _handler
    if _handler is not None:
        _root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    _handler.setFormatter(EnvoyFormatter(log_format))
    _root.addHandler(_handler)
    set_log_level(level)
    if component_levels:
        set_component_log_level(component_levels)


def _install_default_handler() -> None:
    # Until configure() is called, log to stderr at info like Envoy's default.
    global _handler
    _handler = _StderrHandler()
    _handler.setFormatter(EnvoyFormatter())
    _root.addHandler(_handler)


_install_default_handler()
