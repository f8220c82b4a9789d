"""The proxy around a plugin, faked for tests: a dispatcher on a manual clock and scripted callouts.

`ManualDispatcher` is what a worker's Dispatcher is to a Wasm (post, timers, time source),
except that time moves only when the test calls `advance`, and posted callbacks run when
the harness drains them after each step. `CalloutRecorder` stands in for the cluster
manager (http_call) and the gRPC client (grpc_call): every callout is recorded, answered
by a responder the test registered, or left pending for the test to answer.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from ..event.dispatcher import SimulatedTimeSource
from ..http.headers import HeaderMap
from ..wasm.abi import WasmResult
from ..wasm.context import ContextBase
from ..wasm.plugin import ProxyWasmEnvironment

__all__ = [
    "CalloutRecorder",
    "GrpcCall",
    "GrpcResponse",
    "HttpCall",
    "HttpResponse",
    "ManualDispatcher",
]

_MAX_POSTED_ROUNDS = 1000  # callbacks may post more; a plugin that loops forever must not hang a test
_MAX_TIMER_FIRES = 100_000
_EPSILON_S = 1e-9  # float seconds: 100 ms added three times is a hair past 300 ms


class _ManualTimer:
    """Envoy's Event::Timer on a ManualDispatcher: one-shot, re-armed by enable_timer."""

    __slots__ = ("_dispatcher", "_cb", "deadline", "_seq")

    def __init__(self, dispatcher: "ManualDispatcher", cb: Callable[[], None]) -> None:
        self._dispatcher = dispatcher
        self._cb = cb
        self.deadline: float | None = None
        self._seq = 0

    def enable_timer(self, ms: float) -> None:
        self.deadline = self._dispatcher.time_source.monotonic() + ms / 1000.0
        self._seq = self._dispatcher._arm(self)

    def disable_timer(self) -> None:
        self.deadline = None

    def enabled(self) -> bool:
        return self.deadline is not None

    def _fire(self, seq: int) -> bool:
        if self.deadline is None or seq != self._seq:
            return False  # disabled or re-armed since this entry was queued
        self.deadline = None
        self._cb()
        return True


class ManualDispatcher:
    """post / create_timer / time_source for Wasms, on a clock that moves only in `advance`."""

    def __init__(self, name: str = "main_thread") -> None:
        self.name = name
        self.time_source = SimulatedTimeSource()
        self._posted: list[Callable[[], None]] = []
        self._heap: list[tuple[float, int, _ManualTimer]] = []
        self._seq = itertools.count(1)

    # -- the Dispatcher interface the Wasm host uses ------------------------------------------

    def post(self, cb: Callable[[], None]) -> None:
        self._posted.append(cb)

    def create_timer(self, cb: Callable[[], None]) -> _ManualTimer:
        return _ManualTimer(self, cb)

    def is_thread_safe(self) -> bool:
        return True

    def _arm(self, timer: _ManualTimer) -> int:
        seq = next(self._seq)
        assert timer.deadline is not None
        heapq.heappush(self._heap, (timer.deadline, seq, timer))
        return seq

    # -- what tests call ------------------------------------------------------------------------

    def run_posted(self) -> int:
        """Run posted callbacks (and those they post) now; how many ran."""
        ran = 0
        for _ in range(_MAX_POSTED_ROUNDS):
            batch, self._posted = self._posted, []
            if not batch:
                return ran
            for cb in batch:
                cb()
                ran += 1
        raise RuntimeError(f"posted callbacks still pending after {_MAX_POSTED_ROUNDS} rounds")

    def next_deadline(self) -> float | None:
        """Monotonic time of the next armed timer, or None."""
        while self._heap and self._heap[0][2].deadline != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale entry
        return self._heap[0][0] if self._heap else None

    def advance(self, ms: float) -> int:
        """Move the clock forward `ms`, firing every timer that falls due, in deadline order,
        each at its own time (a periodic tick fires once per period). Returns the fires."""
        target = self.time_source.monotonic() + ms / 1000.0
        fired = 0
        for _ in range(_MAX_TIMER_FIRES):
            self.run_posted()
            if not self._heap or self._heap[0][0] > target + _EPSILON_S:
                break
            deadline, seq, timer = heapq.heappop(self._heap)
            now = self.time_source.monotonic()
            if deadline > now:
                self.time_source.advance(deadline - now)
            if timer._fire(seq):
                fired += 1
        else:
            raise RuntimeError(f"more than {_MAX_TIMER_FIRES} timer fires in one advance")
        now = self.time_source.monotonic()
        if target > now:
            self.time_source.advance(target - now)
        self.run_posted()
        return fired


