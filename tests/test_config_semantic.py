"""Load-time checks (wasmproxy.config.semantic) and the type index cache, on variations of the front proxy."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from wasmproxy.config import ConfigError, load_bootstrap_text, type_index

CONFIGS = Path(__file__).parent / "configs"
FRONT = yaml.safe_load((CONFIGS / "front_proxy.yaml").read_text())
L0 = "static_resources.listeners[0]"
HCM_PATH = f"{L0}.filter_chains[0].filters[0].typed_config"
ROUTE0 = f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0]"
TLS = {"name": "envoy.transport_sockets.tls", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"}}
RAW = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}
STDERR_LOG = {"name": "envoy.access_loggers.stderr", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"}}


def _load(mutate: Callable[[dict[str, Any]], None]) -> None:
    document = copy.deepcopy(FRONT)
    mutate(document)
    load_bootstrap_text(json.dumps(document), "json")


def _hcm(doc: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _cluster(doc: dict[str, Any], i: int = 0) -> dict[str, Any]:
    cluster: dict[str, Any] = doc["static_resources"]["clusters"][i]
    return cluster


def _vhosts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    vhosts: list[dict[str, Any]] = _hcm(doc)["route_config"]["virtual_hosts"]
    return vhosts


def _route(doc: dict[str, Any]) -> dict[str, Any]:
    return _vhosts(doc)[0]["routes"][0]


def _set(*keys_and_value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting doc[k1][k2]... = value, where an int key indexes a list."""
    *keys, value = keys_and_value

    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return mutate


def _wasm_network_filter(path: Path) -> dict[str, Any]:
    return {"name": "envoy.filters.network.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
        "config": {"vm_config": {"code": {"local": {"filename": str(path)}}}}}}


