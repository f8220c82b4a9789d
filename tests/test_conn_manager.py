"""HttpConnectionManager over a fake transport and a fake dispatcher (no sockets, fake time).

Expected bytes are what Envoy 1.40 sends for the same requests (checked on loopback with a
direct_response / local-reply config).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from email.utils import formatdate
from typing import Any, Callable

import pytest

from wasmproxy.http import conn_manager
from wasmproxy.http.conn_manager import HttpConnectionManagerConfig, WorkerConnectionHandler
from wasmproxy.http.filter import FilterDataStatus, FilterHeadersStatus, PassThroughFilter
from wasmproxy.http.headers import HeaderMap

# -- fakes -----------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def system_time(self) -> float:
        return 1_795_000_000.0 + self.now  # a fixed wall clock: stable date headers


class FakeTimer:
    def __init__(self, dispatcher: "FakeDispatcher", cb: Callable[[], None]) -> None:
        self.dispatcher = dispatcher
        self.cb = cb
        self.deadline: float | None = None

    def enable_timer(self, ms: float) -> None:
        self.deadline = self.dispatcher.time_source.now + ms / 1000.0

    def disable_timer(self) -> None:
        self.deadline = None

    def enabled(self) -> bool:
        return self.deadline is not None


class FakeDispatcher:
    """Timers fire only from advance(); posts run only from run_posts()."""

    def __init__(self) -> None:
        self.time_source = FakeTime()
        self.timers: list[FakeTimer] = []
        self.posted: list[Callable[[], None]] = []

    def create_timer(self, cb: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self, cb)
        self.timers.append(timer)
        return timer

    def post(self, cb: Callable[[], None]) -> None:
        self.posted.append(cb)

    def run_posts(self) -> None:
        for _ in range(100):
            if not self.posted:
                return
            batch, self.posted = self.posted, []
            for cb in batch:
                cb()

    def advance(self, seconds: float) -> None:
        self.time_source.now += seconds
        for timer in list(self.timers):
            if timer.deadline is not None and timer.deadline <= self.time_source.now:
                timer.deadline = None
                timer.cb()
        self.run_posts()


class FakeStat:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def dec(self, n: int = 1) -> None:
        self.value -= n


class FakeHistogram:
    def __init__(self) -> None:
        self.values: list[float] = []

    def record(self, value: float) -> None:
        self.values.append(value)


class FakeStore:
    def __init__(self) -> None:
        self.stats: dict[str, FakeStat] = {}
        self.histograms: dict[str, FakeHistogram] = {}

    def counter(self, name: str) -> FakeStat:
        return self.stats.setdefault(name, FakeStat())

    gauge = counter

    def histogram(self, name: str, unit: Any = None) -> FakeHistogram:
        return self.histograms.setdefault(name, FakeHistogram())

    def __getitem__(self, short: str) -> int:
        return self.stats["http.ingress." + short].value


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = ("10.1.2.3", 5555)) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.reading = True
        self.read_pauses = 0
        self.peer = peer

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False
        self.read_pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 10000)}.get(name, default)

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


DATE = "date: " + formatdate(1_795_001_000, usegmt=True)  # FakeTime's wall clock


class Harness:
    def __init__(self, *filters: Callable[[], Any], **config: Any) -> None:
        self.config = HttpConnectionManagerConfig()
        self.config.stat_prefix = "ingress"
        self.config.filter_factories = [self._factory(f) for f in filters]
        for k, v in config.items():
            setattr(self.config, k, v)
        self.dispatcher = FakeDispatcher()
        self.store = FakeStore()
        self.handler = WorkerConnectionHandler(self.config, self.dispatcher, self.store)  # type: ignore[arg-type]
        self.made: list[Any] = []

    def _factory(self, make: Callable[[], Any]) -> Callable[[Any], None]:
        def install(callbacks: Any) -> None:
            f = make()
            self.made.append(f)
            callbacks.add_stream_filter(f)

        return install

    def connect(self, peer: tuple[str, int] = ("10.1.2.3", 5555)) -> tuple[Any, FakeTransport]:
        conn = self.handler()
        transport = FakeTransport(peer)
        conn.connection_made(transport)
        return conn, transport


class Direct(PassThroughFilter):
    """Answers every request at end of stream like Envoy's direct_response ("hello")."""

    seen: list[HeaderMap]
    body_seen: bytearray

    def __init__(self, status: int = 200, body: str = "hello") -> None:
        self.status = status
        self.body = body
        self.seen = []
        self.body_seen = bytearray()
        self.destroyed = 0

    def decode_headers(self, headers, end_stream):
        self.seen.append(headers.copy())
        if end_stream:
            self.decoder_callbacks.send_local_reply(self.status, self.body)
        return FilterHeadersStatus.StopIteration

    def decode_data(self, data, end_stream):
        self.body_seen += data
        if end_stream:
            self.decoder_callbacks.send_local_reply(self.status, self.body)
        return FilterDataStatus.StopIterationNoBuffer

    def on_destroy(self):
        self.destroyed += 1


class Echo(PassThroughFilter):
    """Streams the request body back as the response body (chunked)."""

    def decode_headers(self, headers, end_stream):
        self.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), end_stream)
        return FilterHeadersStatus.StopIteration

    def decode_data(self, data, end_stream):
        self.decoder_callbacks.encode_data(bytes(data), end_stream)
        data.clear()
        return FilterDataStatus.StopIterationNoBuffer


