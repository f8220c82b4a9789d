"""Real Envoy 1.40 with the header-editing plugins: headers (ABI 0.2.1 / 0.2.0 / 0.1.0), the demo
example, nowasi, wat_minimal and the AssemblyScript SDK plugin."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from envoy_harness import EnvoyRun, Listener, Response, plugin, wasm_filter

pytestmark = pytest.mark.envoy

HEADERS_PLUGINS = ["headers", "headers_abi020", "headers_abi010"]

# The same operations for every ABI version; x-headers-ops carries them per request.
OPS = ";".join([
    "request_headers add request_headers x-req-added a",
    "request_headers replace request_headers user-agent replaced",
    "request_headers remove request_headers x-drop",
    "request_headers get request_headers x-missing",
    "request_headers get request_headers x-present",
    "request_headers size request_headers",
    "request_headers keys request_headers",
    "request_trailers add request_trailers x-rt-added 1",
    "request_trailers remove request_trailers x-rt-drop",
    "response_headers add response_headers x-resp-added r",
    "response_headers remove response_headers content-type",
    "response_headers replace response_headers x-replace-me new",
    "response_headers add request_headers x-late v",
    "response_trailers add response_trailers x-rtr-added 2",
    "response_trailers replace response_trailers x-up-trailer changed",
])


@pytest.fixture(scope="module")
def envoy(proxy: str) -> Iterator[EnvoyRun]:
    listeners = [Listener(name, [wasm_filter(plugin(name), "", vm_id=name)]) for name in HEADERS_PLUGINS]
    listeners += [
        Listener("configured", [wasm_filter(
            plugin("headers"),
            "# comment lines and blank lines are skipped\n\n"
            "request_headers add request_headers x-from-config c1\n"
            "response_headers add response_headers x-from-config c2\n",
            vm_id="configured")]),
        Listener("configured_abi010", [wasm_filter(
            plugin("headers_abi010"), "response_headers add response_headers x-from-config abi010",
            vm_id="configured_abi010")]),
        Listener("demo", [wasm_filter(plugin("example"), "hello from the demo plugin", root_id="demo")]),
        Listener("nowasi", [wasm_filter(plugin("nowasi"), "no libc here")]),
        Listener("wat_minimal", [wasm_filter(plugin("wat_minimal"))]),
        Listener("as_header", [wasm_filter(plugin("as_header"), "from-as-config", root_id="as_header")]),
        Listener("as_header_empty", [wasm_filter(plugin("as_header"), vm_id="as2", root_id="as_header")]),
    ]
    with EnvoyRun(listeners, proxy=proxy, extra_args=("--component-log-level", "wasm:info")) as run:
        yield run


def _x_headers(r: Response) -> dict[str, str]:
    return {k: v for k, v in r.headers if k.startswith("x-") and k != "x-envoy-upstream-service-time"}


@pytest.mark.parametrize("name", HEADERS_PLUGINS)
def test_request_header_and_trailer_edits_reach_upstream(envoy: EnvoyRun, name: str) -> None:
    r = envoy.request(name, "POST", headers={"x-headers-ops": OPS, "x-drop": "1", "x-present": "p",
                                             "user-agent": "ua", "x-echo-header": "x-replace-me=old"},
                      body=[b"abc"], trailers=[("x-rt-drop", "1"), ("x-rt-keep", "k")])
    assert r.status == 200
    echo = r.echo()
    assert r.echo_header("x-req-added") == "a"
    assert r.echo_header("user-agent") == "replaced"
    assert r.echo_header("x-drop") is None
    assert echo["trailers"] == [["x-rt-keep", "k"], ["x-rt-added", "1"]]
    x = _x_headers(r)
    assert x["x-resp-added"] == "r"
    assert x["x-replace-me"] == "new"
    assert r.header("content-type") is None
    assert x["x-get-x-present"] == "0:p"
    # Envoy refuses request-header edits once the response is being processed: BAD_ARGUMENT.
    assert x["x-status-add-x-late"] == "2"
    # Pseudo-headers first; the codec drops transfer-encoding; added headers go last, and so does
    # a replaced one (Envoy's replace removes, then appends).
    assert x["x-keys-request_headers"] == (
        "0::authority,:path,:method,:scheme,x-headers-ops,x-present,x-echo-header,"
        "x-forwarded-proto,x-request-id,x-req-added,user-agent")
    status, size, pairs = x["x-size-request_headers"].split(":")
    assert (status, pairs) == ("0", "11") and int(size) > 0


def test_missing_header_is_not_found_in_abi_02x_but_empty_ok_in_010(envoy: EnvoyRun) -> None:
    ops = "request_headers get request_headers x-missing"
    assert envoy.request("headers", headers={"x-headers-ops": ops}).header("x-get-x-missing") == "1:"
    assert envoy.request("headers_abi020", headers={"x-headers-ops": ops}).header("x-get-x-missing") == "1:"
    assert envoy.request("headers_abi010", headers={"x-headers-ops": ops}).header("x-get-x-missing") == "0:"


@pytest.mark.parametrize("name", HEADERS_PLUGINS)
def test_response_trailer_edits(envoy: EnvoyRun, name: str) -> None:
    r = envoy.request(name, "POST", headers={"x-headers-ops": OPS, "x-echo-trailers": "x-up-trailer=orig"},
                      body=b"abc")
    assert r.status == 200
    assert r.trailers == [("x-rtr-added", "2"), ("x-up-trailer", "changed")]


def test_configuration_operations_apply_to_every_request(envoy: EnvoyRun) -> None:
    for _ in range(3):
        r = envoy.request("configured")
        assert r.echo_header("x-from-config") == "c1"
        assert r.header("x-from-config") == "c2"


def test_abi_010_reads_its_configuration_with_proxy_get_configuration(envoy: EnvoyRun) -> None:
    assert envoy.request("configured_abi010").header("x-from-config") == "abi010"


def test_demo_plugin_adds_its_headers(envoy: EnvoyRun) -> None:
    r = envoy.request("demo", path="/anything")
    assert r.status == 200
    assert r.header("x-wasmproxy-demo") == "hello from the demo plugin"
    assert r.echo_header("x-wasmproxy-plugin") == "demo"


def test_nowasi_and_wat_minimal_plugins(envoy: EnvoyRun) -> None:
    assert envoy.request("nowasi").header("x-nowasi") == "no libc here"
    assert envoy.request("wat_minimal").header("x-wat-minimal") == "1"


def test_assemblyscript_plugin_reads_its_configuration(envoy: EnvoyRun) -> None:
    assert envoy.request("as_header").header("x-as-header") == "from-as-config"
    assert envoy.request("as_header_empty").header("x-as-header") == "none"


@pytest.mark.parametrize(("body", "forwarded"), [([b"abc"], [["x-body-trailer", "bt"]]), (b"abc", [])])
def test_trailers_added_at_the_end_of_the_request_body(envoy: EnvoyRun, body: bytes | list[bytes],
                                                       forwarded: list[list[str]]) -> None:
    ops = "request_body add request_trailers x-body-trailer bt;request_body keys request_trailers"
    r = envoy.request("headers", "POST", headers={"x-headers-ops": ops}, body=body)
    assert r.header("x-keys-request_trailers") == "0:x-body-trailer"
    # Only a chunked upstream request can carry them; with content-length they are dropped.
    assert r.echo()["trailers"] == forwarded


def test_on_log_reads_headers_and_response_trailers(envoy: EnvoyRun) -> None:
    ops = ";".join(f"log get {m} {k}" for m, k in [("request_headers", "x-log-probe"), ("response_headers", "x-echo"),
                                                 ("request_trailers", "rt"), ("response_trailers", "x-up-trailer")])
    r = envoy.request("headers", "POST", headers={"x-headers-ops": ops, "x-log-probe": "p1",
                                                  "x-echo-header": "x-echo=e1", "x-echo-trailers": "x-up-trailer=u1"},
                      body=[b"abc"], trailers=[("rt", "t1")])
    assert r.status == 200
    deadline = time.monotonic() + 5.0
    # Everything but the request trailers (which reached the upstream) is still readable.
    wanted = ["headers: x-get-x-log-probe: 0:p1", "headers: x-get-x-echo: 0:e1", "headers: x-get-rt: 1:",
              "headers: x-get-x-up-trailer: 0:u1"]
    while not all(w in envoy.log_text() for w in wanted):  # on_log runs after the response is sent
        assert time.monotonic() < deadline, [w for w in wanted if w not in envoy.log_text()]
        time.sleep(0.02)


def test_maps_that_do_not_exist_yet_or_any_more_refuse_edits(envoy: EnvoyRun) -> None:
    ops = ";".join([
        "request_headers add response_headers x-early 1", "request_headers add response_trailers x-early-t 1",
        "request_headers add request_trailers x-rt-early 1", "request_headers get response_headers :status",
        "response_headers get request_trailers x", "response_headers add request_trailers x-late-rt 1",
        "response_headers add response_trailers x-rsp-t 1",
    ])
    r = envoy.request("headers", "POST", headers={"x-headers-ops": ops}, body=b"x")
    assert r.status == 200
    assert _x_headers(r) == {"x-status-add-x-early": "2", "x-status-add-x-early-t": "2", "x-status-add-x-rt-early": "2",
                             "x-get-status": "2:", "x-get-x": "2:", "x-status-add-x-late-rt": "2",
                             "x-status-add-x-rsp-t": "2"}
    assert r.trailers == []


def test_pseudo_headers_can_be_rewritten(envoy: EnvoyRun) -> None:
    ops = ";".join(["request_headers replace request_headers :path /rewritten",
                    "request_headers remove request_headers :authority",
                    "response_headers replace response_headers :status 201"])
    r = envoy.request("headers", path="/original", headers={"x-headers-ops": ops})
    assert r.status == 201
    assert r.echo()["path"] == "/rewritten"
    assert r.echo_header("host") is None  # Envoy forwards the request without a Host header
