"""VM, root and stream contexts: the host side of one Proxy-Wasm context, and the calls into it.

cpp-host ContextBase (include/proxy-wasm/context.h, src/context.cc) merged with Envoy's
Context (source/extensions/common/wasm/context.cc), which is where the observable behaviour
lives (header maps, buffers, metrics, status translation). Three kinds, as in cpp-host:

* the VM context (id 0): one per Wasm, for code that runs outside any plugin (``_start``);
* a root context: one per plugin per Wasm (``Wasm.start(plugin)``), host-allocated id;
* a stream context: one per HTTP stream or TCP connection, parented to a root context.

Everything is driven by plain calls (sans-IO). A stream context talks to the proxy only
through a `StreamEnvironment` (continue/close the stream, local replies, StreamInfo); a Wasm
talks to the outside through a `WasmEnvironment` (HTTP/gRPC callouts, DNS). The stream side's
defaults do nothing (the plugin sees Ok, as Envoy answers when a callback is absent); the
callout side's defaults answer ``Unimplemented``.

Re-entrancy (Envoy's rule): actions that would re-enter the filter chain (continue, close,
local reply) are never done inside a host call; they are queued with
`Wasm.add_after_vm_call_action` and run when the outermost call into the plugin returns.

Threading: a context, its Wasm and its environment live on one thread.

How the HTTP bridge drives a stream (Envoy's Context as a filter)::

    ctx = wasm.create_stream_context(plugin, env)      # env: a StreamEnvironment subclass
    ctx.decode_headers(headers, end_stream) -> http.filter.FilterHeadersStatus
    ctx.decode_data(data: bytearray, end_stream)        # the whole buffer after StopIterationAndBuffer
    ctx.decode_trailers(trailers) / encode_headers / encode_data / encode_trailers
    ctx.log(request_headers, response_headers, response_trailers, stream_info)   # access-log phase
    ctx.on_destroy()                                    # proxy_on_done + proxy_on_delete

TCP: on_new_connection(), on_data(buf, eos), on_write(buf, eos), downstream_connection_closed(t).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from ..http.filter import FilterDataStatus as HttpDataStatus
from ..http.filter import FilterHeadersStatus as HttpHeadersStatus
from ..http.filter import FilterTrailersStatus as HttpTrailersStatus
from ..http.headers import HeaderMap
from ..log import get_logger
from . import properties
from .abi import (
    GRPC_STATUS_MAXIMUM_KNOWN,
    AbiVersion,
    CloseType,
    FailState,
    FilterDataStatus,
    FilterHeadersStatus,
    FilterStatus,
    FilterTrailersStatus,
    LogLevel,
    MetricType,
    WasmBufferType,
    WasmHeaderMapType,
    WasmResult,
    WasmStreamType,
)
from .runtime import WasmTrap
from .shared_data import global_shared_data, global_shared_queue

if TYPE_CHECKING:
    from ..http.stream_info import StreamInfo
    from .wasm import Wasm

__all__ = [
    "Buffer",
    "ContextBase",
    "FailurePolicy",
    "Plugin",
    "StreamEnvironment",
    "WasmEnvironment",
]

_log = get_logger("wasm")

Pairs = list[tuple[bytes, bytes]]

# Envoy's response code details for host-initiated stream endings.
FAIL_STREAM_RESPONSE_DETAILS = "wasm_fail_stream"
CLOSE_STREAM_RESPONSE_DETAILS = "wasm_close_stream"


class FailurePolicy(enum.IntEnum):
    """envoy.extensions.wasm.v3.FailurePolicy (UNSPECIFIED means FAIL_CLOSED)."""

    UNSPECIFIED = 0
    FAIL_RELOAD = 1
    FAIL_CLOSED = 2
    FAIL_OPEN = 3


@dataclass
class Plugin:
    """One configured plugin (cpp-host PluginBase + Envoy Plugin): what a root context runs."""

    name: str = ""
    root_id: str = ""
    vm_id: str = ""
    plugin_configuration: bytes = b""
    # The VM's configuration (vm_config.configuration): the Wasm that runs this plugin is
    # created with it; plugins sharing a VM must agree on it (it is part of the vm_key).
    vm_configuration: bytes = b""
    failure_policy: FailurePolicy = FailurePolicy.UNSPECIFIED
    allow_on_headers_stop_iteration: bool = False
    # Extra bytes that distinguish plugins with equal root_id and configuration (cpp-host "key").
    key_extra: bytes = b""
    key: str = field(init=False)
    log_prefix: str = field(init=False)

    def __post_init__(self) -> None:
        h = hashlib.sha256()
        for part in (self.root_id.encode(), b"||", self.plugin_configuration, b"||", self.key_extra):
            h.update(part)
        self.key = h.hexdigest().upper()
        self.log_prefix = "".join(f" {p}" for p in (self.name, self.root_id, self.vm_id) if p)

    @property
    def fail_open(self) -> bool:
        return self.failure_policy == FailurePolicy.FAIL_OPEN


class StreamEnvironment:
    """What a stream context asks of the proxy (cpp-host HttpInterface/NetworkInterface).

    The HTTP bridge (wasm/http_filter.py) subclasses this. Every default does nothing, which
    the plugin sees as Envoy does when the callback is absent. The context defers the calls
    that re-enter the filter chain, so implementations may act at once.
    """

    #: The stream's StreamInfo (request/response/connection properties, set_property).
    stream_info: "StreamInfo | None" = None

    def continue_stream(self, stream_type: WasmStreamType) -> None:
        """Resume a stopped direction (continueDecoding / continueEncoding / continueReading)."""

    def close_stream(self, stream_type: WasmStreamType) -> None:
        """Reset the HTTP stream, or close the downstream/upstream connection."""

    def send_local_response(
        self, code: int, body: bytes, headers: list[tuple[str, str]], grpc_status: int | None, details: str
    ) -> None:
        """Envoy sendLocalReply (headers are added to the reply; details already sanitized)."""

    def clear_route_cache(self) -> None:
        """Forget the selected route (header changes may select another)."""

    def add_trailers(self, map_type: WasmHeaderMapType) -> HeaderMap | None:
        """addDecodedTrailers/addEncodedTrailers, for a body callback at end of stream; or None."""
        return None


class WasmEnvironment:
    """What a Wasm asks of the proxy on its thread: callouts, DNS, node info.

    Defaults answer Unimplemented. Results go back, later and on this Wasm's thread, to the
    root context passed in: ``on_http_call_success(token, headers, body, trailers)`` /
    ``on_http_call_failure(token)``, ``on_grpc_receive_initial_metadata(token, map)``,
    ``on_grpc_receive(token, bytes)``, ``on_grpc_receive_trailing_metadata(token, map)``,
    ``on_grpc_close(token, status, message)``, ``on_resolve_dns(token, [(address, ttl)] | None)``.
    """

    #: envoy.config.core.v3.Node (or None) for the xds.node property.
    node: object | None = None

    def http_call(
        self, context: "ContextBase", token: int, cluster: str, headers: HeaderMap, body: bytes,
        trailers: HeaderMap | None, timeout_ms: int | None,
    ) -> WasmResult:
        """Start an async HTTP request; BadArgument for an unknown cluster."""
        return WasmResult.Unimplemented

    def grpc_call(
        self, context: "ContextBase", token: int, service: bytes, service_name: str, method_name: str,
        initial_metadata: HeaderMap, request: bytes, timeout_ms: int,
    ) -> WasmResult:
        return WasmResult.Unimplemented

    def grpc_stream(
        self, context: "ContextBase", token: int, service: bytes, service_name: str, method_name: str,
        initial_metadata: HeaderMap,
    ) -> WasmResult:
        return WasmResult.Unimplemented

    def grpc_send(self, token: int, message: bytes, end_stream: bool) -> None:
        """Send on an open stream."""

    def grpc_close(self, token: int) -> None:
        """Half-close a stream / cancel a call."""

    def grpc_cancel(self, token: int) -> None:
        """Reset a stream / cancel a call."""

    def resolve_dns(self, context: "ContextBase", token: int, address: str) -> WasmResult:
        return WasmResult.Unimplemented


class Buffer:
    """A buffer the plugin reads with get_buffer_bytes and writes with set_buffer_bytes.

    Mutable when backed by a bytearray (Envoy's Buffer::Instance rules for writes), otherwise
    read-only: writes answer BadArgument, as cpp-host BufferBase::copyFrom.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | None = None) -> None:
        self.data = b"" if data is None else data

    def size(self) -> int:
        return len(self.data)

    def copy_from(self, start: int, length: int, value: bytes | memoryview) -> WasmResult:
        return copy_into(self.data, start, length, value)


