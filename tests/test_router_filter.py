"""The router filter end to end over loopback sockets, with the bodies, headers, details and flags
Envoy 1.40 produced for the same cases (captured with a live Envoy and a scripted upstream)."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop
import yaml
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from google.protobuf.json_format import ParseDict

from test_upstream_support import (
    FakeDispatcher,
    FakeStream,
    FakeTls,
    Upstream,
    closed_port,
    ok_response,
    read_body,
    static_cluster,
)
from wasmproxy.http.filter import FilterDataStatus, FilterHeadersStatus
from wasmproxy.http.headers import HeaderMap
from wasmproxy.router.config import RouteConfig
from wasmproxy.router.router_filter import Router, RouterConfig, create_router_filter_factory
from wasmproxy.stats.store import Store
from wasmproxy.upstream.cluster_manager import ClusterManager

ROUTES = """
validate_clusters: false
response_headers_to_add: [{header: {key: x-rc-resp, value: rc}}]
virtual_hosts:
- name: vh
  domains: ["*"]
  include_attempt_count_in_response: true
  response_headers_to_add: [{header: {key: x-vh-resp, value: vh}}]
  routes:
  - {match: {prefix: /retry-refused}, route: {cluster: refused, retry_policy: {retry_on: connect-failure, num_retries: 2}}}
  - {match: {prefix: /retry-5xx}, route: {cluster: up, retry_policy: {retry_on: 5xx, num_retries: 2}}}
  - {match: {prefix: /retry-try}, route: {cluster: up, retry_policy: {retry_on: 5xx, num_retries: 1, per_try_timeout: 1s}}}
  - {match: {prefix: /timeout}, route: {cluster: up, timeout: 0.3s}}
  - {match: {prefix: /refused}, route: {cluster: refused}}
  - {match: {prefix: /overflow}, route: {cluster: ovf}}
  - {match: {prefix: /unknown404}, route: {cluster: nope, cluster_not_found_response_code: NOT_FOUND}}
  - {match: {prefix: /unknown}, route: {cluster: nope}}
  - {match: {prefix: /nohealthy}, route: {cluster: empty}}
  - {match: {prefix: /direct}, direct_response: {status: 202, body: {inline_string: hello}}}
  - {match: {prefix: /redir}, redirect: {path_redirect: /new}}
  - {match: {prefix: /rw/}, route: {cluster: up, prefix_rewrite: /x/, host_rewrite_literal: foo.com}}
  - match: {prefix: /}
    route: {cluster: up}
    response_headers_to_add: [{header: {key: x-route-resp, value: r}}]
