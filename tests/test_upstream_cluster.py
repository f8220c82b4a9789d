"""Clusters, load balancers and the cluster manager (no sockets; DNS through a fake resolver)."""

from __future__ import annotations

import asyncio
import random

import uvloop

import pytest

from test_upstream_support import FakeDispatcher, FakeTls, cluster, static_cluster
from wasmproxy.http.stream_info import Address
from wasmproxy.stats.store import Store
from wasmproxy.upstream.cluster import CaresResolver, ClusterConfigError, ClusterInfo
from wasmproxy.upstream.cluster_manager import ClusterManager
from wasmproxy.upstream.host import Host
from wasmproxy.upstream.load_balancer import (
    LeastRequestLoadBalancer,
    RandomLoadBalancer,
    RingHashLoadBalancer,
    RoundRobinLoadBalancer,
)


def hosts(n: int, weights: list[int] | None = None, healthy: list[bool] | None = None) -> list[Host]:
    return [
        Host("c", Address("10.0.0.%d" % i, 80), weight=(weights or [1] * n)[i], healthy=(healthy or [True] * n)[i])
        for i in range(n)
    ]


def test_cluster_info_defaults_match_envoy() -> None:
    info = ClusterInfo(static_cluster("c", 1))
    assert info.connect_timeout_ms == 5000
    assert info.lb_policy == "ROUND_ROBIN"
    rm = info.resource_manager
    assert (rm.connections.max, rm.pending_requests.max, rm.requests.max, rm.retries.max) == (1024, 1024, 1024, 3)
    assert info.per_connection_buffer_limit == 1024 * 1024
    assert info.idle_timeout_ms == 3600 * 1000
    assert info.max_requests_per_connection == 0


def test_cluster_info_reads_settings() -> None:
    info = ClusterInfo(static_cluster("c", 1, extra="""
connect_timeout: 0.25s
lb_policy: LEAST_REQUEST
alt_stat_name: alt
circuit_breakers: {thresholds: [{max_connections: 1, max_pending_requests: 2, max_requests: 3}, {priority: HIGH, max_connections: 9}]}
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    common_http_protocol_options: {idle_timeout: 2s, max_requests_per_connection: 5}
    explicit_http_config: {http_protocol_options: {}}
"""))
    assert info.connect_timeout_ms == 250 and info.lb_policy == "LEAST_REQUEST"
    assert info.stat_prefix == "cluster.alt."
    rm = info.resource_manager
    assert (rm.connections.max, rm.pending_requests.max, rm.requests.max) == (1, 2, 3)
    assert info.high_resource_manager.connections.max == 9
    assert (info.idle_timeout_ms, info.max_requests_per_connection) == (2000, 5)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("lb_policy: CLUSTER_PROVIDED", "CLUSTER_PROVIDED is not supported"),
        ("type: EDS", "EDS is not supported"),
    ],
)
def test_unsupported_cluster_features_are_rejected(extra: str, message: str) -> None:
    proto = static_cluster("c", 1, extra=extra)
    with pytest.raises(ClusterConfigError, match=message):
        ClusterInfo(proto)


@pytest.mark.parametrize("extra", [
    "http2_protocol_options: {}",
    """typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: {http2_protocol_options: {}}""",
])
def test_http2_cluster_is_accepted_and_flagged(extra: str) -> None:
    """gRPC callouts (wasm/grpc.py) need HTTP/2 clusters; Envoy configs name them this way."""
    assert ClusterInfo(static_cluster("c", 1, extra=extra)).http2
    assert not ClusterInfo(static_cluster("c", 1)).http2


def test_static_cluster_rejects_a_hostname() -> None:
    proto = cluster("""
name: c
type: STATIC
load_assignment: {cluster_name: c, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: example.com, port_value: 80}}}}]}]}
""")
    loop = asyncio.new_event_loop()
    try:
        d = FakeDispatcher(loop)
        with pytest.raises(ClusterConfigError, match="malformed IP address: example.com"):
            ClusterManager([proto], d, FakeTls(d), Store())
    finally:
        loop.close()


def test_round_robin_rotates_and_honours_weights() -> None:
    hs = hosts(3)
    lb = RoundRobinLoadBalancer(hs)
    assert [lb.choose_host() for _ in range(6)] == hs + hs
    weighted = hosts(2, weights=[3, 1])
    wlb = RoundRobinLoadBalancer(weighted)
    picks = [wlb.choose_host() for _ in range(8)]
    assert picks.count(weighted[0]) == 6 and picks.count(weighted[1]) == 2


