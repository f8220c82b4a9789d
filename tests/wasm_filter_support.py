"""Socket-free harness for the Wasm HTTP filter: fake dispatchers, a FactoryContext, plugin
protos, and one HTTP stream driven through the real FilterManager with a scripted upstream."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import wrappers_pb2

from wasmproxy.event.dispatcher import SimulatedTimeSource
from wasmproxy.http.filter import FilterDataStatus, FilterHeadersStatus, FilterTrailersStatus, PassThroughFilter
from wasmproxy.http.filter_manager import FilterManager
from wasmproxy.http.headers import HeaderMap
from wasmproxy.http.stream_info import Address, ConnectionInfo, StreamInfo
from wasmproxy.stats.store import Store
from wasmproxy.thread_local import ThreadLocalInstance

OUT = Path(__file__).resolve().parents[1] / "plugins" / "out"


def plugin_path(name: str) -> str:
    path = OUT / f"{name}.wasm"
    if not path.exists():
        pytest.skip(f"{path} not built (python -m plugins.build)")
    return str(path)


class FakeTimer:
    def __init__(self, dispatcher: "FakeDispatcher", cb: Callable[[], None]) -> None:
        self.dispatcher = dispatcher
        self.cb = cb
        self.armed_ms: float | None = None

    def enable_timer(self, ms: float) -> None:
        self.armed_ms = ms

    def disable_timer(self) -> None:
        self.armed_ms = None

    def enabled(self) -> bool:
        return self.armed_ms is not None

    def fire(self) -> None:
        assert self.armed_ms is not None, "timer not armed"
        self.armed_ms = None
        self.cb()


class FakeDispatcher:
    """Posts queue until run_posted(); timers fire when the test says; simulated time."""

    def __init__(self, name: str = "main_thread") -> None:
        self.name = name
        self.time_source = SimulatedTimeSource()
        self.posted: list[Callable[[], None]] = []
        self.timers: list[FakeTimer] = []

    def post(self, cb: Callable[[], None]) -> None:
        self.posted.append(cb)

    def run_posted(self) -> int:
        ran = 0
        for _ in range(100):  # bounded: callbacks may post more
            batch, self.posted = self.posted, []
            if not batch:
                break
            for cb in batch:
                cb()
                ran += 1
        return ran

    def create_timer(self, cb: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self, cb)
        self.timers.append(timer)
        return timer

    def armed_timers(self) -> list[FakeTimer]:
        return [t for t in self.timers if t.enabled()]

    def is_thread_safe(self) -> bool:
        return True


class FakeAsyncClient:
    """Records http_call requests; the test answers them."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, HeaderMap, bytes, int, Any]] = []

    def send(self, cluster: str, headers: HeaderMap, body: bytes, trailers: HeaderMap | None, timeout_ms: int,
             callbacks: Any) -> object:
        self.requests.append((cluster, headers, body, timeout_ms, callbacks))
        return object()


class FakeThreadLocalClusterManager:
    def __init__(self, clusters: tuple[str, ...]) -> None:
        self.clusters = clusters
        self.async_client = FakeAsyncClient()

    def get(self, name: str) -> object | None:
        return object() if name in self.clusters else None

    def http_async_client(self) -> FakeAsyncClient:
        return self.async_client


class FakeClusterManager:
    def __init__(self, clusters: tuple[str, ...] = ("echo",)) -> None:
        self.tlcm = FakeThreadLocalClusterManager(clusters)
        self.clusters: dict[str, Any] = {}

    def thread_local(self) -> FakeThreadLocalClusterManager:
        return self.tlcm


@dataclass
class FakeLocalInfo:
    node: Any = None


@dataclass
class FakeFactoryContext:
    """The parts of wasmproxy.server_context.FactoryContext the Wasm factories use."""

    main_dispatcher: FakeDispatcher
    thread_local: ThreadLocalInstance
    cluster_manager: Any
    store_for: Callable[[Any], Store]
    local_info: FakeLocalInfo = field(default_factory=FakeLocalInfo)
    bootstrap: Any = None
    listener_name: str = ""
    listener_direction: int = 0

    @property
    def main_store(self) -> Store:
        return self.store_for(self.main_dispatcher)


def factory_context(dispatcher: FakeDispatcher | None = None, cluster_manager: Any = None) -> Any:
    """A FactoryContext for socket-free tests: one Store for every thread, fake callouts."""
    dispatcher = dispatcher or FakeDispatcher()
    store = Store("main_thread")
    return FakeFactoryContext(main_dispatcher=dispatcher, thread_local=ThreadLocalInstance(dispatcher),  # type: ignore[arg-type]
                              cluster_manager=cluster_manager or FakeClusterManager(), store_for=lambda d: store)


