"""AsyncClient (what Wasm http_call uses): responses, Envoy's local replies as responses, failures, cancel."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from test_upstream_support import FakeDispatcher, FakeTls, Upstream, closed_port, ok_response, read_body, static_cluster
from wasmproxy.http.headers import HeaderMap
from wasmproxy.stats.store import Store
from wasmproxy.upstream.cluster_manager import ClusterManager


class Callbacks:
    def __init__(self) -> None:
        self.result: Any = None
        self.done = asyncio.get_running_loop().create_future()

    def on_success(self, headers: HeaderMap, body: bytes, trailers: HeaderMap | None) -> None:
        self.result = ("success", headers, body, trailers)
        self.done.set_result(None)

    def on_failure(self, reason: str) -> None:
        self.result = ("failure", reason)
        self.done.set_result(None)


def setup(port: int) -> tuple[Any, FakeDispatcher, Store]:
    d = FakeDispatcher(asyncio.get_running_loop())
    store = Store()
    cm = ClusterManager([static_cluster("up", port), static_cluster("empty")], d, FakeTls(d), store)
    return cm.thread_local().http_async_client(), d, store


def request(path: str = "/") -> HeaderMap:
    return HeaderMap([(":method", "POST"), (":path", path), (":authority", "svc")])


def test_success_with_body_and_outbound_headers() -> None:
    async def scenario() -> None:
        async def echo(reader: Any, writer: Any, head: bytes) -> bool:
            body = await read_body(reader, head)
            writer.write(ok_response(head + body, b"x-up: 1\r\n"))
            await writer.drain()
            return True

        up = await Upstream(echo).start()
        client, _, store = setup(up.port)
        cb = Callbacks()
        req = client.send("up", request("/call"), b"hi", None, 1000, cb)
        assert req is not None
        await cb.done
        kind, headers, body, trailers = cb.result
        assert kind == "success" and headers.get(":status") == "200" and headers.get("x-up") == "1"
        text = body.decode()
        assert text.startswith("POST /call HTTP/1.1\r\nhost: svc\r\n") and text.endswith("\r\n\r\nhi")
        assert "x-envoy-internal: true" in text and "x-forwarded-for: " in text
        assert "x-envoy-expected-rq-timeout-ms: 1000" in text
        assert store.counter("cluster.up.internal.upstream_rq_200").value == 1
        await up.stop()

    uvloop.run(scenario())


def test_timeout_is_a_504_response_not_a_failure() -> None:
    async def scenario() -> None:
        async def hang(reader: Any, writer: Any, head: bytes) -> bool:
            await reader.read()
            return False

        up = await Upstream(hang).start()
        client, d, _ = setup(up.port)
        cb = Callbacks()
        client.send("up", request(), b"", None, 50, cb)
        await up.request_seen.wait()
        [timer] = d.enabled_timers("_on_response_timeout")
        assert timer.ms == 50
        timer.fire()
        await cb.done
        kind, headers, body, _ = cb.result
        assert (kind, headers.get(":status"), body) == ("success", "504", b"upstream request timeout")
        assert headers.get("content-type") == "text/plain" and headers.get("content-length") == "24"
        await up.stop()

    uvloop.run(scenario())


def test_connect_failure_is_a_503_response() -> None:
    async def scenario() -> None:
        client, _, _ = setup(closed_port())
        cb = Callbacks()
        assert client.send("up", request(), b"", None, 1000, cb) is not None
        await cb.done
        kind, headers, body, _ = cb.result
        assert (kind, headers.get(":status")) == ("success", "503")
        assert body == b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"

    uvloop.run(scenario())


def test_inline_completion_returns_none_after_the_callback() -> None:
    async def scenario() -> None:
        client, _, _ = setup(closed_port())
        cb = Callbacks()
        assert client.send("empty", request(), b"", None, 1000, cb) is None
        assert cb.done.done() and cb.result[2] == b"no healthy upstream"
        cb2 = Callbacks()
        assert client.send("missing", request(), b"", None, 1000, cb2) is None
        assert not cb2.done.done()

    uvloop.run(scenario())


def test_reset_after_headers_is_a_failure_and_cancel_is_silent() -> None:
    async def scenario() -> None:
        async def partial(reader: Any, writer: Any, head: bytes) -> bool:
            if b"/partial" in head:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                await writer.drain()
                return False
            await reader.read()
            return False

        up = await Upstream(partial).start()
        client, _, store = setup(up.port)
        cb = Callbacks()
        client.send("up", request("/partial"), b"", None, 1000, cb)
        await cb.done
        assert cb.result == ("failure", "reset")

        up.request_seen.clear()
        cb2 = Callbacks()
        req = client.send("up", request("/hang"), b"", None, 1000, cb2)
        await up.request_seen.wait()
        req.cancel()
        assert not cb2.done.done()
        assert store.gauge("cluster.up.upstream_rq_active").value == 0
        await up.stop()

    uvloop.run(scenario())
