"""wasm/grpc.py's GrpcClient and ProxyWasmEnvironment's gRPC callouts, without a proxy: a loopback
grpcio server (tests/wasm_grpc_support.py), a queue standing in for the worker's dispatcher
(every result must arrive through ``post``), and timers fired by hand."""

from __future__ import annotations

import queue
from typing import Any, Callable

import pytest

from wasm_grpc_support import GrpcTestServer
from wasmproxy.http.headers import HeaderMap
from wasmproxy.wasm.abi import WasmResult
from wasmproxy.wasm.grpc import CONNECT_FAILURE_MESSAGE, GrpcClient, GrpcTarget, _metadata, remote_close_message

WAIT_S = 5.0


class FakeTimer:
    def __init__(self, cb: Callable[[], None]) -> None:
        self.cb = cb
        self.armed_ms: float | None = None

    def enable_timer(self, ms: float) -> None:
        self.armed_ms = ms

    def disable_timer(self) -> None:
        self.armed_ms = None

    def fire(self) -> None:
        assert self.armed_ms is not None, "timer not armed"
        self.armed_ms = None
        self.cb()


class Worker:
    """The worker thread's stand-in: posted callables run only when the test drains them."""

    def __init__(self) -> None:
        self.posted: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.timers: list[FakeTimer] = []

    def post(self, cb: Callable[[], None]) -> None:
        self.posted.put(cb)

    def timer(self, cb: Callable[[], None]) -> FakeTimer:
        self.timers.append(FakeTimer(cb))
        return self.timers[-1]

    def drain_until(self, done: Callable[[], bool]) -> None:
        """Run posted callables until done() (each wait bounded)."""
        while not done():
            self.posted.get(timeout=WAIT_S)()

    def drain_ready(self) -> None:
        while True:
            try:
                self.posted.get_nowait()()
            except queue.Empty:
                return


