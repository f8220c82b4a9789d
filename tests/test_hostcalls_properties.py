"""proxy_get_property answers as Envoy 1.40 does.

Each expectation here was observed with real Envoy 1.40 (V8) running a probe plugin that logs
get_property status and value bytes in each phase (root, request headers, response headers,
log) behind a direct_response route.
"""

from __future__ import annotations

import struct

from tests.wasm_host.fakes import FakeStreamEnv, stream_info
from tests.wasm_host.guest import Guest
from wasmproxy.http.headers import HeaderMap
from wasmproxy.wasm.context import ContextBase
from wasmproxy.wasm.hostcalls import unmarshal_pairs

OK, NOT_FOUND, SERIALIZATION_FAILURE = 0, 1, 3
OUT, KEY = 2048, 4096


def prop(g: Guest, ctx: ContextBase | None, path: str) -> tuple[int, bytes]:
    p, n = g.put(path.replace(".", "\0").encode(), KEY)
    status = g.call(ctx, "proxy_get_property", p, n, OUT, OUT + 4)
    return status, g.out_bytes(OUT, OUT + 4) if status == OK else b""


def request_headers() -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", "/some/path?q=1"), (":authority", "h"), (":scheme", "http"),
                      ("x-dup", "a"), ("x-dup", "b"), ("x-request-id", "rid1")])


def test_root_context_sees_plugin_and_node_only() -> None:
    g = Guest()
    for path in ["request.path", "request.headers", "response.code", "source.address", "connection.id",
                 "connection_id", "metadata", "filter_state", "request", "upstream.address"]:
        assert prop(g, None, path) == (NOT_FOUND, b""), path
    assert prop(g, None, "plugin_name") == (OK, b"p")
    assert prop(g, None, "xds.node.id") == (OK, b"")


def test_top_level_xds_aliases_are_gone_in_1_40() -> None:
    g = Guest()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(stream_info()))
    ctx.decode_headers(request_headers(), True)
    for path in ["node", "cluster_name", "route_name", "listener_direction"]:
        assert prop(g, ctx, path) == (NOT_FOUND, b""), path


def test_request_phase() -> None:
    g = Guest()
    info = stream_info()
    info.route_name = "r1"
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(info))
    got: dict[str, tuple[int, bytes]] = {}
    paths = ["request.headers.x-dup", "request.id", "request.query", "request.size", "request.total_size",
             "request.duration", "response.code", "response.code_details", "response.flags", "response.size",
             "connection.mtls", "connection.requested_server_name", "xds.listener_direction", "xds.route_name",
             "xds.cluster_name", "xds.filter_chain_name", "request", "filter_state", "request.headers"]

    def on_headers(*_: int) -> int:
        for path in paths:
            p, n = g.put(path.replace(".", "\0").encode(), KEY)
            status = g.hostcall("proxy_get_property", p, n, OUT, OUT + 4)
            got[path] = (status, g.out_bytes(OUT, OUT + 4) if status == OK else b"")
        return 0

    g.handlers["proxy_on_request_headers"] = on_headers
    headers = request_headers()
    ctx.decode_headers(headers, True)
    zero = struct.pack("<q", 0)
    assert got["request.headers.x-dup"] == (OK, b"a,b")
    assert got["request.id"] == (OK, b"rid1")
    assert got["request.query"] == (OK, b"q=1")
    assert got["request.size"] == (OK, zero)
    assert got["request.total_size"] == (OK, struct.pack("<q", headers.byte_size()))
    assert got["request.duration"][0] == NOT_FOUND
    assert got["response.code"][0] == NOT_FOUND
    assert got["response.code_details"][0] == NOT_FOUND
    assert got["response.flags"] == (OK, zero)
    assert got["response.size"] == (OK, zero)
    assert got["connection.mtls"] == (OK, b"\x00")
    assert got["connection.requested_server_name"] == (OK, b"")
    assert got["xds.listener_direction"] == (OK, zero)
    assert got["xds.route_name"] == (OK, b"r1")
    assert got["xds.cluster_name"][0] == NOT_FOUND
    assert got["xds.filter_chain_name"] == (OK, b"")
    assert got["request"][0] == SERIALIZATION_FAILURE
    assert got["filter_state"][0] == SERIALIZATION_FAILURE
    status, listed = got["request.headers"]
    pairs = unmarshal_pairs(listed)
    assert status == OK and len(pairs) == 6  # each key once, duplicates joined
    assert (b"x-dup", b"a,b") in pairs