"""


class Harness:
    """A cluster manager on a fake dispatcher and one Router per request."""

    def __init__(self, upstream_port: int, router_proto: str = "{}") -> None:
        self.d = FakeDispatcher(asyncio.get_running_loop())
        self.store = Store()
        self.cm = ClusterManager(
            [static_cluster("up", upstream_port), static_cluster("refused", closed_port()),
             static_cluster("empty"),
             static_cluster("ovf", upstream_port, extra="circuit_breakers: {thresholds: [{max_pending_requests: 0}]}")],
            self.d, FakeTls(self.d), self.store,
        )
        self.routes = RouteConfig.from_proto(ParseDict(yaml.safe_load(ROUTES), route_pb2.RouteConfiguration()))
        self.config = RouterConfig(ParseDict(yaml.safe_load(router_proto), router_pb2.Router()), self.cm.thread_local,
                                   "http.ingress.", lambda _dispatcher: self.store)

    def start(self, path: str, method: str = "GET", body: bytes = b"", **headers: str) -> tuple[Router, FakeStream, HeaderMap]:
        h = HeaderMap([(":method", method), (":path", path), (":authority", "127.0.0.1:18080"),
                       (":scheme", "http"), ("x-forwarded-proto", "http")])
        for k, v in headers.items():
            h.add(k.replace("_", "-"), v)
        stream = FakeStream(self.d, self.routes.route(h))
        router = Router(self.config)
        router.set_decoder_filter_callbacks(stream)  # type: ignore[arg-type]
        assert router.decode_headers(h, not body) == FilterHeadersStatus.StopIteration
        if body:
            assert router.decode_data(bytearray(body), True) == FilterDataStatus.StopIterationNoBuffer
        return router, stream, h

    async def request(self, path: str, **kw: Any) -> FakeStream:
        router, stream, _ = self.start(path, **kw)
        await stream.done
        router.on_destroy()
        return stream

    def counter(self, name: str) -> int:
        return self.store.counter(name).value


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
    body = await read_body(reader, head)
    writer.write(ok_response(head + body, b"x-envoy-upstream-foo: bar\r\nConnection: keep-alive\r\n"))
    await writer.drain()
    return True


def run(coro: Any) -> Any:
    return uvloop.run(coro)  # the loop wasmproxy runs on


def test_proxies_request_and_response_with_envoy_headers() -> None:
    async def scenario() -> None:
        up = await Upstream(echo).start()
        hx = Harness(up.port)
        s = await hx.request("/hello?x=1", x_envoy_upstream_rq_timeout_ms="nope")
        assert s.local_reply is None
        head = bytes(s.body).decode()
        lines = head.split("\r\n")
        assert lines[0] == "GET /hello?x=1 HTTP/1.1"
        assert "host: 127.0.0.1:18080" in lines
        assert "x-forwarded-proto: http" in lines
        assert "x-envoy-expected-rq-timeout-ms: 15000" in lines
        assert not any(l.startswith("x-envoy-upstream-rq-timeout-ms") for l in lines)
        resp = s.response_headers
        # Upstream headers (hop-by-hop removed), then service time, then route/vhost/config additions.
        assert [k for k, _ in resp.items()] == [":status", "content-length", "x-envoy-upstream-foo",
                                                "x-envoy-upstream-service-time", "x-route-resp", "x-vh-resp",
                                                "x-rc-resp", "x-envoy-attempt-count"]
        assert resp.get("x-envoy-upstream-service-time").isdigit()
        info = s.stream_info
        assert info.upstream_cluster == "up" and str(info.upstream_host) == f"127.0.0.1:{up.port}"
        assert info.response_code_details == "via_upstream" and info.response_flags == []
        assert info.response_code == 200
        assert info.upstream_local_address is not None
        assert hx.counter("cluster.up.upstream_rq_200") == 1
        assert hx.counter("cluster.up.upstream_rq_2xx") == 1
        assert hx.counter("cluster.up.external.upstream_rq_completed") == 1
        # The connection is reused for the next request.
        await hx.request("/again")
        assert up.connections == 1
        await up.stop()

    run(scenario())


def test_request_body_is_streamed_upstream() -> None:
    async def scenario() -> None:
        up = await Upstream(echo).start()
        hx = Harness(up.port)
        s = await hx.request("/post", method="POST", body=b"payload", content_length="7")
        assert bytes(s.body).endswith(b"\r\n\r\npayload")
        # Without content-length the body goes chunked, chunk by chunk as it arrives.
        h = HeaderMap([(":method", "POST"), (":path", "/chunked"), (":authority", "a")])
        stream = FakeStream(hx.d, hx.routes.route(h))
        router = Router(hx.config)
        router.set_decoder_filter_callbacks(stream)  # type: ignore[arg-type]
        router.decode_headers(h, False)
        router.decode_data(bytearray(b"ab"), False)
        assert hx.d.enabled_timers("_on_response_timeout") == []  # the timeout starts at end of request
        router.decode_data(bytearray(b"cd"), True)
        assert len(hx.d.enabled_timers("_on_response_timeout")) == 1
        await stream.done
        echoed = bytes(stream.body)
        assert b"transfer-encoding: chunked" in echoed and echoed.endswith(b"\r\n\r\nabcd")
        await up.stop()

    run(scenario())


def test_route_timeout_is_504_upstream_request_timeout() -> None:
    async def scenario() -> None:
        async def hang(reader: Any, writer: Any, head: bytes) -> bool:
            await reader.read()
            return False

        up = await Upstream(hang).start()
        hx = Harness(up.port)
        router, s, headers = hx.start("/timeout")
        assert headers.get("x-envoy-expected-rq-timeout-ms") == "300"
        await up.request_seen.wait()
        [timer] = hx.d.enabled_timers("_on_response_timeout")
        assert timer.ms == 300
        timer.fire()
        await s.done
        assert s.local_reply == (504, b"upstream request timeout", "response_timeout")
        assert s.response_headers.get("x-vh-resp") == "vh" and s.response_headers.get("x-rc-resp") == "rc"
        assert s.stream_info.response_flags == ["UT"]
        assert hx.counter("cluster.up.upstream_rq_timeout") == 1
        assert hx.counter("cluster.up.upstream_rq_504") == 1
        assert hx.counter("cluster.up.upstream_cx_destroy_local_with_active_rq") == 1
        await up.stop()

    run(scenario())


def test_timeout_headers_override_the_route_timeout() -> None:
    async def scenario() -> None:
        up = await Upstream(echo).start()
        hx = Harness(up.port)
        router, s, headers = hx.start("/", x_envoy_upstream_rq_timeout_ms="1234", x_envoy_internal="true")
        assert headers.get("x-envoy-expected-rq-timeout-ms") == "1234"
        assert [t.ms for t in hx.d.enabled_timers("_on_response_timeout")] == [1234]
        await s.done
        # A per-try header not below the global timeout is ignored.
        router, s, headers = hx.start("/", x_envoy_upstream_rq_timeout_ms="500",
                                      x_envoy_upstream_rq_per_try_timeout_ms="200", x_envoy_internal="true")
        assert headers.get("x-envoy-expected-rq-timeout-ms") == "200"
        assert "x-envoy-upstream-rq-per-try-timeout-ms" not in headers
        await s.done
        # The HCM strips a client's control headers (cleanInternalHeaders); one a filter added
        # afterwards reaches the router and is honoured, as in Envoy.
        router, s, headers = hx.start("/", x_envoy_upstream_rq_timeout_ms="1500")
        assert headers.get("x-envoy-expected-rq-timeout-ms") == "1500"
        await s.done
        await up.stop()

    run(scenario())


def test_connect_failure_is_503_with_envoys_text() -> None:
    async def scenario() -> None:
        hx = Harness(closed_port())
        s = await hx.request("/refused")
        assert s.local_reply == (
            503,
            b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
            # Envoy 1.40 puts the transport failure in the details only.
            "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
        )
        assert s.stream_info.upstream_transport_failure_reason == "delayed connect error: Connection refused"
        assert s.stream_info.response_flags == ["UF"]
        assert hx.counter("cluster.refused.upstream_rq_503") == 1
        assert hx.counter("cluster.refused.upstream_cx_connect_fail") == 1

    run(scenario())


def test_reset_before_headers_is_503_connection_termination() -> None:
    async def scenario() -> None:
        async def drop(reader: Any, writer: Any, head: bytes) -> bool:
            return False

        up = await Upstream(drop).start()
        hx = Harness(up.port)
        s = await hx.request("/")
        assert s.local_reply[:2] == (
            503, b"upstream connect error or disconnect/reset before headers. reset reason: connection termination")
        assert s.stream_info.response_flags == ["UC"]
        await up.stop()

    run(scenario())


def test_reset_after_headers_resets_downstream() -> None:
    async def scenario() -> None:
        async def partial(reader: Any, writer: Any, head: bytes) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
            await writer.drain()
            return False

        up = await Upstream(partial).start()
        hx = Harness(up.port)
        s = await hx.request("/")
        assert s.response_headers.get(":status") == "200" and bytes(s.body) == b"abc"
        # Envoy 1.40: an incomplete body is a protocol error once the response started.
        assert s.was_reset and s.local_reply is None and s.stream_info.response_flags == ["UPE"]
        assert hx.counter("http.ingress.rq_reset_after_downstream_response_started") == 1
        assert s.stream_info.response_code_details == "upstream_reset_after_response_started{protocol_error}"
        await up.stop()

    run(scenario())


def test_local_answers_no_route_unknown_cluster_no_host_direct_redirect() -> None:
    async def scenario() -> None:
        hx = Harness(closed_port())
        router = Router(hx.config)
        s = FakeStream(hx.d, None)
        router.set_decoder_filter_callbacks(s)  # type: ignore[arg-type]
        router.decode_headers(HeaderMap([(":method", "GET"), (":path", "/")]), True)
        assert s.local_reply == (404, b"", "route_not_found") and s.stream_info.response_flags == ["NR"]
        assert s.response_headers.items() == [(":status", "404")]  # no route, no route headers

        s = await hx.request("/unknown")
        assert s.local_reply == (503, b"", "cluster_not_found") and s.stream_info.response_flags == ["NC"]
        assert s.response_headers.get("x-vh-resp") == "vh"
        s = await hx.request("/unknown404")
        assert s.local_reply[0] == 404

        s = await hx.request("/nohealthy")
        assert s.local_reply == (503, b"no healthy upstream", "no_healthy_upstream")
        assert s.response_headers.get("x-envoy-attempt-count") == "1"  # as Envoy
        assert s.stream_info.response_flags == ["UH"]
        assert hx.counter("cluster.empty.upstream_cx_none_healthy") == 1
        assert hx.counter("cluster.empty.upstream_rq_503") == 1

        s = await hx.request("/direct")
        assert s.local_reply == (202, b"hello", "direct_response")
        assert s.response_headers.get("x-rc-resp") == "rc"

        s = await hx.request("/redir/x?a=1")
        assert s.local_reply[:2] == (301, b"")
        assert s.response_headers.get("location") == "http://127.0.0.1:18080/new?a=1"
        # Envoy's router stats, under the connection manager's prefix.
        assert [hx.counter("http.ingress." + n) for n in
                ("rq_total", "no_route", "no_cluster", "rq_direct_response", "rq_redirect")] == [6, 1, 2, 1, 1]

    run(scenario())


def test_rewrites_reach_the_upstream() -> None:
    async def scenario() -> None:
        up = await Upstream(echo).start()
        hx = Harness(up.port)
        s = await hx.request("/rw/abc")
        lines = bytes(s.body).decode().split("\r\n")
        assert lines[0] == "GET /x/abc HTTP/1.1"
        assert "host: foo.com" in lines
        assert "x-envoy-original-host: 127.0.0.1:18080" in lines
        assert "x-envoy-original-path: /rw/abc" in lines
        await up.stop()

    run(scenario())


def test_suppress_envoy_headers() -> None:
    async def scenario() -> None:
        up = await Upstream(echo).start()
        hx = Harness(up.port, router_proto="{suppress_envoy_headers: true}")
        s = await hx.request("/rw/abc")
        head = bytes(s.body).decode()
        assert "x-envoy-expected-rq-timeout-ms" not in head and "x-envoy-original-path" not in head
        assert "x-envoy-upstream-service-time" not in s.response_headers
        await up.stop()

    run(scenario())


def test_destroy_mid_request_closes_the_upstream_connection() -> None:
    async def scenario() -> None:
        async def hang(reader: Any, writer: Any, head: bytes) -> bool:
            await reader.read()
            return False

        up = await Upstream(hang).start()
        hx = Harness(up.port)
        router, s, _ = hx.start("/")
        await up.request_seen.wait()
        router.on_destroy()
        assert hx.store.gauge("cluster.up.upstream_cx_active").value == 0
        assert hx.d.enabled_timers("_on_response_timeout") == []
        await up.stop()

    run(scenario())


def test_factory_installs_a_router_per_stream() -> None:
    class Cm:
        def thread_local(self) -> Any:
            raise AssertionError("only called per request")

    class Ctx:
        cluster_manager = Cm()

    class Chain:
        def __init__(self) -> None:
            self.filters: list[Any] = []

        def add_stream_decoder_filter(self, f: Any) -> None:
            self.filters.append(f)

    factory = create_router_filter_factory(router_pb2.Router(), Ctx())
    chain = Chain()
    factory(chain)
    factory(chain)
    assert len(chain.filters) == 2 and all(isinstance(f, Router) for f in chain.filters)
    assert chain.filters[0] is not chain.filters[1]


def test_pending_overflow_is_503_overflow_with_overloaded_header() -> None:
    async def scenario() -> None:
        hx = Harness(closed_port())
        s = await hx.request("/overflow")
        assert s.local_reply == (
            503, b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
            "upstream_reset_before_response_started{overflow}")
        # As Envoy 1.40 sent it: route-level headers first, then x-envoy-overloaded.
        assert [k for k, _ in s.response_headers.items()] == [
            ":status", "x-vh-resp", "x-rc-resp", "x-envoy-overloaded", "x-envoy-attempt-count"]
        assert s.stream_info.response_flags == ["UO"]
        assert hx.counter("cluster.ovf.upstream_rq_pending_overflow") == 1
        assert hx.counter("cluster.ovf.upstream_rq_503") == 1

    run(scenario())


# Envoy 1.40 with the same routes, a refused port and an upstream answering 503 then 200:
#   /retry-refused -> 503 "...retried and the latest reset reason: remote connection failure",
#                     flags URX,UF, x-envoy-attempt-count: 3
#   /retry-5xx     -> 200 "good 2", x-envoy-attempt-count: 2; discarded 503s count as retry.upstream_rq_503
#   always 503     -> the last 503 is forwarded, flags URX, x-envoy-attempt-count: 3


def test_connect_failure_retries_then_503_retried_text() -> None:
    async def scenario() -> None:
        hx = Harness(closed_port())
        router, s, _ = hx.start("/retry-refused")
        for ceiling in (25, 75):  # jittered exponential back-off from the 25 ms base
            timer = await hx.d.fire_when_enabled("_do_retry")
            assert 0 <= timer.fired_ms < ceiling
        await s.done
        assert s.local_reply[:2] == (503, b"upstream connect error or disconnect/reset before headers. "
                                          b"retried and the latest reset reason: remote connection failure")
        assert s.stream_info.response_flags == ["URX", "UF"]
        assert s.response_headers.get("x-envoy-attempt-count") == "3"
        assert hx.counter("cluster.refused.upstream_rq_retry") == 2
        assert hx.counter("cluster.refused.upstream_rq_retry_limit_exceeded") == 1
        assert hx.counter("cluster.refused.upstream_rq_pending_failure_eject") == 3
        assert hx.counter("cluster.refused.upstream_rq_503") == 1
        assert hx.cm.clusters["refused"].info.resource_manager.retries.count == 0

    run(scenario())


def test_5xx_is_retried_and_the_good_response_forwarded() -> None:
    async def scenario() -> None:
        seen = [0]

        async def flaky(reader: Any, writer: Any, head: bytes) -> bool:
            seen[0] += 1
            always = b"always" in head
            if always or seen[0] % 2 == 1:
                body = b"bad %d" % seen[0]
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            else:
                writer.write(ok_response(b"good %d" % seen[0]))
            await writer.drain()
            return True

        up = await Upstream(flaky).start()
        hx = Harness(up.port)
        router, s, _ = hx.start("/retry-5xx")
        await hx.d.fire_when_enabled("_do_retry")
        await s.done
        assert s.response_headers.get(":status") == "200" and bytes(s.body) == b"good 2"
        assert s.response_headers.get("x-envoy-attempt-count") == "2"
        assert s.stream_info.response_flags == [] and s.stream_info.upstream_request_attempt_count == 2
        assert hx.counter("cluster.up.retry.upstream_rq_503") == 1
        assert hx.counter("cluster.up.upstream_rq_503") == 0 and hx.counter("cluster.up.upstream_rq_200") == 1
        assert hx.counter("cluster.up.upstream_rq_retry_success") == 1

        router, s, _ = hx.start("/retry-5xx/always")
        for _ in range(2):
            hx.d.time_source.now += 0.04  # the back-off, as the upstream is told on each retry
            await hx.d.fire_when_enabled("_do_retry")
        await s.done
        assert s.response_headers.get(":status") == "503" and bytes(s.body) == b"bad 5"
        assert s.stream_info.response_flags == ["URX"]
        assert s.response_headers.get("x-envoy-attempt-count") == "3"
        assert hx.counter("cluster.up.retry.upstream_rq_503") == 3
        assert hx.counter("cluster.up.upstream_rq_retry_limit_exceeded") == 1
        # Each retry carries the time left of the global timeout (Envoy's setTimeoutHeaders).
        assert [r.split(b"x-envoy-expected-rq-timeout-ms: ")[1].split(b"\r\n")[0] for r in up.requests[-3:]] == [
            b"15000", b"14960", b"14920"]
        await up.stop()

    run(scenario())


def test_per_try_timeout_retries_then_504() -> None:
    async def scenario() -> None:
        async def hang(reader: Any, writer: Any, head: bytes) -> bool:
            await reader.read()
            return False

        up = await Upstream(hang).start()
        hx = Harness(up.port)
        router, s, _ = hx.start("/retry-try", method="POST", body=b"replayed", content_length="8")
        await up.request_seen.wait()
        up.request_seen.clear()
        timer = await hx.d.fire_when_enabled("_on_per_try_timeout")
        assert timer.fired_ms == 1000
        await hx.d.fire_when_enabled("_do_retry")
        await up.request_seen.wait()
        await hx.d.fire_when_enabled("_on_per_try_timeout")
        await s.done
        assert s.local_reply[:2] == (504, b"upstream request timeout")
        assert hx.counter("cluster.up.upstream_rq_per_try_timeout") == 2
        assert len(up.requests) == 2 and all(b"content-length: 8" in r for r in up.requests)
        # The upstream is told the per-try timeout (Envoy's FilterUtility::finalTimeout).
        assert all(b"x-envoy-expected-rq-timeout-ms: 1000" in r for r in up.requests)
        await up.stop()

    run(scenario())


def test_flow_control_both_ways() -> None:
    async def scenario() -> None:
        async def hang(reader: Any, writer: Any, head: bytes) -> bool:
            await reader.read()
            return False

        up = await Upstream(hang).start()
        hx = Harness(up.port)
        h = HeaderMap([(":method", "POST"), (":path", "/"), (":authority", "a")])
        stream = FakeStream(hx.d, hx.routes.route(h))
        router = Router(hx.config)
        router.set_decoder_filter_callbacks(stream)  # type: ignore[arg-type]
        router.decode_headers(h, False)
        # Body beyond the cluster's buffer limit while the connection is not up yet: the
        # router asks the connection manager to stop reading the client.
        limit = hx.cm.clusters["up"].info.per_connection_buffer_limit
        router.decode_data(bytearray(limit + 1), False)
        assert stream.watermark_events == ["above"]
        await up.request_seen.wait()
        assert stream.watermark_events == ["above", "below"]  # flushed on connect
        # The client's connection is backed up: stop reading the upstream until it drains.
        transport = router.upstream.encoder._client.transport
        router.on_above_write_buffer_high_watermark()
        assert not transport.is_reading()
        router.on_below_write_buffer_low_watermark()
        assert transport.is_reading()
        router.on_destroy()
        await up.stop()

    run(scenario())


def test_request_mirror_sends_a_shadow_copy() -> None:
    # Envoy 1.40 sent the mirror "POST /mirror?x=1" with host "127.0.0.1-shadow:19480", the
    # finalized request headers, x-envoy-internal: true and x-forwarded-for: <local address>.
    async def scenario() -> None:
        up = await Upstream(echo).start()
        shadow = await Upstream(echo).start()
        hx = Harness(up.port)
        hx.cm = ClusterManager([static_cluster("up", up.port), static_cluster("shadow", shadow.port)],
                               hx.d, FakeTls(hx.d), hx.store)
        hx.config = RouterConfig(router_pb2.Router(), hx.cm.thread_local)
        hx.routes = RouteConfig.from_proto(ParseDict(yaml.safe_load("""
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {prefix: /mirror}
    route: {cluster: up, request_mirror_policies: [{cluster: shadow}, {cluster: missing}]}
