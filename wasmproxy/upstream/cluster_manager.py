"""ClusterManager (main thread) and its per-worker ThreadLocalClusterManager.

The main thread owns every `Cluster` and its discovery. Each host-set change is
published to all threads through one ThreadLocal slot, as an immutable tuple of
Hosts; a worker then rebuilds that cluster's load balancer and drains the pools
of hosts that went away. Workers never touch main-thread objects other than the
shared, immutable `ClusterInfo` and `Host` instances.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..stats.store import Store
from .cluster import CaresResolver, Cluster, ClusterConfigError, ClusterInfo, Resolver
from .cluster_stats import ClusterStats
from .conn_pool import Http1ConnPool
from .host import Host, HostStats
from .load_balancer import LoadBalancer, create_load_balancer, ring_points

if TYPE_CHECKING:
    from .async_client import AsyncClient


class ThreadLocalCluster:
    """One cluster as one thread sees it: hosts, load balancer, connection pools, stats."""

    def __init__(self, info: ClusterInfo, hosts: tuple[Host, ...], dispatcher: Any, store: Store) -> None:
        self.info = info
        self.dispatcher = dispatcher
        self.stats = ClusterStats(store, info.stat_prefix)
        # Whether the load balancer wants a request hash (RING_HASH / MAGLEV).
        self.uses_hash: bool = info.lb_policy in ("RING_HASH", "MAGLEV")
        self.stats.declare()
        self._pools: dict[int, Http1ConnPool] = {}
        self._available: set[int] = set()  # ids of the hosts available at the last update
        self.hosts: tuple[Host, ...] = ()
        self.load_balancer: LoadBalancer = create_load_balancer(info.lb_policy, ())
        self.update_hosts(hosts)

    def update_hosts(self, hosts: tuple[Host, ...]) -> None:
        """A new host set or new health from main: rebuild the LB, drop pools of removed hosts,
        and drain the existing connections of hosts that just failed a health check or were
        ejected (Envoy's onHostHealthFailure)."""
        keep = {id(h) for h in hosts}
        for key in [k for k in self._pools if k not in keep]:
            self._pools.pop(key).drain_connections()
        available = {id(h) for h in hosts if h.available}
        for key in self._available - available:
            pool = self._pools.get(key)
            if pool is not None:
                pool.drain_existing_connections()
        self._available = available
        self.hosts = hosts
        self.load_balancer = create_load_balancer(
            self.info.lb_policy, hosts, self.info.least_request_choice_count, self.info.minimum_ring_size,
            self.info.healthy_panic_threshold,
        )

    def choose_host(self, hash_key: int | None = None) -> Host | None:
        """A host for a new request, or None (the router answers 503 "no healthy upstream")."""
        lb = self.load_balancer
        if lb.panic or not lb.hosts:
            self.stats.inc("lb_healthy_panic")
        host = lb.choose_host(hash_key)
        if host is None:
            self.stats.inc("upstream_cx_none_healthy")
        return host

    def conn_pool(self, host: Host) -> Http1ConnPool:
        try:
            return self._pools[id(host)]
        except KeyError:
            pool = self._pools[id(host)] = Http1ConnPool(self.dispatcher, host, self.info, self.stats)
            return pool

    def drain_connections(self) -> None:
        for pool in self._pools.values():
            pool.drain_connections()


class ThreadLocalClusterManager:
    """The per-thread cluster table (Envoy's ThreadLocalClusterManagerImpl). Owner thread only."""

    def __init__(self, dispatcher: Any, store: Store, clusters: dict[str, tuple[ClusterInfo, tuple[Host, ...]]]) -> None:
        self.dispatcher = dispatcher
        self.store = store
        self._clusters = {
            name: ThreadLocalCluster(info, hosts, dispatcher, store) for name, (info, hosts) in clusters.items()
        }
        self._async_client: AsyncClient | None = None

    def get(self, name: str) -> ThreadLocalCluster | None:
        return self._clusters.get(name)

    def add_cluster(self, info: ClusterInfo, hosts: tuple[Host, ...]) -> None:
        """A new or replaced cluster from main (a config reload): the old one's pools drain;
        requests already routed keep the ThreadLocalCluster they hold."""
        old = self._clusters.get(info.name)
        self._clusters[info.name] = ThreadLocalCluster(info, hosts, self.dispatcher, self.store)
        if old is not None:
            old.drain_connections()

    def remove_cluster(self, name: str) -> None:
        old = self._clusters.pop(name, None)
        if old is not None:
            old.drain_connections()

    def update_hosts(self, name: str, hosts: tuple[Host, ...]) -> None:
        cluster = self._clusters.get(name)
        if cluster is not None:
            cluster.update_hosts(hosts)

    def http_async_client(self) -> "AsyncClient":
        """This thread's AsyncClient (Wasm http_call, other outbound calls)."""
        if self._async_client is None:
            from .async_client import AsyncClient

            self._async_client = AsyncClient(self)
        return self._async_client

    def drain_connections(self) -> None:
        for cluster in self._clusters.values():
            cluster.drain_connections()


class ClusterManager:
    """All clusters of the bootstrap. Built and driven on the main thread.

    `tls` is the ThreadLocalInstance; `store_for(dispatcher)` returns the stats Store
    of the thread that dispatcher runs (defaults to `store` for every thread).
    """

    def __init__(
        self,
        cluster_protos: list[Any],
        main_dispatcher: Any,
        tls: Any,
        store: Store,
        store_for: Callable[[Any], Store] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._dispatcher = main_dispatcher
        self._store = store
        self.clusters: dict[str, Cluster] = {}
        self._members: dict[str, tuple[int, ...]] = {}  # cluster -> ids of its last published hosts
        self._warming: dict[str, Cluster] = {}  # added or changed by a reload, not yet active
        self._resolver = resolver
        for proto in cluster_protos:
            if proto.name in self.clusters:
                raise ClusterConfigError(f"cluster manager: duplicate cluster '{proto.name}'")
            self.clusters[proto.name] = self.build_cluster(proto)
        store.counter("cluster_manager.cluster_added").inc(len(self.clusters))
        store.gauge("cluster_manager.active_clusters").set(len(self.clusters))
        # Envoy shows these from the start (a config reload moves them).
        store.counter("cluster_manager.cluster_modified")
        store.counter("cluster_manager.cluster_removed")
        store.gauge("cluster_manager.warming_clusters").set(0)
        for cluster in self.clusters.values():
            self._publish_membership(cluster)
            self._members[cluster.info.name] = tuple(id(h) for h in cluster.hosts)
            if cluster.hosts:
                store.counter(cluster.info.stat_prefix + "membership_change").inc()
                # Envoy matches each host's transport socket once when the host set is built.
                store.counter(cluster.info.stat_prefix + "default.total_match_count").inc(len(cluster.hosts))
        snapshot = {name: (c.info, c.hosts) for name, c in self.clusters.items()}
        store_for = store_for or (lambda _d: store)
        self._slot = tls.allocate_slot()
        # The init callback captures only the snapshot and the store factory, never self or the slot.
        self._slot.set(lambda dispatcher: ThreadLocalClusterManager(dispatcher, store_for(dispatcher), snapshot))

    @classmethod
    def from_bootstrap(cls, bootstrap: Any, main_dispatcher: Any, tls: Any, store: Store, **kw: Any) -> "ClusterManager":
        return cls(list(bootstrap.static_resources.clusters), main_dispatcher, tls, store, **kw)

    def initialize(self, on_done: Callable[[], None]) -> None:
        """Start DNS discovery; `on_done` runs on main when every cluster has its first host set."""
        remaining = [len(self.clusters)]

        def one_done() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                on_done()

        if not self.clusters:
            on_done()
            return
        for cluster in list(self.clusters.values()):
            cluster.initialize(one_done)

    def has_cluster(self, name: str) -> bool:
        return name in self.clusters

    # -- config reload (wasmproxy.reload): add, replace and remove clusters at run time ----------

    def build_cluster(self, proto: Any) -> Cluster:
        """Main thread: a Cluster for `proto`, validated but neither started nor published
        (ClusterConfigError if wasmproxy cannot run it). Call `shutdown()` on one not used."""
        # One c-ares channel for all clusters unless a test passes its own resolver.
        self._resolver = self._resolver or CaresResolver()
        return Cluster(proto, self._dispatcher, self._on_hosts_changed, self._resolver, self._store)

    def add_or_update_cluster(self, cluster: Cluster, on_active: Callable[[], None] | None = None) -> None:
        """Main thread: warm `cluster` (its first DNS answer / health-check pass) while any cluster
        of that name keeps serving, then make it active on every thread; `on_active` after that.
        Envoy's cluster_manager.cluster_added / cluster_modified count it."""
        name = cluster.info.name
        previous = self._warming.pop(name, None)
        if previous is not None:
            previous.shutdown()
        self._warming[name] = cluster
        self._store.gauge("cluster_manager.warming_clusters").set(len(self._warming))

        def warmed() -> None:
            if self._warming.get(name) is not cluster:
                return  # superseded by a later update while warming
            del self._warming[name]
            self._store.gauge("cluster_manager.warming_clusters").set(len(self._warming))
            old = self.clusters.get(name)
            self.clusters[name] = cluster
            if old is not None:
                old.shutdown()
            self._store.counter("cluster_manager.cluster_modified" if old else "cluster_manager.cluster_added").inc()
            self._store.gauge("cluster_manager.active_clusters").set(len(self.clusters))
            self._publish_membership(cluster)
            self._members[name] = tuple(id(h) for h in cluster.hosts)
            info, hosts = cluster.info, cluster.hosts
            self._slot.run_on_all_threads(lambda tlcm: tlcm.add_cluster(info, hosts), on_active)

        cluster.initialize(warmed)

    def remove_cluster(self, name: str) -> None:
        """Main thread: stop discovery for `name` and drop it from every thread (its pools drain)."""
        warming = self._warming.pop(name, None)
        if warming is not None:
            warming.shutdown()
        cluster = self.clusters.pop(name, None)
        if cluster is None:
            return
        cluster.shutdown()
        self._members.pop(name, None)
        self._store.counter("cluster_manager.cluster_removed").inc()
        self._store.gauge("cluster_manager.active_clusters").set(len(self.clusters))
        self._slot.run_on_all_threads(lambda tlcm: tlcm.remove_cluster(name), None)

    def thread_local(self) -> ThreadLocalClusterManager:
        """The calling thread's ThreadLocalClusterManager (a registered worker, or main)."""
        tlcm = self._slot.get()
        assert tlcm is not None, "thread not registered with the ThreadLocal instance"
        return tlcm

    def get_thread_local_cluster(self, name: str) -> ThreadLocalCluster | None:
        return self.thread_local().get(name)

    def _on_hosts_changed(self, cluster: Cluster) -> None:
        """A cluster's hosts or their health changed: update gauges and every thread's copy."""
        if self.clusters.get(cluster.info.name) is not cluster:
            return  # still warming (published whole when active) or already replaced
        self._publish_membership(cluster)
        name, hosts = cluster.info.name, cluster.hosts
        members = tuple(id(h) for h in hosts)
        if self._members.get(name) != members:  # health changes are not membership changes
            self._members[name] = members
            self._store.counter(cluster.info.stat_prefix + "membership_change").inc()
        self._slot.run_on_all_threads(lambda tlcm: tlcm.update_hosts(name, hosts), None)

    def _publish_membership(self, cluster: Cluster) -> None:
        prefix = cluster.info.stat_prefix
        self._store.gauge(prefix + "membership_total").set(len(cluster.hosts))
        self._store.gauge(prefix + "membership_healthy").set(sum(1 for h in cluster.hosts if h.available))
        self._store.gauge(prefix + "membership_degraded").set(0)
        if cluster.info.lb_policy == "RING_HASH":
            # Envoy's ring_hash_lb gauges (each worker builds the same ring; main reports it once).
            candidates = [h for h in cluster.hosts if h.available] or list(cluster.hosts)
            points = ring_points(candidates, cluster.info.minimum_ring_size) if candidates else [0]
            self._store.gauge(prefix + "ring_hash_lb.size").set(sum(points))
            self._store.gauge(prefix + "ring_hash_lb.min_hashes_per_host").set(min(points))
            self._store.gauge(prefix + "ring_hash_lb.max_hashes_per_host").set(max(points))

    def shutdown(self) -> None:
        """Stop discovery (main thread). Workers close their pools when their loops stop."""
        for cluster in [*self.clusters.values(), *self._warming.values()]:
            cluster.shutdown()

    # -- admin ---------------------------------------------------------------------------

    def clusters_text(self) -> str:
        """Admin `/clusters` in Envoy's text format."""
        lines: list[str] = []
        for cluster in self.clusters.values():
            info, name = cluster.info, cluster.info.name
            lines.append(f"{name}::observability_name::{info.observability_name}")
            for prio, rm in (("default_priority", info.resource_manager), ("high_priority", info.high_resource_manager)):
                lines.append(f"{name}::{prio}::max_connections::{rm.connections.max}")
                lines.append(f"{name}::{prio}::max_pending_requests::{rm.pending_requests.max}")
                lines.append(f"{name}::{prio}::max_requests::{rm.requests.max}")
                lines.append(f"{name}::{prio}::max_retries::{rm.retries.max}")
            lines.append(f"{name}::added_via_api::false")
            for host in cluster.hosts:
                p = f"{name}::{host.address}"
                s = host.stats
                lines.append(f"{p}::cx_active::{s.cx_active}")
                lines.append(f"{p}::cx_connect_fail::{s.cx_connect_fail}")
                lines.append(f"{p}::cx_total::{s.cx_total}")
                lines.append(f"{p}::rq_active::{s.rq_active}")
                lines.append(f"{p}::rq_error::{s.rq_error}")
                lines.append(f"{p}::rq_pending_active::{s.rq_pending_active}")
                lines.append(f"{p}::rq_success::{s.rq_success}")
                lines.append(f"{p}::rq_timeout::{s.rq_timeout}")
                lines.append(f"{p}::rq_total::{s.rq_total}")
                lines.append(f"{p}::hostname::{host.hostname}")
                lines.append(f"{p}::health_flags::{host.health_flags()}")
                lines.append(f"{p}::weight::{host.weight}")
                lines.append(f"{p}::region::")
                lines.append(f"{p}::zone::")
                lines.append(f"{p}::sub_zone::")
                lines.append(f"{p}::canary::false")
                lines.append(f"{p}::priority::{host.priority}")
                lines.append(f"{p}::success_rate::-1")
                lines.append(f"{p}::local_origin_success_rate::-1")
        return "".join(line + "\n" for line in lines)

    def clusters_json(self) -> dict[str, Any]:
        """Admin `/clusters?format=json` (envoy.admin.v3.Clusters as proto JSON: zeros omitted,
        64-bit values as strings)."""
        statuses = []
        for cluster in self.clusters.values():
            info = cluster.info
            thresholds = []
            for prio, rm in ((None, info.resource_manager), ("HIGH", info.high_resource_manager)):
                t: dict[str, Any] = {} if prio is None else {"priority": prio}
                t.update(max_connections=rm.connections.max, max_pending_requests=rm.pending_requests.max,
                         max_requests=rm.requests.max, max_retries=rm.retries.max)
                thresholds.append(t)
            entry: dict[str, Any] = {"name": info.name}
            hosts = []
            for host in cluster.hosts:
                stats: list[dict[str, str]] = []
                for kind, names in (("", HostStats.COUNTERS), ("GAUGE", HostStats.GAUGES)):
                    for stat in names:
                        item = {"type": kind} if kind else {}
                        item["name"] = stat
                        value = getattr(host.stats, stat)
                        if value:
                            item["value"] = str(value)
                        stats.append(item)
                h: dict[str, Any] = {
                    "address": {"socket_address": {"address": host.address.host, "port_value": host.address.port}},
                    "stats": stats,
                    "health_status": {"eds_health_status": "HEALTHY" if host.healthy else "UNHEALTHY"},
                    "weight": host.weight,
                    "locality": {},
                }
                if host.hostname:
                    h["hostname"] = host.hostname
                hosts.append(h)
            if hosts:
                entry["host_statuses"] = hosts
            entry["circuit_breakers"] = {"thresholds": thresholds}
            entry["observability_name"] = info.observability_name
            statuses.append(entry)
        return {"cluster_statuses": statuses}


__all__ = [
    "ClusterManager",
    "ThreadLocalCluster",
    "ThreadLocalClusterManager",
]
