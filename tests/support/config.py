"""Bootstrap rendering for tests: a standard loopback config, or any YAML template.

Templates use ``${name}`` placeholders, which never clash with YAML's own braces; any other
``$`` (regexes end in one) is left alone. Placeholders standing alone as a YAML value keep their
type (a port stays an int).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .ports import LOOPBACK

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
_WHOLE = re.compile(r"^\$\{(\w+)\}$")

ROUTER_FILTER: dict[str, Any] = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def render_template(text: str, values: Mapping[str, object]) -> str:
    """Fill ``${name}`` placeholders in a YAML template; a missing value raises KeyError."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def substitute(obj: Any, values: Mapping[str, object]) -> Any:
    """Fill placeholders inside a parsed YAML structure, keeping lone placeholders' types."""
    if isinstance(obj, str):
        m = _WHOLE.match(obj)
        if m:
            return values[m.group(1)]
        return render_template(obj, values)
    if isinstance(obj, list):
        return [substitute(x, values) for x in obj]
    if isinstance(obj, dict):
        return {k: substitute(v, values) for k, v in obj.items()}
    return obj


def static_cluster(name: str, port: int, host: str = LOOPBACK, **extra: Any) -> dict[str, Any]:
    """A STATIC cluster with one loopback endpoint."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}}}}]}],
        },
        **extra,
    }


def bootstrap(*, listener_port: int, admin_port: int, virtual_hosts: Sequence[Mapping[str, Any]],
              clusters: Mapping[str, int] | Sequence[Mapping[str, Any]] = (),
              http_filters: Sequence[Mapping[str, Any]] = (),
              hcm: Mapping[str, Any] | None = None,
              route_config: Mapping[str, Any] | None = None,
              router: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A bootstrap with one loopback HTTP listener (HCM, `http_filters` then the router) and admin.

    `clusters` is either {name: port} (STATIC loopback clusters) or full cluster dicts; `hcm`,
    `route_config` and `router` add or override fields of the HttpConnectionManager, its route
    config and the router filter's config.
    """
    if isinstance(clusters, Mapping):
        cluster_list = [static_cluster(n, p) for n, p in clusters.items()]
    else:
        cluster_list = [dict(c) for c in clusters]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "ingress_http",
        "codec_type": "AUTO",
        "route_config": {"name": "local_route", "virtual_hosts": list(virtual_hosts),
                         **(route_config or {})},
        "http_filters": [*http_filters, {**ROUTER_FILTER, "typed_config": {
            **ROUTER_FILTER["typed_config"], **(router or {})}}],
        **(hcm or {}),
    }
    return {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "listener_0",
                "address": {"socket_address": {"address": LOOPBACK, "port_value": listener_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": manager,
                }]}],
            }],
            "clusters": cluster_list,
        },
    }


def write_yaml(doc: Mapping[str, Any] | str, path: str | Path) -> Path:
    """Write a bootstrap (dict or YAML text) to `path`; returns the path."""
    path = Path(path)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(dict(doc), sort_keys=False))
    return path
