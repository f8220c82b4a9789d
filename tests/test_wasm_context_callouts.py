"""Root-context entry points the proxy calls later: callout results, DNS, foreign functions,
plus trailers added at end of stream and the access-log view of missing maps."""

from __future__ import annotations

import struct

from tests.wasm_host.fakes import FakeStreamEnv, FakeWasmEnv, stream_info
from tests.wasm_host.guest import Guest
from wasmproxy.http.headers import HeaderMap
from wasmproxy.wasm.abi import AbiVersion, WasmBufferType, WasmHeaderMapType, WasmResult
from wasmproxy.wasm.context import ContextBase

OK, NOT_FOUND, BAD_ARG = 0, 1, 2
OUT, KEY, VAL = 2048, 4096, 8192


class DnsEnv(FakeWasmEnv):
    def resolve_dns(self, context: ContextBase, token: int, address: str) -> WasmResult:
        self.calls.append(("dns", token, address))
        return WasmResult.Ok

    def grpc_call(self, *args: object) -> WasmResult:  # type: ignore[override]
        return WasmResult.ParseFailure  # Envoy: an unknown cluster name


def test_foreign_function_callback_reads_its_arguments_from_call_data() -> None:
    g = Guest()
    got = []
    g.handlers["proxy_on_foreign_function"] = lambda root, fid, size: got.append(
        (root, fid, size, g.hostcall("proxy_get_buffer_bytes", WasmBufferType.CallData, 0, size, OUT, OUT + 4),
         g.out_bytes(OUT, OUT + 4))) or 0
    g.root.on_foreign_function(7, b"args")
    assert got == [(g.root.id, 7, 4, OK, b"args")]
    assert g.root.get_buffer(WasmBufferType.CallData).size() == 0  # cleared afterwards


def test_resolve_dns_round_trip_in_envoys_buffer_format() -> None:
    env = DnsEnv()
    g = Guest(environment=env)
    a, an = g.put(b"example.com", KEY)
    assert g.call(None, "envoy_resolve_dns", a, an, OUT) == OK
    token = g.u32(OUT)
    assert env.calls == [("dns", token, "example.com")]
    got = []
    g.handlers["envoy_on_resolve_dns"] = lambda root, tok, size: got.append(
        (tok, size, g.hostcall("proxy_get_buffer_bytes", WasmBufferType.CallData, 0, size, OUT, OUT + 4),
         g.out_bytes(OUT, OUT + 4))) or 0
    g.root.on_resolve_dns(token, [("1.2.3.4", 30), ("::1", 5)])
    data = struct.pack("<III", 2, 30, 5) + b"1.2.3.4\0::1\0"
    assert got == [(token, len(data), OK, data)]
    g.root.on_resolve_dns(token, None)  # failure: an empty buffer
    assert got[-1][:2] == (token, 0)


def test_grpc_errors_pass_through_and_a_stream_closes_after_both_sides() -> None:
    env = DnsEnv()
    g = Guest(environment=env)
    s, sn = g.put(b"nope", KEY)
    assert g.call(None, "proxy_grpc_call", s, sn, s, sn, s, sn, 0, 0, 0, 0, 100, OUT) == 4  # ParseFailure
    assert g.call(None, "proxy_grpc_stream", s, sn, s, sn, s, sn, 0, 0, OUT) == OK
    token = g.u32(OUT)
    g.root.on_grpc_close(token, 0, b"")  # the remote side closed first
    assert token in g.root.grpc_streams
    assert g.call(None, "proxy_grpc_close", token) == OK  # then the plugin: gone
    assert token not in g.root.grpc_streams
    assert g.call(None, "proxy_grpc_cancel", token) == NOT_FOUND


def test_callout_results_arriving_during_a_vm_call_are_deferred() -> None:
    env = FakeWasmEnv()
    g = Guest(environment=env)
    hdrs = b"".join([struct.pack("<I", 3), struct.pack("<6I", 7, 3, 5, 1, 10, 1), b":method\0GET\0:path\0/\0",
                     b":authority\0a\0"])
    u, un = g.put(b"known", KEY)
    h, hn = g.put(hdrs, VAL)
    order = []

    def on_tick(*_: int) -> int:
        assert g.hostcall("proxy_http_call", u, un, h, hn, 0, 0, 0, 0, 100, OUT) == OK
        g.root.on_http_call_success(g.u32(OUT), HeaderMap(), b"", None)  # answered at once
        order.append("tick done")
        return 0

    g.handlers["proxy_on_tick"] = on_tick
    g.handlers["proxy_on_http_call_response"] = lambda *_: order.append("response") or 0
    g.root.on_tick()
    assert order == ["tick done", "response"]


def test_trailers_can_be_added_from_the_last_body_callback() -> None:
    g = Guest()
    env = FakeStreamEnv(stream_info())
    ctx = g.wasm.create_stream_context(g.plugin, env)
    k, kn = g.put(b"x-trailer", KEY)
    v, vn = g.put(b"t", VAL)
    results = []
    g.handlers["proxy_on_request_body"] = lambda c, size, eos: results.append(
        g.hostcall("proxy_add_header_map_value", WasmHeaderMapType.RequestTrailers, k, kn, v, vn)) or 0
    ctx.decode_headers(HeaderMap(), False)
    ctx.decode_data(bytearray(b"a"), False)
    ctx.decode_data(bytearray(b"b"), True)
    assert results == [BAD_ARG, OK]  # only at end of stream (Envoy's addDecodedTrailers)
    assert ("add_trailers", WasmHeaderMapType.RequestTrailers) in env.actions
    assert ctx.request_trailers is not None and ctx.request_trailers.get("x-trailer") == "t"


def test_missing_maps_in_the_access_log_phase() -> None:
    for abi, expected in [(AbiVersion.ProxyWasm_0_2_1, (NOT_FOUND, b"")), (AbiVersion.ProxyWasm_0_1_0, (OK, b""))]:
        g = Guest(abi)
        env = FakeStreamEnv(stream_info())
        ctx = g.wasm.create_stream_context(g.plugin, env)
        k, kn = g.put(b"x", KEY)
        got = []
        g.handlers["proxy_on_log"] = lambda *_: got.append(
            (g.hostcall("proxy_get_header_map_value", WasmHeaderMapType.ResponseTrailers, k, kn, OUT, OUT + 4),
             g.out_bytes(OUT, OUT + 4))) or 0
        ctx.log(HeaderMap(), HeaderMap(), None, env.stream_info)
        assert got == [expected], abi


def test_metadata_callbacks_always_continue() -> None:
    g = Guest()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    ctx.on_create()
    assert ctx.on_request_metadata(2) == 0
    assert ctx.on_response_metadata(1) == 0
