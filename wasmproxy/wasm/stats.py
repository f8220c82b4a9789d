"""The wasm.* stats Envoy keeps about VMs and plugins, under Envoy's exact names.

* ``wasm.<runtime>.created`` / ``wasm.<runtime>.active`` and ``wasm.wasm_vm_count``
  (LifecycleStatsHandler): every Wasm, base, canary or per-thread clone, counts once when
  created; active goes down when it is destroyed. ``<runtime>`` is the configured runtime
  name (``envoy.wasm.runtime.v8``), so dashboards built on Envoy keep working.
* ``wasm.remote_load_cache_*`` (CreateStatsHandler): the remote-code cache.
* ``wasm.<plugin name>.vm_reload{,_backoff,_success,_failure}`` (StatsHandler): FAIL_RELOAD.
* ``wasmproxy.wasm.contexts_active`` (ours): contexts of live VMs, for leak checks.

Plugin-defined metrics are not here: the host core stores them as ``wasmcustom.<name>``.

Lifecycle and remote-cache stats live in the main thread's Store and may be touched from any
thread (a VM is destroyed where its last holder lets go), so they are updated under one lock.
Plugin reload stats are per worker (each thread's Store; admin sums them).
"""

from __future__ import annotations

import threading
from typing import Any

from ..stats.store import Gauge, ImportMode

__all__ = ["CONTEXTS_ACTIVE", "DEFAULT_RUNTIME", "ContextsActive", "LifecycleStats", "OpenContexts", "PluginStats",
           "RemoteLoadStats"]

DEFAULT_RUNTIME = "envoy.wasm.runtime.v8"
CONTEXTS_ACTIVE = "wasmproxy.wasm.contexts_active"

_lock = threading.Lock()


class LifecycleStats:
    """created / active for one runtime, plus the process-wide wasm_vm_count. Any thread."""

    def __init__(self, store: Any, runtime: str = DEFAULT_RUNTIME) -> None:
        prefix = f"wasm.{runtime or DEFAULT_RUNTIME}."
        self.created = store.counter(prefix + "created")
        self.active = store.gauge(prefix + "active", ImportMode.NEVER_IMPORT)
        self.vm_count = store.gauge("wasm.wasm_vm_count", ImportMode.NEVER_IMPORT)
        self.contexts = ContextsActive(store)

    def on_vm_created(self) -> None:
        with _lock:
            self.created.inc()
            self.active.inc()
            self.vm_count.inc()

    def on_vm_shutdown(self) -> None:
        with _lock:
            self.active.dec()
            self.vm_count.dec()


class OpenContexts:
    """One VM's count of its contexts not yet released. Written by the VM's owner thread only
    (a plain int: no lock, no call per stream); read by ``contexts_active`` on main."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class _ContextsGauge(Gauge):
    """A gauge whose value is computed when read: the sum of the attached VMs' counts, plus
    whatever set/inc/dec added on top (a Gauge's interface, so admin and tests read it as one)."""

    __slots__ = ("_base", "_counts")

    def __init__(self, name: str) -> None:
        self._base = 0
        self._counts: list[OpenContexts] = []
        super().__init__(name, ImportMode.NEVER_IMPORT)

    def _get_value(self) -> int:
        return self._base + sum(c.n for c in list(self._counts))

    def _set_value(self, v: int) -> None:
        self._base += v - self._get_value()

    value = property(_get_value, _set_value)  # type: ignore[assignment]


class ContextsActive:
    """``wasmproxy.wasm.contexts_active``: contexts of live VMs not yet released (VM, root and
    stream contexts). Not an Envoy stat, hence not under ``wasm.``; the soak test's leak check.
    Any thread.

    Each VM counts its own contexts in an `OpenContexts` (per stream, on its owner thread,
    without the lock); the gauge sums the attached counts when /stats reads it.
    """

    def __init__(self, store: Any) -> None:
        with _lock:
            gauge = store.gauges.get(CONTEXTS_ACTIVE)
            if not isinstance(gauge, _ContextsGauge):
                summed = _ContextsGauge(CONTEXTS_ACTIVE)
                if gauge is not None:  # created as a plain gauge first: keep what it holds
                    summed.value, summed.used = gauge.value, gauge.used
                store.gauges[CONTEXTS_ACTIVE] = gauge = summed
        self.gauge: _ContextsGauge = gauge

    def attach(self, counts: OpenContexts) -> None:
        """Count `counts` in the gauge from now on (a VM's, when its handle is created)."""
        with _lock:
            self.gauge._counts.append(counts)
            self.gauge.used = True

    def detach(self, counts: OpenContexts) -> None:
        """Stop counting `counts` (its VM closed)."""
        with _lock:
            counts_list = self.gauge._counts
            for i, c in enumerate(counts_list):
                if c is counts:
                    del counts_list[i]
                    break


class RemoteLoadStats:
    """wasm.remote_load_* (Envoy creates them whenever a plugin is created). Any thread."""

    def __init__(self, store: Any) -> None:
        self.cache_hits = store.counter("wasm.remote_load_cache_hits")
        self.cache_negative_hits = store.counter("wasm.remote_load_cache_negative_hits")
        self.cache_misses = store.counter("wasm.remote_load_cache_misses")
        self.fetch_successes = store.counter("wasm.remote_load_fetch_successes")
        self.fetch_failures = store.counter("wasm.remote_load_fetch_failures")
        self.cache_entries = store.gauge("wasm.remote_load_cache_entries", ImportMode.NEVER_IMPORT)

    def inc(self, counter: Any) -> None:
        with _lock:
            counter.inc()

    def set_entries(self, n: int) -> None:
        with _lock:
            self.cache_entries.set(n)


class PluginStats:
    """wasm.<plugin name>.vm_reload* in one thread's Store (that thread only)."""

    def __init__(self, store: Any, plugin_name: str) -> None:
        prefix = f"wasm.{plugin_name}."
        self.vm_reload = store.counter(prefix + "vm_reload")
        self.vm_reload_backoff = store.counter(prefix + "vm_reload_backoff")
        self.vm_reload_success = store.counter(prefix + "vm_reload_success")
        self.vm_reload_failure = store.counter(prefix + "vm_reload_failure")
