"""HttpConnectionManager: Envoy's HTTP/1.1 connection manager on a worker's Dispatcher.

Three layers, as in Envoy's source/common/http/conn_manager_impl.cc:

* `HttpConnectionManagerConfig` is built once on the main thread from the
  `envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager`
  proto and is immutable (shared by every worker);
* `ConnectionManager` is the asyncio Protocol of one downstream connection: thin glue
  between the transport and the sans-IO `ServerCodec` (uvicorn's httptools_impl style),
  owning keep-alive, flow control, the connection idle timer and drain/close;
* `ActiveStream` is one request/response: the HCM's own request checks and header
  mutations, the stream timers, stats, and the `FilterManager` running the filter chain.

HTTP/1 has one active stream per connection; pipelined requests wait in the codec.
Everything here runs on the connection's worker dispatcher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import os
import random
import re
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..log import get_logger
from ..overload import DownstreamConnectionLimit, overflow_counter
from .codec import CodecError, ServerCodec, reason_phrase
from .filter import AccessLogHandler, FilterFactoryCb
from .filter_manager import DEFAULT_BUFFER_LIMIT, FilterManager
from .headers import HeaderMap
from .stream_info import Address, ConnectionInfo, StreamInfo

if TYPE_CHECKING:
    from ..event.dispatcher import Dispatcher, Timer

__all__ = [
    "HttpConnectionManagerConfig",
    "HcmFactory",
    "HcmFactoryContext",
    "ConnectionManager",
    "ActiveStream",
    "create_hcm_factory",
]

_log = get_logger("http")

# StreamInfo::ResponseCodeDetails the HCM itself produces.
DETAILS_MISSING_HOST = "missing_host_header"
DETAILS_UPGRADE_FAILED = "upgrade_failed"
DETAILS_ABSOLUTE_PATH = "absolute_path"
DETAILS_PATH_NORMALIZATION_FAILED = "path_normalization_failed"
DETAILS_DOWNSTREAM_REMOTE_DISCONNECT = "downstream_remote_disconnect"
DETAILS_STREAM_IDLE_TIMEOUT = "stream_idle_timeout"
DETAILS_REQUEST_OVERALL_TIMEOUT = "request_overall_timeout"
DETAILS_REQUEST_HEADER_TIMEOUT = "request_header_timeout"

# Envoy's defaults (HttpConnectionManager proto docs).
DEFAULT_IDLE_TIMEOUT_MS = 3_600_000
DEFAULT_STREAM_IDLE_TIMEOUT_MS = 300_000
DEFAULT_DELAYED_CLOSE_TIMEOUT_MS = 1000
DEFAULT_DRAIN_TIMEOUT_MS = 5000
# Envoy's HTTP/1 codec flood protection: a request is refused while this many responses wait,
# unwritten, in the connection's output ("Too many responses queued").
MAX_OUTBOUND_RESPONSES = 2

# x-envoy-* control headers ConnectionManagerUtility::cleanInternalHeaders strips from a request
# that is not internal. Envoy 1.40's default internal_address_config trusts no address, so that is
# every downstream request; trusted senders (the AsyncClient) are not downstream requests.
_EXTERNAL_CONTROL_HEADERS = frozenset((
    "x-envoy-expected-rq-timeout-ms", "x-envoy-force-trace", "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal", "x-envoy-ip-tags", "x-envoy-max-retries", "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes", "x-envoy-retry-grpc-on", "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response", "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
))
# What an edge request (use_remote_address, not internal) loses besides.
_EDGE_ONLY_HEADERS = frozenset((
    "x-envoy-decorator-operation", "x-envoy-downstream-service-cluster", "x-envoy-downstream-service-node",
    "x-envoy-original-path",
))

# ServerHeaderTransformation enum values.
_OVERWRITE, _APPEND_IF_ABSENT, _PASS_THROUGH = 0, 1, 2

# Every stat Envoy's HCM declares for HTTP/1 (all exist from the start, as in Envoy's /stats).
_COUNTERS = (
    "downstream_cx_total", "downstream_cx_http1_total", "downstream_cx_destroy", "downstream_cx_destroy_local",
    "downstream_cx_destroy_remote", "downstream_cx_destroy_active_rq", "downstream_cx_destroy_local_active_rq",
    "downstream_cx_destroy_remote_active_rq", "downstream_cx_rx_bytes_total", "downstream_cx_tx_bytes_total",
    "downstream_cx_protocol_error", "downstream_cx_idle_timeout", "downstream_cx_drain_close",
    "downstream_cx_delayed_close_timeout", "downstream_flow_control_paused_reading_total",
    "downstream_flow_control_resumed_reading_total", "downstream_rq_total", "downstream_rq_http1_total",
    "downstream_rq_1xx", "downstream_rq_2xx", "downstream_rq_3xx", "downstream_rq_4xx", "downstream_rq_5xx",
    "downstream_rq_completed", "downstream_rq_timeout", "downstream_rq_idle_timeout", "downstream_rq_too_large",
    "rs_too_large", "downstream_rq_response_before_rq_complete", "downstream_rq_rx_reset", "downstream_rq_tx_reset",
    "downstream_rq_ws_on_non_ws_route", "downstream_rq_non_relative_path",
    "downstream_rq_failed_path_normalization", "downstream_cx_max_requests_reached",
    # Declared by Envoy for other protocols and features; listed (at 0) as Envoy lists them.
    "downstream_cx_http2_total", "downstream_cx_http3_total", "downstream_cx_max_duration_reached",
    "downstream_cx_overload_disable_keepalive", "downstream_cx_ssl_total", "downstream_cx_upgrades_total",
    "downstream_rq_header_timeout", "downstream_rq_http2_total", "downstream_rq_http3_total",
    "downstream_rq_max_duration_reached", "downstream_rq_overload_close", "downstream_rq_redirected_with_normalized_path",
    "downstream_rq_rejected_via_ip_detection", "downstream_rq_too_many_premature_resets",
    "passthrough_internal_redirect_bad_location", "passthrough_internal_redirect_no_route",
    "passthrough_internal_redirect_predicate", "passthrough_internal_redirect_too_many_redirects",
    "passthrough_internal_redirect_unsafe_scheme", "rq_overload_local_reply", "tracing.client_enabled",
    "tracing.health_check", "tracing.not_traceable", "tracing.random_sampling", "tracing.service_forced",
)
_GAUGES = ("downstream_cx_active", "downstream_cx_http1_active", "downstream_rq_active",
           "downstream_cx_rx_bytes_buffered", "downstream_cx_tx_bytes_buffered", "downstream_cx_http1_soft_drain",
           "downstream_cx_http2_active", "downstream_cx_http3_active", "downstream_cx_ssl_active",
           "downstream_cx_upgrades_active")


class HcmFactoryContext(Protocol):
    """What `create_hcm_factory` reads from the integrator's context (main thread, config time).

    * `cluster_manager.has_cluster(name) -> bool`: the route table's validate_clusters check
      (skipped when `cluster_manager` is None);
    * `listener_name`: copied into every stream's StreamInfo.
    The same object is handed, unchanged, to every HTTP filter factory and access logger
    factory, which may read more from it (wasmproxy.server_context.FactoryContext).
    """

    cluster_manager: Any
    listener_name: str


class HttpConnectionManagerConfig:
    """The immutable HCM configuration shared by all workers (built on main)."""

    def __init__(self) -> None:
        self.stat_prefix = ""
        self.route_config: Any = None  # wasmproxy.router.config.RouteConfig
        self.filter_factories: list[FilterFactoryCb] = []
        self.access_logs: list[AccessLogHandler] = []
        self.use_remote_address = False
        self.skip_xff_append = False
        self.xff_num_trusted_hops = 0
        self.generate_request_id = True
        self.preserve_external_request_id = False
        self.always_set_request_id_in_response = False
        self.server_name = "envoy"
        self.server_header_transformation = _OVERWRITE
        self.via = ""
        self.proxy_100_continue = False
        self.idle_timeout_ms = DEFAULT_IDLE_TIMEOUT_MS
        self.stream_idle_timeout_ms = DEFAULT_STREAM_IDLE_TIMEOUT_MS
        self.request_timeout_ms = 0
        self.request_headers_timeout_ms = 0
        self.delayed_close_timeout_ms = DEFAULT_DELAYED_CLOSE_TIMEOUT_MS
        self.drain_timeout_ms = DEFAULT_DRAIN_TIMEOUT_MS
        self.max_request_headers_kb = 60
        self.max_headers_count = 100
        self.accept_http_10 = False
        self.default_host_for_http_10 = ""
        self.enable_trailers = False
        self.headers_with_underscores_action = 0  # ALLOW
        self.normalize_path = False
        self.merge_slashes = False
        self.strip_any_host_port = False
        self.strip_matching_host_port = False
        # internal_address_config.cidr_ranges (ipaddress networks); empty: no address is internal.
        self.internal_networks: tuple[Any, ...] = ()
        self.buffer_limit = DEFAULT_BUFFER_LIMIT
        self.max_requests_per_connection = 0  # 0: unlimited

    @classmethod
    def from_proto(cls, proto: Any, factory_context: Any) -> "HttpConnectionManagerConfig":
        """Build from the HttpConnectionManager message; ConfigError names the offending field."""
        from ..config import registry
        from ..config.errors import ConfigError

        self = cls()
        self.stat_prefix = proto.stat_prefix
        if proto.HasField("rds") or proto.HasField("scoped_routes"):
            raise ConfigError("RDS and scoped routes are not supported: use route_config", "rds")
        from ..router.config import RouteConfig, RouteConfigError

        cluster_manager = getattr(factory_context, "cluster_manager", None)
        cluster_exists = cluster_manager.has_cluster if cluster_manager is not None else None
        try:
            self.route_config = RouteConfig.from_proto(proto.route_config, cluster_exists)
        except RouteConfigError as e:
            raise ConfigError(str(e), "route_config") from None
        extras = getattr(factory_context, "extras", None)
        if isinstance(extras, dict):
            # The router names its http.<stat_prefix>.* stats (rq_total, no_route, ...) after this
            # HCM; other keys in extras belong to others, so the dict is updated, never replaced.
            extras["http_stat_prefix"] = proto.stat_prefix
        self.filter_factories = _http_filter_factories(proto, factory_context, registry, ConfigError)
        for i, log_proto in enumerate(proto.access_log):
            path = f"access_log[{i}]"
            factory = registry.resolve(registry.Category.ACCESS_LOGGERS, log_proto.typed_config)
            try:
                self.access_logs.append(factory(log_proto, factory_context))
            except ConfigError as e:
                raise ConfigError(e.message, f"{path}.{e.path}" if e.path else path) from None
        if proto.HasField("use_remote_address"):
            self.use_remote_address = proto.use_remote_address.value
        self.skip_xff_append = proto.skip_xff_append
        self.xff_num_trusted_hops = proto.xff_num_trusted_hops
        if proto.HasField("generate_request_id"):
            self.generate_request_id = proto.generate_request_id.value
        self.preserve_external_request_id = proto.preserve_external_request_id
        self.always_set_request_id_in_response = proto.always_set_request_id_in_response
        if proto.server_name:
            self.server_name = proto.server_name
        self.server_header_transformation = proto.server_header_transformation
        self.via = proto.via
        self.proxy_100_continue = proto.proxy_100_continue
        common = proto.common_http_protocol_options
        if proto.HasField("common_http_protocol_options"):
            if common.HasField("idle_timeout"):
                self.idle_timeout_ms = _ms(common.idle_timeout)
            if common.HasField("max_headers_count"):
                self.max_headers_count = common.max_headers_count.value
            if common.HasField("max_requests_per_connection"):
                self.max_requests_per_connection = common.max_requests_per_connection.value
            self.headers_with_underscores_action = common.headers_with_underscores_action
            for name in ("max_connection_duration", "max_stream_duration"):
                if _is_set(common, name):
                    _log.warning("http_connection_manager %s: field 'common_http_protocol_options.%s' is not "
                                 "supported and is ignored", proto.stat_prefix, name)
        if proto.HasField("stream_idle_timeout"):
            self.stream_idle_timeout_ms = _ms(proto.stream_idle_timeout)
        if proto.HasField("request_timeout"):
            self.request_timeout_ms = _ms(proto.request_timeout)
        if proto.HasField("request_headers_timeout"):
            self.request_headers_timeout_ms = _ms(proto.request_headers_timeout)
        if proto.HasField("delayed_close_timeout"):
            self.delayed_close_timeout_ms = _ms(proto.delayed_close_timeout)
        if proto.HasField("drain_timeout"):
            self.drain_timeout_ms = _ms(proto.drain_timeout)
        if proto.HasField("max_request_headers_kb"):
            self.max_request_headers_kb = proto.max_request_headers_kb.value
        if proto.HasField("http_protocol_options"):
            self.accept_http_10 = proto.http_protocol_options.accept_http_10
            self.default_host_for_http_10 = proto.http_protocol_options.default_host_for_http_10
            self.enable_trailers = proto.http_protocol_options.enable_trailers
        if proto.HasField("normalize_path"):
            self.normalize_path = proto.normalize_path.value
        self.merge_slashes = proto.merge_slashes
        self.strip_any_host_port = proto.strip_any_host_port
        self.strip_matching_host_port = proto.strip_matching_host_port
        self.internal_networks = tuple(
            ipaddress.ip_network(f"{r.address_prefix}/{r.prefix_len.value}", strict=False)
            for r in proto.internal_address_config.cidr_ranges)
        for name in _UNSUPPORTED_FIELDS:
            if _is_set(proto, name):
                _log.warning("http_connection_manager %s: field '%s' is not supported and is ignored",
                             self.stat_prefix, name)
        return self


# Fields that change Envoy's answers but that wasmproxy ignores (with a warning at load).
_UNSUPPORTED_FIELDS = ("local_reply_config", "upgrade_configs", "tracing",
                       "path_with_escaped_slashes_action",
                       "scheme_header_transformation", "early_header_mutation_extensions",
                       "original_ip_detection_extensions", "add_user_agent")


def _is_set(proto: Any, name: str) -> bool:
    try:
        return bool(proto.HasField(name))
    except ValueError:  # repeated or plain scalar: set when non-empty / non-default
        return bool(getattr(proto, name))


def _ms(duration: Any) -> int:
    return int(duration.seconds * 1000 + duration.nanos // 1_000_000)


def _http_filter_factories(
    proto: Any, factory_context: Any, registry: Any, config_error: type
) -> list[FilterFactoryCb]:
    """Resolve http_filters through the registry, with Envoy's terminal-filter checks."""
    filters = [f for f in proto.http_filters if not f.disabled]
    if not proto.http_filters:
        # Envoy adds a router when no HTTP filter is configured.
        factory = registry.resolve(registry.Category.HTTP_FILTERS, "envoy.filters.http.router")
        from envoy.extensions.filters.http.router.v3 import router_pb2

        return [factory(router_pb2.Router(), factory_context)]
    out: list[FilterFactoryCb] = []
    for i, f in enumerate(filters):
        path = f"http_filters[{i}]"
        ext = registry.lookup(registry.Category.HTTP_FILTERS, f.typed_config) if f.HasField("typed_config") else None
        if ext is None:
            if f.is_optional:
                continue
            typed_config = f.typed_config if f.HasField("typed_config") else None
            registry.find(registry.Category.HTTP_FILTERS, f.name, typed_config, f"{path}.typed_config")
        last = i == len(filters) - 1
        if ext.terminal and not last:
            raise config_error(f"Error: terminal filter named {f.name} of type {ext.name} must be the last filter "
                               f"in a http filter chain.", path)
        if last and not ext.terminal:
            raise config_error(f"Error: non-terminal filter named {f.name} of type {ext.name} is the last filter "
                               f"in a http filter chain.", path)
        factory = registry.resolve(registry.Category.HTTP_FILTERS, f.typed_config)
        out.append(factory(registry.unpack(f.typed_config, f"{path}.typed_config"), factory_context))
    return out


