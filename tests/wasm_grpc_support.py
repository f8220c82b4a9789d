"""A loopback gRPC server for the Wasm gRPC callout tests: grpcio generic handlers on raw bytes.

Service ``test.Echo`` (no codegen: messages are the bytes the plugin sends):

* ``Unary``   answers ``echo:<request>`` (plus `` md=<v>`` when the call carried metadata
  ``x-md``), with initial metadata ``x-initial: yes`` and trailing metadata ``x-trailing: yes``;
* ``Fail``    the request is ``<code>:<details>``: the call ends with that status;
* ``Empty``   answers an empty message;
* ``Slow``    answers nothing until the client goes away (deadline or cancel), then records
  the RPC in `GrpcTestServer.ended` (tests wait on it with `wait_ended`);
* ``Stream``  bidirectional: initial metadata first (with ``x-md-echo: <v>`` for call metadata
  ``x-md: <v>``), then ``echo:<m>`` for each message, then
  trailing metadata when the client half-closes; a message ``fail`` ends it with ABORTED.
  A client that cancels is recorded in `ended` as ``Stream``.

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
        unary = {"/test.Echo/Unary": self._unary, "/test.Echo/Fail": self._fail,
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

    def _empty(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return b""

    def _slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        left = threading.Event()
        context.add_callback(left.set)
        left.wait(RPC_WAIT_S)
        self._server.record_end("Slow")
        return b"late"

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        finished = threading.Event()  # set when the stream ends on the server's side
        context.add_callback(lambda: None if finished.is_set() else self._server.record_end("Stream"))
        md = dict(context.invocation_metadata()).get("x-md")
        context.send_initial_metadata((("x-initial", "yes"),) + ((("x-md-echo", md),) if md is not None else ()))
        for message in requests:
            if message == b"fail":
                finished.set()
                context.abort(grpc.StatusCode.ABORTED, "asked to fail")
            yield b"echo:" + message
        if not context.is_active():  # the client cancelled: the callback records it
            return
        finished.set()
        context.set_trailing_metadata((("x-trailing", "yes"),))


class GrpcTestServer:
    """The server on a kernel-chosen loopback port; a context manager that stops it."""

    def __init__(self) -> None:
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

    def record_end(self, method: str) -> None:
        with self._ended_cv:
            self.ended.append(method)
            self._ended_cv.notify_all()

    def wait_ended(self, method: str, count: int, timeout: float = 5.0) -> bool:
        """Whether `count` RPCs of `method` ended because the client left, within `timeout`."""
        with self._ended_cv:
            return self._ended_cv.wait_for(lambda: self.ended.count(method) >= count, timeout)
