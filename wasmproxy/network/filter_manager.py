"""FilterManager: one connection's read and write filter chains (Envoy's Network::FilterManagerImpl).

Read filters run in the order added. Each is initialized (``on_new_connection``) the first
time the chain reaches it, then gets ``on_data(read_buffer, end_stream)`` when the buffer has
bytes or the peer has half-closed. A filter answering StopIteration, or a connection that is
no longer open, stops the walk; ``continue_reading()`` from that filter resumes it at the next
one. Write filters run last-added first; StopIteration there keeps the data from the socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .filter import FilterStatus

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["FilterManager"]

_STOP = FilterStatus.StopIteration


class ActiveReadFilter:
    """A read filter in the chain; also the ReadFilterCallbacks that filter receives."""

    __slots__ = ("manager", "filter", "index", "initialized")

    def __init__(self, manager: "FilterManager", read_filter: Any, index: int) -> None:
        self.manager = manager
        self.filter = read_filter
        self.index = index
        self.initialized = False

    @property
    def connection(self) -> "Connection":
        return self.manager.connection

    def continue_reading(self) -> None:
        """Resume the read chain after this filter (Envoy's ReadFilterCallbacks::continueReading)."""
        self.manager.on_continue_reading(self.index + 1)


class WriteFilterCallbacks:
    """What a write filter receives (its connection)."""

    __slots__ = ("connection",)

    def __init__(self, connection: "Connection") -> None:
        self.connection = connection


class FilterManager:
    """The filters of one connection. Worker thread only."""

    __slots__ = ("connection", "_read", "_write")

    def __init__(self, connection: "Connection") -> None:
        self.connection = connection
        self._read: list[ActiveReadFilter] = []
        self._write: list[Any] = []

    def add_read_filter(self, read_filter: Any) -> None:
        active = ActiveReadFilter(self, read_filter, len(self._read))
        self._read.append(active)
        read_filter.initialize_read_filter_callbacks(active)

    def add_write_filter(self, write_filter: Any) -> None:
        # Envoy pushes write filters to the front: the last one added sees the data first.
        self._write.insert(0, write_filter)
        write_filter.initialize_write_filter_callbacks(WriteFilterCallbacks(self.connection))

    def add_filter(self, network_filter: Any) -> None:
        self.add_read_filter(network_filter)
        self.add_write_filter(network_filter)

    def initialize_read_filters(self) -> bool:
        """Start the chain on a new connection; False when there are no read filters."""
        if not self._read:
            return False
        self.on_continue_reading(0)
        return True

    def on_read(self) -> None:
        self.on_continue_reading(0)

    def on_continue_reading(self, start: int) -> None:
        connection = self.connection
        for active in self._read[start:]:
            if not active.initialized:
                active.initialized = True
                if active.filter.on_new_connection() == _STOP or not connection.is_open:
                    return
            buffer = connection.read_buffer
            end_stream = connection.read_end_stream
            if buffer or end_stream:
                if active.filter.on_data(buffer, end_stream) == _STOP or not connection.is_open:
                    return

    def on_write(self, data: bytearray, end_stream: bool) -> FilterStatus:
        for write_filter in self._write:
            if write_filter.on_write(data, end_stream) == _STOP:
                return FilterStatus.StopIteration
        return FilterStatus.Continue