# (id, mutation, field path, message or key phrase). Envoy 1.40's own words are quoted where checked.
REJECTED: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # Envoy: cluster manager: cluster provided LB specified but cluster 'service1' did not provide one. ...
    ("cluster_provided_lb", lambda d: _cluster(d).update(lb_policy="CLUSTER_PROVIDED"),
     "static_resources.clusters[0].lb_policy",
     "cluster manager: cluster provided LB specified but cluster 'service1' did not provide one. "
     "Check cluster documentation."),
    # Envoy: LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint
    ("logical_dns_two_endpoints", lambda d: (_cluster(d).update(type="LOGICAL_DNS"),
                                             _cluster(d)["load_assignment"]["endpoints"].append(
                                                 copy.deepcopy(_cluster(d)["load_assignment"]["endpoints"][0]))),
     "static_resources.clusters[0].load_assignment",
     "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint"),
    ("eds_cluster", lambda d: _cluster(d).update(type="EDS"), "static_resources.clusters[0].type",
     "cluster type EDS not supported by wasmproxy"),
    ("custom_cluster_type", lambda d: (_cluster(d).pop("type"), _cluster(d).update(cluster_type={
        "name": "envoy.clusters.aggregate", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
            "clusters": ["service2"]}})),
     "static_resources.clusters[0].cluster_type",
     "extension not supported: 'envoy.clusters.aggregate' with type URL "
     "'type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig' (wasmproxy supports these "
     "clusters: none)"),
    ("upstream_tls", lambda d: _cluster(d).update(transport_socket=TLS),
     "static_resources.clusters[0].transport_socket", "extension not supported: transport socket"),
    ("downstream_tls_default_chain", _set("static_resources", "listeners", 0, "default_filter_chain",
                                          {"transport_socket": TLS}),
     f"{L0}.default_filter_chain.transport_socket", "wasmproxy supports plaintext only"),
    ("listener_filter", _set("static_resources", "listeners", 0, "listener_filters",
                             [{"name": "envoy.filters.listener.tls_inspector"}]),
     f"{L0}.listener_filters[0]", "extension not supported: listener filter 'envoy.filters.listener.tls_inspector'"),
    ("unsupported_access_log", lambda d: _hcm(d)["access_log"].append({"name": "grpc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        "common_config": {"log_name": "l", "transport_api_version": "V3",
                          "grpc_service": {"envoy_grpc": {"cluster_name": "service1"}}}}}),
     f"{HCM_PATH}.access_log[1]", "extension not supported: 'grpc'"),
    ("rds", lambda d: (_hcm(d).pop("route_config"), _hcm(d).update(rds={"route_config_name": "r"})),
     f"{HCM_PATH}.rds", "rds is not supported by wasmproxy"),
    # Envoy: Only a single wildcard domain is permitted in route local_route
    ("two_wildcards", lambda d: _vhosts(d).append({"name": "b", "domains": ["*"], "routes": []}),
     f"{HCM_PATH}.route_config.virtual_hosts[1].domains[0]", "Only a single wildcard domain is permitted in route "
                                                              "local_route"),
    # Envoy: Only unique values for domains are permitted. Duplicate entry of domain A.com in route local_route
    ("duplicate_domain_case_insensitive", lambda d: _vhosts(d).append({"name": "b", "domains": ["a.com", "A.com"]}),
     f"{HCM_PATH}.route_config.virtual_hosts[1].domains[1]",
     "Only unique values for domains are permitted. Duplicate entry of domain A.com in route local_route"),
    # Envoy: missing ): (
    ("regex_missing_paren", lambda d: _route(d).update(match={"safe_regex": {"regex": "("}}),
     f"{ROUTE0}.match.safe_regex.regex", "missing ): ("),
    # Envoy: invalid perl operator: (?<=
    ("regex_lookbehind", lambda d: _route(d).update(match={"safe_regex": {"regex": "(?<=a)b"}}),
     f"{ROUTE0}.match.safe_regex.regex", "invalid perl operator: (?<="),
    # Envoy: missing ]: [
    ("regex_in_header_matcher", lambda d: _route(d).update(match={"prefix": "/", "headers": [
        {"name": "x", "string_match": {"safe_regex": {"regex": "["}}}]}),
     f"{ROUTE0}.match.headers[0].string_match.safe_regex.regex", "missing ]: ["),
    # Envoy: :-prefixed or host headers may not be modified
    ("add_pseudo_header", lambda d: _route(d).update(request_headers_to_add=[{"header": {"key": ":path",
                                                                                          "value": "/x"}}]),
     f"{ROUTE0}.request_headers_to_add[0].header.key", ":-prefixed or host headers may not be modified"),
    # Envoy: :-prefixed or host headers may not be removed
    ("remove_host_header", lambda d: _vhosts(d)[0].update(response_headers_to_remove=["Host"]),
     f"{HCM_PATH}.route_config.virtual_hosts[0].response_headers_to_remove[0]",
     ":-prefixed or host headers may not be removed"),
    # Envoy: error adding listener '127.0.0.1:8080': no filter chains specified
    ("no_filter_chains", _set("static_resources", "listeners", 0, "filter_chains", []),
     f"{L0}.filter_chains", "error adding listener '127.0.0.1:8080': no filter chains specified"),
    # Envoy: error adding listener '127.0.0.1:8080': filter chain 'two' has the same matching rules defined as
    # 'one'. duplicate matcher is: {"destination_port":8080,"server_names":["a.com"]}
    ("same_filter_chain_match", lambda d: d["static_resources"]["listeners"][0].update(filter_chains=[
        {**copy.deepcopy(d["static_resources"]["listeners"][0]["filter_chains"][0]), "name": name,
         "filter_chain_match": {"server_names": ["a.com"], "destination_port": 8080}} for name in ("one", "two")]),
     f"{L0}.filter_chains[1].filter_chain_match",
     "error adding listener '127.0.0.1:8080': filter chain 'two' has the same matching rules defined as 'one'. "
     "duplicate matcher is: {\"destination_port\":8080,\"server_names\":[\"a.com\"]}"),
    # Envoy: error adding listener: 'other' has duplicate address '127.0.0.1:8080' as existing listener, ...
    ("duplicate_listener_address", lambda d: d["static_resources"]["listeners"].append(
        {**copy.deepcopy(d["static_resources"]["listeners"][0]), "name": "other"}),
     "static_resources.listeners[1].address",
     "error adding listener: 'other' has duplicate address '127.0.0.1:8080' as existing listener, to check if the "
     "listener has duplicated addresses with other listeners or 'enable_reuse_port' is set to 'false' for the "
     "listener"),
    ("bootstrap_extension_unsupported", _set("bootstrap_extensions", [{"name": "envoy.bootstrap.internal_listener",
                                                                       "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}]),
     "bootstrap_extensions[0]", "extension not supported: 'envoy.bootstrap.internal_listener'"),
]


@pytest.mark.parametrize("mutate,path,phrase", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rejected_at_load(mutate: Callable[[dict[str, Any]], None], path: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(mutate)
    assert info.value.path == path
    assert phrase in info.value.message


ACCEPTED: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("raw_buffer_transport_socket", lambda d: _cluster(d).update(transport_socket=RAW)),
    ("static_cluster_of_ips", lambda d: _cluster(d).update(type="STATIC", load_assignment={
        "cluster_name": "service1", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "::1", "port_value": 1}}}},
            {"endpoint": {"address": {"pipe": {"path": "/tmp/sock"}}}}]}]})),
    ("validate_clusters_false", lambda d: (_hcm(d)["route_config"].update(validate_clusters=False),
                                           _vhosts(d)[0]["routes"][0]["route"].update(cluster="later"))),
    ("redirect_and_known_weighted_clusters", lambda d: _vhosts(d)[0]["routes"].extend([
        {"match": {"prefix": "/r"}, "redirect": {"path_redirect": "/"}},
        {"match": {"prefix": "/w"}, "route": {"weighted_clusters": {"clusters": [
            {"name": "service1", "weight": 1}, {"name": "service2", "weight": 3}]}}}])),
    ("empty_http_filters_defaults_to_router", lambda d: _hcm(d).pop("http_filters")),
    ("listener_access_log", _set("static_resources", "listeners", 0, "access_log", [STDERR_LOG])),
    # Envoy accepts a second listener of the same name (it replaces the first) and two on port 0.
    ("same_name_listener_replaces", lambda d: d["static_resources"]["listeners"].append(
        copy.deepcopy(d["static_resources"]["listeners"][0]))),
    ("two_ephemeral_port_listeners", lambda d: (
        d["static_resources"]["listeners"][0]["address"]["socket_address"].update(port_value=0),
        d["static_resources"]["listeners"].append({**copy.deepcopy(d["static_resources"]["listeners"][0]),
                                                   "name": "other"}))),
    ("re2_unicode_class_and_escaped_paren", lambda d: _route(d).update(
        match={"safe_regex": {"regex": "\\p{L}+\\(?=x"}})),
]