"""), route_pb2.RouteConfiguration()))
        s = await hx.request("/mirror?x=1", method="POST", body=b"hello", content_length="5")
        assert bytes(s.body).endswith(b"hello")
        await shadow.request_seen.wait()
        head = shadow.requests[0].decode()
        assert head.startswith("POST /mirror?x=1 HTTP/1.1\r\nhost: 127.0.0.1-shadow:18080\r\n")
        assert "x-envoy-internal: true" in head and "x-forwarded-for: " in head
        assert "x-envoy-expected-rq-timeout-ms: 15000" in head
        await up.stop()
        await shadow.stop()

    run(scenario())


def test_previous_hosts_predicate_repicks_a_tried_host() -> None:
    async def scenario() -> None:
        async def unavailable(reader: Any, writer: Any, head: bytes) -> bool:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return True

        bad, good = await Upstream(unavailable).start(), await Upstream(echo).start()
        for predicate, expected in (("[{name: envoy.retry_host_predicates.previous_hosts}]", "200"), ("[]", "503")):
            hx = Harness(bad.port)
            hx.cm = ClusterManager([static_cluster("two", bad.port, good.port)], hx.d, FakeTls(hx.d), hx.store)
            hx.config = RouterConfig(router_pb2.Router(), hx.cm.thread_local)
            hx.routes = RouteConfig.from_proto(ParseDict(yaml.safe_load(f"""
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {{prefix: /}}
    route: {{cluster: two, retry_policy: {{retry_on: 5xx, num_retries: 1, retry_host_predicate: {predicate}}}}}
