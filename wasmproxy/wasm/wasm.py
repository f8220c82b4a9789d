"""Wasm: the host side of one VM (cpp-host WasmBase + Envoy's Wasm), on one thread.

Owns the `WasmVm`, the VM context, the root contexts (one per plugin), the context-id
allocator, the host-function table bound to this VM, plugin metrics, tick timers, and the
fail state. It knows nothing about threads or the event loop: the owner injects

* ``post(cb)``: run ``cb`` on this Wasm's thread later (shared-queue notifications);
* ``timer_factory(cb) -> Timer`` with ``enable_timer(ms)`` / ``disable_timer()`` (ticks);
* ``stats_store`` with ``counter(name)`` / ``gauge(name)`` / ``histogram(name)``;
* a `WasmEnvironment` for callouts, and a time source (``system_time()``, ``monotonic()``).

Lifecycle (cpp-host): ``Wasm(module, ...)`` then ``initialize()`` (link, ``_initialize`` /
``main`` or ``_start``); ``start(plugin)`` creates the plugin's root context
(``proxy_on_context_create`` + ``proxy_on_vm_start``), ``configure(root, plugin)`` runs
``proxy_on_configure``; ``clone(...)`` makes the per-thread copy (a new instance of the same
compiled module, initialized anew). The base-VM cache, TLS clones and canary live in vm.py.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from _weakref import _remove_dead_weakref  # what WeakValueDictionary's callback uses
import zlib
from collections import deque
from typing import Any, Callable, Iterator, Mapping, Protocol

from ..log import get_logger
from . import hostcalls, properties
from .abi import AbiVersion, AbiVersionError, FailState, MetricType, WasmResult, detect_abi_version
from .context import ContextBase, Plugin, WasmEnvironment
from .runtime import HostFunction, WasmLoadError, WasmMemory, WasmModule, WasmTrap, WasmVm
from .sandbox import SandboxLimits, capability_allowed, ensure_epoch_ticker, restrict_host_functions
from .shared_data import VmIdHandle, get_vm_id_handle
from .stats import OpenContexts
from .wasi import env_runtime_host_functions, wasi_host_functions

__all__ = [
    "CUSTOM_STAT_NAMESPACE",
    "ForeignFunction",
    "StatsStore",
    "Timer",
    "Wasm",
    "register_foreign_function",
]

_log = get_logger("wasm")

Post = Callable[[Callable[[], None]], None]

# Plugin metrics are stored under this prefix and shown without it (Envoy custom_stat_namespace).
CUSTOM_STAT_NAMESPACE = "wasmcustom"


class Timer(Protocol):
    def enable_timer(self, ms: float) -> None: ...

    def disable_timer(self) -> None: ...


class StatsStore(Protocol):
    def counter(self, name: str) -> Any: ...

    def gauge(self, name: str) -> Any: ...

    def histogram(self, name: str) -> Any: ...


class TimeSource(Protocol):
    def system_time(self) -> float: ...

    def monotonic(self) -> float: ...


class _RealTime:
    def system_time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


# A foreign function: (wasm, calling context, argument bytes) -> (status, result bytes).
ForeignFunction = Callable[["Wasm", ContextBase, bytes], "tuple[WasmResult, bytes]"]
_foreign_functions: dict[str, ForeignFunction] = {}


def register_foreign_function(name: str, fn: ForeignFunction) -> None:
    """Make `fn` callable from plugins with proxy_call_foreign_function(name, ...)."""
    _foreign_functions[name] = fn


def _compress(wasm: "Wasm", context: ContextBase, args: bytes) -> "tuple[WasmResult, bytes]":
    """Envoy's "compress": zlib's compress() (zlib format, default level)."""
    return WasmResult.Ok, zlib.compress(args)


def _uncompress(wasm: "Wasm", context: ContextBase, args: bytes) -> "tuple[WasmResult, bytes]":
    try:
        return WasmResult.Ok, zlib.decompress(args)
    except zlib.error:
        return WasmResult.SerializationFailure, b""


def _clear_route_cache(wasm: "Wasm", context: ContextBase, args: bytes) -> "tuple[WasmResult, bytes]":
    context.clear_route_cache()
    return WasmResult.Ok, b""


def _proto_fields(data: bytes) -> dict[int, int | bytes] | None:
    """The scalar fields of a protobuf message (last one wins), or None if it does not parse.

    Envoy's argument messages (source/extensions/common/wasm/ext/*.proto) are not in
    xds-protos, and they only hold varints and length-delimited fields.
    """
    fields: dict[int, int | bytes] = {}
    pos, end = 0, len(data)

    def varint() -> int | None:
        nonlocal pos
        value = shift = 0
        while pos < end and shift < 64:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        return None

    while pos < end:
        key = varint()
        if key is None or key >> 3 == 0:
            return None
        wire_type = key & 7
        if wire_type == 0:
            value = varint()
            if value is None:
                return None
            fields[key >> 3] = value
        elif wire_type == 2:
            length = varint()
            if length is None or pos + length > end:
                return None
            fields[key >> 3] = data[pos:pos + length]
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > end:
                return None
        else:
            return None
    return fields


def _proto_string(fields: dict[int, int | bytes], number: int) -> str | None:
    """A proto3 string field ('' if absent); None if it is not valid UTF-8 (a parse failure)."""
    value = fields.get(number, b"")
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _proto_uint(fields: dict[int, int | bytes], number: int) -> int:
    value = fields.get(number, 0)
    return value if isinstance(value, int) else 0


def _declare_property(wasm: "Wasm", context: ContextBase, args: bytes) -> "tuple[WasmResult, bytes]":
    """DeclarePropertyArguments{name=1, readonly=2, type=3, schema=4, span=5}, declared on the caller."""
    fields = _proto_fields(args)
    name = _proto_string(fields, 1) if fields is not None else None
    if fields is None or name is None:
        return WasmResult.BadArgument, b""
    schema = fields.get(4, b"")
    prototype = properties.CelStatePrototype(
        readonly=bool(_proto_uint(fields, 2)), type=_proto_uint(fields, 3),
        schema=schema if isinstance(schema, bytes) else b"", life_span=_proto_uint(fields, 5))
    return context.declare_property(name, prototype), b""


def _set_envoy_filter_state(wasm: "Wasm", context: ContextBase, args: bytes) -> "tuple[WasmResult, bytes]":
    """SetEnvoyFilterStateArguments{path=1, value=2, span=3}."""
    fields = _proto_fields(args)
    path = _proto_string(fields, 1) if fields is not None else None
    value = _proto_string(fields, 2) if fields is not None else None
    if path is None or value is None:
        return WasmResult.BadArgument, b""
    return context.set_envoy_filter_state(path, value.encode()), b""


# The foreign functions Envoy registers that need no CEL or crypto (source/.../wasm/foreign.cc).
register_foreign_function("compress", _compress)
register_foreign_function("uncompress", _uncompress)
register_foreign_function("clear_route_cache", _clear_route_cache)
register_foreign_function("declare_property", _declare_property)
register_foreign_function("set_envoy_filter_state", _set_envoy_filter_state)


# Exports looked up in the module (cpp-host FOR_ALL_MODULE_FUNCTIONS + Envoy's).
_MODULE_FUNCTIONS = (
    "proxy_on_vm_start", "proxy_on_configure", "proxy_on_tick",
    "proxy_on_context_create", "proxy_on_new_connection", "proxy_on_downstream_data",
    "proxy_on_upstream_data", "proxy_on_downstream_connection_close",
    "proxy_on_upstream_connection_close", "proxy_on_request_headers", "proxy_on_request_body",
    "proxy_on_request_trailers", "proxy_on_request_metadata", "proxy_on_response_headers",
    "proxy_on_response_body", "proxy_on_response_trailers", "proxy_on_response_metadata",
    "proxy_on_http_call_response", "proxy_on_grpc_receive", "proxy_on_grpc_close",
    "proxy_on_grpc_receive_initial_metadata", "proxy_on_grpc_receive_trailing_metadata",
    "proxy_on_queue_ready", "proxy_on_done", "proxy_on_log", "proxy_on_delete",
    "envoy_on_resolve_dns", "envoy_on_stats_update",
)


class _ContextRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a context that knows its id: weakref.KeyedRef without KeyedRef's
    Python-level __new__ and __init__."""

    __slots__ = ("key",)
    key: int


