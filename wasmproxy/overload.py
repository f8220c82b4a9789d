"""Envoy's overload manager, for the one resource monitor wasmproxy supports:
``envoy.resource_monitors.global_downstream_max_connections``.

Envoy counts active downstream connections process-wide (all workers, all listeners but admin)
and, when ``max_active_downstream_connections`` are open, closes a newly accepted socket at once,
before any connection object or HCM stat exists, counting
``listener.<address>.downstream_global_cx_overflow``. Here the count is one lock-protected integer
shared by the workers, touched once per accept and once per close (never per request).
config/semantic.py rejects every other overload manager setting.
"""

from __future__ import annotations

import threading
from typing import Any

from .config.semantic import GLOBAL_DOWNSTREAM_MAX_CONNECTIONS

__all__ = ["DOWNSTREAM_CONNECTION_LIMIT_KEY", "DownstreamConnectionLimit", "downstream_connection_limit",
           "overflow_counter"]

# FactoryContext.extras key: the server's DownstreamConnectionLimit (absent or None: unlimited).
DOWNSTREAM_CONNECTION_LIMIT_KEY = "wasmproxy.overload.downstream_connection_limit"


class DownstreamConnectionLimit:
    """The process-wide active downstream connection count and its maximum. Any thread."""

    def __init__(self, max_active: int) -> None:
        self.max_active = max_active
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def try_allocate(self) -> bool:
        """Count one more connection; False (and nothing counted) when the maximum is reached."""
        with self._lock:
            if self._active >= self.max_active:
                return False
            self._active += 1
            return True

    def release(self) -> None:
        """A connection try_allocate admitted has closed."""
        with self._lock:
            self._active -= 1


def downstream_connection_limit(bootstrap: Any) -> DownstreamConnectionLimit | None:
    """The limit the bootstrap's global_downstream_max_connections monitor sets, or None."""
    from .config import registry

    for i, monitor in enumerate(bootstrap.overload_manager.resource_monitors):
        if monitor.name == GLOBAL_DOWNSTREAM_MAX_CONNECTIONS:
            path = f"overload_manager.resource_monitors[{i}].typed_config"
            config = registry.unpack(monitor.typed_config, path)
            return DownstreamConnectionLimit(config.max_active_downstream_connections)
    return None


def overflow_counter(store: Any, local_address: Any) -> Any:
    """The listener's downstream_global_cx_overflow counter (named after its address, as Envoy)."""
    from .http.conn_manager import _listener_stat_prefix
    from .network.connection import to_address

    return store.counter(f"listener.{_listener_stat_prefix(to_address(local_address))}.downstream_global_cx_overflow")
