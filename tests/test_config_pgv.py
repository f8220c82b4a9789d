"""The generic PGV validator: each rule kind, worded as PGV's C++ validators (what Envoy prints)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import text_format
from validate import validate_pb2

from wasmproxy.config import ConfigError, pgv
from wasmproxy.config.proto_json import parse_into
from wasmproxy.config.pgv import scalar_violation


def _rules(text: str) -> Any:
    return text_format.Parse(text, validate_pb2.FieldRules())


def _cluster_field(name: str) -> Any:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    return Cluster.DESCRIPTOR.fields_by_name[name]


NAME = _cluster_field("name")  # a string field
PORT = _cluster_field("per_connection_buffer_limit_bytes").message_type.fields_by_name["value"]  # uint32
TYPE = _cluster_field("type")  # enum DiscoveryType {STATIC=0 .. ORIGINAL_DST=4}


@pytest.mark.parametrize("field,value,rules,reason", [
    (NAME, "a", "string {const: 'b'}", 'value must equal "b"'),
    (NAME, "ftp", "string {in: ['http', 'https']}", "value must be in list [http https]"),
    (NAME, "x", "string {not_in: ['x']}", "value must not be in list [x]"),
    (NAME, "abc", "string {len: 2}", "value length must be 2 characters"),
    (NAME, "é", "string {min_len: 2 max_len: 5}", "value length must be between 2 and 5 characters, inclusive"),
    (NAME, "abc", "string {min_len: 2 max_len: 2}", "value length must be 2 characters"),
    (NAME, "abc", "string {max_len: 2}", "value length must be at most 2 characters"),
    (NAME, "é", "string {min_bytes: 3}", "value length must be at least 3 bytes"),
    (NAME, "abc", "string {max_bytes: 2}", "value length must be at most 2 bytes"),
    (NAME, "abc", "string {len_bytes: 2}", "value length must be 2 bytes"),
    (NAME, "abc", "string {prefix: 'x'}", 'value does not have prefix "x"'),
    (NAME, "abc", "string {suffix: 'x'}", 'value does not have suffix "x"'),
    (NAME, "abc", "string {contains: 'x'}", 'value does not contain substring "x"'),
    (NAME, "abc", "string {not_contains: 'b'}", 'value contains substring "b"'),
    (NAME, "abc", "string {pattern: '^a$'}", 'value does not match regex pattern "^a$"'),
    (NAME, "-bad-", "string {hostname: true}", "value must be a valid hostname"),
    (NAME, "1.2.3", "string {ip: true}", "value must be a valid IP Address"),
    (NAME, "::1", "string {ipv4: true}", "value must be a valid IPv4 Address"),
    (NAME, "1.2.3.4", "string {ipv6: true}", "value must be a valid IPv6 Address"),
    (NAME, "no spaces allowed", "string {address: true}", "value must be an ip address, or a hostname."),
    (NAME, "nope", "string {uuid: true}", "value must be a valid UUID"),
    (NAME, "a b", "string {well_known_regex: HTTP_HEADER_NAME}",
     "value does not match regex pattern \"^:?[0-9a-zA-Z!#$%&'*+-.^_|~`]+$\""),
    (NAME, "a\x01", "string {well_known_regex: HTTP_HEADER_VALUE}",
     'value does not match regex pattern "^[^\\x00-\\b\\n-\\x1f\\x7f]*$"'),
    (PORT, 3, "uint32 {const: 4}", "value must equal 4"),
    (PORT, 5, "uint32 {lt: 5}", "value must be less than 5"),
    (PORT, 6, "uint32 {lte: 5}", "value must be less than or equal to 5"),
    (PORT, 5, "uint32 {gt: 5}", "value must be greater than 5"),
    (PORT, 4, "uint32 {gte: 5}", "value must be greater than or equal to 5"),
    (PORT, 600, "uint32 {gte: 200 lt: 600}", "value must be inside range [200, 600)"),
    (PORT, 1, "uint32 {gt: 1 lte: 9}", "value must be inside range (1, 9]"),
    (PORT, 5, "uint32 {lt: 2 gt: 8}", "value must be outside range [2, 8]"),
    (PORT, 5, "uint32 {lte: 2 gte: 8}", "value must be outside range (2, 8)"),
    (PORT, 3, "uint32 {in: [1, 2]}", "value must be in list [1 2]"),
    (PORT, 1, "uint32 {not_in: [1]}", "value must not be in list [1]"),
    (PORT, 0.5, "double {gt: 1.5}", "value must be greater than 1.5"),
    (PORT, True, "bool {const: false}", "value must equal false"),
    (TYPE, 9, "enum {defined_only: true}", "value must be one of the defined enum values"),
    (TYPE, 1, "enum {const: 0}", "value must equal 0"),
    (TYPE, 1, "enum {in: [0, 2]}", "value must be in list [0 2]"),
    (TYPE, 1, "enum {not_in: [1]}", "value must not be in list [1]"),
    (NAME, b"ab", "bytes {min_len: 3}", "value length must be at least 3 bytes"),
    (NAME, b"ab", "bytes {max_len: 1}", "value length must be at most 1 bytes"),
    (NAME, b"ab", "bytes {prefix: 'x'}", 'value does not have prefix "x"'),
])
def test_rule_violation_wording(field: Any, value: Any, rules: str, reason: str) -> None:
    assert scalar_violation(field, value, _rules(rules)) == reason


@pytest.mark.parametrize("field,value,rules", [
    (NAME, "", "string {min_len: 1 ignore_empty: true}"),
    (NAME, "x:y", "string {well_known_regex: HTTP_HEADER_NAME strict: false}"),
    (NAME, "a.example.com.", "string {hostname: true}"),
    (NAME, "10.0.0.1", "string {address: true}"),
    (NAME, "anything", "string {email: true}"),  # unimplemented in PGV's C++, so never rejected by Envoy
    (PORT, 0, "uint32 {gte: 5 ignore_empty: true}"),
    (PORT, 9, "uint32 {lt: 2 gt: 8}"),
    (TYPE, 4, "enum {defined_only: true}"),
    (NAME, "abc", "string {pattern: '(?<!x)abc'}"),  # not RE2 syntax: not checked rather than rejected
])
def test_values_that_satisfy_the_rules(field: Any, value: Any, rules: str) -> None:
    assert scalar_violation(field, value, _rules(rules)) is None


def _violation(message: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        pgv.validate(message)
    return info.value


def test_map_key_rules_and_repeated_rules_on_real_protos() -> None:
    from envoy.config.core.v3.base_pb2 import Metadata
    from envoy.config.route.v3.route_components_pb2 import InternalRedirectPolicy

    metadata = Metadata()
    parse_into({"filter_metadata": {"": {"a": 1}}}, metadata)
    error = _violation(metadata)
    assert error.path == "filter_metadata[]"
    assert error.message == ("Proto constraint validation failed (key for MetadataValidationError.FilterMetadata[]: "
                             "value length must be at least 1 characters)")
    policy = InternalRedirectPolicy(response_headers_to_copy=["x-a", "x-a"])
    assert "InternalRedirectPolicyValidationError.ResponseHeadersToCopy: repeated value must contain unique items" \
        in _violation(policy).message
    policy = InternalRedirectPolicy(response_headers_to_copy=["bad\nheader"])
    error = _violation(policy)
    assert error.path == "response_headers_to_copy[0]"
    assert "InternalRedirectPolicyValidationError.ResponseHeadersToCopy[0]: value does not match regex pattern" \
        in error.message


def test_duration_rules_on_real_protos() -> None:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    cluster = Cluster(name="c")
    parse_into({"dns_refresh_rate": "0.0005s"}, cluster)
    error = _violation(cluster)
    assert error.path == "dns_refresh_rate"
    assert error.message == ("Proto constraint validation failed (ClusterValidationError.DnsRefreshRate: value must "
                             "be greater than 1ms)")


def test_required_message_and_required_any() -> None:
    from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
    from envoy.config.listener.v3.listener_pb2 import Listener

    error = _violation(TypedExtensionConfig(name="x"))
    assert error.path == "typed_config"
    assert error.message == ("Proto constraint validation failed (TypedExtensionConfigValidationError.TypedConfig: "
                             "value is required)")
    listener = Listener(name="l")
    parse_into({"filter_chains": [{"filters": [{"name": "f"}]}]}, listener)  # Filter.name only: valid
    pgv.validate(listener)
