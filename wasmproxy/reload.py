"""Live config reload: SIGHUP (or `--watch-config`) re-reads the bootstrap and applies the difference.

Envoy changes clusters and listeners at run time through CDS and LDS; wasmproxy has no xDS, so
re-reading the config file is its way to the same updates, with the same thread model: every
new object is built and validated on the main thread, then published to the workers through
ThreadLocal slots (run_on_all_threads). Nothing on the request path takes a lock.

A reload is all or nothing. The new bootstrap is loaded and every changed cluster and listener
is built (and a changed listener's address bound) before anything is applied; any error rejects
the whole config, logs why, and the running config keeps serving. Then:

1. clusters: an added or changed cluster warms (first DNS answer, first health-check pass) while
   the old one serves, then replaces it on every thread (ClusterManager.add_or_update_cluster);
2. listeners: a listener whose HTTP connection manager config changed but whose address and
   stat_prefix did not is updated in place: each worker swaps the config of its connection
   handler and of its open connections, between two events of its loop; a stream already
   running keeps the config object it started with. When the HTTP filter chain is unchanged
   (e.g. only routes or timeouts changed), its filter factories (Wasm plugins included) are
   kept as they are, so no VM is created; a changed chain is built anew (an unchanged plugin
   in it reuses its base VM and per-worker clones through the vm_key caches; only its
   canary is new). Any other change replaces the listener: the old one stops accepting on
   every worker and drains (its connections finish, and are closed after --drain-time-s),
   the new one starts on every worker; on the same address it takes over each worker's
   listening socket, so no connection waiting to be accepted is reset. Removed listeners
   drain the same way; added ones start;
3. clusters no longer in the config are removed (after the listeners stopped routing to them).

Stats (main thread): `server.reload_success`, `server.reload_failed` (a config rejected: the
running one keeps serving); Envoy's `listener_manager.listener_added / listener_modified /
listener_removed / listener_in_place_updated` (an in-place update counts as modified too, as in
Envoy) and `cluster_manager.cluster_added / cluster_modified / cluster_removed`.

Envoy itself ignores SIGHUP ("caught and eating SIGHUP") and changes listeners only through LDS.
One difference from Envoy's in-place LDS update: Envoy keeps an open connection on the old
filter chain until it is drained (--drain-time-s), while here an open connection's next stream
already uses the new config (what this feature asks for: the new routes everywhere at once).

Bootstrap fields other than static_resources (admin, node, watchdogs, bootstrap_extensions,
stats) are not reloaded: a change there is logged and ignored.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import log
from .config import ConfigError, load_bootstrap

if TYPE_CHECKING:
    from .server import Listener, Server, Worker
    from .upstream.cluster import Cluster

__all__ = ["ActiveListener", "ConfigReloader", "WATCH_INTERVAL_MS"]

_log = log.get_logger("main")

_HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

# How often --watch-config looks at the config file's mtime, size and inode.
WATCH_INTERVAL_MS = 1000


@dataclass
class ActiveListener:
    """One listener as one worker serves it (Envoy's ActiveTcpListener). Worker thread only.

    `handler` is the protocol factory given to the worker's server (the HCM's
    WorkerConnectionHandler or a network ConnectionHandler): `drain()`, `close_all()`.
    `server` is the task that creates the asyncio Server listening on the worker's socket.
    """

    handler: Any
    server: "asyncio.Task[Any]"
    drain_timer: Any = field(default=None)

    def take_socket(self) -> socket.socket | None:
        """A duplicate of the listening socket, so a replacing listener on the same address
        serves the same kernel socket and its accept queue (Envoy hands its sockets over the same
        way); None if the server is not listening yet."""
        task = self.server
        if not task.done() or task.cancelled() or task.exception() is not None or not task.result().sockets:
            return None
        fd = task.result().sockets[0].fileno()
        return socket.socket(fileno=os.dup(fd))

    def stop_accepting(self) -> None:
        """Close the listening socket; accepted connections are left to finish."""

        def close(task: "asyncio.Task[Any]") -> None:
            if not task.cancelled() and task.exception() is None:
                task.result().close()

        if self.server.done():
            close(self.server)
        else:
            self.server.add_done_callback(close)


def _same(a: Any, b: Any) -> bool:
    return bool(a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True))


def _hcm_alone(listener: "Listener") -> Any | None:
    """The HcmFactory of a listener whose chain is the HTTP connection manager alone, else None."""
    factories = listener.filter_factories
    if len(factories) == 1 and hasattr(factories[0], "for_worker") and hasattr(factories[0], "config"):
        return factories[0]
    return None


def _without_hcm(proto: Any) -> Any:
    """The listener with its (single) HCM's typed_config cleared: what must match for an in-place update."""
    out = copy.deepcopy(proto)
    out.filter_chains[0].filters[0].ClearField("typed_config")
    return out


