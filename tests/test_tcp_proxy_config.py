"""TcpProxy configuration as the filter reads it (defaults as Envoy's, unsupported parts refused)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from wasmproxy.config.errors import ConfigError
from wasmproxy.tcp.tcp_proxy import TcpProxyConfig


class Context:
    cluster_manager: Any = None
    store_for: Any = None
    main_dispatcher: Any = None


def _config(**fields: Any) -> TcpProxyConfig:
    proto = tcp_proxy_pb2.TcpProxy(stat_prefix="t", **fields)
    return TcpProxyConfig(proto, Context())  # type: ignore[arg-type]


def test_defaults_are_envoys() -> None:
    config = _config(cluster="c")
    assert config.idle_timeout_ms == 3600 * 1000
    assert config.max_connect_attempts == 1
    assert config.max_connection_duration_ms == 0
    assert config.pick_cluster() == "c"


def test_idle_timeout_zero_disables_it() -> None:
    proto = tcp_proxy_pb2.TcpProxy(stat_prefix="t", cluster="c")
    proto.idle_timeout.FromMilliseconds(0)
    assert TcpProxyConfig(proto, Context()).idle_timeout_ms == 0  # type: ignore[arg-type]


def test_weighted_clusters_are_picked_by_weight() -> None:
    proto = tcp_proxy_pb2.TcpProxy(stat_prefix="t")
    proto.weighted_clusters.clusters.add(name="a", weight=1)
    proto.weighted_clusters.clusters.add(name="b", weight=3)
    config = TcpProxyConfig(proto, Context())  # type: ignore[arg-type]
    random.seed(7)
    picks = [config.pick_cluster() for _ in range(4000)]
    assert 800 < picks.count("a") < 1200 and picks.count("a") + picks.count("b") == 4000


@pytest.mark.parametrize("field", ["tunneling_config", "on_demand"])
def test_unsupported_parts_are_refused(field: str) -> None:
    proto = tcp_proxy_pb2.TcpProxy(stat_prefix="t", cluster="c")
    getattr(proto, field).SetInParent()
    with pytest.raises(ConfigError, match=field):
        TcpProxyConfig(proto, Context())  # type: ignore[arg-type]
