"""Clusters on the main thread: static info, circuit breakers, and host discovery.

`ClusterInfo` is the immutable part of an envoy.config.cluster.v3.Cluster, shared
by all threads. `Cluster` (STATIC / STRICT_DNS / LOGICAL_DNS) owns the host list on
the main thread and reports every change through `on_hosts_changed(hosts)`; the
ClusterManager then pushes the new host set to workers through a ThreadLocal slot.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
from typing import Any, Awaitable, Callable

from google.protobuf.json_format import MessageToDict

from ..http.stream_info import Address
from .health_checker import HealthCheckConfigError, HealthChecker
from .host import Host
from .outlier_detection import OutlierDetector

DEFAULT_CONNECT_TIMEOUT_MS = 5000
DEFAULT_DNS_REFRESH_MS = 5000
DEFAULT_MAX = 1024
DEFAULT_MAX_RETRIES = 3
DEFAULT_BUFFER_LIMIT = 1024 * 1024
DEFAULT_IDLE_TIMEOUT_MS = 3600 * 1000

LB_POLICIES = {0: "ROUND_ROBIN", 1: "LEAST_REQUEST", 2: "RING_HASH", 3: "RANDOM", 5: "MAGLEV"}
DEFAULT_MIN_RING_SIZE = 1024
_TYPES = {0: "STATIC", 1: "STRICT_DNS", 2: "LOGICAL_DNS"}
# envoy.config.core.v3.HealthStatus values that take a host out of load balancing.
_UNHEALTHY = {2, 3, 4}

Resolver = Callable[[str, int, int], Awaitable[list[str]]]


class ClusterConfigError(ValueError):
    """A cluster wasmproxy cannot run; the message names the cluster."""


class ResourceLimit:
    """One circuit-breaker counter (connections, pending, requests, retries), shared by all workers.

    Lock-free, as Envoy's atomics: the count is the length of a list that inc() appends to and
    dec() pops from, and a list's append and pop are each atomic (one C call under the GIL,
    per-object locked on free-threaded CPython). inc is that bound C call itself, no Python
    frame. A dec() with nothing held (a bug elsewhere) takes the count below 0 as `-= 1` did.
    """

    __slots__ = ("max", "inc", "_held", "_debt", "_lock")

    def __init__(self, max_value: int) -> None:
        self.max = max_value
        self._held: list[None] = []
        self.inc: Callable[[], None] = functools.partial(self._held.append, None)
        self._debt = 0  # decs with nothing held
        self._lock = threading.Lock()  # for _debt only

    @property
    def count(self) -> int:
        return len(self._held) - self._debt

    def can_create(self) -> bool:
        return len(self._held) - self._debt < self.max

    def dec(self) -> None:
        try:
            self._held.pop()
        except IndexError:
            with self._lock:
                self._debt += 1


class ResourceManager:
    """Envoy's ResourceManagerImpl for one priority."""

    def __init__(self, thresholds: Any | None) -> None:
        def limit(field: str, default: int) -> ResourceLimit:
            if thresholds is not None and thresholds.HasField(field):
                return ResourceLimit(getattr(thresholds, field).value)
            return ResourceLimit(default)

        self.connections = limit("max_connections", DEFAULT_MAX)
        self.pending_requests = limit("max_pending_requests", DEFAULT_MAX)
        self.requests = limit("max_requests", DEFAULT_MAX)
        self.retries = limit("max_retries", DEFAULT_MAX_RETRIES)


def _ms(duration: Any) -> int:
    return duration.seconds * 1000 + duration.nanos // 1_000_000


