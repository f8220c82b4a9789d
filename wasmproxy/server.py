"""Server: the main thread plus `--concurrency` workers, Envoy's InstanceImpl in small.

Start-up, on the main thread:
  1. load the bootstrap (a bad config exits 1 naming the field, before anything starts);
  2. create the main Dispatcher, the ThreadLocal instance and one Dispatcher per
     worker, registering every worker with ThreadLocal before any slot exists;
  3. build the ClusterManager (its slot reaches each worker) and every listener's
     filter chain factories (HCM, Wasm plugins: base VMs and canaries run here);
  4. start the workers; each binds its own SO_REUSEPORT socket per listener, as
     Envoy does on Linux, so the kernel spreads connections across workers;
  5. start admin and the guard dog, then run the main dispatcher until a signal.

SIGTERM / SIGINT: stop accepting, let workers finish, exit 0 (Envoy's exit code
for a clean shutdown); a config that cannot be loaded exits 1.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable

from . import log
from .config import ConfigError, load_bootstrap, load_bootstrap_text
from .config import registry
from .event.dispatcher import Dispatcher
from .event.watchdog import GuardDog
from .network.listener import DEFAULT_BUFFER_LIMIT, worker_handler_factory
from .overload import DOWNSTREAM_CONNECTION_LIMIT_KEY, downstream_connection_limit
from .reload import ActiveListener, ConfigReloader
from .server_context import FactoryContext, LocalInfo
from .stats.registry import StatsRegistry
from .stats.store import Store
from .thread_local import ThreadLocalInstance

if TYPE_CHECKING:
    from .cli import Options

_log = log.get_logger("main")

# Envoy's exit codes: 0 clean shutdown, 1 for a config that fails to load or any start-up error.
EXIT_OK = 0
EXIT_FAILURE = 1


class Worker:
    """One worker thread and its Dispatcher (Envoy's WorkerImpl)."""

    def __init__(self, index: int, store: Store, tls: ThreadLocalInstance) -> None:
        self.index = index
        self.tls = tls
        self.name = f"worker_{index}"
        self.dispatcher = Dispatcher(self.name)
        self.store = store
        self._thread: threading.Thread | None = None
        self._on_start: list[Callable[[], None]] = []
        self.started = threading.Event()
        # This worker's listeners by name (reload.ActiveListener); touched on its thread only.
        self.listeners: dict[str, ActiveListener] = {}

    def add_on_start(self, cb: Callable[[], None]) -> None:
        """Main thread, before start(): cb runs on the worker's thread before it serves."""
        self._on_start.append(cb)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"wrk:{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for cb in self._on_start:
            self.dispatcher.post(cb)
        self.dispatcher.post(self.started.set)
        try:
            self.dispatcher.run()
        finally:
            # Envoy's WorkerImpl::threadRoutine: drop this thread's slot objects on the way out.
            if self.tls.is_shutdown:
                self.tls.shutdown_thread()

    def stop(self) -> None:
        self.dispatcher.exit()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class Listener:
    """One configured listener: its address and the per-worker connection handler factory."""

    def __init__(self, proto: Any, context: FactoryContext) -> None:
        self.name = proto.name
        addr = proto.address.socket_address
        self.host = addr.address
        self.port = addr.port_value
        chains = list(proto.filter_chains)
        if not chains and proto.HasField("default_filter_chain"):
            chains = [proto.default_filter_chain]
        # Filter chain matching beyond the first chain is not supported yet (docs/compatibility.md).
        chain = chains[0]
        context.listener_name = self.name
        context.listener_direction = int(proto.traffic_direction)
        self.filter_factories = []
        for i, f in enumerate(chain.filters):
            factory = registry.resolve(registry.Category.NETWORK_FILTERS, f.typed_config if f.HasField("typed_config") else f.name)
            typed = registry.unpack(f.typed_config, f"filter_chains[0].filters[{i}].typed_config")
            self.filter_factories.append(factory(typed, context))
        buffer_limit = proto.per_connection_buffer_limit_bytes.value if proto.HasField(
            "per_connection_buffer_limit_bytes") else DEFAULT_BUFFER_LIMIT
        # HCM alone keeps its own protocol factory; other chains run through the network filter manager.
        self._for_worker = worker_handler_factory(self.filter_factories, self.name, buffer_limit,
                                                  context.extras.get(DOWNSTREAM_CONNECTION_LIMIT_KEY))

    def bind(self) -> None:
        """Main thread: bind once so a port-0 listener gets a port every worker then shares."""
        probe = _reuse_port_socket(self.host, self.port)
        self.port = probe.getsockname()[1]
        # Keep the probe bound until the workers have bound theirs, so the port cannot be taken.
        self._probe = probe

    def start_on_worker(self, worker: Worker, sock: socket.socket | None = None) -> None:
        """Worker thread: bind this worker's own SO_REUSEPORT socket and serve it (or serve
        `sock`: the listening socket a reload hands over from the listener this one replaces)."""
        sock = sock or _reuse_port_socket(self.host, self.port)
        protocol_factory = self._for_worker(worker.dispatcher, worker.store)
        server = worker.dispatcher.loop.create_server(protocol_factory, sock=sock, backlog=1024)
        worker.listeners[self.name] = ActiveListener(protocol_factory, worker.dispatcher.loop.create_task(server))

    def release_probe(self) -> None:
        probe = getattr(self, "_probe", None)
        if probe is not None:
            probe.close()
            self._probe = None


class Server:
    def __init__(self, opts: "Options", bootstrap: Any) -> None:
        self.opts = opts
        self.bootstrap = bootstrap
        self.stats = StatsRegistry()
        self.main_dispatcher = Dispatcher("main_thread")
        self._stores: dict[int, Store] = {}
        self.main_store = self._new_store(self.main_dispatcher, "main_thread")
        self.tls = ThreadLocalInstance(self.main_dispatcher)
        self.workers = [Worker(i, Store(f"worker_{i}"), self.tls) for i in range(opts.concurrency)]
        for w in self.workers:
            self._stores[id(w.dispatcher)] = self.stats.add_store(w.store)
            self.tls.register_thread(w.dispatcher)
        self.exit_code = EXIT_OK
        self._shutdown_started = False

    def _new_store(self, dispatcher: Dispatcher, name: str) -> Store:
        store = self.stats.add_store(Store(name))
        self._stores[id(dispatcher)] = store
        return store

    def store_for(self, dispatcher: Any) -> Store:
        return self._stores[id(dispatcher)]

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Main thread: start everything and serve until shutdown; returns the exit code."""
        self.main_dispatcher.post(self._initialize)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.main_dispatcher.loop.add_signal_handler(sig, self.shutdown)
        ConfigReloader(self).install()  # SIGHUP, --watch-config
        try:
            self.main_dispatcher.run()
        finally:
            self._stop_workers()
        return self.exit_code

    def _initialize(self) -> None:
        """Main thread, first event of the loop: build everything; any failure exits 1 (as Envoy)."""
        try:
            self._build()
        except Exception as e:  # noqa: BLE001 - start-up must fail loudly, never half-serve
            expected = isinstance(e, (ConfigError, OSError, ValueError))
            _log.critical("error initializing configuration: %s", e, exc_info=not expected)
            self.exit_code = EXIT_FAILURE
            self.main_dispatcher.exit()

    def _build(self) -> None:
        from .upstream.cluster_manager import ClusterManager
        from .wasm.sandbox import DEFAULT_CALLBACK_DEADLINE_MS, FACTORY_CONTEXT_KEY, SandboxLimits

        node = self.bootstrap.node
        local_info = LocalInfo(
            node_id=self.opts.service_node or node.id,
            cluster=self.opts.service_cluster or node.cluster,
            zone=self.opts.service_zone or node.locality.zone,
            node=node,
        )
        self.cluster_manager = ClusterManager.from_bootstrap(
            self.bootstrap, self.main_dispatcher, self.tls, self.main_store, store_for=self.store_for
        )
        self.context = FactoryContext(
            main_dispatcher=self.main_dispatcher,
            thread_local=self.tls,
            cluster_manager=self.cluster_manager,
            stats=self.stats,
            store_for=self.store_for,
            local_info=local_info,
            bootstrap=self.bootstrap,
            shutdown=self.shutdown,
            extras={FACTORY_CONTEXT_KEY: SandboxLimits(
                callback_deadline_ms=getattr(self.opts, "wasm_callback_deadline_ms", DEFAULT_CALLBACK_DEADLINE_MS),
                memory_limit_bytes=getattr(self.opts, "wasm_memory_limit_mb", 1024) << 20),
                # One process-wide count every listener's connections share (overload manager).
                DOWNSTREAM_CONNECTION_LIMIT_KEY: downstream_connection_limit(self.bootstrap)},
        )
        self.bootstrap_extensions = self._create_bootstrap_extensions()
        self.listeners = [Listener(p, self.context) for p in self.bootstrap.static_resources.listeners]
        for listener in self.listeners:
            listener.bind()
        self._start_guard_dog()
        self._start_admin()
        self.cluster_manager.initialize(self._start_workers)

    def _create_bootstrap_extensions(self) -> list[Any]:
        """Main thread: bootstrap_extensions (envoy.bootstrap.wasm: WasmService), kept for the
        server's lifetime; a singleton's plugin runs on the main dispatcher."""
        extensions = []
        for i, ext in enumerate(self.bootstrap.bootstrap_extensions):
            factory = registry.resolve(registry.Category.BOOTSTRAP_EXTENSIONS, ext.typed_config)
            typed = registry.unpack(ext.typed_config, f"bootstrap_extensions[{i}].typed_config")
            extensions.append(factory(typed, self.context))
        return extensions

    def _start_workers(self) -> None:
        for w in self.workers:
            for listener in self.listeners:
                w.add_on_start(lambda w=w, listener=listener: listener.start_on_worker(w))
            self.guard_dog.create_watchdog(w.name, dispatcher=w.dispatcher)
            w.start()
        for w in self.workers:
            w.started.wait()
        for listener in self.listeners:
            listener.release_probe()
        _log.info("all workers started; %d listener(s) serving", len(self.listeners))

    def _start_guard_dog(self) -> None:
        wd = self.bootstrap.watchdogs.worker_watchdog if self.bootstrap.HasField("watchdogs") else None
        if wd is None and self.bootstrap.HasField("watchdog"):
            wd = self.bootstrap.watchdog
        from .config.util import duration_ms

        self.guard_dog = GuardDog(
            self.main_store,
            "workers",
            miss_timeout_ms=duration_ms(wd, "miss_timeout", 200) if wd else 200,
            megamiss_timeout_ms=duration_ms(wd, "megamiss_timeout", 1000) if wd else 1000,
            kill_timeout_ms=duration_ms(wd, "kill_timeout", 0) if wd else 0,
        )
        self.guard_dog.start()

    def _start_admin(self) -> None:
        self.admin = None
        if not self.bootstrap.HasField("admin") or not self.bootstrap.admin.HasField("address"):
            return
        from .admin import start_admin

        self.admin = start_admin(self)

    def shutdown(self) -> None:
        """Any thread: begin a clean shutdown (signals, /quitquitquit)."""
        if self._shutdown_started:
            return
        self._shutdown_started = True
        _log.warning("caught shutdown request; shutting down")
        self.main_dispatcher.exit()

    def _stop_workers(self) -> None:
        # Envoy's order (InstanceImpl::terminate): shut down global threading first so no new
        # slot updates are posted, then stop the workers, then the main-thread owners.
        self.tls.shutdown_global_threading()
        if getattr(self, "guard_dog", None) is not None:
            self.guard_dog.stop()
        for w in self.workers:
            w.stop()
        for w in self.workers:
            w.join(timeout=5)
        if getattr(self, "cluster_manager", None) is not None:
            self.cluster_manager.shutdown()
        self.tls.shutdown_thread()


def _load(opts: "Options") -> Any:
    if opts.demo:
        from .demo import demo_config_text
        from .demo.upstream import start_in_thread

        _server, port = start_in_thread("127.0.0.1", 0)
        _log.info("demo upstream listening on 127.0.0.1:%d", port)
        return load_bootstrap_text(demo_config_text(port), "yaml")
    return load_bootstrap(opts.config_path, config_yaml=opts.config_yaml)


def run_server(opts: "Options") -> int:
    """Load the config and serve until shutdown. Returns the process exit code."""
    try:
        bootstrap = _load(opts)
    except ConfigError as e:
        where = opts.config_path or "<config-yaml>"
        _log.critical("error initializing configuration '%s': %s", where, e)
        return EXIT_FAILURE
    except OSError as e:
        _log.critical("error initializing configuration '%s': %s", opts.config_path, e)
        return EXIT_FAILURE
    _log.info("wasmproxy starting: %d worker(s), pid %d", opts.concurrency, os.getpid())
    return Server(opts, bootstrap).run()
