"""PluginConfig: one configured plugin, its VMs on every thread, and its failure policy.

Envoy's PluginConfig (source/extensions/common/wasm/wasm.cc) over cpp-host's
getOrCreateThreadLocalPlugin:

* on the main thread, from an ``envoy.extensions.wasm.v3.PluginConfig``: resolve the failure
  policy (``fail_open`` xor ``failure_policy``; UNSPECIFIED is FAIL_CLOSED), read and compile
  the code, create (or share) the base VM with its canary, then publish a `PluginHandleHolder`
  to every thread through a ThreadLocal slot;
* on each thread (`get_or_create_thread_local_plugin`): a thread-local cache keyed by
  ``vm_key || "||" || plugin key``; on a miss, this thread's clone of the base VM, the plugin's
  root context, proxy_on_vm_start and proxy_on_configure;
* per stream (`PluginConfig.create_context`): the stream context, or what the failure policy
  says when the VM failed: FAIL_OPEN skips the filter (None), FAIL_CLOSED gives a context with
  no VM (it answers 503), FAIL_RELOAD rebuilds this thread's VM from the base, at most once
  per backoff interval (jittered between base and 1.5 x base, Envoy's
  JitteredLowerBoundBackOffStrategy; ``reload_config.backoff.base_interval``, default 1 s).
  Only a runtime failure (a trap) is reloaded, as in Envoy.

Plugin code that cannot be loaded, started or configured rejects the configuration
(ConfigError "Unable to create Wasm plugin <name>"), whatever the policy; remote code that
cannot be fetched loads the plugin without a VM instead.
"""

from __future__ import annotations

import os
import random
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

from ..config.errors import ConfigError
from ..http.headers import HeaderMap
from ..log import get_logger
from .abi import FailState, WasmResult
from .code import compile_code, read_code
from .context import ContextBase, FailurePolicy, Plugin, StreamEnvironment, WasmEnvironment
from .sandbox import limits_for
from .stats import DEFAULT_RUNTIME, LifecycleStats, PluginStats, RemoteLoadStats
from .vm import WasmHandle, WasmThread, create_wasm, get_or_create_thread_local_wasm, make_vm_key
from .wasm import Wasm

if TYPE_CHECKING:
    from ..server_context import FactoryContext

__all__ = [
    "PluginConfig",
    "PluginHandle",
    "PluginHandleHolder",
    "ProxyWasmEnvironment",
    "any_to_bytes",
    "get_or_create_thread_local_plugin",
    "wasm_thread_for",
]

_log = get_logger("wasm")

_NULL_RUNTIME = "envoy.wasm.runtime.null"
_DIRECTIONS = {0: "UNSPECIFIED", 1: "INBOUND", 2: "OUTBOUND"}  # core.v3.TrafficDirection names
_SUPPORTED_RUNTIMES = ("", "envoy.wasm.runtime.v8", "envoy.wasm.runtime.wasmtime", "envoy.wasm.runtime.wamr",
                       "envoy.wasm.runtime.wavm")


def any_to_bytes(any_msg: Any) -> bytes:
    """MessageUtil::anyToBytes: StringValue/BytesValue unwrapped, anything else serialized."""
    type_name = any_msg.type_url.rpartition("/")[2]
    if type_name in ("google.protobuf.StringValue", "google.protobuf.BytesValue"):
        from google.protobuf import wrappers_pb2

        cls = wrappers_pb2.StringValue if type_name.endswith("StringValue") else wrappers_pb2.BytesValue
        msg = cls()
        any_msg.Unpack(msg)
        value = msg.value
        return value.encode() if isinstance(value, str) else bytes(value)
    return bytes(any_msg.value)


class PluginHandle:
    """A plugin started on one thread's VM (cpp-host PluginHandleBase); wasm None: no VM."""

    __slots__ = ("wasm_handle", "plugin", "root_context_id", "__weakref__")

    def __init__(self, wasm_handle: WasmHandle | None, plugin: Plugin, root_context_id: int = 0) -> None:
        self.wasm_handle = wasm_handle
        self.plugin = plugin
        self.root_context_id = root_context_id

    @property
    def wasm(self) -> Wasm | None:
        return self.wasm_handle.wasm if self.wasm_handle is not None else None


class _LocalPlugins(threading.local):
    """Thread-local plugin handles, weakly held (cpp-host local_plugins)."""

    def __init__(self) -> None:
        self.plugins: dict[str, weakref.ref[PluginHandle]] = {}


_local_plugins = _LocalPlugins()


