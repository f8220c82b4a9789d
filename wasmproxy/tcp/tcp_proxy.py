"""envoy.filters.network.tcp_proxy: proxy a downstream connection's bytes to an upstream host.

Envoy's TcpProxy::Filter (source/common/tcp_proxy/tcp_proxy.cc), the parts a plain TCP proxy
needs: ``cluster`` or ``weighted_clusters``; the cluster's connect timeout with
``max_connect_attempts`` (default 1) before the downstream is closed; reads from downstream
disabled until the upstream connects; half-close both ways; ``idle_timeout`` (default 1 h,
0 disables) and ``max_downstream_connection_duration``; flow control (a side whose peer's
write buffer is above its high watermark stops reading); a downstream that closes first
lets the upstream flush what it was sent (``upstream_flush_*``), unless it reset the
connection: the reset goes on upstream, as Envoy 1.40; access logs at the end.

Stats are Envoy's ``tcp.<stat_prefix>.*`` names; the upstream side keeps ``cluster.<name>.*``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from ..config.errors import ConfigError
from ..config.util import duration_ms
from ..network.connection import ConnectionStats
from ..network.filter import ConnectionCloseType, ConnectionEvent, FilterStatus, NetworkFilterFactoryCb
from .upstream import TcpUpstream

if TYPE_CHECKING:
    from ..network.filter_manager import ActiveReadFilter, FilterManager
    from ..server_context import FactoryContext
    from ..stats.store import Store

__all__ = ["TcpProxyConfig", "TcpProxyFilter", "TcpProxyStats", "create_tcp_proxy_factory"]

_DEFAULT_IDLE_TIMEOUT_MS = 3600 * 1000


class TcpProxyStats:
    """tcp.<stat_prefix>.* on one thread's Store (Envoy's ALL_TCP_PROXY_STATS)."""

    __slots__ = ("downstream_cx_total", "downstream_cx_no_route", "downstream_cx_rx_bytes_total",
                 "downstream_cx_tx_bytes_total", "downstream_flow_control_paused_reading_total",
                 "downstream_flow_control_resumed_reading_total", "idle_timeout",
                 "max_downstream_connection_duration", "upstream_flush_total", "upstream_flush_active",
                 # Envoy's, kept at 0 here (no drain/overload close, early data or route delay).
                 "downstream_cx_drain_close", "downstream_cx_overload_close", "early_data_received_count_total",
                 "route_delayed_total", "downstream_cx_rx_bytes_buffered", "downstream_cx_tx_bytes_buffered")
    _GAUGES = frozenset(("upstream_flush_active", "downstream_cx_rx_bytes_buffered", "downstream_cx_tx_bytes_buffered"))

    def __init__(self, store: "Store", stat_prefix: str) -> None:
        prefix = f"tcp.{stat_prefix}."
        for name in self.__slots__:
            if name in self._GAUGES:
                setattr(self, name, store.gauge(prefix + name))
            else:
                setattr(self, name, store.counter(prefix + name))


class TcpProxyConfig:
    """The TcpProxy proto as the filter reads it; built on main, shared by every worker."""

    def __init__(self, proto: Any, context: "FactoryContext") -> None:
        for unsupported in ("tunneling_config", "on_demand"):
            if proto.HasField(unsupported):
                raise ConfigError(f"tcp_proxy: {unsupported} is not supported by wasmproxy")
        self.stat_prefix = proto.stat_prefix
        self.cluster_manager = context.cluster_manager
        self._store_for = context.store_for
        self._stats: dict[int, TcpProxyStats] = {}
        if context.store_for is not None:
            self.stats(context.main_dispatcher)  # Envoy's stats exist (at 0) from the start
        which = proto.WhichOneof("cluster_specifier")
        if which == "weighted_clusters":
            self.clusters = [(c.name, c.weight) for c in proto.weighted_clusters.clusters]
        elif which == "cluster":
            self.clusters = [(proto.cluster, 1)]
        else:
            raise ConfigError("tcp_proxy: one of cluster or weighted_clusters is required")
        self.total_weight = sum(w for _, w in self.clusters)
        self.idle_timeout_ms = duration_ms(proto, "idle_timeout", _DEFAULT_IDLE_TIMEOUT_MS)
        self.max_connection_duration_ms = duration_ms(proto, "max_downstream_connection_duration", 0)
        self.max_connect_attempts = (proto.max_connect_attempts.value if proto.HasField("max_connect_attempts")
                                     else 1)
        self.access_logs = []
        if proto.access_log:
            from ..http.access_log import create_access_logger

            self.access_logs = [create_access_logger(log, context) for log in proto.access_log]

    def stats(self, dispatcher: Any) -> TcpProxyStats:
        """This thread's stats (one Store per thread; only that thread writes it)."""
        stats = self._stats.get(id(dispatcher))
        if stats is None:
            stats = self._stats[id(dispatcher)] = TcpProxyStats(self._store_for(dispatcher), self.stat_prefix)
        return stats

    def pick_cluster(self) -> str:
        if len(self.clusters) == 1:
            return self.clusters[0][0]
        point = random.randrange(self.total_weight) if self.total_weight > 0 else 0
        for name, weight in self.clusters:
            if point < weight:
                return name
            point -= weight
        return self.clusters[-1][0]


