"""Active HTTP/TCP health checks: first-pass warming, thresholds, timeouts, LB exclusion."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from test_upstream_support import FakeDispatcher, FakeTls, Upstream, closed_port, ok_response, static_cluster
from wasmproxy.stats.store import Store
from wasmproxy.upstream.cluster_manager import ClusterManager

HC = """
health_checks:
- timeout: 1s
  interval: 2s
  no_traffic_interval: 5s
  unhealthy_threshold: 2
  healthy_threshold: 2
  {kind}
"""
HTTP = "http_health_check: {path: /healthz, host: hc.test}"
TCP = "tcp_health_check: {}"


class Scripted:
    """An upstream whose /healthz answer the test sets; records the check requests."""

    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.upstream = Upstream(self.handle)

    async def handle(self, reader: Any, writer: Any, head: bytes) -> bool:
        if self.hang:
            await reader.read()
            return False
        if self.status == 200:
            writer.write(ok_response(b"ok"))
        else:
            writer.write(b"HTTP/1.1 %d Nope\r\ncontent-length: 0\r\n\r\n" % self.status)
        await writer.drain()
        return True


async def start(kind: str, *ports: int) -> tuple[ClusterManager, FakeDispatcher, Store]:
    d = FakeDispatcher(asyncio.get_running_loop())
    store = Store()
    cm = ClusterManager([static_cluster("c", *ports, extra=HC.format(kind=kind))], d, FakeTls(d), store)
    done = asyncio.get_running_loop().create_future()
    cm.initialize(lambda: done.set_result(True))
    await done  # warming waits for every host's first check
    return cm, d, store


async def next_check(d: FakeDispatcher, store: Store) -> None:
    """Fire the interval timers and wait until each started check has finished."""
    before = store.counter("cluster.c.health_check.success").value + store.counter("cluster.c.health_check.failure").value
    timers = d.enabled_timers("start_check")
    for t in timers:
        t.fire()
    while (store.counter("cluster.c.health_check.success").value
           + store.counter("cluster.c.health_check.failure").value) < before + len(timers):
        d.timer_enabled.clear()
        await d.timer_enabled.wait()  # each finished check re-arms its interval timer


def test_http_health_check_warms_and_excludes_failed_hosts() -> None:
    async def scenario() -> None:
        good = Scripted()
        await good.upstream.start()
        dead = closed_port()
        cm, d, store = await start(HTTP, good.upstream.port, dead)
        tlc = cm.thread_local().get("c")
        assert {h.address.port: h.healthy for h in tlc.hosts} == {good.upstream.port: True, dead: False}
        assert {tlc.choose_host().address.port for _ in range(4)} == {good.upstream.port}
        assert good.upstream.requests[0].startswith(b"GET /healthz HTTP/1.1\r\nhost: hc.test\r\nuser-agent: Envoy/HC\r\n")
        assert store.counter("cluster.c.health_check.attempt").value == 2
        assert store.counter("cluster.c.health_check.network_failure").value == 1
        assert store.gauge("cluster.c.membership_healthy").value == 1
        assert store.counter("cluster.c.membership_change").value == 1  # health is not membership
        assert f"c::127.0.0.1:{dead}::health_flags::/failed_active_hc" in cm.clusters_text()
        # No traffic yet: the next checks wait no_traffic_interval.
        assert {t.ms for t in d.enabled_timers("start_check")} == {5000}
        cm.shutdown()
        await good.upstream.stop()

    uvloop.run(scenario())


def test_thresholds_turn_a_host_unhealthy_and_back() -> None:
    async def scenario() -> None:
        a, b = Scripted(), Scripted()
        await a.upstream.start()
        await b.upstream.start()
        cm, d, store = await start(HTTP, a.upstream.port, b.upstream.port)
        tlc = cm.thread_local().get("c")
        host_a = next(h for h in tlc.hosts if h.address.port == a.upstream.port)
        a.status = 503
        await next_check(d, store)
        assert host_a.healthy  # one failure < unhealthy_threshold 2
        await next_check(d, store)
        assert not host_a.healthy
        assert {tlc.choose_host().address.port for _ in range(4)} == {b.upstream.port}
        a.status = 200
        await next_check(d, store)
        assert not host_a.healthy  # one success < healthy_threshold 2
        await next_check(d, store)
        assert host_a.healthy
        assert {tlc.choose_host().address.port for _ in range(4)} == {a.upstream.port, b.upstream.port}
        cm.shutdown()
        await a.upstream.stop()
        await b.upstream.stop()

    uvloop.run(scenario())


def test_timeout_is_a_network_failure_and_tcp_checks_connect() -> None:
    async def scenario() -> None:
        slow = Scripted()
        slow.hang = True
        await slow.upstream.start()
        d = FakeDispatcher(asyncio.get_running_loop())
        store = Store()
        cm = ClusterManager([static_cluster("c", slow.upstream.port, extra=HC.format(kind=HTTP))], d, FakeTls(d), store)
        done = asyncio.get_running_loop().create_future()
        cm.initialize(lambda: done.set_result(True))
        await slow.upstream.request_seen.wait()
        [timeout] = d.enabled_timers("_on_timeout")
        assert timeout.ms == 1000
        timeout.fire()
        await done
        assert store.counter("cluster.c.health_check.network_failure").value == 1
        cm.shutdown()
        await slow.upstream.stop()

        up = Scripted()
        await up.upstream.start()
        cm, d, store = await start(TCP, up.upstream.port, closed_port())
        assert sorted(h.healthy for h in cm.thread_local().get("c").hosts) == [False, True]
        assert up.upstream.requests == []  # a TCP check sends nothing
        cm.shutdown()
        await up.upstream.stop()

    uvloop.run(scenario())