# -- callouts -----------------------------------------------------------------------------------


@dataclass
class HttpResponse:
    """A canned answer to an http_call (a response, or a failure: Envoy's onFailure)."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] | None = None
    failure: str | None = None  # e.g. "reset": the plugin gets the callback with no headers

    @classmethod
    def fail(cls, reason: str = "reset") -> "HttpResponse":
        return cls(failure=reason)


@dataclass
class GrpcResponse:
    """A canned answer to a grpc_call: a message (status 0), or a non-zero status and message."""

    message: bytes = b""
    status: int = 0
    status_message: str = ""
    initial_metadata: list[tuple[str, str]] | None = None
    trailing_metadata: list[tuple[str, str]] | None = None


@dataclass(eq=False)
class HttpCall:
    """One proxy_http_call the plugin made; `respond` / `fail` answer it if still pending."""

    cluster: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] | None
    timeout_ms: int
    _callbacks: Any = field(repr=False, default=None)
    _drain: Callable[[], None] = field(repr=False, default=lambda: None)
    answered: bool = False

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    def answer(self, response: HttpResponse) -> None:
        if self.answered:
            raise RuntimeError(f"http_call to {self.cluster} already answered")
        self.answered = True
        if response.failure is not None:
            self._callbacks.on_failure(response.failure)
        else:
            headers = HeaderMap([(":status", str(response.status))] + list(response.headers))
            trailers = HeaderMap(response.trailers) if response.trailers is not None else None
            self._callbacks.on_success(headers, bytes(response.body), trailers)
        self._drain()

    def respond(self, status: int = 200, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                trailers: list[tuple[str, str]] | None = None) -> None:
        self.answer(HttpResponse(status, headers or [], body, trailers))

    def fail(self, reason: str = "reset") -> None:
        self.answer(HttpResponse.fail(reason))


@dataclass(eq=False)
class GrpcCall:
    """One proxy_grpc_call the plugin made; `respond` / `fail` answer it if still pending."""

    service: bytes
    service_name: str
    method_name: str
    initial_metadata: list[tuple[str, str]]
    request: bytes
    timeout_ms: int
    token: int = 0
    _context: Any = field(repr=False, default=None)
    _drain: Callable[[], None] = field(repr=False, default=lambda: None)
    answered: bool = False
    cancelled: bool = False

    def answer(self, response: GrpcResponse) -> None:
        if self.answered or self.cancelled:
            raise RuntimeError(f"grpc_call {self.service_name}/{self.method_name} is no longer pending")
        self.answered = True
        context: ContextBase = self._context
        if response.initial_metadata is not None:
            context.on_grpc_receive_initial_metadata(self.token, HeaderMap(response.initial_metadata))
        if response.status == 0:
            context.on_grpc_receive(self.token, bytes(response.message))
        if response.trailing_metadata is not None:
            context.on_grpc_receive_trailing_metadata(self.token, HeaderMap(response.trailing_metadata))
        if response.status != 0:
            context.on_grpc_close(self.token, response.status, response.status_message.encode())
        self._drain()

    def respond(self, message: bytes = b"") -> None:
        self.answer(GrpcResponse(message))

    def fail(self, status: int = 14, message: str = "unavailable") -> None:
        self.answer(GrpcResponse(status=status, status_message=message))


HttpResponder = Union[HttpResponse, Callable[[HttpCall], "HttpResponse | None"]]
GrpcResponder = Union[GrpcResponse, Callable[[GrpcCall], "GrpcResponse | None"]]


class _AsyncClient:
    def __init__(self, recorder: "CalloutRecorder") -> None:
        self._recorder = recorder

    def send(self, cluster: str, headers: HeaderMap, body: bytes, trailers: HeaderMap | None, timeout_ms: int,
             callbacks: Any) -> object:
        return self._recorder._http_call(cluster, headers, body, trailers, timeout_ms, callbacks)


class _ThreadLocalClusterManager:
    def __init__(self, recorder: "CalloutRecorder") -> None:
        self._recorder = recorder
        self._client = _AsyncClient(recorder)

    def get(self, name: str) -> object | None:
        clusters = self._recorder.clusters
        return object() if clusters is None or name in clusters else None

    def http_async_client(self) -> _AsyncClient:
        return self._client


class CalloutRecorder:
    """The cluster manager and gRPC client of a test: records callouts and answers them.

    ``clusters``: the clusters that exist (None: any name does); http_call to another one is
    BadArgument, as in Envoy. A responder answers on the next dispatcher turn, never inline
    (Envoy fails an http_call whose request completed inline).
    """

    def __init__(self, dispatcher: ManualDispatcher, clusters: tuple[str, ...] | None = None) -> None:
        self.dispatcher = dispatcher
        self.clusters = clusters
        self.http_calls: list[HttpCall] = []
        self.grpc_calls: list[GrpcCall] = []
        self._http_responders: list[tuple[str | None, HttpResponder]] = []
        self._grpc_responders: list[tuple[str | None, GrpcResponder]] = []
        self._tlcm = _ThreadLocalClusterManager(self)

    # the FactoryContext.cluster_manager interface
    def thread_local(self) -> _ThreadLocalClusterManager:
        return self._tlcm

    def on_http_call(self, responder: HttpResponder, cluster: str | None = None) -> None:
        """Answer later http_calls (to `cluster`, or any) with `responder` (a response, or a
        callable taking the HttpCall and giving a response, or None to leave it pending)."""
        self._http_responders.insert(0, (cluster, responder))

    def on_grpc_call(self, responder: GrpcResponder, method: str | None = None) -> None:
        """Answer later grpc_calls (to ``service/method`` or just ``method``, or any) with `responder`."""
        self._grpc_responders.insert(0, (method, responder))

    def _http_call(self, cluster: str, headers: HeaderMap, body: bytes, trailers: HeaderMap | None, timeout_ms: int,
                   callbacks: Any) -> object:
        call = HttpCall(cluster, list(headers.items()), bytes(body), list(trailers.items()) if trailers else None,
                        timeout_ms, callbacks, self.dispatcher.run_posted)
        self.http_calls.append(call)
        for wanted, responder in self._http_responders:
            if wanted is None or wanted == cluster:
                self.dispatcher.post(lambda: self._answer_http(call, responder))
                break
        return call

    @staticmethod
    def _answer_http(call: HttpCall, responder: HttpResponder) -> None:
        response = responder(call) if callable(responder) else responder
        if response is not None and not call.answered:
            call.answer(response)

    def _grpc_call(self, call: GrpcCall) -> None:
        self.grpc_calls.append(call)
        for wanted, responder in self._grpc_responders:
            if wanted is None or wanted in (call.method_name, f"{call.service_name}/{call.method_name}"):
                self.dispatcher.post(lambda: self._answer_grpc(call, responder))
                break

    @staticmethod
    def _answer_grpc(call: GrpcCall, responder: GrpcResponder) -> None:
        response = responder(call) if callable(responder) else responder
        if response is not None and not call.answered and not call.cancelled:
            call.answer(response)


class TestEnvironment(ProxyWasmEnvironment):
    """The Wasm's callout environment: http_call as the proxy does it, grpc_call to the recorder."""

    __test__ = False  # not a pytest class

    def __init__(self, recorder: CalloutRecorder) -> None:
        super().__init__(recorder.thread_local, None, post=recorder.dispatcher.post,
                         timer_factory=recorder.dispatcher.create_timer)
        self._recorder = recorder

    def grpc_call(
        self, context: ContextBase, token: int, service: bytes, service_name: str, method_name: str,
        initial_metadata: HeaderMap, request: bytes, timeout_ms: int,
    ) -> WasmResult:
        if not self._known_grpc_service(service):
            return WasmResult.ParseFailure  # no GrpcService and no such cluster (Envoy)
        call = GrpcCall(bytes(service), service_name, method_name, list(initial_metadata.items()), bytes(request),
                        timeout_ms, token, context, self._recorder.dispatcher.run_posted)
        self._recorder._grpc_call(call)
        return WasmResult.Ok

    def _known_grpc_service(self, service: bytes) -> bool:
        """Envoy's grpcCall: a serialized GrpcService, else the name of a known cluster."""
        from envoy.config.core.v3 import grpc_service_pb2
        from google.protobuf.message import DecodeError

        try:
            grpc_service_pb2.GrpcService().ParseFromString(service)
            return True
        except DecodeError:
            return self._recorder.thread_local().get(service.decode("utf-8", "replace")) is not None

    def grpc_cancel(self, token: int) -> None:
        for call in self._recorder.grpc_calls:
            if call.token == token:
                call.cancelled = True

    grpc_close = grpc_cancel