def test_unhealthy_hosts_are_skipped_until_panic() -> None:
    hs = hosts(3, healthy=[True, True, False])
    lb = RoundRobinLoadBalancer(hs)
    assert not lb.panic and {lb.choose_host() for _ in range(6)} == set(hs[:2])
    panic = RoundRobinLoadBalancer(hosts(3, healthy=[True, False, False]))
    assert panic.panic and len({panic.choose_host() for _ in range(6)}) == 3


def test_panic_threshold_is_configurable() -> None:
    hs = hosts(4, healthy=[True, False, False, False])
    assert RoundRobinLoadBalancer(hs).panic  # 25% < 50%
    strict = RoundRobinLoadBalancer(hs, panic_threshold=0.0)  # healthy_panic_threshold: 0 disables panic
    assert not strict.panic and {strict.choose_host() for _ in range(4)} == {hs[0]}
    info = ClusterInfo(static_cluster("c", 1, extra="common_lb_config: {healthy_panic_threshold: {value: 0}}"))
    assert info.healthy_panic_threshold == 0.0
    with pytest.raises(ClusterConfigError, match="lb_subset_config"):
        ClusterInfo(static_cluster("c", 1, extra="lb_subset_config: {subset_selectors: [{keys: [v]}]}"))


def test_empty_host_set_gives_no_host() -> None:
    assert RoundRobinLoadBalancer([]).choose_host() is None


def test_random_and_least_request() -> None:
    hs = hosts(4)
    rlb = RandomLoadBalancer(hs, rng=random.Random(1))
    assert {rlb.choose_host() for _ in range(100)} == set(hs)
    hs[0].stats.rq_active, hs[1].stats.rq_active, hs[2].stats.rq_active, hs[3].stats.rq_active = 5, 5, 5, 0
    lr = LeastRequestLoadBalancer(hs, rng=random.Random(2), choice_count=4)
    # With 4 random choices among 4 hosts, the idle host wins whenever it is drawn.
    picks = [lr.choose_host() for _ in range(50)]
    assert picks.count(hs[3]) > 25


def test_ring_hash_is_sticky_spread_and_mostly_stable() -> None:
    hs = hosts(4)
    lb = RingHashLoadBalancer(hs, min_ring_size=1024)
    keys = [random.Random(i).getrandbits(64) for i in range(400)]
    picks = [lb.choose_host(k) for k in keys]
    assert picks == [lb.choose_host(k) for k in keys]  # same key, same host
    assert all(picks.count(h) > 50 for h in hs)  # every host gets a share
    # Removing one host moves few of the keys that were not on it (the ring is rebuilt with
    # more points per host, so not none, as in Envoy).
    smaller = RingHashLoadBalancer(hs[:3], min_ring_size=1024)
    kept = [smaller.choose_host(k) is p for k, p in zip(keys, picks) if p is not hs[3]]
    assert sum(kept) > 0.8 * len(kept)
    assert lb.choose_host(None) in hs  # no hash: any host


class FakeResolver:
    """Answers DNS lookups from a dict the test changes; records each lookup."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[tuple[str, int, int]] = []

    async def __call__(self, name: str, port: int, family: int) -> list[str]:
        self.lookups.append((name, port, family))
        if name not in self.answers:
            raise OSError("no such host")
        return list(self.answers[name])


DNS_CLUSTER = """
name: dns
type: {type}
dns_refresh_rate: 2s
load_assignment:
  cluster_name: dns
  endpoints:
  - lb_endpoints:
    - endpoint: {{address: {{socket_address: {{address: svc.local, port_value: 8080}}}}}}
