"""Outlier detection: consecutive 5xx / gateway failures eject a host for base_ejection_time."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from test_upstream_support import FakeDispatcher, FakeTls, Recorder, Upstream, keep_alive_handler_for_tests, static_cluster
from wasmproxy.stats.store import Store
from wasmproxy.upstream.cluster_manager import ClusterManager


def setup(extra: str, hosts: int = 2) -> tuple[ClusterManager, FakeDispatcher, Store]:
    d = FakeDispatcher(asyncio.get_running_loop())
    store = Store()
    ports = [1000 + i for i in range(hosts)]
    cm = ClusterManager([static_cluster("c", *ports, extra="outlier_detection: " + extra)], d, FakeTls(d), store)
    return cm, d, store


async def drain_posts(d: FakeDispatcher) -> None:
    """Run everything posted to the (fake) main dispatcher so far."""
    done = asyncio.get_running_loop().create_future()
    d.post(lambda: done.set_result(None))
    await done


def c(store: Store, name: str) -> int:
    return store.counter("cluster.c.outlier_detection." + name).value


def test_consecutive_5xx_ejects_then_the_interval_brings_the_host_back() -> None:
    async def scenario() -> None:
        cm, d, store = setup("{consecutive_5xx: 3, interval: 1s, base_ejection_time: 5s, max_ejection_percent: 50}")
        detector = cm.clusters["c"].info.outlier_detector
        tlc = cm.thread_local().get("c")
        bad, good = tlc.hosts
        for status in (503, 500, 200, 503, 502):  # a success resets the count
            detector.put_response(bad, status)
        await drain_posts(d)
        assert bad.ejected_at is None
        detector.put_response(bad, 504)
        await drain_posts(d)
        assert bad.ejected_at is not None
        assert {tlc.choose_host() for _ in range(4)} == {good}
        assert (c(store, "ejections_enforced_total"), c(store, "ejections_detected_consecutive_5xx")) == (1, 1)
        assert (c(store, "ejections_total"), c(store, "ejections_consecutive_5xx")) == (1, 1)  # as Envoy 1.40
        assert store.gauge("cluster.c.outlier_detection.ejections_active").value == 1
        assert store.gauge("cluster.c.membership_healthy").value == 1
        assert "c::127.0.0.1:1000::health_flags::/failed_outlier_check" in cm.clusters_text()
        [timer] = [t for t in d.timers if t.enabled()]
        assert timer.ms == 1000
        d.time_source.now += 4.9
        timer.fire()
        assert bad.ejected_at is not None
        d.time_source.now += 0.2
        timer.fire()
        assert bad.ejected_at is None and {tlc.choose_host() for _ in range(4)} == {bad, good}
        assert store.gauge("cluster.c.outlier_detection.ejections_active").value == 0
        cm.shutdown()

    uvloop.run(scenario())


def test_max_ejection_percent_and_always_eject_one_host() -> None:
    async def scenario() -> None:
        cm, d, store = setup("{consecutive_5xx: 1}")  # default max_ejection_percent: 10
        host = cm.thread_local().get("c").hosts[0]
        cm.clusters["c"].info.outlier_detector.put_response(host, 500)
        await drain_posts(d)
        assert host.ejected_at is None and c(store, "ejections_overflow") == 1  # 1 of 2 is 50% > 10%
        cm.shutdown()

        cm, d, store = setup("{consecutive_5xx: 1, always_eject_one_host: true}")
        hosts = cm.thread_local().get("c").hosts
        detector = cm.clusters["c"].info.outlier_detector
        for h in hosts:
            detector.put_response(h, 500)
        await drain_posts(d)
        assert [h.ejected_at is not None for h in hosts] == [True, False]
        cm.shutdown()

    uvloop.run(scenario())


def test_gateway_failures_need_enforcing_and_ejection_time_grows() -> None:
    async def scenario() -> None:
        cm, d, store = setup("{consecutive_5xx: 100, consecutive_gateway_failure: 2, "
                             "enforcing_consecutive_gateway_failure: 100, max_ejection_percent: 100, "
                             "base_ejection_time: 1s, interval: 1s}")
        detector: Any = cm.clusters["c"].info.outlier_detector
        host = cm.thread_local().get("c").hosts[0]
        [timer] = [t for t in d.timers if t.enabled()]
        for round_ in (1, 2):
            detector.put_response(host, 502)
            detector.put_response(host, 503)
            await drain_posts(d)
            assert host.ejected_at is not None and host.times_ejected == round_
            d.time_source.now += round_ * 1.0 - 0.5
            timer.fire()
            assert host.ejected_at is not None  # ejection time is base x times ejected
            d.time_source.now += 0.6
            timer.fire()
            assert host.ejected_at is None
        assert c(store, "ejections_enforced_consecutive_gateway_failure") == 2
        cm.shutdown()

    uvloop.run(scenario())


def test_ejection_drains_the_hosts_existing_connections() -> None:
    async def scenario() -> None:
        up = await Upstream(keep_alive_handler_for_tests).start()
        d = FakeDispatcher(asyncio.get_running_loop())
        store = Store()
        cm = ClusterManager([static_cluster("c", up.port, 1, extra="outlier_detection: {consecutive_5xx: 1, "
                                                                    "max_ejection_percent: 100}")],
                            d, FakeTls(d), store)
        tlc = cm.thread_local().get("c")
        host = tlc.hosts[0]
        r = Recorder()
        tlc.conn_pool(host).new_stream(r, r)
        await r.done
        assert store.gauge("cluster.c.upstream_cx_active").value == 1  # idle keep-alive connection
        cm.clusters["c"].info.outlier_detector.put_response(host, 500)
        await drain_posts(d)
        assert host.ejected_at is not None
        # As Envoy's onHostHealthFailure: the idle connection is closed, new ones may still open.
        assert store.counter("cluster.c.upstream_cx_destroy_local").value == 1
        r2 = Recorder()
        tlc.conn_pool(host).new_stream(r2, r2)
        await r2.done
        assert r2.headers.get(":status") == "200"
        cm.shutdown()
        await up.stop()

    uvloop.run(scenario())
