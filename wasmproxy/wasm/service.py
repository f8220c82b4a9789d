"""envoy.bootstrap.wasm: a WasmService, a Proxy-Wasm plugin with no stream, started with the server.

Envoy's WasmServiceExtension (source/extensions/bootstrap/wasm/config.cc). Only the plugin's
root context runs: proxy_on_vm_start, proxy_on_configure, then whatever it arms (ticks,
http_call answers, shared-queue wake-ups). ``singleton: true`` runs one instance on the main
thread's dispatcher; ``singleton: false`` one per thread (main and every worker), through a
ThreadLocal slot, as Envoy. Plugins sharing its ``vm_id`` (HTTP or network filters) see
the same SharedData and can reach its shared queues.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .plugin import PluginConfig

if TYPE_CHECKING:
    from ..server_context import FactoryContext
    from .wasm import Wasm

__all__ = ["WasmService", "create_wasm_service"]


class WasmService:
    """A started WasmService; the server keeps it for its lifetime (its VMs live as long)."""

    def __init__(self, proto: Any, context: "FactoryContext") -> None:
        self.singleton = bool(proto.singleton)
        self.plugin_config = PluginConfig(proto.config, context, singleton=self.singleton)

    def wasm(self) -> "Wasm | None":
        """The calling thread's Wasm of this service (main's for a singleton), or None."""
        return self.plugin_config.wasm()


def create_wasm_service(proto: Any, context: "FactoryContext") -> WasmService:
    """Main thread, at start: envoy.extensions.wasm.v3.WasmService -> a running service.

    Raises ConfigError when the plugin cannot be loaded ("Unable to create Wasm plugin <name>").
    """
    return WasmService(proto, context)