def copy_into(data: bytes | bytearray, start: int, length: int, value: bytes | memoryview) -> WasmResult:
    """`Buffer(data).copy_from(start, length, value)`: `value` is copied, never kept."""
    if not isinstance(data, bytearray):
        return WasmResult.BadArgument
    if start == 0:
        # Envoy's Buffer::copyFrom: drain `length` bytes from the front, then prepend (so
        # 0/0 prepends, 0/size replaces all, 0/n replaces the first n bytes).
        data[:length] = value
        return WasmResult.Ok
    if start >= len(data):
        data += value  # append
        return WasmResult.Ok
    return WasmResult.BadArgument


_EMPTY_BUFFER = Buffer()
# The per-chunk buffer types get_buffer_data looks at first (ints: no enum lookup per call).
_HTTP_REQUEST_BODY = int(WasmBufferType.HttpRequestBody)
_HTTP_RESPONSE_BODY = int(WasmBufferType.HttpResponseBody)
_NETWORK_DOWNSTREAM_DATA = int(WasmBufferType.NetworkDownstreamData)
_NETWORK_UPSTREAM_DATA = int(WasmBufferType.NetworkUpstreamData)
_HTTP_CALL_RESPONSE_BODY = int(WasmBufferType.HttpCallResponseBody)


def _pairs_to_header_map(pairs: Iterable[tuple[bytes, bytes]]) -> HeaderMap:
    # A list, not a generator (a call per pair); HeaderMap lower-cases the keys.
    return HeaderMap([(k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs])


class ContextBase:
    """One Proxy-Wasm context: the VM context, a root context or a stream context.

    The Wasm creates its VM context and the root contexts (`Wasm.start`); stream contexts
    come from `Wasm.create_stream_context`, or `stream_context(None, ...)` for a plugin whose
    VM could not be created (it then only applies the failure policy).
    """

    # Immutable initial values live on the class (an instance sets its own when one changes):
    # a stream context is created per request, and most of these never change on it.
    # Set only while a root context runs on_configure/validate: the plugin being configured.
    temp_plugin: Plugin | None = None
    in_vm_context_created = False
    destroyed = False
    stream_failed = False
    failure_local_reply_sent = False
    env: StreamEnvironment | None = None
    # Stream state the host calls read (Envoy Context members), set around each callback.
    end_of_stream = False
    request_headers: HeaderMap | None = None
    request_trailers: HeaderMap | None = None
    response_headers: HeaderMap | None = None
    response_trailers: HeaderMap | None = None
    request_body_buffer: bytearray | None = None
    response_body_buffer: bytearray | None = None
    downstream_data_buffer: bytearray | None = None
    upstream_data_buffer: bytearray | None = None
    buffering_request_body = False
    buffering_response_body = False
    # Access-log phase: maps handed to on_log only (Envoy's access_log_* members).
    access_log_phase = False
    access_log_request_headers: HeaderMap | None = None
    access_log_response_headers: HeaderMap | None = None
    access_log_response_trailers: HeaderMap | None = None
    access_log_stream_info: "StreamInfo | None" = None
    downstream_closed = False
    upstream_closed = False
    tcp_connection_closed = False
    # Root-context state for callouts (only used on root contexts).
    call_data = _EMPTY_BUFFER  # CallData: foreign-function args, DNS results
    status_code = 0
    status_message = b""
    http_call_response: tuple[HeaderMap | None, bytes, HeaderMap | None] | None = None
    grpc_receive_initial_metadata: HeaderMap | None = None
    grpc_receive_trailing_metadata: HeaderMap | None = None
    grpc_receive_buffer: bytes | None = None

    def __init__(
        self,
        wasm: "Wasm | None",
        context_id: int,
        parent: "ContextBase | None",
        plugin: Plugin | None,
        *,
        root_id: str = "",
    ) -> None:
        self.wasm = wasm
        self.id = context_id
        # The VM and root contexts are their own parents (cpp-host).
        self.parent_context: ContextBase = parent if parent is not None else self
        self.parent_context_id = self.parent_context.id
        self.plugin = plugin
        self.root_id = root_id
        self.allow_on_headers_stop_iteration = bool(plugin and plugin.allow_on_headers_stop_iteration)
        # declare_property: name -> prototype (set_property consults the root context's).
        self.state_prototypes: dict[str, properties.CelStatePrototype] = {}
        self.http_requests: set[int] = set()
        self.grpc_calls: set[int] = set()
        self.grpc_streams: dict[int, list[bool]] = {}  # token -> [local_closed, remote_closed]
        # Counted in the Wasm's contexts_active gauge until released (stream end or VM close).
        self.released = wasm is None
        if wasm is not None:
            wasm.add_context(self)
            wasm.open_contexts.n += 1  # Wasm.context_opened, inlined

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def stream_context(
        cls, wasm: "Wasm | None", root_context_id: int, plugin: Plugin, env: StreamEnvironment | None = None
    ) -> "ContextBase":
        """A new stream context under the root context `root_context_id` (wasm None: a failed VM)."""
        if wasm is None:
            ctx = cls(None, 0, None, plugin)
        else:
            contexts = wasm.contexts
            ref = contexts.get(root_context_id)  # Wasm.get_context, inlined
            # Wasm.alloc_context_id, inlined for the common case: the next id is free.
            context_id = wasm._next_context_id
            if context_id and context_id not in contexts:
                wasm._next_context_id = (context_id + 1) & 0xFFFFFFFF
            else:
                context_id = wasm.alloc_context_id()
            ctx = cls(wasm, context_id, ref() if ref is not None else None, plugin)
            ctx.parent_context_id = root_context_id
        ctx.env = env
        return ctx

    # -- identity --------------------------------------------------------------------------

    def is_root_context(self) -> bool:
        return self.parent_context is self

    def root_context(self) -> "ContextBase":
        ctx = self
        while ctx.parent_context is not ctx:
            ctx = ctx.parent_context
        return ctx

    @property
    def root_log_prefix(self) -> str:
        return "".join(f" {p}" for p in (self.root_id, self.wasm.vm_id if self.wasm else "") if p)

    def log_prefix(self) -> str:
        if self.is_root_context():
            return self.root_log_prefix
        return self.plugin.log_prefix if self.plugin else ""

    def is_failed(self) -> bool:
        wasm = self.wasm
        return wasm is None or wasm.failed

    # -- calls into the plugin -------------------------------------------------------------

    def _call(self, name: str, *args: int) -> int | None:
        """Call export `name` with this context current, then run the deferred actions.

        None if the plugin does not export it (nothing runs then, as in cpp-host).
        """
        wasm = self.wasm
        assert wasm is not None
        fn = wasm.module_functions.get(name)
        if fn is None:
            return None
        # Wasm.call (cpp-host SaveRestoreContext), inlined: every callback takes this path.
        saved_context, saved_effective = wasm.current_context, wasm.effective_context_id
        wasm.current_context = self
        wasm.effective_context_id = 0
        try:
            return fn(*args)
        except WasmTrap as e:
            wasm.fail(FailState.RuntimeError, f"Function: {name} failed: {e}")
            return 0
        finally:
            wasm.current_context = saved_context
            wasm.effective_context_id = saved_effective
            wasm.stop_iteration = False  # stop_next_iteration(False)
            if wasm.after_vm_call_actions:
                wasm.do_after_vm_call_actions()

    def on_start(self, plugin: Plugin) -> bool:
        """Root context: proxy_on_context_create(id, 0) then proxy_on_vm_start(id, vm_config_size)."""
        wasm = self.wasm
        assert wasm is not None
        if "proxy_on_context_create" in wasm.module_functions:
            self.temp_plugin = plugin
            try:
                self._call("proxy_on_context_create", self.id, 0)
            finally:
                self.temp_plugin = None
            self.in_vm_context_created = True
        result = self._call("proxy_on_vm_start", self.id, len(wasm.vm_configuration))
        return result is None or result != 0

    def on_configure(self, plugin: Plugin) -> bool:
        if self.is_failed():
            return True
        wasm = self.wasm
        assert wasm is not None
        if not self.in_vm_context_created and "proxy_on_context_create" in wasm.module_functions:
            self._call("proxy_on_context_create", self.id, 0)
        self.in_vm_context_created = True
        self.temp_plugin = plugin
        try:
            result = self._call("proxy_on_configure", self.id, len(plugin.plugin_configuration))
        finally:
            self.temp_plugin = None
        return result is None or result != 0

    def on_create(self) -> None:
        """Stream context: proxy_on_context_create(id, root_id), once."""
        wasm = self.wasm  # not is_failed(), not created yet (inline: once per stream)
        if wasm is not None and not wasm.failed and not self.in_vm_context_created:
            self._call("proxy_on_context_create", self.id, self.parent_context.id)
        self.in_vm_context_created = True

    def on_tick(self) -> None:
        if not self.is_failed():
            self._call("proxy_on_tick", self.id)

    def on_queue_ready(self, token: int) -> None:
        if not self.is_failed():
            self._call("proxy_on_queue_ready", self.id, token)

    def on_foreign_function(self, function_id: int, arguments: bytes) -> None:
        """proxy_on_foreign_function(root, id, size); the arguments are the CallData buffer."""
        if self.is_failed():
            return
        self.call_data = Buffer(arguments)
        try:
            self._call("proxy_on_foreign_function", self.id, function_id, len(arguments))
        finally:
            self.call_data = _EMPTY_BUFFER

    def on_done(self) -> bool:
        wasm = self.wasm
        if wasm is not None and not wasm.failed:  # not is_failed()
            result = self._call("proxy_on_done", self.id)
            return result is None or result != 0
        return True

    def on_log(self) -> None:
        wasm = self.wasm
        if wasm is not None and not wasm.failed:  # not is_failed()
            self._call("proxy_on_log", self.id)

    def on_delete(self) -> None:
        wasm = self.wasm
        if self.in_vm_context_created and wasm is not None and not wasm.failed:  # not is_failed()
            self._call("proxy_on_delete", self.id)
        if wasm is not None and self.id != 0:
            ref = wasm.contexts.get(self.id)
            if ref is not None and ref() is self:
                del wasm.contexts[self.id]

    # HTTP callbacks (cpp-host ContextBase::on*): each returns the host-side status.

    def _check_fail(self, first: WasmStreamType, second: WasmStreamType) -> bool | None:
        """CHECK_FAIL: None if the VM is healthy, else True for fail-open, False for fail-closed."""
        wasm = self.wasm
        if wasm is not None and not wasm.failed:
            return None
        if self.plugin is not None and self.plugin.fail_open:
            return True
        if not self.stream_failed:
            self.fail_stream(first)
            self.fail_stream(second)
            self.stream_failed = True
        return False

    # The guest's status (a u32, already range-checked) -> the host status: tuple lookups,
    # not Enum calls, on the per-callback path.

    def _headers_status(self, result: int) -> FilterHeadersStatus:
        wasm = self.wasm
        assert wasm is not None
        if wasm.stop_iteration or result > FilterHeadersStatus.StopAllIterationAndWatermark:
            return FilterHeadersStatus.StopAllIterationAndWatermark
        if result == FilterHeadersStatus.StopIteration and not self.allow_on_headers_stop_iteration:
            # cpp-host issue 143: StopIteration would still let the body through.
            return FilterHeadersStatus.StopAllIterationAndWatermark
        return _HEADERS_STATUSES[result]

    def _data_status(self, result: int) -> FilterDataStatus:
        assert self.wasm is not None
        if self.wasm.stop_iteration or result > FilterDataStatus.StopIterationNoBuffer:
            return FilterDataStatus.StopIterationNoBuffer
        return _DATA_STATUSES[result]

    def _trailers_status(self, result: int) -> FilterTrailersStatus:
        assert self.wasm is not None
        if self.wasm.stop_iteration or result > FilterTrailersStatus.StopIteration:
            return FilterTrailersStatus.StopIteration
        return _TRAILERS_STATUSES[result]

    def _http_call_status(self, name: str, args: tuple[int, ...], convert: Callable[[int], enum.IntEnum],
                          open_status: enum.IntEnum, closed_status: enum.IntEnum,
                          first: WasmStreamType = WasmStreamType.Request,
                          second: WasmStreamType = WasmStreamType.Response) -> enum.IntEnum:
        """Shared body of on_request_*/on_response_* (and of the TCP callbacks, with their
        stream types): fail checks, call, translate the status."""
        wasm = self.wasm
        if wasm is None or wasm.failed:
            fail = self._check_fail(first, second)
            return open_status if fail else closed_status
        fn = wasm.module_functions.get(name)
        if fn is None:
            return open_status
        # Wasm.call (cpp-host SaveRestoreContext), inlined: every callback takes this path.
        saved_context, saved_effective = wasm.current_context, wasm.effective_context_id
        wasm.current_context = self
        wasm.effective_context_id = 0
        try:
            try:
                result = fn(*args) or 0
            except WasmTrap as e:
                wasm.fail(FailState.RuntimeError, f"Function: {name} failed: {e}")
                result = 0
            finally:
                wasm.current_context = saved_context
                wasm.effective_context_id = saved_effective
            if wasm.failed:  # the callback trapped: CHECK_FAIL again
                fail = self._check_fail(first, second)
                return open_status if fail else closed_status
            if not result and not wasm.stop_iteration:
                return open_status  # what every convert answers for Continue (0): no call
            return convert(result)
        finally:
            wasm.stop_iteration = False  # stop_next_iteration(False)
            if wasm.after_vm_call_actions:
                wasm.do_after_vm_call_actions()

    def _headers_args(self, headers: int, end_of_stream: bool) -> tuple[int, ...]:
        wasm = self.wasm
        if wasm is not None and wasm.abi_version is AbiVersion.ProxyWasm_0_1_0:
            return (self.id, headers)  # 0.1.0: no end-of-stream flag
        return (self.id, headers, int(end_of_stream))

    def on_request_headers(self, headers: int, end_of_stream: bool) -> FilterHeadersStatus:
        return self._http_call_status(  # type: ignore[return-value]
            "proxy_on_request_headers", self._headers_args(headers, end_of_stream), self._headers_status,
            FilterHeadersStatus.Continue, FilterHeadersStatus.StopAllIterationAndWatermark)

    def on_request_body(self, body_length: int, end_of_stream: bool) -> FilterDataStatus:
        return self._http_call_status(  # type: ignore[return-value]
            "proxy_on_request_body", (self.id, body_length, int(end_of_stream)), self._data_status,
            FilterDataStatus.Continue, FilterDataStatus.StopIterationNoBuffer)

    def on_request_trailers(self, trailers: int) -> FilterTrailersStatus:
        return self._http_call_status(  # type: ignore[return-value]
            "proxy_on_request_trailers", (self.id, trailers), self._trailers_status,
            FilterTrailersStatus.Continue, FilterTrailersStatus.StopIteration)

    def on_request_metadata(self, elements: int) -> int:
        self._http_call_status("proxy_on_request_metadata", (self.id, elements), lambda r: FilterStatus.Continue,
                               FilterStatus.Continue, FilterStatus.Continue)
        return 0

    def on_response_headers(self, headers: int, end_of_stream: bool) -> FilterHeadersStatus:
        return self._http_call_status(  # type: ignore[return-value]
            "proxy_on_response_headers", self._headers_args(headers, end_of_stream), self._headers_status,
            FilterHeadersStatus.Continue, FilterHeadersStatus.StopAllIterationAndWatermark)

    def on_response_body(self, body_length: int, end_of_stream: bool) -> FilterDataStatus:
        return self._http_call_status(  # type: ignore[return-value]
            "proxy_on_response_body", (self.id, body_length, int(end_of_stream)), self._data_status,
            FilterDataStatus.Continue, FilterDataStatus.StopIterationNoBuffer)

    def on_response_trailers(self, trailers: int) -> FilterTrailersStatus:
        return self._http_call_status(  # type: ignore[return-value]
            "proxy_on_response_trailers", (self.id, trailers), self._trailers_status,
            FilterTrailersStatus.Continue, FilterTrailersStatus.StopIteration)

    def on_response_metadata(self, elements: int) -> int:
        self._http_call_status("proxy_on_response_metadata", (self.id, elements), lambda r: FilterStatus.Continue,
                               FilterStatus.Continue, FilterStatus.Continue)
        return 0

    # TCP callbacks.

    def _net_call(self, name: str, *args: int) -> FilterStatus:
        return self._http_call_status(  # type: ignore[return-value]
            name, args, _net_status, FilterStatus.Continue, FilterStatus.StopIteration,
            WasmStreamType.Downstream, WasmStreamType.Upstream)

    def on_network_new_connection(self) -> FilterStatus:
        return self._net_call("proxy_on_new_connection", self.id)

    def on_downstream_data(self, data_length: int, end_of_stream: bool) -> FilterStatus:
        return self._net_call("proxy_on_downstream_data", self.id, data_length, int(end_of_stream))

    def on_upstream_data(self, data_length: int, end_of_stream: bool) -> FilterStatus:
        return self._net_call("proxy_on_upstream_data", self.id, data_length, int(end_of_stream))

    def on_downstream_connection_close(self, close_type: CloseType) -> None:
        if not self.is_failed():
            self._call("proxy_on_downstream_connection_close", self.id, int(close_type))

    def on_upstream_connection_close(self, close_type: CloseType) -> None:
        if not self.is_failed():
            self._call("proxy_on_upstream_connection_close", self.id, int(close_type))

    # Callout results (root contexts).

    def on_http_call_response(self, token: int, headers: int, body_size: int, trailers: int) -> None:
        if not self.is_failed():
            self._call("proxy_on_http_call_response", self.id, token, headers, body_size, trailers)

    def on_grpc_receive_initial_metadata_raw(self, token: int, elements: int) -> None:
        if not self.is_failed():
            self._call("proxy_on_grpc_receive_initial_metadata", self.id, token, elements)

    def on_grpc_receive_trailing_metadata_raw(self, token: int, elements: int) -> None:
        if not self.is_failed():
            self._call("proxy_on_grpc_receive_trailing_metadata", self.id, token, elements)

    def on_grpc_receive_raw(self, token: int, response_size: int) -> None:
        if not self.is_failed():
            self._call("proxy_on_grpc_receive", self.id, token, response_size)

    def on_grpc_close_raw(self, token: int, status_code: int) -> None:
        if not self.is_failed():
            self._call("proxy_on_grpc_close", self.id, token, status_code)

    # -- Envoy's filter glue (Context::decodeHeaders & co.), driven by the HTTP bridge -----

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> HttpHeadersStatus:
        if not self.in_vm_context_created:
            self.on_create()
        self.request_headers = headers
        self.end_of_stream = end_stream
        result = _HTTP_HEADERS_STATUS[self.on_request_headers(len(headers), end_stream)]
        if result == HttpHeadersStatus.Continue:
            self.request_headers = None
        return result

    def decode_data(self, data: bytearray, end_stream: bool) -> HttpDataStatus:
        """`data` is the chunk, or the whole buffered body after StopIterationAndBuffer."""
        if not self.in_vm_context_created:
            return HttpDataStatus.Continue
        self.request_body_buffer = data
        self.end_of_stream = end_stream
        result = _HTTP_DATA_STATUS[self.on_request_body(len(data), end_stream)]
        self.buffering_request_body = result == HttpDataStatus.StopIterationAndBuffer
        if result == HttpDataStatus.Continue:
            self.request_body_buffer = None
        return result

    def decode_trailers(self, trailers: HeaderMap) -> HttpTrailersStatus:
        if not self.in_vm_context_created:
            return HttpTrailersStatus.Continue
        self.request_trailers = trailers
        result = _HTTP_TRAILERS_STATUS[self.on_request_trailers(len(trailers))]
        if result == HttpTrailersStatus.Continue:
            self.request_trailers = None
        return result

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> HttpHeadersStatus:
        if not self.in_vm_context_created or self.failure_local_reply_sent:
            return HttpHeadersStatus.Continue
        self.response_headers = headers
        self.end_of_stream = end_stream
        result = _HTTP_HEADERS_STATUS[self.on_response_headers(len(headers), end_stream)]
        if result == HttpHeadersStatus.Continue:
            self.response_headers = None
        return result

    def encode_data(self, data: bytearray, end_stream: bool) -> HttpDataStatus:
        if not self.in_vm_context_created or self.failure_local_reply_sent:
            return HttpDataStatus.Continue
        self.response_body_buffer = data
        self.end_of_stream = end_stream
        result = _HTTP_DATA_STATUS[self.on_response_body(len(data), end_stream)]
        self.buffering_response_body = result == HttpDataStatus.StopIterationAndBuffer
        if result == HttpDataStatus.Continue:
            self.response_body_buffer = None
        return result

    def encode_trailers(self, trailers: HeaderMap) -> HttpTrailersStatus:
        if not self.in_vm_context_created or self.failure_local_reply_sent:
            return HttpTrailersStatus.Continue
        self.response_trailers = trailers
        result = _HTTP_TRAILERS_STATUS[self.on_response_trailers(len(trailers))]
        if result == HttpTrailersStatus.Continue:
            self.response_trailers = None
        return result

    def log(
        self,
        request_headers: HeaderMap | None,
        response_headers: HeaderMap | None,
        response_trailers: HeaderMap | None,
        stream_info: "StreamInfo",
    ) -> None:
        """Access-log phase: proxy_on_log with the final maps (Envoy Context::log)."""
        if not self.in_vm_context_created:
            self.on_create()  # a stream that never reached the plugin (e.g. a local reply)
        self.access_log_phase = True
        self.access_log_request_headers = request_headers
        self.access_log_response_headers = response_headers
        self.access_log_response_trailers = response_trailers
        self.access_log_stream_info = stream_info
        try:
            wasm = self.wasm
            if wasm is not None and not wasm.failed:  # on_log(), inline
                self._call("proxy_on_log", self.id)
        finally:
            self.access_log_phase = False
            self.access_log_request_headers = None
            self.access_log_response_headers = None
            self.access_log_response_trailers = None
            self.access_log_stream_info = None

    def release(self) -> None:
        """The stream this context served has ended: count it out of contexts_active (once)."""
        if not self.released:
            self.released = True
            wasm = self.wasm
            if wasm is not None:
                wasm.open_contexts.n -= 1  # Wasm.context_closed, inlined

    def on_destroy(self) -> None:
        """The stream is gone: proxy_on_done then proxy_on_delete (once)."""
        if not self.released:  # release(), inlined
            self.released = True
            wasm = self.wasm
            if wasm is not None:
                wasm.open_contexts.n -= 1
        if self.destroyed or not self.in_vm_context_created:
            return
        self.destroyed = True
        wasm = self.wasm
        if wasm is None:
            return
        # on_done() then on_delete(), inline (once per stream): a trap in proxy_on_done fails
        # the VM, and then proxy_on_delete is not called.
        context_id = self.id
        if not wasm.failed:
            self._call("proxy_on_done", context_id)
            if not wasm.failed:
                self._call("proxy_on_delete", context_id)
        if context_id != 0:
            ref = wasm.contexts.get(context_id)
            if ref is not None and ref() is self:
                del wasm.contexts[context_id]

    # TCP glue (Envoy Context::onNewConnection / onData / onWrite / onEvent).

    def on_new_connection(self) -> FilterStatus:
        self.on_create()
        return self.on_network_new_connection()

    def on_data(self, data: bytearray, end_stream: bool) -> FilterStatus:
        if not self.in_vm_context_created:
            return FilterStatus.Continue
        self.downstream_data_buffer = data
        self.end_of_stream = end_stream
        result = self.on_downstream_data(len(data), end_stream)
        if result == FilterStatus.Continue:
            self.downstream_data_buffer = None
        return result

    def on_write(self, data: bytearray, end_stream: bool) -> FilterStatus:
        if not self.in_vm_context_created:
            return FilterStatus.Continue
        self.upstream_data_buffer = data
        self.end_of_stream = end_stream
        result = self.on_upstream_data(len(data), end_stream)
        if result == FilterStatus.Continue:
            self.upstream_data_buffer = None
        if end_stream:
            # Envoy reports the upstream close here rather than on an upstream connection event.
            self.upstream_connection_closed(CloseType.Unknown)
        return result

    def downstream_connection_closed(self, close_type: CloseType) -> None:
        self.release()  # the network filter lets go of its context here, whatever follows
        if not self.in_vm_context_created:
            return
        self.on_downstream_connection_close(close_type)
        self.downstream_closed = True
        self._on_close_tcp()

    def upstream_connection_closed(self, close_type: CloseType) -> None:
        self.on_upstream_connection_close(close_type)
        self.upstream_closed = True
        if self.downstream_closed:
            self._on_close_tcp()

    def _on_close_tcp(self) -> None:
        self.release()
        if self.tcp_connection_closed or not self.in_vm_context_created:
            return
        self.tcp_connection_closed = True
        self.on_done()
        self.on_log()
        self.on_delete()

    # -- host calls (typed; hostcalls.py marshals to and from guest memory) -----------------

    def log_message(self, level: int, message: bytes) -> WasmResult:
        logger = _log
        py_level = _PY_LEVELS[level]
        if logger.isEnabledFor(py_level):
            logger.log(py_level, "wasm log%s: %s", self.log_prefix(), message.decode("utf-8", "replace"))
        return WasmResult.Ok

    def get_log_level(self) -> int:
        level = _log.getEffectiveLevel()
        for spdlog_level, py_level in enumerate(_PY_LEVELS):
            if level <= py_level:
                return spdlog_level
        return 6  # off

    def get_current_time_nanoseconds(self) -> int:
        assert self.wasm is not None
        return int(self.wasm.time_source.system_time() * 1e9)

    def set_timer_period(self, period_ms: int) -> WasmResult:
        assert self.wasm is not None
        self.wasm.set_tick_period(self.root_context().id, period_ms)
        return WasmResult.Ok

    def get_configuration(self) -> bytes:
        """0.1.0 proxy_get_configuration: the plugin's while configuring, else the VM's."""
        if self.temp_plugin is not None:
            return self.temp_plugin.plugin_configuration
        assert self.wasm is not None
        return self.wasm.vm_configuration

    def get_status(self) -> tuple[int, bytes]:
        return self.status_code, self.status_message

    # Properties.

    def stream_info(self) -> "StreamInfo | None":
        if self.access_log_stream_info is not None:
            return self.access_log_stream_info
        return self.env.stream_info if self.env is not None else None

    def get_property(self, path: bytes) -> tuple[WasmResult, bytes]:
        return properties.get_property(self, path)

    def set_property(self, path: bytes, value: bytes) -> WasmResult:
        info = self.env.stream_info if self.env is not None else None
        if info is None:
            return WasmResult.NotFound
        name = path.decode("utf-8", "replace")
        key = properties.CEL_STATE_PREFIX + name
        current = info.filter_state.get(key)
        if isinstance(current, properties.ReadonlyCelState):
            return WasmResult.BadArgument  # CelState::setValue: a readonly value is set once
        prototype = self.root_context().state_prototypes.get(name) if current is None else None
        readonly = prototype is not None and prototype.readonly
        info.filter_state[key] = properties.ReadonlyCelState(value) if readonly else bytes(value)
        return WasmResult.Ok

    def declare_property(self, name: str, prototype: properties.CelStatePrototype) -> WasmResult:
        """Envoy declareProperty: the first declaration of a name stays (BadArgument after)."""
        if name in self.state_prototypes:
            return WasmResult.BadArgument
        self.state_prototypes[name] = prototype
        return WasmResult.Ok

    def set_envoy_filter_state(self, path: str, value: bytes) -> WasmResult:
        """Envoy setEnvoyFilterState: an object from its registered factory, under `path`."""
        result, obj = properties.create_filter_state_object(path, value)
        if result != WasmResult.Ok:
            return result
        info = self.env.stream_info if self.env is not None else None
        if info is None:
            return WasmResult.NotFound
        info.filter_state[path] = obj
        return WasmResult.Ok

    # Header maps (Envoy Context::getMap / getConstMap).

    def _get_map(self, map_type: int) -> HeaderMap | None:
        """A map the plugin may change (None if there is none now)."""
        if map_type == WasmHeaderMapType.RequestHeaders:
            return self.request_headers
        if map_type == WasmHeaderMapType.RequestTrailers:
            if (self.request_trailers is None and self.request_body_buffer is not None
                    and self.end_of_stream and self.env is not None):
                self.request_trailers = self.env.add_trailers(WasmHeaderMapType.RequestTrailers)
            return self.request_trailers
        if map_type == WasmHeaderMapType.ResponseHeaders:
            return self.response_headers
        if map_type == WasmHeaderMapType.ResponseTrailers:
            if (self.response_trailers is None and self.response_body_buffer is not None
                    and self.end_of_stream and self.env is not None):
                self.response_trailers = self.env.add_trailers(WasmHeaderMapType.ResponseTrailers)
            return self.response_trailers
        return None

    def _get_const_map(self, map_type: int) -> HeaderMap | None:
        """A map the plugin may read (includes callout responses and the access-log maps)."""
        if map_type == WasmHeaderMapType.RequestHeaders:
            return self.access_log_request_headers if self.access_log_phase else self.request_headers
        if map_type == WasmHeaderMapType.RequestTrailers:
            return None if self.access_log_phase else self.request_trailers
        if map_type == WasmHeaderMapType.ResponseHeaders:
            return self.access_log_response_headers if self.access_log_phase else self.response_headers
        if map_type == WasmHeaderMapType.ResponseTrailers:
            return self.access_log_response_trailers if self.access_log_phase else self.response_trailers
        root = self.root_context()
        if map_type == WasmHeaderMapType.GrpcReceiveInitialMetadata:
            return root.grpc_receive_initial_metadata
        if map_type == WasmHeaderMapType.GrpcReceiveTrailingMetadata:
            return root.grpc_receive_trailing_metadata
        response = root.http_call_response
        if response is None:
            return None
        return response[0] if map_type == WasmHeaderMapType.HttpCallResponseHeaders else response[2]

    def _headers_modified(self, map_type: int) -> None:
        # Envoy's onHeadersModified: a plugin that changes request headers may change the route.
        if map_type == WasmHeaderMapType.RequestHeaders and self.env is not None:
            self.env.clear_route_cache()

    def add_header_map_value(self, map_type: int, key: bytes, value: bytes) -> WasmResult:
        # _get_map and _headers_modified inlined for the stream's own headers (the common case).
        if map_type == _REQUEST_HEADERS:
            m = self.request_headers
        elif map_type == _RESPONSE_HEADERS:
            m = self.response_headers
        else:
            m = self._get_map(map_type)
        if m is None:
            return WasmResult.BadArgument
        m.add(key.decode("latin-1"), value.decode("latin-1"))
        if map_type == _REQUEST_HEADERS and self.env is not None:
            self.env.clear_route_cache()
        return WasmResult.Ok

    def get_header_map_value(self, map_type: int, key: bytes) -> tuple[WasmResult, bytes]:
        assert self.wasm is not None
        # _get_const_map inlined for the stream's own headers outside the access-log phase.
        if self.access_log_phase or map_type > _RESPONSE_HEADERS:
            m = self._get_const_map(map_type)
        elif map_type == _REQUEST_HEADERS:
            m = self.request_headers
        elif map_type == _RESPONSE_HEADERS:
            m = self.response_headers
        else:
            m = self._get_const_map(map_type)
        if m is None:
            if self.access_log_phase:
                legacy = self.wasm.abi_version == AbiVersion.ProxyWasm_0_1_0
                return (WasmResult.Ok, b"") if legacy else (WasmResult.NotFound, b"")
            return WasmResult.BadArgument, b""
        value = m.get(key.decode("latin-1"))
        if value is None:
            legacy = self.wasm.abi_version == AbiVersion.ProxyWasm_0_1_0
            return (WasmResult.Ok, b"") if legacy else (WasmResult.NotFound, b"")
        return WasmResult.Ok, value.encode("latin-1")

    def get_header_map_pairs(self, map_type: int) -> tuple[WasmResult, Pairs]:
        m = self._get_const_map(map_type)
        if m is None:
            return WasmResult.Ok, []
        return WasmResult.Ok, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in m.items()]

    def set_header_map_pairs(self, map_type: int, pairs: Sequence[tuple[bytes, bytes]]) -> WasmResult:
        m = self._get_map(map_type)
        if m is None:
            return WasmResult.BadArgument
        m.replace_all((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in pairs)
        self._headers_modified(map_type)
        return WasmResult.Ok

    def remove_header_map_value(self, map_type: int, key: bytes) -> WasmResult:
        m = self._get_map(map_type)
        if m is None:
            return WasmResult.BadArgument
        m.remove(key.decode("latin-1"))
        self._headers_modified(map_type)
        return WasmResult.Ok

    def replace_header_map_value(self, map_type: int, key: bytes, value: bytes) -> WasmResult:
        m = self._get_map(map_type)
        if m is None:
            return WasmResult.BadArgument
        # Envoy's setCopy removes every value, then appends: a replaced header moves last
        # (observed with Envoy 1.40).
        name = key.decode("latin-1")
        m.remove(name)
        m.add(name, value.decode("latin-1"))
        self._headers_modified(map_type)
        return WasmResult.Ok

    def get_header_map_size(self, map_type: int) -> tuple[WasmResult, int]:
        m = self._get_map(map_type)
        if m is None:
            return WasmResult.BadArgument, 0
        return WasmResult.Ok, m.byte_size()

    # Buffers (Envoy Context::getBuffer).

    def get_buffer_data(self, buffer_type: int) -> bytes | bytearray | None:
        """What get_buffer(buffer_type) wraps (None: no such buffer), without the Buffer: the
        host calls' path. A bytearray is the live buffer, written with copy_into."""
        if buffer_type == _HTTP_RESPONSE_BODY:
            data = self.response_body_buffer
        elif buffer_type == _HTTP_REQUEST_BODY:
            data = self.request_body_buffer
        elif buffer_type == _NETWORK_DOWNSTREAM_DATA:
            data = self.downstream_data_buffer
        elif buffer_type == _NETWORK_UPSTREAM_DATA:
            data = self.upstream_data_buffer
        elif buffer_type == _HTTP_CALL_RESPONSE_BODY:
            response = self.root_context().http_call_response
            if response is None:
                return None
            data = response[1]
        else:
            buffer = self.get_buffer(buffer_type)
            return None if buffer is None else buffer.data
        return b"" if data is None else data  # as Buffer(None)

    def get_buffer(self, buffer_type: int) -> Buffer | None:
        assert self.wasm is not None
        if buffer_type == WasmBufferType.CallData:
            return self.call_data
        if buffer_type == WasmBufferType.VmConfiguration:
            return Buffer(self.wasm.vm_configuration)
        if buffer_type == WasmBufferType.PluginConfiguration:
            return Buffer(self.temp_plugin.plugin_configuration) if self.temp_plugin is not None else None
        if buffer_type == WasmBufferType.HttpRequestBody:
            return Buffer(self.request_body_buffer)
        if buffer_type == WasmBufferType.HttpResponseBody:
            return Buffer(self.response_body_buffer)
        if buffer_type == WasmBufferType.NetworkDownstreamData:
            return Buffer(self.downstream_data_buffer)
        if buffer_type == WasmBufferType.NetworkUpstreamData:
            return Buffer(self.upstream_data_buffer)
        root = self.root_context()
        if buffer_type == WasmBufferType.HttpCallResponseBody:
            return Buffer(root.http_call_response[1]) if root.http_call_response is not None else None
        if buffer_type == WasmBufferType.GrpcReceiveBuffer:
            return Buffer(root.grpc_receive_buffer)
        return None

    # Streams.

    # Without a stream (a root context) these do nothing and still answer Ok, as Envoy 1.40
    # does when its filter callbacks are absent (checked with a probe plugin).

    def continue_stream(self, stream_type: int) -> WasmResult:
        if stream_type == WasmStreamType.Upstream:
            return WasmResult.Unimplemented
        env, wasm = self.env, self.wasm
        st = WasmStreamType(stream_type)
        if env is not None and wasm is not None:
            wasm.add_after_vm_call_action(lambda: env.continue_stream(st))
        if st != WasmStreamType.Downstream:
            # Envoy forgets the request-side maps once the plugin resumes the stream.
            self.request_headers = None
            self.request_body_buffer = None
            self.request_trailers = None
        return WasmResult.Ok

    def close_stream(self, stream_type: int) -> WasmResult:
        env, wasm = self.env, self.wasm
        if env is None or wasm is None:
            return WasmResult.Ok
        st = WasmStreamType(stream_type)
        info = env.stream_info
        if st in (WasmStreamType.Request, WasmStreamType.Response) and info is not None:
            if not info.response_code_details:
                info.response_code_details = CLOSE_STREAM_RESPONSE_DETAILS
        wasm.add_after_vm_call_action(lambda: env.close_stream(st))
        return WasmResult.Ok

    def fail_stream(self, stream_type: WasmStreamType) -> None:
        """The VM failed and the plugin is fail-closed: 503 the HTTP stream, close a TCP one."""
        env = self.env
        if env is None:
            return
        if stream_type in (WasmStreamType.Request, WasmStreamType.Response):
            if not self.failure_local_reply_sent:
                self.failure_local_reply_sent = True
                env.send_local_response(503, b"", [], 14, FAIL_STREAM_RESPONSE_DETAILS)  # 14: Unavailable
        else:
            env.close_stream(stream_type)

    def send_local_response(
        self, response_code: int, body: bytes, additional_headers: Pairs, grpc_status: int, details: bytes
    ) -> WasmResult:
        env, wasm = self.env, self.wasm
        if env is None or wasm is None:
            return WasmResult.Ok
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in additional_headers]
        # SDKs pass -1 (as u32) for "no gRPC status": only known codes produce a grpc-status.
        grpc = grpc_status if 0 <= grpc_status <= GRPC_STATUS_MAXIMUM_KNOWN else None
        # Envoy's StringUtil::replaceAllEmptySpace: details never contain whitespace.
        text = "".join("_" if c.isspace() else c for c in details.decode("utf-8", "replace"))
        body = bytes(body)
        wasm.add_after_vm_call_action(lambda: env.send_local_response(response_code, body, headers, grpc, text))
        return WasmResult.Ok

    def clear_route_cache(self) -> WasmResult:
        if self.env is not None:
            self.env.clear_route_cache()
        return WasmResult.Ok

    # Shared data and queues.

    def get_shared_data(self, key: bytes) -> tuple[WasmResult, bytes, int]:
        assert self.wasm is not None
        return global_shared_data.get(self.wasm.vm_id, key)

    def set_shared_data(self, key: bytes, value: bytes, cas: int) -> WasmResult:
        assert self.wasm is not None
        return global_shared_data.set(self.wasm.vm_id, key, value, cas)

    def register_shared_queue(self, name: bytes) -> tuple[WasmResult, int]:
        """The owner is this context's root context (proxy_on_queue_ready goes to roots)."""
        wasm = self.wasm
        assert wasm is not None
        owner_id = self.id if self.is_root_context() else self.parent_context_id
        token = global_shared_queue.register_queue(wasm.vm_id, name, wasm.queue_ready_callback(owner_id), wasm.post)
        return WasmResult.Ok, token

    def resolve_shared_queue(self, vm_id: bytes, name: bytes) -> tuple[WasmResult, int]:
        assert self.wasm is not None
        # A vm_id that is not UTF-8 names no VM (configured ids are strings): NotFound, not a crash.
        token = global_shared_queue.resolve_queue(
            vm_id.decode("utf-8", "surrogateescape") if vm_id else self.wasm.vm_id, name)
        if self.is_failed() or token == 0:
            return WasmResult.NotFound, 0
        return WasmResult.Ok, token

    def dequeue_shared_queue(self, token: int) -> tuple[WasmResult, bytes]:
        return global_shared_queue.dequeue(token)

    def enqueue_shared_queue(self, token: int, value: bytes) -> WasmResult:
        return global_shared_queue.enqueue(token, value)

    # Metrics (Envoy Context::defineMetric & co.).

    def define_metric(self, metric_type: int, name: bytes) -> tuple[WasmResult, int]:
        if metric_type > MetricType.Histogram:
            return WasmResult.BadArgument, 0
        assert self.wasm is not None
        return WasmResult.Ok, self.wasm.define_metric(MetricType(metric_type), name.decode("utf-8", "replace"))

    def increment_metric(self, metric_id: int, offset: int) -> WasmResult:
        assert self.wasm is not None
        kind = metric_id & 3
        if kind == MetricType.Counter:
            counter = self.wasm.counters.get(metric_id)
            if counter is None:
                return WasmResult.NotFound
            if offset <= 0:
                return WasmResult.BadArgument
            counter.inc(offset)
            return WasmResult.Ok
        if kind == MetricType.Gauge:
            gauge = self.wasm.gauges.get(metric_id)
            if gauge is None:
                return WasmResult.NotFound
            if offset > 0:
                gauge.inc(offset)
            else:
                gauge.dec(-offset)
            return WasmResult.Ok
        return WasmResult.BadArgument

    def record_metric(self, metric_id: int, value: int) -> WasmResult:
        assert self.wasm is not None
        kind = metric_id & 3
        if kind == MetricType.Counter:
            counter = self.wasm.counters.get(metric_id)
            if counter is not None:
                counter.inc(value)
                return WasmResult.Ok
        elif kind == MetricType.Gauge:
            gauge = self.wasm.gauges.get(metric_id)
            if gauge is not None:
                gauge.set(value)
                return WasmResult.Ok
        elif kind == MetricType.Histogram:
            histogram = self.wasm.histograms.get(metric_id)
            if histogram is not None:
                histogram.record(value)
                return WasmResult.Ok
        return WasmResult.NotFound

    def get_metric(self, metric_id: int) -> tuple[WasmResult, int]:
        assert self.wasm is not None
        kind = metric_id & 3
        if kind == MetricType.Counter:
            counter = self.wasm.counters.get(metric_id)
            return (WasmResult.Ok, counter.value) if counter is not None else (WasmResult.NotFound, 0)
        if kind == MetricType.Gauge:
            gauge = self.wasm.gauges.get(metric_id)
            return (WasmResult.Ok, gauge.value) if gauge is not None else (WasmResult.NotFound, 0)
        return WasmResult.BadArgument, 0

    # Callouts (called on the root context; cpp-host routes these host calls to root_context()).

    def http_call(
        self, cluster: bytes, headers: Pairs, body: bytes, trailers: Pairs, timeout_ms: int
    ) -> tuple[WasmResult, int]:
        wasm = self.wasm
        assert wasm is not None
        if timeout_ms >= 1 << 31:  # Envoy reads the u32 as a signed int: negative is invalid
            return WasmResult.BadArgument, 0
        request = _pairs_to_header_map(headers)
        if request.get(":path") is None or request.get(":method") is None or request.get(":authority") is None:
            return WasmResult.BadArgument, 0
        trailer_map = _pairs_to_header_map(trailers) if trailers else None
        token = wasm.next_http_call_id()
        result = wasm.environment.http_call(
            self, token, cluster.decode("utf-8", "replace"), request, bytes(body), trailer_map,
            timeout_ms if timeout_ms > 0 else None)
        if result != WasmResult.Ok:
            return result, 0
        self.http_requests.add(token)
        return WasmResult.Ok, token

    def on_http_call_success(
        self, token: int, headers: HeaderMap, body: bytes, trailers: HeaderMap | None
    ) -> None:
        """Called by the environment with the response of http_call `token` (any time later)."""
        wasm = self.wasm
        assert wasm is not None
        if wasm.current_context is not None:  # re-entrant: deliver after the current VM call
            wasm.add_after_vm_call_action(lambda: self.on_http_call_success(token, headers, body, trailers))
            return
        if token not in self.http_requests:
            return
        self.http_call_response = (headers, body, trailers)

        def cleanup() -> None:
            self.http_call_response = None
            self.http_requests.discard(token)

        wasm.add_after_vm_call_action(cleanup)
        if self.is_failed():
            wasm.do_after_vm_call_actions()
            return
        self.on_http_call_response(token, len(headers), len(body), len(trailers) if trailers else 0)

    def on_http_call_failure(self, token: int) -> None:
        """The callout `token` failed (reset, timeout...): the plugin sees 0/0/0 and status 11."""
        wasm = self.wasm
        assert wasm is not None
        if wasm.current_context is not None:
            wasm.add_after_vm_call_action(lambda: self.on_http_call_failure(token))
            return
        if token not in self.http_requests:
            return
        self.status_code = WasmResult.BrokenConnection
        self.status_message = b"reset"

        def cleanup() -> None:
            self.status_message = b""
            self.http_requests.discard(token)

        wasm.add_after_vm_call_action(cleanup)
        if self.is_failed():
            wasm.do_after_vm_call_actions()
            return
        self.on_http_call_response(token, 0, 0, 0)

    def grpc_call(
        self, service: bytes, service_name: bytes, method_name: bytes, initial_metadata: Pairs,
        request: bytes, timeout_ms: int,
    ) -> tuple[WasmResult, int]:
        wasm = self.wasm
        assert wasm is not None
        token = wasm.next_grpc_call_id()
        result = wasm.environment.grpc_call(
            self, token, bytes(service), service_name.decode("utf-8", "replace"),
            method_name.decode("utf-8", "replace"), _pairs_to_header_map(initial_metadata), bytes(request),
            timeout_ms)
        if result != WasmResult.Ok:
            if result == WasmResult.ParseFailure:
                wasm.release_grpc_id(token)
            return result, 0
        self.grpc_calls.add(token)
        return WasmResult.Ok, token

    def grpc_stream(
        self, service: bytes, service_name: bytes, method_name: bytes, initial_metadata: Pairs
    ) -> tuple[WasmResult, int]:
        wasm = self.wasm
        assert wasm is not None
        token = wasm.next_grpc_stream_id()
        result = wasm.environment.grpc_stream(
            self, token, bytes(service), service_name.decode("utf-8", "replace"),
            method_name.decode("utf-8", "replace"), _pairs_to_header_map(initial_metadata))
        if result != WasmResult.Ok:
            if result == WasmResult.ParseFailure:
                wasm.release_grpc_id(token)
            return result, 0
        self.grpc_streams[token] = [False, False]
        return WasmResult.Ok, token

    def grpc_send(self, token: int, message: bytes, end_stream: bool) -> WasmResult:
        assert self.wasm is not None
        if not _is_grpc_stream(token):  # only streams can be sent on
            return WasmResult.BadArgument
        if token not in self.grpc_streams:
            return WasmResult.NotFound
        self.wasm.environment.grpc_send(token, bytes(message), end_stream)
        return WasmResult.Ok

    def grpc_close(self, token: int) -> WasmResult:
        assert self.wasm is not None
        if _is_grpc_call(token):
            if token not in self.grpc_calls:
                return WasmResult.NotFound
            self.wasm.environment.grpc_close(token)
            self.grpc_calls.discard(token)
            return WasmResult.Ok
        if not _is_grpc_stream(token):
            return WasmResult.BadArgument
        state = self.grpc_streams.get(token)
        if state is None:
            return WasmResult.NotFound
        self.wasm.environment.grpc_close(token)
        if state[1]:
            del self.grpc_streams[token]
        else:
            state[0] = True
        return WasmResult.Ok

    def grpc_cancel(self, token: int) -> WasmResult:
        assert self.wasm is not None
        if _is_grpc_call(token):
            if token not in self.grpc_calls:
                return WasmResult.NotFound
            self.wasm.environment.grpc_cancel(token)
            self.grpc_calls.discard(token)
            return WasmResult.Ok
        if not _is_grpc_stream(token):
            return WasmResult.BadArgument
        if token not in self.grpc_streams:
            return WasmResult.NotFound
        self.wasm.environment.grpc_cancel(token)
        del self.grpc_streams[token]
        return WasmResult.Ok

    def on_grpc_receive_initial_metadata(self, token: int, metadata: HeaderMap) -> None:
        self.grpc_receive_initial_metadata = metadata
        try:
            self.on_grpc_receive_initial_metadata_raw(token, len(metadata))
        finally:
            self.grpc_receive_initial_metadata = None

    def on_grpc_receive_trailing_metadata(self, token: int, metadata: HeaderMap) -> None:
        self.grpc_receive_trailing_metadata = metadata
        try:
            self.on_grpc_receive_trailing_metadata_raw(token, len(metadata))
        finally:
            self.grpc_receive_trailing_metadata = None

    def on_grpc_receive(self, token: int, message: bytes) -> None:
        wasm = self.wasm
        assert wasm is not None
        if "proxy_on_grpc_receive" not in wasm.module_functions:
            if _is_grpc_call(token):
                self.grpc_calls.discard(token)
            return
        self.grpc_receive_buffer = message

        def cleanup() -> None:
            self.grpc_receive_buffer = None
            if _is_grpc_call(token):
                self.grpc_calls.discard(token)

        wasm.add_after_vm_call_action(cleanup)
        self.on_grpc_receive_raw(token, len(message))
        wasm.do_after_vm_call_actions()

    def on_grpc_close(self, token: int, status: int, message: bytes) -> None:
        wasm = self.wasm
        assert wasm is not None
        if wasm.current_context is not None:
            wasm.add_after_vm_call_action(lambda: self.on_grpc_close(token, status, message))
            return

        def cleanup() -> None:
            if _is_grpc_call(token):
                self.grpc_calls.discard(token)
            else:
                state = self.grpc_streams.get(token)
                if state is not None:
                    state[1] = True
                    if state[0]:
                        del self.grpc_streams[token]

        if "proxy_on_grpc_close" not in wasm.module_functions:
            cleanup()
            return
        self.status_code = status
        self.status_message = bytes(message)

        def reset() -> None:
            self.status_message = b""
            cleanup()

        wasm.add_after_vm_call_action(reset)
        self.on_grpc_close_raw(token, status)
        wasm.do_after_vm_call_actions()

    def resolve_dns(self, address: bytes, token: int) -> WasmResult:
        """envoy_resolve_dns: the answer goes to this context's root (on_resolve_dns)."""
        wasm = self.wasm
        assert wasm is not None
        return wasm.environment.resolve_dns(self, token, address.decode("utf-8", "replace"))

    def on_resolve_dns(self, token: int, results: Sequence[tuple[str, int]] | None) -> None:
        """DNS answer for `token`: [(address, ttl_seconds)] (Envoy formats an address with its
        port, e.g. "127.0.0.1:0"), or None when resolution failed (an empty CallData buffer)."""
        wasm = self.wasm
        assert wasm is not None
        if wasm.is_failed() or "envoy_on_resolve_dns" not in wasm.module_functions:
            return
        if results is None:
            data = b""
        else:
            parts = [len(results).to_bytes(4, "little")]
            parts += [(ttl & 0xFFFFFFFF).to_bytes(4, "little") for _, ttl in results]
            parts += [addr.encode() + b"\0" for addr, _ in results]
            data = b"".join(parts)
        self.call_data = Buffer(data)
        try:
            self._call("envoy_on_resolve_dns", self.id, token, len(data))
        finally:
            self.call_data = _EMPTY_BUFFER