HELLO = (
    "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n" + DATE + "\r\nserver: envoy\r\n\r\nhello"
).encode()


# -- basics ----------------------------------------------------------------------------------


def test_direct_reply_bytes_match_envoy_and_connection_is_kept_alive():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET /direct HTTP/1.1\r\nHost: a\r\n\r\n")
    assert t.take() == HELLO
    assert not conn.closed
    h.dispatcher.run_posts()
    conn.data_received(b"GET /direct HTTP/1.1\r\nHost: a\r\n\r\n")
    assert t.take() == HELLO
    assert h.store["downstream_rq_total"] == 2 and h.store["downstream_rq_2xx"] == 2
    assert h.store["downstream_rq_completed"] == 2 and h.store["downstream_rq_active"] == 0
    # Envoy's per-listener copies, named after the listener address.
    assert h.store.stats["listener.127.0.0.1_10000.http.ingress.downstream_rq_2xx"].value == 2
    assert h.store.stats["listener.127.0.0.1_10000.http.ingress.downstream_rq_completed"].value == 2
    assert [f.destroyed for f in h.made] == [1, 1]


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    # The first answer waits for the requests of the same read (Envoy's redispatch loop).
    assert t.take() == b""
    assert len(h.made) == 1 and not t.reading  # the second request waits, reading paused
    h.dispatcher.run_posts()
    assert t.take() == HELLO + HELLO
    assert [f.seen[0].get(":path") for f in h.made] == ["/1", "/2"]
    assert t.reading


def test_a_third_pipelined_local_reply_of_one_read_closes_the_connection():
    # Envoy's HTTP/1 flood protection: two responses may wait unwritten; a third request then
    # fails ("Too many responses queued") and the connection closes after the two answers.
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n" * 3)
    h.dispatcher.run_posts()
    assert t.take() == HELLO + HELLO
    assert conn.closed and len(h.made) == 2
    assert h.store["downstream_cx_protocol_error"] == 1
    assert h.store.stats["http1.response_flood"].value == 1


def test_connection_close_request_gets_connection_close_and_is_closed():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    out = t.take()
    assert out.endswith(b"server: envoy\r\nconnection: close\r\n\r\nhello")
    assert conn.closed
    assert h.store["downstream_cx_destroy_local"] == 1 and h.store["downstream_cx_active"] == 0
    assert h.store.histograms["http.ingress.downstream_cx_length_ms"].values == [0.0]
    assert h.store.histograms["http.ingress.downstream_rq_time"].values == [0.0]


def test_http10_gets_envoys_426():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET /direct HTTP/1.0\r\nHost: a\r\n\r\n")
    assert t.take() == (
        b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 16\r\ncontent-type: text/plain\r\n"
        + DATE.encode() + b"\r\nserver: envoy\r\nconnection: close\r\n\r\nUpgrade Required"
    )
    assert conn.closed


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
])
def test_malformed_request_gets_envoys_400_and_close(raw):
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(raw)
    assert t.take() == (
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\ncontent-type: text/plain\r\n"
        + DATE.encode() + b"\r\nserver: envoy\r\nconnection: close\r\n\r\nBad Request"
    )
    assert conn.closed
    assert h.store["downstream_cx_protocol_error"] == 1 and h.store["downstream_rq_4xx"] == 1


def test_headers_too_large_is_431_with_reason_body():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
    out = t.take()
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 31\r\n")
    assert out.endswith(b"\r\n\r\nRequest Header Fields Too Large") and conn.closed