def get_or_create_thread_local_plugin(
    base: WasmHandle | None, plugin: Plugin, thread: WasmThread, *, legacy_fail_open: bool = False
) -> PluginHandle | None:
    """Any thread: this thread's started and configured plugin on its clone of `base`.

    No base (the code never loaded): a handle with no VM, so the failure policy applies.
    None when the clone could not be made, started or configured (then no filter is added).
    """
    if base is None:
        if not legacy_fail_open:
            _log.critical("Plugin configured to fail closed failed to load")
        return PluginHandle(None, plugin)
    key = f"{base.wasm.vm_key}||{plugin.key}"
    cache = _local_plugins.plugins
    ref = cache.get(key)
    if ref is not None:
        handle = ref()
        if handle is not None and handle.wasm is not None and not handle.wasm.is_failed():
            return handle
        del cache[key]
    for stale in [k for k, r in cache.items() if r() is None]:
        del cache[stale]
    wasm_handle = get_or_create_thread_local_wasm(base, thread)
    if wasm_handle is None:
        return None
    wasm = wasm_handle.wasm
    root = wasm.start(plugin)
    if root is None or wasm.is_failed():
        base.wasm.fail(FailState.StartFailed, "Failed to start thread-local Wasm")
        return None
    if not wasm.configure(root, plugin) or wasm.is_failed():
        base.wasm.fail(FailState.ConfigureFailed, "Failed to configure thread-local Wasm plugin")
        return None
    handle = PluginHandle(wasm_handle, plugin, root.id)
    cache[key] = weakref.ref(handle)
    return handle


class PluginHandleHolder:
    """What one thread's slot holds: the current handle, when it was (re)loaded, reload stats."""

    __slots__ = ("handle", "last_load", "thread", "stats")

    def __init__(self, handle: PluginHandle | None, last_load: float, thread: WasmThread, stats: PluginStats) -> None:
        self.handle = handle
        self.last_load = last_load
        self.thread = thread
        self.stats = stats


class _HttpCallCallbacks:
    """AsyncClient callbacks for one http_call: the answer goes to the calling root context."""

    __slots__ = ("context", "token")

    def __init__(self, context: ContextBase, token: int) -> None:
        self.context = weakref.ref(context)
        self.token = token

    def on_success(self, headers: HeaderMap, body: bytes, trailers: HeaderMap | None) -> None:
        context = self.context()
        if context is not None and context.wasm is not None and not context.wasm.is_failed():
            context.on_http_call_success(self.token, headers, body, trailers)

    def on_failure(self, reason: str) -> None:
        context = self.context()
        if context is not None and context.wasm is not None and not context.wasm.is_failed():
            context.on_http_call_failure(self.token)


class _GrpcCallbacks:
    """GrpcClient callbacks for one gRPC callout: events go to the calling root context
    (Envoy's GrpcCallClientHandler / GrpcStreamClientHandler)."""

    __slots__ = ("context", "token", "environment")

    def __init__(self, context: ContextBase, token: int, environment: "ProxyWasmEnvironment") -> None:
        self.context = weakref.ref(context)
        self.token = token
        self.environment = environment

    def _live(self) -> ContextBase | None:
        context = self.context()
        if context is None or context.wasm is None or context.wasm.is_failed():
            return None
        return context

    # unary (RawAsyncRequestCallbacks)
    def on_success(self, message: bytes) -> None:
        self.environment.grpc_callouts.pop(self.token, None)
        if (context := self._live()) is not None:
            context.on_grpc_receive(self.token, message)

    def on_failure(self, status: int, message: str) -> None:
        self.on_remote_close(status, message)

    # stream (RawAsyncStreamCallbacks)
    def on_receive_initial_metadata(self, metadata: HeaderMap) -> None:
        if (context := self._live()) is not None:
            _after_vm_call(context, lambda: context.on_grpc_receive_initial_metadata(self.token, metadata))

    def on_receive_message(self, message: bytes) -> None:
        if (context := self._live()) is not None:
            context.on_grpc_receive(self.token, message)

    def on_receive_trailing_metadata(self, metadata: HeaderMap) -> None:
        if (context := self._live()) is not None:
            _after_vm_call(context, lambda: context.on_grpc_receive_trailing_metadata(self.token, metadata))

    def on_remote_close(self, status: int, message: str) -> None:
        self.environment.grpc_callouts.pop(self.token, None)
        if (context := self._live()) is not None:
            context.on_grpc_close(self.token, status, message.encode("utf-8", "replace"))


