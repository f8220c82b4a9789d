"""The HTTP/1 connection pool over real loopback sockets: reuse, close, limits, failures."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from test_upstream_support import FakeDispatcher, Recorder, Upstream, closed_port, ok_response, static_cluster
from wasmproxy.stats.store import Store
from wasmproxy.upstream.cluster import ClusterInfo
from wasmproxy.upstream.cluster_stats import ClusterStats
from wasmproxy.upstream.conn_pool import Http1ConnPool, PoolFailureReason, StreamResetReason
from wasmproxy.upstream.host import Host
from wasmproxy.http.stream_info import Address


def make_pool(port: int, extra: str = "") -> tuple[Http1ConnPool, Store, FakeDispatcher]:
    d = FakeDispatcher(asyncio.get_running_loop())
    info = ClusterInfo(static_cluster("c", port, extra=extra))
    store = Store()
    host = Host("c", Address("127.0.0.1", port))
    return Http1ConnPool(d, host, info, ClusterStats(store, info.stat_prefix)), store, d


def run(coro: Any) -> Any:
    return uvloop.run(coro)  # the loop wasmproxy runs on


def c(store: Store, name: str) -> int:
    return store.counter("cluster.c." + name).value


def g(store: Store, name: str) -> int:
    return store.gauge("cluster.c." + name).value


async def keep_alive_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
    close = b"/close" in head.split(b"\r\n")[0]
    writer.write(ok_response(b"hello", b"connection: close\r\n" if close else b""))
    await writer.drain()
    return not close


def test_connection_is_reused_after_a_complete_response() -> None:
    async def scenario() -> None:
        up = await Upstream(keep_alive_handler).start()
        pool, store, _ = make_pool(up.port)
        for _ in range(3):
            r = Recorder()
            pool.new_stream(r, r)
            await r.done
            assert r.headers.get(":status") == "200" and r.body == b"hello"
        assert up.connections == 1 and len(up.requests) == 3
        assert c(store, "upstream_cx_total") == 1 and c(store, "upstream_rq_total") == 3
        assert g(store, "upstream_cx_active") == 1 and g(store, "upstream_rq_active") == 0
        assert pool.host.stats.rq_total == 3 and pool.host.stats.cx_active == 1
        assert up.requests[0].startswith(b"GET / HTTP/1.1\r\nhost: up\r\n")
        pool.drain_connections()
        assert g(store, "upstream_cx_active") == 0 and c(store, "upstream_cx_destroy_local") == 1
        assert store.histogram("cluster.c.upstream_rq_per_cx").used
        assert store.histogram("cluster.c.upstream_cx_length_ms").used
        assert store.histogram("cluster.c.upstream_cx_connect_ms").used
        await up.stop()

    run(scenario())


def test_connection_close_response_is_not_reused() -> None:
    async def scenario() -> None:
        up = await Upstream(keep_alive_handler).start()
        pool, store, _ = make_pool(up.port)
        for _ in range(2):
            r = Recorder("/close")
            pool.new_stream(r, r)
            await r.done
            assert r.body == b"hello"
        assert up.connections == 2
        assert c(store, "upstream_cx_close_notify") == 2
        await up.stop()

    run(scenario())


def test_idle_connection_closed_by_upstream_is_dropped() -> None:
    async def scenario() -> None:
        closed = asyncio.Event()

        async def close_after_one(reader: Any, writer: Any, head: bytes) -> bool:
            writer.write(ok_response())
            await writer.drain()
            closed.set()
            return False  # the server closes the idle keep-alive connection

        up = await Upstream(close_after_one).start()
        pool, store, _ = make_pool(up.port)
        r = Recorder()
        pool.new_stream(r, r)
        await r.done
        await closed.wait()
        r2 = Recorder()
        pool.new_stream(r2, r2)
        await r2.done
        # Either the close was noticed before reuse (new connection) or the reuse saw a termination.
        assert r2.body == b"ok" or r2.reset is StreamResetReason.ConnectionTermination
        await up.stop()

    run(scenario())


def test_max_connections_queues_requests_on_one_connection() -> None:
    async def scenario() -> None:
        up = await Upstream(keep_alive_handler).start()
        pool, store, _ = make_pool(up.port, extra="circuit_breakers: {thresholds: [{max_connections: 1}]}")
        rs = [Recorder(f"/{i}") for i in range(3)]
        for r in rs:
            pool.new_stream(r, r)
        await asyncio.gather(*(r.done for r in rs))
        assert [r.body for r in rs] == [b"hello"] * 3
        assert up.connections == 1
        assert c(store, "upstream_cx_overflow") >= 1 and c(store, "upstream_rq_pending_total") == 3
        await up.stop()

    run(scenario())


def test_pending_overflow_fails_at_once() -> None:
    async def scenario() -> None:
        up = await Upstream(keep_alive_handler).start()
        pool, store, _ = make_pool(up.port, extra="circuit_breakers: {thresholds: [{max_pending_requests: 1}]}")
        first, second = Recorder(), Recorder()
        pool.new_stream(first, first)
        pool.new_stream(second, second)
        assert second.failure == (PoolFailureReason.Overflow, "")
        assert c(store, "upstream_rq_pending_overflow") == 1
        await first.done
        await up.stop()

    run(scenario())


def test_connect_refused_is_a_remote_connection_failure() -> None:
    async def scenario() -> None:
        pool, store, _ = make_pool(closed_port())
        r = Recorder()
        assert pool.new_stream(r, r) is not None
        await r.done
        assert r.failure == (PoolFailureReason.RemoteConnectionFailure, "delayed connect error: Connection refused")
        # As Envoy counts it for a refused connect.
        assert c(store, "upstream_cx_connect_fail") == 1 and c(store, "upstream_cx_destroy_remote") == 1
        assert c(store, "upstream_rq_pending_failure_eject") == 1 and c(store, "upstream_rq_total") == 0
        assert pool.host.stats.cx_connect_fail == 1 and g(store, "upstream_cx_active") == 0

    run(scenario())


def test_connect_timeout() -> None:
    async def scenario() -> None:
        up = await Upstream(keep_alive_handler).start()
        pool, store, d = make_pool(up.port, extra="connect_timeout: 0.5s")
        r = Recorder()
        pool.new_stream(r, r)
        [timer] = d.enabled_timers("_on_connect_timeout")
        assert timer.ms == 500
        timer.fire()  # before the loop ran the connect
        await r.done
        assert r.failure == (PoolFailureReason.Timeout, "")
        assert c(store, "upstream_cx_connect_timeout") == 1 and c(store, "upstream_cx_connect_fail") == 1
        await up.stop()

    run(scenario())


def test_reset_before_headers_reports_connection_termination() -> None:
    async def scenario() -> None:
        async def drop(reader: Any, writer: Any, head: bytes) -> bool:
            return False

        up = await Upstream(drop).start()
        pool, store, _ = make_pool(up.port)
        r = Recorder()
        pool.new_stream(r, r)
        await r.done
        assert r.reset is StreamResetReason.ConnectionTermination
        assert c(store, "upstream_cx_destroy_remote_with_active_rq") == 1
        assert g(store, "upstream_rq_active") == 0
        await up.stop()

    run(scenario())


def test_close_delimited_body_ends_at_eof() -> None:
    async def no_length(reader: Any, writer: Any, head: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        await writer.drain()
        return False

    async def scenario() -> None:
        up = await Upstream(no_length).start()
        pool, store, _ = make_pool(up.port)
        r = Recorder()
        pool.new_stream(r, r)
        await r.done
        assert r.reset is None and r.body == b"until close"
        await up.stop()

    run(scenario())


def test_local_reset_closes_the_connection_and_cancel_withdraws_pending() -> None:
    async def scenario() -> None:
        async def hang(reader: Any, writer: Any, head: bytes) -> bool:
            await reader.read()
            return False

        up = await Upstream(hang).start()
        pool, store, _ = make_pool(up.port, extra="circuit_breakers: {thresholds: [{max_connections: 1}]}")
        first = Recorder()
        pool.new_stream(first, first)
        await up.request_seen.wait()
        queued = Recorder()
        handle = pool.new_stream(queued, queued)
        assert handle is not None
        handle.cancel()
        assert g(store, "upstream_rq_pending_active") == 0 and c(store, "upstream_rq_cancelled") == 1
        first.encoder.reset_stream()
        assert g(store, "upstream_rq_active") == 0 and not first.done.done()
        assert not pool.has_active_connections()
        await up.stop()

    run(scenario())


def test_max_requests_per_connection() -> None:
    async def scenario() -> None:
        up = await Upstream(keep_alive_handler).start()
        pool, store, _ = make_pool(up.port, extra="common_http_protocol_options: {max_requests_per_connection: 2}")
        for _ in range(3):
            r = Recorder()
            pool.new_stream(r, r)
            await r.done
        assert up.connections == 2 and c(store, "upstream_cx_max_requests") == 1
        await up.stop()

    run(scenario())


def test_idle_timeout_closes_a_ready_connection_and_zero_disables_it() -> None:
    # Envoy 1.40 (checked against .venv/bin/envoy): common_http_protocol_options.idle_timeout 0s
    # keeps an idle upstream connection open (upstream_cx_idle_timeout stays 0), as its docs say
    # ("To disable idle timeouts explicitly set this to 0").
    async def scenario(idle: str) -> tuple[int, int, int]:
        up = await Upstream(keep_alive_handler).start()
        pool, store, d = make_pool(up.port, extra=f"common_http_protocol_options: {{idle_timeout: {idle}}}")
        r = Recorder()
        pool.new_stream(r, r)
        await r.done
        for timer in d.enabled_timers("_on_idle_timeout"):
            timer.fire()
        result = (g(store, "upstream_cx_active"), c(store, "upstream_cx_idle_timeout"), len(d.enabled_timers("_on_idle_timeout")))
        pool.drain_connections()
        await up.stop()
        return result

    assert run(scenario("2s")) == (0, 1, 0)
    assert run(scenario("0s")) == (1, 0, 0)
