"""A worked example: testing a Proxy-Wasm plugin with wasmproxy.testing (docs/plugin-testing.md).

The plugin under test is the demo plugin (wasmproxy/demo/example_plugin.c): it answers
nothing itself, adds ``x-wasmproxy-demo: <its configuration>`` to responses, and logs.
Run:  pytest examples/test_demo_plugin.py
(with wasmproxy installed the ``wasm_plugin`` fixture comes from its pytest plugin; from a
source checkout add ``-p wasmproxy.testing.pytest_plugin``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from wasmproxy.testing import Response, WasmPlugin

DEMO = Path(__file__).resolve().parents[1] / "wasmproxy" / "demo" / "example.wasm"


def test_response_header_carries_the_configuration(wasm_plugin: Callable[..., WasmPlugin]) -> None:
    plugin = wasm_plugin(DEMO, "hello from a test")
    stream = plugin.http_request({"x-wasmproxy-plugin": "demo"},
                                 response=Response([(":status", "200"), ("content-type", "text/plain")], b"body"))
    assert stream.request.complete  # the request went upstream untouched ...
    assert stream.response.status == 200  # ... and the response came back with the header
    assert stream.response.header("x-wasmproxy-demo") == "hello from a test"
    assert stream.statuses("request_headers") == ["Continue"]  # what on_request_headers returned


def test_step_by_step(wasm_plugin: Callable[..., WasmPlugin]) -> None:
    plugin = wasm_plugin(DEMO, "steps")
    stream = plugin.stream()
    stream.send_request_headers({":method": "POST", ":path": "/upload", "x-wasmproxy-plugin": "demo"})
    stream.send_request_body(b"part 1, ")
    stream.send_request_body(b"part 2", end_stream=True)
    assert stream.request.body == b"part 1, part 2"
    stream.send_response_headers(201, {"content-type": "text/plain"})
    stream.send_response_body(b"created", end_stream=True)
    assert (stream.response.status, stream.response.body) == (201, b"created")
    stream.finish()  # proxy_on_log, proxy_on_done, proxy_on_delete
