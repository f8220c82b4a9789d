"""Every host function through a WAT guest: success and its main error codes (cpp-host exports.cc)."""

from __future__ import annotations

import logging
import struct

import pytest

from tests.wasm_host.fakes import FakeStreamEnv, FakeTime, FakeTimers, FakeWasmEnv, stream_info
from tests.wasm_host.guest import BAD_PTR, Guest, pack_u32
from wasmproxy.http.headers import HeaderMap
from wasmproxy.log import get_logger
from wasmproxy.wasm.abi import AbiVersion, WasmBufferType, WasmHeaderMapType, WasmResult
from wasmproxy.wasm.context import ContextBase
from wasmproxy.wasm.hostcalls import marshal_pairs, unmarshal_pairs
from wasmproxy.wasm.wasm import register_foreign_function

OK, NOT_FOUND, BAD_ARG, INVALID = 0, 1, 2, 6
OUT = 2048  # out-parameters: pointer at OUT, size at OUT + 4, cas/flags at OUT + 8
KEY = 4096
VAL = 8192
REQ = WasmHeaderMapType.RequestHeaders


def stream(g: Guest, env: FakeStreamEnv | None = None) -> ContextBase:
    assert g.root is not None
    ctx = g.wasm.create_stream_context(g.plugin, env if env is not None else FakeStreamEnv(stream_info()))
    ctx.on_create()
    return ctx


# -- pairs ------------------------------------------------------------------------------------


def test_pairs_round_trip_and_wire_format() -> None:
    pairs = [(b":path", b"/x"), (b"a", b""), (b"", b"v")]
    data = marshal_pairs(pairs)
    assert data[:4] == pack_u32(3)
    assert data[4:28] == pack_u32(5, 2, 1, 0, 0, 1)
    assert data[28:] == b":path\0/x\0a\0\0\0v\0"
    assert unmarshal_pairs(data) == pairs


@pytest.mark.parametrize("bad", [b"", b"\1\0\0", pack_u32(1, 1, 1) + b"a\0b", pack_u32(1, 1, 1) + b"ax b\0",
                                 pack_u32(1, 1, 1) + b"a\0b\0extra", pack_u32(1025) + b"\0" * 8 * 1025])
def test_malformed_or_oversized_pairs_deserialize_to_nothing(bad: bytes) -> None:
    assert unmarshal_pairs(bad) == []


# -- general ----------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def test_log_levels_and_bad_pointer() -> None:
    g = Guest()
    records = _Records()
    get_logger("wasm").addHandler(records)
    try:
        p, n = g.put(b"hello")
        assert g.call(None, "proxy_log", 3, p, n) == OK
        ctx = stream(g)
        assert g.call(ctx, "proxy_log", 4, p, n) == OK
    finally:
        get_logger("wasm").removeHandler(records)
    assert records.lines == [(logging.WARNING, "wasm log root vm: hello"), (logging.ERROR, "wasm log p root vm: hello")]
    assert g.call(None, "proxy_log", 6, p, n) == BAD_ARG
    assert g.call(None, "proxy_log", 2, BAD_PTR, n) == INVALID


def test_get_log_level_and_time() -> None:
    time = FakeTime()
    g = Guest(time_source=time)
    assert g.call(None, "proxy_get_log_level", OUT) == OK
    assert 0 <= g.u32(OUT) <= 6
    assert g.call(None, "proxy_get_log_level", BAD_PTR) == INVALID
    assert g.call(None, "proxy_get_current_time_nanoseconds", OUT) == OK
    assert g.u64(OUT) == int(time.now * 1e9)
    assert g.call(None, "proxy_get_current_time_nanoseconds", BAD_PTR) == INVALID


def test_tick_period_drives_on_tick_and_zero_stops_it() -> None:
    timers = FakeTimers()
    g = Guest(timer_factory=timers)
    assert g.call(None, "proxy_set_tick_period_milliseconds", 250) == OK
    (timer,) = timers.timers
    assert timer.armed_ms == 250
    timer.fire()
    assert g.names()[-1] == "proxy_on_tick" and g.events[-1][1] == g.root.id
    assert timer.armed_ms == 250  # re-armed after the tick
    assert g.call(None, "proxy_set_tick_period_milliseconds", 0) == OK
    assert timer.armed_ms is None


def test_stream_context_ticks_on_its_root() -> None:
    timers = FakeTimers()
    g = Guest(timer_factory=timers)
    ctx = stream(g)
    assert g.call(ctx, "proxy_set_tick_period_milliseconds", 10) == OK
    assert g.wasm.tick_period(g.root.id) == 10


# -- header maps ------------------------------------------------------------------------------