def test_response_phase_no_longer_sees_the_request_headers() -> None:
    g = Guest()
    info = stream_info()
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(info))
    ctx.decode_headers(request_headers(), True)
    got = {}

    def on_response(*_: int) -> int:
        for path in ["request.path", "request.headers", "request.total_size", "request.protocol", "response.code"]:
            p, n = g.put(path.replace(".", "\0").encode(), KEY)
            status = g.hostcall("proxy_get_property", p, n, OUT, OUT + 4)
            got[path] = (status, g.out_bytes(OUT, OUT + 4) if status == OK else b"")
        return 0

    g.handlers["proxy_on_response_headers"] = on_response
    info.response_code = 200
    ctx.encode_headers(HeaderMap([(":status", "200")]), True)
    assert got == {
        "request.path": (NOT_FOUND, b""),
        "request.headers": (OK, b"\0\0\0\0"),
        "request.total_size": (OK, struct.pack("<q", 0)),
        "request.protocol": (OK, b"HTTP/1.1"),
        "response.code": (OK, struct.pack("<q", 200)),
    }


def test_log_phase_sees_the_final_maps_and_duration() -> None:
    g = Guest()
    info = stream_info()
    info.response_code = 200
    info.bytes_sent = 2
    env = FakeStreamEnv(info)
    ctx = g.wasm.create_stream_context(g.plugin, env)
    ctx.decode_headers(request_headers(), True)
    got = {}

    def on_log(*_: int) -> int:
        for path in ["request.path", "request.duration", "response.size", "metadata"]:
            p, n = g.put(path.replace(".", "\0").encode(), KEY)
            status = g.hostcall("proxy_get_property", p, n, OUT, OUT + 4)
            got[path] = (status, g.out_bytes(OUT, OUT + 4) if status == OK else b"")
        return 0

    g.handlers["proxy_on_log"] = on_log
    ctx.log(request_headers(), HeaderMap([(":status", "200")]), None, info)
    assert got["request.path"] == (OK, b"/some/path?q=1")
    assert got["request.duration"][0] == OK and len(got["request.duration"][1]) == 8
    assert got["response.size"] == (OK, struct.pack("<q", 2))
    assert got["metadata"] == (OK, b"")  # an empty Metadata message


def test_metadata_traversal_and_serialization() -> None:
    g = Guest()
    info = stream_info()
    info.dynamic_metadata["envoy.lb"] = {"canary": True, "weight": 3, "name": "x"}
    ctx = g.wasm.create_stream_context(g.plugin, FakeStreamEnv(info))
    assert prop(g, ctx, "metadata.filter_metadata.envoy.lb") == (NOT_FOUND, b"")  # "." splits the path
    p, n = g.put(b"metadata\0filter_metadata\0envoy.lb\0weight", KEY)
    assert g.call(ctx, "proxy_get_property", p, n, OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == struct.pack("<d", 3.0)  # Struct numbers are doubles
    p, n = g.put(b"metadata\0filter_metadata\0envoy.lb\0canary", KEY)
    assert g.call(ctx, "proxy_get_property", p, n, OUT, OUT + 4) == OK
    assert g.out_bytes(OUT, OUT + 4) == b"\x01"
    status, raw = prop(g, ctx, "metadata")
    from envoy.config.core.v3 import base_pb2

    message = base_pb2.Metadata.FromString(raw)
    assert status == OK and message.filter_metadata["envoy.lb"].fields["name"].string_value == "x"
