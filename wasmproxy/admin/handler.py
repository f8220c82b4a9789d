"""AdminHandler: Envoy's admin endpoints as a sans-IO ``handle(method, path) -> response``.

Main thread only (it reads the StatsRegistry and the providers' main-thread
state). Bodies, status codes and headers follow Envoy 1.40's admin, checked
with curl against a running Envoy:

* ``/ready``: the state and a newline, 200 when LIVE else 503;
* ``/server_info``: JSON (1-space indent) with version, state, uptimes,
  command_line_options, node;
* ``/stats`` (``format=text|json|prometheus``, ``usedonly``, ``filter``,
  ``invert_filter``, ``type``) and ``/stats/prometheus``; a bad format or regex is a 400;
* ``/clusters`` text (``name::host::stat::value``) and ``?format=json``;
* ``/config_dump``: the provider's protobuf message or dict as JSON;
* ``/quitquitquit``: POST only (GET gives 405 ``Method GET not allowed, POST required.``);
* ``/help`` and any unknown path (404): the command list, Envoy's layout.

Every response carries ``cache-control: no-cache, max-age=0`` and
``x-content-type-options: nosniff`` as Envoy's admin does.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from envoy.admin.v3 import clusters_pb2, listeners_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from wasmproxy import __version__, log
from wasmproxy.stats import (
    HistogramBuckets,
    StatsFilter,
    StatsRegistry,
    StatType,
    render_json,
    render_prometheus,
    render_text,
)

__all__ = ["AdminHandler", "ClusterStatus", "HostStatus", "Response"]

Response = tuple[int, list[tuple[str, str]], bytes]

_TEXT = "text/plain; charset=UTF-8"
_JSON = "application/json"
_STATS_FORMATS = ("text", "json", "prometheus")

# Envoy's own version string shape: <sha>/<version>/<status>/<build>/<ssl>.
VERSION = f"{'0' * 40}/{__version__}/Clean/RELEASE/wasmproxy"

# Envoy 1.40's command_line_options, in its order, with its defaults.
_DEFAULT_OPTIONS: dict[str, Any] = {
    "base_id": "0", "concurrency": 1, "config_path": "", "config_yaml": "",
    "allow_unknown_static_fields": False, "admin_address_path": "", "local_address_ip_version": "v4",
    "log_level": "info", "component_log_level": "", "log_format": "[%Y-%m-%d %T.%e][%t][%l][%n] %v",
    "log_path": "", "service_cluster": "", "service_node": "", "service_zone": "",
    "file_flush_interval": "10s", "drain_time": "600s", "parent_shutdown_time": "900s", "mode": "Serve",
    "disable_hot_restart": True, "enable_mutex_tracing": False, "restart_epoch": 0, "cpuset_threads": False,
    "reject_unknown_dynamic_fields": False, "log_format_escaped": False, "disabled_extensions": [],
    "ignore_unknown_dynamic_fields": False, "use_dynamic_base_id": False, "base_id_path": "",
    "drain_strategy": "Gradual", "enable_fine_grain_logging": False, "socket_path": "@envoy_domain_socket",
    "socket_mode": 0, "enable_core_dump": False, "stats_tag": [], "skip_hot_restart_on_no_parent": False,
    "skip_hot_restart_parent_stats": False, "skip_deprecated_logs": False, "file_flush_min_size": 0,
    "log_stacktrace_single_entry": False,
}

# Host stats Envoy prints per host: counters, then gauges (JSON); text sorts them together.
_HOST_COUNTERS = ("cx_connect_fail", "cx_total", "rq_error", "rq_success", "rq_timeout", "rq_total")
_HOST_GAUGES = ("cx_active", "rq_active", "rq_pending_active")
_THRESHOLDS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


@dataclass
class HostStatus:
    """One upstream host as ``/clusters`` shows it."""

    address: str  # "127.0.0.1:8080"
    stats: dict[str, int] = field(default_factory=dict)  # cx_active, rq_total, ... (missing = 0)
    hostname: str = ""
    health_flags: str = "healthy"
    weight: int = 1
    region: str = ""
    zone: str = ""
    sub_zone: str = ""
    canary: bool = False
    priority: int = 0
    success_rate: float = -1
    local_origin_success_rate: float = -1


def _default_thresholds() -> dict[str, int]:
    return {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024, "max_retries": 3}


@dataclass
class ClusterStatus:
    """One cluster as ``/clusters`` shows it (Envoy's defaults for circuit breakers)."""

    name: str
    hosts: list[HostStatus] = field(default_factory=list)
    observability_name: str = ""
    added_via_api: bool = False
    default_priority: dict[str, int] = field(default_factory=_default_thresholds)
    high_priority: dict[str, int] = field(default_factory=_default_thresholds)


@dataclass(frozen=True)
class _Command:
    path: str
    help: str
    post_only: bool = False
    params: tuple[tuple[str, str], ...] = ()


_COMMANDS = (
    _Command("/clusters", "upstream cluster status",
             params=(("format", "File format to use; One of (text, json)"),
                     ("filter", "Regular expression (Google re2) for filtering clusters by name"))),
    _Command("/config_dump", "dump current Envoy configs"),
    _Command("/help", "print out list of admin commands"),
    _Command("/listeners", "print listener info",
             params=(("format", "File format to use; One of (text, json)"),)),
    _Command("/logging", "query/change logging levels", post_only=True,
             params=(("paths", "Change multiple logging levels by setting to "
                               "<logger_name1>:<desired_level1>,<logger_name2>:<desired_level2>."),
                     ("level", "desired logging level, this will change all loggers's level; "
                               "One of (, trace, debug, info, warning, error, critical, off)"))),
    _Command("/quitquitquit", "exit the server", post_only=True),
    _Command("/ready", "print server state, return 200 if LIVE, otherwise return 503"),
    _Command("/server_info", "print server version/status information"),
    _Command("/stats", "print server stats",
             params=(("usedonly", "Only include stats that have been written by system since restart"),
                     ("filter", "Regular expression (Google re2) for filtering stats"),
                     ("invert_filter", "Invert the filter regex"),
                     ("format", "Format to use; One of (text, json, prometheus)"),
                     ("type", "Stat types to include.; One of (All, Counters, Histograms, Gauges, TextReadouts)"),
                     ("histogram_buckets",
                      "Histogram bucket display mode; One of (cumulative, disjoint, detailed, summary)"))),
    _Command("/stats/prometheus", "print server stats in prometheus format",
             params=(("usedonly", "Only include stats that have been written by system since restart"),
                     ("filter", "Regular expression (Google re2) for filtering stats"),
                     ("invert_filter", "Invert the filter regex"),
                     ("histogram_buckets", "Histogram bucket display mode; One of (cumulative, summary)"))),
)


def _help_text() -> str:
    lines = []
    for c in _COMMANDS:
        lines.append(f"  {c.path}{' (POST)' if c.post_only else ''}: {c.help}")
        lines.extend(f"      {name}: {text}" for name, text in c.params)
    return "".join(line + "\n" for line in lines)


class AdminHandler:
    """Routes admin requests. Providers are called on the main thread at request time.

    ``shutdown`` is called by ``POST /quitquitquit`` before the response is
    written: it must only schedule the shutdown (e.g. post it), never block.
    """

    def __init__(
        self,
        stats: StatsRegistry,
        *,
        state: Callable[[], str] = lambda: "LIVE",
        command_line_options: dict[str, Any] | None = None,
        node: Callable[[], dict[str, Any]] | None = None,
        clusters: Callable[[], list[ClusterStatus]] | None = None,
        listeners: Callable[[], list[tuple[str, str, int]]] | None = None,
        config_dump: Callable[[], Message | dict[str, Any]] | None = None,
        shutdown: Callable[[], None] | None = None,
        flush_on_admin: bool = False,
        start_time: float | None = None,
    ) -> None:
        self._stats = stats
        self._state = state
        self._options = {**_DEFAULT_OPTIONS, **(command_line_options or {})}
        self._node = node
        self._clusters = clusters
        self._listeners = listeners
        self._config_dump = config_dump
        self._shutdown = shutdown
        self._flush_on_admin = flush_on_admin
        self._start = time.monotonic() if start_time is None else start_time
        self._routes: dict[str, Callable[[str, dict[str, str]], Response]] = {
            "/ready": self._ready,
            "/server_info": self._server_info,
            "/stats": self._stats_handler,
            "/stats/prometheus": self._prometheus,
            "/clusters": self._clusters_handler,
            "/config_dump": self._config_dump_handler,
            "/quitquitquit": self._quit,
            "/help": self._help,
            "/listeners": self._listeners_handler,
            "/logging": self._logging,
        }
        self._post_only = {c.path for c in _COMMANDS if c.post_only}

    def handle(self, method: str, path_with_query: str) -> Response:
        """Answer one admin request; never raises for client mistakes (4xx instead)."""
        url = urlsplit(path_with_query)
        route = self._routes.get(url.path)
        if route is None:
            return _response(404, "invalid path. admin commands are:\n" + _help_text())
        if url.path in self._post_only and method != "POST":
            return _response(405, f"Method {method} not allowed, POST required.")
        return route(method, _parse_query(url.query))

    # -- handlers ---------------------------------------------------------------------

    def _ready(self, method: str, query: dict[str, str]) -> Response:
        state = self._state()
        return _response(200 if state == "LIVE" else 503, state + "\n")

    def _server_info(self, method: str, query: dict[str, str]) -> Response:
        uptime = f"{int(time.monotonic() - self._start)}s"
        info = {
            "version": VERSION,
            "state": self._state(),
            "uptime_current_epoch": uptime,
            "uptime_all_epochs": uptime,
            "hot_restart_version": "disabled",
            "command_line_options": self._options,
            "node": self._node() if self._node is not None else {"user_agent_name": "envoy"},
            "hot_restart_initializing": False,
        }
        return _response(200, json.dumps(info, indent=1), _JSON)

    def _stats_filter(self, query: dict[str, str]) -> StatsFilter | Response:
        regex = None
        if query.get("filter"):
            try:
                regex = re.compile(query["filter"])
            except re.error as e:
                return _response(400, f"Invalid re2 regex: {e}")
        try:
            stat_type = StatType(query.get("type", "All"))
        except ValueError:
            return _response(400, "invalid &type= param")
        return StatsFilter(
            used_only="usedonly" in query, regex=regex, invert="invert_filter" in query, type=stat_type
        )

    def _stats_handler(self, method: str, query: dict[str, str]) -> Response:
        fmt = query.get("format", "text")
        if fmt not in _STATS_FORMATS:
            return _response(400, "usage: /stats?format=(html|active-html|json|prometheus|text)\n\n")
        if fmt == "prometheus":
            return self._prometheus(method, query)
        f = self._stats_filter(query)
        if not isinstance(f, StatsFilter):
            return f
        try:
            buckets = HistogramBuckets(query.get("histogram_buckets", "summary"))
        except ValueError:
            return _response(400, _BUCKETS_USAGE)
        if self._flush_on_admin:
            self._stats.flush()
        if fmt == "json":
            return _response(200, render_json(self._stats, f, buckets), _JSON)
        return _response(200, render_text(self._stats, f, buckets))

    def _prometheus(self, method: str, query: dict[str, str]) -> Response:
        # Envoy's prometheus output ignores type=.
        f = self._stats_filter({k: v for k, v in query.items() if k != "type"})
        if not isinstance(f, StatsFilter):
            return f
        mode = query.get("histogram_buckets", "cumulative")
        if mode in ("disjoint", "detailed", "prometheusnative"):
            return _response(400, "unsupported prometheus histogram bucket mode")
        if mode not in ("cumulative", "summary"):
            return _response(400, _BUCKETS_USAGE)
        if self._flush_on_admin:
            self._stats.flush()
        return _response(200, render_prometheus(self._stats, f, summary=mode == "summary"))

    def _clusters_handler(self, method: str, query: dict[str, str]) -> Response:
        clusters = self._clusters() if self._clusters is not None else []
        if query.get("filter"):
            try:
                rx = re.compile(query["filter"])
            except re.error:
                return _response(400, "Invalid re2 regex")
            clusters = [c for c in clusters if rx.search(c.name)]
        if query.get("format") == "json":
            return _response(200, _clusters_json(clusters), _JSON)
        return _response(200, _clusters_text(clusters))

    def _listeners_handler(self, method: str, query: dict[str, str]) -> Response:
        """``name::address`` lines, or ``envoy.admin.v3.Listeners`` JSON."""
        listeners = self._listeners() if self._listeners is not None else []
        if query.get("format") == "json":
            msg = listeners_pb2.Listeners()
            for name, host, port in listeners:
                st = msg.listener_statuses.add(name=name)
                st.local_address.socket_address.address = host
                st.local_address.socket_address.port_value = port
            body: str = json_format.MessageToJson(msg, indent=1, preserving_proto_field_name=True)
            return _response(200, body, _JSON)
        lines = [f"{name}::{f'[{host}]' if ':' in host else host}:{port}\n" for name, host, port in listeners]
        return _response(200, "".join(lines))

    def _config_dump_handler(self, method: str, query: dict[str, str]) -> Response:
        dump = self._config_dump() if self._config_dump is not None else {"configs": []}
        if isinstance(dump, Message):
            body = json_format.MessageToJson(dump, indent=1, preserving_proto_field_name=True)
        else:
            body = json.dumps(dump, indent=1)
        return _response(200, body, _JSON)

    def _quit(self, method: str, query: dict[str, str]) -> Response:
        if self._shutdown is not None:
            self._shutdown()
        return _response(200, "OK\n")

    def _logging(self, method: str, query: dict[str, str]) -> Response:
        """Envoy's LogsHandler: ``level=``, ``paths=a:l,b:l`` or ``<name>=<level>``, then the list."""
        error = _change_log_levels(query)
        body = ""
        if error:
            body = f"error: {error}\n\n" + _LOGGING_USAGE
        body += "active loggers:\n" + "".join(f"  {n}: {lvl}\n" for n, lvl in log.active_loggers()) + "\n"
        return _response(400 if error else 200, body)

    def _help(self, method: str, query: dict[str, str]) -> Response:
        return _response(200, "admin commands are:\n" + _help_text())


_BUCKETS_USAGE = "usage: /stats?histogram_buckets=(cumulative|disjoint|detailed|summary|prometheusnative)\n"

_LOGGING_USAGE = (
    "usage: /logging?<name>=<level> (change single level)\n"
    "usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n"
    "usage: /logging?level=<level> (change all levels)\n"
    "usage: /logging?group=<group_name>:<level> (change group of loggers)\n"
    "levels: trace debug info warning error critical off \n"
)


def _change_log_levels(query: dict[str, str]) -> str:
    """Apply a /logging query; returns Envoy's error text, or "" on success (or no change)."""
    if not query:
        return ""
    if len(query) > 1:
        return "invalid number of parameters"
    (key, value), = query.items()
    if key == "level":
        pairs = None
    elif key == "paths":
        pairs = [item.partition(":")[::2] for item in value.split(",") if item]
    else:
        pairs = [(key, value)]
    try:
        if pairs is None:
            log.set_log_level(value)
            return ""
        for name, level in pairs:
            log.parse_level(level)
            if name not in dict(log.active_loggers()):
                return "unknown logger name"
        for name, level in pairs:
            log.set_logger_level(name, level)
    except ValueError:
        return "unknown logger level"
    return ""


def _parse_query(query: str) -> dict[str, str]:
    """Envoy's query parsing: percent-decoding only, so ``+`` in a regex stays a ``+``."""
    out: dict[str, str] = {}
    for part in query.split("&"):
        if part:
            key, _, value = part.partition("=")
            out[unquote(key)] = unquote(value)
    return out


def _response(status: int, body: str, content_type: str = _TEXT) -> Response:
    headers = [
        ("content-type", content_type),
        ("cache-control", "no-cache, max-age=0"),
        ("x-content-type-options", "nosniff"),
    ]
    return status, headers, body.encode()


def _fmt_rate(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _clusters_text(clusters: list[ClusterStatus]) -> str:
    lines: list[str] = []
    for c in clusters:
        lines.append(f"{c.name}::observability_name::{c.observability_name or c.name}")
        for prio, thresholds in (("default_priority", c.default_priority), ("high_priority", c.high_priority)):
            lines.extend(f"{c.name}::{prio}::{k}::{thresholds[k]}" for k in _THRESHOLDS)
        lines.append(f"{c.name}::added_via_api::{str(c.added_via_api).lower()}")
        for h in c.hosts:
            p = f"{c.name}::{h.address}"
            lines.extend(f"{p}::{s}::{h.stats.get(s, 0)}" for s in sorted((*_HOST_COUNTERS, *_HOST_GAUGES)))
            lines += [
                f"{p}::hostname::{h.hostname}",
                f"{p}::health_flags::{h.health_flags}",
                f"{p}::weight::{h.weight}",
                f"{p}::region::{h.region}",
                f"{p}::zone::{h.zone}",
                f"{p}::sub_zone::{h.sub_zone}",
                f"{p}::canary::{str(h.canary).lower()}",
                f"{p}::priority::{h.priority}",
                f"{p}::success_rate::{_fmt_rate(h.success_rate)}",
                f"{p}::local_origin_success_rate::{_fmt_rate(h.local_origin_success_rate)}",
            ]
    return "".join(line + "\n" for line in lines)


def _clusters_json(clusters: list[ClusterStatus]) -> str:
    """``envoy.admin.v3.Clusters`` as Envoy prints it (proto JSON, zero values omitted)."""
    msg = clusters_pb2.Clusters()
    for c in clusters:
        cs = msg.cluster_statuses.add(name=c.name, added_via_api=c.added_via_api,
                                      observability_name=c.observability_name or c.name)
        for prio, thresholds in (("DEFAULT", c.default_priority), ("HIGH", c.high_priority)):
            t = cs.circuit_breakers.thresholds.add()
            t.priority = prio
            for k in _THRESHOLDS:
                getattr(t, k).value = thresholds[k]
        for h in c.hosts:
            hs = cs.host_statuses.add(hostname=h.hostname, weight=h.weight, priority=h.priority)
            host, _, port = h.address.rpartition(":")
            hs.address.socket_address.address = host.strip("[]")
            hs.address.socket_address.port_value = int(port)
            for s in _HOST_COUNTERS:
                hs.stats.add(name=s, value=h.stats.get(s, 0))
            for s in _HOST_GAUGES:
                hs.stats.add(name=s, value=h.stats.get(s, 0), type="GAUGE")
            hs.health_status.eds_health_status = "HEALTHY" if h.health_flags == "healthy" else "UNHEALTHY"
            hs.locality.region, hs.locality.zone, hs.locality.sub_zone = h.region, h.zone, h.sub_zone
            if h.success_rate >= 0:
                hs.success_rate.value = h.success_rate
            if h.local_origin_success_rate >= 0:
                hs.local_origin_success_rate.value = h.local_origin_success_rate
    body: str = json_format.MessageToJson(msg, indent=1, preserving_proto_field_name=True)
    return body