"""


def run(coro):  # type: ignore[no-untyped-def]
    return uvloop.run(coro)


def test_strict_dns_resolves_refreshes_and_publishes_to_workers() -> None:
    async def scenario() -> None:
        d = FakeDispatcher(asyncio.get_running_loop())
        tls = FakeTls(d)
        store = Store()
        resolver = FakeResolver({"svc.local": ["10.0.0.1", "10.0.0.2"]})
        cm = ClusterManager([cluster(DNS_CLUSTER.format(type="STRICT_DNS"))], d, tls, store, resolver=resolver)
        tlc = cm.thread_local().get("dns")
        assert tlc is not None and tlc.choose_host() is None  # nothing resolved yet
        initialized = asyncio.get_running_loop().create_future()
        cm.initialize(lambda: initialized.set_result(True))
        await initialized
        assert [str(h.address) for h in tlc.hosts] == ["10.0.0.1:8080", "10.0.0.2:8080"]
        assert tlc.hosts[0].hostname == "svc.local"
        assert store.gauge("cluster.dns.membership_total").value == 2
        assert store.gauge("cluster.dns.membership_healthy").value == 2
        first = tlc.hosts[0]
        # The refresh timer is armed with dns_refresh_rate; a refresh with a changed answer is pushed.
        [timer] = [t for t in d.timers if t.enabled()]
        assert timer.ms == 2000
        resolver.answers["svc.local"] = ["10.0.0.1", "10.0.0.3"]
        timer.fire()
        await cm.clusters["dns"]._task  # the refresh's lookup
        assert [str(h.address) for h in tlc.hosts] == ["10.0.0.1:8080", "10.0.0.3:8080"]
        assert tlc.hosts[0] is first  # unchanged addresses keep their Host (and stats)
        assert store.counter("cluster.dns.membership_change").value == 2
        # The same answer again: no rebuild, as Envoy counts it.
        [timer] = [t for t in d.timers if t.enabled()]
        timer.fire()
        await cm.clusters["dns"]._task
        assert store.counter("cluster.dns.update_no_rebuild").value == 1
        assert store.counter("cluster.dns.update_attempt").value == 3
        assert store.counter("cluster.dns.update_success").value == 3
        assert store.counter("cluster.dns.default.total_match_count").value == 6
        assert store.gauge("cluster.dns.max_host_weight").value == 1
        # A failed lookup keeps the last good hosts.
        del resolver.answers["svc.local"]
        [timer] = [t for t in d.timers if t.enabled()]
        timer.fire()
        await cm.clusters["dns"]._task
        assert len(resolver.lookups) == 4 and timer.enabled()
        assert len(tlc.hosts) == 2
        assert store.counter("cluster.dns.update_failure").value == 1
        cm.shutdown()

    run(scenario())


def test_logical_dns_uses_first_address_only() -> None:
    async def scenario() -> None:
        d = FakeDispatcher(asyncio.get_running_loop())
        resolver = FakeResolver({"svc.local": ["10.0.0.7", "10.0.0.8"]})
        cm = ClusterManager([cluster(DNS_CLUSTER.format(type="LOGICAL_DNS"))], d, FakeTls(d), Store(),
                            resolver=resolver)
        done = asyncio.get_running_loop().create_future()
        cm.initialize(lambda: done.set_result(True))
        await done
        assert [str(h.address) for h in cm.thread_local().get("dns").hosts] == ["10.0.0.7:8080"]
        assert resolver.lookups[0][2] == 0  # dns_lookup_family AUTO is passed through
        cm.shutdown()

    run(scenario())


def test_cares_resolver_reads_hosts_and_literals() -> None:
    resolver = CaresResolver()
    assert run(resolver("127.0.0.1", 80, 0)) == ["127.0.0.1"]
    assert run(resolver("::1", 80, 0)) == ["::1"]

    async def lookups() -> None:
        r = CaresResolver()  # one c-ares channel per loop
        assert await r("localhost", 80, 1) == ["127.0.0.1"]  # V4_ONLY, from /etc/hosts

    run(lookups())


def test_cluster_manager_tables_and_admin_text() -> None:
    async def scenario() -> None:
        d = FakeDispatcher(asyncio.get_running_loop())
        store = Store()
        cm = ClusterManager([static_cluster("a", 1001, 1002), static_cluster("b", 2001)], d, FakeTls(d), store)
        done = asyncio.get_running_loop().create_future()
        cm.initialize(lambda: done.set_result(True))
        await done
        tl = cm.thread_local()
        assert tl.get("nope") is None
        a = tl.get("a")
        assert [a.choose_host().address.port for _ in range(3)] == [1001, 1002, 1001]
        assert store.gauge("cluster_manager.active_clusters").value == 2
        assert store.gauge("cluster.a.membership_total").value == 2
        assert store.counter("cluster.a.membership_change").value == 1
        assert store.counter("cluster.a.default.total_match_count").value == 2
        text = cm.clusters_text()
        lines = text.splitlines()
        assert lines[:10] == [
            "a::observability_name::a",
            "a::default_priority::max_connections::1024",
            "a::default_priority::max_pending_requests::1024",
            "a::default_priority::max_requests::1024",
            "a::default_priority::max_retries::3",
            "a::high_priority::max_connections::1024",
            "a::high_priority::max_pending_requests::1024",
            "a::high_priority::max_requests::1024",
            "a::high_priority::max_retries::3",
            "a::added_via_api::false",
        ]
        assert lines[10:29] == [
            f"a::127.0.0.1:1001::{k}" for k in (
                "cx_active::0", "cx_connect_fail::0", "cx_total::0", "rq_active::0", "rq_error::0",
                "rq_pending_active::0", "rq_success::0", "rq_timeout::0", "rq_total::0", "hostname::",
                "health_flags::healthy", "weight::1", "region::", "zone::", "sub_zone::", "canary::false",
                "priority::0", "success_rate::-1", "local_origin_success_rate::-1",
            )
        ]
        assert "b::127.0.0.1:2001::cx_total::0" in lines
        a.hosts[0].stats.cx_total = 2
        js = cm.clusters_json()["cluster_statuses"][0]
        assert js["name"] == "a" and js["observability_name"] == "a"
        assert js["circuit_breakers"]["thresholds"][1] == {
            "priority": "HIGH", "max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024,
            "max_retries": 3}
        h0 = js["host_statuses"][0]
        assert h0["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 1001}}
        assert h0["stats"][:2] == [{"name": "cx_connect_fail"}, {"name": "cx_total", "value": "2"}]
        assert h0["stats"][6] == {"type": "GAUGE", "name": "cx_active"}
        assert h0["health_status"] == {"eds_health_status": "HEALTHY"} and h0["weight"] == 1

    run(scenario())


def test_duplicate_cluster_names_are_rejected() -> None:
    loop = asyncio.new_event_loop()
    try:
        d = FakeDispatcher(loop)
        with pytest.raises(ClusterConfigError, match="duplicate cluster 'a'"):
            ClusterManager([static_cluster("a", 1), static_cluster("a", 2)], d, FakeTls(d), Store())
    finally:
        loop.close()


def test_strict_dns_endpoint_failure_keeps_that_endpoints_hosts() -> None:
    async def scenario() -> None:
        d = FakeDispatcher(asyncio.get_running_loop())
        resolver = FakeResolver({"a.local": ["10.0.0.1"], "b.local": ["10.0.0.2"]})
        proto = cluster("""
