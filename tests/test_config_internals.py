"""wasmproxy.config internals: lazy imports, the extension registry, the proto3-JSON parser, PGV rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from wasmproxy.config import ConfigError, load_bootstrap_text, pgv, registry, type_index, util
from wasmproxy.config.proto_json import parse_into
from wasmproxy.config.registry import Category

CONFIGS = Path(__file__).parent / "configs"
ROUTER_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

_PROBE = """
import json, sys, time
start = time.perf_counter()
from wasmproxy.config import load_bootstrap
load_bootstrap(sys.argv[1])
elapsed = time.perf_counter() - start
print(json.dumps({"pb2": sorted(m for m in sys.modules if m.endswith("_pb2")),
                  "wasmproxy": sorted(m for m in sys.modules if m.startswith("wasmproxy.")),
                  "seconds": elapsed}))
"""


def _probe(cache_dir: Path) -> dict:
    env = {**os.environ, "WASMPROXY_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(CONFIGS / "front_proxy.yaml")], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_loading_imports_only_the_protos_the_config_names(tmp_path: Path) -> None:
    first = _probe(tmp_path)
    cache_files = list(tmp_path.glob("xds-type-index-*.json"))
    assert len(cache_files) == 1  # the index is built once and cached
    mtime = cache_files[0].stat().st_mtime_ns
    second = _probe(tmp_path)
    assert cache_files[0].stat().st_mtime_ns == mtime  # ...and reused, not rebuilt
    for probe in (first, second):
        loaded = set(probe["pb2"])
        # xds-protos has ~770 modules; a front proxy needs the bootstrap's closure plus HCM and router.
        assert len(loaded) < 150, len(loaded)
        assert "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2" in loaded
        assert "envoy.extensions.filters.http.router.v3.router_pb2" in loaded
        assert "envoy.extensions.filters.http.cors.v3.cors_pb2" not in loaded
        assert "envoy.extensions.filters.http.wasm.v3.wasm_pb2" not in loaded
        # Validation must not import any factory (the data path).
        assert all(m.startswith("wasmproxy.config") for m in probe["wasmproxy"]), probe["wasmproxy"]


def test_type_index_resolves_nested_and_well_known_types() -> None:
    assert type_index.message_class("google.protobuf.StringValue").DESCRIPTOR.full_name == \
        "google.protobuf.StringValue"
    nested = type_index.message_class("envoy.config.cluster.v3.Cluster.CommonLbConfig")
    assert nested is not None and nested.DESCRIPTOR.full_name == "envoy.config.cluster.v3.Cluster.CommonLbConfig"
    assert type_index.message_class("envoy.nothing.v3.Nothing") is None
    assert type_index.message_class("envoy.config.cluster.v3.Cluster.DiscoveryType") is None  # an enum


# -- registry -------------------------------------------------------------------------------------

def _any(type_url: str, value: bytes = b"") -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=value)


def test_registry_lookup_by_type_url_name_and_any() -> None:
    by_any = registry.lookup(Category.HTTP_FILTERS, _any(ROUTER_URL))
    assert by_any is not None and by_any.terminal
    assert by_any.factory_path == "wasmproxy.router.router_filter:create_router_filter_factory"
    assert registry.lookup(Category.HTTP_FILTERS, "envoy.filters.http.router") is by_any
    assert registry.lookup(Category.HTTP_FILTERS, ROUTER_URL) is by_any
    assert registry.lookup(Category.NETWORK_FILTERS, ROUTER_URL) is None  # categories are separate
    wasm = registry.lookup(Category.HTTP_FILTERS, "envoy.extensions.filters.http.wasm.v3.Wasm")
    assert wasm is not None and not wasm.terminal
    loggers = {e.type_name for e in registry.supported(Category.ACCESS_LOGGERS)}
    assert loggers == {"envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                       "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
                       "envoy.extensions.access_loggers.file.v3.FileAccessLog"}
    assert [e.name for e in registry.supported(Category.BOOTSTRAP_EXTENSIONS)] == ["envoy.bootstrap.wasm"]


def test_registry_resolve_imports_the_factory_on_demand() -> None:
    saved = registry.lookup(Category.HTTP_FILTERS, ROUTER_URL)
    assert saved is not None
    registry.register(Category.HTTP_FILTERS, saved.name, saved.type_name, "os.path:join", terminal=True)
    try:
        assert registry.resolve(Category.HTTP_FILTERS, _any(ROUTER_URL)) is os.path.join
    finally:
        registry.register(Category.HTTP_FILTERS, saved.name, saved.type_name, saved.factory_path, terminal=True)
    with pytest.raises(ConfigError, match="extension not supported: .*Cors"):
        registry.resolve(Category.HTTP_FILTERS, "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors")
    with pytest.raises(ValueError):
        registry.register(Category.HTTP_FILTERS, "x", "y", "no_colon")


def test_typed_struct_is_looked_through_and_validated() -> None:
    yaml_text = """
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config: {}
          http_filters:
          - name: router
            typed_config:
              "@type": type.googleapis.com/xds.type.v3.TypedStruct
              type_url: type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              value: {%s}
