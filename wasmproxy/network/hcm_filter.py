"""The HTTP connection manager as a terminal read filter, for chains where other network filters
run before it (e.g. ``[envoy.filters.network.wasm, http_connection_manager]``).

A listener whose only filter is the HCM never comes here (it serves the HCM's own protocol).
Otherwise the HCM's per-connection protocol is driven by the filter chain: bytes the earlier
filters let through are fed to it, and what it writes goes back through the connection, so
write filters (a Wasm network filter's on_write) see the HTTP responses. `HcmTransport` is the
small transport surface the HCM uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .filter import ConnectionCloseType, ConnectionEvent, FilterStatus, NetworkFilterFactoryCb

if TYPE_CHECKING:
    from .connection import Connection
    from .filter_manager import ActiveReadFilter, FilterManager

__all__ = ["HcmReadFilter", "HcmTransport", "hcm_filter_factory"]


class HcmTransport:
    """What the HCM's ConnectionManager calls on its transport, over a network Connection."""

    __slots__ = ("connection", "_paused", "_closing")

    def __init__(self, connection: "Connection") -> None:
        self.connection = connection
        self._paused = False
        self._closing = False

    def write(self, data: bytes) -> None:
        if not self._closing:
            self.connection.write(bytearray(data), False)

    def close(self) -> None:
        self._closing = True
        self.connection.close(ConnectionCloseType.FlushWrite)

    def abort(self) -> None:
        self._closing = True
        self.connection.close(ConnectionCloseType.NoFlush)

    def is_closing(self) -> bool:
        return self._closing or not self.connection.is_open

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self.connection.read_disable(True)

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.connection.read_disable(False)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The connection keeps its own limits (the listener's per_connection_buffer_limit_bytes)."""

    def get_write_buffer_size(self) -> int:
        return self.connection.write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.connection.transport.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        return False


class HcmReadFilter:
    """Feeds one connection's bytes to an HCM protocol (a ConnectionManager)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def initialize_read_filter_callbacks(self, callbacks: "ActiveReadFilter") -> None:
        connection = callbacks.connection
        connection.add_connection_callbacks(self)
        self.protocol.connection_made(HcmTransport(connection))

    def on_new_connection(self) -> FilterStatus:
        return FilterStatus.Continue

    def on_data(self, data: bytearray, end_stream: bool) -> FilterStatus:
        if data:
            chunk = bytes(data)
            data.clear()
            self.protocol.data_received(chunk)
        return FilterStatus.StopIteration

    def on_event(self, event: ConnectionEvent) -> None:
        if event != ConnectionEvent.Connected:
            self.protocol.connection_lost(None)

    def on_above_write_buffer_high_watermark(self) -> None:
        self.protocol.pause_writing()

    def on_below_write_buffer_low_watermark(self) -> None:
        self.protocol.resume_writing()


def hcm_filter_factory(worker_handler: Any) -> NetworkFilterFactoryCb:
    """Worker: a network filter factory over the HCM's per-worker handler (its protocol factory)."""

    def factory(filter_manager: "FilterManager") -> None:
        filter_manager.add_read_filter(HcmReadFilter(worker_handler()))

    return factory
