"""WasmPlugin: one Proxy-Wasm plugin loaded as Envoy would, driven by plain method calls.

The plugin runs on the real host core and the real HTTP filter chain (FilterManager) with
no sockets: requests go in through `HttpStream`, what would reach the upstream and the
client is recorded, and the rest of the proxy is faked (`ManualDispatcher`: a clock the test
moves; `CalloutRecorder`: http_call / grpc_call answered by the test). Shared data and
queues are the process-wide ones the proxy uses, keyed by the plugin's vm_id.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from ..http.filter import FilterDataStatus, FilterHeadersStatus, FilterTrailersStatus, PassThroughFilter
from ..http.filter_manager import FilterManager
from ..http.headers import HeaderMap
from ..http.stream_info import Address, ConnectionInfo, StreamInfo
from ..log import LEVELS, get_logger
from ..stats.store import Store
from ..server_context import standalone_factory_context
from ..wasm.abi import WasmResult
from ..wasm.http_filter import WasmFilter
from ..wasm.plugin import PluginConfig
from ..wasm.shared_data import global_shared_data, global_shared_queue
from ..wasm.wasm import Wasm
from .config import Configuration, plugin_config
from .fakes import CalloutRecorder, GrpcCall, GrpcResponder, HttpCall, HttpResponder, ManualDispatcher, TestEnvironment

__all__ = ["Callback", "HttpStream", "LocalReply", "LogLine", "Request", "Response", "WasmPlugin"]

Headers = Union[Mapping[str, str], Iterable[tuple[str, str]]]

_REQUEST_DEFAULTS = ((":method", "GET"), (":path", "/"), (":authority", "example.com"), (":scheme", "http"))
_REQUEST_PSEUDO = frozenset(k for k, _ in _REQUEST_DEFAULTS)
_SPDLOG_NAMES = ("trace", "debug", "info", "warn", "error", "critical")


def _pairs(headers: Headers | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k).lower(), str(v)) for k, v in items]


# -- results ---------------------------------------------------------------------------------


@dataclass
class Request:
    """The request as the upstream got it (headers None: it never got there)."""

    headers: list[tuple[str, str]] | None = None
    body: bytes = b""
    trailers: list[tuple[str, str]] | None = None
    complete: bool = False

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers or () if k == name.lower()), None)


@dataclass
class Response:
    """What reached the client (headers None: nothing yet); `reset` if the stream was reset."""

    headers: list[tuple[str, str]] | None = None
    body: bytes = b""
    trailers: list[tuple[str, str]] | None = None
    complete: bool = False
    reset: bool = False

    @property
    def status(self) -> int | None:
        value = self.header(":status")
        return int(value) if value is not None else None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers or () if k == name.lower()), None)


@dataclass
class LocalReply:
    """proxy_send_local_response as the plugin called it."""

    status: int
    body: bytes
    headers: list[tuple[str, str]]
    grpc_status: int | None
    details: str


@dataclass
class Callback:
    """One filter callback into the plugin: its phase, the status it returned (Envoy's
    FilterHeadersStatus/FilterDataStatus/FilterTrailersStatus name) and the headers after it."""

    phase: str
    status: str
    headers: list[tuple[str, str]] | None = None


@dataclass
class LogLine:
    level: str  # trace debug info warn error critical
    message: str


# -- the stream ------------------------------------------------------------------------------


class _Client:
    """The FilterManager's downstream: records the response the client would get."""

    def __init__(self, response: Response) -> None:
        self.response = response

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.response.headers = list(headers.items())
        self.response.complete = end_stream

    def encode_1xx_headers(self, headers: HeaderMap) -> None:
        """1xx headers are not recorded."""

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        self.response.body += bytes(data)
        self.response.complete = end_stream

    def encode_trailers(self, trailers: HeaderMap) -> None:
        self.response.trailers = list(trailers.items())
        self.response.complete = True

    def end_stream(self) -> None:
        self.response.complete = True

    def reset_stream(self) -> None:
        self.response.reset = True

    def create_filter_chain(self) -> None:
        """The chain is installed when the HttpStream is made."""

    def route(self) -> object | None:
        return None

    def clear_route_cache(self) -> None:
        """No routes here."""

    def __getattr__(self, name: str) -> Any:
        # Watermark and timeout notifications: a client with infinite buffers ignores them.
        if name.startswith(("on_", "disarm_", "add_downstream_", "remove_downstream_")):
            return lambda *args: None
        raise AttributeError(name)


