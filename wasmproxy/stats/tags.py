"""Envoy's default tag extraction: ``cluster.foo.upstream_rq_2xx`` -> ``cluster.upstream_rq_xx``
with tags ``envoy_response_code_class="2"``, ``envoy_cluster_name="foo"``.

Mirrors ``TagNameValues`` (source/common/config/well_known_names.cc) and
``TagProducerImpl``: every extractor runs against the *original* name; the
first capture group is what gets removed from the name, the second (if any) is
the tag value. Extractors whose regex starts with a literal first segment
(``^cluster\\.``) only run for names with that segment, after all the others:
that is why Envoy prints ``envoy_response_code_class`` before
``envoy_http_conn_manager_prefix`` and ``envoy_worker_id`` before
``envoy_listener_address``. Only the default extractors; ``stats_config``
custom tags are not supported.

Plugin metrics live under Envoy's custom stat namespace ``wasmcustom``: the
Prometheus output strips it and adds no ``envoy_`` prefix (``wasmcustom.hits``
-> ``hits``), as Envoy 1.40 does.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["CUSTOM_STAT_NAMESPACES", "extract_tags", "prometheus_name"]

CUSTOM_STAT_NAMESPACES = ("wasmcustom",)

# (tag name, regex) in Envoy's order. std::regex's [:digit:] is \d here.
_DEFAULT_TAG_REGEXES: tuple[tuple[str, str], ...] = (
    ("envoy.response_code", r"_rq(_(\d{3}))$"),
    ("envoy.response_code_class", r"_rq_(\d)xx$"),
    ("envoy.dynamo_partition_id",
     r"^http(?=\.).*?\.dynamodb\.table(?=\.).*?\.capacity(?=\.).*?(\.__partition_id=(\w{7}))$"),
    ("envoy.dyanmo_operation",
     r"^http(?=\.).*?\.dynamodb.(?:operation|table(?=\.).*?\.capacity)(\.(.*?))(?:\.|$)"),
    ("envoy.mongo_callsite", r"^mongo(?=\.).*?\.collection(?=\.).*?\.callsite\.((.*?)\.).*?query.\w+?$"),
    ("envoy.dynamo_table", r"^http(?=\.).*?\.dynamodb.(?:table|error)\.((.*?)\.)"),
    ("envoy.mongo_collection", r"^mongo(?=\.).*?\.collection\.((.*?)\.).*?query.\w+?$"),
    ("envoy.mongo_cmd", r"^mongo(?=\.).*?\.cmd\.((.*?)\.)\w+?$"),
    ("envoy.grpc_bridge_method", r"^cluster(?=\.).*?\.grpc(?=\.).*\.((.*?)\.)\w+?$"),
    ("envoy.http_user_agent", r"^http(?=\.).*?\.user_agent\.((.*?)\.)\w+?$"),
    ("envoy.virtual_cluster", r"^vhost(?=\.).*?\.vcluster\.((.*?)\.)\w+?$"),
    ("envoy.fault_downstream_cluster", r"^http(?=\.).*?\.fault\.((.*?)\.)\w+?$"),
    ("envoy.ssl_cipher", r"^listener(?=\.).*?\.ssl\.cipher(\.(.*?))$"),
    ("envoy.ssl_cipher_suite", r"^cluster(?=\.).*?\.ssl\.ciphers(\.(.*?))$"),
    ("envoy.grpc_bridge_service", r"^cluster(?=\.).*?\.grpc\.((.*?)\.)"),
    ("envoy.tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
    ("envoy.udp_prefix", r"^udp\.((.*?)\.)\w+?$"),
    ("envoy.clientssl_prefix", r"^auth\.clientssl\.((.*?)\.)\w+?$"),
    ("envoy.ratelimit_prefix", r"^ratelimit\.((.*?)\.)\w+?$"),
    ("envoy.cluster_name", r"^cluster\.((.*?)\.)"),
    ("envoy.http_conn_manager_prefix", r"^(?:|listener(?=\.).*?\.)http\.((.*?)\.)"),
    # Per-thread stats of workers: listener.<addr>.worker_0., server.worker_0., ...
    ("envoy.worker_id",
     r"^(?:listener(?=\.).*?\.|server\.|thread_local_cluster_manager\.|listener_manager\.)worker(_(\d+))\."),
    ("envoy.listener_address", r"^listener\.(((?:[_.\d]*|[_\[\]aAbBcCdDeEfF\d]*))\.)"),
    ("envoy.virtual_host", r"^vhost\.((.*?)\.)"),
    ("envoy.mongo_prefix", r"^mongo\.((.*?)\.)"),
    ("envoy.rds_route_config", r"^http(?=\.).*?\.rds\.((.*?)\.)\w+?$"),
)

_PREFIX_RE = re.compile(r"^\^(\w+)(?:\\\.|\(\?=\\\.\))")


def _compile() -> tuple[list[tuple[str, re.Pattern[str]]], dict[str, list[tuple[str, re.Pattern[str]]]]]:
    unprefixed: list[tuple[str, re.Pattern[str]]] = []
    prefixed: dict[str, list[tuple[str, re.Pattern[str]]]] = {}
    for name, regex in _DEFAULT_TAG_REGEXES:
        m = _PREFIX_RE.match(regex)
        entry = (name, re.compile(regex))
        if m:
            prefixed.setdefault(m.group(1), []).append(entry)
        else:
            unprefixed.append(entry)
    return unprefixed, prefixed


_UNPREFIXED, _PREFIXED = _compile()


@lru_cache(maxsize=65536)
def extract_tags(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``(tag-extracted name, ((tag name, value), ...))`` in Envoy's tag order."""
    first = name.split(".", 1)[0]
    tags: list[tuple[str, str]] = []
    remove: list[tuple[int, int]] = []
    for tag_name, pattern in (*_UNPREFIXED, *_PREFIXED.get(first, ())):
        m = pattern.search(name)
        if m is None:
            continue
        value_group = 2 if m.re.groups >= 2 else 1
        tags.append((tag_name, m.group(value_group)))
        remove.append(m.span(1))
    if not remove:
        return name, ()
    drop: set[int] = set()
    for start, end in remove:
        drop.update(range(start, end))
    return "".join(ch for i, ch in enumerate(name) if i not in drop), tuple(tags)


_SANITIZE = re.compile(r"[^a-zA-Z0-9_]")


@lru_cache(maxsize=65536)
def prometheus_name(extracted_name: str) -> str | None:
    """Envoy's ``PrometheusStatsFormatter::metricName``; None for an unrepresentable custom name."""
    for ns in CUSTOM_STAT_NAMESPACES:
        if extracted_name.startswith(ns + "."):
            stripped = _SANITIZE.sub("_", extracted_name[len(ns) + 1 :])
            if not stripped or stripped[0].isdigit():
                return None
            return stripped
    return "envoy_" + _SANITIZE.sub("_", extracted_name)


def prometheus_label(tag_name: str) -> str:
    """``envoy.cluster_name`` -> ``envoy_cluster_name``."""
    return _SANITIZE.sub("_", tag_name)
