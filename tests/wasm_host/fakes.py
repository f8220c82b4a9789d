"""Fake environments, timers and stats for driving the Wasm host core without a proxy."""

from __future__ import annotations

from typing import Any, Callable

from wasmproxy.http.headers import HeaderMap
from wasmproxy.http.stream_info import Address, ConnectionInfo, StreamInfo
from wasmproxy.wasm.abi import WasmHeaderMapType, WasmResult, WasmStreamType
from wasmproxy.wasm.context import ContextBase, StreamEnvironment, WasmEnvironment


class FakeStreamEnv(StreamEnvironment):
    """Records what the context asked the proxy to do."""

    def __init__(self, stream_info: StreamInfo | None = None) -> None:
        self.stream_info = stream_info
        self.actions: list[tuple[Any, ...]] = []

    def continue_stream(self, stream_type: WasmStreamType) -> None:
        self.actions.append(("continue", stream_type))

    def close_stream(self, stream_type: WasmStreamType) -> None:
        self.actions.append(("close", stream_type))

    def send_local_response(self, code: int, body: bytes, headers: list[tuple[str, str]],
                            grpc_status: int | None, details: str) -> None:
        self.actions.append(("local_reply", code, body, headers, grpc_status, details))

    def clear_route_cache(self) -> None:
        self.actions.append(("clear_route_cache",))

    def add_trailers(self, map_type: WasmHeaderMapType) -> HeaderMap | None:
        self.actions.append(("add_trailers", map_type))
        return HeaderMap()


class FakeWasmEnv(WasmEnvironment):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def http_call(self, context: ContextBase, token: int, cluster: str, headers: HeaderMap, body: bytes,
                  trailers: HeaderMap | None, timeout_ms: int | None) -> WasmResult:
        if cluster != "known":
            return WasmResult.BadArgument
        self.calls.append(("http_call", context, token, headers.items(), body, trailers, timeout_ms))
        return WasmResult.Ok

    def grpc_call(self, context: ContextBase, token: int, service: bytes, service_name: str, method_name: str,
                  initial_metadata: HeaderMap, request: bytes, timeout_ms: int) -> WasmResult:
        self.calls.append(("grpc_call", token, service, service_name, method_name, request, timeout_ms))
        return WasmResult.Ok

    def grpc_stream(self, context: ContextBase, token: int, service: bytes, service_name: str, method_name: str,
                    initial_metadata: HeaderMap) -> WasmResult:
        self.calls.append(("grpc_stream", token, service))
        return WasmResult.Ok

    def grpc_send(self, token: int, message: bytes, end_stream: bool) -> None:
        self.calls.append(("grpc_send", token, message, end_stream))

    def grpc_close(self, token: int) -> None:
        self.calls.append(("grpc_close", token))

    def grpc_cancel(self, token: int) -> None:
        self.calls.append(("grpc_cancel", token))


class FakeTimer:
    def __init__(self, cb: Callable[[], None]) -> None:
        self.cb = cb
        self.armed_ms: float | None = None

    def enable_timer(self, ms: float) -> None:
        self.armed_ms = ms

    def disable_timer(self) -> None:
        self.armed_ms = None

    def fire(self) -> None:
        assert self.armed_ms is not None
        self.armed_ms = None
        self.cb()


class FakeTimers:
    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def __call__(self, cb: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(cb)
        self.timers.append(timer)
        return timer


class FakeTime:
    def __init__(self) -> None:
        self.now = 1_700_000_000.5
        self.mono = 100.25

    def system_time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


def stream_info() -> StreamInfo:
    conn = ConnectionInfo(id=7, local_address=Address("127.0.0.1", 10000),
                          remote_address=Address("127.0.0.2", 54321))
    return StreamInfo(connection=conn, start_time=1_700_000_000.25)
