"""The per-worker connection handler a listener serves with, chosen from its network filters.

Envoy runs every listener through the network filter manager. Here a listener whose only
filter is the HTTP connection manager keeps the HCM's own asyncio protocol factory (its fast
path, no per-byte filter walk); any other chain is served by `ConnectionHandler`, which makes
one `Connection` per accepted socket and installs the filters on it (an HCM after other
filters becomes a terminal read filter, `hcm_filter.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..config.errors import ConfigError
from ..overload import DownstreamConnectionLimit
from .connection import Connection
from .filter import ConnectionCloseType, NetworkFilterFactoryCb
from .hcm_filter import hcm_filter_factory

if TYPE_CHECKING:
    from ..event.dispatcher import Dispatcher
    from ..stats.store import Store

__all__ = ["ConnectionHandler", "DEFAULT_BUFFER_LIMIT", "worker_handler_factory"]

# Envoy's default per_connection_buffer_limit_bytes (1 MiB).
DEFAULT_BUFFER_LIMIT = 1024 * 1024


class ConnectionHandler:
    """One worker's connections of one listener; calling it makes a Connection (a protocol factory)."""

    def __init__(self, filter_factories: list[NetworkFilterFactoryCb], dispatcher: "Dispatcher",
                 listener_name: str, buffer_limit: int, hcm_handlers: list[Any] | None = None,
                 connection_limit: DownstreamConnectionLimit | None = None, store: "Store | None" = None) -> None:
        self.filter_factories = filter_factories
        # The process-wide downstream connection limit (overload manager) and the worker's store.
        self.connection_limit = connection_limit
        self.store = store
        # The per-worker HCM handlers behind HCM filters of this chain (drain and close reach them).
        self.hcm_handlers = hcm_handlers or []
        self.dispatcher = dispatcher
        self.listener_name = listener_name
        self.buffer_limit = buffer_limit
        self.connections: set[Connection] = set()

    def __call__(self) -> Connection:
        return Connection(self)

    def drain(self) -> None:
        """L4 connections have no graceful end; they run until a side closes (as in Envoy).
        HTTP connections behind an HCM filter close after their current response."""
        for handler in self.hcm_handlers:
            handler.drain()

    def close_all(self) -> None:
        for connection in list(self.connections):
            connection.close(ConnectionCloseType.NoFlush)


def worker_handler_factory(
    factories: list[Any], listener_name: str, buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    connection_limit: DownstreamConnectionLimit | None = None,
) -> Callable[["Dispatcher", "Store"], Any]:
    """Main thread: ``(dispatcher, store) -> protocol factory`` for a listener's network filters.

    A chain that is the HCM alone uses its ``for_worker``; anything else gets a
    ConnectionHandler, with an HCM (which must be last: it is terminal) as a read filter.
    Either way accepted connections count against `connection_limit` (process-wide) if set.
    """
    if len(factories) == 1 and hasattr(factories[0], "for_worker"):
        hcm_for_worker: Callable[["Dispatcher", "Store"], Any] = factories[0].for_worker
        if connection_limit is None:
            return hcm_for_worker

        def hcm_alone(dispatcher: "Dispatcher", store: "Store") -> Any:
            handler = hcm_for_worker(dispatcher, store)
            handler.connection_limit = connection_limit
            return handler

        return hcm_alone
    if any(hasattr(f, "for_worker") for f in factories[:-1]):
        raise ConfigError("the http_connection_manager is a terminal filter: it must be the last in "
                          "its filter chain")

    def for_worker(dispatcher: "Dispatcher", store: "Store") -> ConnectionHandler:
        chain: list[NetworkFilterFactoryCb] = []
        hcm_handlers = []
        for factory in factories:
            if hasattr(factory, "for_worker"):
                handler = factory.for_worker(dispatcher, store)
                hcm_handlers.append(handler)
                chain.append(hcm_filter_factory(handler))
            else:
                chain.append(factory)
        return ConnectionHandler(chain, dispatcher, listener_name, buffer_limit, hcm_handlers, connection_limit, store)

    return for_worker