class _Upstream(PassThroughFilter):
    """The terminal filter: takes the request as the router would (and never answers itself)."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        self.request.headers = list(headers.items())
        self.request.complete = end_stream
        return FilterHeadersStatus.StopIteration

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.request.body += bytes(data)
        data.clear()
        self.request.complete = end_stream
        return FilterDataStatus.StopIterationNoBuffer

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        self.request.trailers = list(trailers.items())
        self.request.complete = True
        return FilterTrailersStatus.StopIteration


class _RecordingFilter(WasmFilter):
    """The Wasm HTTP filter, recording each callback's status and local replies."""

    __slots__ = ("stream",)

    def __init__(self, stream: "HttpStream") -> None:
        super().__init__()
        self.stream = stream

    def _record(self, phase: str, status: Any, headers: HeaderMap | None) -> Any:
        self.stream.callbacks.append(Callback(phase, status.name, list(headers.items()) if headers is not None else None))
        return status

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        return self._record("request_headers", super().decode_headers(headers, end_stream), headers)

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        return self._record("request_body", super().decode_data(data, end_stream), None)

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        return self._record("request_trailers", super().decode_trailers(trailers), trailers)

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        return self._record("response_headers", super().encode_headers(headers, end_stream), headers)

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        return self._record("response_body", super().encode_data(data, end_stream), None)

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        return self._record("response_trailers", super().encode_trailers(trailers), trailers)

    def send_local_response(self, code: int, body: bytes, headers: list[tuple[str, str]], grpc_status: int | None,
                            details: str) -> None:
        self.stream.local_reply = LocalReply(code, bytes(body), list(headers), grpc_status, details)
        super().send_local_response(code, body, headers, grpc_status, details)