class TcpProxyFilter:
    """One downstream connection's proxy. Read filter and connection callbacks; worker thread only."""

    def __init__(self, config: TcpProxyConfig) -> None:
        self.config = config
        self.read_callbacks: "ActiveReadFilter | None" = None
        self.upstream: TcpUpstream | None = None
        self.connection: Any = None
        self.stats: TcpProxyStats | None = None
        self._attempts = 0
        self._idle_timer: Any = None
        self._duration_timer: Any = None
        self._cluster: Any = None
        self._logged = False

    # -- ReadFilter ---------------------------------------------------------------------------

    def initialize_read_filter_callbacks(self, callbacks: "ActiveReadFilter") -> None:
        self.read_callbacks = callbacks
        connection = self.connection = callbacks.connection
        connection.add_connection_callbacks(self)
        connection.enable_half_close(True)
        self.stats = stats = self.config.stats(connection.dispatcher)
        stats.downstream_cx_total.inc()
        connection.set_connection_stats(ConnectionStats(stats.downstream_cx_rx_bytes_total,
                                                        stats.downstream_cx_tx_bytes_total))

    def on_new_connection(self) -> FilterStatus:
        config, connection = self.config, self.connection
        info = connection.stream_info
        cluster_name = config.pick_cluster()
        info.upstream_cluster = cluster_name
        tlcm = config.cluster_manager.thread_local() if config.cluster_manager is not None else None
        cluster = tlcm.get(cluster_name) if tlcm is not None else None
        if cluster is None:
            self.stats.downstream_cx_no_route.inc()
            self._init_failure("NR")
            return FilterStatus.StopIteration
        self._cluster = cluster
        if config.max_connection_duration_ms > 0:
            self._duration_timer = connection.dispatcher.create_timer(self._on_max_duration)
            self._duration_timer.enable_timer(config.max_connection_duration_ms)
        # Nothing is read from downstream until the upstream is there (Envoy's default).
        connection.read_disable(True)
        self._connect()
        return FilterStatus.StopIteration

    def on_data(self, data: bytearray, end_stream: bool) -> FilterStatus:
        upstream = self.upstream
        if upstream is not None and upstream.state == 1:  # open
            upstream.write(data, end_stream)
            self._reset_idle_timer()
        return FilterStatus.StopIteration

    # -- connecting ---------------------------------------------------------------------------

    def _connect(self) -> None:
        cluster = self._cluster
        host = cluster.choose_host()
        if host is None:
            self._init_failure("UH")
            return
        if not cluster.info.resource_manager.connections.can_create():
            cluster.stats.inc("upstream_cx_overflow")
            self._init_failure("UO")
            return
        self._attempts += 1
        info = self.connection.stream_info
        info.upstream_host = host.address
        self.upstream = TcpUpstream(self, cluster, host, self.connection.dispatcher)
        self.upstream.connect()

    def _init_failure(self, flag: str) -> None:
        self.connection.stream_info.response_flags.append(flag)
        self.connection.close(ConnectionCloseType.NoFlush)

    def on_upstream_connect_failure(self, timeout: bool) -> None:
        self.upstream = None
        if not self.connection.is_open:
            return
        if self._attempts < self.config.max_connect_attempts:
            self._connect()
            return
        self._cluster.stats.inc("upstream_cx_connect_attempts_exceeded")
        self.connection.stream_info.response_flags.append("UF")
        self._init_failure("URX")

    def on_upstream_connected(self) -> None:
        connection = self.connection
        if not connection.is_open:
            if self.upstream is not None:
                self.upstream.close(flush=False)
            return
        if self.config.idle_timeout_ms > 0:
            self._idle_timer = connection.dispatcher.create_timer(self._on_idle_timeout)
            self._reset_idle_timer()
        connection.read_disable(False)
        assert self.read_callbacks is not None
        self.read_callbacks.continue_reading()

    # -- upstream -> downstream ---------------------------------------------------------------

    def on_upstream_data(self, data: bytearray, end_stream: bool) -> None:
        self.connection.write(data, end_stream)
        self._reset_idle_timer()

    def on_upstream_closed(self, remote: bool, reset: bool = False) -> None:
        # Envoy 1.40 passes an upstream reset on as a downstream reset.
        self.connection.close(ConnectionCloseType.Abort if reset else ConnectionCloseType.FlushWrite)

    def on_upstream_flushed(self) -> None:
        assert self.stats is not None
        self.stats.upstream_flush_active.dec()

    def on_upstream_above_write_buffer_high_watermark(self) -> None:
        self._read_disable_downstream(True)

    def on_upstream_below_write_buffer_low_watermark(self) -> None:
        self._read_disable_downstream(False)

    def _read_disable_downstream(self, disable: bool) -> None:
        assert self.stats is not None
        if not self.connection.is_open:
            return
        self.connection.read_disable(disable)
        if disable:
            self.stats.downstream_flow_control_paused_reading_total.inc()
        else:
            self.stats.downstream_flow_control_resumed_reading_total.inc()

    # -- downstream ConnectionCallbacks -------------------------------------------------------

    def on_event(self, event: ConnectionEvent) -> None:
        if event == ConnectionEvent.Connected:
            return
        for timer in (self._idle_timer, self._duration_timer):
            if timer is not None:
                timer.disable_timer()
        self._idle_timer = self._duration_timer = None
        upstream = self.upstream
        if upstream is not None:
            if upstream.state == 0:  # connecting
                upstream.cancel()
            elif event == ConnectionEvent.RemoteClose and self.connection.remote_reset:
                upstream.close(flush=False, reset=True)  # Envoy propagates a downstream reset
            elif event == ConnectionEvent.RemoteClose:
                if upstream.close(flush=True):
                    assert self.stats is not None
                    self.stats.upstream_flush_total.inc()
                    self.stats.upstream_flush_active.inc()
            else:
                upstream.close(flush=False)
        self._log()

    def on_above_write_buffer_high_watermark(self) -> None:
        if self.upstream is not None:
            self.upstream.read_disable(True)
            self._cluster.stats.inc("upstream_flow_control_paused_reading_total")

    def on_below_write_buffer_low_watermark(self) -> None:
        if self.upstream is not None:
            self.upstream.read_disable(False)
            self._cluster.stats.inc("upstream_flow_control_resumed_reading_total")

    # -- timers and logs ----------------------------------------------------------------------

    def _reset_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.enable_timer(self.config.idle_timeout_ms)

    def _on_idle_timeout(self) -> None:
        assert self.stats is not None
        self.stats.idle_timeout.inc()
        self.connection.close(ConnectionCloseType.NoFlush)

    def _on_max_duration(self) -> None:
        assert self.stats is not None
        self.stats.max_downstream_connection_duration.inc()
        self.connection.close(ConnectionCloseType.NoFlush)

    def _log(self) -> None:
        if self._logged or not self.config.access_logs:
            return
        self._logged = True
        info = self.connection.stream_info
        for logger in self.config.access_logs:
            logger.log(None, None, None, info)


def create_tcp_proxy_factory(proto: Any, context: "FactoryContext") -> NetworkFilterFactoryCb:
    """Main thread: envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy -> per-connection factory."""
    config = TcpProxyConfig(proto, context)

    def factory(filter_manager: "FilterManager") -> None:
        filter_manager.add_read_filter(TcpProxyFilter(config))

    return factory
