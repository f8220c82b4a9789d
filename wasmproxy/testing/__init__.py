"""Test Proxy-Wasm plugins from Python: load a .wasm as Envoy would and drive it with plain calls.

    from wasmproxy.testing import WasmPlugin

    with WasmPlugin("plugin.wasm", "my configuration") as plugin:
        stream = plugin.http_request({"x-user": "a"}, response=Response(headers=[("a", "b")]))
        assert stream.response.status == 200

See docs/plugin-testing.md. The pytest plugin (fixture ``wasm_plugin``) is
`wasmproxy.testing.pytest_plugin`.
"""

from .fakes import GrpcCall, GrpcResponse, HttpCall, HttpResponse, ManualDispatcher
from .harness import Callback, HttpStream, LocalReply, LogLine, Request, Response, WasmPlugin

__all__ = [
    "Callback",
    "GrpcCall",
    "GrpcResponse",
    "HttpCall",
    "HttpResponse",
    "HttpStream",
    "LocalReply",
    "LogLine",
    "ManualDispatcher",
    "Request",
    "Response",
    "WasmPlugin",
]
