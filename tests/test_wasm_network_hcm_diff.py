"""A Wasm network filter before the HTTP connection manager, against real Envoy 1.40: HTTP keeps
working through the network filter chain and the plugin sees the same callbacks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.ports import LOOPBACK, free_ports
from support.processes import EnvoyProcess, ProxyProcess, WasmproxyProcess
from support.raw_http import RawConnection
from test_tcp_proxy_diff import _cluster, _listener, _plugin, _poll

pytestmark = pytest.mark.envoy


def _bootstrap(admin: int, http: int, http_echo: int) -> dict[str, Any]:
    from plugins.build import plugin_path

    wasm_filter = {"name": "envoy.filters.network.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
        "config": _plugin("tcpf", plugin_path("tcp_filter"), "", "", "")}}
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "h",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "http_echo"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}
    return {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin}}},
        "static_resources": {"listeners": [_listener("http", http, [wasm_filter, hcm])],
                             "clusters": [_cluster("http_echo", http_echo)]},
    }


def _run(proc_cls: type[ProxyProcess], workdir: Path, http_echo: int) -> dict[str, Any]:
    admin, http = free_ports(2)
    path = workdir / f"{proc_cls.__name__}.yaml"
    path.write_text(yaml.safe_dump(_bootstrap(admin, http, http_echo)))
    with proc_cls(path, log_level="info") as proc:
        def plugin_log() -> list[str]:
            return [line.split("tcp_filter ", 1)[1] for line in proc.log_text().splitlines() if "tcp_filter " in line]

        _poll(plugin_log, lambda lines: lines.count("log") == 1)  # the readiness probe's connection is over
        statuses = []
        with RawConnection(LOOPBACK, http) as c:  # two requests on one connection, then we close
            for path_ in ("/a", "/b"):
                r = c.request("GET", path_, headers=[("host", "x")])
                statuses.append((r.status, r.header("x-echo-method") is not None or bool(r.body)))

        log = _poll(plugin_log, lambda lines: lines.count("log") == 2)
    # Response sizes differ (server, date and timing headers), and Envoy's HTTP/1 codec writes a
    # response in several connection writes (headers, body, end) where the HCM here makes one
    # or two: compare the callbacks with consecutive response writes collapsed.
    collapsed: list[str] = []
    for line in log:
        line = re.sub(r"^upstream_data \d+", "upstream_data N", line)
        if not (collapsed and line.startswith("upstream_data") and collapsed[-1] == line):
            collapsed.append(line)
    return {"statuses": statuses, "log": collapsed}


def test_wasm_network_filter_before_hcm_matches_envoy(tmp_path: Path, echo_upstream: int) -> None:
    from plugins.build import build

    build(["tcp_filter"])
    envoy = _run(EnvoyProcess, tmp_path, echo_upstream)
    assert envoy["statuses"] == [(200, True), (200, True)]
    assert "downstream_data 28 0" in envoy["log"]  # "GET /a HTTP/1.1\r\nhost: x\r\n\r\n" seen by the plugin
    assert _run(WasmproxyProcess, tmp_path, echo_upstream) == envoy
