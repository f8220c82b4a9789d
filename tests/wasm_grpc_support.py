"""A loopback gRPC server for the Wasm gRPC callout tests: grpcio generic handlers on raw bytes.

Service ``test.Echo`` (no codegen: messages are the bytes the plugin sends):

* ``Unary``   answers ``echo:<request>`` (plus `` md=<v>`` when the call carried metadata
  ``x-md``), with initial metadata ``x-initial: yes`` and trailing metadata ``x-trailing: yes``;
* ``Fail``    the request is ``<code>:<details>``: the call ends with that status;
* ``Empty``   answers an empty message;
* ``Metadata`` answers the call's metadata as ``k=v|k=v...``;
* ``Slow``    answers nothing until the client goes away (deadline or cancel);
* ``Stream``  bidirectional: initial metadata first (with ``x-md-echo: <v>`` for call metadata
  ``x-md: <v>``), then ``echo:<m>`` for each message, then
  trailing metadata when the client half-closes; a message ``fail`` ends it with ABORTED.

`GrpcTestServer.started` / `.ended` list the Slow and Stream RPCs that reached their handler /
terminated (tests wait with `wait_all_ended`).

Any other method is unknown to grpcio, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Iterator

import grpc

LOOPBACK = "127.0.0.1"
RPC_WAIT_S = 10.0  # bound on how long Slow waits for its client to leave


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, server: GrpcTestServer) -> None:
        self._server = server

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method == "/test.Echo/Stream":
            return grpc.stream_stream_rpc_method_handler(self._stream)
        unary = {"/test.Echo/Unary": self._unary, "/test.Echo/Fail": self._fail, "/test.Echo/Metadata": self._md,
                 "/test.Echo/Empty": self._empty, "/test.Echo/Slow": self._slow}.get(method)
        return grpc.unary_unary_rpc_method_handler(unary) if unary is not None else None

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.send_initial_metadata((("x-initial", "yes"),))
        context.set_trailing_metadata((("x-trailing", "yes"),))
        md = dict(context.invocation_metadata()).get("x-md")
        return b"echo:" + request + (f" md={md}".encode() if md is not None else b"")

    def _fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        code, _, details = request.decode().partition(":")
        status = next(s for s in grpc.StatusCode if s.value[0] == int(code))
        context.abort(status, details)
        raise AssertionError("abort returns by raising")

    def _md(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return "|".join(f"{k}={v}" for k, v in context.invocation_metadata()).encode()

    def _empty(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return b""

    def _slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._server.record_start("Slow", request)
        left = threading.Event()
        if not context.add_callback(left.set):  # already over
            left.set()
        left.wait(RPC_WAIT_S)
        self._server.record_end("Slow")
        return b"late"

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._server.record_start("Stream")
        if not context.add_callback(lambda: self._server.record_end("Stream")):
            self._server.record_end("Stream")
        md = dict(context.invocation_metadata()).get("x-md")
        context.send_initial_metadata((("x-initial", "yes"),) + ((("x-md-echo", md),) if md is not None else ()))
        for message in requests:
            if message == b"fail":
                context.abort(grpc.StatusCode.ABORTED, "asked to fail")
            yield b"echo:" + message
        context.set_trailing_metadata((("x-trailing", "yes"),))


class GrpcTestServer:
    """The server on a kernel-chosen loopback port; a context manager that stops it."""

    def __init__(self) -> None:
        self.started: list[str] = []  # Slow and Stream RPCs that reached their handler
        self.started_requests: list[bytes] = []  # the request message of each Slow RPC that did
        self.ended: list[str] = []
        self._ended_cv = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc-test"))
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self.port = self._server.add_insecure_port(f"{LOOPBACK}:0")
        self._server.start()

    def __enter__(self) -> GrpcTestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)

    def record_start(self, method: str, request: bytes | None = None) -> None:
        with self._ended_cv:
            self.started.append(method)
            if request is not None:
                self.started_requests.append(request)
            self._ended_cv.notify_all()

    def record_end(self, method: str) -> None:
        with self._ended_cv:
            self.ended.append(method)
            self._ended_cv.notify_all()

    def wait_all_ended(self, method: str, timeout: float = 5.0) -> bool:
        """Whether every `method` RPC that reached its handler has ended, within `timeout`."""
        with self._ended_cv:
            return self._ended_cv.wait_for(lambda: self.ended.count(method) == self.started.count(method), timeout)


def _http2_cluster(name: str, port: int | None) -> str:
    endpoints = (f", endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: "
                 f"{{address: {LOOPBACK}, port_value: {port}}}}}}}}}]}}]" if port is not None else "")
    return f"""  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: {name}{endpoints}}}
"""


def bootstrap_yaml(*, listener_port: int, admin_port: int, grpc_port: int, closed_port: int, plugin: str,
                   configuration: str = "") -> str:
    """One listener whose Wasm filter runs `plugin` (grpc_callout) and answers every request;
    HTTP/2 clusters ``grpc`` (the test server), ``grpc_down`` (nothing listens) and
    ``grpc_empty`` (no endpoints). The same text serves Envoy and wasmproxy."""
    return f"""admin:
  address: {{socket_address: {{address: {LOOPBACK}, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: {LOOPBACK}, port_value: {listener_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: grpc}}}}]
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: grpc_callout
                configuration: {{"@type": type.googleapis.com/google.protobuf.StringValue, value: "{configuration}"}}
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {plugin}}}}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{_http2_cluster("grpc", grpc_port)}{_http2_cluster("grpc_down", closed_port)}{_http2_cluster("grpc_empty", None)}"""