def plugin_config(
    plugin: str,
    configuration: str | None = None,
    *,
    name: str | None = None,
    root_id: str = "",
    vm_id: str = "",
    vm_configuration: str | None = None,
    failure_policy: str | None = None,
    fail_open: bool = False,
    env: dict[str, str] | None = None,
    host_env_keys: tuple[str, ...] = (),
    reload_base_ms: int | None = None,
    inline: bool = False,
) -> wasm_pb2.PluginConfig:
    """A PluginConfig running plugins/out/<plugin>.wasm with StringValue configurations."""
    proto = wasm_pb2.PluginConfig(name=name or plugin, root_id=root_id, fail_open=fail_open)
    vm = proto.vm_config
    vm.vm_id = vm_id
    vm.runtime = "envoy.wasm.runtime.v8"
    path = plugin_path(plugin)
    if inline:
        vm.code.local.inline_bytes = Path(path).read_bytes()
    else:
        vm.code.local.filename = path
    if vm_configuration is not None:
        vm.configuration.Pack(wrappers_pb2.StringValue(value=vm_configuration))
    if configuration is not None:
        proto.configuration.Pack(wrappers_pb2.StringValue(value=configuration))
    if failure_policy:
        proto.failure_policy = wasm_pb2.FailurePolicy.Value(failure_policy)
    if env:
        vm.environment_variables.key_values.update(env)
    if host_env_keys:
        vm.environment_variables.host_env_keys.extend(host_env_keys)
    if reload_base_ms is not None:
        proto.reload_config.backoff.base_interval.FromMilliseconds(reload_base_ms)
    return proto


def http_wasm(config: wasm_pb2.PluginConfig) -> http_wasm_pb2.Wasm:
    return http_wasm_pb2.Wasm(config=config)


# -- one HTTP stream through the real FilterManager ------------------------------------------


class Downstream:
    """FilterManagerCallbacks recording what would reach the client."""

    def __init__(self) -> None:
        self.headers: HeaderMap | None = None
        self.body = bytearray()
        self.trailers: HeaderMap | None = None
        self.ended = False
        self.reset = False
        self.route_cache_cleared = 0

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.headers = headers

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        pass

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self.body += data

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self.trailers = trailers

    def end_stream(self) -> None:
        self.ended = True

    def reset_stream(self) -> None:
        self.reset = True

    def create_filter_chain(self) -> None:
        """The chain is installed when the Stream is made."""

    def route(self) -> object | None:
        return None

    def clear_route_cache(self) -> None:
        self.route_cache_cleared += 1

    def disarm_request_timeout(self) -> None:
        pass

    def on_request_data_too_large(self) -> None:
        pass

    def on_response_data_too_large(self) -> None:
        pass

    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None:
        pass

    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None:
        pass

    def on_encoder_filter_above_write_buffer_high_watermark(self) -> None:
        pass

    def on_encoder_filter_below_write_buffer_low_watermark(self) -> None:
        pass

    def add_downstream_watermark_callbacks(self, callbacks: Any) -> None:
        pass

    def remove_downstream_watermark_callbacks(self, callbacks: Any) -> None:
        pass

    @property
    def status(self) -> int | None:
        return int(self.headers.get(":status") or 0) if self.headers is not None else None


class Upstream(PassThroughFilter):
    """The terminal filter: records the request as the upstream would see it."""

    def __init__(self) -> None:
        self.headers: HeaderMap | None = None
        self.body = bytearray()
        self.trailers: HeaderMap | None = None
        self.complete = False

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        self.headers = headers
        self.complete = end_stream
        return FilterHeadersStatus.StopIteration

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.body += data
        data.clear()
        self.complete = end_stream
        return FilterDataStatus.StopIterationNoBuffer

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        self.trailers = trailers
        self.complete = True
        return FilterTrailersStatus.StopIteration


class Stream:
    """One stream: `factories` install filters, then an Upstream; drive both directions."""

    def __init__(self, factories: list[Callable[[Any], None]], dispatcher: Any = None) -> None:
        info = StreamInfo(connection=ConnectionInfo(id=1, local_address=Address("127.0.0.1", 10000),
                                                    remote_address=Address("127.0.0.1", 40000)))
        self.downstream = Downstream()
        self.manager = FilterManager(self.downstream, dispatcher, info, 1)  # type: ignore[arg-type]
        for factory in factories:
            factory(self.manager)
        self.upstream = Upstream()
        self.manager.add_stream_decoder_filter(self.upstream)

    @property
    def stream_info(self) -> StreamInfo:
        return self.manager.stream_info

    def request(self, headers: list[tuple[str, str]], body: list[bytes] | bytes = b"",
                trailers: list[tuple[str, str]] | None = None) -> None:
        chunks = [body] if isinstance(body, bytes) else body
        chunks = [c for c in chunks if c]
        base = [(":method", "POST" if chunks else "GET"), (":path", "/"), (":authority", "test"), (":scheme", "http")]
        self.manager.decode_headers(HeaderMap(base + headers), not chunks and trailers is None)
        for i, chunk in enumerate(chunks):
            if self.manager.destroyed or self.downstream.ended:
                return
            self.manager.decode_data(chunk, i == len(chunks) - 1 and trailers is None)
        if trailers is not None and not self.downstream.ended:
            self.manager.decode_trailers(HeaderMap(trailers))

    def respond(self, status: int = 200, headers: list[tuple[str, str]] | None = None, body: list[bytes] | bytes = b"",
                trailers: list[tuple[str, str]] | None = None) -> None:
        chunks = [body] if isinstance(body, bytes) else body
        chunks = [c for c in chunks if c]
        callbacks = self.upstream.decoder_callbacks
        callbacks.encode_headers(HeaderMap([(":status", str(status))] + (headers or [])),
                                 not chunks and trailers is None)
        for i, chunk in enumerate(chunks):
            if self.downstream.reset or self.manager.destroyed:
                return
            callbacks.encode_data(chunk, i == len(chunks) - 1 and trailers is None)
        if trailers is not None and not self.downstream.reset:
            callbacks.encode_trailers(HeaderMap(trailers))

    def finish(self) -> None:
        """End of stream: access log handlers, then every filter's on_destroy."""
        self.manager.log()
        self.manager.destroy_filters()