class ClusterInfo:
    """The immutable settings of one cluster (Envoy's ClusterInfoImpl)."""

    def __init__(self, proto: Any) -> None:
        self.name: str = proto.name
        if not self.name:
            raise ClusterConfigError("cluster name must not be empty")
        self.observability_name: str = proto.alt_stat_name or proto.name
        self.stat_prefix = f"cluster.{self.observability_name}."
        kind = proto.WhichOneof("cluster_discovery_type")
        if kind == "cluster_type":
            raise ClusterConfigError(f"cluster '{self.name}': custom cluster_type is not supported")
        if proto.type not in _TYPES:
            raise ClusterConfigError(
                f"cluster '{self.name}': type {proto.DiscoveryType.Name(proto.type)} is not supported"
            )
        self.type: str = _TYPES[proto.type]
        if proto.lb_policy not in LB_POLICIES:
            raise ClusterConfigError(
                f"cluster '{self.name}': lb_policy {proto.LbPolicy.Name(proto.lb_policy)} is not supported"
            )
        self.lb_policy: str = LB_POLICIES[proto.lb_policy]
        self.least_request_choice_count = (
            proto.least_request_lb_config.choice_count.value
            if proto.least_request_lb_config.HasField("choice_count") else 2
        )
        if proto.HasField("lb_subset_config") and len(proto.lb_subset_config.subset_selectors):
            raise ClusterConfigError(f"cluster '{self.name}': lb_subset_config is not supported")
        # common_lb_config.healthy_panic_threshold: below this share of healthy hosts, use all.
        panic = proto.common_lb_config.healthy_panic_threshold
        self.healthy_panic_threshold = (
            panic.value / 100.0 if proto.common_lb_config.HasField("healthy_panic_threshold") else 0.5
        )
        self.minimum_ring_size = (
            proto.ring_hash_lb_config.minimum_ring_size.value
            if proto.ring_hash_lb_config.HasField("minimum_ring_size") else DEFAULT_MIN_RING_SIZE
        )
        sockets = [proto.transport_socket] if proto.HasField("transport_socket") else []
        sockets += [m.transport_socket for m in proto.transport_socket_matches]
        for socket_proto in sockets:
            if socket_proto.HasField("typed_config") and not socket_proto.typed_config.type_url.endswith(
                "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
            ):
                raise ClusterConfigError(f"cluster '{self.name}': transport_socket is not supported (plain TCP only)")
        self.connect_timeout_ms = _ms(proto.connect_timeout) if proto.HasField("connect_timeout") else (
            DEFAULT_CONNECT_TIMEOUT_MS
        )
        self.per_connection_buffer_limit = (
            proto.per_connection_buffer_limit_bytes.value
            if proto.HasField("per_connection_buffer_limit_bytes") else DEFAULT_BUFFER_LIMIT
        )
        self.dns_refresh_rate_ms = (
            _ms(proto.dns_refresh_rate) if proto.HasField("dns_refresh_rate") else DEFAULT_DNS_REFRESH_MS
        )
        self.dns_lookup_family: int = proto.dns_lookup_family
        self.metadata: dict[str, Any] = (
            MessageToDict(proto.metadata, preserving_proto_field_name=True).get("filter_metadata", {})
            if proto.HasField("metadata") else {}
        )
        common = proto.common_http_protocol_options
        max_rq = proto.max_requests_per_connection.value if proto.HasField("max_requests_per_connection") else 0
        # HTTP/2 upstreams: only the Wasm gRPC callouts (grpcio) speak it; the router's pool is
        # HTTP/1, so it still sends HTTP/1.1 to such a cluster.
        self.http2: bool = proto.HasField("http2_protocol_options")
        # Http1Settings.enable_trailers: without it the upstream HTTP/1 codec drops trailers both ways.
        self.enable_trailers: bool = proto.http_protocol_options.enable_trailers
        for any_msg in proto.typed_extension_protocol_options.values():
            if any_msg.type_url.endswith("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"):
                from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

                opts = http_protocol_options_pb2.HttpProtocolOptions()
                any_msg.Unpack(opts)
                if opts.HasField("common_http_protocol_options"):
                    common = opts.common_http_protocol_options
                if opts.HasField("explicit_http_config") and opts.explicit_http_config.HasField(
                    "http2_protocol_options"
                ):
                    self.http2 = True
                for config in (opts.explicit_http_config, opts.use_downstream_protocol_config):
                    if config.HasField("http_protocol_options"):
                        self.enable_trailers = config.http_protocol_options.enable_trailers
        if common.HasField("max_requests_per_connection"):
            max_rq = common.max_requests_per_connection.value
        self.max_requests_per_connection: int = max_rq
        # common_http_protocol_options.idle_timeout: 0 means no idle timeout (Envoy's docs, and
        # Envoy 1.40 keeps an idle connection open with it).
        self.idle_timeout_ms: int = (
            _ms(common.idle_timeout) if common.HasField("idle_timeout") else DEFAULT_IDLE_TIMEOUT_MS
        )
        self.outlier_detector: OutlierDetector | None = None
        default_thresholds = high_thresholds = None
        for t in proto.circuit_breakers.thresholds:
            if t.priority == 0:
                default_thresholds = t
            else:
                high_thresholds = t
        self.resource_manager = ResourceManager(default_thresholds)
        self.high_resource_manager = ResourceManager(high_thresholds)