def _is_grpc_call(token: int) -> bool:
    return (token & 3) == 1


def _is_grpc_stream(token: int) -> bool:
    return (token & 3) == 2


# Python logging levels for spdlog's trace..critical (Envoy passes the plugin's level through).
_PY_LEVELS = (5, 10, 20, 30, 40, 50)
assert len(_PY_LEVELS) == LogLevel.critical + 1


def _net_status(result: int) -> FilterStatus:
    return FilterStatus.Continue if result == 0 else FilterStatus.StopIteration


# The stream's own header maps, as plain ints (the per-host-call fast paths compare with them).
_REQUEST_HEADERS = int(WasmHeaderMapType.RequestHeaders)
_RESPONSE_HEADERS = int(WasmHeaderMapType.ResponseHeaders)

_HEADERS_STATUSES = tuple(FilterHeadersStatus)
_DATA_STATUSES = tuple(FilterDataStatus)
_TRAILERS_STATUSES = tuple(FilterTrailersStatus)
assert all(s.value == i for t in (_HEADERS_STATUSES, _DATA_STATUSES, _TRAILERS_STATUSES) for i, s in enumerate(t))

# Envoy convertFilterHeadersStatus: ContinueAndEndStream -> Continue, the others by value.
_HTTP_HEADERS_STATUS = tuple(HttpHeadersStatus.Continue if s == FilterHeadersStatus.ContinueAndEndStream
                             else HttpHeadersStatus(int(s)) for s in FilterHeadersStatus)
_HTTP_DATA_STATUS = tuple(HttpDataStatus(int(s)) for s in FilterDataStatus)
_HTTP_TRAILERS_STATUS = tuple(HttpTrailersStatus(int(s)) for s in FilterTrailersStatus)

