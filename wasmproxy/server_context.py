"""FactoryContext: what every extension factory (HCM, filters, access loggers, Wasm) receives.

Envoy's Server::Configuration::FactoryContext, cut to what wasmproxy's factories
use. Factories run on the main thread; what they return runs on workers and
must reach per-thread state through `thread_local` slots or `store_for`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .event.dispatcher import Dispatcher
    from .stats.registry import StatsRegistry
    from .stats.store import Store
    from .thread_local import ThreadLocalInstance
    from .upstream.cluster_manager import ClusterManager


@dataclass(slots=True)
class LocalInfo:
    """The node this proxy runs as (bootstrap `node`, overridden by --service-* flags)."""

    node_id: str = ""
    cluster: str = ""
    zone: str = ""
    # The bootstrap's envoy.config.core.v3.Node message (Wasm's `node` property reads it).
    node: Any = None


@dataclass(slots=True)
class FactoryContext:
    main_dispatcher: "Dispatcher"
    thread_local: "ThreadLocalInstance"
    cluster_manager: "ClusterManager"
    # None outside the Server (see standalone_factory_context).
    stats: "StatsRegistry | None"
    # The stats Store of the thread a dispatcher runs (main's for the main dispatcher).
    store_for: Callable[["Dispatcher"], "Store"]
    local_info: LocalInfo
    bootstrap: Any
    # Set while building a listener's filters: its name and direction (Wasm listener_direction).
    listener_name: str = ""
    listener_direction: int = 0
    # Called with (message) to stop the server (admin /quitquitquit, fatal plugin errors).
    shutdown: Callable[[], None] = lambda: None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def main_store(self) -> "Store":
        return self.store_for(self.main_dispatcher)


def standalone_factory_context(main_dispatcher: Any, cluster_manager: Any, store: "Store") -> FactoryContext:
    """A FactoryContext for hosting plugins outside the Server (the pytest harness, the ASGI
    middleware): one thread, whose dispatcher is `main_dispatcher`, and one Store; no node."""
    from .thread_local import ThreadLocalInstance

    return FactoryContext(main_dispatcher=main_dispatcher, thread_local=ThreadLocalInstance(main_dispatcher),
                          cluster_manager=cluster_manager, stats=None, store_for=lambda _dispatcher: store,
                          local_info=LocalInfo(), bootstrap=None)
