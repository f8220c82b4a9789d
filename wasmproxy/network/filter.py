"""The network (L4) filter API, Envoy's envoy/network/filter.h and connection.h cut to size.

A network filter factory (`NetworkFilterFactoryCb`) runs once per downstream connection on
the connection's worker and adds filters to the connection's `FilterManager`:
``add_read_filter(f)``, ``add_write_filter(f)`` or ``add_filter(f)`` (both).

Read filters, in configuration order:
  ``initialize_read_filter_callbacks(callbacks: ReadFilterCallbacks)``,
  ``on_new_connection() -> FilterStatus`` and ``on_data(data: bytearray, end_stream) -> FilterStatus``.
  ``data`` is the connection's read buffer: what a filter leaves in it stays there and is
  seen again, with later bytes appended, on the next ``on_data`` (Envoy's semantics).
Write filters, in reverse order: ``initialize_write_filter_callbacks(callbacks)`` and
  ``on_write(data: bytearray, end_stream) -> FilterStatus``.
Connection events reach whoever called ``connection.add_connection_callbacks(cb)``:
  ``on_event(ConnectionEvent)``, ``on_above_write_buffer_high_watermark()``,
  ``on_below_write_buffer_low_watermark()``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from .connection import Connection
    from .filter_manager import FilterManager

__all__ = [
    "ConnectionCallbacks",
    "ConnectionCloseType",
    "ConnectionEvent",
    "FilterStatus",
    "NetworkFilterFactoryCb",
    "ReadFilterCallbacks",
]


class FilterStatus(enum.IntEnum):
    """Network::FilterStatus: go on to the next filter, or stop here until continue_reading()."""

    Continue = 0
    StopIteration = 1


class ConnectionCloseType(enum.Enum):
    """Network::ConnectionCloseType."""

    FlushWrite = "flush_write"  # send what is buffered, then close
    NoFlush = "no_flush"  # close now, dropping buffered writes
    Abort = "abort"  # close now with a reset


class ConnectionEvent(enum.Enum):
    """Network::ConnectionEvent (the ones a plain TCP connection raises)."""

    RemoteClose = "remote_close"
    LocalClose = "local_close"
    Connected = "connected"


class ConnectionCallbacks(Protocol):
    def on_event(self, event: ConnectionEvent) -> None: ...
    def on_above_write_buffer_high_watermark(self) -> None: ...
    def on_below_write_buffer_low_watermark(self) -> None: ...


class ReadFilterCallbacks(Protocol):
    """What a read filter gets: its connection and a way to resume the chain after it."""

    connection: "Connection"

    def continue_reading(self) -> None: ...


NetworkFilterFactoryCb = Callable[["FilterManager"], None]
