"""start_admin: wire the admin handler to a running Server (Envoy's AdminImpl setup).

Kept apart from the handler so the handler stays testable with plain providers;
this module is the only one that knows the Server's shape, through the small
:class:`AdminHost` protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2
from google.protobuf import json_format

from wasmproxy.admin.handler import AdminHandler, ClusterStatus, HostStatus
from wasmproxy.admin.server import AdminServer
from wasmproxy.event.dispatcher import Dispatcher
from wasmproxy.log import get_logger
from wasmproxy.stats import StatsRegistry

__all__ = ["AdminHost", "start_admin"]

_log = get_logger("admin")


class AdminHost(Protocol):
    """What start_admin reads from the server (``cluster_manager`` is optional)."""

    bootstrap: Any  # envoy.config.bootstrap.v3.Bootstrap
    opts: Any  # wasmproxy.cli.Options
    stats: StatsRegistry
    main_dispatcher: Dispatcher

    def shutdown(self) -> None: ...


def _command_line_options(opts: Any) -> dict[str, Any]:
    mode = str(getattr(opts, "mode", "serve"))
    return {
        "concurrency": getattr(opts, "concurrency", 1),
        "config_path": getattr(opts, "config_path", None) or "",
        "config_yaml": getattr(opts, "config_yaml", None) or "",
        "log_level": getattr(opts, "log_level", "info"),
        "component_log_level": getattr(opts, "component_log_level", ""),
        "log_path": getattr(opts, "log_path", None) or "",
        "service_cluster": getattr(opts, "service_cluster", ""),
        "service_node": getattr(opts, "service_node", ""),
        "service_zone": getattr(opts, "service_zone", ""),
        "drain_time": f"{getattr(opts, 'drain_time_s', 600)}s",
        "mode": mode[:1].upper() + mode[1:],
    }


def _cluster_statuses(cluster_manager: Any) -> list[ClusterStatus]:
    """The upstream ClusterManager's clusters as ``/clusters`` rows."""
    out = []
    for cluster in cluster_manager.clusters.values():
        info = cluster.info
        hosts = []
        for host in cluster.hosts:
            s = host.stats
            hosts.append(
                HostStatus(
                    address=str(host.address),
                    stats={
                        name: getattr(s, name, 0)
                        for name in ("cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error",
                                     "rq_pending_active", "rq_success", "rq_timeout", "rq_total")
                    },
                    hostname=host.hostname,
                    health_flags=host.health_flags(),
                    weight=host.weight,
                    priority=host.priority,
                )
            )

        def thresholds(rm: Any) -> dict[str, int]:
            return {
                "max_connections": rm.connections.max,
                "max_pending_requests": rm.pending_requests.max,
                "max_requests": rm.requests.max,
                "max_retries": rm.retries.max,
            }

        out.append(
            ClusterStatus(
                name=info.name,
                hosts=hosts,
                observability_name=info.observability_name,
                default_priority=thresholds(info.resource_manager),
                high_priority=thresholds(info.high_resource_manager),
            )
        )
    return out


def _config_dump(bootstrap: Any) -> config_dump_pb2.ConfigDump:
    """Bootstrap, static clusters and static listeners, in Envoy's config_dump order."""
    dump = config_dump_pb2.ConfigDump()
    dump.configs.add().Pack(config_dump_pb2.BootstrapConfigDump(bootstrap=bootstrap))
    clusters = config_dump_shared_pb2.ClustersConfigDump()
    for c in bootstrap.static_resources.clusters:
        clusters.static_clusters.add().cluster.Pack(c)
    dump.configs.add().Pack(clusters)
    listeners = config_dump_shared_pb2.ListenersConfigDump()
    for listener in bootstrap.static_resources.listeners:
        listeners.static_listeners.add().listener.Pack(listener)
    dump.configs.add().Pack(listeners)
    return dump


def start_admin(server: AdminHost) -> AdminServer:
    """Main dispatcher's thread: bind ``bootstrap.admin.address`` (an OSError here means the
    address is unusable), serve admin on the main loop, and start the stats flush timer
    (``stats_flush_interval``, default 5 s) so histograms reach admin output."""
    bootstrap = server.bootstrap
    addr = bootstrap.admin.address.socket_address
    cluster_manager = getattr(server, "cluster_manager", None)
    handler = AdminHandler(
        server.stats,
        command_line_options=_command_line_options(server.opts),
        node=lambda: {"user_agent_name": "envoy",
                      **json_format.MessageToDict(bootstrap.node, preserving_proto_field_name=True)},
        clusters=(lambda: _cluster_statuses(cluster_manager)) if cluster_manager is not None else None,
        listeners=lambda: [(lst.name, lst.host, lst.port) for lst in getattr(server, "listeners", [])],
        config_dump=lambda: _config_dump(bootstrap),
        shutdown=server.shutdown,
        flush_on_admin=bootstrap.stats_flush_on_admin,
    )
    admin = AdminServer(handler, server.main_dispatcher, addr.address or "127.0.0.1", addr.port_value,
                        address_path=getattr(server.opts, "admin_address_path", None))
    admin.bind()
    task = server.main_dispatcher.loop.create_task(admin.start())

    def started(t: Any) -> None:
        if t.cancelled() or t.exception() is not None:
            _log.critical("admin: could not start: %s", t.exception() if not t.cancelled() else "cancelled")

    task.add_done_callback(started)
    interval = bootstrap.stats_flush_interval
    interval_ms = (interval.seconds * 1000 + interval.nanos / 1e6) if bootstrap.HasField("stats_flush_interval") else 5000
    server.stats.start_flush_timer(server.main_dispatcher, interval_ms)
    return admin