name: two
type: STRICT_DNS
load_assignment:
  cluster_name: two
  endpoints:
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: a.local, port_value: 80}}}
    - endpoint: {address: {socket_address: {address: b.local, port_value: 81}}}
""")
        cm = ClusterManager([proto], d, FakeTls(d), Store(), resolver=resolver)
        done = asyncio.get_running_loop().create_future()
        cm.initialize(lambda: done.set_result(True))
        await done
        tlc = cm.thread_local().get("two")
        assert [str(h.address) for h in tlc.hosts] == ["10.0.0.1:80", "10.0.0.2:81"]
        del resolver.answers["a.local"]
        resolver.answers["b.local"] = ["10.0.0.3"]
        [timer] = [t for t in d.timers if t.enabled()]
        timer.fire()
        await cm.clusters["two"]._task
        assert [str(h.address) for h in tlc.hosts] == ["10.0.0.1:80", "10.0.0.3:81"]
        cm.shutdown()

    run(scenario())


def test_resource_limit_counts_across_threads_without_a_lock() -> None:
    import threading

    from wasmproxy.upstream.cluster import ResourceLimit

    limit = ResourceLimit(2)
    assert limit.can_create() and limit.count == 0
    limit.inc()
    limit.inc()
    assert not limit.can_create() and limit.count == 2

    def churn() -> None:
        for _ in range(20_000):
            limit.inc()
            limit.dec()

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert limit.count == 2
    for _ in range(3):
        limit.dec()
    assert limit.count == -1 and limit.can_create()  # an unmatched dec counts below 0, as `-= 1` did
    limit.inc()
    assert limit.count == 0