"""), route_pb2.RouteConfiguration()))
            tlc = hx.cm.thread_local().get("two")
            bad_host, good_host = tlc.hosts
            picks = iter([bad_host, bad_host, good_host])
            tlc.choose_host = lambda hash_key=None: next(picks)  # type: ignore[method-assign]
            router, s, _ = hx.start("/")
            await hx.d.fire_when_enabled("_do_retry")
            await s.done
            assert s.response_headers.get(":status") == expected
        await bad.stop()
        await good.stop()

    run(scenario())


def test_header_value_the_upstream_codec_refuses_is_503() -> None:
    # Envoy: a header value with CR/LF/NUL (e.g. set by a plugin) fails encodeHeaders upstream:
    # 503 "invalid header value for: <name>".
    async def scenario() -> None:
        up = await Upstream(echo).start()
        hx = Harness(up.port)
        s = await hx.request("/", x_bad="line1\nline2")
        assert s.local_reply == (503, b"invalid header value for: x-bad",
                                 "filter_removed_required_request_headers{invalid_header_value_for:_x-bad}")
        assert s.stream_info.response_flags == ["DPE"]
        assert up.requests == []
        assert hx.store.gauge("cluster.up.upstream_rq_active").value == 0
        await up.stop()

    run(scenario())


def test_a_completed_upstream_request_is_freed_without_the_cyclic_gc() -> None:
    # The pool drops its stream's decoder once the response is delivered, so the router's
    # UpstreamRequest and its RequestEncoder (which point at each other) go by refcount.
    import gc
    import weakref

    async def scenario() -> None:
        up = await Upstream(echo).start()
        hx = Harness(up.port)
        gc.disable()
        try:
            router, stream, _ = hx.start("/hello")
            upstream = router.upstream
            assert upstream is not None
            ref = weakref.ref(upstream)
            del upstream
            await stream.done
            router.on_destroy()
            assert router.upstream is None and ref() is None
        finally:
            gc.enable()
        await up.stop()

    run(scenario())
