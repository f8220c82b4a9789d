"""Real Envoy 1.40 with the props plugin: which properties exist, in which phase, and how they
are encoded (strings as text, integers as 8-byte little-endian)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from envoy_harness import EnvoyRun, Listener, Response, plugin, wasm_filter

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    wasm = wasm_filter(plugin("props"), "cfg", vm_id="props_vm", root_id="props_root", name="props_plugin")
    with EnvoyRun([Listener("props", [wasm])], proxy=proxy) as run:
        yield run


def _props(r: Response) -> dict[str, str]:
    return {k[len("x-prop-"):]: v for k, v in r.headers if k.startswith("x-prop-")}


def _u64(value: str) -> int:
    status, _, hexdigits = value.partition(":hex:")
    assert status == "0", value
    return struct.unpack("<Q", bytes.fromhex(hexdigits))[0]


def test_request_phase_properties(envoy: EnvoyRun) -> None:
    paths = ["plugin_name", "plugin_root_id", "plugin_vm_id", "request.path", "request.url_path", "request.host",
             "request.method", "request.scheme", "request.protocol", "request.headers.x-foo", "request.useragent",
             "xds.cluster_name", "connection.requested_server_name"]
    r = envoy.request("props", path="/x/y?q=1", headers={"x-foo": "bar", "user-agent": "ua1",
                                                         "x-props-get": ",".join(paths)})
    assert _props(r) == {
        "plugin_name": "0:props_plugin", "plugin_root_id": "0:props_root", "plugin_vm_id": "0:props_vm",
        "request.path": "0:/x/y?q=1", "request.url_path": "0:/x/y", "request.host": "0:plugins.test",
        "request.method": "0:GET", "request.scheme": "0:http", "request.protocol": "0:HTTP/1.1",
        "request.headers.x-foo": "0:bar", "request.useragent": "0:ua1", "xds.cluster_name": "0:echo",
        "connection.requested_server_name": "0:",
    }


def test_integer_and_address_properties(envoy: EnvoyRun) -> None:
    paths = "source.address,source.port,destination.port,connection.id,connection.mtls,request.size,request.time"
    r = envoy.request("props", headers={"x-props-get": paths})
    props = _props(r)
    host, _, port = props["source.address"].removeprefix("0:").rpartition(":")
    assert host == "127.0.0.1" and _u64(props["source.port"]) == int(port)
    assert _u64(props["destination.port"]) == envoy.ports["props"]
    assert _u64(props["connection.id"]) > 0
    assert props["connection.mtls"] == "0:hex:00"  # a bool is one byte
    assert _u64(props["request.size"]) == 0
    assert _u64(props["request.time"]) > 1_600_000_000 * 10**9  # nanoseconds since the epoch


def test_missing_properties_are_not_found(envoy: EnvoyRun) -> None:
    paths = "request.headers.nope,request.referer,nope,nope.deeper,response.code,upstream.address,request.duration"
    props = _props(envoy.request("props", headers={"x-props-get": paths}))
    assert props == {p: "1:" for p in paths.split(",")}


def test_response_phase_properties(envoy: EnvoyRun) -> None:
    paths = ("response.code,response.code_details,response.flags,response.headers.content-type,upstream.address,"
             "xds.cluster_name,request.path,request.headers.x-foo,plugin_name")
    props = _props(envoy.request("props", headers={"x-foo": "bar", "x-props-get-response": paths}))
    assert _u64(props["response.code"]) == 200
    assert props["response.code_details"] == "0:via_upstream"
    assert _u64(props["response.flags"]) == 0
    assert props["response.headers.content-type"] == "0:application/json"
    assert props["upstream.address"] == f"0:127.0.0.1:{envoy.echo.port}"
    assert props["xds.cluster_name"] == "0:echo"
    # The request headers are gone once the response is processed.
    assert props["request.path"] == props["request.headers.x-foo"] == "1:"
    assert props["plugin_name"] == "0:props_plugin"


def test_set_property_then_get(envoy: EnvoyRun) -> None:
    r = envoy.request("props", headers={"x-props-set": "myprop=val", "x-props-get": "myprop",
                                        "x-props-get-response": "myprop"})
    assert r.header("x-props-set-status") == "0"
    assert r.header_all("x-prop-myprop") == ["0:val", "0:val"]
    # A multi-segment path is accepted but cannot be read back.
    r = envoy.request("props", headers={"x-props-set": "my.prop=val", "x-props-get": "my.prop"})
    assert (r.header("x-props-set-status"), r.header("x-prop-my.prop")) == ("0", "1:")


def test_hex_format(envoy: EnvoyRun) -> None:
    r = envoy.request("props", headers={"x-props-get": "plugin_name", "x-props-format": "hex"})
    assert r.header("x-prop-plugin_name") == "0:hex:" + b"props_plugin".hex()