class CaresResolver:
    """DNS through c-ares (aiodns), as Envoy's default resolver: /etc/hosts, then DNS servers.

    Envoy's dns_lookup_family: AUTO asks for IPv6 and falls back to IPv4, V4_PREFERRED the
    reverse, ALL returns both. Main thread only (one c-ares channel on the main loop).
    """

    def __init__(self) -> None:
        self._resolver: Any = None

    async def __call__(self, hostname: str, port: int, family: int) -> list[str]:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in hostname else socket.AF_INET, hostname)
            return [hostname]  # an IP literal needs no lookup
        except OSError:
            pass
        if self._resolver is None:
            import aiodns

            self._resolver = aiodns.DNSResolver(loop=asyncio.get_running_loop())
        order = {
            1: (socket.AF_INET,),
            2: (socket.AF_INET6,),
            3: (socket.AF_INET, socket.AF_INET6),
            4: (socket.AF_UNSPEC,),
        }.get(family, (socket.AF_INET6, socket.AF_INET))
        error: Exception | None = None
        for fam in order:
            try:
                result = await self._resolver.getaddrinfo(hostname, family=fam, port=port, type=socket.SOCK_STREAM)
            except Exception as e:  # aiodns.error.DNSError: try the next family
                error = e
                continue
            addrs = [n.addr[0].decode() if isinstance(n.addr[0], bytes) else n.addr[0] for n in result.nodes]
            if addrs:
                return list(dict.fromkeys(addrs))
        raise OSError(f"DNS resolution of {hostname} failed: {error}")


def _endpoint_hosts(cluster: ClusterInfo, proto: Any) -> list[tuple[str, int, str, int, bool, dict]]:
    """(address, port, hostname, weight, healthy, metadata) for every lb_endpoint."""
    out = []
    for locality in proto.load_assignment.endpoints:
        for lb in locality.lb_endpoints:
            ep = lb.endpoint
            sa = ep.address.socket_address
            if not ep.address.HasField("socket_address"):
                raise ClusterConfigError(f"cluster '{cluster.name}': only socket_address endpoints are supported")
            weight = lb.load_balancing_weight.value if lb.HasField("load_balancing_weight") else 1
            md = MessageToDict(lb.metadata, preserving_proto_field_name=True).get("filter_metadata", {})
            out.append((sa.address, sa.port_value, ep.hostname, weight,
                        lb.health_status not in _UNHEALTHY, md))
    return out