class HttpStream:
    """One HTTP stream through the plugin: send each part of the request and the response.

    After every call the dispatcher's posted work has run, so `request` (what the upstream
    got), `response` (what the client got), `local_reply` and `callbacks` are up to date.
    """

    def __init__(self, plugin: "WasmPlugin", stream_id: int) -> None:
        self._plugin = plugin
        self.request = Request()
        self.response = Response()
        self.local_reply: LocalReply | None = None
        self.callbacks: list[Callback] = []
        self.finished = False
        info = StreamInfo(connection=ConnectionInfo(id=stream_id, local_address=Address("127.0.0.1", 10000),
                                                    remote_address=Address("127.0.0.1", 40000)))
        self._manager = FilterManager(_Client(self.response), None, info, stream_id)  # type: ignore[arg-type]
        #: False when the plugin's VM is dead under FAIL_OPEN: the stream runs without it.
        self.has_plugin = plugin._install(self, self._manager)
        self._upstream = _Upstream(self.request)
        self._manager.add_stream_decoder_filter(self._upstream)

    @property
    def stream_info(self) -> StreamInfo:
        return self._manager.stream_info

    def _done(self) -> None:
        self._plugin.dispatcher.run_posted()

    def _open(self) -> bool:
        return not (self._manager.destroyed or self.response.complete or self.response.reset)

    # -- request ------------------------------------------------------------------------------

    def send_request_headers(self, headers: Headers | None = None, end_stream: bool = False) -> "HttpStream":
        """Request headers; :method (GET), :path (/), :authority (example.com), :scheme (http)
        are added unless given."""
        pairs = _pairs(headers)
        given = dict(pairs)
        pseudo = [(k, given.get(k, default)) for k, default in _REQUEST_DEFAULTS]
        rest = [(k, v) for k, v in pairs if k not in _REQUEST_PSEUDO]
        self._manager.decode_headers(HeaderMap(pseudo + rest), end_stream)
        self._done()
        return self

    def send_request_body(self, data: bytes, end_stream: bool = False) -> "HttpStream":
        if self._open():
            self._manager.decode_data(bytes(data), end_stream)
            self._done()
        return self

    def send_request_trailers(self, trailers: Headers) -> "HttpStream":
        if self._open():
            self._manager.decode_trailers(HeaderMap(_pairs(trailers)))
            self._done()
        return self

    # -- response (as the upstream sends it) ---------------------------------------------------

    def _upstream_callbacks(self) -> Any:
        if self.request.headers is None:
            raise RuntimeError("the request has not reached the upstream (paused, or answered locally)")
        return self._upstream.decoder_callbacks

    def send_response_headers(self, status: int = 200, headers: Headers | None = None,
                              end_stream: bool = False) -> "HttpStream":
        callbacks = self._upstream_callbacks()
        if self._open():
            self.stream_info.response_code = status  # as the router does, before the encoder filters
            callbacks.encode_headers(HeaderMap([(":status", str(status))] + _pairs(headers)), end_stream)
            self._done()
        return self

    def send_response_body(self, data: bytes, end_stream: bool = False) -> "HttpStream":
        callbacks = self._upstream_callbacks()
        if self._open():
            callbacks.encode_data(bytes(data), end_stream)
            self._done()
        return self

    def send_response_trailers(self, trailers: Headers) -> "HttpStream":
        callbacks = self._upstream_callbacks()
        if self._open():
            callbacks.encode_trailers(HeaderMap(_pairs(trailers)))
            self._done()
        return self

    # -- whole messages -------------------------------------------------------------------------

    def send_request(self, headers: Headers | None = None, body: bytes | Iterable[bytes] = b"",
                     trailers: Headers | None = None) -> "HttpStream":
        """Headers, then each body chunk, then trailers; a body makes the default method POST."""
        chunks = [c for c in ([body] if isinstance(body, (bytes, bytearray)) else body) if c]
        pairs = _pairs(headers)
        if chunks and not any(k == ":method" for k, _ in pairs):
            pairs.insert(0, (":method", "POST"))
        self.send_request_headers(pairs, end_stream=not chunks and trailers is None)
        for i, chunk in enumerate(chunks):
            self.send_request_body(chunk, end_stream=i == len(chunks) - 1 and trailers is None)
        if trailers is not None:
            self.send_request_trailers(trailers)
        return self

    def send_response(self, status: int = 200, headers: Headers | None = None, body: bytes | Iterable[bytes] = b"",
                      trailers: Headers | None = None) -> "HttpStream":
        chunks = [c for c in ([body] if isinstance(body, (bytes, bytearray)) else body) if c]
        self.send_response_headers(status, headers, end_stream=not chunks and trailers is None)
        for i, chunk in enumerate(chunks):
            self.send_response_body(chunk, end_stream=i == len(chunks) - 1 and trailers is None)
        if trailers is not None:
            self.send_response_trailers(trailers)
        return self

    def reset(self) -> None:
        """The client went away: the stream is reset (the plugin sees done/delete on finish)."""
        self._manager.reset_stream()
        self._done()

    def finish(self) -> "HttpStream":
        """The end of the stream: the access-log phase (proxy_on_log), then proxy_on_done and
        proxy_on_delete. Idempotent."""
        if not self.finished:
            self.finished = True
            self._manager.log()
            self._manager.destroy_filters()
            self._done()
        return self

    # -- reading results ------------------------------------------------------------------------

    def statuses(self, phase: str | None = None) -> list[str]:
        """Statuses the plugin's callbacks returned, in order (optionally of one phase)."""
        return [c.status for c in self.callbacks if phase is None or c.phase == phase]


# -- the plugin ------------------------------------------------------------------------------


class _LogCapture(logging.Handler):
    """Collects the "wasm" logger's records: the plugin's proxy_log lines (and WASI
    stdout/stderr), and the host's own messages about it (traps, failed loads)."""

    def __init__(self) -> None:
        super().__init__(level=1)
        self.lines: list[LogLine] = []
        self.host_lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        level = _level_name(record.levelno)
        if record.msg == "wasm log%s: %s" and isinstance(record.args, tuple) and len(record.args) == 2:
            self.lines.append(LogLine(level, str(record.args[1])))
        else:
            self.host_lines.append(LogLine(level, record.getMessage()))


def _level_name(levelno: int) -> str:
    for name, py in zip(_SPDLOG_NAMES, (5, 10, 20, 30, 40, 50)):
        if levelno <= py:
            return name
    return "critical"


