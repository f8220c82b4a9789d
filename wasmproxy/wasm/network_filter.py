"""envoy.filters.network.wasm: a Proxy-Wasm plugin as a network (L4) filter (the bridge).

Envoy's network wasm FilterConfig + Context as a Network::Filter (source/extensions/filters/
network/wasm/, common/wasm/context.cc). One stream context per downstream connection:

* ``on_new_connection`` -> proxy_context_create + proxy_on_new_connection;
* read side ``on_data`` -> proxy_on_downstream_data over the connection's read buffer (the
  plugin reads and rewrites it as DOWNSTREAM_DATA); write side ``on_write`` ->
  proxy_on_upstream_data over the bytes going downstream (UPSTREAM_DATA); when those carry
  the upstream's end of stream the plugin also gets proxy_on_upstream_connection_close
  (Envoy reports the upstream close there, not from an upstream connection event);
* the downstream connection's close -> proxy_on_downstream_connection_close(Local|Remote),
  then proxy_on_done, proxy_on_log, proxy_on_delete;
* continue_stream(DOWNSTREAM) resumes reading (continueReading); continue_stream(UPSTREAM)
  is Unimplemented (the host core answers it); close_stream(either) closes the downstream
  connection with FlushWrite, as Envoy.

Failure policy as the HTTP filter: FAIL_OPEN leaves the filter out, FAIL_CLOSED closes the
connection. Worker thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..network.filter import ConnectionCloseType, ConnectionEvent, FilterStatus, NetworkFilterFactoryCb
from .abi import CloseType, WasmStreamType
from .context import ContextBase, StreamEnvironment
from .plugin import PluginConfig

if TYPE_CHECKING:
    from ..http.stream_info import StreamInfo
    from ..network.filter_manager import ActiveReadFilter, FilterManager, WriteFilterCallbacks
    from ..server_context import FactoryContext

__all__ = ["WasmNetworkFilter", "create_wasm_network_filter_factory"]

_CLOSE_TYPES = {ConnectionEvent.LocalClose: CloseType.Local, ConnectionEvent.RemoteClose: CloseType.Remote}


class WasmNetworkFilter(StreamEnvironment):
    """One connection's read+write filter over its stream context."""

    __slots__ = ("context", "read_callbacks", "connection")

    def __init__(self) -> None:
        self.context: ContextBase | None = None
        self.read_callbacks: "ActiveReadFilter | None" = None
        self.connection: Any = None

    # -- StreamEnvironment (called by the host core, after the VM call returns) -------------

    @property  # type: ignore[override]
    def stream_info(self) -> "StreamInfo | None":
        return self.connection.stream_info if self.connection is not None else None

    def continue_stream(self, stream_type: WasmStreamType) -> None:
        if stream_type == WasmStreamType.Downstream and self.read_callbacks is not None:
            self.read_callbacks.continue_reading()

    def close_stream(self, stream_type: WasmStreamType) -> None:
        if stream_type in (WasmStreamType.Downstream, WasmStreamType.Upstream) and self.connection is not None:
            self.connection.close(ConnectionCloseType.FlushWrite)

    # -- the network filter API ---------------------------------------------------------------

    def initialize_read_filter_callbacks(self, callbacks: "ActiveReadFilter") -> None:
        self.read_callbacks = callbacks
        self.connection = callbacks.connection
        self.connection.add_connection_callbacks(self)

    def initialize_write_filter_callbacks(self, callbacks: "WriteFilterCallbacks") -> None:
        self.connection = callbacks.connection

    def on_new_connection(self) -> FilterStatus:
        assert self.context is not None
        return FilterStatus(self.context.on_new_connection())

    def on_data(self, data: bytearray, end_stream: bool) -> FilterStatus:
        assert self.context is not None
        return FilterStatus(self.context.on_data(data, end_stream))

    def on_write(self, data: bytearray, end_stream: bool) -> FilterStatus:
        assert self.context is not None
        return FilterStatus(self.context.on_write(data, end_stream))

    # -- ConnectionCallbacks -------------------------------------------------------------------

    def on_event(self, event: ConnectionEvent) -> None:
        context = self.context
        close_type = _CLOSE_TYPES.get(event)
        if context is None or close_type is None:
            return
        context.downstream_connection_closed(close_type)
        # The connection is over: break the filter <-> context cycle.
        context.env = None
        self.context = None

    def on_above_write_buffer_high_watermark(self) -> None:
        pass

    def on_below_write_buffer_low_watermark(self) -> None:
        pass


def create_wasm_network_filter_factory(proto: Any, context: "FactoryContext") -> NetworkFilterFactoryCb:
    """Main thread: envoy.extensions.filters.network.wasm.v3.Wasm -> a per-connection factory.

    Raises ConfigError when the plugin cannot be loaded ("Unable to create Wasm plugin <name>").
    """
    config = PluginConfig(proto.config, context)

    def factory(filter_manager: "FilterManager") -> None:
        wasm_filter = WasmNetworkFilter()
        stream_context = config.create_context(wasm_filter)
        if stream_context is None:  # FAIL_OPEN and no VM: the connection runs without the plugin
            return
        wasm_filter.context = stream_context
        filter_manager.add_filter(wasm_filter)

    return factory
