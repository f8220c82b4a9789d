"""Proxy-Wasm ABI constants: status codes, enums and the host-function list per ABI version.

Values are the spec's (proxy-wasm/spec abi-versions/v0.2.1) and proxy-wasm-cpp-host's
(include/proxy-wasm/wasm_api_impl.h, proxy_wasm_enums.h, exports.h). SDKs abort on codes
they do not expect, so every host call returns exactly one of these.
"""

from __future__ import annotations

import enum
from typing import Iterable

__all__ = [
    "AbiVersion",
    "AbiVersionError",
    "CloseType",
    "ENVOY_HOST_FUNCTIONS",
    "EMSCRIPTEN_HOST_FUNCTIONS",
    "FailState",
    "FilterDataStatus",
    "FilterHeadersStatus",
    "FilterMetadataStatus",
    "FilterStatus",
    "FilterTrailersStatus",
    "GrpcStatus",
    "HOST_FUNCTIONS",
    "LogLevel",
    "MetricType",
    "PAIRS_MAX_BYTES",
    "PAIRS_MAX_COUNT",
    "WASI_RANDOM_GET_MAX_SIZE_BYTES",
    "WASM_MAX_MEMORY_SIZE_BYTES",
    "WasmBufferType",
    "WasmHeaderMapType",
    "WasmResult",
    "WasmStreamType",
    "detect_abi_version",
    "host_function_names",
]


# -- limits (cpp-host include/proxy-wasm/limits.h) ------------------------------------------

WASM_MEMORY_PAGE_SIZE_BYTES = 64 * 1024
WASM_MAX_MEMORY_SIZE_BYTES = 1024 * 1024 * 1024
WASI_RANDOM_GET_MAX_SIZE_BYTES = 64 * 1024
# A serialized header map (pairs) larger than this, or with more pairs, deserializes to nothing.
PAIRS_MAX_BYTES = 1024 * 1024
PAIRS_MAX_COUNT = 1024


class WasmResult(enum.IntEnum):
    """The status every host call returns (spec: proxy_result_t)."""

    Ok = 0
    NotFound = 1
    BadArgument = 2
    SerializationFailure = 3
    ParseFailure = 4
    BadExpression = 5
    InvalidMemoryAccess = 6
    Empty = 7
    CasMismatch = 8
    ResultMismatch = 9
    InternalFailure = 10
    BrokenConnection = 11
    Unimplemented = 12


class WasmHeaderMapType(enum.IntEnum):
    RequestHeaders = 0
    RequestTrailers = 1
    ResponseHeaders = 2
    ResponseTrailers = 3
    GrpcReceiveInitialMetadata = 4
    GrpcReceiveTrailingMetadata = 5
    HttpCallResponseHeaders = 6
    HttpCallResponseTrailers = 7


HEADER_MAP_TYPE_MAX = WasmHeaderMapType.HttpCallResponseTrailers


class WasmBufferType(enum.IntEnum):
    HttpRequestBody = 0
    HttpResponseBody = 1
    NetworkDownstreamData = 2
    NetworkUpstreamData = 3
    HttpCallResponseBody = 4
    GrpcReceiveBuffer = 5
    VmConfiguration = 6
    PluginConfiguration = 7
    # Envoy's "CallData": foreign-function arguments, DNS results, stats updates.
    CallData = 8


BUFFER_TYPE_MAX = WasmBufferType.CallData


class WasmStreamType(enum.IntEnum):
    Request = 0
    Response = 1
    Downstream = 2
    Upstream = 3


STREAM_TYPE_MAX = WasmStreamType.Upstream


class LogLevel(enum.IntEnum):
    """spdlog's levels, which Envoy passes through unchanged (6 = off is a BadArgument)."""

    trace = 0
    debug = 1
    info = 2
    warn = 3
    error = 4
    critical = 5


LOG_LEVEL_MAX = LogLevel.critical


class MetricType(enum.IntEnum):
    Counter = 0
    Gauge = 1
    Histogram = 2


METRIC_TYPE_MAX = MetricType.Histogram


class CloseType(enum.IntEnum):
    """Peer type passed to proxy_on_{downstream,upstream}_connection_close."""

    Unknown = 0
    Local = 1
    Remote = 2


class FilterStatus(enum.IntEnum):
    """TCP (network) filter status."""

    Continue = 0
    StopIteration = 1


class FilterHeadersStatus(enum.IntEnum):
    """Host-side header status; the int values equal wasmproxy.http.filter.FilterHeadersStatus."""

    Continue = 0
    StopIteration = 1
    ContinueAndEndStream = 2
    StopAllIterationAndBuffer = 3
    StopAllIterationAndWatermark = 4


class FilterDataStatus(enum.IntEnum):
    """Host-side data status; the int values equal wasmproxy.http.filter.FilterDataStatus."""

    Continue = 0
    StopIterationAndBuffer = 1
    StopIterationAndWatermark = 2
    StopIterationNoBuffer = 3