class HcmStats:
    """The HCM's stats in one worker's Store (http.<stat_prefix>.*), resolved once per worker."""

    def __init__(self, store: Any, stat_prefix: str) -> None:
        prefix = f"http.{stat_prefix}."
        for name in _COUNTERS:
            setattr(self, name, store.counter(prefix + name))
        for name in _GAUGES:
            setattr(self, name, store.gauge(prefix + name))
        from ..stats.store import Unit

        self.downstream_cx_length_ms = store.histogram(prefix + "downstream_cx_length_ms", Unit.MILLISECONDS)
        self.downstream_rq_time = store.histogram(prefix + "downstream_rq_time", Unit.MILLISECONDS)
        self.rq_by_class = [None, self.downstream_rq_1xx, self.downstream_rq_2xx, self.downstream_rq_3xx,
                            self.downstream_rq_4xx, self.downstream_rq_5xx]
        # Bumped together (as store.inc_each, inline) when a stream starts.
        self.rq_started = (self.downstream_rq_total, self.downstream_rq_http1_total, self.downstream_rq_active)

    # Attributes are set from _COUNTERS/_GAUGES above.
    downstream_cx_total: Any
    downstream_rq_total: Any
    downstream_rq_http1_total: Any
    downstream_rq_active: Any
    downstream_rq_completed: Any
    downstream_rq_1xx: Any
    downstream_rq_2xx: Any
    downstream_rq_3xx: Any
    downstream_rq_4xx: Any
    downstream_rq_5xx: Any


