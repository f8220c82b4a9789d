"""Active health checking (cluster.health_checks): HTTP and TCP, on the main thread.

As Envoy's HealthCheckerImplBase: a host that joins a health-checked cluster starts as
failed (`/failed_active_hc`) until its first check passes; afterwards it turns unhealthy
after `unhealthy_threshold` consecutive failures and healthy again after
`healthy_threshold` consecutive successes. A check that times out is a network failure.
Until the cluster has carried traffic, checks run every `no_traffic_interval` (60 s by
default) instead of `interval`. Each health change is reported so the cluster manager
republishes the host set (its load balancers skip unhealthy hosts).

Main thread only; sockets on the main dispatcher's loop, framing by the sans-IO ClientCodec.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

from ..http.codec import ClientCodec, CodecError
from ..http.headers import HeaderMap

if TYPE_CHECKING:
    from .host import Host

DEFAULT_NO_TRAFFIC_INTERVAL_MS = 60_000


def _ms(duration: Any) -> int:
    return duration.seconds * 1000 + duration.nanos // 1_000_000


class HealthCheckConfigError(ValueError):
    pass


class _Probe(asyncio.Protocol):
    """One connection used for checks of one host (kept open when reuse_connection)."""

    def __init__(self, session: "HostSession") -> None:
        self.session = session
        self.transport: Any = None
        self.codec = ClientCodec(self)
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if not self.connected.done():
            self.connected.set_result(True)

    def data_received(self, data: bytes) -> None:
        self.codec.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.session.on_probe_closed(self)

    def on_1xx(self, headers: HeaderMap) -> None:
        pass

    def on_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.session.status = int(headers.get(":status") or 0)
        if end_stream:
            self.session.on_response(self.codec.keep_alive)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self.session.on_response(self.codec.keep_alive)

    def on_trailers(self, trailers: HeaderMap) -> None:
        self.session.on_response(self.codec.keep_alive)

    def on_codec_error(self, error: CodecError) -> None:
        self.session.on_failure(network=True)


class HostSession:
    """The check loop of one host."""

    def __init__(self, checker: "HealthChecker", host: "Host") -> None:
        self.checker = checker
        self.host = host
        self.status = 0
        self.first_check_done = False
        self._successes = 0
        self._failures = 0
        self._probe: _Probe | None = None
        self._in_flight = False
        self._interval_timer = checker.dispatcher.create_timer(self.start_check)
        self._timeout_timer = checker.dispatcher.create_timer(self._on_timeout)
        self._task: asyncio.Task[None] | None = None

    def start_check(self) -> None:
        self._in_flight = True
        self.status = 0
        self.checker.stats("attempt")
        self._timeout_timer.enable_timer(self.checker.timeout_ms)
        self._task = self.checker.dispatcher.loop.create_task(self._check())

    async def _check(self) -> None:
        loop = self.checker.dispatcher.loop
        if self._probe is None or self._probe.transport is None:
            probe = _Probe(self)
            try:
                await loop.create_connection(lambda: probe, self.host.address.host, self.host.address.port)
            except OSError:
                self.on_failure(network=True)
                return
            self._probe = probe
        probe = self._probe
        if self.checker.path is None:
            self.on_success()  # TCP check: the connect is the check
            if not self.checker.reuse_connection:
                self._close_probe()
            return
        headers = HeaderMap([(":method", "GET"), (":path", self.checker.path),
                             (":authority", self.checker.host_header), ("user-agent", "Envoy/HC")])
        probe.transport.write(probe.codec.encode_request_headers(headers, True))

    def on_response(self, keep_alive: bool) -> None:
        if not self._in_flight:
            return
        if not keep_alive or not self.checker.reuse_connection:
            self._close_probe()
        if any(lo <= self.status < hi for lo, hi in self.checker.expected_statuses):
            self.on_success()
        else:
            self.on_failure(network=False)

    def on_probe_closed(self, probe: _Probe) -> None:
        if probe is self._probe:
            self._probe = None
            if self._in_flight:
                self.on_failure(network=True)

    def _on_timeout(self) -> None:
        if self._in_flight:
            if self._task is not None:
                self._task.cancel()
            self._close_probe()
            self.on_failure(network=True)

    def _close_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None and probe.transport is not None:
            probe.transport.abort()

    def on_success(self) -> None:
        if not self._finish():
            return
        self.checker.stats("success")
        self._failures = 0
        self._successes += 1
        if not self.host.healthy and (not self.first_check_done or self._successes >= self.checker.healthy_threshold):
            self.checker.set_health(self.host, True)
        self._first_done()

    def on_failure(self, network: bool) -> None:
        if not self._finish():
            return
        self.checker.stats("failure")
        if network:
            self.checker.stats("network_failure")
        self._successes = 0
        self._failures += 1
        if self.host.healthy and self._failures >= self.checker.unhealthy_threshold:
            self.checker.set_health(self.host, False)
        self._first_done()

    def _finish(self) -> bool:
        if not self._in_flight:
            return False
        self._in_flight = False
        self._timeout_timer.disable_timer()
        return True

    def _first_done(self) -> None:
        if not self.first_check_done:
            self.first_check_done = True
            self.checker.on_first_check(self)
        self._interval_timer.enable_timer(self.checker.next_interval_ms(self.host))

    def stop(self) -> None:
        self._in_flight = False
        self._interval_timer.disable_timer()
        self._timeout_timer.disable_timer()
        if self._task is not None:
            self._task.cancel()
        self._close_probe()


class HealthChecker:
    """The first HTTP or TCP health check of a cluster (Envoy runs each; one is the common case)."""

    def __init__(
        self,
        proto: Any,
        cluster_name: str,
        dispatcher: Any,
        store: Any,
        stat_prefix: str,
        on_health_changed: Callable[[], None],
        has_traffic: Callable[[], bool],
    ) -> None:
        kind = proto.WhichOneof("health_checker")
        if kind not in ("http_health_check", "tcp_health_check"):
            raise HealthCheckConfigError(f"cluster '{cluster_name}': {kind} health checks are not supported")
        if kind == "tcp_health_check" and (proto.tcp_health_check.HasField("send") or len(proto.tcp_health_check.receive)):
            raise HealthCheckConfigError(f"cluster '{cluster_name}': TCP health check payloads are not supported")
        self.dispatcher = dispatcher
        self.timeout_ms = _ms(proto.timeout)
        self.interval_ms = _ms(proto.interval)
        self.no_traffic_interval_ms = (
            _ms(proto.no_traffic_interval) if proto.HasField("no_traffic_interval") else DEFAULT_NO_TRAFFIC_INTERVAL_MS
        )
        self.unhealthy_interval_ms = _ms(proto.unhealthy_interval) if proto.HasField("unhealthy_interval") else None
        self.unhealthy_threshold = max(1, proto.unhealthy_threshold.value)
        self.healthy_threshold = max(1, proto.healthy_threshold.value)
        self.reuse_connection = proto.reuse_connection.value if proto.HasField("reuse_connection") else True
        self.path: str | None = None
        self.host_header = cluster_name
        self.expected_statuses: list[tuple[int, int]] = [(200, 201)]
        if kind == "http_health_check":
            http = proto.http_health_check
            self.path = http.path
            self.host_header = http.host or cluster_name
            if len(http.expected_statuses):
                self.expected_statuses = [(r.start, r.end) for r in http.expected_statuses]
        self._store = store
        self._prefix = stat_prefix + "health_check."
        self._on_health_changed = on_health_changed
        self._has_traffic = has_traffic
        self._sessions: dict[int, HostSession] = {}
        self._first_pass_waiters: list[Callable[[], None]] = []

    def stats(self, name: str) -> None:
        self._store.counter(self._prefix + name).inc()

    def next_interval_ms(self, host: "Host") -> int:
        if not self._has_traffic():
            return self.no_traffic_interval_ms
        if not host.healthy and self.unhealthy_interval_ms is not None:
            return self.unhealthy_interval_ms
        return self.interval_ms

    def set_hosts(self, hosts: tuple["Host", ...], on_first_pass: Callable[[], None] | None = None) -> None:
        """Check these hosts: new ones start failed and are checked at once; gone ones stop."""
        keep = {id(h) for h in hosts}
        for key in [k for k in self._sessions if k not in keep]:
            self._sessions.pop(key).stop()
        if on_first_pass is not None:
            self._first_pass_waiters.append(on_first_pass)
        for host in hosts:
            if id(host) not in self._sessions:
                host.healthy = False  # FAILED_ACTIVE_HC until the first check passes
                session = self._sessions[id(host)] = HostSession(self, host)
                session.start_check()
        self._maybe_first_pass_done()

    def on_first_check(self, session: HostSession) -> None:
        self._maybe_first_pass_done()

    def _maybe_first_pass_done(self) -> None:
        if self._first_pass_waiters and all(s.first_check_done for s in self._sessions.values()):
            waiters, self._first_pass_waiters = self._first_pass_waiters, []
            for cb in waiters:
                cb()

    def set_health(self, host: "Host", healthy: bool) -> None:
        host.healthy = healthy
        self._store.gauge(self._prefix + "healthy").set(sum(1 for s in self._sessions.values() if s.host.healthy))
        self._on_health_changed()

    def stop(self) -> None:
        for session in self._sessions.values():
            session.stop()
        self._sessions.clear()
