"""Property: any JSON document either loads or raises ConfigError (never another exception)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wasmproxy.config import ConfigError, load_bootstrap_text

# Real field names so generated documents reach deep into the Bootstrap, plus a few type URLs.
_KEYS = ["static_resources", "listeners", "clusters", "name", "address", "socket_address", "port_value",
         "filter_chains", "filters", "typed_config", "route_config", "virtual_hosts", "domains", "routes", "match",
         "prefix", "route", "cluster", "connect_timeout", "type", "load_assignment", "endpoints", "lb_endpoints",
         "endpoint", "admin", "node", "id", "metadata", "filter_metadata", "http_filters", "stat_prefix", "value",
         "config", "vm_config", "environment_variables", "key_values", "layered_runtime", "layers", "static_layer",
         "typed_per_filter_config", "weighted_clusters", "timeout", "bogus"]
_TYPES = ["type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
          "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
          "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
          "type.googleapis.com/google.protobuf.StringValue", "type.googleapis.com/google.protobuf.Duration",
          "type.googleapis.com/google.protobuf.Struct", "type.googleapis.com/xds.type.v3.TypedStruct",
          "type.googleapis.com/nope.Nope"]

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(allow_nan=False),
                     st.sampled_from(["", "1s", "-1s", "STATIC", "127.0.0.1", "*", "x", "1.5", "NaN"]))


def _object(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    plain = st.dictionaries(st.sampled_from(_KEYS), children, max_size=4)
    typed = st.builds(lambda d, t: {**d, "@type": t}, plain, st.sampled_from(_TYPES))
    return st.one_of(plain, typed)


_documents = st.recursive(_scalars, lambda children: st.one_of(st.lists(children, max_size=3), _object(children)),
                          max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _documents, max_size=4))
def test_any_document_loads_or_raises_config_error(document: dict[str, Any]) -> None:
    try:
        load_bootstrap_text(json.dumps(document), "json")
    except ConfigError as e:
        assert str(e)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("{}[]:,-&*!|>'\"#%@`\t\n ?aZ09.\x00\x07é")), max_size=60))
def test_any_yaml_text_loads_or_raises_config_error(text: str) -> None:
    try:
        load_bootstrap_text(text, "yaml")
    except ConfigError as e:
        assert str(e)