class Http1CodecStats:
    """Envoy's HTTP/1 codec counters, http1.* in the root scope (made with the first connection)."""

    def __init__(self, store: Any) -> None:
        self.dropped_headers_with_underscores = store.counter("http1.dropped_headers_with_underscores")
        self.metadata_not_supported_error = store.counter("http1.metadata_not_supported_error")
        self.requests_rejected_with_underscores_in_headers = store.counter(
            "http1.requests_rejected_with_underscores_in_headers")
        self.response_flood = store.counter("http1.response_flood")


class ListenerHttpStats:
    """Envoy's per-listener HTTP stats: listener.<address>.http.<stat_prefix>.downstream_rq_{1..5}xx
    and downstream_rq_completed."""

    def __init__(self, store: Any, listener_prefix: str, stat_prefix: str, hcm: HcmStats) -> None:
        prefix = f"listener.{listener_prefix}.http.{stat_prefix}."
        self.rq_by_class = [None] + [store.counter(f"{prefix}downstream_rq_{n}xx") for n in range(1, 6)]
        self.downstream_rq_completed = store.counter(prefix + "downstream_rq_completed")
        # Each with the HCM's own counter, bumped together (as store.inc_each, inline).
        self.rq_by_class_with_hcm: list[Any] = [None] + [
            (hcm.rq_by_class[n], self.rq_by_class[n]) for n in range(1, 6)]
        self.rq_completed_with_hcm = (hcm.downstream_rq_completed, self.downstream_rq_completed)


def _listener_stat_prefix(address: Address) -> str:
    """Envoy names a listener's stats after its address with ':' as '_' ("127.0.0.1_10000")."""
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}_{address.port}".replace(":", "_")


class _DateProvider:
    """The `date` header value, formatted at most once per second (Envoy's TlsCachingDateProvider)."""

    __slots__ = ("_second", "_value", "_clock")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._second = -1
        self._value = ""

    def value(self) -> str:
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = formatdate(now, usegmt=True)
        return self._value


class HcmFactory:
    """Returned by `create_hcm_factory`: makes per-worker connection handlers."""

    def __init__(self, config: HttpConnectionManagerConfig, listener_name: str = "") -> None:
        self.config = config
        self.listener_name = listener_name

    def for_worker(self, dispatcher: "Dispatcher", store: Any) -> "WorkerConnectionHandler":
        """On the worker (or before it runs): the asyncio protocol factory for that worker's sockets."""
        return WorkerConnectionHandler(self.config, dispatcher, store, self.listener_name)


def create_hcm_factory(hcm_proto: Any, factory_context: Any) -> HcmFactory:
    """Main thread: validate and build the HCM config (see HcmFactoryContext for factory_context).

    Usage by the integrator, per worker::

        handler = hcm_factory.for_worker(worker_dispatcher, worker_store)
        await worker_dispatcher.loop.create_server(handler, sock=listen_socket)
        ...; handler.drain()        # drain: connection: close on the next response
        ...; handler.close_all()    # shutdown
    """
    config = HttpConnectionManagerConfig.from_proto(hcm_proto, factory_context)
    return HcmFactory(config, getattr(factory_context, "listener_name", ""))


class WorkerConnectionHandler:
    """The HCM on one worker: shared stats, date cache and live connections; calling it makes
    the Protocol for a new connection (it is the asyncio protocol factory)."""

    _connection_ids = itertools.count(1)

    def __init__(self, config: HttpConnectionManagerConfig, dispatcher: "Dispatcher", store: Any,
                 listener_name: str = "") -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.stats = HcmStats(store, config.stat_prefix)
        self.listener_name = listener_name
        self.date = _DateProvider(dispatcher.time_source.system_time)
        self.connections: set[ConnectionManager] = set()
        self._store = store
        self._listener_stats: dict[str, ListenerHttpStats] = {}
        self.draining = False
        self._random = random.Random()
        self.request_ids = _RequestIds()
        self._codec_stats: Http1CodecStats | None = None
        # The process-wide downstream connection limit (overload manager), set by the listener.
        self.connection_limit: DownstreamConnectionLimit | None = None

    def codec_stats(self) -> Http1CodecStats:
        if self._codec_stats is None:
            self._codec_stats = Http1CodecStats(self._store)
        return self._codec_stats

    def __call__(self) -> "ConnectionManager":
        return ConnectionManager(self)

    def listener_stats(self, local_address: Address) -> ListenerHttpStats:
        """The per-listener HTTP stats for connections accepted on `local_address` (cached)."""
        key = _listener_stat_prefix(local_address)
        stats = self._listener_stats.get(key)
        if stats is None:
            stats = self._listener_stats[key] = ListenerHttpStats(self._store, key, self.config.stat_prefix,
                                                                  self.stats)
        return stats

    def next_connection_id(self) -> int:
        return next(WorkerConnectionHandler._connection_ids)

    def next_stream_id(self) -> int:
        """A random 64-bit id, as Envoy's (routing uses it, e.g. to pick a weighted cluster)."""
        return self._random.getrandbits(64)

    def drain(self, close_idle: bool = True) -> None:
        """Start draining: every connection closes after its current response (connection: close);
        idle ones now, or with close_idle=False after their next response (ConnectionManager.start_drain)."""
        self.draining = True
        for conn in list(self.connections):
            conn.start_drain(close_idle)

    def close_all(self) -> None:
        """Shutdown: close every connection now."""
        for conn in list(self.connections):
            conn.close(flush_and_delay=False)


# Drain states (Envoy's DrainState): Draining answers with connection: close and becomes Closing
# when drain_timeout ends.
_NOT_DRAINING, _CLOSING, _DRAINING = 0, 1, 2