def test_header_map_value_found_missing_and_errors() -> None:
    g = Guest()
    ctx = stream(g)
    ctx.request_headers = HeaderMap([(":path", "/a"), ("x-k", "v1"), ("x-k", "v2")])
    k, kn = g.put(b"X-K", KEY)
    assert g.call(ctx, "proxy_get_header_map_value", REQ, k, kn, OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == b"v1"
    m, mn = g.put(b"missing", KEY + 64)
    assert g.call(ctx, "proxy_get_header_map_value", REQ, m, mn, OUT, OUT + 4) == NOT_FOUND
    assert g.call(ctx, "proxy_get_header_map_value", 8, k, kn, OUT, OUT + 4) == BAD_ARG
    assert g.call(ctx, "proxy_get_header_map_value", REQ, BAD_PTR, kn, OUT, OUT + 4) == INVALID
    assert g.call(ctx, "proxy_get_header_map_value", REQ, k, kn, BAD_PTR, OUT + 4) == INVALID
    # No response headers yet: BadArgument (Envoy: the map is not available).
    assert g.call(ctx, "proxy_get_header_map_value", WasmHeaderMapType.ResponseHeaders, k, kn, OUT, OUT + 4) == BAD_ARG


def test_abi_0_1_0_missing_header_is_ok_and_empty() -> None:
    g = Guest(AbiVersion.ProxyWasm_0_1_0)
    ctx = stream(g)
    ctx.request_headers = HeaderMap([("a", "b")])
    k, kn = g.put(b"missing", KEY)
    g.memory.write_u32(OUT, 77)
    assert g.call(ctx, "proxy_get_header_map_value", REQ, k, kn, OUT, OUT + 4) == OK
    assert (g.u32(OUT), g.u32(OUT + 4)) == (0, 0)


def test_header_map_mutations_and_size() -> None:
    g = Guest()
    env = FakeStreamEnv(stream_info())
    ctx = stream(g, env)
    headers = HeaderMap([(":path", "/a"), ("x-a", "1")])
    ctx.request_headers = headers
    k, kn = g.put(b"X-New", KEY)
    v, vn = g.put(b"val", VAL)
    assert g.call(ctx, "proxy_add_header_map_value", REQ, k, kn, v, vn) == OK
    assert headers.get("x-new") == "val"
    assert ("clear_route_cache",) in env.actions
    k2, kn2 = g.put(b"x-a", KEY)
    assert g.call(ctx, "proxy_replace_header_map_value", REQ, k2, kn2, v, vn) == OK
    assert headers.get("x-a") == "val"
    assert g.call(ctx, "proxy_remove_header_map_value", REQ, k2, kn2) == OK
    assert headers.get("x-a") is None
    assert g.call(ctx, "proxy_get_header_map_size", REQ, OUT) == OK
    assert g.u32(OUT) == headers.byte_size()
    for name, args in [("proxy_add_header_map_value", (k, kn, v, vn)), ("proxy_replace_header_map_value", (k, kn, v, vn)),
                       ("proxy_remove_header_map_value", (k, kn)), ("proxy_get_header_map_size", (OUT,))]:
        assert g.call(ctx, name, 9, *args) == BAD_ARG
        assert g.call(ctx, name, WasmHeaderMapType.ResponseHeaders, *args) == BAD_ARG
    assert g.call(ctx, "proxy_add_header_map_value", REQ, BAD_PTR, kn, v, vn) == INVALID
    assert g.call(ctx, "proxy_get_header_map_size", REQ, BAD_PTR) == INVALID


def test_header_map_pairs_round_trip_through_the_guest() -> None:
    g = Guest()
    ctx = stream(g)
    headers = HeaderMap([(":method", "GET"), (":path", "/p"), ("x-b", "2")])
    ctx.request_headers = headers
    assert g.call(ctx, "proxy_get_header_map_pairs", REQ, OUT, OUT + 4) == OK
    data = g.out_bytes(OUT, OUT + 4)
    assert unmarshal_pairs(data) == [(b":method", b"GET"), (b":path", b"/p"), (b"x-b", b"2")]
    p, n = g.put(marshal_pairs([(b":path", b"/new"), (b"X-C", b"3")]), VAL)
    assert g.call(ctx, "proxy_set_header_map_pairs", REQ, p, n) == OK
    assert headers.items() == [(":path", "/new"), ("x-c", "3")]
    assert g.call(ctx, "proxy_set_header_map_pairs", REQ, BAD_PTR, n) == INVALID
    assert g.call(ctx, "proxy_set_header_map_pairs", 8, p, n) == BAD_ARG
    assert g.call(ctx, "proxy_get_header_map_pairs", 8, OUT, OUT + 4) == BAD_ARG
    # An absent map reads as empty (ptr 0, size 0).
    assert g.call(ctx, "proxy_get_header_map_pairs", WasmHeaderMapType.ResponseTrailers, OUT, OUT + 4) == OK
    assert (g.u32(OUT), g.u32(OUT + 4)) == (0, 0)


# -- buffers ----------------------------------------------------------------------------------


def test_buffer_bytes_read_clamps_and_writes_follow_envoy() -> None:
    g = Guest()
    ctx = stream(g)
    body = bytearray(b"hello world")
    ctx.request_body_buffer = body
    body_t = WasmBufferType.HttpRequestBody
    assert g.call(ctx, "proxy_get_buffer_bytes", body_t, 6, 100, OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == b"world"
    assert g.call(ctx, "proxy_get_buffer_bytes", body_t, 50, 5, OUT, OUT + 4) == OK
    assert (g.u32(OUT), g.u32(OUT + 4)) == (0, 0)
    assert g.call(ctx, "proxy_get_buffer_status", body_t, OUT, OUT + 4) == OK
    assert (g.u32(OUT), g.u32(OUT + 4)) == (11, 0)
    d, dn = g.put(b">>", VAL)
    assert g.call(ctx, "proxy_set_buffer_bytes", body_t, 0, 0, d, dn) == OK  # prepend
    assert g.call(ctx, "proxy_set_buffer_bytes", body_t, 100, 0, d, dn) == OK  # append
    assert body == b">>hello world>>"
    assert g.call(ctx, "proxy_set_buffer_bytes", body_t, 3, 2, d, dn) == BAD_ARG  # no splicing
    assert g.call(ctx, "proxy_set_buffer_bytes", body_t, 0, 1000, d, dn) == OK  # replace all
    assert body == b">>"
    assert g.call(ctx, "proxy_set_buffer_bytes", body_t, 0, 0, BAD_PTR, dn) == INVALID
    assert g.call(ctx, "proxy_get_buffer_bytes", body_t, 0, 2, BAD_PTR, OUT + 4) == INVALID
    assert g.call(ctx, "proxy_get_buffer_bytes", 9, 0, 1, OUT, OUT + 4) == BAD_ARG
    assert g.call(ctx, "proxy_get_buffer_status", 9, OUT, OUT + 4) == BAD_ARG
    assert g.call(ctx, "proxy_set_buffer_bytes", 9, 0, 0, d, dn) == BAD_ARG


def test_configuration_buffers() -> None:
    g = Guest(start=False)
    assert g.wasm.initialize()
    seen = {}

    def on_configure(root: int, size: int, _: int) -> int:
        seen["size"] = size
        seen["status"] = g.hostcall("proxy_get_buffer_bytes", WasmBufferType.PluginConfiguration, 0, size, OUT, OUT + 4)
        seen["config"] = g.out_bytes(OUT, OUT + 4)
        return 1

    g.handlers["proxy_on_configure"] = on_configure
    root = g.wasm.start(g.plugin)
    assert root is not None and g.wasm.configure(root, g.plugin)
    assert seen == {"size": 9, "status": OK, "config": b"plugincfg"}
    # Outside on_configure there is no plugin configuration; the VM's is always there.
    assert g.call(root, "proxy_get_buffer_bytes", WasmBufferType.PluginConfiguration, 0, 9, OUT, OUT + 4) == NOT_FOUND
    assert g.call(root, "proxy_get_buffer_bytes", WasmBufferType.VmConfiguration, 0, 99, OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == b"vmcfg"
    d, dn = g.put(b"x", VAL)
    assert g.call(root, "proxy_set_buffer_bytes", WasmBufferType.VmConfiguration, 0, 0, d, dn) == BAD_ARG


def test_abi_0_1_0_get_configuration() -> None:
    g = Guest(AbiVersion.ProxyWasm_0_1_0, start=False)
    assert g.wasm.initialize()
    got = []
    g.handlers["proxy_on_configure"] = lambda r, s, _: (
        got.append((g.hostcall("proxy_get_configuration", OUT, OUT + 4), g.out_bytes(OUT, OUT + 4))), 1)[1]
    root = g.wasm.start(g.plugin)
    assert root is not None and g.wasm.configure(root, g.plugin)
    assert got == [(OK, b"plugincfg")]
    assert g.call(root, "proxy_get_configuration", OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == b"vmcfg"
    assert g.call(root, "proxy_get_configuration", BAD_PTR, OUT + 4) == INVALID


# -- shared data and queues -------------------------------------------------------------------


def test_shared_data_through_the_abi() -> None:
    g = Guest(vm_id="test_shared_data_through_the_abi")
    k, kn = g.put(b"key", KEY)
    v, vn = g.put(b"value", VAL)
    assert g.call(None, "proxy_get_shared_data", k, kn, OUT, OUT + 4, OUT + 8) == NOT_FOUND
    assert g.call(None, "proxy_set_shared_data", k, kn, v, vn, 0) == OK
    assert g.call(None, "proxy_get_shared_data", k, kn, OUT, OUT + 4, OUT + 8) == OK
    assert g.out_bytes(OUT, OUT + 4) == b"value"
    cas = g.u32(OUT + 8)
    assert cas != 0
    assert g.call(None, "proxy_set_shared_data", k, kn, v, vn, cas) == OK
    assert g.call(None, "proxy_set_shared_data", k, kn, v, vn, cas) == 8  # CasMismatch
    assert g.call(None, "proxy_set_shared_data", BAD_PTR, kn, v, vn, 0) == INVALID
    assert g.call(None, "proxy_get_shared_data", BAD_PTR, kn, OUT, OUT + 4, OUT + 8) == INVALID
    assert g.call(None, "proxy_get_shared_data", k, kn, OUT, OUT + 4, BAD_PTR) == INVALID


def test_shared_queue_through_the_abi_notifies_the_owner_root_via_post() -> None:
    g = Guest(vm_id="test_shared_queue_abi")
    ctx = stream(g)
    q, qn = g.put(b"queue", KEY)
    assert g.call(ctx, "proxy_register_shared_queue", q, qn, OUT) == OK  # owner: the root
    token = g.u32(OUT)
    vm, vmn = g.put(b"test_shared_queue_abi", VAL)
    assert g.call(None, "proxy_resolve_shared_queue", vm, vmn, q, qn, OUT) == OK
    assert g.u32(OUT) == token
    assert g.call(None, "proxy_resolve_shared_queue", 0, 0, q, qn, OUT) == OK  # empty vm_id: own
    n, nn = g.put(b"nope", VAL)
    assert g.call(None, "proxy_resolve_shared_queue", 0, 0, n, nn, OUT) == NOT_FOUND
    assert g.call(None, "proxy_dequeue_shared_queue", token, OUT, OUT + 4) == 7  # Empty
    d, dn = g.put(b"item", VAL)
    assert g.call(None, "proxy_enqueue_shared_queue", token, d, dn) == OK
    assert g.names()[-1] != "proxy_on_queue_ready"  # not inline: posted to the owner's thread
    (cb,) = g.posted
    cb()
    assert g.events[-1] == ("proxy_on_queue_ready", g.root.id, token, 0)
    assert g.call(None, "proxy_dequeue_shared_queue", token, OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == b"item"
    assert g.call(None, "proxy_enqueue_shared_queue", 999999, d, dn) == NOT_FOUND
    assert g.call(None, "proxy_dequeue_shared_queue", 999999, OUT, OUT + 4) == NOT_FOUND
    assert g.call(None, "proxy_enqueue_shared_queue", token, BAD_PTR, dn) == INVALID
    assert g.call(None, "proxy_register_shared_queue", BAD_PTR, qn, OUT) == INVALID
    assert g.call(None, "proxy_register_shared_queue", q, qn, BAD_PTR) == INVALID


# -- metrics ----------------------------------------------------------------------------------


class Store:
    def __init__(self) -> None:
        self.names: list[str] = []

    def _stat(self, name: str) -> "Stat":
        self.names.append(name)
        return Stat()

    counter = gauge = histogram = _stat


class Stat:
    def __init__(self) -> None:
        self.value = 0
        self.recorded: list[float] = []

    def inc(self, n: int = 1) -> None:
        self.value += n

    def dec(self, n: int = 1) -> None:
        self.value -= n

    def set(self, v: int) -> None:
        self.value = v

    def record(self, v: float) -> None:
        self.recorded.append(v)


def test_metrics_define_increment_record_get() -> None:
    store = Store()
    g = Guest(stats_store=store)
    n, nn = g.put(b"my_counter", KEY)
    ids = []
    for metric_type in (0, 1, 2):
        assert g.call(None, "proxy_define_metric", metric_type, n, nn, OUT) == OK
        ids.append(g.u32(OUT))
    counter, gauge, histogram = ids
    assert ids == [4, 5, 6]  # as Envoy 1.40 hands them out; the low two bits are the type
    assert g.call(None, "proxy_define_metric", 0, n, nn, OUT) == OK and g.u32(OUT) == 8
    assert store.names == ["wasmcustom.my_counter"] * 4
    assert g.call(None, "proxy_define_metric", 3, n, nn, OUT) == BAD_ARG
    assert g.call(None, "proxy_define_metric", 0, BAD_PTR, nn, OUT) == INVALID
    assert g.call(None, "proxy_increment_metric", counter, 5) == OK
    assert g.call(None, "proxy_increment_metric", counter, -1) == BAD_ARG
    assert g.call(None, "proxy_record_metric", counter, 2) == OK
    assert g.call(None, "proxy_get_metric", counter, OUT) == OK and g.u64(OUT) == 7
    assert g.call(None, "proxy_increment_metric", gauge, -3) == OK
    assert g.call(None, "proxy_get_metric", gauge, OUT) == OK and g.u64(OUT) == (1 << 64) - 3
    assert g.call(None, "proxy_record_metric", gauge, 42) == OK
    assert g.call(None, "proxy_get_metric", gauge, OUT) == OK and g.u64(OUT) == 42
    assert g.call(None, "proxy_record_metric", histogram, 9) == OK
    assert g.call(None, "proxy_increment_metric", histogram, 1) == BAD_ARG
    assert g.call(None, "proxy_get_metric", histogram, OUT) == BAD_ARG
    assert g.call(None, "proxy_get_metric", counter + 400, OUT) == NOT_FOUND
    assert g.call(None, "proxy_record_metric", counter + 400, 1) == NOT_FOUND
    assert g.call(None, "proxy_increment_metric", gauge + 400, 1) == NOT_FOUND
    assert g.call(None, "proxy_get_metric", counter, BAD_PTR) == INVALID


# -- properties -------------------------------------------------------------------------------


def get_property(g: Guest, ctx: ContextBase | None, *segments: bytes) -> tuple[int, bytes]:
    p, n = g.put(b"\0".join(segments), KEY)
    status = g.call(ctx, "proxy_get_property", p, n, OUT, OUT + 4)
    return status, g.out_bytes(OUT, OUT + 4) if status == OK else b""


def test_plugin_properties_on_root_and_stream() -> None:
    g = Guest()
    assert get_property(g, None, b"plugin_name") == (OK, b"p")
    assert get_property(g, None, b"plugin_root_id") == (OK, b"root")
    assert get_property(g, None, b"plugin_vm_id") == (OK, b"vm")
    assert get_property(g, None, b"request", b"path") == (NOT_FOUND, b"")  # no stream on a root
    ctx = stream(g)
    assert get_property(g, ctx, b"plugin_root_id") == (OK, b"root")


def test_request_and_connection_properties() -> None:
    g = Guest()
    info = stream_info()
    info.bytes_received = 5
    info.response_code = 200
    info.response_flags = ["UF", "URX"]
    ctx = stream(g, FakeStreamEnv(info))
    ctx.request_headers = HeaderMap([(":method", "POST"), (":path", "/a/b?x=1#f"), (":authority", "host"),
                                     (":scheme", "http"), ("user-agent", "ua"), ("x-k", "1"), ("x-k", "2")])
    assert get_property(g, ctx, b"request", b"path") == (OK, b"/a/b?x=1#f")
    assert get_property(g, ctx, b"request", b"url_path") == (OK, b"/a/b")
    assert get_property(g, ctx, b"request", b"query") == (OK, b"x=1")
    assert get_property(g, ctx, b"request", b"host") == (OK, b"host")
    assert get_property(g, ctx, b"request", b"method") == (OK, b"POST")
    assert get_property(g, ctx, b"request", b"useragent") == (OK, b"ua")
    assert get_property(g, ctx, b"request", b"headers", b"x-k") == (OK, b"1,2")
    assert get_property(g, ctx, b"request", b"referer") == (NOT_FOUND, b"")
    assert get_property(g, ctx, b"request", b"size") == (OK, struct.pack("<q", 5))
    assert get_property(g, ctx, b"request", b"time") == (OK, struct.pack("<q", 1_700_000_000_250_000_000))
    assert get_property(g, ctx, b"request", b"protocol") == (OK, b"HTTP/1.1")
    status, headers = get_property(g, ctx, b"request", b"headers")
    assert status == OK and (b"x-k", b"1,2") in unmarshal_pairs(headers)
    assert get_property(g, ctx, b"request")[0] == 3  # SerializationFailure: not listable
    assert get_property(g, ctx, b"response", b"code") == (OK, struct.pack("<q", 200))
    assert get_property(g, ctx, b"response", b"flags") == (OK, struct.pack("<q", 0x20 | 0x8000))
    assert get_property(g, ctx, b"source", b"address") == (OK, b"127.0.0.2:54321")
    assert get_property(g, ctx, b"source", b"port") == (OK, struct.pack("<q", 54321))
    assert get_property(g, ctx, b"destination", b"address") == (OK, b"127.0.0.1:10000")
    assert get_property(g, ctx, b"connection", b"id") == (OK, struct.pack("<Q", 7))
    assert get_property(g, ctx, b"connection_id") == (OK, struct.pack("<Q", 7))
    assert get_property(g, ctx, b"nope") == (NOT_FOUND, b"")
    assert g.call(ctx, "proxy_get_property", BAD_PTR, 3, OUT, OUT + 4) == INVALID


def test_set_property_round_trips_through_filter_state() -> None:
    g = Guest()
    info = stream_info()
    ctx = stream(g, FakeStreamEnv(info))
    k, kn = g.put(b"my.key", KEY)
    v, vn = g.put(b"\x00\x01bytes", VAL)
    assert g.call(ctx, "proxy_set_property", k, kn, v, vn) == OK
    assert info.filter_state["wasm.my.key"] == b"\x00\x01bytes"
    assert get_property(g, ctx, b"my.key") == (OK, b"\x00\x01bytes")
    assert get_property(g, ctx, b"filter_state", b"wasm.my.key") == (OK, b"\x00\x01bytes")
    assert g.call(None, "proxy_set_property", k, kn, v, vn) == NOT_FOUND  # a root has no StreamInfo
    assert g.call(ctx, "proxy_set_property", BAD_PTR, kn, v, vn) == INVALID


# -- streams ----------------------------------------------------------------------------------


def test_continue_and_close_stream() -> None:
    g = Guest()
    env = FakeStreamEnv(stream_info())
    ctx = stream(g, env)
    assert g.call(ctx, "proxy_continue_stream", 0) == OK
    assert g.call(ctx, "proxy_continue_stream", 3) == 12  # Upstream: Unimplemented
    assert g.call(ctx, "proxy_continue_stream", 4) == BAD_ARG
    assert g.call(ctx, "proxy_close_stream", 1) == OK
    assert g.call(ctx, "proxy_close_stream", 4) == BAD_ARG
    assert env.actions == []  # deferred until the VM call ends...
    g.wasm.do_after_vm_call_actions()
    assert env.actions == [("continue", 0), ("close", 1)]
    assert env.stream_info.response_code_details == "wasm_close_stream"
    # A root context has no stream: Envoy 1.40 answers Ok and does nothing (probe plugin).
    for name, stream_type, expected in [("proxy_continue_stream", 0, OK), ("proxy_continue_stream", 2, OK),
                                        ("proxy_continue_stream", 3, 12), ("proxy_close_stream", 0, OK),
                                        ("proxy_close_stream", 3, OK)]:
        assert g.call(None, name, stream_type) == expected, (name, stream_type)
    assert g.call(None, "proxy_send_local_response", 403, 0, 0, 0, 0, 0, 0, 0) == OK
    assert g.call(None, "proxy_set_effective_context", 0) == OK
    assert g.call(None, "proxy_set_effective_context", 99) == BAD_ARG
    assert g.call(None, "proxy_get_status", OUT, OUT + 4, OUT + 8) == OK
    assert (g.u32(OUT), g.u32(OUT + 8)) == (0, 0)


def test_abi_0_1_0_continue_request_and_clear_route_cache() -> None:
    g = Guest(AbiVersion.ProxyWasm_0_1_0)
    env = FakeStreamEnv(stream_info())
    ctx = stream(g, env)
    assert g.call(ctx, "proxy_continue_request") == OK
    assert g.call(ctx, "proxy_continue_response") == OK
    assert g.call(ctx, "proxy_clear_route_cache") == OK
    g.wasm.do_after_vm_call_actions()
    assert env.actions == [("clear_route_cache",), ("continue", 0), ("continue", 1)]


def test_send_local_response_is_deferred_and_stops_iteration() -> None:
    g = Guest()
    env = FakeStreamEnv(stream_info())
    ctx = stream(g, env)
    d, dn = g.put(b"denied by plugin", KEY)
    b, bn = g.put(b"body", VAL)
    h, hn = g.put(marshal_pairs([(b"X-Reason", b"r")]), VAL + 100)

    def on_headers(ctx_id: int, n: int, eos: int) -> int:
        assert g.hostcall("proxy_send_local_response", 403, d, dn, b, bn, h, hn, 0xFFFFFFFF) == OK
        assert env.actions == []
        return 0  # Continue: overridden because a local reply was sent

    g.handlers["proxy_on_request_headers"] = on_headers
    status = ctx.decode_headers(HeaderMap([(":path", "/")]), True)
    assert status == 4  # StopAllIterationAndWatermark
    assert env.actions == [("local_reply", 403, b"body", [("x-reason", "r")], None, "denied_by_plugin")]
    assert g.call(ctx, "proxy_send_local_response", 403, BAD_PTR, dn, b, bn, h, hn, 0) == INVALID


def test_get_status_after_http_call_failure() -> None:
    env = FakeWasmEnv()
    g = Guest(environment=env)
    hdrs = marshal_pairs([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")])
    u, un = g.put(b"known", KEY)
    h, hn = g.put(hdrs, VAL)
    assert g.call(None, "proxy_http_call", u, un, h, hn, 0, 0, 0, 0, 1000, OUT) == OK
    token = g.u32(OUT)
    seen = []
    g.handlers["proxy_on_http_call_response"] = lambda c, t, n, _b: seen.append(
        (t, g.hostcall("proxy_get_status", OUT, OUT + 4, OUT + 8), g.u32(OUT), g.out_bytes(OUT + 4, OUT + 8))) or 0
    g.root.on_http_call_failure(token)
    assert seen == [(token, OK, 11, b"reset")]
    assert g.call(None, "proxy_get_status", BAD_PTR, OUT + 4, OUT + 8) == INVALID


def test_http_call_validation_and_response_delivery() -> None:
    env = FakeWasmEnv()
    g = Guest(environment=env)
    ctx = stream(g)
    good = marshal_pairs([(b":method", b"GET"), (b":path", b"/x"), (b":authority", b"svc")])
    u, un = g.put(b"known", KEY)
    h, hn = g.put(good, VAL)
    body, bn = g.put(b"req", VAL + 512)
    assert g.call(ctx, "proxy_http_call", u, un, h, hn, body, bn, 0, 0, 500, OUT) == OK
    token = g.u32(OUT)
    assert token == 4  # HTTP callout tokens: low bits 0, step 4
    (call,) = env.calls
    assert call[1] is g.root  # callouts belong to the root context
    assert call[2] == token and call[4] == b"req" and call[6] == 500
    missing = marshal_pairs([(b":method", b"GET"), (b":path", b"/x")])
    m, mn = g.put(missing, VAL)
    assert g.call(ctx, "proxy_http_call", u, un, m, mn, 0, 0, 0, 0, 500, OUT) == BAD_ARG
    unk, unkn = g.put(b"unknown", KEY)
    assert g.call(ctx, "proxy_http_call", unk, unkn, h, hn, 0, 0, 0, 0, 500, OUT) == BAD_ARG
    assert g.call(ctx, "proxy_http_call", u, un, h, hn, 0, 0, 0, 0, 0xFFFFFFFF, OUT) == BAD_ARG
    assert g.call(ctx, "proxy_http_call", u, un, h, hn, 0, 0, 0, 0, 500, BAD_PTR) == INVALID
    got = []

    def on_response(root_id: int, tok: int, nheaders: int, body_size: int) -> int:
        k, kn = g.put(b":status", KEY)
        got.append((root_id, tok, nheaders, body_size,
                    g.hostcall("proxy_get_header_map_value", WasmHeaderMapType.HttpCallResponseHeaders, k, kn, OUT, OUT + 4),
                    g.out_bytes(OUT, OUT + 4)))
        g.hostcall("proxy_get_buffer_bytes", WasmBufferType.HttpCallResponseBody, 0, body_size, OUT, OUT + 4)
        got.append(g.out_bytes(OUT, OUT + 4))
        return 0

    g.handlers["proxy_on_http_call_response"] = on_response
    g.root.on_http_call_success(token, HeaderMap([(":status", "200")]), b"resp", None)
    assert got == [(g.root.id, token, 1, 4, OK, b"200"), b"resp"]
    # The response is gone after the callback, and a token is answered once.
    assert g.root.http_call_response is None
    g.root.on_http_call_success(token, HeaderMap(), b"", None)
    assert len(got) == 2


def test_grpc_tokens_and_errors() -> None:
    env = FakeWasmEnv()
    g = Guest(environment=env)
    s, sn = g.put(b"cluster", KEY)
    n, nn = g.put(b"svc.Service", KEY + 64)
    m, mn = g.put(b"Method", KEY + 128)
    md, mdn = g.put(marshal_pairs([]), KEY + 256)
    r, rn = g.put(b"msg", VAL)
    assert g.call(None, "proxy_grpc_call", s, sn, n, nn, m, mn, md, mdn, r, rn, 1000, OUT) == OK
    call_token = g.u32(OUT)
    assert call_token == 5  # the low two bits say gRPC call (cpp-host CalloutType)
    assert g.call(None, "proxy_grpc_stream", s, sn, n, nn, m, mn, md, mdn, OUT) == OK
    stream_token = g.u32(OUT)
    assert stream_token == 6
    assert g.call(None, "proxy_grpc_send", stream_token, r, rn, 1) == OK
    assert g.call(None, "proxy_grpc_send", call_token, r, rn, 0) == BAD_ARG
    assert g.call(None, "proxy_grpc_send", stream_token + 4, r, rn, 0) == NOT_FOUND
    for name in ("proxy_grpc_cancel", "proxy_grpc_close"):  # an HTTP-kind token: Envoy 1.40 says 2
        assert g.call(None, name, 0x7FFFFF00) == BAD_ARG
    assert g.call(None, "proxy_grpc_send", 0x7FFFFF00, r, rn, 0) == BAD_ARG
    assert g.call(None, "proxy_grpc_send", stream_token, BAD_PTR, rn, 0) == INVALID
    assert g.call(None, "proxy_grpc_cancel", call_token) == OK
    assert g.call(None, "proxy_grpc_cancel", call_token) == NOT_FOUND
    assert g.call(None, "proxy_grpc_close", stream_token) == OK
    assert g.call(None, "proxy_grpc_close", stream_token + 4) == NOT_FOUND
    assert g.call(None, "proxy_grpc_call", BAD_PTR, sn, n, nn, m, mn, md, mdn, r, rn, 1000, OUT) == INVALID
    assert g.call(None, "proxy_grpc_stream", s, sn, n, nn, m, mn, md, mdn, BAD_PTR) == INVALID
    assert ("grpc_send", stream_token, b"msg", True) in env.calls


def test_grpc_receive_and_close_reach_the_plugin() -> None:
    env = FakeWasmEnv()
    g = Guest(environment=env)
    s, sn = g.put(b"cluster", KEY)
    md, mdn = g.put(marshal_pairs([]), KEY + 256)
    assert g.call(None, "proxy_grpc_stream", s, sn, s, sn, s, sn, md, mdn, OUT) == OK
    token = g.u32(OUT)
    got = []
    g.handlers["proxy_on_grpc_receive"] = lambda c, t, size: got.append(
        (g.hostcall("proxy_get_buffer_bytes", WasmBufferType.GrpcReceiveBuffer, 0, size, OUT, OUT + 4),
         g.out_bytes(OUT, OUT + 4))) or 0
    g.root.on_grpc_receive_initial_metadata(token, HeaderMap([("a", "b")]))
    g.root.on_grpc_receive(token, b"payload")
    g.root.on_grpc_receive_trailing_metadata(token, HeaderMap())
    g.root.on_grpc_close(token, 14, b"unavailable")
    assert got == [(OK, b"payload")]
    assert [n for n in g.names() if "grpc" in n] == [
        "proxy_on_grpc_receive_initial_metadata", "proxy_on_grpc_receive",
        "proxy_on_grpc_receive_trailing_metadata", "proxy_on_grpc_close"]
    assert g.events[-1][1:] == (g.root.id, token, 14)


def test_resolve_dns_is_unimplemented_without_an_environment() -> None:
    g = Guest()
    a, an = g.put(b"example.com", KEY)
    assert g.call(None, "envoy_resolve_dns", a, an, OUT) == 12
    assert g.call(None, "envoy_resolve_dns", BAD_PTR, an, OUT) == INVALID


# -- contexts ---------------------------------------------------------------------------------


def test_set_effective_context_redirects_host_calls() -> None:
    g = Guest()
    env = FakeStreamEnv(stream_info())
    ctx = stream(g, env)
    ctx.request_headers = HeaderMap([("x", "from-stream")])
    k, kn = g.put(b"x", KEY)
    seen = []

    def on_tick(root_id: int, _a: int, _b: int) -> int:
        seen.append(g.hostcall("proxy_get_header_map_value", REQ, k, kn, OUT, OUT + 4))  # root: no map
        seen.append(g.hostcall("proxy_set_effective_context", ctx.id))
        seen.append(g.hostcall("proxy_get_header_map_value", REQ, k, kn, OUT, OUT + 4))
        seen.append(g.out_bytes(OUT, OUT + 4))
        seen.append(g.hostcall("proxy_set_effective_context", 12345))
        return 0

    g.handlers["proxy_on_tick"] = on_tick
    g.root.on_tick()
    assert seen == [BAD_ARG, OK, OK, b"from-stream", BAD_ARG]
    assert g.wasm.effective_context_id == 0  # restored when the callback returns


def test_done_finishes_a_deferred_root_shutdown() -> None:
    g = Guest()
    assert g.call(None, "proxy_done") == NOT_FOUND
    g.handlers["proxy_on_done"] = lambda *_: 0  # "not done yet"
    root = g.root
    g.wasm.start_shutdown()
    assert g.wasm.pending_done and "proxy_on_delete" not in g.names()
    assert g.call(root, "proxy_done") == OK
    assert "proxy_on_delete" not in g.names()  # deferred past the proxy_done call
    g.wasm.do_after_vm_call_actions()
    assert g.names()[-1] == "proxy_on_delete"


def test_foreign_functions() -> None:
    g = Guest()
    register_foreign_function("test_echo", lambda wasm, ctx, args: (WasmResult.Ok, args[::-1]))
    n, nn = g.put(b"test_echo", KEY)
    a, an = g.put(b"abc", VAL)
    assert g.call(None, "proxy_call_foreign_function", n, nn, a, an, OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == b"cba"
    u, un = g.put(b"unknown_fn", KEY + 64)
    assert g.call(None, "proxy_call_foreign_function", u, un, a, an, OUT, OUT + 4) == NOT_FOUND
    assert g.call(None, "proxy_call_foreign_function", BAD_PTR, nn, a, an, OUT, OUT + 4) == INVALID
    assert g.call(None, "proxy_call_foreign_function", n, nn, a, an, 0, 0) == OK  # results discarded


def test_a_failing_host_call_answers_internal_failure_and_keeps_the_vm() -> None:
    g = Guest()

    def broken(wasm: object, ctx: object, args: bytes) -> tuple[WasmResult, bytes]:
        raise RuntimeError("bug in a foreign function")

    register_foreign_function("test_broken", broken)
    n, nn = g.put(b"test_broken", KEY)
    assert g.call(None, "proxy_call_foreign_function", n, nn, 0, 0, OUT, OUT + 4) == 10  # InternalFailure
    assert not g.wasm.is_failed()


def test_envoy_compress_and_uncompress_foreign_functions() -> None:
    import zlib

    g = Guest()
    c, cn = g.put(b"compress", KEY)
    u, un = g.put(b"uncompress", KEY + 64)
    data = b"hello " * 50
    a, an = g.put(data, VAL)
    assert g.call(None, "proxy_call_foreign_function", c, cn, a, an, OUT, OUT + 4) == OK
    packed = g.out_bytes(OUT, OUT + 4)
    assert packed == zlib.compress(data)
    p, pn = g.put(packed, VAL)
    assert g.call(None, "proxy_call_foreign_function", u, un, p, pn, OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == data
    bad, badn = g.put(b"not zlib", VAL)
    assert g.call(None, "proxy_call_foreign_function", u, un, bad, badn, OUT, OUT + 4) == 3  # SerializationFailure


def test_root_context_answers_like_envoy_for_stream_only_calls() -> None:
    """Observed in Envoy 1.40 from proxy_on_vm_start (a root context, no stream)."""
    g = Guest()
    k, kn = g.put(b"a", KEY)
    d, dn = g.put(b"x", VAL)
    assert g.call(None, "proxy_get_header_map_pairs", WasmHeaderMapType.HttpCallResponseHeaders, OUT, OUT + 4) == OK
    assert g.call(None, "proxy_get_header_map_value", WasmHeaderMapType.HttpCallResponseHeaders, k, kn, OUT,
                  OUT + 4) == BAD_ARG
    assert g.call(None, "proxy_get_header_map_pairs", REQ, OUT, OUT + 4) == OK
    assert g.call(None, "proxy_get_buffer_status", WasmBufferType.PluginConfiguration, OUT, OUT + 4) == NOT_FOUND
    assert g.call(None, "proxy_get_buffer_status", WasmBufferType.HttpRequestBody, OUT, OUT + 4) == OK
    assert g.call(None, "proxy_set_buffer_bytes", WasmBufferType.HttpRequestBody, 0, 0, d, dn) == BAD_ARG
    assert g.call(None, "proxy_set_buffer_bytes", WasmBufferType.VmConfiguration, 0, 0, d, dn) == BAD_ARG
