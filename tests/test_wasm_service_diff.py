"""WasmService with ``singleton: false`` against real Envoy 1.40: one instance per thread (main and
every worker, plus the canary), each ticking, and HTTP readers on the same vm_id see its data."""

from __future__ import annotations

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

    service = plugin_path("tcp_service")
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "svc",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "http_echo"}}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.wasm", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": _plugin("reader", service, "reader", "vm_id svc", "svc")}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}
    return {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin}}},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.wasm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService", "singleton": False,
            "config": _plugin("service", service, "service", "period 10\ntoken per-thread", "svc")}}],
        "static_resources": {"listeners": [_listener("http", http, [hcm])],
                             "clusters": [_cluster("http_echo", http_echo)]},
    }


def _run(proc_cls: type[ProxyProcess], workdir: Path, http_echo: int) -> dict[str, Any]:
    admin, http = free_ports(2)
    path = workdir / f"{proc_cls.__name__}.yaml"
    path.write_text(yaml.safe_dump(_bootstrap(admin, http, http_echo)))
    with proc_cls(path, concurrency=2) as proc:
        def token() -> str | None:
            with RawConnection(LOOPBACK, http) as c:
                return c.request("GET", "/", headers=[("host", "x")]).header("x-service-token")

        seen = _poll(token, lambda v: v == "per-thread-")
        lines = proc.admin("/stats").body.decode().splitlines()
        stats = dict(line.split(": ", 1) for line in lines if ": " in line)
        return {"token": seen, "configured": stats.get("wasmcustom.service.configured")}


def test_non_singleton_service_runs_per_thread_as_envoy(tmp_path: Path, echo_upstream: int) -> None:
    from plugins.build import build

    build(["tcp_service"])
    envoy = _run(EnvoyProcess, tmp_path, echo_upstream)
    assert envoy["token"] == "per-thread-"
    assert envoy["configured"] == "4"  # the canary, main and both workers
    assert _run(WasmproxyProcess, tmp_path, echo_upstream) == envoy