class ConnectionManager(asyncio.Protocol):
    """One downstream HTTP/1.1 connection (an asyncio Protocol on the worker's loop)."""

    def __init__(self, handler: WorkerConnectionHandler) -> None:
        # Global (per worker).
        self.handler = handler
        self.config = handler.config
        self.dispatcher = handler.dispatcher
        self.stats = handler.stats
        # Per connection.
        self.transport: asyncio.Transport | None = None
        self.connection_info: ConnectionInfo | None = None
        self.codec = ServerCodec(
            self,
            max_request_headers_kb=self.config.max_request_headers_kb,
            max_headers_count=self.config.max_headers_count,
            accept_http_10=self.config.accept_http_10,
            default_host_for_http_10=self.config.default_host_for_http_10,
            enable_trailers=self.config.enable_trailers,
            headers_with_underscores_action=self.config.headers_with_underscores_action,
            stats=handler.codec_stats(),
        )
        self.stream: ActiveStream | None = None
        # The last stream destroyed, until it is released from a fresh event (_release_last_stream).
        self._last_stream: ActiveStream | None = None
        self.drain_state = _CLOSING if handler.draining else _NOT_DRAINING
        self._read_disable_count = 0
        self._out: list[bytes] = []
        self._flush_posted = False
        self._reading = False
        # Pipelined requests of one read are answered before any output is written (as Envoy's
        # redispatch loop in onData); responses completed but not yet written count toward the
        # flood limit.
        self._dispatch_posted = False
        self._outbound_responses = 0
        self._requests = 0
        self._pipelining_disabled = False
        self._write_paused = False
        self._closed = False
        self._idle_timer: Timer | None = None
        self._stream_idle_timer: Timer | None = None  # made for the first stream, then reused
        self._delayed_close_timer: Timer | None = None
        self._drain_timer: Timer | None = None
        self._data_seen = False  # Envoy creates the codec on the first bytes read
        self._connected_at = 0.0
        self._idle_since = 0.0
        self.listener_stats: ListenerHttpStats | None = None
        # The connection limit this connection counts against, released when the socket is gone.
        self._limit: DownstreamConnectionLimit | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        limit = self.handler.connection_limit
        if limit is not None:
            if not limit.try_allocate():
                # Envoy closes the socket before any connection (or HCM stat) exists.
                overflow_counter(self.handler._store, transport.get_extra_info("sockname")).inc()
                self._closed = True
                transport.abort()
                return
            self._limit = limit
        # Envoy's per-connection buffer limit is the high watermark of the write buffer.
        transport.set_write_buffer_limits(high=self.config.buffer_limit, low=self.config.buffer_limit // 2)
        self.connection_info = ConnectionInfo(
            id=self.handler.next_connection_id(),
            local_address=_address(transport.get_extra_info("sockname")),
            remote_address=_address(transport.get_extra_info("peername")),
        )
        self.connection_info.direct_remote_address = self.connection_info.remote_address
        self.listener_stats = self.handler.listener_stats(self.connection_info.local_address)
        self._connected_at = self._idle_since = self.dispatcher.time_source.monotonic()
        self.handler.connections.add(self)
        stats = self.stats
        stats.downstream_cx_total.inc()
        stats.downstream_cx_http1_total.inc()
        stats.downstream_cx_active.inc()
        stats.downstream_cx_http1_active.inc()
        if self.config.idle_timeout_ms > 0:
            self._idle_timer = self.dispatcher.create_timer(self._on_idle_timeout)
            self._idle_timer.enable_timer(self.config.idle_timeout_ms)

    def data_received(self, data: bytes) -> None:
        counter = self.stats.downstream_cx_rx_bytes_total  # Counter.inc, inline
        counter.value += len(data)
        counter.used = True
        if self._closed:
            return
        self._data_seen = True
        self._reading = True
        try:
            self.codec.feed(data)
        except Exception:
            # A bug in a filter must not leave the connection hanging: log it and close.
            _log.exception("[C%s] unhandled error while decoding; closing", self._conn_id())
            self.close()
            return
        finally:
            self._reading = False
            if self._out or self._outbound_responses:  # else _flush has nothing to do
                self._flush()
        if self._last_stream is not None:  # a stream ended in this read
            self._release_last_stream()
        if self.codec.has_pending_events != self._pipelining_disabled:  # else nothing to apply
            self._apply_pipelining_backpressure()

    @property
    def closed(self) -> bool:
        """True once the connection is closing (its socket may linger for a delayed close)."""
        return self._closed

    def _conn_id(self) -> int:
        return self.connection_info.id if self.connection_info is not None else 0

    def eof_received(self) -> bool | None:
        # The client half-closed: Envoy treats it as a remote close for HTTP/1 (returning None
        # lets the transport close; after our own delayed close this ends it early).
        self._on_remote_close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._limit is not None:
            self._limit.release()
            self._limit = None
        if self._delayed_close_timer is not None:
            self._delayed_close_timer.disable_timer()
        if not self._closed:
            self._on_remote_close()

    def pause_writing(self) -> None:
        """The socket's write buffer is above the high watermark: tell the stream's filters."""
        self._write_paused = True
        if self.stream is not None:
            self.stream.on_above_write_buffer_high_watermark()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.stream is not None:
            self.stream.on_below_write_buffer_low_watermark()

    # -- ServerCodec callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closed:
            return
        if self._outbound_responses >= MAX_OUTBOUND_RESPONSES:
            # Envoy's doFloodProtectionChecks: a codec error without a reply; what is queued
            # is still written, then the connection closes.
            _log.debug("[C%s] too many responses queued; closing", self._conn_id())
            self.handler.codec_stats().response_flood.inc()
            self.stats.downstream_cx_protocol_error.inc()
            self.close()
            return
        self._requests += 1
        limit = self.config.max_requests_per_connection
        if limit and self._requests >= limit and self.drain_state == _NOT_DRAINING:
            # The last request this connection may carry: answer it with connection: close.
            self.stats.downstream_cx_max_requests_reached.inc()
            self.drain_state = _CLOSING
        if self._last_stream is not None:
            self._release_last_stream()
        self.stream = ActiveStream(self)

    def on_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        if self.stream is not None:
            self.stream.decode_headers(headers, end_stream)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        if self.stream is not None:
            self.stream.decode_data(data, end_stream)

    def on_trailers(self, trailers: HeaderMap) -> None:
        if self.stream is not None:
            self.stream.decode_trailers(trailers)

    def on_codec_error(self, error: CodecError) -> None:
        """A protocol error: Envoy's local reply (if a response can still be sent), then close."""
        _log.debug("[C%s] dispatch error: %s", self._conn_id(), error)
        self.stats.downstream_cx_protocol_error.inc()
        self.drain_state = _CLOSING
        stream = self.stream
        if stream is None:
            # As Envoy's sendProtocolError: a stream exists to carry the reply and the access log.
            stream = self.stream = ActiveStream(self)
        stream.on_codec_error(error)
        self.close()

    # -- flow control ---------------------------------------------------------------------

    def read_disable(self, disable: bool) -> None:
        """Envoy's readDisable with its counting semantics: reading resumes at zero."""
        if self.transport is None or self._closed:
            return
        if disable:
            self._read_disable_count += 1
            if self._read_disable_count == 1:
                self.stats.downstream_flow_control_paused_reading_total.inc()
                self.transport.pause_reading()
        elif self._read_disable_count > 0:
            self._read_disable_count -= 1
            if self._read_disable_count == 0:
                self.stats.downstream_flow_control_resumed_reading_total.inc()
                self.transport.resume_reading()

    def _apply_pipelining_backpressure(self) -> None:
        # Stop reading while parsed requests wait for the current response (Envoy does the same).
        pending = self.codec.has_pending_events
        if pending != self._pipelining_disabled:
            self._pipelining_disabled = pending
            self.read_disable(pending)

    # -- writing and closing --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes for the socket. They go out in one write when the current event is done
        (like Envoy's connection write buffer), so a response's headers and body share a syscall."""
        if data and self.transport is not None and not self._closed:
            counter = self.stats.downstream_cx_tx_bytes_total  # Counter.inc, inline
            counter.value += len(data)
            counter.used = True
            self._out.append(data)
            if not self._flush_posted and not self._reading:
                self._flush_posted = True
                try:
                    self.dispatcher.post(self._flush_and_release)
                except RuntimeError:  # the dispatcher has exited: write now
                    self._flush()

    def on_response_encoded(self) -> None:
        """A response was encoded completely; it stays queued until the output is written."""
        self._outbound_responses += 1

    def _flush_and_release(self) -> None:
        """The flush write() posts; a stream that ended since (the usual case) is released after."""
        self._flush()
        last = self._last_stream
        if last is not None:  # _release_last_stream(), inline: most responses end before this
            self._last_stream = None
            last.release()

    def _release_last_stream(self) -> None:
        """Release the stream destroyed last (ActiveStream.release). Only from a fresh event (a
        read, a posted callback, the next stream's start): never while the stream may be on the stack."""
        last, self._last_stream = self._last_stream, None
        if last is not None:
            last.release()

    def _flush(self) -> None:
        self._flush_posted = False
        if self._dispatch_posted:
            return  # more requests of this read come first (written once they are answered)
        self._outbound_responses = 0
        out = self._out
        if out and self.transport is not None:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.transport.write(data)

    def start_drain(self, close_idle: bool = True) -> None:
        """Close after the current response (with connection: close), or now when idle; with
        close_idle=False an idle connection closes after its next response instead (a listener
        drained by a reload: a client that just connected or reuses the connection is answered)."""
        if self.drain_state != _CLOSING:
            self.drain_state = _CLOSING
            self.stats.downstream_cx_drain_close.inc()
        if self.stream is None and close_idle:
            self.close()

    def close(self, flush_and_delay: bool = True) -> None:
        """Local close, by default Envoy's FlushWriteAndDelay: what was written is flushed and the
        peer gets delayed_close_timeout to close first (its late bytes are read and dropped), so a
        client still sending a body reads our reply instead of a reset."""
        if self._closed:
            return
        self.stats.downstream_cx_destroy_local.inc()
        if self.stream is not None:
            self.stats.downstream_cx_destroy_local_active_rq.inc()
        self._teardown()
        self._dispatch_posted = False
        self._flush()
        transport = self.transport
        if transport is None:
            return
        delay_ms = self.config.delayed_close_timeout_ms
        if not flush_and_delay or delay_ms <= 0:
            transport.close()
            return
        if self._read_disable_count:
            self._read_disable_count = 0
            transport.resume_reading()  # to see the peer's FIN
        self._delayed_close_timer = self.dispatcher.create_timer(self._on_delayed_close_timeout)
        self._delayed_close_timer.enable_timer(delay_ms)

    def _on_delayed_close_timeout(self) -> None:
        self.stats.downstream_cx_delayed_close_timeout.inc()
        if self.transport is not None:
            self.transport.close()

    def _on_remote_close(self) -> None:
        if self._closed:
            return
        self.stats.downstream_cx_destroy_remote.inc()
        if self.stream is not None:
            self.stats.downstream_cx_destroy_remote_active_rq.inc()
        self._teardown(remote=True)
        if self.transport is not None:
            self.transport.close()

    def _teardown(self, remote: bool = False) -> None:
        self._closed = True
        stats = self.stats
        stats.downstream_cx_destroy.inc()
        if self.stream is not None:
            stats.downstream_cx_destroy_active_rq.inc()
            self.stream.on_connection_reset(remote)
        stats.downstream_cx_active.dec()
        stats.downstream_cx_http1_active.dec()
        stats.downstream_cx_length_ms.record((self.dispatcher.time_source.monotonic() - self._connected_at) * 1000)
        if self._idle_timer is not None:
            self._idle_timer.disable_timer()
        if self._drain_timer is not None:
            self._drain_timer.disable_timer()
        if self._stream_idle_timer is not None:
            self._stream_idle_timer.disable_timer()
        self.handler.connections.discard(self)

    def _on_idle_timeout(self) -> None:
        # Armed once and checked when it fires (cheaper than re-arming per request): the
        # connection is idle only without a stream, for idle_timeout since the last one ended.
        timeout_ms = self.config.idle_timeout_ms
        if self.stream is not None:
            remaining_ms = float(timeout_ms)
        else:
            idle_ms = (self.dispatcher.time_source.monotonic() - self._idle_since) * 1000
            remaining_ms = timeout_ms - idle_ms
        if remaining_ms > 0:
            assert self._idle_timer is not None
            self._idle_timer.enable_timer(remaining_ms)
            return
        self.stats.downstream_cx_idle_timeout.inc()
        if not self._data_seen:
            # No codec yet: nothing was written, so no delayed close either (Envoy's FlushWrite).
            self.close(flush_and_delay=False)
        elif self.drain_state == _NOT_DRAINING:
            # Envoy's startDrainSequence: keep serving (with connection: close) for drain_timeout.
            self.drain_state = _DRAINING
            self._drain_timer = self.dispatcher.create_timer(self._on_drain_timeout)
            self._drain_timer.enable_timer(self.config.drain_timeout_ms)

    def _on_drain_timeout(self) -> None:
        self.drain_state = _CLOSING
        if self.stream is None:
            self.close()

    def stream_idle_timer(self) -> "Timer":
        """The streams' idle timer: HTTP/1 has one stream at a time, so one Timer serves them all
        (each enables it and disables it when destroyed), and a Timer re-armed after a disable
        keeps its loop timer (event.Timer) instead of a new one per request."""
        timer = self._stream_idle_timer
        if timer is None:
            timer = self._stream_idle_timer = self.dispatcher.create_timer(self._on_stream_idle_timeout)
        return timer

    def _on_stream_idle_timeout(self) -> None:
        if self.stream is not None:  # the stream that enabled it (a destroyed one disabled it)
            self.stream._on_idle_timeout()

    # -- stream completion ----------------------------------------------------------------

    def on_stream_destroyed(self, stream: "ActiveStream", now: float | None = None) -> None:
        """doDeferredStreamDestroy's tail: idle timer, then the next pipelined request or close."""
        if self.stream is not stream:
            return
        self.stream = None
        self._last_stream = stream  # released from the next fresh event (_release_last_stream)
        if self._closed:
            return
        if self.drain_state == _CLOSING:
            # An HTTP/1.0 body without a length ends at close: no delay then (Envoy's http_10_sans_cl).
            self.close(flush_and_delay=not stream.framed_by_close)
            return
        # `now`: the clock as the stream read it when it was destroyed, a moment ago.
        self._idle_since = self.dispatcher.time_source.monotonic() if now is None else now
        if self._flush_posted and not self.codec.has_pending_events:
            # Nothing parsed waits, so resuming the codec only readies it for the next request;
            # no need to post it (the posted flush shows the dispatcher has not exited).
            self.codec.resume()
            # Nothing was queued, so the resume delivered nothing and still nothing is pending:
            # _apply_pipelining_backpressure() has something to do only if reading was paused.
            if self._pipelining_disabled:
                self._apply_pipelining_backpressure()
            return
        # The next pipelined request starts from a fresh event, never inside this response's
        # call stack (Envoy redispatches from the read path too).
        try:
            self.dispatcher.post(self._dispatch_next_request)
            self._dispatch_posted = self.codec.has_pending_request
        except RuntimeError:  # the dispatcher has exited (shutdown): nothing more to serve
            self.close(flush_and_delay=False)

    def _dispatch_next_request(self) -> None:
        self._dispatch_posted = False
        if self._closed or self.stream is not None:
            self._flush()
            return
        self._reading = True
        try:
            self.codec.resume()
        finally:
            self._reading = False
            self._flush()
        self._apply_pipelining_backpressure()


def _address(sockaddr: Any) -> Address:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return Address(str(sockaddr[0]), int(sockaddr[1]))
    return Address(str(sockaddr or ""), 0)


_local_address_cache: list[str] = []


def _local_address() -> str:
    """Envoy's LocalInfo address (Network::Utility::getLocalAddress for IPv4): the first non-loopback
    IPv4 address of an interface that is up, else 127.0.0.1. use_remote_address appends it to
    x-forwarded-for instead of a loopback client's address. Looked up once per process."""
    if not _local_address_cache:
        _local_address_cache.append(_first_interface_ipv4() or "127.0.0.1")
    return _local_address_cache[0]


def _first_interface_ipv4() -> str | None:
    import fcntl
    import socket
    import struct

    siocgifaddr = 0x8915  # Linux ioctl: an interface's IPv4 address
    try:
        interfaces = socket.if_nameindex()
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in sorted(interfaces):
            try:
                packed = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address, or not a Linux ioctl
                continue
            address = socket.inet_ntoa(packed[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                return address
    return None


_ESCAPED_UNRESERVED = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")


def _normalize_path(path: str, normalize: bool, merge_slashes: bool) -> str:
    """ConnectionManagerUtility::maybeNormalizePath on the path before any query: dot segments
    (also percent-encoded ones) resolved, then runs of slashes merged."""
    end = path.find("?")
    head, rest = (path, "") if end < 0 else (path[:end], path[end:])
    if normalize:
        # As the URL canonicaliser Envoy uses: "\\" is a separator and escaped unreserved
        # characters are plain ones.
        head = _ESCAPED_UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), head.replace("\\", "/"))
        out: list[str] = []
        segments = head.split("/")[1:]
        for i, segment in enumerate(segments):
            # A dot segment may carry ";parameters", which go with it ("/a/..;x/b" is "/b").
            dots = segment.partition(";")[0]
            if dots in (".", ".."):
                if dots == ".." and out:
                    out.pop()
                if i == len(segments) - 1:
                    out.append("")  # "/a/.." is "/" + "a/" resolved: the trailing slash stays
                continue
            out.append(segment)
        head = "/" + "/".join(out)
    if merge_slashes:
        while "//" in head:
            head = head.replace("//", "/")
    return head + rest


def _strip_port_from_host(headers: HeaderMap, listener_port: int | None) -> None:
    """HeaderUtility::stripPortFromHost: drop a numeric port from :authority (any port, or only
    the listener's for strip_matching_host_port); an IPv6 literal keeps its colons."""
    host = headers.get(":authority")
    if not host:
        return
    colon = host.rfind(":")
    if colon < 0 or host.rfind("]") > colon:
        return
    port = host[colon + 1:]
    if not port.isdigit() or (listener_port is not None and int(port) != listener_port):
        return
    headers.set(":authority", host[:colon])


def _last_xff_address(xff: str | None, skip: int = 0) -> tuple[str | None, bool]:
    """Utility::getLastAddressFromXFF: the x-forwarded-for entry `skip` places from the end if it
    is an IP address, and whether the header holds that one entry only."""
    if not xff:
        return None, False
    entries = xff.split(",")
    if skip >= len(entries):
        return None, False
    chosen = entries[len(entries) - 1 - skip].strip()
    try:
        ipaddress.ip_address(chosen)
    except ValueError:
        return None, False
    return chosen, len(entries) == 1


def _in_networks(host: str, networks: tuple[Any, ...]) -> bool:
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _should_close_connection(protocol: str, connection: str | None) -> bool:
    """HeaderUtility::shouldCloseConnection: HTTP/1.1 with close, HTTP/1.0 without keep-alive
    (`connection`: the request's Connection header)."""
    if not connection:
        return protocol == "HTTP/1.0"
    tokens = {t.strip().lower() for t in connection.split(",")}
    if protocol == "HTTP/1.0":
        return "keep-alive" not in tokens
    return "close" in tokens


class ActiveStream:
    """One request/response on a connection: Envoy's ConnectionManagerImpl::ActiveStream."""

    # State every stream starts with, at class level (set on the instance when it changes).
    response_started = False
    saw_connection_close = False
    framed_by_close = False
    _codec_saw_local_complete = False
    _filter_chain_created = False
    _destroyed = False
    _cached_route: object | None = None
    _route_cached = False
    _idle_timer: Timer | None = None
    _request_timer: Timer | None = None
    # From the first byte of the request (Envoy creates the stream then) to its last header.
    _request_header_timer: Timer | None = None

    def __init__(self, conn: ConnectionManager) -> None:
        self.conn = conn
        handler = conn.handler
        config = self.config = conn.config
        self.stats = conn.stats
        dispatcher = self.dispatcher = conn.dispatcher
        stream_id = self.stream_id = handler._random.getrandbits(64)  # handler.next_stream_id(), inline
        time_source = dispatcher.time_source
        self._monotonic = time_source.monotonic
        now = time_source.monotonic()
        assert conn.connection_info is not None
        # (connection, start_time, start_monotonic) by position: keyword arguments cost more here.
        info = self.stream_info = StreamInfo(conn.connection_info, time_source.system_time(), now)
        info.listener_name = handler.listener_name
        fm = self.filter_manager = FilterManager(self, dispatcher, info, stream_id, config.buffer_limit)
        if config.proxy_100_continue:
            fm.proxy_100_continue = True
        if config.access_logs:  # as add_access_log_handler for each
            fm.access_log_handlers.extend(config.access_logs)
        self._watermark_callbacks: list[Any] = []
        for counter in self.stats.rq_started:  # inc_each: downstream_rq_total, _http1_total, _active (a gauge)
            counter.value += 1
            counter.used = True
        self._idle_timeout_ms = config.stream_idle_timeout_ms  # a route's idle_timeout overrides it
        self._last_activity = now
        if config.stream_idle_timeout_ms > 0:
            self._idle_timer = conn._stream_idle_timer or conn.stream_idle_timer()
            self._idle_timer.enable_timer(config.stream_idle_timeout_ms)
        if config.request_timeout_ms > 0:
            self._request_timer = dispatcher.create_timer(self._on_request_timeout)
            self._request_timer.enable_timer(config.request_timeout_ms)
        else:
            fm.request_timeout_armed = False  # no disarm_request_timeout() calls to make
        if config.request_headers_timeout_ms > 0:
            self._request_header_timer = dispatcher.create_timer(self._on_request_header_timeout)
            self._request_header_timer.enable_timer(config.request_headers_timeout_ms)

    # -- from the codec ------------------------------------------------------------------

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self._last_activity = self._monotonic()  # _reset_idle_timer, inline
        if self._request_header_timer is not None:
            self._request_header_timer.disable_timer()
        codec = self.conn.codec
        # The request's header names, once: a header most requests lack is looked up only when
        # its name is here. (Nothing below adds one of those before reading it.)
        present = set(headers.first_values)
        connection = headers.get("connection") if "connection" in present else None
        self.stream_info.protocol = codec.protocol
        # _should_close_connection without a Connection header, inline: HTTP/1.0 closes.
        self.saw_connection_close = not codec.keep_alive or (
            _should_close_connection(codec.protocol, connection) if connection else codec.protocol == "HTTP/1.0")
        fm = self.filter_manager
        fm.request_headers = headers
        # Both shape local replies: set them before any can be sent (as Envoy does).
        method = headers.first_values.get(":method")
        fm.is_head_request = method == "HEAD"
        fm.is_grpc_request = "content-type" in present and (headers.get("content-type") or "").startswith(
            "application/grpc")
        if end_stream:
            fm.remote_decode_complete = True
        expect = headers.get("expect") if "expect" in present else None
        if expect is not None and expect.lower() == "100-continue" and not self.config.proxy_100_continue:
            # Envoy answers 100-continue itself, before any check or filter, and drops the header.
            self._charge_1xx()
            self.conn.write(self.conn.codec.encode_100_continue())
            headers.remove("expect")
        if ":authority" not in present:
            # Require host: for HTTP/1.1 the codec turned Host into :authority. Envoy closes too.
            self.conn.drain_state = _CLOSING
            fm.send_local_reply(400, "", None, None, DETAILS_MISSING_HOST)
            return
        path = headers.first_values.get(":path")  # the map's current index: "expect" may be gone
        if path is not None and "#" in path:
            # Envoy rejects a fragment in the request target (path normalization).
            self.stats.downstream_rq_failed_path_normalization.inc()
            self.conn.drain_state = _CLOSING
            fm.send_local_reply(400, "", None, None, DETAILS_PATH_NORMALIZATION_FAILED)
            return
        if path is not None and not path.startswith("/"):
            # Only relative paths at the application layer ("OPTIONS *" included).
            self.stats.downstream_rq_non_relative_path.inc()
            fm.send_local_reply(404, "", None, None, DETAILS_ABSOLUTE_PATH)
            return
        if path is not None and (self.config.normalize_path or self.config.merge_slashes):
            normalized = _normalize_path(path, self.config.normalize_path, self.config.merge_slashes)
            if normalized != path:
                headers.set(":path", normalized)
        if self.config.strip_any_host_port or self.config.strip_matching_host_port:
            listener_port = None if self.config.strip_any_host_port else self.stream_info.connection.local_address.port
            _strip_port_from_host(headers, listener_port)
        upgrade = "upgrade" in present and _is_upgrade(headers.get("upgrade"), connection)
        if method == "CONNECT":
            # Without upgrade_configs a CONNECT never completes as a request: close after the reply.
            self.conn.drain_state = _CLOSING
        self._mutate_request_headers(headers, present, connection)
        # Envoy resolves the route before the upgrade check and the filter chain.
        route_idle_timeout_ms = getattr(self.route(), "idle_timeout_ms", None)
        if route_idle_timeout_ms is not None:
            self._apply_route_idle_timeout(route_idle_timeout_ms)
        if upgrade:
            # No upgrade_configs support: Envoy rejects the upgrade with 403 and closes (the
            # codec saw an upgrade, so the request never completes).
            self.stats.downstream_rq_ws_on_non_ws_route.inc()
            self.conn.drain_state = _CLOSING
            fm.send_local_reply(403, "", None, None, DETAILS_UPGRADE_FAILED)
            return
        self.create_filter_chain()
        fm.decode_headers_from(None, headers, end_stream)  # fm.decode_headers, whose part is done above

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        self._reset_idle_timer()
        self.stream_info.bytes_received += len(data)
        self.filter_manager.decode_data(data, end_stream)

    def decode_trailers(self, trailers: HeaderMap) -> None:
        self._reset_idle_timer()
        self.filter_manager.decode_trailers(trailers)

    def on_codec_error(self, error: CodecError) -> None:
        self.stream_info.add_response_flag("DPE")
        if self.response_started:
            # Too late for a reply; the connection closes when this response ends.
            return
        self.filter_manager.send_local_reply(error.status, reason_phrase(error.status), None, None, error.details)

    def on_connection_reset(self, remote: bool) -> None:
        """The connection went away under this stream."""
        if not self._codec_saw_local_complete:
            self.stats.downstream_rq_rx_reset.inc()
            if remote:
                self.stream_info.add_response_flag("DC")
                self.stream_info.response_code_details = DETAILS_DOWNSTREAM_REMOTE_DISCONNECT
        self.filter_manager.saw_downstream_reset = True
        self._destroy()

    # -- HCM request processing ----------------------------------------------------------

    def _mutate_request_headers(self, headers: HeaderMap, present: set[str], connection: str | None) -> None:
        """ConnectionManagerUtility::mutateRequestHeaders for HTTP/1.

        `present`: the header names the request arrived with (removing one gone since is a
        no-op, and none of those read here is added before it is read); `connection`: its
        Connection header."""
        config = self.config
        if connection is not None:
            for token in connection.split(","):
                name = token.strip().lower()
                if name and name not in ("close", "keep-alive", "upgrade", "te") and not name.startswith(":"):
                    headers.remove(name)  # hop-by-hop headers nominated by Connection
        for name in present & _REQUEST_HOP_BY_HOP:
            headers.remove(name)
        te = headers.get("te") if "te" in present else None
        if te is not None:
            if any(t.strip().lower() == "trailers" for t in te.split(",")):
                headers.set("te", "trailers")
            else:
                headers.remove("te")
        xff = headers.get("x-forwarded-for") if "x-forwarded-for" in present else None
        final_remote: str | None
        from_xff: str | None
        hops = config.xff_num_trusted_hops
        if config.use_remote_address:
            peer = self.stream_info.connection.remote_address.host
            # With trusted proxies in front, the client is the entry they appended.
            from_xff = _last_xff_address(xff, hops - 1)[0] if hops > 0 else None
            final_remote = from_xff or peer
            single_xff_address = xff is None
            if not config.skip_xff_append:
                own = _local_address() if _is_loopback(peer) else peer
                headers.set("x-forwarded-for", f"{xff},{own}" if xff else own)
            headers.set("x-forwarded-proto", headers.first_values.get(":scheme") or "http")
        else:
            from_xff, single_xff_address = _last_xff_address(xff, hops) if xff else (None, False)
            final_remote = from_xff
            if "x-forwarded-proto" not in present or headers.get("x-forwarded-proto") is None:
                headers.add("x-forwarded-proto", headers.first_values.get(":scheme") or "http")
        if from_xff is not None:
            # The stream's downstream remote address (source.address, %DOWNSTREAM_REMOTE_ADDRESS%)
            # is the client x-forwarded-for names, with port 0; the peer stays the direct one.
            self.stream_info.connection = dataclasses.replace(
                self.stream_info.connection, direct_remote_address=Address(from_xff, 0))
        # Internal: one address, inside internal_address_config (Envoy 1.40 trusts none by
        # default). Otherwise the client's x-envoy-* control headers go.
        internal = single_xff_address and final_remote is not None and _in_networks(
            final_remote, config.internal_networks)
        edge_request = not internal and config.use_remote_address
        if internal:
            headers.set("x-envoy-internal", "true")
        else:
            for name in present & _EXTERNAL_CONTROL_HEADERS:
                headers.remove(name)
            for name in getattr(config.route_config, "internal_only_headers", ()):
                headers.remove(name)
        if edge_request:
            for name in present & _EDGE_ONLY_HEADERS:
                headers.remove(name)
            headers.set("x-envoy-external-address", final_remote or "")
        request_id = headers.get("x-request-id") if "x-request-id" in present else None
        if config.generate_request_id and (
            request_id is None or (edge_request and not config.preserve_external_request_id)
        ):
            request_id = self.conn.handler.request_ids.next()
            headers.set("x-request-id", request_id)
        self.stream_info.request_id = request_id or ""

    # -- FilterManagerCallbacks ----------------------------------------------------------

    def _charge_1xx(self) -> None:
        self.stats.downstream_rq_1xx.inc()
        if self.conn.listener_stats is not None:
            self.conn.listener_stats.rq_by_class[1].inc()

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        self._charge_1xx()
        self.conn.write(self.conn.codec.encode_headers(headers, False))

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        """ActiveStream::encodeHeaders: the HCM's response headers, stats, then the codec."""
        now = self._last_activity = self._monotonic()  # _reset_idle_timer, inline
        config = self.config
        conn = self.conn
        present = set(headers.first_values)  # the names the filters let through
        if "date" not in present:
            headers.add("date", conn.handler.date.value())
        if config.server_header_transformation == _OVERWRITE:
            headers.set("server", config.server_name)
        elif config.server_header_transformation == _APPEND_IF_ABSENT:
            headers.set_default("server", config.server_name)
        for name in present & _RESPONSE_HOP_BY_HOP:
            headers.remove(name)
        request_headers = self.filter_manager.request_headers
        if config.always_set_request_id_in_response and request_headers is not None:
            request_id = request_headers.get("x-request-id")
            if request_id is not None:
                headers.set("x-request-id", request_id)
        if config.via:
            via = headers.get("via")
            headers.set("via", f"{via}, {config.via}" if via else config.via)
        if conn.codec.protocol == "HTTP/1.0":
            # HTTP/1.0 cannot chunk: without a length the response is framed by close.
            if headers.get("content-length") is None:
                self.saw_connection_close = True
                self.framed_by_close = True
            if not self.saw_connection_close:
                headers.set("connection", "keep-alive")
        if conn.drain_state == _NOT_DRAINING and self.saw_connection_close:
            conn.drain_state = _CLOSING
        if not self.filter_manager.remote_decode_complete:
            # Answering before the request is in: HTTP/1 cannot reuse the connection.
            conn.drain_state = _CLOSING
            self.stats.downstream_rq_response_before_rq_complete.inc()
        if conn.drain_state != _NOT_DRAINING:
            headers.set("connection", "close")
        status = int(headers.first_values.get(":status") or 0)
        info = self.stream_info
        info.response_code = status
        if 100 <= status < 600:
            listener_stats = conn.listener_stats
            if listener_stats is not None:
                for counter in listener_stats.rq_by_class_with_hcm[status // 100]:  # inc_each, inline
                    counter.value += 1
                    counter.used = True
            else:
                self.stats.rq_by_class[status // 100].inc()
        self.response_started = True
        info.first_downstream_tx = now
        conn.write(conn.codec.encode_headers(headers, end_stream))
        if end_stream:
            self._on_codec_encode_complete(now)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        now = self._last_activity = self._monotonic()  # _reset_idle_timer, inline
        conn = self.conn
        if data:
            self.stream_info.bytes_sent += len(data)
        out = conn.codec.encode_data(data, end_stream)
        if out:  # an empty end of stream (after a content-length body) writes nothing
            conn.write(out)
        if end_stream:
            # _on_codec_encode_complete(now), inline: most responses end here.
            self._codec_saw_local_complete = True
            conn._outbound_responses += 1  # conn.on_response_encoded(), inline
            self.stream_info.last_downstream_tx = now

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self._reset_idle_timer()
        self.conn.write(self.conn.codec.encode_trailers(trailers))
        self._on_codec_encode_complete()

    def _on_codec_encode_complete(self, now: float | None = None) -> None:
        """`now`: the clock as the caller read it a moment ago (for last_downstream_tx)."""
        self._codec_saw_local_complete = True
        self.conn._outbound_responses += 1  # conn.on_response_encoded(), inline
        self.stream_info.last_downstream_tx = self._monotonic() if now is None else now

    def end_stream(self) -> None:
        """doEndStream: reset if the request is still incoming, else destroy; then maybe close."""
        if not self.filter_manager.remote_decode_complete or not self._codec_saw_local_complete:
            # Envoy resets the codec stream here; for HTTP/1 that closes the connection once the
            # reply is flushed, and the reset callback (onResetStream) counts downstream_rq_rx_reset.
            self.conn.drain_state = _CLOSING
            self.stats.downstream_rq_rx_reset.inc()
        self._destroy()

    def reset_stream(self) -> None:
        # Counted by Envoy's codec for the reset it sends, and by onResetStream as for any reset.
        self.stats.downstream_rq_tx_reset.inc()
        self.stats.downstream_rq_rx_reset.inc()
        self.conn.drain_state = _CLOSING
        self._destroy()
        self.conn.close()

    def create_filter_chain(self) -> None:
        if self._filter_chain_created:
            return
        self._filter_chain_created = True
        for factory in self.config.filter_factories:
            factory(self.filter_manager)

    def route(self) -> object | None:
        if not self._route_cached:
            self._route_cached = True
            route_config = self.config.route_config
            headers = self.filter_manager.request_headers
            self._cached_route = None
            if route_config is not None and headers is not None:
                route = self._cached_route = route_config.route(headers, self.stream_id)
                info = self.stream_info
                info.route_name = getattr(route, "name", "") or ""
                info.route_resolved = route is not None
                # refreshCachedRoute: the stream's upstream cluster is known from here on.
                if getattr(route, "action", "") == "route":
                    info.upstream_cluster = route.cluster_name or route.cluster_for(headers, self.stream_id)
        return self._cached_route

    def resolved_route(self) -> object | None:
        """The route if one was resolved already (local replies add its response headers)."""
        return self._cached_route if self._route_cached else None

    def clear_route_cache(self) -> None:
        self._route_cached = False
        self._cached_route = None

    def disarm_request_timeout(self) -> None:
        if self._request_timer is not None:
            self._request_timer.disable_timer()

    def on_request_data_too_large(self) -> None:
        self.stats.downstream_rq_too_large.inc()

    def on_local_reply(self, status: int) -> None:
        """ActiveStream::sendLocalReply: after a 400 an HTTP/1 request may be malformed, so the
        connection closes (stream_error_on_invalid_http_message is not supported: false)."""
        if status == 400:
            self.saw_connection_close = True

    def on_response_data_too_large(self) -> None:
        self.stats.rs_too_large.inc()

    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None:
        self.conn.read_disable(True)

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None:
        self.conn.read_disable(False)

    def on_encoder_filter_above_write_buffer_high_watermark(self) -> None:
        self.on_above_write_buffer_high_watermark()

    def on_encoder_filter_below_write_buffer_low_watermark(self) -> None:
        self.on_below_write_buffer_low_watermark()

    # -- downstream watermarks (the router registers to pause its upstream) ---------------

    def add_downstream_watermark_callbacks(self, callbacks: Any) -> None:
        """`callbacks.on_above_write_buffer_high_watermark()` / `on_below_write_buffer_low_watermark()`."""
        self._watermark_callbacks.append(callbacks)
        if self.conn._write_paused:
            callbacks.on_above_write_buffer_high_watermark()

    def remove_downstream_watermark_callbacks(self, callbacks: Any) -> None:
        if callbacks in self._watermark_callbacks:
            self._watermark_callbacks.remove(callbacks)

    def on_above_write_buffer_high_watermark(self) -> None:
        for cb in list(self._watermark_callbacks):
            cb.on_above_write_buffer_high_watermark()

    def on_below_write_buffer_low_watermark(self) -> None:
        for cb in list(self._watermark_callbacks):
            cb.on_below_write_buffer_low_watermark()

    # -- timers --------------------------------------------------------------------------

    def _reset_idle_timer(self) -> None:
        # Only the activity time is noted; the timer, armed once, re-arms itself when it fires
        # early (cheaper than re-arming on every event). Inline in the per-request callers.
        self._last_activity = self._monotonic()

    def _apply_route_idle_timeout(self, timeout_ms: float) -> None:
        """A route's idle_timeout replaces stream_idle_timeout for this stream; 0 disables it."""
        self._idle_timeout_ms = timeout_ms
        if timeout_ms == 0:
            if self._idle_timer is not None:
                self._idle_timer.disable_timer()
                self._idle_timer = None
            return
        if self._idle_timer is None:
            self._idle_timer = self.conn.stream_idle_timer()
        self._idle_timer.enable_timer(timeout_ms)

    def _timeout_code(self) -> int:
        """Utility::maybeRequestTimeoutCode: 504 once the request is in (we were waiting), else 408."""
        return 504 if self.filter_manager.remote_decode_complete else 408

    def _on_idle_timeout(self) -> None:
        idle_ms = (self._monotonic() - self._last_activity) * 1000
        remaining_ms = self._idle_timeout_ms - idle_ms
        if remaining_ms > 0:
            assert self._idle_timer is not None
            self._idle_timer.enable_timer(remaining_ms)
            return
        self.stats.downstream_rq_idle_timeout.inc()
        self.stream_info.add_response_flag("SI")
        # A local reply, or a reset when response headers already went out.
        self.filter_manager.send_local_reply(self._timeout_code(), "stream timeout", None, None,
                                             DETAILS_STREAM_IDLE_TIMEOUT)

    def _on_request_timeout(self) -> None:
        self.stats.downstream_rq_timeout.inc()
        self.filter_manager.send_local_reply(self._timeout_code(), "request timeout", None, None,
                                             DETAILS_REQUEST_OVERALL_TIMEOUT)

    def _on_request_header_timeout(self) -> None:
        self.stats.downstream_rq_header_timeout.inc()
        self.filter_manager.send_local_reply(408, "request header timeout", None, None,
                                             DETAILS_REQUEST_HEADER_TIMEOUT)

    # -- completion ----------------------------------------------------------------------

    def _destroy(self) -> None:
        """doDeferredStreamDestroy: timers off, access logs, on_destroy, stats; then the connection."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._idle_timer is not None:
            self._idle_timer.disable_timer()
            self._idle_timer = None  # the connection's, from now on for its next stream
        if self._request_timer is not None:
            self._request_timer.disable_timer()
            self._request_timer = None  # its callback is this stream's: no cycle left behind
        if self._request_header_timer is not None:
            self._request_header_timer.disable_timer()
            self._request_header_timer = None
        info = self.stream_info
        fm = self.filter_manager
        if info.response_code is None and fm.response_headers is None:
            info.response_code = 0
        if fm.decoder_above_high_watermark:
            # Whatever held request data above the limit is gone: reading may resume.
            fm.decoder_above_high_watermark = False
            self.conn.read_disable(False)
        if fm.access_log_handlers:  # else log() has nothing to run
            fm.log()
        fm.destroy_filters()
        stats = self.stats
        gauge = stats.downstream_rq_active  # Gauge.dec, inline
        gauge.value -= 1
        gauge.used = True
        listener_stats = self.conn.listener_stats
        if listener_stats is not None:
            for counter in listener_stats.rq_completed_with_hcm:  # inc_each, inline
                counter.value += 1
                counter.used = True
        else:
            stats.downstream_rq_completed.inc()
        now = self._monotonic()
        stats.downstream_rq_time.record((now - info.start_monotonic) * 1000)
        self.conn.on_stream_destroyed(self, now)

    def release(self) -> None:
        """Envoy's deferred delete of the stream, done by the connection from a fresh event
        (never inside this stream's own calls): the filter chain goes, and the link to the filter
        manager (whose callbacks are this stream), so that all of it is freed without the cyclic gc."""
        self.filter_manager.release()
        del self.filter_manager


_REQUEST_HOP_BY_HOP = frozenset(("connection", "upgrade", "keep-alive", "proxy-connection", "transfer-encoding"))
_RESPONSE_HOP_BY_HOP = _REQUEST_HOP_BY_HOP


# The variant nibble of a version 4 UUID (10xx in binary) from a random hex digit's low bits.
_UUID_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


class _RequestIds:
    """Random (version 4) UUID strings, as Envoy's x-request-id. The random bytes come from
    os.urandom in batches (one getrandom syscall per 256 ids). One per worker: not thread-safe."""

    __slots__ = ("_hex", "_pos")

    _BATCH = 256

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0

    def next(self) -> str:
        h, i = self._hex, self._pos
        if i >= len(h):
            h = self._hex = os.urandom(16 * self._BATCH).hex()
            i = 0
        self._pos = i + 32
        # 32 random hex digits; the version digit is 4 and the variant digit one of 8, 9, a, b.
        return (f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-"
                f"{_UUID_VARIANT[h[i + 16]]}{h[i + 17:i + 20]}-{h[i + 20:i + 32]}")


def _is_upgrade(upgrade: str | None, connection: str | None) -> bool:
    """Utility::isUpgrade: Connection has the upgrade token and an Upgrade header is present
    (the request's Upgrade and Connection headers)."""
    if not upgrade or connection is None:
        return False
    return any(t.strip().lower() == "upgrade" for t in connection.split(","))

