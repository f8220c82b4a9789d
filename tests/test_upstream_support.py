"""Fakes shared by the router and upstream tests: a dispatcher on an asyncio loop with manual
timers, a one-thread ThreadLocal, decoder-filter callbacks standing in for the connection
manager, and a scriptable loopback upstream. No tests here."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 (registers the Any type for ParseDict)
from google.protobuf.json_format import ParseDict

from wasmproxy.http.headers import HeaderMap
from wasmproxy.http.stream_info import Address, ConnectionInfo, StreamInfo
from wasmproxy.upstream.conn_pool import PoolFailureReason, StreamResetReason
from wasmproxy.upstream.host import Host


class FakeTimer:
    def __init__(self, dispatcher: "FakeDispatcher", cb: Callable[[], None]) -> None:
        self.dispatcher = dispatcher
        self.cb = cb
        self.ms: float | None = None
        self.fired_ms: float | None = None

    def enable_timer(self, ms: float) -> None:
        self.ms = ms
        self.dispatcher.timer_enabled.set()

    def disable_timer(self) -> None:
        self.ms = None

    def enabled(self) -> bool:
        return self.ms is not None

    def fire(self) -> None:
        assert self.ms is not None, "timer not enabled"
        self.fired_ms, self.ms = self.ms, None
        self.cb()


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def system_time(self) -> float:
        return time.time()


class FakeDispatcher:
    """The Dispatcher contract on a running asyncio loop; timers only fire when a test fires them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.name = "worker_0"
        self.loop = loop
        self.time_source = FakeTime()
        self.timers: list[FakeTimer] = []
        self.timer_enabled = asyncio.Event()

    def post(self, cb: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(cb)

    def is_thread_safe(self) -> bool:
        return True

    def assert_thread_safe(self) -> None:
        pass

    def create_timer(self, cb: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(self, cb)
        self.timers.append(t)
        return t

    def enabled_timers(self, name: str) -> list[FakeTimer]:
        return [t for t in self.timers if t.enabled() and getattr(t.cb, "__name__", "") == name]

    async def fire_when_enabled(self, name: str) -> FakeTimer:
        """Wait until a timer whose callback is `name` is armed, then fire it."""
        while not self.enabled_timers(name):
            self.timer_enabled.clear()
            await self.timer_enabled.wait()
        timer = self.enabled_timers(name)[0]
        timer.fire()
        return timer

    def deferred_delete(self, obj: Any) -> None:
        pass


class FakeSlot:
    def __init__(self, dispatcher: FakeDispatcher) -> None:
        self.dispatcher = dispatcher
        self.obj: Any = None

    def set(self, init_cb: Callable[[Any], Any]) -> None:
        self.obj = init_cb(self.dispatcher)

    def get(self) -> Any:
        return self.obj

    def run_on_all_threads(self, cb: Callable[[Any], None], complete_cb: Callable[[], None] | None = None) -> None:
        cb(self.obj)
        if complete_cb is not None:
            complete_cb()


class FakeTls:
    def __init__(self, dispatcher: FakeDispatcher) -> None:
        self.dispatcher = dispatcher
        self.slots: list[FakeSlot] = []

    def allocate_slot(self) -> FakeSlot:
        slot = FakeSlot(self.dispatcher)
        self.slots.append(slot)
        return slot


def cluster(text: str) -> cluster_pb2.Cluster:
    return ParseDict(yaml.safe_load(text), cluster_pb2.Cluster())


def static_cluster(name: str, *ports: int, extra: str = "") -> cluster_pb2.Cluster:
    eps = ", ".join(
        f"{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}}}" for p in ports
    )
    return cluster(f"name: {name}\ntype: STATIC\nload_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{eps}]}}]}}\n{extra}")


def closed_port() -> int:
    """A loopback port with nothing listening (bound then closed)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


class Upstream:
    """A loopback HTTP/1 server whose per-request behaviour a test scripts.

    `handler(reader, writer, head)` gets each request head and returns False to close the
    connection. `requests` collects every head; `request_seen` is set on each one.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.request_seen = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> "Upstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(head)
                self.request_seen.set()
                if not await self.handler(reader, writer, head):
                    return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self._writers):
            writer.close()
        await self.server.wait_closed()


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The request body for a head with content-length or chunked framing."""
    lower = head.lower()
    if b"content-length:" in lower:
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        return await reader.readexactly(n)
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return b""


def ok_response(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_alive_handler_for_tests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
    """200 "ok" on a kept-alive connection."""
    writer.write(ok_response())
    await writer.drain()
    return True


class FakeStream:
    """Decoder-filter callbacks as the connection manager provides them to the router."""

    def __init__(self, dispatcher: FakeDispatcher, route: Any, stream_id: int = 1) -> None:
        self.dispatcher = dispatcher
        self.stream_id = stream_id
        self._route = route
        self.stream_info = StreamInfo(ConnectionInfo(1, Address("127.0.0.1", 10000), Address("127.0.0.1", 40000)))
        self.response_headers: HeaderMap | None = None
        self.body = bytearray()
        self.trailers: HeaderMap | None = None
        self.local_reply: tuple[int, bytes, str] | None = None
        self.was_reset = False
        self.done = asyncio.get_running_loop().create_future()
        self.watermark_events: list[str] = []

    def route(self) -> Any:
        return self._route

    def clear_route_cache(self) -> None:
        pass

    def send_local_reply(self, status: int, body: bytes | str, modify_headers: Any = None,
                         grpc_status: int | None = None, details: str = "") -> None:
        data = body.encode() if isinstance(body, str) else bytes(body)
        headers = HeaderMap([(":status", str(status))])
        if getattr(self._route, "action", "") == "route":
            # As the filter manager: a route to a cluster adds its response headers to local replies.
            self._route.finalize_response_headers(headers, self.stream_info)
        if modify_headers is not None:
            modify_headers(headers)
        self.local_reply = (status, data, details)
        self.stream_info.response_code_details = details
        self.response_headers = headers
        self.body += data
        self._finish()

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        pass

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.response_headers = headers
        if end_stream:
            self._finish()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data
        if end_stream:
            self._finish()

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self.trailers = trailers
        self._finish()

    def reset_stream(self) -> None:
        self.was_reset = True
        self._finish()

    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None:
        self.watermark_events.append("above")

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None:
        self.watermark_events.append("below")

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Recorder:
    """PoolCallbacks + ResponseDecoder that sends a GET when the pool is ready."""

    def __init__(self, path: str = "/", end_stream: bool = True) -> None:
        self.path = path
        self.end_stream = end_stream
        self.encoder: Any = None
        self.headers: HeaderMap | None = None
        self.body = b""
        self.failure: tuple[PoolFailureReason, str] | None = None
        self.reset: StreamResetReason | None = None
        self.done = asyncio.get_running_loop().create_future()

    def on_pool_ready(self, encoder: Any, host: Host) -> None:
        self.encoder = encoder
        encoder.encode_headers(HeaderMap([(":method", "GET"), (":path", self.path), (":authority", "up")]),
                               self.end_stream)

    def on_pool_failure(self, reason: PoolFailureReason, tfr: str, host: Host) -> None:
        self.failure = (reason, tfr)
        self.done.set_result(None)

    def decode_1xx_headers(self, headers: HeaderMap) -> None:
        pass

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.headers = headers
        if end_stream:
            self.done.set_result(None)

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data
        if end_stream:
            self.done.set_result(None)

    def decode_trailers(self, trailers: HeaderMap) -> None:
        self.done.set_result(None)

    def on_reset_stream(self, reason: StreamResetReason, details: str) -> None:
        self.reset = reason
        self.done.set_result(None)

    def on_above_write_buffer_high_watermark(self) -> None:
        pass

    def on_below_write_buffer_low_watermark(self) -> None:
        pass