def test_missing_host_is_400_without_body_and_close():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET /direct HTTP/1.1\r\n\r\n")
    assert t.take() == (
        b"HTTP/1.1 400 Bad Request\r\n" + DATE.encode()
        + b"\r\nserver: envoy\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    assert conn.closed


def test_upgrade_without_upgrade_config_is_403_and_close():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert t.take() == (
        b"HTTP/1.1 403 Forbidden\r\n" + DATE.encode()
        + b"\r\nserver: envoy\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )


def test_options_star_is_404_and_kept_alive():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert t.take() == b"HTTP/1.1 404 Not Found\r\n" + DATE.encode() + b"\r\nserver: envoy\r\ncontent-length: 0\r\n\r\n"
    assert not conn.closed


def test_expect_100_continue_is_answered_by_the_proxy_and_header_removed():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert "expect" not in h.made[0].seen[0]
    conn.data_received(b"abc")
    assert t.take() == HELLO
    assert h.store["downstream_rq_1xx"] == 1


def test_response_before_request_complete_closes_the_connection():
    class Early(Direct):
        def decode_headers(self, headers, end_stream):
            self.decoder_callbacks.send_local_reply(200, "hello")
            return FilterHeadersStatus.StopIteration

    h = Harness(Early)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    out = t.take()
    assert b"connection: close\r\n" in out and out.endswith(b"hello")
    assert conn.closed
    assert h.store["downstream_rq_response_before_rq_complete"] == 1


# -- header mutation -----------------------------------------------------------------------


def test_request_headers_as_envoy_forwards_them():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-foo\r\nX-Foo: 1\r\nKeep-Alive: 3\r\n"
        b"Proxy-Connection: k\r\nTE: trailers, deflate\r\nX-Forwarded-For: 1.2.3.4\r\nX-Envoy-Foo: 1\r\n\r\n"
    )
    items = h.made[0].seen[0].items()
    assert items[:-1] == [
        (":authority", "a"), (":path", "/"), (":method", "GET"), (":scheme", "http"),
        ("te", "trailers"), ("x-forwarded-for", "1.2.3.4"), ("x-envoy-foo", "1"), ("x-forwarded-proto", "http"),
    ]
    assert items[-1][0] == "x-request-id"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", items[-1][1])


def test_use_remote_address_appends_xff_and_cleans_edge_requests():
    h = Harness(Direct, use_remote_address=True)
    conn, t = h.connect(peer=("93.184.216.34", 4000))
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n"
                       b"X-Envoy-Retry-On: 5xx\r\nX-Request-Id: client\r\n\r\n")
    seen = h.made[0].seen[0]
    assert seen.get("x-forwarded-for") == "1.2.3.4,93.184.216.34"
    assert "x-envoy-retry-on" not in seen
    assert seen.get("x-envoy-external-address") == "93.184.216.34"
    assert seen.get("x-request-id") != "client"  # edge requests get a fresh id
    assert [k for k, _ in seen.items()][4:] == [
        "x-forwarded-for", "x-request-id", "x-forwarded-proto", "x-envoy-external-address"]  # Envoy's order
    h2 = Harness(Direct, use_remote_address=True)
    conn, t = h2.connect(peer=("127.0.0.1", 4000))
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: mine\r\n\r\n")
    seen = h2.made[0].seen[0]
    # Envoy 1.40 trusts no address by default: a loopback client is external too, and its XFF
    # entry is the proxy's own address (LocalInfo's), not the loopback one.
    assert "x-envoy-internal" not in seen and seen.get("x-request-id") != "mine"
    assert seen.get("x-envoy-external-address") == "127.0.0.1"
    assert seen.get("x-forwarded-for") == conn_manager._local_address()


def test_without_use_remote_address_control_headers_are_stripped_but_edge_headers_kept():
    h = Harness(Direct)
    conn, t = h.connect(peer=("127.0.0.1", 4000))
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Envoy-Retry-On: 5xx\r\nX-Envoy-Internal: true\r\n"
                       b"X-Envoy-Upstream-Rq-Timeout-Ms: 5\r\nX-Envoy-Original-Path: /o\r\n"
                       b"X-Envoy-External-Address: 1.2.3.4\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: mine\r\n\r\n")
    seen = h.made[0].seen[0]
    for name in ("x-envoy-retry-on", "x-envoy-internal", "x-envoy-upstream-rq-timeout-ms"):
        assert name not in seen
    assert seen.get("x-envoy-original-path") == "/o" and seen.get("x-envoy-external-address") == "1.2.3.4"
    assert seen.get("x-forwarded-for") == "10.0.0.1" and seen.get("x-request-id") == "mine"


def test_response_headers_from_a_filter_get_server_overwritten_date_kept_and_hop_by_hop_removed():
    class Upstream(PassThroughFilter):
        def decode_headers(self, headers, end_stream):
            self.decoder_callbacks.encode_headers(HeaderMap([
                (":status", "200"), ("content-length", "2"), ("connection", "keep-alive"), ("keep-alive", "5"),
                ("x-up", "1"), ("server", "upstream"), ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ("proxy-connection", "x")]), False)
            self.decoder_callbacks.encode_data(b"ok", True)
            return FilterHeadersStatus.StopIteration

    h = Harness(Upstream, server_name="wasmproxy")
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert t.take() == (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-up: 1\r\nserver: wasmproxy\r\n"
                        b"date: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\nok")


# -- bodies and flow control ---------------------------------------------------------------


def test_streaming_bodies_both_ways_chunked():
    h = Harness(Echo)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    # Answering before the request is complete: HTTP/1 cannot reuse the connection (as Envoy).
    assert t.take().endswith(b"connection: close\r\ntransfer-encoding: chunked\r\n\r\n")
    conn.data_received(b"3\r\nabc\r\n")
    assert t.take() == b"3\r\nabc\r\n"
    assert not conn.closed
    conn.data_received(b"0\r\n\r\n")
    assert t.take() == b"0\r\n\r\n"
    assert conn.closed


def test_buffering_filter_over_the_limit_answers_413_and_closes():
    class Buffer(PassThroughFilter):
        def decode_headers(self, headers, end_stream):
            return FilterHeadersStatus.StopAllIterationAndBuffer

    h = Harness(Buffer, Direct, buffer_limit=10)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n0123456789")
    assert t.take() == b""
    conn.data_received(b"0123456789")
    assert t.take() == (
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 17\r\ncontent-type: text/plain\r\n"
        + DATE.encode() + b"\r\nserver: envoy\r\nconnection: close\r\n\r\nPayload Too Large"
    )
    assert conn.closed and h.store["downstream_rq_too_large"] == 1