class Wasm:
    """One VM and its contexts. Owner thread only, except `post` targets."""

    def __init__(
        self,
        module: WasmModule,
        *,
        post: Post,
        vm_id: str = "",
        vm_configuration: bytes = b"",
        vm_key: str = "",
        envs: Mapping[str, str] | None = None,
        timer_factory: Callable[[Callable[[], None]], Timer] | None = None,
        stats_store: StatsStore | None = None,
        environment: WasmEnvironment | None = None,
        time_source: TimeSource | None = None,
        extra_host_functions: Mapping[tuple[str, str], HostFunction] | None = None,
        base: "Wasm | None" = None,
        limits: SandboxLimits | None = None,
        allowed_capabilities: frozenset[str] = frozenset(),
    ) -> None:
        self.module = module
        # CPU deadline and memory cap of the VM, and cpp-host's allowed_capabilities (sandbox.py).
        self.limits = limits if limits is not None else SandboxLimits()
        self.allowed_capabilities = allowed_capabilities
        self.vm_id = vm_id
        self.vm_key = vm_key
        self.vm_configuration = vm_configuration
        self.envs = dict(envs or {})
        self.post = post
        self.timer_factory = timer_factory
        self.stats_store: StatsStore = stats_store if stats_store is not None else _LocalStore()
        self.environment = environment or WasmEnvironment()
        self.time_source = time_source or _RealTime()
        self.extra_host_functions = dict(extra_host_functions or {})
        self.base = base
        # wasmproxy's own leak check: this VM's contexts (VM and root contexts included) not yet
        # released, reported to `contexts_gauge` (vm.py attaches the process-wide one).
        # Per stream, ContextBase bumps `open_contexts.n` itself (no call); a closed VM gets a
        # fresh count that no gauge reads.
        self.contexts_gauge: Any = None
        self.open_contexts = OpenContexts()
        self._closed = False
        self.vm: WasmVm | None = None
        self.abi_version = AbiVersion.Unknown
        self.fail_state = FailState.Ok
        self.failed = False  # fail_state != Ok, as a plain bool for the per-callback checks
        self.fail_message = ""
        self._fail_callbacks: list[Callable[[FailState], None]] = []
        # Every Wasm of a vm_id holds its handle: SharedData for the vm_id lives as long as they do.
        self._vm_id_handle: VmIdHandle | None = get_vm_id_handle(vm_id)
        # Contexts: id -> weak reference (stream contexts belong to their streams). As a
        # WeakValueDictionary, but registering a context (once per stream) runs no Python code:
        # an entry goes when its context is deleted (on_delete) or collected (the callback).
        contexts: dict[int, _ContextRef] = {}
        self.contexts = contexts

        def forget_collected(ref: _ContextRef) -> None:
            _remove_dead_weakref(contexts, ref.key)

        self._forget_collected = forget_collected
        self._next_context_id = 1  # 0 is the VM context
        self.vm_context = ContextBase(self, 0, None, None)
        self.root_contexts: dict[str, ContextBase] = {}
        self.pending_done: dict[str, ContextBase] = {}
        self.pending_delete: list[ContextBase] = []
        # Exports found by initialize(): name -> callable.
        self.module_functions: dict[str, Callable[..., Any]] = {}
        self._malloc: Callable[..., Any] | None = None
        self._malloc_name = ""
        # The context of the current call into the VM, and the effective one it selected.
        self.current_context: ContextBase | None = None
        self.effective_context_id = 0
        # Read directly by the per-callback paths in context.py (a call each is measurable):
        # set by send_local_response, and the re-entrant actions queued for after the call.
        self.stop_iteration = False
        self.after_vm_call_actions: deque[Callable[[], None]] = deque()
        # Metrics: id -> stat; ids carry their type in the low two bits (cpp-host).
        self.counters: dict[int, Any] = {}
        self.gauges: dict[int, Any] = {}
        self.histograms: dict[int, Any] = {}
        self._next_metric_id = {MetricType.Counter: 0, MetricType.Gauge: 1, MetricType.Histogram: 2}
        # Ticks: root context id -> period (ms) and timer.
        self._tick_periods: dict[int, int] = {}
        self._timers: dict[int, Timer] = {}
        # Callout tokens carry their kind in the low two bits (cpp-host CalloutType: 0 HTTP,
        # 1 gRPC call, 2 gRPC stream) and step by 4: the first ones are 4, 5 and 6.
        self._next_http_call_id = 0
        self._next_grpc_call_id = 1
        self._next_grpc_stream_id = 2
        self._dns_token = 1  # Envoy's dns_token_: pre-incremented, so the first token is 2
        self._queue_callbacks: dict[int, Callable[[int], None]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def initialize(self) -> bool:
        """Link and instantiate the module, look up its exports, run its start functions."""
        try:
            self.abi_version = (self.base.abi_version if self.base is not None
                                else detect_abi_version(self.module.exports))
        except AbiVersionError as e:
            self.fail(FailState.UnableToInitializeCode, str(e))
            return False
        functions = wasi_host_functions(
            self._memory, list(self.envs.items()), self._wasi_log,
            realtime_ns=lambda: int(self.time_source.system_time() * 1e9),
            monotonic_ns=lambda: int(self.time_source.monotonic() * 1e9))
        functions.update(env_runtime_host_functions())
        functions.update(hostcalls.host_functions(self))
        functions.update(self.extra_host_functions)
        functions = restrict_host_functions(functions, self.allowed_capabilities)
        ticks = self.limits.epoch_deadline_ticks
        if ticks is not None:
            ensure_epoch_ticker()
        try:
            if self.base is not None and self.base.vm is not None:
                self.vm = self.base.vm.clone(functions)
            else:
                self.vm = WasmVm(self.module, functions, name=self.vm_id,
                                 memory_limit_bytes=self.limits.memory_limit_bytes, epoch_deadline_ticks=ticks)
        except WasmLoadError as e:
            self.fail(FailState.UnableToInitializeCode, str(e))
            return False
        except WasmTrap as e:  # a start section trapped
            self.fail(FailState.RuntimeError, f"Function: start failed: {e}")
            return False
        self._get_functions()
        if self.is_failed():
            return False
        with self._startup_deadline():
            self._start_vm()
        return not self.is_failed()

    @contextlib.contextmanager
    def _startup_deadline(self) -> Iterator[None]:
        """Start-up calls get the (longer) start-up CPU deadline, then callbacks get theirs."""
        vm = self.vm
        if vm is None or self.limits.epoch_deadline_ticks is None:
            yield
            return
        vm.set_epoch_deadline_ticks(self.limits.startup_deadline_ticks)
        try:
            yield
        finally:
            vm.set_epoch_deadline_ticks(self.limits.epoch_deadline_ticks)

    def _memory(self) -> WasmMemory:
        assert self.vm is not None
        return self.vm.memory

    def _wasi_log(self, level: int, text: str) -> None:
        # fd 1 / fd 2 writes become plugin log lines of the calling context.
        self.context_or_effective_context().log_message(level, text.encode("utf-8", "replace"))

    def _get_functions(self) -> None:
        vm = self.vm
        assert vm is not None
        found = {}
        allowed = self.allowed_capabilities
        for name in _MODULE_FUNCTIONS:
            # A callback outside allowed_capabilities is not called (cpp-host _GET_PROXY).
            if name.startswith("proxy_") and not capability_allowed(allowed, name):
                continue
            fn = vm.get_function(name)
            if fn is not None:
                found[name] = fn
        if self.abi_version == AbiVersion.ProxyWasm_0_2_0 or self.abi_version == AbiVersion.ProxyWasm_0_2_1:
            fn = vm.get_function("proxy_on_foreign_function")
            if fn is not None and capability_allowed(allowed, "proxy_on_foreign_function"):
                found["proxy_on_foreign_function"] = fn
        self.module_functions = found
        for name in ("malloc", "proxy_on_memory_allocate"):
            self._malloc = vm.get_function(name)
            if self._malloc is not None:
                self._malloc_name = name
                break
        else:
            self.fail(FailState.MissingFunction, "Wasm module is missing malloc function.")

    def _start_vm(self) -> None:
        vm = self.vm
        assert vm is not None
        initialize = vm.get_function("_initialize")
        if initialize is not None:
            self.call(self.vm_context, "_initialize", initialize)
            main = vm.get_function("main")
            if main is not None and len(self.module.exports["main"].params) == 2 and not self.is_failed():
                # A WASI reactor's main() lets the SDK configure itself (cpp-host).
                self.call(self.vm_context, "main", main, 0, 0)
        else:
            start = vm.get_function("_start")
            if start is not None:
                self.call(self.vm_context, "_start", start)

    def clone(
        self,
        *,
        post: Post,
        timer_factory: Callable[[Callable[[], None]], Timer] | None = None,
        stats_store: StatsStore | None = None,
        environment: WasmEnvironment | None = None,
        time_source: TimeSource | None = None,
    ) -> "Wasm":
        """A copy for another thread (same module, vm_id, configuration); call initialize() there."""
        return Wasm(
            self.module, post=post, vm_id=self.vm_id, vm_configuration=self.vm_configuration,
            vm_key=self.vm_key, envs=self.envs, timer_factory=timer_factory,
            stats_store=stats_store,
            environment=environment, time_source=time_source or self.time_source,
            extra_host_functions=self.extra_host_functions, base=self, limits=self.limits,
            allowed_capabilities=self.allowed_capabilities)

    def start(self, plugin: Plugin) -> ContextBase | None:
        """The plugin's root context, created and started; None if proxy_on_vm_start said no."""
        existing = self.root_contexts.get(plugin.key)
        if existing is not None:
            existing.on_start(plugin)
            return existing
        root = ContextBase(self, self.alloc_context_id(), None, plugin, root_id=plugin.root_id)
        self.root_contexts[plugin.key] = root
        with self._startup_deadline():
            started = root.on_start(plugin)
        return root if started else None

    def configure(self, root_context: ContextBase, plugin: Plugin) -> bool:
        with self._startup_deadline():
            return root_context.on_configure(plugin)

    def get_root_context(self, plugin: Plugin, allow_closed: bool = False) -> ContextBase | None:
        root = self.root_contexts.get(plugin.key)
        if root is None and allow_closed:
            root = self.pending_done.get(plugin.key)
        return root

    def create_stream_context(self, plugin: Plugin, env: Any = None) -> ContextBase:
        """A new stream context under the plugin's root context (which must be started)."""
        root = self.root_contexts[plugin.key]
        return ContextBase.stream_context(self, root.id, plugin, env)

    def start_shutdown(self, plugin_key: str | None = None) -> None:
        """proxy_on_done for one plugin's root context (or all); those that say "not yet" wait."""
        keys = [plugin_key] if plugin_key is not None else list(self.root_contexts)
        for key in keys:
            root = self.root_contexts.pop(key, None)
            if root is None:
                continue
            if root.on_done():
                root.on_delete()
            else:
                self.pending_done[key] = root

    def done(self, root_context: ContextBase) -> WasmResult:
        """proxy_done: a root context that deferred its shutdown is now finished."""
        key = root_context.plugin.key if root_context.plugin is not None else None
        root = self.pending_done.pop(key, None) if key is not None else None
        if root is None:
            return WasmResult.NotFound
        self.pending_delete.append(root)
        # proxy_on_delete must not run inside the proxy_done call: defer it.
        self.add_after_vm_call_action(self.finish_shutdown)
        return WasmResult.Ok

    def finish_shutdown(self) -> None:
        while self.pending_delete:
            self.pending_delete.pop(0).on_delete()

    def close(self) -> None:
        """The Wasm is being destroyed: shut its plugins down, drop the VM, and release the vm_id.

        Python frees a Wasm only through the cycle collector (contexts point back at it), so
        the owner calls this to make the end deterministic: when the last Wasm of a vm_id
        closes, that vm_id's SharedData and queues go at once (cpp-host ~WasmBase).
        """
        self.start_shutdown()
        if not self._closed:
            self._closed = True
            if self.contexts_gauge is not None:
                self.contexts_gauge.detach(self.open_contexts)
            self.open_contexts = OpenContexts()
        self.pending_done.clear()
        self.pending_delete.clear()
        for timer in self._timers.values():
            timer.disable_timer()
        self._timers.clear()
        self.vm = None
        self._vm_id_handle = None

    def attach_contexts_gauge(self, gauge: Any) -> None:
        """Report this VM's open contexts (so far and from now on) to `gauge` (a ContextsActive:
        attach/detach of its OpenContexts)."""
        self.contexts_gauge = gauge
        if not self._closed:
            gauge.attach(self.open_contexts)

    def context_opened(self) -> None:
        """A context of this VM was created (owner thread)."""
        self.open_contexts.n += 1

    def context_closed(self) -> None:
        """A stream context of this VM was released (owner thread)."""
        self.open_contexts.n -= 1

    # -- failure ---------------------------------------------------------------------------

    def is_failed(self) -> bool:
        return self.failed

    def fail(self, state: FailState, message: str) -> None:
        _log.error("%s", message)
        self.fail_state = state
        self.failed = state != FailState.Ok
        self.fail_message = message
        for cb in list(self._fail_callbacks):
            cb(state)

    def add_fail_callback(self, cb: Callable[[FailState], None]) -> None:
        """cb(state) runs whenever this Wasm fails (vm.py drops failed VMs from its caches)."""
        self._fail_callbacks.append(cb)

    # -- calls into the VM -----------------------------------------------------------------

    def call(self, context: ContextBase, name: str, fn: Callable[..., Any], *args: int) -> Any:
        """Call the guest with `context` current (cpp-host SaveRestoreContext); a trap fails the VM.

        Returns the guest's result, or 0 if it trapped.
        """
        saved_context, saved_effective = self.current_context, self.effective_context_id
        self.current_context = context
        self.effective_context_id = 0
        try:
            return fn(*args)
        except WasmTrap as e:
            self.fail(FailState.RuntimeError, f"Function: {name} failed: {e}")
            return 0
        finally:
            self.current_context = saved_context
            self.effective_context_id = saved_effective

    def context_or_effective_context(self) -> ContextBase:
        """The context a host call acts on: the effective one if the plugin set one, else current."""
        effective_id = self.effective_context_id
        if effective_id:
            ref = self.contexts.get(effective_id)  # get_context, inline
            if ref is not None:
                effective = ref()
                if effective is not None:
                    return effective
        return self.current_context or self.vm_context

    def get_context(self, context_id: int) -> ContextBase | None:
        ref = self.contexts.get(context_id)
        return ref() if ref is not None else None

    def add_context(self, context: ContextBase) -> None:
        """Register `context` under its id, weakly (ContextBase.__init__)."""
        ref = _ContextRef(context, self._forget_collected)
        ref.key = context.id
        self.contexts[context.id] = ref

    def alloc_context_id(self) -> int:
        contexts = self.contexts
        while True:
            cid = self._next_context_id
            self._next_context_id = (self._next_context_id + 1) & 0xFFFFFFFF
            if cid != 0:
                ref = contexts.get(cid)
                if ref is None or ref() is None:
                    return cid

    def stop_next_iteration(self, stop: bool) -> None:
        """After send_local_response, the callback's status is overridden to Stop*."""
        self.stop_iteration = stop

    def is_next_iteration_stopped(self) -> bool:
        return self.stop_iteration

    def add_after_vm_call_action(self, action: Callable[[], None]) -> None:
        self.after_vm_call_actions.append(action)

    def do_after_vm_call_actions(self) -> None:
        actions = self.after_vm_call_actions
        while actions:
            actions.popleft()()

    # -- guest memory ----------------------------------------------------------------------

    def alloc_memory(self, size: int) -> int | None:
        """A pointer to `size` fresh bytes from the plugin's allocator, or None."""
        if self._malloc is None or self.vm is None:
            return None
        ptr = self.call(self.vm_context, self._malloc_name, self._malloc, size)
        if not ptr:
            return None
        if not self.vm.memory.in_bounds(ptr, size):  # ptr + size > memory size
            return None
        return int(ptr)

    def copy_to_pointer_size(self, data: bytes, ptr_ptr: int, size_ptr: int) -> bool:
        """Copy `data` into guest memory and store (pointer, size) at ptr_ptr / size_ptr.

        False when the plugin cannot allocate; InvalidMemoryAccess for a bad pointer (the
        allocator's or an out-pointer)."""
        vm = self.vm
        assert vm is not None
        memory = vm.memory
        size = len(data)
        ptr = 0
        if size:
            # alloc_memory, inline: no allocator or a null pointer is False; a pointer whose
            # range lies outside the memory makes the write raise InvalidMemoryAccess.
            malloc = self._malloc
            if malloc is None:
                return False
            ptr = self.call(self.vm_context, self._malloc_name, malloc, size)
            if not ptr:
                return False
            memory.write(ptr, data)
        memory.write_two_u32(ptr_ptr, ptr, size_ptr, size)
        return True

    # -- ticks -----------------------------------------------------------------------------

    def set_tick_period(self, root_context_id: int, period_ms: int) -> None:
        """One periodic proxy_on_tick per root context; 0 stops it (Envoy Wasm::setTickPeriod)."""
        timer = self._timers.get(root_context_id)
        was_running = timer is not None and self._tick_periods.get(root_context_id, 0) > 0
        self._tick_periods[root_context_id] = period_ms
        if was_running:
            assert timer is not None
            timer.disable_timer()
        if period_ms > 0 and self.timer_factory is not None:
            weak_self = weakref.ref(self)

            def fire() -> None:
                wasm = weak_self()
                if wasm is not None:
                    wasm.tick(root_context_id)

            timer = self.timer_factory(fire)
            self._timers[root_context_id] = timer
            timer.enable_timer(period_ms)

    def tick(self, root_context_id: int) -> None:
        """A tick timer fired: proxy_on_tick, then re-arm with the current period."""
        period = self._tick_periods.get(root_context_id)
        timer = self._timers.get(root_context_id)
        if period is None or timer is None or "proxy_on_tick" not in self.module_functions:
            return
        context = self.get_context(root_context_id)
        if context is not None:
            context.on_tick()
        period = self._tick_periods.get(root_context_id, 0)
        timer = self._timers.get(root_context_id)
        if timer is not None and period > 0:
            timer.enable_timer(period)

    def tick_period(self, root_context_id: int) -> int:
        return self._tick_periods.get(root_context_id, 0)

    # -- queues, metrics, callout ids ------------------------------------------------------

    def queue_ready_callback(self, context_id: int) -> Callable[[int], None]:
        """on_ready(token) for a queue owned by `context_id`; holds this Wasm only weakly."""
        cb = self._queue_callbacks.get(context_id)
        if cb is None:
            weak_self = weakref.ref(self)

            def on_ready(token: int) -> None:
                wasm = weak_self()
                if wasm is None:
                    return
                context = wasm.get_context(context_id)
                if context is not None:
                    context.on_queue_ready(token)

            cb = self._queue_callbacks[context_id] = on_ready
        return cb

    def define_metric(self, metric_type: MetricType, name: str) -> int:
        """A new metric id for `name` (stored as "wasmcustom.<name>"); ids encode the type."""
        self._next_metric_id[metric_type] += 4
        metric_id = self._next_metric_id[metric_type]
        stat_name = f"{CUSTOM_STAT_NAMESPACE}.{name}"
        store = self.stats_store
        if metric_type == MetricType.Counter:
            self.counters[metric_id] = store.counter(stat_name)
        elif metric_type == MetricType.Gauge:
            self.gauges[metric_id] = store.gauge(stat_name)
        else:
            self.histograms[metric_id] = store.histogram(stat_name)
        return metric_id

    def next_http_call_id(self) -> int:
        self._next_http_call_id += 4
        return self._next_http_call_id

    def next_grpc_call_id(self) -> int:
        self._next_grpc_call_id += 4
        return self._next_grpc_call_id

    def next_grpc_stream_id(self) -> int:
        self._next_grpc_stream_id += 4
        return self._next_grpc_stream_id

    def release_grpc_id(self, token: int) -> None:
        """Give back the gRPC token just taken: Envoy refuses a service that is neither a
        GrpcService nor a known cluster before it takes one."""
        if token == self._next_grpc_call_id:
            self._next_grpc_call_id -= 4
        elif token == self._next_grpc_stream_id:
            self._next_grpc_stream_id -= 4

    def next_dns_token(self) -> int:
        self._dns_token = (self._dns_token + 1) & 0xFFFFFFFF or 1  # never 0
        return self._dns_token

    def get_foreign_function(self, name: str) -> ForeignFunction | None:
        return _foreign_functions.get(name)

    def __repr__(self) -> str:
        return f"Wasm(vm_id={self.vm_id!r}, abi={self.abi_version.value}, fail_state={self.fail_state.name})"


class _LocalStat:
    """A stat for a Wasm created without a stats store (tests, tools)."""

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def dec(self, n: int = 1) -> None:
        self.value -= n

    def set(self, v: int) -> None:
        self.value = v

    def record(self, v: float) -> None:
        self.value = v


class _LocalStore:
    """The stats store of a Wasm created without one: names -> stats, nothing exported."""

    def __init__(self) -> None:
        self.stats: dict[str, _LocalStat] = {}

    def counter(self, name: str) -> _LocalStat:
        return self.stats.setdefault(name, _LocalStat())

    gauge = counter
    histogram = counter
