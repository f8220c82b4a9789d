"""Connection: one downstream TCP connection running a network filter chain (Envoy's ConnectionImpl).

An asyncio Protocol on its worker's loop. Bytes read are appended to ``read_buffer`` and the
read filters run over it; ``write(data, end_stream)`` runs the write filters, then sends. With
half-close enabled (tcp_proxy enables it) a peer's FIN reaches the filters as
``end_stream=True`` and the socket closes only once both directions have ended; without it a
FIN closes the connection (RemoteClose). ``read_disable`` nests, as Envoy's readDisable.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from typing import TYPE_CHECKING, Any

from ..http.stream_info import Address, ConnectionInfo, StreamInfo
from .filter import ConnectionCallbacks, ConnectionCloseType, ConnectionEvent
from ..overload import DownstreamConnectionLimit, overflow_counter
from .filter_manager import FilterManager

if TYPE_CHECKING:
    from .listener import ConnectionHandler

__all__ = ["Connection", "ConnectionStats", "to_address"]

_ids = itertools.count(1)


class ConnectionStats:
    """Counters a filter asks the connection to keep (Envoy's Connection::ConnectionStats)."""

    __slots__ = ("rx_bytes_total", "tx_bytes_total")

    def __init__(self, rx_bytes_total: Any, tx_bytes_total: Any) -> None:
        self.rx_bytes_total = rx_bytes_total
        self.tx_bytes_total = tx_bytes_total


def to_address(sockaddr: Any) -> Address:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return Address(str(sockaddr[0]), int(sockaddr[1]))
    return Address(str(sockaddr or ""), 0)


class Connection(asyncio.Protocol):
    """A downstream connection and its FilterManager. Worker thread only."""

    def __init__(self, handler: "ConnectionHandler") -> None:
        self.handler = handler
        self.dispatcher = handler.dispatcher
        self.id = next(_ids)
        self.transport: Any = None
        self.read_buffer = bytearray()
        self.read_end_stream = False
        self.write_end_stream = False
        self.half_close_enabled = False
        self.is_open = True
        # The peer reset the connection (Envoy's DetectedCloseType::RemoteReset).
        self.remote_reset = False
        self.stats: ConnectionStats | None = None
        self.stream_info: StreamInfo | None = None
        self.filter_manager = FilterManager(self)
        self._callbacks: list[ConnectionCallbacks] = []
        self._read_disable_count = 0
        self._read_end_stream_raised = False
        # Bytes (and a FIN) that arrived while reading was disabled: uvloop starts reading after
        # connection_made even when it was paused there, so they are held as if still unread.
        self._unread = bytearray()
        self._unread_eof = False
        # The connection limit this connection counts against, released when the socket is gone.
        self._limit: DownstreamConnectionLimit | None = None

    # -- the Connection API filters use ------------------------------------------------------

    def add_connection_callbacks(self, callbacks: ConnectionCallbacks) -> None:
        self._callbacks.append(callbacks)

    def enable_half_close(self, enabled: bool) -> None:
        self.half_close_enabled = enabled

    def set_connection_stats(self, stats: ConnectionStats) -> None:
        self.stats = stats

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def write(self, data: bytearray, end_stream: bool) -> None:
        """Send `data` (drained from it) through the write filters; end_stream half-closes."""
        if not self.is_open or self.write_end_stream:
            return
        if self.filter_manager.on_write(data, end_stream) != 0:  # StopIteration: the filter holds it
            return
        if data:
            if self.stats is not None:
                self.stats.tx_bytes_total.inc(len(data))
            self.stream_info.bytes_sent += len(data)  # type: ignore[union-attr]
            self.transport.write(bytes(data))
            data.clear()
        if end_stream:
            self.write_end_stream = True
            if self.read_end_stream:
                self._close_socket(ConnectionEvent.LocalClose, flush=True)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def read_disable(self, disable: bool) -> None:
        if disable:
            self._read_disable_count += 1
            if self._read_disable_count == 1 and self.is_open:
                self.transport.pause_reading()
        elif self._read_disable_count > 0:
            self._read_disable_count -= 1
            if self._read_disable_count == 0 and self.is_open:
                self.transport.resume_reading()
                if self._unread or self._unread_eof:
                    # Envoy re-arms the read event: the held bytes are read on a later loop turn.
                    self.dispatcher.post(self._read_unread)

    def _read_unread(self) -> None:
        if not self.is_open or self._read_disable_count:
            return
        data, self._unread = self._unread, bytearray()
        if data:
            self.data_received(bytes(data))
        if self._unread_eof and self.is_open:
            self._unread_eof = False
            if not self.eof_received():
                self._close_socket(ConnectionEvent.RemoteClose, flush=True)

    @property
    def reading_enabled(self) -> bool:
        return self._read_disable_count == 0

    def close(self, close_type: ConnectionCloseType) -> None:
        """Close from this side; callbacks see LocalClose. Abort sends a reset."""
        if self.is_open:
            if close_type == ConnectionCloseType.Abort:
                self._set_linger_zero()
            self._close_socket(ConnectionEvent.LocalClose, flush=close_type == ConnectionCloseType.FlushWrite)

    def _set_linger_zero(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    # -- internals ----------------------------------------------------------------------------

    def _close_socket(self, event: ConnectionEvent, *, flush: bool) -> None:
        self.is_open = False
        if self._unread and not flush:
            # Closing over unread bytes resets the connection (what the kernel does for Envoy).
            self._set_linger_zero()
        if flush:
            self.transport.close()
        else:
            self.transport.abort()
        self.handler.connections.discard(self)
        for cb in list(self._callbacks):
            cb.on_event(event)

    def _on_read(self) -> None:
        if self.read_end_stream:
            if self._read_end_stream_raised:
                return
            self._read_end_stream_raised = True
        elif not self.read_buffer:
            return
        self.filter_manager.on_read()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        limit = self.handler.connection_limit
        if limit is not None:
            if not limit.try_allocate():
                # Envoy closes the socket before any connection (or filter) exists.
                overflow_counter(self.handler.store, transport.get_extra_info("sockname")).inc()
                self.is_open = False
                transport.abort()
                return
            self._limit = limit
        limit = self.handler.buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass
        time_source = self.dispatcher.time_source
        info = ConnectionInfo(id=self.id, local_address=to_address(transport.get_extra_info("sockname")),
                              remote_address=to_address(transport.get_extra_info("peername")))
        info.direct_remote_address = info.remote_address
        self.stream_info = StreamInfo(info, start_time=time_source.system_time(),
                                      start_monotonic=time_source.monotonic(), protocol="",
                                      listener_name=self.handler.listener_name)
        self.handler.connections.add(self)
        for factory in self.handler.filter_factories:
            factory(self.filter_manager)
        if not self.filter_manager.initialize_read_filters():
            # Envoy closes a connection whose filter chain has no read filter.
            self.close(ConnectionCloseType.NoFlush)

    def data_received(self, data: bytes) -> None:
        if not self.is_open:
            return
        if self._read_disable_count:
            self._unread += data
            self.transport.pause_reading()
            return
        if self.stats is not None:
            self.stats.rx_bytes_total.inc(len(data))
        self.read_buffer += data
        # Envoy adds the read buffer's length per read: bytes a filter held are counted again.
        self.stream_info.bytes_received += len(self.read_buffer)  # type: ignore[union-attr]
        self._on_read()

    def eof_received(self) -> bool:
        if not self.is_open:
            return False
        if self._read_disable_count:
            self._unread_eof = True
            return True
        if not self.half_close_enabled:
            self._close_socket(ConnectionEvent.RemoteClose, flush=True)
            return False
        self.read_end_stream = True
        self._on_read()
        if self.is_open and self.write_end_stream:
            self._close_socket(ConnectionEvent.RemoteClose, flush=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._limit is not None:
            self._limit.release()
            self._limit = None
        if self.is_open:
            self.remote_reset = isinstance(exc, ConnectionResetError)
            self._close_socket(ConnectionEvent.RemoteClose, flush=False)

    def pause_writing(self) -> None:
        for cb in list(self._callbacks):
            cb.on_above_write_buffer_high_watermark()

    def resume_writing(self) -> None:
        for cb in list(self._callbacks):
            cb.on_below_write_buffer_low_watermark()