def test_watermark_filter_pauses_reading_until_it_continues():
    class Hold(PassThroughFilter):
        def decode_headers(self, headers, end_stream):
            return FilterHeadersStatus.StopAllIterationAndWatermark

    h = Harness(Hold, Direct, buffer_limit=4)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n012345")
    assert not t.reading
    assert h.store["downstream_flow_control_paused_reading_total"] == 1
    conn.data_received(b"67")  # what was already in flight still arrives
    h.made[0].decoder_callbacks.continue_decoding()
    assert t.reading
    assert h.made[1].body_seen == b"01234567"
    h.dispatcher.run_posts()  # writes outside a read go out at the end of the event
    assert t.take() == HELLO


# -- timeouts --------------------------------------------------------------------------------


def test_stream_idle_timeout_is_408_stream_timeout_while_the_request_is_incomplete():
    h = Harness(Direct, stream_idle_timeout_ms=1000)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    h.dispatcher.advance(0.9)
    conn.data_received(b"c")  # activity re-arms the timer
    h.dispatcher.advance(0.9)
    assert t.take() == b""
    h.dispatcher.advance(0.2)
    out = t.take()
    assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 14\r\n")
    assert out.endswith(b"connection: close\r\n\r\nstream timeout")
    assert h.store["downstream_rq_idle_timeout"] == 1


def test_request_timeout_is_408_request_timeout_and_disarmed_when_request_completes():
    h = Harness(Direct, request_timeout_ms=500)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    h.dispatcher.advance(0.6)
    assert t.take().endswith(b"request timeout")
    assert h.store["downstream_rq_timeout"] == 1

    class Slow(PassThroughFilter):
        def decode_headers(self, headers, end_stream):
            return FilterHeadersStatus.StopIteration

    h = Harness(Slow, request_timeout_ms=500, stream_idle_timeout_ms=0)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.dispatcher.advance(10)
    assert t.take() == b"" and h.store["downstream_rq_timeout"] == 0


def test_request_headers_timeout_until_the_last_header_only():
    h = Harness(Direct, request_headers_timeout_ms=500)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n")
    h.dispatcher.advance(0.6)
    out = t.take()
    assert out.startswith(b"HTTP/1.1 408") and out.endswith(b"request header timeout")
    assert h.store["downstream_rq_header_timeout"] == 1

    h = Harness(Direct, request_headers_timeout_ms=500)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    h.dispatcher.advance(1.0)
    assert t.take() == b"" and h.store["downstream_rq_header_timeout"] == 0


def test_connection_idle_timeout_closes_an_idle_connection_only():
    h = Harness(Direct, idle_timeout_ms=1000)
    conn, t = h.connect()
    h.dispatcher.advance(0.5)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.dispatcher.advance(0.9)
    assert not conn.closed
    h.dispatcher.advance(0.2)
    # Envoy's drain sequence once a codec exists: closed when drain_timeout (5 s) ends.
    assert not conn.closed and h.store["downstream_cx_idle_timeout"] == 1
    h.dispatcher.advance(5.0)
    assert conn.closed


def test_connection_idle_timeout_closes_at_once_before_any_byte():
    h = Harness(Direct, idle_timeout_ms=1000)
    conn, t = h.connect()
    h.dispatcher.advance(1.0)
    assert conn.closed and h.store["downstream_cx_idle_timeout"] == 1


# -- lifecycle -------------------------------------------------------------------------------


def test_access_log_and_on_destroy_once_when_the_client_goes_away_mid_request():
    logged = []

    class Log:
        def log(self, rq, rs, rt, info):
            logged.append((rq.get(":path"), rs, info.response_code))

    h = Harness(Direct, access_logs=[Log()])
    conn, t = h.connect()
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    conn.connection_lost(None)
    assert logged == [("/x", None, 0)]
    info = h.made[0].decoder_callbacks.stream_info
    assert info.response_flags == ["DC"] and info.response_code_details == "downstream_remote_disconnect"
    assert h.made[0].destroyed == 1
    assert h.store["downstream_rq_rx_reset"] == 1 and h.store["downstream_cx_destroy_remote_active_rq"] == 1


def test_stream_info_counts_body_bytes():
    infos = []

    class Log:
        def log(self, rq, rs, rt, info):
            infos.append(info)

    h = Harness(Direct, access_logs=[Log()])
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    info = infos[0]
    assert (info.bytes_received, info.bytes_sent, info.response_code) == (3, 5, 200)
    assert info.request_id and info.protocol == "HTTP/1.1"


def test_drain_closes_after_the_current_response():
    h = Harness(Direct)
    conn, t = h.connect()
    idle, t2 = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n")
    h.handler.drain()
    assert idle.closed and not conn.closed
    conn.data_received(b"x")
    assert b"connection: close\r\n" in t.take() and conn.closed


def test_route_is_cached_until_cleared():
    calls = []

    class Routes:
        def route(self, headers, stream_id):
            calls.append(stream_id)
            return type("R", (), {"name": "r1"})()

    class UsesRoute(Direct):
        def decode_headers(self, headers, end_stream):
            cb = self.decoder_callbacks
            assert cb.route() is cb.route()
            cb.clear_route_cache()
            cb.route()
            return super().decode_headers(headers, end_stream)

    h = Harness(UsesRoute, route_config=Routes())
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(calls) == 2 and h.made[0].decoder_callbacks.stream_info.route_name == "r1"


# -- one real loopback socket ----------------------------------------------------------------