@pytest.mark.parametrize("mutate", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_at_load(mutate: Callable[[dict[str, Any]], None]) -> None:
    _load(mutate)


def test_tcp_proxy_chain_and_non_terminal_last(tmp_path: Path) -> None:
    plugin = tmp_path / "p.wasm"
    plugin.write_bytes(b"\0asm\1\0\0\0")
    tcp_proxy = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp", "cluster": "service1", "access_log": [STDERR_LOG]}}
    chain = ["static_resources", "listeners", 0, "filter_chains", 0, "filters"]
    _load(_set(*chain, [_wasm_network_filter(plugin), tcp_proxy]))
    bad_log = copy.deepcopy(tcp_proxy)
    bad_log["typed_config"]["access_log"] = [{"name": "x", "typed_config": {}}]
    with pytest.raises(ConfigError) as info:
        _load(_set(*chain, [bad_log]))
    assert info.value.path == f"{L0}.filter_chains[0].filters[0].typed_config.access_log[0]"
    assert info.value.message == "Didn't find a registered implementation for 'x' with type URL: ''"
    # Envoy: Error: non-terminal filter named envoy.filters.network.wasm of type envoy.filters.network.wasm is
    # the last filter in a network filter chain.
    with pytest.raises(ConfigError) as info:
        _load(_set(*chain, [_wasm_network_filter(plugin)]))
    assert info.value.message == ("Error: non-terminal filter named envoy.filters.network.wasm of type "
                                  "envoy.filters.network.wasm is the last filter in a network filter chain.")


def test_wasm_service_bootstrap_extension(tmp_path: Path) -> None:
    service = {"name": "envoy.bootstrap.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService", "singleton": True,
        "config": {"vm_config": {"code": {"local": {"filename": "/not/read/at/load.wasm"}}}}}}
    _load(_set("bootstrap_extensions", [service]))  # Envoy validate mode does not start services either


# -- type index cache ---------------------------------------------------------------------------

def test_type_index_build_and_cache_recovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = type_index._site_dir()
    index = type_index.build_index(site)
    assert index["envoy.config.bootstrap.v3.Bootstrap"] == "envoy.config.bootstrap.v3.bootstrap_pb2"
    assert index["envoy.config.cluster.v3.Cluster.DiscoveryType"] == "envoy.config.cluster.v3.cluster_pb2"
    assert index["google.protobuf.Duration"] == "google.protobuf.duration_pb2"
    monkeypatch.setenv("WASMPROXY_CACHE_DIR", str(tmp_path))
    cache = type_index._cache_path(type_index._cache_key(site))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{not json")
    assert type_index._load_or_build() == index  # a corrupt cache is rebuilt...
    assert json.loads(cache.read_text())["types"] == index  # ...and rewritten
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("WASMPROXY_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    assert type_index._load_or_build() == index