class Cluster:
    """A cluster's discovery on the main thread. Main thread only."""

    def __init__(
        self,
        proto: Any,
        dispatcher: Any,
        on_hosts_changed: Callable[["Cluster"], None],
        resolver: Resolver | None = None,
        store: Any = None,
    ) -> None:
        self.info = ClusterInfo(proto)
        self._store = store  # the main thread's stats Store (discovery stats)
        self.hosts: tuple[Host, ...] = ()
        self.initialized = False
        self._dispatcher = dispatcher
        self._on_hosts_changed = on_hosts_changed
        self._resolver: Resolver = resolver or CaresResolver()
        self._endpoints = _endpoint_hosts(self.info, proto)
        self._timer: Any = None
        self._init_waiters: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._shutdown = False
        # STRICT_DNS: each endpoint's hosts from its last good lookup (a failed lookup keeps them).
        self._resolved: list[list[Host]] = [[] for _ in self._endpoints]
        if self.info.type == "STATIC":
            for addr, port, *_ in self._endpoints:
                try:
                    socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
                except OSError:
                    raise ClusterConfigError(
                        f"malformed IP address: {addr}. Consider setting resolver_name or setting cluster type "
                        "to 'STRICT_DNS' or 'LOGICAL_DNS'"
                    ) from None
            self.hosts = tuple(
                Host(self.info.name, Address(a, p), hostname=h, weight=w, healthy=ok, metadata=md)
                for a, p, h, w, ok, md in self._endpoints
            )
        elif self.info.type == "LOGICAL_DNS" and len(self._endpoints) != 1:
            raise ClusterConfigError("LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint")
        if proto.HasField("outlier_detection"):
            # Shared with every worker through the (otherwise immutable) ClusterInfo.
            self.info.outlier_detector = OutlierDetector(
                proto.outlier_detection, dispatcher, store, self.info.stat_prefix,
                lambda: self.hosts, lambda: on_hosts_changed(self),
            )
        self.health_checker: HealthChecker | None = None
        if len(proto.health_checks):
            try:
                self.health_checker = HealthChecker(
                    proto.health_checks[0], self.info.name, dispatcher, store, self.info.stat_prefix,
                    lambda: on_hosts_changed(self),
                    lambda: any(h.stats.cx_total for h in self.hosts),
                )
            except HealthCheckConfigError as e:
                raise ClusterConfigError(str(e)) from None

    def initialize(self, on_done: Callable[[], None]) -> None:
        """Start discovery; `on_done` runs (on main) once the first host set is known and, with
        health checks, once every host of it has been checked (Envoy's cluster warming)."""
        if self.initialized:
            on_done()
            return
        self._init_waiters.append(on_done)
        if self.info.type == "STATIC":
            self._hosts_known()
            return
        if self._timer is None:
            self._timer = self._dispatcher.create_timer(self._start_resolve)
            self._start_resolve()

    def _start_resolve(self) -> None:
        self._task = self._dispatcher.loop.create_task(self._resolve_all())

    def _count(self, name: str, n: int = 1) -> None:
        if self._store is not None:
            self._store.counter(self.info.stat_prefix + name).inc(n)

    async def _resolve_all(self) -> None:
        family = self.info.dns_lookup_family
        for i, (addr, port, hostname, weight, healthy, md) in enumerate(self._endpoints):
            self._count("update_attempt")
            try:
                answers = await self._resolver(addr, port, family)
            except (OSError, socket.gaierror):
                self._count("update_failure")
                continue
            self._count("update_success")
            if self.info.type == "LOGICAL_DNS":
                answers = answers[:1]  # one host: the first answer of the latest lookup
            self._count("default.total_match_count", len(answers))
            self._resolved[i] = [
                Host(self.info.name, Address(ip, port), hostname=hostname or addr, weight=weight, healthy=healthy,
                     metadata=md)
                for ip in answers
            ]
        self._on_resolved([h for hosts in self._resolved for h in hosts])

    def _on_resolved(self, new: list[Host]) -> None:
        if self._shutdown:
            return
        # Keep existing Host objects (and their stats) for addresses that did not change.
        old = {(h.address.host, h.address.port): h for h in self.hosts}
        merged = tuple(old.get((h.address.host, h.address.port), h) for h in new)
        if [id(h) for h in merged] != [id(h) for h in self.hosts]:
            self.hosts = merged
            if self._store is not None and self.info.type == "STRICT_DNS":
                self._store.gauge(self.info.stat_prefix + "max_host_weight").set(
                    max((h.weight for h in merged), default=0))
            self._on_hosts_changed(self)
        elif self.initialized:
            self._count("update_no_rebuild")
        self._hosts_known()
        if self._timer is not None:
            self._timer.enable_timer(self.info.dns_refresh_rate_ms)

    def _hosts_known(self) -> None:
        if self.health_checker is None:
            self._finish_init()
            return
        was = [h.healthy for h in self.hosts]
        self.health_checker.set_hosts(self.hosts, None if self.initialized else self._finish_init)
        if [h.healthy for h in self.hosts] != was:
            self._on_hosts_changed(self)  # new hosts start failed until checked

    def _finish_init(self) -> None:
        if self.initialized:
            return
        self.initialized = True
        waiters, self._init_waiters = self._init_waiters, []
        for cb in waiters:
            cb()

    def shutdown(self) -> None:
        """Stop DNS refreshes (main thread)."""
        self._shutdown = True
        if self.health_checker is not None:
            self.health_checker.stop()
        if self.info.outlier_detector is not None:
            self.info.outlier_detector.stop()
        if self._timer is not None:
            self._timer.disable_timer()
        if self._task is not None:
            self._task.cancel()
