"""The checks Envoy makes while it builds the server from a valid-looking Bootstrap, for the
subset wasmproxy supports, worded as Envoy 1.40 words them (and each prefixed with the field path):

* cluster manager: duplicate cluster names, STATIC endpoints that are not IP addresses,
  LOGICAL_DNS with more than one endpoint, CLUSTER_PROVIDED lb without a provider;
* listeners: a listener needs an IP address (not shared with another listener) and a filter chain,
  its chains' matches differ; each network filter and HTTP filter resolves to a
  supported extension; terminal filters (router, HCM, tcp_proxy) come last and only last;
* static route tables: every cluster a route names exists (``validate_clusters`` defaults to true
  for an inline route_config), domains are unique, at most one ``*`` per table, regexes compile as
  RE2 would, and no header mutation touches ``:``-headers or Host;
* a Wasm filter's local code file exists (Envoy reads it while building the filter chain);
* the overload manager has only the global_downstream_max_connections resource monitor;
* what wasmproxy does not implement (xDS, TLS transport sockets, listener filters, custom
  cluster types) is an error naming the field, never silently ignored.

Envoy accepts two static listeners with the same name (the later one replaces the earlier one, and
may reuse its address), so that is not an error here either.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from wasmproxy.config import pgv, registry
from wasmproxy.config.errors import ConfigError
from wasmproxy.config.registry import Category

_RAW_BUFFER = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
_SUPPORTED_DISCOVERY = ("STATIC", "STRICT_DNS", "LOGICAL_DNS")
_WASM_FILTERS = ("envoy.filters.http.wasm", "envoy.filters.network.wasm")
# The one overload manager resource monitor wasmproxy implements (wasmproxy/overload.py).
GLOBAL_DOWNSTREAM_MAX_CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"
_DOWNSTREAM_CONNECTIONS_CONFIG = "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"


def check_bootstrap(bootstrap: Message) -> None:
    """Raise ConfigError for the first load-time problem Envoy (or wasmproxy's subset) would reject."""
    if bootstrap.HasField("dynamic_resources"):
        raise ConfigError("dynamic resources (xDS: LDS/CDS/ADS) are not supported by wasmproxy; "
                          "use static_resources", "dynamic_resources")
    for i, ext in enumerate(bootstrap.bootstrap_extensions):
        _find_and_unpack(Category.BOOTSTRAP_EXTENSIONS, ext, f"bootstrap_extensions[{i}]")
    _check_overload_manager(bootstrap)
    resources = bootstrap.static_resources
    clusters = _check_clusters(resources.clusters)
    bound: dict[str, str] = {}  # "ip:port" -> listener name, for fixed ports
    for i, listener in enumerate(resources.listeners):
        path = f"static_resources.listeners[{i}]"
        _check_listener(listener, path, clusters)
        address = listener.address.socket_address
        if listener.address.WhichOneof("address") != "socket_address" or address.port_value == 0:
            continue
        where = _address_string(listener.address)
        owner = bound.setdefault(where, listener.name)
        if owner != listener.name:  # a listener of the same name replaces the earlier one, as in Envoy
            raise ConfigError(
                f"error adding listener: '{listener.name}' has duplicate address '{where}' as existing listener, to "
                f"check if the listener has duplicated addresses with other listeners or 'enable_reuse_port' is "
                f"set to 'false' for the listener", f"{path}.address")


# -- clusters ------------------------------------------------------------------------------------

def _check_clusters(clusters: Any) -> set[str]:
    names: set[str] = set()
    for i, cluster in enumerate(clusters):
        path = f"static_resources.clusters[{i}]"
        if cluster.name in names:
            raise ConfigError(f"cluster manager: duplicate cluster '{cluster.name}'", f"{path}.name")
        names.add(cluster.name)
        discovery = _check_discovery_type(cluster, path)
        if cluster.HasField("transport_socket"):
            _check_transport_socket(cluster.transport_socket, f"{path}.transport_socket")
        if cluster.lb_policy == cluster.CLUSTER_PROVIDED:
            raise ConfigError(f"cluster manager: cluster provided LB specified but cluster '{cluster.name}' did "
                              f"not provide one. Check cluster documentation.", f"{path}.lb_policy")
        endpoints = cluster.load_assignment.endpoints
        if discovery == "LOGICAL_DNS" and (len(endpoints) != 1 or len(endpoints[0].lb_endpoints) != 1):
            raise ConfigError("LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single "
                              "lb_endpoint", f"{path}.load_assignment")
        if discovery == "STATIC":
            _check_static_endpoints(endpoints, f"{path}.load_assignment")
    return names


def _check_discovery_type(cluster: Any, path: str) -> str:
    if cluster.WhichOneof("cluster_discovery_type") == "cluster_type":
        custom = cluster.cluster_type
        _find_and_unpack(Category.CLUSTERS, custom, f"{path}.cluster_type")
        return "custom"
    discovery: str = cluster.DiscoveryType.Name(cluster.type)
    if discovery not in _SUPPORTED_DISCOVERY:
        raise ConfigError(f"cluster type {discovery} not supported by wasmproxy (supported: "
                          f"{', '.join(_SUPPORTED_DISCOVERY)})", f"{path}.type")
    return discovery


def _check_static_endpoints(endpoints: Any, path: str) -> None:
    for j, locality in enumerate(endpoints):
        for k, lb_endpoint in enumerate(locality.lb_endpoints):
            address = lb_endpoint.endpoint.address
            if address.WhichOneof("address") != "socket_address" or address.socket_address.resolver_name:
                continue
            host = address.socket_address.address
            if not _is_ip(host):
                raise ConfigError(
                    f"malformed IP address: {host}. Consider setting resolver_name or setting cluster type to "
                    f"'STRICT_DNS' or 'LOGICAL_DNS'",
                    f"{path}.endpoints[{j}].lb_endpoints[{k}].endpoint.address.socket_address.address")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_transport_socket(socket: Any, path: str) -> None:
    type_name = registry.type_name_of(socket.typed_config) if socket.HasField("typed_config") else ""
    if type_name not in ("", _RAW_BUFFER):
        raise ConfigError(f"extension not supported: transport socket '{socket.name}' with type URL "
                          f"'type.googleapis.com/{type_name}' (wasmproxy supports plaintext only)", path)


# -- listeners and filter chains -----------------------------------------------------------------

def _check_listener(listener: Any, path: str, clusters: set[str]) -> None:
    if not listener.HasField("address"):
        raise ConfigError(f"error adding listener named '{listener.name}': address is necessary", f"{path}.address")
    socket_address = listener.address.socket_address
    if listener.address.WhichOneof("address") == "socket_address" and not _is_ip(socket_address.address):
        raise ConfigError(f"malformed IP address: {socket_address.address}",
                          f"{path}.address.socket_address.address")
    if len(listener.listener_filters):
        first = listener.listener_filters[0]
        raise ConfigError(f"extension not supported: listener filter '{first.name}' (wasmproxy supports no "
                          f"listener filters)", f"{path}.listener_filters[0]")
    _check_access_logs(listener.access_log, f"{path}.access_log")
    chains = [(f"{path}.filter_chains[{i}]", chain) for i, chain in enumerate(listener.filter_chains)]
    if not chains and not listener.HasField("default_filter_chain"):
        raise ConfigError(f"error adding listener '{_address_string(listener.address)}': no filter chains specified",
                          f"{path}.filter_chains")
    _check_distinct_matches(listener, path)
    if listener.HasField("default_filter_chain"):
        chains.append((f"{path}.default_filter_chain", listener.default_filter_chain))
    for chain_path, chain in chains:
        if chain.HasField("transport_socket"):
            _check_transport_socket(chain.transport_socket, f"{chain_path}.transport_socket")
        _check_network_filters(chain.filters, f"{chain_path}.filters", clusters)


def _address_string(address: Any) -> str:
    """Envoy's ``Address::Instance::asString()`` for an IP socket address."""
    socket_address = address.socket_address
    host = socket_address.address
    return f"[{host}]:{socket_address.port_value}" if ":" in host else f"{host}:{socket_address.port_value}"


def _check_distinct_matches(listener: Any, path: str) -> None:
    seen: dict[bytes, Any] = {}
    for i, chain in enumerate(listener.filter_chains):
        key = chain.filter_chain_match.SerializeToString(deterministic=True)
        first = seen.setdefault(key, chain)
        if first is not chain:
            matcher = json.dumps(json_format.MessageToDict(chain.filter_chain_match, preserving_proto_field_name=True),
                                 separators=(",", ":"))
            raise ConfigError(f"error adding listener '{_address_string(listener.address)}': filter chain "
                              f"'{chain.name}' has the same matching rules defined as '{first.name}'. duplicate "
                              f"matcher is: {matcher}", f"{path}.filter_chains[{i}].filter_chain_match")


def _check_network_filters(filters: Any, path: str, clusters: set[str]) -> None:
    for i, entry in enumerate(filters):
        entry_path = f"{path}[{i}]"
        typed = entry.typed_config if entry.HasField("typed_config") else None
        ext = registry.find(Category.NETWORK_FILTERS, entry.name, typed, entry_path)
        _check_terminal(ext, entry.name, i == len(filters) - 1, "network", entry_path)
        assert typed is not None  # find() rejects a filter without a type
        config = registry.unpack(typed, f"{entry_path}.typed_config")
        if ext.name == "envoy.filters.network.http_connection_manager":
            _check_hcm(config, f"{entry_path}.typed_config", clusters)
        elif ext.name == "envoy.filters.network.tcp_proxy":
            _check_access_logs(config.access_log, f"{entry_path}.typed_config.access_log")


def _check_terminal(ext: registry.Extension, name: str, is_last: bool, chain: str, path: str) -> None:
    if ext.terminal and not is_last:
        raise ConfigError(f"Error: terminal filter named {name} of type {ext.name} must be the last filter in a "
                          f"{chain} filter chain.", path)
    if is_last and not ext.terminal:
        raise ConfigError(f"Error: non-terminal filter named {name} of type {ext.name} is the last filter in a "
                          f"{chain} filter chain.", path)


def _check_access_logs(logs: Any, path: str) -> None:
    for i, log in enumerate(logs):
        _find_and_unpack(Category.ACCESS_LOGGERS, log, f"{path}[{i}]")


def _check_overload_manager(bootstrap: Message) -> None:
    """Only the global_downstream_max_connections monitor: any other overload setting is an error."""
    overload = bootstrap.overload_manager
    for i, monitor in enumerate(overload.resource_monitors):
        path = f"overload_manager.resource_monitors[{i}]"
        typed = monitor.typed_config if monitor.HasField("typed_config") else None
        if monitor.name != GLOBAL_DOWNSTREAM_MAX_CONNECTIONS or typed is None or \
                registry.type_name_of(typed) != _DOWNSTREAM_CONNECTIONS_CONFIG:
            raise ConfigError(f"resource monitor '{monitor.name}' is not supported by wasmproxy (supported: "
                              f"{GLOBAL_DOWNSTREAM_MAX_CONNECTIONS})", path)
        registry.unpack(typed, f"{path}.typed_config")
    if overload.actions:
        raise ConfigError("overload actions are not supported by wasmproxy", "overload_manager.actions")
    if overload.loadshed_points:
        raise ConfigError("overload loadshed points are not supported by wasmproxy", "overload_manager.loadshed_points")


def _find_and_unpack(category: Category, entry: Any, path: str) -> registry.Extension:
    """Resolve an extension entry (name + typed_config) and unpack its config once, which validates
    a TypedStruct's contents the way Envoy's factory does."""
    typed = entry.typed_config if entry.HasField("typed_config") else None
    ext = registry.find(category, entry.name, typed, path)
    assert typed is not None  # find() rejects an entry without a type
    config = registry.unpack(typed, f"{path}.typed_config")
    if ext.name in _WASM_FILTERS:
        _check_wasm_code(config.config.vm_config.code, f"{path}.typed_config.config.vm_config.code")
    return ext


def _check_wasm_code(code: Any, path: str) -> None:
    # Envoy reads a Wasm filter's local code while building the filter chain (validate mode too);
    # a WasmService (bootstrap extension) is only started by a serving server.
    if code.WhichOneof("specifier") == "local" and code.local.WhichOneof("specifier") == "filename":
        if not os.path.isfile(code.local.filename):
            raise ConfigError(f"Invalid path: {code.local.filename}", f"{path}.local.filename")


# -- HTTP connection manager ---------------------------------------------------------------------

def _check_hcm(hcm: Any, path: str, clusters: set[str]) -> None:
    specifier = hcm.WhichOneof("route_specifier")
    if specifier != "route_config":
        raise ConfigError(f"{specifier} is not supported by wasmproxy (no xDS); use an inline route_config",
                          f"{path}.{specifier}")
    _check_access_logs(hcm.access_log, f"{path}.access_log")
    # An empty list gets the router by default (Envoy's HCM config), so only a non-empty chain is checked.
    active: list[tuple[int, Any, registry.Extension]] = []
    for i, entry in enumerate(hcm.http_filters):
        if entry.is_optional and (not entry.HasField("typed_config")
                                  or registry.lookup(Category.HTTP_FILTERS, entry.typed_config) is None):
            continue  # Envoy skips an optional filter it has no factory for
        active.append((i, entry, _find_and_unpack(Category.HTTP_FILTERS, entry, f"{path}.http_filters[{i}]")))
    for n, (i, entry, ext) in enumerate(active):
        _check_terminal(ext, entry.name, n == len(active) - 1, "http", f"{path}.http_filters[{i}]")
    route_config = hcm.route_config
    _check_route_table(route_config, f"{path}.route_config",
                       clusters if _validate_clusters(route_config) else None)


def _validate_clusters(route_config: Any) -> bool:
    # RouteConfiguration.validate_clusters: unset means true for a static (inline) route table.
    return not route_config.HasField("validate_clusters") or route_config.validate_clusters.value


def _check_route_table(route_config: Any, path: str, clusters: set[str] | None) -> None:
    for message, message_path in pgv.iter_messages(route_config, path):
        _check_header_mutations(message, message_path)
        if message.DESCRIPTOR.full_name == "envoy.type.matcher.v3.RegexMatcher":
            problem = re2_problem(message.regex)
            if problem:
                raise ConfigError(problem, f"{message_path}.regex")
    seen_domains: set[str] = set()
    for v, vhost in enumerate(route_config.virtual_hosts):
        vhost_path = f"{path}.virtual_hosts[{v}]"
        for d, domain in enumerate(vhost.domains):
            key = domain.lower()
            if key == "*" and key in seen_domains:
                raise ConfigError(f"Only a single wildcard domain is permitted in route {route_config.name}",
                                  f"{vhost_path}.domains[{d}]")
            if key in seen_domains:
                raise ConfigError(f"Only unique values for domains are permitted. Duplicate entry of domain {domain} "
                                  f"in route {route_config.name}", f"{vhost_path}.domains[{d}]")
            seen_domains.add(key)
        if clusters is None:
            continue
        for r, route in enumerate(vhost.routes):
            if route.WhichOneof("action") != "route":
                continue
            action = route.route
            action_path = f"{vhost_path}.routes[{r}].route"
            specifier = action.WhichOneof("cluster_specifier")
            if specifier == "cluster" and action.cluster not in clusters:
                raise ConfigError(f"route: unknown cluster '{action.cluster}'", f"{action_path}.cluster")
            if specifier == "weighted_clusters":
                for w, weighted in enumerate(action.weighted_clusters.clusters):
                    if weighted.name and weighted.name not in clusters:
                        raise ConfigError(f"route: unknown weighted cluster '{weighted.name}'",
                                          f"{action_path}.weighted_clusters.clusters[{w}].name")


def _check_header_mutations(message: Message, path: str) -> None:
    # Envoy's HeaderParser refuses to touch pseudo-headers and Host (HeaderUtility::isModifiableHeader).
    fields = message.DESCRIPTOR.fields_by_name
    for name in ("request_headers_to_add", "response_headers_to_add"):
        if name in fields:
            for i, option in enumerate(getattr(message, name)):
                if not _is_modifiable(option.header.key):
                    raise ConfigError(":-prefixed or host headers may not be modified",
                                      f"{path}.{name}[{i}].header.key")
    for name in ("request_headers_to_remove", "response_headers_to_remove"):
        if name in fields:
            for i, header in enumerate(getattr(message, name)):
                if not _is_modifiable(header):
                    raise ConfigError(":-prefixed or host headers may not be removed", f"{path}.{name}[{i}]")


def _is_modifiable(header: str) -> bool:
    return not header.startswith(":") and header.lower() != "host"


_RE2_LOOKAROUND = re.compile(r"(?<!\\)\(\?<?[=!]")
_RE2_BACKREFERENCE = re.compile(r"\\[1-9]")


def re2_problem(pattern: str) -> str | None:
    """Why RE2 (Envoy's regex engine) would reject ``pattern``, in RE2's words where we know them,
    or None. Python's ``re`` stands in for RE2; constructs only one of them has are handled first:
    lookarounds and back-references (Python only) are errors, ``\\p{..}`` classes (RE2 only) pass."""
    lookaround = _RE2_LOOKAROUND.search(pattern)
    if lookaround:
        return f"invalid perl operator: {lookaround.group(0)}"
    backreference = _RE2_BACKREFERENCE.search(pattern)
    if backreference:
        return f"invalid escape sequence: {backreference.group(0)}"
    try:
        re.compile(pattern)
    except re.error as e:
        message = e.msg
        if message.startswith("bad escape \\p") or message.startswith("bad escape \\P"):
            return None
        if message.startswith("missing ), unterminated subpattern"):
            return f"missing ): {pattern}"
        if message.startswith("unterminated character set"):
            return f"missing ]: {pattern}"
        if message.startswith("unbalanced parenthesis"):
            return f"unexpected ): {pattern}"
        return f"invalid regex '{pattern}': {message}"
    return None