class WasmPlugin:
    """A plugin (.wasm path or bytes) configured as an envoy.extensions.wasm.v3.PluginConfig.

    Raises wasmproxy.config.errors.ConfigError when Envoy would reject the configuration (the
    module does not load, or on_vm_start / on_configure fail). ``log_level`` is the Envoy log
    level the plugin sees (the "wasm" logger's level while the plugin is open).
    """

    def __init__(
        self,
        wasm: str | Path | bytes,
        configuration: Configuration = None,
        *,
        vm_configuration: Configuration = None,
        name: str | None = None,
        root_id: str = "",
        vm_id: str = "",
        failure_policy: str = "FAIL_CLOSED",
        reload_backoff_ms: int | None = None,
        allow_on_headers_stop_iteration: bool | None = None,
        environment_variables: Mapping[str, str] | None = None,
        clusters: Iterable[str] | None = None,
        shared_data: Mapping[str | bytes, str | bytes] | None = None,
        log_level: str = "info",
    ) -> None:
        self.vm_id = vm_id
        self.dispatcher = ManualDispatcher()
        self.callouts = CalloutRecorder(self.dispatcher, tuple(clusters) if clusters is not None else None)
        self.stats = Store("main_thread")
        self._logs = _LogCapture()
        self._logger = get_logger("wasm")
        self._saved_level = self._logger.level
        self._logger.setLevel(LEVELS[log_level])
        self._logger.addHandler(self._logs)
        self._next_stream_id = 1
        self._environment = TestEnvironment(self.callouts)
        self.proto = plugin_config(wasm, configuration, vm_configuration=vm_configuration, name=name, root_id=root_id,
                                   vm_id=vm_id, failure_policy=failure_policy, reload_backoff_ms=reload_backoff_ms,
                                   allow_on_headers_stop_iteration=allow_on_headers_stop_iteration,
                                   environment_variables=environment_variables)
        for key, value in (shared_data or {}).items():
            self.set_shared_data(key, value)
        self._context = standalone_factory_context(self.dispatcher, self.callouts, self.stats)
        try:
            self.config: PluginConfig | None = PluginConfig(self.proto, self._context)  # type: ignore[arg-type]
        except Exception:
            self.close()
            raise
        self.dispatcher.run_posted()
        self._use_test_environment()

    def _use_test_environment(self) -> None:
        """grpc_call goes to the CalloutRecorder (the proxy's environment has no gRPC client)."""
        wasm = self.wasm
        if wasm is not None:
            wasm.environment = self._environment

    def _install(self, stream: HttpStream, manager: FilterManager) -> bool:
        """The per-stream filter factory (create_wasm_filter_factory's, with recording)."""
        if self.config is None:
            raise RuntimeError("the plugin is closed")
        wasm_filter = _RecordingFilter(stream)
        context = self.config.create_context(wasm_filter)
        self._use_test_environment()  # a FAIL_RELOAD may have made a new VM
        if context is None:
            return False
        wasm_filter.context = context
        manager.add_stream_filter(wasm_filter)
        manager.add_access_log_handler(wasm_filter)
        return True

    # -- streams ----------------------------------------------------------------------------------

    def stream(self) -> HttpStream:
        """A new HTTP stream through the plugin (nothing sent yet)."""
        stream_id = self._next_stream_id
        self._next_stream_id += 1
        return HttpStream(self, stream_id)

    def http_request(
        self,
        headers: Headers | None = None,
        body: bytes | Iterable[bytes] = b"",
        trailers: Headers | None = None,
        *,
        response: Response | None = None,
    ) -> HttpStream:
        """A whole exchange: send the request; if it reached the upstream complete, answer with
        `response` (default 200, no body); finish the stream once the client has its response.
        A paused stream is returned open: answer its callouts or `advance` time, then go on."""
        stream = self.stream().send_request(headers, body, trailers)
        if stream.request.complete and stream.response.headers is None and not stream.response.reset:
            answer = response or Response()
            stream.send_response(answer.status or 200, [kv for kv in answer.headers or () if kv[0] != ":status"],
                                 answer.body, answer.trailers)
        if stream.response.complete or stream.response.reset:
            stream.finish()
        return stream

    # -- time, callouts, queues ---------------------------------------------------------------------

    def advance(self, ms: float) -> int:
        """Move the fake clock `ms` forward, firing due timers (proxy_on_tick); how many fired."""
        return self.dispatcher.advance(ms)

    def on_http_call(self, responder: HttpResponder, cluster: str | None = None) -> None:
        """Answer http_calls (to `cluster`, or all) with an HttpResponse or a callable(HttpCall)."""
        self.callouts.on_http_call(responder, cluster)

    def on_grpc_call(self, responder: GrpcResponder, method: str | None = None) -> None:
        """Answer grpc_calls (``method`` or ``service/method``, or all) with a GrpcResponse or a callable."""
        self.callouts.on_grpc_call(responder, method)

    @property
    def http_calls(self) -> list[HttpCall]:
        return self.callouts.http_calls

    @property
    def grpc_calls(self) -> list[GrpcCall]:
        return self.callouts.grpc_calls

    def enqueue(self, queue: str, value: str | bytes, vm_id: str | None = None) -> None:
        """proxy_enqueue_shared_queue from outside: the owner's proxy_on_queue_ready runs now.
        KeyError when no plugin registered the queue (in `vm_id`, default this plugin's)."""
        name = queue.encode()
        token = global_shared_queue.resolve_queue(self.vm_id if vm_id is None else vm_id, name)
        if not token:
            raise KeyError(f"no shared queue {queue!r} registered in vm_id {self.vm_id if vm_id is None else vm_id!r}")
        global_shared_queue.enqueue(token, value.encode() if isinstance(value, str) else bytes(value))
        self.dispatcher.run_posted()

    def dequeue(self, queue: str, vm_id: str | None = None) -> bytes | None:
        """The next item of a shared queue, or None when it is empty. KeyError: no such queue."""
        token = global_shared_queue.resolve_queue(self.vm_id if vm_id is None else vm_id, queue.encode())
        if not token:
            raise KeyError(f"no shared queue {queue!r}")
        result, value = global_shared_queue.dequeue(token)
        return value if result == WasmResult.Ok else None

    # -- shared data, metrics, logs, state ------------------------------------------------------------

    def get_shared_data(self, key: str | bytes, vm_id: str | None = None) -> tuple[bytes, int] | None:
        """(value, cas) of a shared-data key in the plugin's vm_id (or `vm_id`), or None."""
        result, value, cas = global_shared_data.get(self.vm_id if vm_id is None else vm_id,
                                                    key.encode() if isinstance(key, str) else key)
        return (value, cas) if result == WasmResult.Ok else None

    def set_shared_data(self, key: str | bytes, value: str | bytes, vm_id: str | None = None) -> None:
        global_shared_data.set(self.vm_id if vm_id is None else vm_id, key.encode() if isinstance(key, str) else key,
                               value.encode() if isinstance(value, str) else value, 0)

    def metric(self, name: str) -> int | None:
        """A counter's or gauge's value by name ("wasmcustom." is optional), or None."""
        for full in (name, f"wasmcustom.{name}"):
            if full in self.stats.counters:
                return self.stats.counters[full].value
            if full in self.stats.gauges:
                return self.stats.gauges[full].value
        return None

    def metrics(self) -> dict[str, int]:
        """Every counter and gauge the plugin and its host defined, by full name."""
        values = {name: c.value for name, c in self.stats.counters.items()}
        values.update((name, g.value) for name, g in self.stats.gauges.items())
        return values

    @property
    def logs(self) -> list[LogLine]:
        return self._logs.lines

    @property
    def host_logs(self) -> list[LogLine]:
        """What the host logged about the plugin (Envoy's wording), e.g. a trap's
        "Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable"."""
        return self._logs.host_lines

    def log_messages(self, level: str | None = None) -> list[str]:
        return [line.message for line in self._logs.lines if level is None or line.level == level]

    @property
    def wasm(self) -> Wasm | None:
        """The VM the next stream would use (after any FAIL_RELOAD), or None."""
        return self.config.wasm() if self.config is not None else None

    @property
    def failed(self) -> bool:
        """The plugin's VM has failed (trapped): the failure policy now answers for it."""
        wasm = self.config.wasm() if self.config is not None else None
        return wasm is None or wasm.is_failed()

    def close(self) -> None:
        """Release the VMs (proxy_on_done/delete of the root contexts) and the log capture."""
        self.config = None
        self._context = None  # type: ignore[assignment]
        gc.collect()  # PluginConfig <-> slot cycles: free the VMs now, not at some later collection
        self.dispatcher.run_posted()
        self._logger.removeHandler(self._logs)
        self._logger.setLevel(self._saved_level)

    def __enter__(self) -> "WasmPlugin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