"""
    bootstrap = load_bootstrap_text(yaml_text % "suppress_envoy_headers: true")
    typed = bootstrap.static_resources.listeners[0].filter_chains[0].filters[0].typed_config
    router_any = registry.unpack(typed).http_filters[0].typed_config
    assert registry.type_name_of(router_any) == "envoy.extensions.filters.http.router.v3.Router"
    assert registry.unpack(router_any).suppress_envoy_headers is True
    # Envoy: Protobuf message (type envoy.extensions.filters.http.router.v3.Router reason INVALID_ARGUMENT:
    # invalid JSON in envoy.extensions.filters.http.router.v3.Router, near 1:10 (offset 9): no such field:
    # 'bogus') has unknown fields
    with pytest.raises(ConfigError) as info:
        load_bootstrap_text(yaml_text % "bogus: 1")
    assert info.value.path.endswith("http_filters[0].typed_config.value.bogus")
    assert "type envoy.extensions.filters.http.router.v3.Router reason INVALID_ARGUMENT: no such field: 'bogus'" \
        in info.value.message


def test_optional_unsupported_http_filter_is_skipped_like_envoy() -> None:
    text = (CONFIGS / "front_proxy.yaml").read_text().replace(
        "          http_filters:\n",
        "          http_filters:\n"
        "          - name: envoy.filters.http.cors\n"
        "            is_optional: true\n"
        "            typed_config:\n"
        "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors\n")
    assert "is_optional" in text
    load_bootstrap_text(text)


def _wasm_file(tmp_path: Path) -> Path:
    path = tmp_path / "plugin.wasm"
    path.write_bytes(b"\0asm\1\0\0\0")  # config validation only checks that the file exists
    return path


def test_wasm_filter_with_string_value_configuration_loads(tmp_path: Path) -> None:
    plugin = _wasm_file(tmp_path)
    text = (CONFIGS / "front_proxy.yaml").read_text().replace(
        "          http_filters:\n",
        "          http_filters:\n"
        "          - name: envoy.filters.http.wasm\n"
        "            typed_config:\n"
        "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n"
        "              config:\n"
        "                name: my_plugin\n"
        "                configuration:\n"
        "                  \"@type\": type.googleapis.com/google.protobuf.StringValue\n"
        "                  value: '{\"header\": \"x-hello\"}'\n"
        "                vm_config:\n"
        "                  runtime: envoy.wasm.runtime.v8\n"
        "                  environment_variables: {key_values: {MODE: test}}\n"
        f"                  code: {{local: {{filename: {plugin}}}}}\n")
    bootstrap = load_bootstrap_text(text)
    hcm = registry.unpack(bootstrap.static_resources.listeners[0].filter_chains[0].filters[0].typed_config)
    wasm = registry.unpack(hcm.http_filters[0].typed_config)
    assert wasm.config.vm_config.code.local.filename == str(plugin)
    assert dict(wasm.config.vm_config.environment_variables.key_values) == {"MODE": "test"}
    assert registry.unpack(wasm.config.configuration).value == '{"header": "x-hello"}'
    # Envoy 1.40 for a missing file: Invalid path: /nonexistent/p.wasm
    with pytest.raises(ConfigError) as info:
        load_bootstrap_text(text.replace(str(plugin), "/nonexistent/p.wasm"))
    assert info.value.path.endswith("http_filters[0].typed_config.config.vm_config.code.local.filename")
    assert info.value.message == "Invalid path: /nonexistent/p.wasm"


def test_router_must_be_last_in_the_http_chain(tmp_path: Path) -> None:
    # Envoy: Error: terminal filter named envoy.filters.http.router of type envoy.filters.http.router must be
    # the last filter in a http filter chain.
    plugin = _wasm_file(tmp_path)
    text = (CONFIGS / "front_proxy.yaml").read_text().replace(
        "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n",
        "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n"
        "          - name: envoy.filters.http.wasm\n"
        "            typed_config:\n"
        "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n"
        f"              config: {{vm_config: {{code: {{local: {{filename: {plugin}}}}}}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_bootstrap_text(text)
    assert info.value.path.endswith("typed_config.http_filters[0]")
    assert info.value.message == ("Error: terminal filter named envoy.filters.http.router of type "
                                  "envoy.filters.http.router must be the last filter in a http filter chain.")


def test_listener_address_must_be_an_ip() -> None:
    # Envoy 1.40: malformed IP address: localhost
    text = (CONFIGS / "front_proxy.yaml").read_text().replace("address: 127.0.0.1\n        port_value: 8080",
                                                               "address: localhost\n        port_value: 8080")
    with pytest.raises(ConfigError) as info:
        load_bootstrap_text(text)
    assert (info.value.path, info.value.message) == ("static_resources.listeners[0].address.socket_address.address",
                                                     "malformed IP address: localhost")


def test_xds_is_reported_as_not_supported() -> None:
    with pytest.raises(ConfigError) as info:
        load_bootstrap_text("dynamic_resources: {ads_config: {api_type: GRPC}}\n")
    assert info.value.path == "dynamic_resources" and "not supported" in info.value.message


# -- proto3 JSON parsing ----------------------------------------------------------------------------

def _cluster(value: dict):
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    message = Cluster()
    parse_into(value, message)
    return message


def test_parser_accepts_proto3_json_forms() -> None:
    cluster = _cluster({"name": "c", "connectTimeout": "1.5s", "per_connection_buffer_limit_bytes": "1024",
                        "type": 1, "metadata": {"filter_metadata": {"f": {"k": [1, "a", None]}}},
                        "lb_policy": None})
    assert (cluster.connect_timeout.seconds, cluster.connect_timeout.nanos) == (1, 500_000_000)
    assert cluster.per_connection_buffer_limit_bytes.value == 1024
    assert cluster.type == cluster.STRICT_DNS
    assert list(cluster.metadata.filter_metadata["f"]["k"]) == [1, "a", None]
    assert cluster.HasField("connect_timeout") and cluster.lb_policy == cluster.ROUND_ROBIN  # null: unset


@pytest.mark.parametrize("value,path,phrase", [
    ({"name": "c", "type": "STATIC", "cluster_type": {"name": "x"}}, "cluster_type",
     "'cluster_type' has already been set (either directly or as part of a oneof)"),
    ({"name": "c", "connectTimeout": "1s", "connect_timeout": "2s"}, "connect_timeout", "has already been set"),
    ({"per_connection_buffer_limit_bytes": -1}, "per_connection_buffer_limit_bytes",
     "uint32: number -1 out of range [0, 4294967295]"),
    ({"per_connection_buffer_limit_bytes": 1.5}, "per_connection_buffer_limit_bytes",
     "expected integer, but JSON number had fractional part"),
    ({"name": True}, "name", "string: expected a string, got true"),
    ({"respect_dns_ttl": "on"}, "respect_dns_ttl", "bool: expected true or false, got string 'on'"),
    ({"respect_dns_ttl": 1}, "respect_dns_ttl", "bool: expected true or false, got number 1"),
    ({"load_assignment": []}, "load_assignment", "message envoy.config.endpoint.v3.ClusterLoadAssignment: "
                                                 "expected an object, got an array"),
    ({"connect_timeout": "5"}, "connect_timeout", "invalid duration '5'"),
    ({"dns_lookup_family": "V5"}, "dns_lookup_family", "unknown enum value: 'V5') has unknown fields"),
    ({"load_assignment": {"endpoints": [None]}}, "load_assignment.endpoints[0]", "null is not allowed"),
])
def test_parser_errors_name_the_field(value: dict, path: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cluster(value)
    assert info.value.path == path
    assert phrase in info.value.message


def test_any_without_type_and_with_unknown_type() -> None:
    from envoy.config.listener.v3.listener_components_pb2 import Filter

    with pytest.raises(ConfigError, match="missing '@type'"):
        parse_into({"name": "f", "typed_config": {"stat_prefix": "x"}}, Filter())
    with pytest.raises(ConfigError) as info:
        parse_into({"typed_config": {"@type": "type.googleapis.com/foo.Bar"}}, Filter())
    assert info.value.path == "typed_config.@type"
    assert info.value.message == "Unable to parse JSON as proto (INVALID_ARGUMENT: could not find @type " \
                                 "'type.googleapis.com/foo.Bar')"


def test_bytes_and_maps() -> None:
    from envoy.config.core.v3.base_pb2 import DataSource, Metadata

    source = DataSource()
    parse_into({"inline_bytes": "aGVsbG8"}, source)  # unpadded base64 is accepted, as by protobuf
    assert source.inline_bytes == b"hello"
    with pytest.raises(ConfigError, match="invalid base64"):
        parse_into({"inline_bytes": "!!"}, DataSource())
    metadata = Metadata()
    parse_into({"typed_filter_metadata": {"x": {"@type": "type.googleapis.com/google.protobuf.UInt32Value",
                                                "value": 7}}}, metadata)
    assert metadata.typed_filter_metadata["x"].type_url.endswith("UInt32Value")
    with pytest.raises(ConfigError) as info:
        parse_into({"filter_metadata": {"x": 1}}, Metadata())
    assert info.value.path == "filter_metadata[x]"


def test_json_duplicate_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="duplicate key 'node'"):
        load_bootstrap_text('{"node": {}, "node": {}}', "json")


# -- PGV -----------------------------------------------------------------------------------------

def test_pgv_numeric_range_matches_envoy() -> None:
    # Envoy 1.40 for healthy_panic_threshold: {value: 150}:
    # ... | caused by PercentValidationError.Value: value must be inside range [0, 100])
    from envoy.type.v3.percent_pb2 import Percent

    with pytest.raises(ConfigError) as info:
        pgv.validate(Percent(value=150), "p")
    assert info.value.path == "p.value"
    assert info.value.message == ("Proto constraint validation failed (PercentValidationError.Value: value must "
                                  "be inside range [0, 100])")
    pgv.validate(Percent(value=100))


def test_pgv_repeated_items_and_header_name_regex() -> None:
    from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
    from envoy.config.route.v3.route_components_pb2 import VirtualHost

    with pytest.raises(ConfigError) as info:
        pgv.validate(HeaderValue(key="bad\nkey"))  # HeaderValue.key is HTTP_HEADER_NAME, strict: false
    assert info.value.message == ('Proto constraint validation failed (HeaderValueValidationError.Key: value does '
                                  'not match regex pattern "^[^\\x00\\n\\r]*$")')
    vhost = VirtualHost(name="v", domains=["*"])
    vhost.request_headers_to_add.append(HeaderValueOption(header=HeaderValue(key="", value="v")))
    with pytest.raises(ConfigError) as info:
        pgv.validate(vhost)
    assert info.value.path == "request_headers_to_add[0].header.key"
    assert "VirtualHostValidationError.RequestHeadersToAdd[0]: embedded message failed validation | caused by " \
           "HeaderValueOptionValidationError.Header: embedded message failed validation | caused by " \
           "HeaderValueValidationError.Key: value length must be at least 1 characters" in info.value.message


def test_pgv_duration_bounds_use_go_duration_strings() -> None:
    assert [pgv.go_duration(n) for n in (0, 1, 1_500, 1_000_000, 250_000_000, 1_000_000_000, 90_000_000_000,
                                         3_600_000_000_000, -2_000_000_000)] == \
        ["0s", "1ns", "1.5µs", "1ms", "250ms", "1s", "1m30s", "1h0m0s", "-2s"]


def test_negative_duration_found_inside_any() -> None:
    from envoy.config.listener.v3.listener_components_pb2 import Filter

    f = Filter()
    parse_into({"name": "hcm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager", "stat_prefix": "s", "route_config": {}, "stream_idle_timeout": "-0.5s"}}, f)
    with pytest.raises(ConfigError) as info:
        pgv.validate(f)
    assert info.value.path == "typed_config.stream_idle_timeout"
    assert info.value.message == "Invalid duration: Expected positive duration: nanos: -500000000"


# -- util -----------------------------------------------------------------------------------------

def test_util_readers_keep_envoy_defaulting() -> None:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    cluster = _cluster({"connect_timeout": "0s", "per_connection_buffer_limit_bytes": 0,
                        "common_lb_config": {"healthy_panic_threshold": {"value": 25}}})
    assert util.duration_ms(cluster, "connect_timeout", 5000) == 0  # set to zero stays zero
    assert util.duration_ms(Cluster(), "connect_timeout", 5000) == 5000
    assert util.duration_ms_required(_cluster({"connect_timeout": "2.0015s"}), "connect_timeout") == 2001
    assert util.to_seconds(_cluster({"connect_timeout": "0.25s"}).connect_timeout) == 0.25
    assert util.wrapped(cluster, "per_connection_buffer_limit_bytes", 1 << 20) == 0
    assert util.wrapped(Cluster(), "per_connection_buffer_limit_bytes", 1 << 20) == 1 << 20
    assert util.percent(cluster.common_lb_config, "healthy_panic_threshold", 1.0, 0.5) == 0.25
    assert util.percent(Cluster().common_lb_config, "healthy_panic_threshold", 1.0, 0.5) == 0.5


# -- more parser and source edges ------------------------------------------------------------------

def _parse(type_name: str, value: Any) -> Any:
    cls = type_index.message_class(type_name)
    assert cls is not None
    message = cls()
    parse_into(value, message)
    return message


@pytest.mark.parametrize("type_name,value,path,phrase", [
    ("envoy.config.core.v3.Metadata", {"filter_metadata": []}, "filter_metadata", "expected an object, got an array"),
    ("envoy.extensions.wasm.v3.EnvironmentVariables", {"key_values": {"k": 1}}, "key_values[k]",
     "string: expected a string, got number 1"),
    ("envoy.config.core.v3.SocketAddress", {"port_value": True}, "port_value", "expected a number, got true"),
    ("envoy.config.core.v3.SocketAddress", {"port_value": "eighty"}, "port_value", "invalid number: 'eighty'"),
    ("envoy.type.v3.Percent", {"value": "inf"}, "value", "invalid number: 'inf'"),
    ("envoy.type.v3.Percent", {"value": [1]}, "value", "double: expected a number, got an array"),
    ("envoy.type.v3.Percent", {"value": "1e999"}, "value", "invalid number: '1e999'"),
    ("envoy.config.core.v3.DataSource", {"inline_bytes": 5}, "inline_bytes", "expected a base64 string"),
    ("envoy.config.cluster.v3.Cluster", {"type": False}, "type", "expected an enum name, got false"),
    ("envoy.config.core.v3.TypedExtensionConfig", {"typed_config": "x"}, "typed_config",
     "message google.protobuf.Any: expected an object, got string 'x'"),
    ("envoy.config.core.v3.TypedExtensionConfig",
     {"typed_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "a", "extra": 1}},
     "typed_config.extra", "no such field: 'extra'"),
    ("envoy.config.core.v3.TypedExtensionConfig",
     {"typed_config": {"@type": "type.googleapis.com/google.protobuf.Empty", "value": {"a": 1}}},
     "typed_config.value", "message google.protobuf.Empty: expected {}"),
    ("envoy.config.core.v3.TypedExtensionConfig", {"typed_config": {"@type": 7}}, "typed_config",
     "'@type' must be a string, got number 7"),
    ("envoy.config.cluster.v3.Cluster", {"connect_timeout": "315576000001s"}, "connect_timeout", "out of range"),
    ("envoy.config.route.v3.VirtualHost", {"domains": [None]}, "domains[0]", "expected a string, got null"),
    ("envoy.config.core.v3.Metadata", {"filter_metadata": {"a": {"b": {1, 2}}}}, "filter_metadata[a]",
     "message google.protobuf.Struct"),
])
def test_parser_rejects_with_path(type_name: str, value: Any, path: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(type_name, value)
    assert info.value.path == path
    assert phrase in info.value.message


def test_enum_names_are_case_insensitive_like_envoy() -> None:
    # Envoy's examples/wasm-cc/envoy.yaml writes `type: strict_dns`, `lb_policy: round_robin`; Envoy 1.40
    # accepts them (and `Round_Robin`).
    cluster = _parse("envoy.config.cluster.v3.Cluster", {"type": "strict_dns", "lb_policy": "Round_Robin"})
    assert (cluster.type, cluster.lb_policy) == (cluster.STRICT_DNS, cluster.ROUND_ROBIN)


def test_quoted_bools_read_like_envoy() -> None:
    # Envoy 1.40 accepts respect_dns_ttl: "yes" / "0" / "True" / "y" but rejects "on", "2" and an unquoted 1.
    for text, expected in (("yes", True), ("0", False), ("True", True), ("y", True), ("n", False)):
        assert _parse("envoy.config.cluster.v3.Cluster", {"respect_dns_ttl": text}).respect_dns_ttl is expected


def test_parser_number_spellings() -> None:
    assert _parse("envoy.config.core.v3.SocketAddress", {"port_value": "1e3"}).port_value == 1000
    assert _parse("envoy.config.core.v3.SocketAddress", {"port_value": 80.0}).port_value == 80
    assert _parse("envoy.type.v3.Percent", {"value": "Infinity"}).value == float("inf")
    assert _parse("envoy.type.v3.Percent", {"value": "12.5"}).value == 12.5
    metadata = _parse("envoy.config.core.v3.Metadata", {"filter_metadata": {"f": {2: "two", True: "yes"}}})
    assert dict(metadata.filter_metadata["f"]) == {"2": "two", "true": "yes"}


def test_wrapper_field_rules_apply_to_the_value() -> None:
    # HedgePolicy.initial_requests is a UInt32Value with `uint32: {gte: 1}`.
    hedge = _parse("envoy.config.route.v3.HedgePolicy", {"initial_requests": 0})
    with pytest.raises(ConfigError) as info:
        pgv.validate(hedge)
    assert info.value.message == ("Proto constraint validation failed (HedgePolicyValidationError.InitialRequests: "
                                  "value must be greater than or equal to 1)")
    pgv.validate(_parse("envoy.config.route.v3.HedgePolicy", {}))  # unset wrapper: no rule applies


def test_yaml_anchors_merge_keys_and_bad_tags(tmp_path: Path) -> None:
    text = """
node: &n {id: a, cluster: c}
static_resources:
  clusters:
  - &c {name: one, type: STRICT_DNS}
  - <<: *c
    name: two
"""
    bootstrap = load_bootstrap_text(text)
    assert [c.name for c in bootstrap.static_resources.clusters] == ["one", "two"]
    with pytest.raises(ConfigError, match=r"^yaml: error at line 1, column 7: could not determine a constructor"):
        load_bootstrap_text("node: !custom {id: a}\n")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"node: {id: \xff}\n")
    with pytest.raises(ConfigError, match="unable to read file"):
        from wasmproxy.config import load_bootstrap

        load_bootstrap(bad)
    with pytest.raises(ValueError):
        load_bootstrap_text("{}", "toml")  # type: ignore[arg-type]


def test_hostile_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="special characters are not allowed"):
        load_bootstrap_text("node: {id: \x07}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_bootstrap_text("a: " + "[" * 1100)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_bootstrap_text("[" * 5000, "json")
    deep_struct = '{"layered_runtime": {"layers": [{"name": "l", "static_layer": ' + '{"a": ' * 900 + "1" + "}" * 900
    with pytest.raises(ConfigError):
        load_bootstrap_text(deep_struct + "}]}}", "json")