def _hcm_proto(proto: Any) -> Any:
    from .config import registry

    return registry.unpack(proto.filter_chains[0].filters[0].typed_config, "filter_chains[0].filters[0].typed_config")


class _ClusterManagerView:
    """The running ClusterManager as seen by a config being built: it has the new config's clusters
    (route validation asks `has_cluster`); everything else is the ClusterManager itself."""

    def __init__(self, cluster_manager: Any, names: set[str]) -> None:
        self._cluster_manager = cluster_manager
        self._names = names

    def has_cluster(self, name: str) -> bool:
        return name in self._names

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cluster_manager, name)


@dataclass
class _Plan:
    """Everything a reload will apply, built and validated on main before any of it is."""

    bootstrap: Any
    clusters: list["Cluster"] = field(default_factory=list)  # added or changed, not started
    removed_clusters: list[str] = field(default_factory=list)
    # name -> the new HCM config for listeners updated in place
    in_place: dict[str, Any] = field(default_factory=dict)
    added: list["Listener"] = field(default_factory=list)  # bound, to start on every worker
    replaced: list["Listener"] = field(default_factory=list)
    removed_listeners: list[str] = field(default_factory=list)

    def discard(self) -> None:
        """A rejected plan: stop what was built (probe sockets, cluster discovery)."""
        for listener in [*self.added, *self.replaced]:
            listener.release_probe()
        for cluster in self.clusters:
            cluster.shutdown()