def _after_vm_call(context: ContextBase, event: Callable[[], None]) -> None:
    """Run event now, or after the current VM call when inside one (a callout that failed
    while being started reports to the plugin once its host call has returned)."""
    wasm = context.wasm
    if wasm is not None and wasm.current_context is not None:
        wasm.add_after_vm_call_action(event)
    else:
        event()


_CLUSTER_NOT_AVAILABLE = "Cluster not available"
_NO_HEALTHY_UPSTREAM = "no healthy upstream"


class ProxyWasmEnvironment(WasmEnvironment):
    """Callouts of the Wasms of one thread: http_call through that thread's AsyncClient, gRPC
    through a grpcio `GrpcClient` whose results are posted to this thread (wasm/grpc.py).

    The gRPC ``service`` argument is what Envoy's grpcCall/grpcStream take: a serialized
    GrpcService (envoy_grpc cluster_name/authority, or google_grpc target_uri; its
    initial_metadata is sent), else bytes naming a cluster. envoy_resolve_dns resolves as
    Envoy's c-ares resolver does (wasm/dns.py); the answer goes to the caller's root context.
    """

    def __init__(self, thread_local_cluster_manager: Callable[[], Any], node: object | None,
                 post: Callable[[Callable[[], None]], None] | None = None,
                 timer_factory: Callable[[Callable[[], None]], Any] | None = None) -> None:
        self._tlcm = thread_local_cluster_manager
        self.node = node
        self._post = post
        self._timer_factory = timer_factory
        self._grpc_client: Any = None
        #: In-flight gRPC callouts by token (GrpcRequest or GrpcStream).
        self.grpc_callouts: dict[int, Any] = {}

    def http_call(
        self, context: ContextBase, token: int, cluster: str, headers: HeaderMap, body: bytes,
        trailers: HeaderMap | None, timeout_ms: int | None,
    ) -> WasmResult:
        tlcm = self._tlcm()
        if tlcm is None or tlcm.get(cluster) is None:
            return WasmResult.BadArgument
        request = tlcm.http_async_client().send(cluster, headers, body, trailers, timeout_ms or 0,
                                                _HttpCallCallbacks(context, token))
        # Envoy: a request that completed inline returns no handle, and the call fails.
        return WasmResult.Ok if request is not None else WasmResult.InternalFailure

    # -- gRPC ------------------------------------------------------------------------------

    def _grpc_service(self, service: bytes) -> Any:
        """The GrpcService for the ``service`` argument, or the WasmResult that refuses it."""
        from envoy.config.core.v3 import grpc_service_pb2
        from google.protobuf.message import DecodeError

        proto = grpc_service_pb2.GrpcService()
        try:
            proto.ParseFromString(service)
        except DecodeError:
            name = service.decode("utf-8", "replace")
            tlcm = self._tlcm()
            if tlcm is None or tlcm.get(name) is None:
                # Envoy keeps ParseFailure here for plugins written against ABI 0.1.x.
                return WasmResult.ParseFailure
            proto = grpc_service_pb2.GrpcService()
            proto.envoy_grpc.cluster_name = name
        kind = proto.WhichOneof("target_specifier")
        if kind is None or self._post is None or self._timer_factory is None:
            return WasmResult.BadArgument  # (Envoy 1.40 aborts on an empty GrpcService)
        return proto

    def _grpc_start(self, context: ContextBase, token: int, service: bytes, start: Callable[..., Any],
                    stream: bool) -> WasmResult:
        from .grpc import GrpcClient, GrpcTarget

        proto = self._grpc_service(service)
        if isinstance(proto, WasmResult):
            return proto
        callbacks = _GrpcCallbacks(context, token, self)
        metadata = tuple((m.key, m.value) for m in proto.initial_metadata)
        if proto.WhichOneof("target_specifier") == "google_grpc":
            target = GrpcTarget(proto.google_grpc.target_uri, "", metadata, google=True)
        else:
            cluster_name = proto.envoy_grpc.cluster_name
            tlcm = self._tlcm()
            cluster = tlcm.get(cluster_name) if tlcm is not None else None
            if cluster is None:
                # Envoy's async stream fails while starting: the call returns InternalFailure,
                # and the plugin still hears the close of the token it never got.
                callbacks.on_remote_close(14, _CLUSTER_NOT_AVAILABLE)
                return WasmResult.InternalFailure
            host = cluster.choose_host()
            if host is None:
                # The router's local reply (503), inline: InternalFailure, then the events.
                if getattr(cluster, "stats", None) is not None:
                    cluster.stats.charge_response_code(503, True)
                if stream:
                    callbacks.on_receive_initial_metadata(HeaderMap())
                    callbacks.on_receive_trailing_metadata(HeaderMap([
                        (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"),
                        ("grpc-message", _NO_HEALTHY_UPSTREAM)]))
                callbacks.on_remote_close(14, f"{_NO_HEALTHY_UPSTREAM}{{no_healthy_upstream}}")
                return WasmResult.InternalFailure
            target = GrpcTarget(host.address_string, proto.envoy_grpc.authority or cluster_name, metadata,
                                stats=getattr(cluster, "stats", None))
        if self._grpc_client is None:
            assert self._post is not None and self._timer_factory is not None
            self._grpc_client = GrpcClient(self._post, self._timer_factory)
        stale = self.grpc_callouts.pop(token, None)  # a reloaded VM reuses tokens
        if stale is not None:
            _cancel(stale)
        self.grpc_callouts[token] = start(self._grpc_client, target, callbacks)
        return WasmResult.Ok

    def grpc_call(
        self, context: ContextBase, token: int, service: bytes, service_name: str, method_name: str,
        initial_metadata: HeaderMap, request: bytes, timeout_ms: int,
    ) -> WasmResult:
        return self._grpc_start(context, token, service, lambda client, target, callbacks: client.send(
            target, service_name, method_name, initial_metadata, request, timeout_ms, callbacks), stream=False)

    def grpc_stream(
        self, context: ContextBase, token: int, service: bytes, service_name: str, method_name: str,
        initial_metadata: HeaderMap,
    ) -> WasmResult:
        return self._grpc_start(context, token, service, lambda client, target, callbacks: client.start(
            target, service_name, method_name, initial_metadata, callbacks), stream=True)

    def grpc_send(self, token: int, message: bytes, end_stream: bool) -> None:
        from .grpc import GrpcStream

        callout = self.grpc_callouts.get(token)
        if isinstance(callout, GrpcStream):
            callout.send_message(message, end_stream)

    def grpc_close(self, token: int) -> None:
        """A call is cancelled; a stream is half-closed (its close still comes)."""
        from .grpc import GrpcStream

        callout = self.grpc_callouts.get(token)
        if isinstance(callout, GrpcStream):
            callout.close_stream()
        elif callout is not None:
            del self.grpc_callouts[token]
            callout.cancel()

    def grpc_cancel(self, token: int) -> None:
        callout = self.grpc_callouts.pop(token, None)
        if callout is not None:
            _cancel(callout)

    def resolve_dns(self, context: ContextBase, token: int, address: str) -> WasmResult:
        from .dns import resolve

        if self._post is None:
            return WasmResult.Unimplemented
        root = context.root_context()
        resolve(address, self._post, lambda results: root.on_resolve_dns(token, results))
        return WasmResult.Ok


def _cancel(callout: Any) -> None:
    """Cancel a GrpcRequest or reset a GrpcStream: no further callbacks."""
    from .grpc import GrpcStream

    if isinstance(callout, GrpcStream):
        callout.reset()
    else:
        callout.cancel()


def _jittered_backoff_ms(base_ms: int) -> int:
    """JitteredLowerBoundBackOffStrategy::nextBackOffMs: random in [base, 1.5 x base)."""
    half = base_ms >> 1
    return base_ms + (random.randrange(half) if half > 0 else 0)


def _environment_variables(proto: Any) -> dict[str, str]:
    """WasmConfig: key_values, then host_env_keys taken from our environment; keys unique."""
    vm_config = proto.vm_config
    if not vm_config.HasField("environment_variables"):
        return {}
    env_vars = vm_config.environment_variables
    if vm_config.runtime == _NULL_RUNTIME and (env_vars.key_values or env_vars.host_env_keys):
        raise ConfigError("Environment variables must not be set for NullVm.")
    envs = dict(env_vars.key_values)
    for key in env_vars.host_env_keys:
        if key in env_vars.key_values:
            raise ConfigError(f"Key {key} is duplicated in envoy.extensions.wasm.v3.VmConfig.environment_variables "
                              f"for {proto.name}. All the keys must be unique.")
    for key in env_vars.host_env_keys:
        value = os.environ.get(key)
        if value is not None:
            envs[key] = value
    return envs


def _failure_policy(proto: Any) -> FailurePolicy:
    if proto.fail_open:
        if proto.failure_policy != FailurePolicy.UNSPECIFIED:
            raise ConfigError("only one of fail_open or failure_policy can be set")
        return FailurePolicy.FAIL_OPEN
    if proto.failure_policy == FailurePolicy.UNSPECIFIED:
        return FailurePolicy.FAIL_CLOSED
    if proto.failure_policy not in (FailurePolicy.FAIL_RELOAD, FailurePolicy.FAIL_CLOSED, FailurePolicy.FAIL_OPEN):
        raise ConfigError("unknown failure policy")
    return FailurePolicy(proto.failure_policy)


def wasm_thread_for(context: "FactoryContext", dispatcher: Any) -> WasmThread:
    """What a Wasm on `dispatcher`'s thread uses: its post, timers, Store and callouts."""
    cluster_manager = context.cluster_manager

    def thread_local_cluster_manager() -> Any:
        return cluster_manager.thread_local() if cluster_manager is not None else None

    return WasmThread(
        post=dispatcher.post, timer_factory=dispatcher.create_timer, stats_store=context.store_for(dispatcher),
        environment=ProxyWasmEnvironment(thread_local_cluster_manager, context.local_info.node,
                                         post=dispatcher.post, timer_factory=dispatcher.create_timer),
        time_source=dispatcher.time_source)


def _plugin(proto: Any, listener_direction: int) -> Plugin:
    """The host core's Plugin for a PluginConfig (Envoy's Plugin constructor)."""
    vm_config = proto.vm_config
    return Plugin(
        name=proto.name, root_id=proto.root_id, vm_id=vm_config.vm_id,
        plugin_configuration=any_to_bytes(proto.configuration) if proto.HasField("configuration") else b"",
        vm_configuration=any_to_bytes(vm_config.configuration) if vm_config.HasField("configuration") else b"",
        # The host core's fail_open bit is Envoy's PluginBase::fail_open_: the deprecated bool
        # alone. A trap in a callback lets the stream continue only with it; the FAIL_OPEN
        # policy instead skips the filter on later streams (Envoy 1.40).
        failure_policy=FailurePolicy.FAIL_OPEN if proto.fail_open else FailurePolicy.UNSPECIFIED,
        allow_on_headers_stop_iteration=proto.allow_on_headers_stop_iteration.value
        if proto.HasField("allow_on_headers_stop_iteration") else False,
        # Envoy's createPluginKey: equal root_id and configuration still make distinct plugins
        # (root contexts) when the name or listener direction differ.
        key_extra=f"{proto.name}||{_DIRECTIONS.get(listener_direction, 'UNSPECIFIED')}".encode(),
    )


class PluginConfig:
    """A configured plugin and its per-thread handles. Built on main; create_context on workers.

    ``singleton=True`` keeps one handle on the main thread instead (Envoy's singleton WasmService).
    """

    def __init__(self, proto: Any, context: "FactoryContext", *, singleton: bool = False) -> None:
        self.failure_policy = _failure_policy(proto)
        self.reload_base_ms = 1000
        if proto.HasField("reload_config") and proto.reload_config.backoff.HasField("base_interval"):
            self.reload_base_ms = max(1, proto.reload_config.backoff.base_interval.ToMilliseconds())
        runtime = proto.vm_config.runtime
        if runtime not in _SUPPORTED_RUNTIMES:
            raise ConfigError(f"Failed to create Wasm VM using {runtime} runtime. Envoy may be compiled "
                              f"without support for it.")
        self.name = proto.name
        self.plugin = _plugin(proto, context.listener_direction)
        self.lifecycle = LifecycleStats(context.main_store, runtime or DEFAULT_RUNTIME)
        self._context = context
        self.base = base = self._create_base(proto, context, _environment_variables(proto))
        legacy_fail_open = bool(proto.fail_open)
        plugin, store_for = self.plugin, context.store_for

        # Captures neither the slot nor this config (ThreadLocal's rule): only what it builds from.
        def init(dispatcher: Any) -> PluginHandleHolder:
            thread = wasm_thread_for(context, dispatcher)
            handle = get_or_create_thread_local_plugin(base, plugin, thread, legacy_fail_open=legacy_fail_open)
            return PluginHandleHolder(handle, dispatcher.time_source.monotonic(), thread,
                                      PluginStats(store_for(dispatcher), plugin.name))

        # A singleton (a WasmService with singleton: true) runs once, on the main thread.
        self._singleton = init(context.main_dispatcher) if singleton else None
        self._slot = None if singleton else context.thread_local.allocate_slot()
        if self._slot is not None:
            self._slot.set(init)

    def _create_base(self, proto: Any, context: "FactoryContext", envs: dict[str, str]) -> WasmHandle | None:
        """Main thread: the base VM (createWasm). Local code that does not load rejects the
        config; remote code that could not be fetched gives None (the plugin runs with no VM)."""
        vm_config = proto.vm_config
        main_thread = wasm_thread_for(context, context.main_dispatcher)
        source = read_code(vm_config, self._cluster_hosts, RemoteLoadStats(context.main_store))
        base: WasmHandle | None = None
        if source.code:
            module = compile_code(source.code, self.name, vm_config.allow_precompiled)
            if module is not None:
                vm_key = make_vm_key(vm_config.vm_id, self.plugin.vm_configuration, source.code)
                base = create_wasm(vm_key, module, self.plugin, thread=main_thread, lifecycle=self.lifecycle,
                                   envs=envs, limits=limits_for(context),
                                   allowed_capabilities=frozenset(
                                       proto.capability_restriction_config.allowed_capabilities))
        if base is None:
            _log.critical("Plugin %s failed to load", self.name)
            if not source.remote or source.nacked:
                # Envoy publishes the (empty) handle first, which logs, then rejects the config.
                get_or_create_thread_local_plugin(None, self.plugin, main_thread, legacy_fail_open=proto.fail_open)
                raise ConfigError(f"Unable to create Wasm plugin {self.name}")
        return base

    def _cluster_hosts(self, name: str) -> list[tuple[str, int]]:
        """(address, port) of the endpoints the bootstrap gives cluster `name` (DNS names are
        resolved when connecting, so remote code can come from a STRICT_DNS cluster too)."""
        bootstrap = self._context.bootstrap
        if bootstrap is None:
            return []
        for cluster in bootstrap.static_resources.clusters:
            if cluster.name == name:
                return [(lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value)
                        for locality in cluster.load_assignment.endpoints for lb in locality.lb_endpoints]
        return []

    # -- per stream (the owning thread) -----------------------------------------------------

    def _holder(self) -> PluginHandleHolder | None:
        """This thread's holder; None on a thread the slot does not know (Slot.get answers
        None for an unregistered thread)."""
        slot = self._slot
        if slot is None:
            return self._singleton
        holder: PluginHandleHolder | None = slot.get()
        return holder

    def _maybe_reload(self, holder: PluginHandleHolder) -> Wasm | None:
        """PluginConfig::maybeReloadHandleIfNeeded: the Wasm to use, reloaded if allowed."""
        if self.base is None or holder.handle is None:
            return None
        wasm = holder.handle.wasm
        if wasm is None or wasm.fail_state != FailState.RuntimeError:
            return wasm
        if self.failure_policy != FailurePolicy.FAIL_RELOAD:
            return wasm
        interval_ms = _jittered_backoff_ms(self.reload_base_ms)
        now = holder.thread.time_source.monotonic()
        if (now - holder.last_load) * 1000 < interval_ms:
            holder.stats.vm_reload_backoff.inc()
            return wasm
        holder.last_load = now
        new = get_or_create_thread_local_plugin(self.base, self.plugin, holder.thread)
        if new is None or new.wasm is None or new.wasm.is_failed():
            holder.stats.vm_reload_failure.inc()
        else:
            holder.stats.vm_reload_success.inc()
            holder.handle = new
        return holder.handle.wasm

    def wasm(self) -> Wasm | None:
        """This thread's current Wasm for the plugin (after any reload), or None."""
        holder = self._holder()
        return self._maybe_reload(holder) if holder is not None else None

    def create_context(self, env: StreamEnvironment) -> ContextBase | None:
        """A stream context for a new stream on this thread; None: skip the filter (fail open)."""
        slot = self._slot  # _holder(), inlined: once per stream
        holder: PluginHandleHolder | None = slot.get() if slot is not None else self._singleton
        if holder is None:
            return None
        handle = holder.handle
        if handle is None:
            return None
        wasm_handle = handle.wasm_handle  # PluginHandle.wasm, inlined
        wasm = wasm_handle.wasm if wasm_handle is not None else None
        if self.base is None or wasm is None or wasm.failed:  # the common case skips the reload check
            wasm = self._maybe_reload(holder)
        if wasm is None or wasm.failed:
            if self.failure_policy == FailurePolicy.FAIL_OPEN:
                return None
            return ContextBase.stream_context(None, 0, self.plugin, env)
        return ContextBase.stream_context(wasm, holder.handle.root_context_id, self.plugin, env)
