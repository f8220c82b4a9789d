"""proxy_get_property: Envoy's attribute paths and their binary encodings.

Envoy resolves a path (NUL-separated segments) through its CEL activation
(source/extensions/filters/common/expr/context.cc) plus a few Wasm-only names
(source/extensions/common/wasm/context.cc: plugin_name, plugin_root_id, plugin_vm_id,
connection_id, and "wasm."-prefixed filter state written by proxy_set_property), then
serializes the value (serializeValue):

* strings and bytes: raw; bool: one byte; int64/uint64: 8 bytes little-endian;
  double: 8 bytes IEEE little-endian; timestamps and durations: int64 nanoseconds;
* maps: the header-map "pairs" format (values serialized recursively); lists: pairs with
  empty values; protobuf messages: their wire encoding;
* a value that cannot be listed (the "request" map itself) is a SerializationFailure.

A missing attribute or segment is NotFound. Stream attributes need the stream's StreamInfo
(absent on root contexts). Like Envoy, ``request.*`` reads the request headers only while a
request callback runs or in the access-log phase.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .abi import WasmResult

if TYPE_CHECKING:
    from ..http.headers import HeaderMap
    from ..http.stream_info import StreamInfo
    from .context import ContextBase

__all__ = [
    "CEL_STATE_PREFIX", "RESPONSE_FLAG_BITS", "CelStatePrototype", "Duration", "OpaqueFilterStateObject",
    "ReadonlyCelState", "Timestamp", "create_filter_state_object", "get_property", "serialize_value",
]

# proxy_set_property("foo") stores filter state "wasm.foo"; get_property("foo") reads it back.
CEL_STATE_PREFIX = "wasm."

# Envoy's legacy response-flag bits, by short name (envoy/stream_info/stream_info.h ResponseFlag).
RESPONSE_FLAG_BITS: dict[str, int] = {
    name: 1 << i
    for i, name in enumerate(
        ["LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX",
         "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR"])
}

_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")


class Duration(int):
    """Nanoseconds, serialized as int64 (CEL duration)."""


class Timestamp(int):
    """Nanoseconds since the epoch, serialized as int64 (CEL timestamp)."""


class _Unlistable(Exception):
    pass


class LazyMap:
    """A CEL map computed on lookup. Unlistable ones serialize to SerializationFailure."""

    __slots__ = ()

    def lookup(self, key: bytes) -> Any:
        raise NotImplementedError

    def items(self) -> list[tuple[Any, Any]]:
        raise _Unlistable


class _FieldMap(LazyMap):
    """A map of named attributes, each a callable returning the value or None."""

    def __init__(self, fields: Mapping[str, Callable[[], Any]]) -> None:
        self._fields = fields

    def lookup(self, key: bytes) -> Any:
        getter = self._fields.get(key.decode("utf-8", "replace"))
        return getter() if getter is not None else None


class _HeadersMap(LazyMap):
    """request.headers / response.headers / response.trailers: values of a key joined with ","."""

    def __init__(self, headers: "HeaderMap | None") -> None:
        self._headers = headers

    def lookup(self, key: bytes) -> Any:
        if self._headers is None:
            return None
        values = self._headers.get_all(key.decode("latin-1"))
        if not values:
            return None
        return ",".join(values).encode("latin-1")

    def items(self) -> list[tuple[Any, Any]]:
        # Each key once, with all its values joined (as Envoy 1.40 lists a header map).
        if self._headers is None:
            return []
        keys = dict.fromkeys(k.encode("latin-1") for k, _ in self._headers.items())
        return [(k, self.lookup(k)) for k in keys]


class _DictMap(LazyMap):
    """A plain mapping (metadata structs, filter state): listable."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def lookup(self, key: bytes) -> Any:
        value = self._data.get(key.decode("utf-8", "replace"), None)
        return _convert(value)

    def items(self) -> list[tuple[Any, Any]]:
        return [(k.encode(), _convert(v)) for k, v in self._data.items()]