class LoopDispatcher:
    """Just enough Dispatcher on a real asyncio loop for a socket test."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.time_source = FakeTime()
        self.time_source.monotonic = loop.time  # type: ignore[method-assign]

    def create_timer(self, cb: Callable[[], None]) -> Any:
        loop = self.loop

        class Timer:
            handle: Any = None

            def enable_timer(self, ms: float) -> None:
                self.disable_timer()
                self.handle = loop.call_later(ms / 1000.0, cb)

            def disable_timer(self) -> None:
                if self.handle is not None:
                    self.handle.cancel()
                    self.handle = None

        return Timer()

    def post(self, cb: Callable[[], None]) -> None:
        self.loop.call_soon(cb)


def test_keep_alive_and_pipelining_over_real_loopback_socket():
    import uvloop

    loop = uvloop.new_event_loop()  # as the workers run
    config = HttpConnectionManagerConfig()
    config.stat_prefix = "ingress"
    config.filter_factories = [lambda cb: cb.add_stream_filter(Direct())]
    handler = WorkerConnectionHandler(config, LoopDispatcher(loop), FakeStore())  # type: ignore[arg-type]
    server = loop.run_until_complete(loop.create_server(handler, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    result: dict[str, bytes] = {}
    finished = loop.create_future()

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
                data = b""
                while data.count(b"hello") < 2:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                s.sendall(b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                while data.count(b"hello") < 3:  # then we close first, as clients do
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                result["data"] = data
        finally:
            loop.call_soon_threadsafe(finished.set_result, None)

    thread = threading.Thread(target=client)
    thread.start()

    try:
        loop.run_until_complete(asyncio.wait_for(finished, 10))
    finally:
        thread.join(5)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
    data = result["data"]
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.endswith(b"connection: close\r\n\r\nhello")


def test_fragment_in_path_is_400_without_body_and_close():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET /direct#frag HTTP/1.1\r\nHost: a\r\n\r\n")
    assert t.take() == (b"HTTP/1.1 400 Bad Request\r\n" + DATE.encode()
                        + b"\r\nserver: envoy\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
    assert conn.closed and h.store["downstream_rq_failed_path_normalization"] == 1


def test_connect_without_upgrade_config_is_answered_and_closed():
    class NoRoute(Direct):
        def decode_headers(self, headers, end_stream):
            self.seen.append(headers.copy())
            self.decoder_callbacks.send_local_reply(404, "")
            return FilterHeadersStatus.StopIteration

    h = Harness(NoRoute)
    conn, t = h.connect()
    conn.data_received(b"CONNECT diff.test:443 HTTP/1.1\r\nHost: diff.test:443\r\n\r\n")
    assert t.take().endswith(b"connection: close\r\ncontent-length: 0\r\n\r\n")
    assert conn.closed
    assert ":path" not in h.made[0].seen[0] and h.made[0].seen[0].get(":authority") == "diff.test:443"


# -- built from the proto, with the real router filter -----------------------------------


class _NoClusters:
    def has_cluster(self, name: str) -> bool:
        return False

    def thread_local(self) -> "_NoClusters":
        return self

    def get(self, name: str) -> None:
        return None


class _Context:
    cluster_manager = _NoClusters()
    listener_name = "listener_0"


def _hcm_proto(extra: dict[str, Any] | None = None) -> Any:
    from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401  (registers the types)
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from google.protobuf import json_format

    config = {
        "stat_prefix": "ingress",
        "route_config": {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [
            {"match": {"prefix": "/direct"}, "direct_response": {"status": 200, "body": {"inline_string": "hello"}}},
            {"match": {"prefix": "/s299"}, "direct_response": {"status": 299}},
        ]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        **(extra or {}),
    }
    return json_format.ParseDict(config, http_connection_manager_pb2.HttpConnectionManager())


def test_hcm_from_proto_answers_like_envoy_with_direct_responses():
    from wasmproxy.http.conn_manager import create_hcm_factory

    factory = create_hcm_factory(_hcm_proto({"stream_idle_timeout": "2s", "common_http_protocol_options": {
        "idle_timeout": "3s"}}), _Context())
    assert (factory.config.stream_idle_timeout_ms, factory.config.idle_timeout_ms) == (2000, 3000)
    dispatcher = FakeDispatcher()
    handler = factory.for_worker(dispatcher, FakeStore())  # type: ignore[arg-type]
    conn = handler()
    t = FakeTransport()
    conn.connection_made(t)
    expected = [
        (b"GET /direct HTTP/1.1\r\nHost: a\r\n\r\n", HELLO),
        (b"GET /s299 HTTP/1.1\r\nHost: a\r\n\r\n",
         b"HTTP/1.1 299 Unknown\r\n" + DATE.encode() + b"\r\nserver: envoy\r\ncontent-length: 0\r\n\r\n"),
        (b"GET /nomatch HTTP/1.1\r\nHost: a\r\n\r\n",
         b"HTTP/1.1 404 Not Found\r\n" + DATE.encode() + b"\r\nserver: envoy\r\ncontent-length: 0\r\n\r\n"),
        (b"HEAD /direct HTTP/1.1\r\nHost: a\r\n\r\n", HELLO[: -len(b"hello")]),
    ]
    for request, response in expected:
        conn.data_received(request)
        dispatcher.run_posts()
        assert t.take() == response


def test_terminal_filter_must_be_last():
    from wasmproxy.config.errors import ConfigError
    from wasmproxy.http.conn_manager import create_hcm_factory

    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    with pytest.raises(ConfigError, match="terminal filter named envoy.filters.http.router of type "
                                          "envoy.filters.http.router must be the last filter"):
        create_hcm_factory(_hcm_proto({"http_filters": [router, router]}), _Context())


def test_downstream_write_watermarks_reach_registered_filters():
    events = []

    class Watch(PassThroughFilter):
        def on_above_write_buffer_high_watermark(self):
            events.append("above")

        def on_below_write_buffer_low_watermark(self):
            events.append("below")

        def decode_headers(self, headers, end_stream):
            self.decoder_callbacks.add_downstream_watermark_callbacks(self)
            return FilterHeadersStatus.StopIteration

    h = Harness(Watch)
    conn, t = h.connect()
    conn.pause_writing()  # already above when the filter registers: it is told at once
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.resume_writing()
    conn.pause_writing()
    h.made[0].decoder_callbacks.remove_downstream_watermark_callbacks(h.made[0])
    conn.resume_writing()
    assert events == ["above", "below", "above"]


def test_a_filter_bug_closes_the_connection_instead_of_hanging_it():
    class Broken(PassThroughFilter):
        destroyed = 0

        def decode_headers(self, headers, end_stream):
            raise RuntimeError("bug")

        def on_destroy(self):
            Broken.destroyed += 1

    h = Harness(Broken)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert conn.closed and Broken.destroyed == 1


def test_max_requests_per_connection_closes_after_the_last_one():
    h = Harness(Direct, max_requests_per_connection=2)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"connection: close" not in t.take()
    h.dispatcher.run_posts()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"connection: close\r\n" in t.take() and conn.closed
    assert h.store["downstream_cx_max_requests_reached"] == 1


def test_unsupported_hcm_fields_are_ignored_with_a_warning():
    import logging

    from wasmproxy.http.conn_manager import create_hcm_factory
    from wasmproxy.log import get_logger

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = get_logger("http")
    logger.addHandler(handler)
    try:
        create_hcm_factory(_hcm_proto({"path_with_escaped_slashes_action": "REJECT_REQUEST"}), _Context())
    finally:
        logger.removeHandler(handler)
    assert any("path_with_escaped_slashes_action" in r.getMessage() for r in records)


def test_local_close_waits_for_the_peer_or_the_delayed_close_timeout():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
    assert conn.closed and not t.closed  # the socket lingers for the peer to close first
    conn.data_received(b"late bytes are dropped")
    h.dispatcher.advance(0.5)
    assert not t.closed
    h.dispatcher.advance(0.6)
    assert t.closed and h.store["downstream_cx_delayed_close_timeout"] == 1

    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    conn.connection_lost(None)  # the peer closed in time
    h.dispatcher.advance(2)
    assert h.store["downstream_cx_delayed_close_timeout"] == 0


def test_stream_idle_timeout_is_504_once_the_request_is_complete_and_a_reset_after_headers():
    class Wait(PassThroughFilter):
        def decode_headers(self, headers, end_stream):
            return FilterHeadersStatus.StopIteration

    h = Harness(Wait, stream_idle_timeout_ms=1000)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.dispatcher.advance(1.1)
    out = t.take()
    assert out.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n") and out.endswith(b"\r\n\r\nstream timeout")
    assert not conn.closed  # the request was complete: the connection stays usable

    class Started(PassThroughFilter):
        def decode_headers(self, headers, end_stream):
            self.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
            return FilterHeadersStatus.StopIteration

    h = Harness(Started, stream_idle_timeout_ms=1000)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    t.take()
    h.dispatcher.advance(1.1)
    assert t.take() == b"" and conn.closed and h.store["downstream_rq_tx_reset"] == 1


def test_hcm_proto_options_access_log_and_default_router(tmp_path):
    from wasmproxy.http.conn_manager import create_hcm_factory

    log_path = tmp_path / "access.log"
    factory = create_hcm_factory(_hcm_proto({
        "http_filters": [],
        "server_name": "wasmproxy",
        "server_header_transformation": "APPEND_IF_ABSENT",
        "via": "1.1 wasmproxy",
        "always_set_request_id_in_response": True,
        "request_timeout": "2s",
        "delayed_close_timeout": "0s",
        "max_request_headers_kb": 8,
        "http_protocol_options": {"accept_http_10": True, "enable_trailers": True},
        "common_http_protocol_options": {"max_headers_count": 10, "max_requests_per_connection": 5},
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log_path), "log_format": {"text_format": "%RESPONSE_CODE% %REQ(:PATH)%\n"}}}],
    }), _Context())
    c = factory.config
    assert (c.request_timeout_ms, c.delayed_close_timeout_ms, c.max_request_headers_kb, c.max_headers_count,
            c.max_requests_per_connection, c.accept_http_10, c.enable_trailers) == (2000, 0, 8, 10, 5, True, True)
    dispatcher = FakeDispatcher()
    conn = factory.for_worker(dispatcher, FakeStore())()  # type: ignore[arg-type]
    t = FakeTransport()
    conn.connection_made(t)
    conn.data_received(b"GET /direct HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
    out = t.take().decode()
    assert out.startswith("HTTP/1.0 200 OK\r\n")
    assert "server: wasmproxy\r\n" in out and "via: 1.1 wasmproxy\r\n" in out and "x-request-id: " in out
    assert "connection: keep-alive\r\n" in out  # HTTP/1.0 keep-alive is answered explicitly
    assert log_path.read_text() == "200 /direct\n"


def test_unsupported_http_filter_is_a_config_error_unless_optional():
    from wasmproxy.config.errors import ConfigError
    from wasmproxy.http.conn_manager import create_hcm_factory

    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    unknown = {"name": "envoy.filters.http.cors", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}
    from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401  (registers the type)

    with pytest.raises(ConfigError, match="http_filters\\[0\\].typed_config"):
        create_hcm_factory(_hcm_proto({"http_filters": [unknown, router]}), _Context())
    factory = create_hcm_factory(_hcm_proto({"http_filters": [{**unknown, "is_optional": True}, router]}), _Context())
    assert len(factory.config.filter_factories) == 1


def test_request_trailers_reach_filters_when_enabled():
    seen = []

    class Trailers(Direct):
        def decode_trailers(self, trailers):
            seen.append(trailers.items())
            self.decoder_callbacks.send_local_reply(200, "hello")
            from wasmproxy.http.filter import FilterTrailersStatus

            return FilterTrailersStatus.StopIteration

    h = Harness(Trailers, enable_trailers=True)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nT: 1\r\n\r\n")
    assert seen == [[("t", "1")]] and t.take() == HELLO


def test_http10_body_framed_by_close_is_closed_without_delay():
    class NoLength(PassThroughFilter):
        def decode_headers(self, headers, end_stream):
            self.decoder_callbacks.encode_headers(HeaderMap([(":status", "200")]), False)
            self.decoder_callbacks.encode_data(b"body", True)
            return FilterHeadersStatus.StopIteration

    h = Harness(NoLength, accept_http_10=True)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    assert t.take() == b"HTTP/1.0 200 OK\r\n" + DATE.encode() + b"\r\nserver: envoy\r\nconnection: close\r\n\r\nbody"
    assert t.closed


# -- fuzzing the whole connection manager -----------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_pieces = st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"POST /e HTTP/1.1\r\n", b"HEAD / HTTP/1.1\r\n", b"Host: a\r\n", b"\r\n",
    b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n", b"0\r\n\r\n", b"abc",
    b"Connection: close\r\n", b"Expect: 100-continue\r\n", b"Connection: upgrade\r\nUpgrade: ws\r\n",
    b"GET / HTTP/1.0\r\n", b"\x00", b" ", b"X: y\r\n",
])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(pieces=st.lists(_pieces, max_size=25), cuts=st.lists(st.integers(0, 300), max_size=3),
       echo=st.booleans(), lost=st.booleans())
def test_fuzz_connection_manager_never_raises_and_always_finishes_streams(pieces, cuts, echo, lost):
    import logging

    from wasmproxy.log import get_logger

    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    get_logger("http").addHandler(handler)
    try:
        h = Harness(Echo if echo else Direct, buffer_limit=64)
        conn, t = h.connect()
        data = b"".join(pieces)
        pos = 0
        for cut in sorted(cuts) + [len(data)]:
            conn.data_received(data[pos:cut])
            h.dispatcher.run_posts()
            pos = max(pos, cut)
        if lost:
            conn.connection_lost(None)
    finally:
        get_logger("http").removeHandler(handler)
    assert errors == []
    if lost:
        assert all(f.destroyed == 1 for f in h.made if hasattr(f, "destroyed"))
        assert h.store["downstream_rq_active"] == 0 and h.store["downstream_cx_active"] == 0


def test_early_local_replies_still_run_the_encoder_filters_and_their_access_logs():
    seen = []

    class Observer(PassThroughFilter):
        def encode_headers(self, headers, end_stream):
            seen.append(headers.get(":status"))
            return FilterHeadersStatus.Continue

    class Log:
        def log(self, rq, rs, rt, info):
            seen.append(("log", info.response_code, info.response_code_details))

    def install(callbacks):
        callbacks.add_stream_filter(Observer())
        callbacks.add_access_log_handler(Log())

    h = Harness()
    h.config.filter_factories = [install]
    conn, t = h.connect()
    conn.data_received(b"GARBAGE\r\n\r\n")
    assert seen == ["400", ("log", 400, "http1.codec_error")]
    seen.clear()
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\n\r\n")
    assert seen == ["400", ("log", 400, "missing_host_header")]


def test_100_continue_comes_before_early_rejections_and_grpc_shapes_them():
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Type: application/grpc\r\n"
                       b"Content-Length: 2\r\n\r\n")
    assert t.take() == (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n"
                        b"grpc-status: 13\r\n" + DATE.encode() + b"\r\nserver: envoy\r\nconnection: close\r\n"
                        b"content-length: 0\r\n\r\n")


def test_a_response_goes_out_in_one_write():
    h = Harness(Direct)
    conn, t = h.connect()
    writes = []
    t.write = writes.append  # type: ignore[method-assign]
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert writes == [HELLO]


def test_a_reply_before_the_request_is_in_counts_as_a_reset_stream():
    # Envoy resets the codec stream when it ends one whose request is incomplete (a protocol
    # error's 400 here); its reset callback counts downstream_rq_rx_reset.
    h = Harness(Direct)
    conn, t = h.connect()
    conn.data_received(b"GARBAGE\r\n\r\n")
    assert h.store["downstream_rq_rx_reset"] == 1 and h.store["downstream_rq_tx_reset"] == 0
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.store["downstream_rq_rx_reset"] == 1


def test_path_normalization_and_host_port_stripping_as_envoys_hcm_options():
    assert conn_manager._normalize_path("/a/../b", True, False) == "/b"
    assert conn_manager._normalize_path("/a/%2E%2e/b/./c/..?q=/../", True, False) == "/b/?q=/../"
    assert conn_manager._normalize_path("//a//b?x=//", True, True) == "/a/b?x=//"
    assert conn_manager._normalize_path("//a", True, False) == "//a"
    assert conn_manager._normalize_path("/e/a/..;/x/.;b/y/;/z", True, False) == "/e/x/y/;/z"
    for host, port, want in (("a:80", None, "a"), ("a:80", 81, "a:80"), ("a:81", 81, "a"), ("[::1]", None, "[::1]"),
                             ("[::1]:80", None, "[::1]"), ("a:x", None, "a:x")):
        headers = HeaderMap([(":authority", host)])
        conn_manager._strip_port_from_host(headers, port)
        assert headers.get(":authority") == want, host


def test_headers_with_underscores_rejected_or_dropped():
    rejecting = Harness(Direct, headers_with_underscores_action=1)
    conn, t = rejecting.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nx_a: 1\r\n\r\n")
    assert t.take().startswith(b"HTTP/1.1 400 Bad Request\r\n") and conn.closed
    dropping = Harness(Direct, headers_with_underscores_action=2)
    conn, t = dropping.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nx_a: 1\r\nx-b: 2\r\n\r\n")
    seen = dropping.made[0].seen[0]
    assert "x_a" not in seen and seen.get("x-b") == "2"


def test_a_400_local_reply_closes_the_connection():
    class BadRequest(PassThroughFilter):
        def decode_headers(self, headers, end_stream):
            self.decoder_callbacks.send_local_reply(400, "no", None, None, "bad")
            return FilterHeadersStatus.StopIteration

    h = Harness(BadRequest)
    conn, t = h.connect()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"connection: close\r\n" in t.take() and conn.closed


def test_internal_address_config_makes_a_single_internal_address_internal():
    import ipaddress

    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8"))
    cases = [  # (use_remote_address, x-forwarded-for) -> internal?  (as Envoy 1.40 answers)
        (False, "10.0.0.1", True), (False, "8.8.8.8", False), (False, "8.8.8.8,10.0.0.2", False),
        (False, None, False), (True, None, True), (True, "10.0.0.1", False),
    ]
    for use_remote_address, xff, internal in cases:
        h = Harness(Direct, use_remote_address=use_remote_address, internal_networks=nets)
        conn, t = h.connect(peer=("127.0.0.1", 4000))
        extra = f"X-Forwarded-For: {xff}\r\n" if xff else ""
        conn.data_received(f"GET / HTTP/1.1\r\nHost: a\r\nX-Envoy-Retry-On: 5xx\r\nX-Request-Id: mine\r\n{extra}\r\n"
                           .encode())
        seen = h.made[0].seen[0]
        assert (seen.get("x-envoy-internal") == "true") is internal, (use_remote_address, xff)
        assert ("x-envoy-retry-on" in seen) is internal
        assert (seen.get("x-envoy-external-address") is not None) is (use_remote_address and not internal)
        assert (seen.get("x-request-id") == "mine") is (not use_remote_address or internal)


def test_without_use_remote_address_the_stream_remote_address_is_the_last_xff_entry():
    h = Harness(Direct)
    conn, t = h.connect(peer=("127.0.0.1", 4000))
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1, 8.8.8.8\r\n\r\n")
    info = h.made[0].decoder_callbacks.stream_info
    assert str(info.connection.direct_remote_address) == "8.8.8.8:0"
    assert str(info.connection.remote_address) == "127.0.0.1:4000"
    assert conn.connection_info.direct_remote_address == conn.connection_info.remote_address  # per stream only


def test_xff_num_trusted_hops_picks_the_client_the_trusted_proxies_appended():
    import ipaddress

    nets = (ipaddress.ip_network("10.0.0.0/8"),)
    # (use_remote_address, x-forwarded-for) -> (stream remote address, internal?), as Envoy 1.40.
    cases = [(False, "10.0.0.1, 8.8.8.8", "10.0.0.1:0", False), (False, "10.0.0.1", "127.0.0.1:4000", False),
             (True, "1.1.1.1, 10.0.0.1,8.8.8.8", "8.8.8.8:0", False), (True, "junk,8.8.8.8", "8.8.8.8:0", False)]
    for use_remote_address, xff, remote, internal in cases:
        h = Harness(Direct, use_remote_address=use_remote_address, xff_num_trusted_hops=1, internal_networks=nets)
        conn, t = h.connect(peer=("127.0.0.1", 4000))
        conn.data_received(f"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {xff}\r\n\r\n".encode())
        seen = h.made[0].seen[0]
        info = h.made[0].decoder_callbacks.stream_info
        assert str(info.connection.direct_remote_address or info.connection.remote_address) == remote, xff
        assert (seen.get("x-envoy-internal") == "true") is internal
        if use_remote_address:
            assert seen.get("x-envoy-external-address") == remote.rsplit(":", 1)[0]
