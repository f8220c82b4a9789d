"""vm_key, the process-wide base-VM cache, per-thread clones and the configuration canary.

cpp-host src/wasm.cc (makeVmKey, createWasm, WasmHandleBase::canary, getOrCreateThreadLocalWasm):

* ``make_vm_key(vm_id, vm_configuration, code)``: plugins whose three agree share one base VM.
* `create_wasm` (main thread): look the vm_key up in a process-wide cache of *weak*
  references, under a lock; on a miss create the base `Wasm` and initialize it (link,
  ``_initialize``/``_start``). Then, hit or miss, run the canary: clone the base, start and
  configure the plugin on the throwaway clone, and reject the plugin if either says no.
* `get_or_create_thread_local_wasm` (any thread): this thread's clone of a base VM, from a
  thread-local weak cache; a clone that failed is never handed out again, so the next caller
  builds a fresh one from the base (how a VM that trapped is replaced, on that thread only).

A `WasmHandle` owns one `Wasm`. Python frees a Wasm only through the cycle collector, so the
handle (which is in no cycle) closes its Wasm the moment the last holder drops it, exactly
when cpp-host's shared_ptr would, and keeps the wasm.* lifecycle stats right.

Every Wasm is created with the `WasmThread` of the thread it will run on: each per-thread
clone has its own Store (wasmtime), timers, stats store and callout environment.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..log import get_logger
from .abi import FailState
from .context import Plugin, WasmEnvironment
from .runtime import WasmModule
from .sandbox import SandboxLimits
from .stats import LifecycleStats
from .wasm import Timer, Wasm

__all__ = [
    "WasmHandle",
    "WasmThread",
    "create_wasm",
    "get_or_create_thread_local_wasm",
    "make_vm_key",
]

_log = get_logger("wasm")


def make_vm_key(vm_id: str, vm_configuration: bytes, code: bytes) -> str:
    """Upper-case hex SHA-256 of ``vm_id || "||" || vm_configuration || "||" || code`` (cpp-host)."""
    h = hashlib.sha256()
    for part in (vm_id.encode(), b"||", vm_configuration, b"||", code):
        h.update(part)
    return h.hexdigest().upper()


@dataclass(frozen=True)
class WasmThread:
    """What a Wasm takes from the thread it runs on (its Dispatcher, Store, cluster manager)."""

    post: Callable[[Callable[[], None]], None]
    timer_factory: Callable[[Callable[[], None]], Timer] | None = None
    stats_store: Any = None
    environment: WasmEnvironment | None = None
    time_source: Any = None


class WasmHandle:
    """Owns one Wasm; closes it (and counts it out of ``active``) when the last holder lets go.

    A clone holds its base's handle, so a base VM lives as long as any of its clones.
    """

    __slots__ = ("wasm", "base", "lifecycle", "_finalizer", "__weakref__")

    def __init__(self, wasm: Wasm, lifecycle: LifecycleStats, base: "WasmHandle | None" = None) -> None:
        """On the thread the Wasm will run on (its owner)."""
        self.wasm = wasm
        self.base = base
        self.lifecycle = lifecycle
        lifecycle.on_vm_created()
        wasm.attach_contexts_gauge(lifecycle.contexts)
        self._finalizer = weakref.finalize(self, _destroy, wasm, lifecycle, threading.get_ident())
        # At interpreter exit the process is going: no calls into plugins from whatever thread is left.
        self._finalizer.atexit = False

    def kill(self) -> None:
        """Destroy the Wasm now (the canary), instead of when the handle is collected."""
        self._finalizer()


def _destroy(wasm: Wasm, lifecycle: LifecycleStats, owner_thread: int) -> None:
    """Close the Wasm on its own thread (a VM is only ever entered there)."""
    lifecycle.on_vm_shutdown()
    if threading.get_ident() == owner_thread:
        wasm.close()
        return
    try:
        wasm.post(wasm.close)
    except Exception:  # the owner's dispatcher is gone: the VM just goes with the garbage
        _log.debug("wasm %s released after its thread ended", wasm.vm_id)


# -- the process-wide base-VM cache -----------------------------------------------------------

_base_wasms: dict[str, "weakref.ref[WasmHandle]"] = {}
_base_wasms_lock = threading.Lock()


def create_wasm(
    vm_key: str,
    module: WasmModule,
    plugin: Plugin,
    *,
    thread: WasmThread,
    lifecycle: LifecycleStats,
    envs: Mapping[str, str] | None = None,
    limits: SandboxLimits | None = None,
    allowed_capabilities: frozenset[str] = frozenset(),
) -> WasmHandle | None:
    """Main thread: the base VM for `vm_key` (shared or new), after a canary run of `plugin`.

    None when the code cannot be initialized or the plugin does not start and configure
    (the reasons are logged, with cpp-host's words).
    """
    with _base_wasms_lock:
        ref = _base_wasms.get(vm_key)
        handle = ref() if ref is not None else None
        if handle is None:
            _base_wasms.pop(vm_key, None)
            wasm = Wasm(
                module, post=thread.post, vm_id=plugin.vm_id, vm_configuration=plugin.vm_configuration,
                vm_key=vm_key, envs=envs, timer_factory=thread.timer_factory, stats_store=thread.stats_store,
                environment=thread.environment, time_source=thread.time_source, limits=limits,
                allowed_capabilities=allowed_capabilities)
            handle = WasmHandle(wasm, lifecycle)
            if not wasm.initialize():
                wasm.fail(FailState.UnableToInitializeCode, "Failed to initialize Wasm code")
                return None
            _base_wasms[vm_key] = weakref.ref(handle)
    if not _canary(handle, plugin, thread):
        return None
    return handle


def _canary(base: WasmHandle, plugin: Plugin, thread: WasmThread) -> bool:
    """Start and configure `plugin` once on a throwaway clone (WasmHandleBase::canary).

    The canary gets no timers: it is destroyed before anything could fire.
    """
    canary = WasmHandle(base.wasm.clone(post=thread.post, stats_store=thread.stats_store,
                                        environment=thread.environment, time_source=thread.time_source),
                        base.lifecycle, base)
    try:
        wasm = canary.wasm
        if not wasm.initialize():
            wasm.fail(FailState.UnableToInitializeCode, "Failed to initialize Wasm code")
            return False
        root = wasm.start(plugin)
        if root is None or wasm.is_failed():
            wasm.fail(FailState.StartFailed, "Failed to start base Wasm")
            return False
        if not wasm.configure(root, plugin) or wasm.is_failed():
            wasm.fail(FailState.ConfigureFailed, "Failed to configure base Wasm plugin")
            return False
        return True
    finally:
        canary.kill()


# -- per-thread clones ------------------------------------------------------------------------


class _LocalWasms(threading.local):
    def __init__(self) -> None:
        self.wasms: dict[str, weakref.ref[WasmHandle]] = {}


_local = _LocalWasms()


def get_or_create_thread_local_wasm(base: WasmHandle, thread: WasmThread) -> WasmHandle | None:
    """Any thread: this thread's live, healthy clone of `base` (a new one if there is none)."""
    vm_key = base.wasm.vm_key
    local = _local.wasms
    ref = local.get(vm_key)
    if ref is not None:
        handle = ref()
        if handle is not None and not handle.wasm.is_failed():
            return handle
        del local[vm_key]
    _remove_stale(local)
    handle = WasmHandle(base.wasm.clone(post=thread.post, timer_factory=thread.timer_factory,
                                        stats_store=thread.stats_store, environment=thread.environment,
                                        time_source=thread.time_source),
                        base.lifecycle, base)
    if not handle.wasm.initialize():
        base.wasm.fail(FailState.UnableToInitializeCode, "Failed to initialize Wasm code")
        return None
    local[vm_key] = weakref.ref(handle)
    return handle


def _remove_stale(cache: dict[str, Any]) -> None:
    """Drop entries whose object is gone (cpp-host removeStaleLocalCacheEntries)."""
    for key in [k for k, ref in cache.items() if ref() is None]:
        del cache[key]