def _convert(value: Any) -> Any:
    """Struct-like Python values as CEL sees them (numbers in a Struct are doubles)."""
    if isinstance(value, Mapping):
        return _DictMap(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return float(value)
    return value


def serialize_value(value: Any) -> tuple[WasmResult, bytes]:
    """Envoy serializeValue for the Python shapes properties produce."""
    try:
        return WasmResult.Ok, _serialize(value)
    except _Unlistable:
        return WasmResult.SerializationFailure, b""


def _serialize(value: Any) -> bytes:
    from .hostcalls import marshal_pairs  # pairs format lives with the host calls

    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return _U64.pack(value) if value >= 1 << 63 else _I64.pack(value)
    if isinstance(value, float):
        return _F64.pack(value)
    serialize = getattr(value, "SerializeToString", None)
    if serialize is not None:  # a protobuf message
        return bytes(serialize())
    if isinstance(value, LazyMap):
        return marshal_pairs([(_serialize(k), _serialize(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return marshal_pairs([(_serialize(v), b"") for v in value])
    raise _Unlistable  # null and anything else: Envoy's SerializationFailure


# -- declared properties and Envoy filter-state objects ---------------------------------------


@dataclass(frozen=True)
class CelStatePrototype:
    """declare_property's description of a proxy_set_property name (Envoy's CelStatePrototype).

    Only ``readonly`` changes behaviour here: values of every type are kept as their bytes, so a
    Protobuf/FlatBuffers property reads back serialized rather than field by field.
    """

    readonly: bool = False
    type: int = 0  # WasmType: Bytes, String, FlatBuffers, Protobuf
    schema: bytes = b""
    life_span: int = 0  # LifeSpan: FilterChain, DownstreamRequest, DownstreamConnection


class ReadonlyCelState(bytes):
    """A value set under a readonly declared name: a later set fails (Envoy CelState::setValue)."""


class OpaqueFilterStateObject:
    """A filter-state object with no string form: filter_state.<key> is NotFound for it."""


def _ip_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return False
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


def _ip(text: str) -> Any:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return f"[{address}]:0" if address.version == 6 else f"{address}:0"


def _digits(text: str) -> Any:
    return text if text.isdigit() and int(text) < 1 << 32 else None


def _as_text(text: str) -> str:
    """The objects that read back as their input."""
    return text


# Envoy 1.40's StreamInfo::FilterState::ObjectFactory registry (as set_envoy_filter_state sees
# it): key -> value text -> what filter_state.<key> reads back (None: the factory rejects it).
_FILTER_STATE_FACTORIES: dict[str, Callable[[str], Any]] = {
    "envoy.string": _as_text,
    "envoy.hashable_string": _as_text,
    "envoy.network.upstream_server_name": _as_text,
    "envoy.network.upstream_subject_alt_names": _as_text,
    "envoy.network.network_namespace": _as_text,
    "envoy.tcp_proxy.cluster": _as_text,
    "envoy.network.application_protocols": lambda text: OpaqueFilterStateObject(),
    "envoy.tcp_proxy.disable_tunneling": lambda text: "true" if text == "true" else "false",
    "envoy.network.ip": _ip,
    "envoy.network.transport_socket.original_dst_address": lambda text: "" if _ip_port(text) else None,
    "envoy.filters.listener.original_dst.local_ip": lambda text: "" if _ip_port(text) else None,
    "envoy.filters.listener.original_dst.remote_ip": lambda text: "" if _ip_port(text) else None,
    "envoy.ratelimit.hits_addend": _digits,
    "envoy.tcp_proxy.per_connection_idle_timeout_ms": _digits,
}


def create_filter_state_object(key: str, value: bytes) -> tuple[WasmResult, Any]:
    """ObjectFactory::createFromBytes: NotFound for an unknown key, BadArgument for a bad value."""
    factory = _FILTER_STATE_FACTORIES.get(key)
    if factory is None:
        return WasmResult.NotFound, None
    obj = factory(value.decode("utf-8", "replace"))
    if obj is None:
        return WasmResult.BadArgument, None
    return WasmResult.Ok, obj.encode() if isinstance(obj, str) else obj


# -- the attributes ----------------------------------------------------------------------------


def _addr(address: Any) -> Any:
    return str(address) if address is not None else None


class _StreamMap(LazyMap):
    """request / response: the attributes of a table built once (not a closure per attribute
    per lookup), each computed from this map's context, StreamInfo and header maps."""

    __slots__ = ("ctx", "info", "headers", "trailers")
    FIELDS: Mapping[str, Callable[[Any], Any]] = {}

    def __init__(self, ctx: "ContextBase", info: "StreamInfo", headers: "HeaderMap | None",
                 trailers: "HeaderMap | None" = None) -> None:
        self.ctx = ctx
        self.info = info
        self.headers = headers
        self.trailers = trailers

    def lookup(self, key: bytes) -> Any:
        getter = self.FIELDS.get(key.decode("utf-8", "replace"))
        return getter(self) if getter is not None else None


def _header(name: str) -> Callable[[_StreamMap], Any]:
    def get(m: _StreamMap) -> Any:
        if m.headers is None:
            return None
        value = m.headers.get(name)
        return value.encode("latin-1") if value is not None else None
    return get


def _path_part(m: _StreamMap, query: bool) -> Any:
    if m.headers is None:
        return None
    path = (m.headers.get(":path") or "").encode("latin-1")
    before, sep, after = path.partition(b"?")
    if not query:
        return before
    return after.partition(b"#")[0] if sep else b""


def _request_size(m: _StreamMap) -> Any:
    headers = m.headers
    if headers is not None and headers.get("content-length") is not None:
        try:
            return int(headers.get("content-length") or "")
        except ValueError:
            return None
    return m.info.bytes_received


def _request_duration(m: _StreamMap) -> Any:
    if not m.ctx.access_log_phase:
        return None  # Envoy: only once the request is complete
    return Duration(round(m.info.duration() * 1e6) * 1000)


def _headers_bytes(m: _StreamMap) -> int:
    return m.headers.byte_size() if m.headers is not None else 0


class _RequestMap(_StreamMap):
    __slots__ = ()
    FIELDS = {
        "path": _header(":path"),
        "url_path": lambda m: _path_part(m, False),
        "query": lambda m: _path_part(m, True),
        "host": _header(":authority"),
        "scheme": _header(":scheme"),
        "method": _header(":method"),
        "referer": _header("referer"),
        "useragent": _header("user-agent"),
        "id": _header("x-request-id"),
        "headers": lambda m: _HeadersMap(m.headers),
        "headers_bytes": _headers_bytes,
        # StreamInfo keeps float seconds: microseconds are exact, nanoseconds would not be.
        "time": lambda m: Timestamp(round(m.info.start_time * 1e6) * 1000),
        "duration": _request_duration,
        "size": _request_size,
        "total_size": lambda m: m.info.bytes_received + _headers_bytes(m),
        "protocol": lambda m: m.info.protocol or None,
    }


def _request(ctx: "ContextBase", info: "StreamInfo") -> LazyMap:
    headers = ctx.request_headers if ctx.request_headers is not None else ctx.access_log_request_headers
    return _RequestMap(ctx, info, headers)


def _response_flags(m: _StreamMap) -> int:
    bits = 0
    for flag in m.info.response_flags:
        bits |= RESPONSE_FLAG_BITS.get(flag, 0)
    return bits


def _grpc_status(m: _StreamMap) -> Any:
    for source in (m.trailers, m.headers):
        value = source.get("grpc-status") if source is not None else None
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _ResponseMap(_StreamMap):
    __slots__ = ()
    FIELDS = {
        "code": lambda m: m.info.response_code,
        "code_details": lambda m: m.info.response_code_details or None,
        "flags": _response_flags,
        "grpc_status": _grpc_status,
        "headers": lambda m: _HeadersMap(m.headers),
        "headers_bytes": _headers_bytes,
        "trailers": lambda m: _HeadersMap(m.trailers),
        "size": lambda m: m.info.bytes_sent,
        "total_size": lambda m: m.info.bytes_sent + _headers_bytes(m)
        + (m.trailers.byte_size() if m.trailers is not None else 0),
    }


def _response(ctx: "ContextBase", info: "StreamInfo") -> LazyMap:
    headers = ctx.response_headers if ctx.response_headers is not None else ctx.access_log_response_headers
    trailers = ctx.response_trailers if ctx.response_trailers is not None else ctx.access_log_response_trailers
    return _ResponseMap(ctx, info, headers, trailers)


def _connection(info: "StreamInfo") -> LazyMap:
    conn = info.connection
    return _FieldMap({
        "id": lambda: conn.id,
        "mtls": lambda: False,  # no client certificates yet
        "requested_server_name": lambda: conn.requested_server_name.encode(),
        "termination_details": lambda: conn.termination_details or None,
    })


def _upstream(info: "StreamInfo") -> LazyMap:
    host = info.upstream_host
    return _FieldMap({
        "address": lambda: _addr(host),
        "port": lambda: host.port if host is not None else None,
        "local_address": lambda: _addr(info.upstream_local_address),
        "transport_failure_reason": lambda: info.upstream_transport_failure_reason if host is not None else None,
        "request_attempt_count": lambda: info.attempt_count,
    })


def _peer(info: "StreamInfo", local: bool) -> LazyMap:
    conn = info.connection
    address = conn.local_address if local else (conn.direct_remote_address or conn.remote_address)
    return _FieldMap({"address": lambda: _addr(address), "port": lambda: address.port})


def _node(ctx: "ContextBase") -> Any:
    """The bootstrap node (Envoy always has one, possibly empty)."""
    node = ctx.wasm.environment.node if ctx.wasm is not None else None
    if node is None:
        from envoy.config.core.v3 import base_pb2

        node = base_pb2.Node()
    return node


def _xds(ctx: "ContextBase", info: "StreamInfo | None") -> LazyMap:
    if info is None:  # root contexts: only the node (Envoy's XDSWrapper without StreamInfo)
        return _FieldMap({"node": lambda: _node(ctx)})
    return _FieldMap({
        "node": lambda: _node(ctx),
        "cluster_name": lambda: info.upstream_cluster or None,
        "cluster_metadata": lambda: _metadata(info.cluster_metadata) if info.upstream_cluster else None,
        "route_name": lambda: info.route_name if info.route_name or info.route_resolved else None,
        "route_metadata": lambda: _metadata(info.route_metadata) if info.route_name or info.route_resolved else None,
        "listener_metadata": lambda: _metadata(info.listener_metadata),
        "listener_direction": lambda: 0,  # UNSPECIFIED: listeners carry no traffic direction yet
        "filter_chain_name": lambda: b"",
    })


def _metadata(filter_metadata: Mapping[str, Any]) -> LazyMap:
    """envoy.config.core.v3.Metadata as CEL sees it: {"filter_metadata": {ns: struct}}."""
    return _MetadataMap(filter_metadata)


class _MetadataMap(_DictMap):
    """Serializes as the Metadata proto (as Envoy does for the message), traverses as a map."""

    def __init__(self, filter_metadata: Mapping[str, Any]) -> None:
        super().__init__({"filter_metadata": filter_metadata})
        self._filter_metadata = filter_metadata

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf spelling _serialize looks for
        from envoy.config.core.v3 import base_pb2
        from google.protobuf import struct_pb2

        message = base_pb2.Metadata()
        for namespace, fields in self._filter_metadata.items():
            struct = struct_pb2.Struct()
            struct.update(fields)
            message.filter_metadata[namespace].CopyFrom(struct)
        return message.SerializeToString()

    def items(self) -> list[tuple[Any, Any]]:
        raise _Unlistable  # never listed: the message form is used instead


class _FilterStateMap(_DictMap):
    """filter_state.<full name>: readable by key, but not listable (Envoy: SerializationFailure)."""

    def lookup(self, key: bytes) -> Any:
        value = super().lookup(key)
        return None if isinstance(value, OpaqueFilterStateObject) else value

    def items(self) -> list[tuple[Any, Any]]:
        raise _Unlistable


def _filter_state(info: "StreamInfo") -> LazyMap:
    return _FilterStateMap(info.filter_state)


def _top_level(ctx: "ContextBase", name: bytes) -> Any:
    text = name.decode("utf-8", "replace")
    info = ctx.stream_info()
    wasm = ctx.wasm
    plugin = ctx.plugin
    if text == "plugin_name":
        return plugin.name.encode() if plugin is not None else None
    if text == "plugin_root_id":
        return (ctx.root_id if ctx.is_root_context() else plugin.root_id if plugin else "").encode()
    if text == "plugin_vm_id":
        return wasm.vm_id.encode() if wasm is not None else None
    if text == "xds":
        return _xds(ctx, info)
    if info is None:
        return None
    if text == "request":
        return _request(ctx, info)
    if text == "response":
        return _response(ctx, info)
    if text == "connection":
        return _connection(info)
    if text == "upstream":
        return _upstream(info)
    if text == "source":
        return _peer(info, local=False)
    if text == "destination":
        return _peer(info, local=True)
    if text == "metadata":
        return _metadata(info.dynamic_metadata)
    if text == "filter_state":
        return _filter_state(info)
    if text == "connection_id":
        return info.connection.id
    state = info.filter_state.get(CEL_STATE_PREFIX + text)
    return state


def _select(value: Any, part: bytes) -> Any:
    if isinstance(value, LazyMap):
        return value.lookup(part)
    if isinstance(value, (list, tuple)):
        try:
            index = int(part)
        except ValueError:
            return None
        return value[index] if 0 <= index < len(value) else None
    descriptor = getattr(value, "DESCRIPTOR", None)
    if descriptor is not None:  # a protobuf message: select a field by name
        field = descriptor.fields_by_name.get(part.decode("utf-8", "replace"))
        if field is None:
            return None
        result = getattr(value, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return _DictMap({k: v for k, v in result.items()})
        if hasattr(result, "extend"):  # a repeated field
            return list(result)
        return result
    return None


def get_property(ctx: "ContextBase", path: bytes) -> tuple[WasmResult, bytes]:
    """The serialized value at `path` for this context (NotFound if any segment is missing)."""
    parts = path.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()  # a trailing NUL ends the path
    if not parts:
        return WasmResult.SerializationFailure, b""  # Envoy serializes a null value
    value = _top_level(ctx, parts[0])
    for part in parts[1:]:
        if value is None:
            break
        value = _select(value, part)
    if value is None:
        return WasmResult.NotFound, b""
    return serialize_value(value)