class ConfigReloader:
    """Reloads the server's config file on the main thread (SIGHUP, --watch-config)."""

    def __init__(self, server: "Server") -> None:
        self._server = server
        store = server.main_store
        self._success = store.counter("server.reload_success")
        self._failed = store.counter("server.reload_failed")
        self._listener_added = store.counter("listener_manager.listener_added")
        self._listener_modified = store.counter("listener_manager.listener_modified")
        self._listener_removed = store.counter("listener_manager.listener_removed")
        self._listener_in_place = store.counter("listener_manager.listener_in_place_updated")
        self._in_progress = False
        self._pending = False
        self._watch_timer: Any = None
        self._file_state: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Main thread: SIGHUP reloads; with opts.watch_config, so does a change of the file."""
        server = self._server
        # Each thread's slot object is its Worker (None on main): reload work reaches workers
        # through run_on_all_threads, like every other state change.
        workers = {id(w.dispatcher): w for w in server.workers}
        self._workers_slot = server.tls.allocate_slot()
        self._workers_slot.set(lambda dispatcher: workers.get(id(dispatcher)))
        server.main_dispatcher.loop.add_signal_handler(signal.SIGHUP, self.request)
        self._server.main_dispatcher.post(self._count_static_listeners)
        if getattr(self._server.opts, "watch_config", False) and self._server.opts.config_path:
            self._file_state = self._stat()
            self._server.main_dispatcher.post(self._start_watch)  # timers are made on the running loop

    def _start_watch(self) -> None:
        self._watch_timer = self._server.main_dispatcher.create_timer(self._on_watch_timer)
        self._watch_timer.enable_timer(WATCH_INTERVAL_MS)

    def _count_static_listeners(self) -> None:
        """Runs after start-up built the listeners: Envoy counts them in listener_added too."""
        self._listener_added.inc(len(getattr(self._server, "listeners", [])))

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._server.opts.config_path or "")
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _on_watch_timer(self) -> None:
        state = self._stat()
        if state is not None and state != self._file_state:
            self.request()
        self._watch_timer.enable_timer(WATCH_INTERVAL_MS)

    # -- the reload ------------------------------------------------------------------------

    def request(self) -> None:
        """Main thread: reload now, or right after the reload in progress."""
        server = self._server
        if server.opts.demo or (not server.opts.config_path and not server.opts.config_yaml):
            _log.warning("config reload: the embedded demo config cannot be reloaded")
            return
        if getattr(server, "_shutdown_started", False):
            return
        if getattr(server, "listeners", None) is None or not all(w.started.is_set() for w in server.workers):
            _log.warning("config reload requested before start-up finished; ignored")
            return
        if self._in_progress:
            self._pending = True
            return
        self._reload()

    def _reload(self) -> None:
        server = self._server
        self._file_state = self._stat()
        try:
            bootstrap = load_bootstrap(server.opts.config_path, config_yaml=server.opts.config_yaml)
            plan = self._plan(bootstrap)
        except Exception as e:  # noqa: BLE001 - any failure rejects the config; the old one serves on
            self._failed.inc()
            expected = isinstance(e, (ConfigError, OSError, ValueError))
            _log.error("config reload rejected (the running config keeps serving): %s", e, exc_info=not expected)
            return
        self._in_progress = True
        try:
            self._apply(plan)
        except Exception:  # noqa: BLE001 - a bug while applying: log it, keep serving, allow the next reload
            self._failed.inc()
            self._in_progress = False
            _log.exception("config reload failed while being applied; the config may be partly updated")

    def _plan(self, bootstrap: Any) -> _Plan:
        server = self._server
        old_bootstrap = server.bootstrap
        for name in ("admin", "node", "watchdog", "watchdogs", "stats_config", "stats_flush_interval"):
            if _field_changed(old_bootstrap, bootstrap, name):
                _log.warning("config reload: '%s' changed; it is not reloadable and keeps its start-up value", name)
        if len(old_bootstrap.bootstrap_extensions) != len(bootstrap.bootstrap_extensions) or any(
                not _same(a, b) for a, b in zip(old_bootstrap.bootstrap_extensions, bootstrap.bootstrap_extensions)):
            _log.warning("config reload: 'bootstrap_extensions' changed; they are not reloadable")
        plan = _Plan(bootstrap)
        try:
            self._plan_clusters(plan)
            self._plan_listeners(plan)
        except BaseException:
            plan.discard()
            raise
        return plan

    def _plan_clusters(self, plan: _Plan) -> None:
        cm = self._server.cluster_manager
        old = {c.name: c for c in self._server.bootstrap.static_resources.clusters}
        seen: set[str] = set()
        for i, proto in enumerate(plan.bootstrap.static_resources.clusters):
            if proto.name in seen:
                raise ConfigError(f"cluster manager: duplicate cluster '{proto.name}'",
                                  f"static_resources.clusters[{i}]")
            seen.add(proto.name)
            if proto.name in old and _same(old[proto.name], proto):
                continue
            plan.clusters.append(cm.build_cluster(proto))
        plan.removed_clusters = [name for name in old if name not in seen]

    def _plan_listeners(self, plan: _Plan) -> None:
        from .server import Listener

        server = self._server
        context = dataclasses.replace(
            server.context, bootstrap=plan.bootstrap,
            cluster_manager=_ClusterManagerView(
                server.cluster_manager, {c.name for c in plan.bootstrap.static_resources.clusters}))
        current = {listener.name: listener for listener in server.listeners}
        old_protos = {p.name: p for p in server.bootstrap.static_resources.listeners}
        seen: set[str] = set()
        for i, proto in enumerate(plan.bootstrap.static_resources.listeners):
            if proto.name in seen:
                raise ConfigError(f"error adding listener: duplicate listener name '{proto.name}'",
                                  f"static_resources.listeners[{i}]")
            seen.add(proto.name)
            old_proto = old_protos.get(proto.name)
            if old_proto is not None and _same(old_proto, proto):
                continue
            old = current.get(proto.name)
            if old is not None and old_proto is not None and self._plan_in_place(plan, context, old, old_proto, proto):
                continue
            listener = Listener(proto, context)
            listener.bind()
            (plan.replaced if old is not None else plan.added).append(listener)
        plan.removed_listeners = [name for name in current if name not in seen]

    def _plan_in_place(self, plan: _Plan, context: Any, old: "Listener", old_proto: Any, proto: Any) -> bool:
        """Plan an in-place HCM update when only the HCM's config changed and its stats keep their
        names; returns False when the listener must be replaced instead."""
        from .http.conn_manager import HttpConnectionManagerConfig

        old_hcm = _hcm_alone(old)
        if old_hcm is None or len(proto.filter_chains) != 1 or len(proto.filter_chains[0].filters) != 1:
            return False
        if len(old_proto.filter_chains) != 1 or not _same(_without_hcm(old_proto), _without_hcm(proto)):
            return False
        if not proto.filter_chains[0].filters[0].typed_config.type_url.endswith(_HCM_TYPE):
            return False
        new_hcm, old_hcm_proto = _hcm_proto(proto), _hcm_proto(old_proto)
        if type(new_hcm) is not type(old_hcm_proto) or new_hcm.stat_prefix != old_hcm_proto.stat_prefix:
            return False
        path = f"listener '{proto.name}' filter_chains[0].filters[0].typed_config"
        context.listener_name = proto.name
        context.listener_direction = int(proto.traffic_direction)
        if _differs_only_in(old_hcm_proto, new_hcm, "route_config"):
            from .router.config import RouteConfig, RouteConfigError

            config = copy.copy(old_hcm.config)
            try:
                config.route_config = RouteConfig.from_proto(new_hcm.route_config, context.cluster_manager.has_cluster)
            except RouteConfigError as e:
                raise ConfigError(str(e), f"{path}.route_config") from None
        else:
            same_filters = _same_filters(old_hcm_proto, new_hcm)
            build = copy.deepcopy(new_hcm)
            if same_filters:
                del build.http_filters[:]  # built with a default router, replaced by the old filters below
            try:
                config = HttpConnectionManagerConfig.from_proto(build, context)
            except ConfigError as e:
                raise ConfigError(e.message, f"{path}.{e.path}" if e.path else path) from None
            if same_filters:
                config.filter_factories = old_hcm.config.filter_factories
        plan.in_place[proto.name] = config
        return True

    # -- applying a plan (main thread, then every worker) ---------------------------------------

    def _apply(self, plan: _Plan) -> None:
        server = self._server
        cm = server.cluster_manager
        remaining = [len(plan.clusters) + 1]

        def cluster_active() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._apply_listeners(plan)

        for cluster in plan.clusters:
            cm.add_or_update_cluster(cluster, cluster_active)
        cluster_active()

    def _apply_listeners(self, plan: _Plan) -> None:
        server = self._server
        drain_ms = max(0, int(getattr(server.opts, "drain_time_s", 600))) * 1000
        in_place, starting = plan.in_place, [*plan.replaced, *plan.added]
        stopping = {listener.name for listener in plan.replaced} | set(plan.removed_listeners)
        old_addresses = {listener.name: (listener.host, listener.port) for listener in server.listeners}
        same_address = {listener.name for listener in plan.replaced
                        if old_addresses.get(listener.name) == (listener.host, listener.port)}

        def on_thread(worker: "Worker | None") -> None:
            if worker is None:
                return  # main: nothing listens there
            try:
                on_worker(worker)
            except Exception:  # noqa: BLE001 - the other listeners and the completion must still happen
                _log.exception("config reload: applying listeners on %s failed", worker.name)

        def on_worker(worker: "Worker") -> None:
            for name, config in in_place.items():
                active = worker.listeners.get(name)
                if active is not None:
                    _swap_hcm_config(active.handler, config)
            handed_over: dict[str, socket.socket | None] = {}
            for name in stopping:
                active = worker.listeners.pop(name, None)
                if active is not None:
                    if name in same_address:
                        handed_over[name] = active.take_socket()
                    _drain(worker, active, drain_ms)
            for listener in starting:
                listener.start_on_worker(worker, handed_over.get(listener.name))

        def done() -> None:
            for listener in starting:
                listener.release_probe()
            self._finish(plan)

        self._workers_slot.run_on_all_threads(on_thread, done)

    def _finish(self, plan: _Plan) -> None:
        server = self._server
        for name in plan.removed_clusters:
            server.cluster_manager.remove_cluster(name)
        by_name = {listener.name: listener for listener in server.listeners}
        for listener in plan.replaced:
            by_name[listener.name] = listener
        for name, config in plan.in_place.items():
            hcm = _hcm_alone(by_name[name])
            if hcm is not None:
                hcm.config = config  # what a worker started later would get
        for listener in plan.added:
            by_name[listener.name] = listener
        server.listeners = [by_name[p.name] for p in plan.bootstrap.static_resources.listeners]
        # Only static_resources are reloaded: keep every other field as it started.
        server.bootstrap.static_resources.CopyFrom(plan.bootstrap.static_resources)
        self._listener_added.inc(len(plan.added))
        self._listener_modified.inc(len(plan.replaced) + len(plan.in_place))
        self._listener_removed.inc(len(plan.removed_listeners))
        self._listener_in_place.inc(len(plan.in_place))
        self._success.inc()
        _log.info("config reloaded: clusters %d added or changed, %d removed; listeners %d added, %d changed "
                  "(%d in place), %d removed", len(plan.clusters), len(plan.removed_clusters), len(plan.added),
                  len(plan.replaced) + len(plan.in_place), len(plan.in_place), len(plan.removed_listeners))
        self._in_progress = False
        if self._pending:
            self._pending = False
            self._reload()


def _field_changed(old: Any, new: Any, name: str) -> bool:
    if old.HasField(name) != new.HasField(name):
        return True
    return bool(old.HasField(name) and not _same(getattr(old, name), getattr(new, name)))


def _differs_only_in(old: Any, new: Any, name: str) -> bool:
    """Whether two messages are equal once field `name` is cleared in both."""
    a, b = copy.deepcopy(old), copy.deepcopy(new)
    a.ClearField(name)
    b.ClearField(name)
    return _same(a, b)


def _same_filters(old_hcm: Any, new_hcm: Any) -> bool:
    """Whether the HTTP filter chains are identical (their factories, Wasm plugins included, can be
    kept: the router's depends only on the stat_prefix, which an in-place update keeps)."""
    return len(old_hcm.http_filters) == len(new_hcm.http_filters) and all(
        _same(a, b) for a, b in zip(old_hcm.http_filters, new_hcm.http_filters))


def _swap_hcm_config(handler: Any, config: Any) -> None:
    """Worker thread: new connections and the next stream of each open connection use `config`;
    running streams keep the config object they hold (ActiveStream.config)."""
    handler.config = config
    for conn in handler.connections:
        conn.config = config


def _drain(worker: "Worker", active: ActiveListener, drain_ms: int) -> None:
    """Worker thread: stop accepting, let the connections finish, close what is left after drain_ms.

    An idle HTTP connection is not closed under its client (which may be sending a request right
    now): it answers its next request with connection: close, as Envoy's drain does.
    """
    active.stop_accepting()
    if hasattr(active.handler, "config"):  # the HCM's own handler
        active.handler.drain(close_idle=False)
    else:
        active.handler.drain()
    if drain_ms > 0:
        active.drain_timer = worker.dispatcher.create_timer(active.handler.close_all)
        active.drain_timer.enable_timer(drain_ms)
    else:
        active.handler.close_all()