class FilterTrailersStatus(enum.IntEnum):
    Continue = 0
    StopIteration = 1


class FilterMetadataStatus(enum.IntEnum):
    Continue = 0


class FailState(enum.IntEnum):
    """Why a VM is unusable (cpp-host FailState)."""

    Ok = 0
    UnableToCreateVm = 1
    UnableToCloneVm = 2
    MissingFunction = 3
    UnableToInitializeCode = 4
    StartFailed = 5
    ConfigureFailed = 6
    RuntimeError = 7


class GrpcStatus(enum.IntEnum):
    """The gRPC codes Envoy understands in send_local_response (anything else: no grpc-status)."""

    Ok = 0
    Canceled = 1
    Unknown = 2
    InvalidArgument = 3
    DeadlineExceeded = 4
    NotFound = 5
    AlreadyExists = 6
    PermissionDenied = 7
    ResourceExhausted = 8
    FailedPrecondition = 9
    Aborted = 10
    OutOfRange = 11
    Unimplemented = 12
    Internal = 13
    Unavailable = 14
    DataLoss = 15
    Unauthenticated = 16


GRPC_STATUS_MAXIMUM_KNOWN = GrpcStatus.Unauthenticated


# -- ABI versions ------------------------------------------------------------------------------


class AbiVersion(enum.Enum):
    ProxyWasm_0_1_0 = "0.1.0"
    ProxyWasm_0_2_0 = "0.2.0"
    ProxyWasm_0_2_1 = "0.2.1"
    Unknown = "unknown"


class AbiVersionError(ValueError):
    """The module declares no (or an unknown) Proxy-Wasm ABI version: it cannot be loaded."""


# A module declares its ABI by exporting one of these (empty) functions.
_ABI_MARKERS = {
    "proxy_abi_version_0_1_0": AbiVersion.ProxyWasm_0_1_0,
    "proxy_abi_version_0_2_0": AbiVersion.ProxyWasm_0_2_0,
    "proxy_abi_version_0_2_1": AbiVersion.ProxyWasm_0_2_1,
}


def detect_abi_version(export_names: Iterable[str]) -> AbiVersion:
    """The ABI version a module declares; raises AbiVersionError with cpp-host's message if none."""
    for name in export_names:
        version = _ABI_MARKERS.get(name)
        if version is not None:
            return version
    raise AbiVersionError("Missing or unknown Proxy-Wasm ABI version")


# cpp-host exports.h FOR_ALL_HOST_FUNCTIONS, without the "proxy_" prefix, in its order.
HOST_FUNCTIONS: tuple[str, ...] = (
    "log",
    "get_status",
    "set_property",
    "get_property",
    "send_local_response",
    "get_shared_data",
    "set_shared_data",
    "register_shared_queue",
    "resolve_shared_queue",
    "dequeue_shared_queue",
    "enqueue_shared_queue",
    "get_header_map_value",
    "add_header_map_value",
    "replace_header_map_value",
    "remove_header_map_value",
    "get_header_map_pairs",
    "set_header_map_pairs",
    "get_header_map_size",
    "get_buffer_status",
    "get_buffer_bytes",
    "set_buffer_bytes",
    "http_call",
    "grpc_call",
    "grpc_stream",
    "grpc_close",
    "grpc_cancel",
    "grpc_send",
    "set_tick_period_milliseconds",
    "get_current_time_nanoseconds",
    "define_metric",
    "increment_metric",
    "record_metric",
    "get_metric",
    "set_effective_context",
    "done",
    "call_foreign_function",
)

_VERSION_HOST_FUNCTIONS: dict[AbiVersion, tuple[str, ...]] = {
    AbiVersion.ProxyWasm_0_1_0: ("get_configuration", "continue_request", "continue_response", "clear_route_cache"),
    AbiVersion.ProxyWasm_0_2_0: ("continue_stream", "close_stream"),
    AbiVersion.ProxyWasm_0_2_1: ("continue_stream", "close_stream", "get_log_level"),
}

# Envoy registers these under "env" in addition (source/extensions/common/wasm/wasm.cc).
ENVOY_HOST_FUNCTIONS: tuple[str, ...] = ("envoy_resolve_dns",)
# cpp-host registers these under "env" for Emscripten-built modules.
EMSCRIPTEN_HOST_FUNCTIONS: tuple[str, ...] = ("pthread_equal", "emscripten_notify_memory_growth")


def host_function_names(abi_version: AbiVersion) -> tuple[str, ...]:
    """Every "env" import name a module of this ABI version may link against."""
    proxy = HOST_FUNCTIONS + _VERSION_HOST_FUNCTIONS.get(abi_version, ())
    return tuple("proxy_" + n for n in proxy) + ENVOY_HOST_FUNCTIONS + EMSCRIPTEN_HOST_FUNCTIONS