class Recorder:
    """Both callback protocols; events in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_success(self, message: bytes) -> None:
        self.events.append(("success", message))

    def on_failure(self, status: int, message: str) -> None:
        self.events.append(("failure", status, message))

    def on_receive_initial_metadata(self, metadata: HeaderMap) -> None:
        self.events.append(("initial", metadata.items()))

    def on_receive_message(self, message: bytes) -> None:
        self.events.append(("message", message))

    def on_receive_trailing_metadata(self, metadata: HeaderMap) -> None:
        self.events.append(("trailing", metadata.items()))

    def on_remote_close(self, status: int, message: str) -> None:
        self.events.append(("close", status, message))

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1][0] in ("success", "failure", "close")


@pytest.fixture(scope="module")
def server() -> Any:
    with GrpcTestServer() as s:
        yield s


@pytest.fixture
def worker() -> Any:
    w = Worker()
    yield w
    w.drain_ready()


@pytest.fixture
def client(worker: Worker) -> Any:
    c = GrpcClient(worker.post, worker.timer)
    yield c
    c.close()


def target(server: GrpcTestServer) -> GrpcTarget:
    return GrpcTarget(f"127.0.0.1:{server.port}", "grpc")


def test_unary_success_carries_the_metadata_and_answers_on_the_worker(server: GrpcTestServer, worker: Worker,
                                                                       client: GrpcClient) -> None:
    rec = Recorder()
    client.send(target(server), "test.Echo", "Unary", HeaderMap([("x-md", "1")]), b"x", 5000, rec)
    assert rec.events == []  # nothing but through the worker
    worker.drain_until(lambda: rec.ended)
    assert rec.events == [("success", b"echo:x md=1")]
    assert worker.timers[0].armed_ms is None  # the timeout timer is off once answered


@pytest.mark.parametrize("request_, expected", [
    (b"5:not here", (5, "not here{via_upstream}")),
    (b"9:", (9, "via_upstream")),
])
def test_unary_server_status_is_envoys_message(server: GrpcTestServer, worker: Worker, client: GrpcClient,
                                               request_: bytes, expected: tuple[int, str]) -> None:
    rec = Recorder()
    client.send(target(server), "test.Echo", "Fail", HeaderMap(), request_, None, rec)
    worker.drain_until(lambda: rec.ended)
    assert rec.events == [("failure", *expected)]


def test_unknown_method_is_unimplemented(server: GrpcTestServer, worker: Worker, client: GrpcClient) -> None:
    rec = Recorder()
    client.send(target(server), "other.Svc", "M", HeaderMap(), b"", None, rec)
    worker.drain_until(lambda: rec.ended)
    assert rec.events == [("failure", 12, "Method not found!{via_upstream}")]


def test_unreachable_host_is_envoys_connect_failure(worker: Worker, client: GrpcClient) -> None:
    from support.ports import free_port

    rec = Recorder()
    client.send(GrpcTarget(f"127.0.0.1:{free_port()}", "down"), "test.Echo", "Unary", HeaderMap(), b"", None, rec)
    worker.drain_until(lambda: rec.ended)
    assert rec.events == [("failure", 14, CONNECT_FAILURE_MESSAGE + "{upstream_reset_before_response_started"
                           "{remote_connection_failure|delayed_connect_error:_Connection_refused}}")]


def test_unary_timeout_is_the_routers_and_cancels_the_call(server: GrpcTestServer, worker: Worker,
                                                           client: GrpcClient) -> None:
    rec = Recorder()
    client.send(target(server), "test.Echo", "Slow", HeaderMap(), b"", 60_000, rec)
    worker.drain_ready()  # the call starts
    (timer,) = worker.timers
    assert timer.armed_ms == 60_000
    timer.fire()
    assert rec.events == [("failure", 14, "upstream request timeout{response_timeout}")]
    assert server.wait_all_ended("Slow")  # cancelled on the server too, if it got there
    worker.drain_ready()
    assert len(rec.events) == 1  # grpcio's cancelled result is dropped


class FakeClusterStats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def charge_response_code(self, code: int, internal: bool) -> None:
        assert internal
        self.inc(f"upstream_rq_{code}")


def test_unary_timeout_charges_the_routers_timeout_stats(server: GrpcTestServer, worker: Worker,
                                                         client: GrpcClient) -> None:
    stats = FakeClusterStats()
    rec = Recorder()
    client.send(GrpcTarget(f"127.0.0.1:{server.port}", "grpc", stats=stats), "test.Echo", "Slow", HeaderMap(), b"",
                60_000, rec)
    worker.drain_ready()
    worker.timers[0].fire()
    assert stats.counts == {"upstream_rq_total": 1, "upstream_rq_timeout": 1, "upstream_rq_tx_reset": 1,
                            "upstream_rq_504": 1}
    assert server.wait_all_ended("Slow")


def test_unary_cancelled_before_the_worker_drains_never_starts(server: GrpcTestServer, worker: Worker,
                                                               client: GrpcClient) -> None:
    rec = Recorder()
    # Its own request message: another test's cancelled Slow call may still reach the server now.
    client.send(target(server), "test.Echo", "Slow", HeaderMap(), b"cancelled-before-drain", None, rec).cancel()
    later = Recorder()
    client.send(target(server), "test.Echo", "Unary", HeaderMap(), b"", None, later)
    worker.drain_until(lambda: later.ended)
    assert rec.events == [] and b"cancelled-before-drain" not in server.started_requests


def test_stream_events_in_envoys_order(server: GrpcTestServer, worker: Worker, client: GrpcClient) -> None:
    rec = Recorder()
    stream = client.start(target(server), "test.Echo", "Stream", HeaderMap([("x-md", "s")]), rec)
    stream.send_message(b"a", False)
    stream.send_message(b"b", True)  # end_stream: the request is over before the headers are seen
    stream.send_message(b"ignored", False)
    worker.drain_until(lambda: rec.ended)
    (initial,) = [e for e in rec.events if e[0] == "initial"]
    pairs = dict(initial[1])
    assert [k for k, _ in initial[1]] == [":status", "content-type", "x-initial", "x-md-echo",
                                          "x-envoy-upstream-service-time"]
    assert pairs[":status"] == "200" and pairs["x-md-echo"] == "s"
    assert int(pairs["x-envoy-upstream-service-time"]) >= 0
    assert rec.events[1:] == [
        ("message", b"echo:a"), ("message", b"echo:b"),
        ("trailing", [("grpc-status", "0"), ("grpc-message", ""), ("x-trailing", "yes")]),
        ("close", 0, "via_upstream"),
    ]


def test_stream_without_messages_and_an_error_looks_trailers_only(server: GrpcTestServer, worker: Worker,
                                                                   client: GrpcClient) -> None:
    rec = Recorder()
    client.start(target(server), "test.Echo", "Nope", HeaderMap(), rec).close_stream()
    worker.drain_until(lambda: rec.ended)
    assert rec.events[0] == ("initial", [])
    assert rec.events[1][1][:4] == [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "12"),
                                    ("grpc-message", "Method not found!")]
    assert rec.events[2] == ("close", 12, "Method not found!{via_upstream}")


def test_reset_stream_has_no_more_callbacks_and_ends_on_the_server(server: GrpcTestServer, worker: Worker,
                                                                  client: GrpcClient) -> None:
    rec = Recorder()
    stream = client.start(target(server), "test.Echo", "Stream", HeaderMap(), rec)
    stream.send_message(b"a", False)
    worker.drain_until(lambda: ("message", b"echo:a") in rec.events)
    stream.reset()
    assert server.wait_all_ended("Stream")
    worker.drain_ready()
    assert [e[0] for e in rec.events] == ["initial", "message"]


def test_call_metadata_grpcio_accepts() -> None:
    md = HeaderMap([(":path", "/x"), ("content-type", "x"), ("te", "trailers"), ("x-ok", "v"), ("x-bad", "é"),
                    ("x-data-bin", "\x00\xff"), ("Bad Key", "v")])
    assert _metadata(GrpcTarget("a", "b", (("x-svc", "1"),), google=True), md) == [
        ("x-svc", "1"), ("x-ok", "v"), ("x-data-bin", b"\x00\xff")]


def test_envoy_grpc_metadata_ends_with_the_routers_headers() -> None:
    md = HeaderMap([("x-envoy-internal", "no"), ("x-ok", "v"), ("x-envoy-expected-rq-timeout-ms", "1")])
    assert _metadata(GrpcTarget("a", "b"), md, 250) == [
        ("x-ok", "v"), ("x-envoy-internal", "true"), ("x-envoy-expected-rq-timeout-ms", "250")]
    assert _metadata(GrpcTarget("a", "b"), HeaderMap(), None) == [("x-envoy-internal", "true")]


def test_remote_close_message() -> None:
    assert remote_close_message("") == "via_upstream"
    assert remote_close_message("m", "d") == "m{d}"


# ---------------------------------------------------------------- ProxyWasmEnvironment


class FakeWasm:
    def __init__(self) -> None:
        self.current_context: object | None = None
        self.after: list[Callable[[], None]] = []

    def is_failed(self) -> bool:
        return False

    def add_after_vm_call_action(self, cb: Callable[[], None]) -> None:
        self.after.append(cb)


class FakeRootContext:
    """Records what a root context is told (ContextBase.on_grpc_*)."""

    def __init__(self) -> None:
        self.wasm = FakeWasm()
        self.events: list[tuple[Any, ...]] = []

    def on_grpc_receive_initial_metadata(self, token: int, metadata: HeaderMap) -> None:
        self.events.append(("initial", token, metadata.items()))

    def on_grpc_receive(self, token: int, message: bytes) -> None:
        self.events.append(("receive", token, message))

    def on_grpc_receive_trailing_metadata(self, token: int, metadata: HeaderMap) -> None:
        self.events.append(("trailing", token, metadata.items()))

    def on_grpc_close(self, token: int, status: int, message: bytes) -> None:
        if self.wasm.current_context is not None:  # ContextBase defers a re-entrant close
            self.wasm.add_after_vm_call_action(lambda: self.on_grpc_close(token, status, message))
            return
        self.events.append(("close", token, status, message))

    def return_from_vm_call(self) -> None:
        self.wasm.current_context = None
        for action in self.wasm.after:
            action()


class FakeHost:
    def __init__(self, address: str) -> None:
        self.address_string = address


class FakeCluster:
    def __init__(self, host: FakeHost | None) -> None:
        self.host = host

    def choose_host(self) -> FakeHost | None:
        return self.host


def environment(worker: Worker, clusters: dict[str, FakeCluster]) -> Any:
    from wasmproxy.wasm.plugin import ProxyWasmEnvironment

    class Tlcm:
        def get(self, name: str) -> FakeCluster | None:
            return clusters.get(name)

    return ProxyWasmEnvironment(lambda: Tlcm(), None, post=worker.post, timer_factory=worker.timer)


def grpc_service(cluster: str = "", target_uri: str = "") -> bytes:
    from envoy.config.core.v3 import grpc_service_pb2

    proto = grpc_service_pb2.GrpcService()
    if cluster:
        proto.envoy_grpc.cluster_name = cluster
    if target_uri:
        proto.google_grpc.target_uri = target_uri
        proto.google_grpc.stat_prefix = "p"
    return proto.SerializeToString()


def test_service_argument_is_checked_like_envoy(worker: Worker) -> None:
    env = environment(worker, {"grpc": FakeCluster(None)})
    ctx: Any = FakeRootContext()
    # Bytes that are no GrpcService name a cluster: an unknown one is ParseFailure.
    assert env.grpc_call(ctx, 1, b"nope", "s", "m", HeaderMap(), b"", 1000) == WasmResult.ParseFailure
    assert env.grpc_stream(ctx, 2, b"nope", "s", "m", HeaderMap()) == WasmResult.ParseFailure
    # A GrpcService naming no target is refused (Envoy 1.40 aborts on it).
    assert env.grpc_call(ctx, 5, b"", "s", "m", HeaderMap(), b"", 1000) == WasmResult.BadArgument
    assert ctx.events == []


def test_unknown_cluster_fails_to_start_and_still_reports_the_close(worker: Worker) -> None:
    env = environment(worker, {})
    ctx: Any = FakeRootContext()
    ctx.wasm.current_context = ctx  # inside the plugin's host call
    assert env.grpc_call(ctx, 5, grpc_service("nope"), "s", "m", HeaderMap(), b"", 1000) == WasmResult.InternalFailure
    assert ctx.events == []
    ctx.return_from_vm_call()
    assert ctx.events == [("close", 5, 14, b"Cluster not available")]


def test_no_healthy_host_reports_envoys_local_reply_after_the_vm_call(worker: Worker) -> None:
    env = environment(worker, {"grpc": FakeCluster(None)})
    ctx: Any = FakeRootContext()
    ctx.wasm.current_context = ctx
    assert env.grpc_stream(ctx, 6, grpc_service("grpc"), "s", "m", HeaderMap()) == WasmResult.InternalFailure
    assert ctx.events == []
    ctx.return_from_vm_call()
    assert ctx.events == [
        ("initial", 6, []),
        ("trailing", 6, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"),
                         ("grpc-message", "no healthy upstream")]),
        ("close", 6, 14, b"no healthy upstream{no_healthy_upstream}"),
    ]


def test_call_and_stream_through_the_environment(server: GrpcTestServer, worker: Worker) -> None:
    env = environment(worker, {"grpc": FakeCluster(FakeHost(f"127.0.0.1:{server.port}"))})
    ctx: Any = FakeRootContext()
    # A bare cluster name works as well as a GrpcService.
    assert env.grpc_call(ctx, 5, b"grpc", "test.Echo", "Unary", HeaderMap(), b"x", 5000) == WasmResult.Ok
    worker.drain_until(lambda: bool(ctx.events))
    assert ctx.events == [("receive", 5, b"echo:x")] and 5 not in env.grpc_callouts
    assert env.grpc_stream(ctx, 6, grpc_service("grpc"), "test.Echo", "Stream", HeaderMap()) == WasmResult.Ok
    env.grpc_send(6, b"a", False)
    env.grpc_close(6)
    worker.drain_until(lambda: ctx.events[-1][0] == "close")
    assert [e[0] for e in ctx.events[1:]] == ["initial", "receive", "trailing", "close"]
    assert ctx.events[-1] == ("close", 6, 0, b"via_upstream") and 6 not in env.grpc_callouts


def test_cancelled_callouts_say_nothing_more(server: GrpcTestServer, worker: Worker) -> None:
    env = environment(worker, {"grpc": FakeCluster(FakeHost(f"127.0.0.1:{server.port}"))})
    ctx: Any = FakeRootContext()
    assert env.grpc_call(ctx, 9, grpc_service("grpc"), "test.Echo", "Slow", HeaderMap(), b"", 5000) == WasmResult.Ok
    env.grpc_close(9)  # on a call: cancel
    assert env.grpc_stream(ctx, 10, grpc_service("grpc"), "test.Echo", "Stream", HeaderMap()) == WasmResult.Ok
    env.grpc_send(10, b"a", False)
    worker.drain_until(lambda: bool(ctx.events))  # the stream's initial metadata
    env.grpc_cancel(10)
    assert server.wait_all_ended("Stream")
    worker.drain_ready()
    assert env.grpc_callouts == {}
    assert all(e[1] == 10 and e[0] in ("initial", "receive") for e in ctx.events)


def test_google_grpc_target_needs_no_cluster(server: GrpcTestServer, worker: Worker) -> None:
    env = environment(worker, {})
    ctx: Any = FakeRootContext()
    service = grpc_service(target_uri=f"127.0.0.1:{server.port}")
    assert env.grpc_call(ctx, 5, service, "test.Echo", "Unary", HeaderMap(), b"g", 5000) == WasmResult.Ok
    worker.drain_until(lambda: bool(ctx.events))
    assert ctx.events == [("receive", 5, b"echo:g")]
